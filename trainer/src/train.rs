//! The training loop on one process: epochs of dataset batches, VAE latents and text
//! conditioning, the kohya loss, gradient accumulation, clipping, the optimizer and LR schedule,
//! and a stop at the first non-finite loss or gradient (no LoRA is ever made from NaN weights).
//! Saving, resuming, sampling and data-parallel ranks build on this.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use rand::SeedableRng;

use crate::dataset::{BatchInput, Dataset};
use crate::loader::StableDiffusion;
use crate::lora::{LoraConfig, LoraNetwork};
use crate::lr::LrScheduler;
use crate::optim::{self, ParamGroup};
use crate::step::{draw_noise, training_loss, StepOptions};
use crate::{Error, Result};

/// What one run trains and how (sd-scripts' option names in the fields' docs).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// `network_dim`, `network_alpha`, `conv_dim`, `conv_alpha`; which models get LoRA.
    pub lora: LoraConfig,
    pub optimizer_type: String,
    pub optimizer_args: BTreeMap<String, String>,
    /// `unet_lr`; `None` or 0 leaves the UNet untrained.
    pub unet_lr: Option<f64>,
    /// `text_encoder_lr`; `None` or 0 leaves the text encoder untrained.
    pub text_encoder_lr: Option<f64>,
    pub lr_scheduler: String,
    pub lr_warmup_steps: usize,
    pub lr_scheduler_num_cycles: usize,
    pub lr_scheduler_power: f64,
    /// Optimizer steps to run.
    pub max_train_steps: usize,
    pub gradient_accumulation_steps: usize,
    /// 0 turns clipping off.
    pub max_grad_norm: f64,
    pub seed: u64,
    pub clip_skip: usize,
    pub step: StepOptions,
}

/// Progress after each optimizer step.
#[derive(Debug, Clone)]
pub struct StepEvent {
    pub step: usize,
    pub total: usize,
    pub epoch: usize,
    /// Loss of this optimizer step (mean over its accumulated micro-batches).
    pub loss: f32,
    /// Learning rate per trained group, in order unet, text encoder.
    pub lrs: Vec<(String, f64)>,
}

fn active_lr(lr: Option<f64>) -> Option<f64> {
    lr.filter(|l| *l > 0.0)
}

/// Adds `new` into `acc` for every variable.
fn accumulate(
    acc: &mut Option<GradStore>,
    new: GradStore,
    vars: &[candle_core::Var],
) -> Result<()> {
    match acc {
        None => *acc = Some(new),
        Some(a) => {
            for v in vars {
                if let Some(g) = new.get(v.as_tensor()) {
                    let sum = match a.get(v.as_tensor()) {
                        Some(prev) => (prev + g.detach())?,
                        None => g.detach(),
                    };
                    a.insert(v.as_tensor(), sum);
                }
            }
        }
    }
    Ok(())
}

/// Trains a LoRA network on `sd` with `dataset`; `on_step` sees every optimizer step.
pub fn train(
    sd: &StableDiffusion,
    dataset: &Dataset,
    opts: &TrainOptions,
    device: &Device,
    mut on_step: impl FnMut(&StepEvent),
) -> Result<LoraNetwork> {
    let unet_lr = active_lr(opts.unet_lr);
    let te_lr = active_lr(opts.text_encoder_lr);
    if unet_lr.is_none() && te_lr.is_none() {
        return Err(Error::Config(
            "both unet_lr and text_encoder_lr are 0: nothing would be trained".into(),
        ));
    }
    if opts.max_train_steps == 0 || opts.gradient_accumulation_steps == 0 {
        return Err(Error::Config(
            "max_train_steps and gradient_accumulation_steps must be at least 1".into(),
        ));
    }
    let lora_cfg = LoraConfig {
        train_unet: opts.lora.train_unet && unet_lr.is_some(),
        train_text_encoder: opts.lora.train_text_encoder && te_lr.is_some(),
        ..opts.lora.clone()
    };
    let net = LoraNetwork::new(&sd.sites(), &lora_cfg, device, opts.seed)?;
    net.apply();
    let (mut groups, mut base_lrs) = (Vec::new(), Vec::new());
    for (name, lr, te) in [("unet", unet_lr, false), ("textencoder", te_lr, true)] {
        let Some(lr) = lr else { continue };
        let vars: Vec<_> = net
            .modules()
            .iter()
            .filter(|m| m.is_text_encoder() == te)
            .flat_map(|m| [m.down.clone(), m.up.clone()])
            .collect();
        if vars.is_empty() {
            continue;
        }
        groups.push(ParamGroup {
            name: name.to_string(),
            vars,
            lr,
        });
        base_lrs.push((name.to_string(), lr));
    }
    let group_names: Vec<String> = base_lrs.iter().map(|(n, _)| n.clone()).collect();
    let train_te = group_names.iter().any(|n| n == "textencoder");
    let vars = net.vars();
    let mut optimizer = optim::build(&opts.optimizer_type, &opts.optimizer_args, groups)?;
    let scheduler = LrScheduler::new(
        &opts.lr_scheduler,
        base_lrs.iter().map(|(_, l)| *l).collect(),
        opts.lr_warmup_steps,
        opts.max_train_steps,
        opts.lr_scheduler_num_cycles,
        opts.lr_scheduler_power,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let scale = sd.vae.scaling_factor();
    let (mut step, mut micro, mut epoch) = (0usize, 0usize, 0usize);
    let mut acc: Option<GradStore> = None;
    let mut loss_sum = 0f32;
    while step < opts.max_train_steps {
        epoch += 1;
        let batches = dataset.epoch_batches(epoch, opts.seed);
        if batches.is_empty() {
            return Err(Error::Config("the dataset yields no batches".into()));
        }
        for batch in &batches {
            let Some(sb) = dataset.load_batch(batch, epoch, opts.seed, None, device)? else {
                continue;
            };
            let latents = match &sb.input {
                BatchInput::Pixels(px) => (sd.vae.encode(px)?.sample_with(&mut rng)? * scale)?,
                BatchInput::Latents(l) => (l * scale)?,
            }
            .detach();
            let ids = sb
                .captions
                .iter()
                .map(|c| sd.tokenizer.encode(c, 77))
                .collect::<Result<Vec<_>>>()?;
            let ids = Tensor::new(ids, device)?;
            let mut context = sd.text_encoder.forward(&ids, opts.clip_skip)?;
            if !train_te {
                context = context.detach();
            }
            let weights = Tensor::new(sb.loss_weights.as_slice(), device)?;
            let noise = draw_noise(&mut rng, latents.dims4()?, &opts.step, device)?;
            let loss = training_loss(
                &sd.unet,
                &sd.schedule,
                &latents,
                &context,
                &weights,
                &noise,
                &opts.step,
            )?;
            let lrs = scheduler.lr(step);
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(Error::Config(format!(
                    "loss became {value} at step {} (lr {lrs:?}): stopping before any weight is \
                     written. Likely causes: learning rate too high, fp16 overflow (try bf16 or \
                     no mixed precision), or a broken image/latent",
                    step + 1
                )));
            }
            let grads = (loss / opts.gradient_accumulation_steps as f64)?.backward()?;
            accumulate(&mut acc, grads, &vars)?;
            loss_sum += value;
            micro += 1;
            if micro < opts.gradient_accumulation_steps {
                continue;
            }
            let Some(mut grads) = acc.take() else {
                continue;
            };
            if !optim::all_finite(&grads, &vars)? {
                return Err(Error::Config(format!(
                    "a LoRA gradient became NaN or infinite at step {} (lr {lrs:?}): stopping \
                     before any weight is written; lower the learning rate or keep \
                     max_grad_norm on",
                    step + 1
                )));
            }
            if opts.max_grad_norm > 0.0 {
                optim::clip_grad_norm(&mut grads, &vars, opts.max_grad_norm)?;
            }
            optimizer.step(&grads, &lrs)?;
            step += 1;
            let event = StepEvent {
                step,
                total: opts.max_train_steps,
                epoch,
                loss: loss_sum / micro as f32,
                lrs: group_names.iter().cloned().zip(lrs).collect(),
            };
            on_step(&event);
            loss_sum = 0.0;
            micro = 0;
            if step >= opts.max_train_steps {
                break;
            }
        }
    }
    Ok(net)
}
