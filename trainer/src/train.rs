//! The training loop on one process: epochs of dataset batches, VAE latents (or cached ones)
//! and text conditioning (cached when the text encoder is frozen), the kohya loss, gradient
//! accumulation, clipping, the optimizer and LR schedule, and a stop at the first non-finite
//! loss or gradient (no LoRA is ever made from NaN weights).
//!
//! [`Trainer`] owns everything that changes while training and stops only at optimizer-step
//! boundaries, so its whole state ([`Trainer::save_state`]) is the LoRA weights, the optimizer
//! state, the data position and the loss window: a resumed run continues bit-identically.
//! Every random draw of a sample comes from a stream keyed by (seed, epoch, global batch,
//! position in it), so no generator state needs saving.
//!
//! Data-parallel ([`Trainer::with_collective`]): every rank holds the same LoRA (same seed),
//! takes its slice of each global batch ([`plan::split`]), and once per optimizer step the
//! ranks all-reduce their per-micro-batch losses, sample counts, non-finite flags and the
//! flattened LoRA gradients; every rank then takes the same optimizer step. Each rank's loss is
//! weighted by its share of the global batch, so `w` ranks with batch `b` compute the gradient
//! of one rank with batch `w·b` (up to float rounding), even when a bucket's last batch is
//! short.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use loractl_collective::Collective;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::dataset::{plan, BatchInput, Dataset, LatentCache};
use crate::loader::StableDiffusion;
use crate::lora::{LoraConfig, LoraNetwork};
use crate::lr::{LrScheduler, SchedulerKind};
use crate::optim::{self, Optimizer, OptimizerKind, OptimizerState, ParamGroup};
use crate::step::{draw_noise, training_loss, StepOptions};
use crate::{Error, Result};

/// What one run trains and how (sd-scripts' option names in the fields' docs).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// `network_dim`, `network_alpha`, `conv_dim`, `conv_alpha`; which models get LoRA.
    pub lora: LoraConfig,
    pub optimizer_type: OptimizerKind,
    pub optimizer_args: BTreeMap<String, String>,
    /// `unet_lr`; `None` or 0 leaves the UNet untrained.
    pub unet_lr: Option<f64>,
    /// `text_encoder_lr`; `None` or 0 leaves the text encoder untrained.
    pub text_encoder_lr: Option<f64>,
    pub lr_scheduler: SchedulerKind,
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
    /// `max_token_length`: 75, 150 or 225.
    pub max_token_length: usize,
    /// Recompute the UNet blocks' activations in backward (`gradient_checkpointing`).
    pub gradient_checkpointing: bool,
    /// Dynamic loss scaling for an fp16 model (`mixed_precision = "fp16"`): see [`LossScaler`].
    pub fp16_loss_scaling: bool,
    pub step: StepOptions,
}

impl Default for TrainOptions {
    /// sd-scripts' defaults for the options it has (AdamW, constant lr 1e-4 on both models,
    /// clipping at 1, one step).
    fn default() -> Self {
        Self {
            lora: LoraConfig::default(),
            optimizer_type: OptimizerKind::AdamW,
            optimizer_args: BTreeMap::new(),
            unet_lr: Some(1e-4),
            text_encoder_lr: Some(1e-4),
            lr_scheduler: SchedulerKind::Constant,
            lr_warmup_steps: 0,
            lr_scheduler_num_cycles: 1,
            lr_scheduler_power: 1.0,
            max_train_steps: 1,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            seed: 0,
            clip_skip: 1,
            max_token_length: 75,
            gradient_checkpointing: false,
            fp16_loss_scaling: false,
            step: StepOptions::default(),
        }
    }
}

/// Where a run stands: optimizer steps done, the current epoch (1-based) and the next batch of
/// that epoch (on this rank's share of it). A run saved at the end of an epoch's batches holds
/// `batch == batches in the epoch`: the epoch's end (saving, sampling) is still to come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub step: usize,
    pub epoch: usize,
    pub batch: usize,
}

impl Default for Position {
    fn default() -> Self {
        Self {
            step: 0,
            epoch: 1,
            batch: 0,
        }
    }
}

/// sd-scripts' `LossRecorder`: the moving average of the last epoch's worth of micro-batch
/// losses (`loss/average`, and `loss/epoch_average` at an epoch's end). Slot `i` holds the
/// latest loss of the `i`-th micro-batch of an epoch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossRecorder {
    losses: Vec<f32>,
    total: f64,
}

impl LossRecorder {
    pub fn add(&mut self, slot: usize, loss: f32) {
        if let Some(old) = self.losses.get_mut(slot) {
            self.total -= *old as f64;
            *old = loss;
        } else {
            self.losses.push(loss);
        }
        self.total += loss as f64;
    }

    pub fn moving_average(&self) -> f32 {
        if self.losses.is_empty() {
            return 0.0;
        }
        (self.total / self.losses.len() as f64) as f32
    }

    /// Bit-exact form for a saved state (JSON numbers would round).
    fn to_bits(&self) -> (Vec<u32>, u64) {
        (
            self.losses.iter().map(|l| l.to_bits()).collect(),
            self.total.to_bits(),
        )
    }

    fn from_bits(losses: &[u32], total: u64) -> Self {
        Self {
            losses: losses.iter().map(|b| f32::from_bits(*b)).collect(),
            total: f64::from_bits(total),
        }
    }
}

/// Progress after each optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEvent {
    pub step: usize,
    pub total: usize,
    pub epoch: usize,
    /// Loss of this optimizer step (mean over its accumulated micro-batches), `loss/current`.
    pub loss: f32,
    /// `loss/average`: the moving mean over the last epoch's worth of micro-batches.
    pub loss_average: f32,
    /// Learning rate per trained group (`unet`, `textencoder`), as the optimizer used it.
    pub lrs: Vec<(String, f64)>,
    /// `d · lr` per group for D-Adaptation and Prodigy.
    pub d_lrs: Option<Vec<(String, f64)>>,
    /// Samples (images) this step trained on, all micro-batches together.
    pub samples: usize,
    /// Seconds of this step spent loading its batches and encoding them (images to latents,
    /// captions to text embeddings), before the UNet.
    pub data_seconds: f64,
    /// Seconds of this step spent all-reducing with the other ranks (0 alone).
    pub allreduce_seconds: f64,
}

/// The end of an epoch (also when `max_train_steps` ends the run inside it, as sd-scripts).
#[derive(Debug, Clone, PartialEq)]
pub struct EpochEvent {
    /// The epoch that ended (1-based).
    pub epoch: usize,
    pub step: usize,
    /// `loss/epoch_average`.
    pub loss_average: f32,
    /// Whether this is the last epoch of the run.
    pub last: bool,
}

/// Whether a hook lets the run go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop at this optimizer-step boundary; the trainer's state is then complete and can be
    /// saved and resumed.
    Stop,
}

/// Called by [`Trainer::run`] at optimizer-step and epoch boundaries.
pub trait Hooks {
    fn step_end(&mut self, _trainer: &Trainer<'_>, _event: &StepEvent) -> Result<Flow> {
        Ok(Flow::Continue)
    }
    fn epoch_end(&mut self, _trainer: &Trainer<'_>, _event: &EpochEvent) -> Result<Flow> {
        Ok(Flow::Continue)
    }
}

/// Hooks that only watch steps.
pub struct OnStep<F>(pub F);

impl<F: FnMut(&StepEvent) + Send> Hooks for OnStep<F> {
    fn step_end(&mut self, _trainer: &Trainer<'_>, event: &StepEvent) -> Result<Flow> {
        (self.0)(event);
        Ok(Flow::Continue)
    }
}

/// How [`Trainer::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `max_train_steps` reached.
    Finished,
    /// A hook asked to stop; [`Trainer::position`] says where.
    Stopped,
}

fn active_lr(lr: Option<f64>) -> Option<f64> {
    lr.filter(|l| *l > 0.0)
}

/// Adds `new` into `acc` for every variable.
fn accumulate(acc: &mut Option<GradStore>, new: GradStore, vars: &[Var]) -> Result<()> {
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

/// The RNG of one sample's VAE sample, noise and timestep: its own stream of a seed derived
/// from the run's, keyed by the sample's place in the epoch (global batch, position in it), so
/// it is the same after a resume, on whichever rank and with whatever per-rank batch size.
pub fn step_rng(seed: u64, epoch: usize, batch_index: usize, position: usize) -> ChaCha8Rng {
    // A constant apart from the dataset's own streams (which use `seed + epoch`).
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64) ^ 0x6c6f_7261_6374_6c00);
    rng.set_stream(((batch_index as u64 + 1) << 32) | position as u64);
    rng
}

/// Floats per all-reduce call of the flattened gradients: a few calls for a large LoRA, so a
/// 128-rank SD LoRA is never copied as one huge message.
const GRAD_BUCKET: usize = 1 << 22;

/// Zero gradients for every variable: what a rank contributes when none of its micro-batches
/// had a sample (`GradStore` has no public constructor, so through a backward pass).
fn zero_grads(vars: &[Var]) -> Result<GradStore> {
    let mut total: Option<Tensor> = None;
    for v in vars {
        let s = v.as_tensor().sum_all()?;
        total = Some(match total {
            None => s,
            Some(t) => (t + s)?,
        });
    }
    let total = total.ok_or_else(|| Error::Config("no LoRA variables to train".into()))?;
    Ok((total * 0.0)?.backward()?)
}

/// Most text-encoder outputs kept in memory when the text encoder is frozen.
const TEXT_CACHE_LIMIT: usize = 8192;

const STATE_FORMAT: &str = "loractl-train-state";
/// Metadata key of the state JSON in a single-file state.
const STATE_KEY: &str = "loractl.train_state";
const STATE_VERSION: u32 = 1;

/// Dynamic loss scaling for fp16 training, as PyTorch's `GradScaler` (which accelerate and so
/// sd-scripts use) does it: the loss is multiplied by `scale` before backward so small
/// gradients survive fp16, and the gradients are divided by it before the update. A step whose
/// gradients overflowed (inf/NaN) is skipped — no update, the step still counts — and the
/// scale halves; after `GROWTH_INTERVAL` good steps in a row it doubles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Good steps since the last change of scale.
    pub good_steps: u32,
}

impl LossScaler {
    pub const INITIAL_SCALE: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u32 = 2000;

    pub fn new() -> Self {
        Self {
            scale: Self::INITIAL_SCALE,
            good_steps: 0,
        }
    }

    /// Records a step's outcome: `finite` gradients count towards growth, others halve the
    /// scale (never below 1 / 2^24, where fp16's smallest value is).
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale * 0.5).max(1.0 / 16_777_216.0);
            self.good_steps = 0;
        }
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new()
    }
}

/// `state.json` of a saved training state.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: String,
    version: u32,
    position: Position,
    seed: u64,
    optimizer_type: String,
    groups: Vec<String>,
    max_train_steps: usize,
    gradient_accumulation_steps: usize,
    /// This rank's batches per epoch when saved; a different count means another dataset.
    batches_per_epoch: usize,
    loss_window: Vec<u32>,
    loss_total_bits: u64,
    /// fp16 runs: the loss scaler (absent in states of other runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scaler: Option<LossScaler>,
}

/// A training run in progress: the LoRA, the optimizer and where the data stands.
pub struct Trainer<'a> {
    sd: &'a StableDiffusion,
    dataset: &'a Dataset,
    opts: TrainOptions,
    device: Device,
    net: LoraNetwork,
    optimizer: Box<dyn Optimizer>,
    scheduler: LrScheduler,
    group_names: Vec<String>,
    train_te: bool,
    vars: Vec<Var>,
    latents: Option<LatentCache>,
    text_cache: RefCell<HashMap<String, Tensor>>,
    position: Position,
    loss: LossRecorder,
    rank: usize,
    world_size: usize,
    /// The other ranks of a data-parallel run; `None` alone.
    collective: Option<Box<dyn Collective>>,
    /// Time of the current step spent on its batches' inputs, and on all-reduces.
    data_time: Cell<Duration>,
    allreduce_time: Cell<Duration>,
    /// fp16 runs: dynamic loss scaling.
    scaler: Option<LossScaler>,
    /// Optimizer steps skipped for overflowing fp16 gradients.
    skipped_steps: usize,
}

impl<'a> Trainer<'a> {
    /// A fresh run: a new LoRA (or `initial` weights, sd-scripts' `network_weights`) on `sd`.
    pub fn new(
        sd: &'a StableDiffusion,
        dataset: &'a Dataset,
        opts: TrainOptions,
        device: &Device,
        initial: Option<&HashMap<String, Tensor>>,
    ) -> Result<Self> {
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
        let mut net = LoraNetwork::new(&sd.sites(), &lora_cfg, device, opts.seed)?;
        sd.unet
            .set_gradient_checkpointing(opts.gradient_checkpointing);
        if let Some(init) = initial {
            net.load_values(init, "network_weights")?;
        }
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
        let optimizer = optim::build(opts.optimizer_type, &opts.optimizer_args, groups)?;
        let scheduler = LrScheduler::new(
            opts.lr_scheduler,
            base_lrs.iter().map(|(_, l)| *l).collect(),
            opts.lr_warmup_steps,
            opts.max_train_steps,
            opts.lr_scheduler_num_cycles,
            opts.lr_scheduler_power,
        )?;
        Ok(Self {
            sd,
            dataset,
            device: device.clone(),
            net,
            optimizer,
            scheduler,
            group_names,
            train_te,
            vars,
            latents: None,
            text_cache: RefCell::new(HashMap::new()),
            position: Position::default(),
            loss: LossRecorder::default(),
            rank: 0,
            world_size: 1,
            collective: None,
            data_time: Cell::default(),
            allreduce_time: Cell::default(),
            scaler: opts.fp16_loss_scaling.then(LossScaler::new),
            skipped_steps: 0,
            opts,
        })
    }

    /// Makes this trainer one rank of a data-parallel run: it trains on its slice of every
    /// global batch and averages gradients with the other ranks through `collective` once per
    /// optimizer step. Call before [`Trainer::load_state`] (the data position depends on it);
    /// every rank must use the same options, seed and dataset.
    pub fn with_collective(mut self, collective: Box<dyn Collective>) -> Self {
        self.rank = collective.rank();
        self.world_size = collective.world_size().max(1);
        self.collective = Some(collective);
        self
    }

    /// This process's rank (0 without a collective).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks of the run (1 without a collective).
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Trains on latents from `cache` (filled by [`Dataset::cache_latents`] or
    /// [`Trainer::cache_latents`]) instead of encoding images every step.
    pub fn with_latent_cache(mut self, cache: LatentCache) -> Self {
        self.latents = Some(cache);
        self
    }

    /// Encodes every image (and its flipped copy with `flip_aug`) into `cache` with the VAE:
    /// a sample of the latent distribution, unscaled, as sd-scripts caches it.
    pub fn cache_latents(
        sd: &StableDiffusion,
        dataset: &Dataset,
        cache: &LatentCache,
        seed: u64,
        device: &Device,
    ) -> Result<crate::dataset::CacheStats> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7661_655f_6361_6368);
        dataset.cache_latents(cache, |px| {
            let px = px.to_device(device)?;
            let px = if px.rank() == 3 { px.unsqueeze(0)? } else { px };
            let l = sd.vae.encode(&px)?.sample_with(&mut rng)?;
            Ok(l.squeeze(0)?.to_device(&Device::Cpu)?)
        })
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn network(&self) -> &LoraNetwork {
        &self.net
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// Names of the trained parameter groups, in optimizer order.
    pub fn groups(&self) -> &[String] {
        &self.group_names
    }

    /// This rank's micro-batches of one epoch (one per global batch, maybe empty) and the
    /// size of each global batch.
    fn rank_batches(&self, epoch: usize) -> (Vec<plan::Batch>, Vec<usize>) {
        let global = self
            .dataset
            .global_batches(epoch, self.opts.seed, self.world_size);
        let sizes = global.iter().map(|b| b.images.len()).collect();
        let bs = self.dataset.config().train_batch_size;
        let mine = plan::split(&global, self.rank, self.world_size, bs);
        (mine, sizes)
    }

    /// Text conditioning for `captions`: batched through the LoRA-patched encoder when it
    /// trains, else caption by caption from a cache (a frozen encoder gives each caption the
    /// same output every time).
    fn context(&self, captions: &[String]) -> Result<Tensor> {
        let v2 = self.sd.family.is_v2();
        let encode = |caps: &[&String]| -> Result<Tensor> {
            let ids = caps
                .iter()
                .map(|c| {
                    self.sd
                        .tokenizer
                        .encode_kohya(c, self.opts.max_token_length)
                })
                .collect::<Result<Vec<_>>>()?;
            let ids = Tensor::new(ids, &self.device)?;
            self.sd
                .text_encoder
                .encode_long(&ids, self.opts.clip_skip, v2)
        };
        if self.train_te {
            return encode(&captions.iter().collect::<Vec<_>>());
        }
        let mut parts = Vec::with_capacity(captions.len());
        for c in captions {
            let cached = self.text_cache.borrow().get(c).cloned();
            let t = match cached {
                Some(t) => t,
                None => {
                    let t = encode(&[c])?.detach();
                    let mut cache = self.text_cache.borrow_mut();
                    if cache.len() < TEXT_CACHE_LIMIT {
                        cache.insert(c.clone(), t.clone());
                    }
                    t
                }
            };
            parts.push(t);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Loss of one micro-batch (`None` when every image of it was dropped as unreadable) and
    /// the number of samples in it.
    fn micro_batch_loss(
        &self,
        batch: &plan::Batch,
        epoch: usize,
    ) -> Result<Option<(Tensor, usize)>> {
        let seed = self.opts.seed;
        if batch.images.is_empty() {
            return Ok(None);
        }
        let loading = Instant::now();
        let Some(sb) =
            self.dataset
                .load_batch(batch, epoch, seed, self.latents.as_ref(), &self.device)?
        else {
            return Ok(None);
        };
        // One stream per sample: the draws of a sample do not depend on its batch-mates.
        let mut rngs: Vec<ChaCha8Rng> = sb
            .positions
            .iter()
            .map(|&p| step_rng(seed, epoch, batch.index, p))
            .collect();
        let scale = self.sd.vae.scaling_factor();
        let latents = match &sb.input {
            BatchInput::Pixels(px) => {
                let posterior = self.sd.vae.encode(px)?;
                let dims = posterior.mean.dims().to_vec();
                let per_sample: usize = dims[1..].iter().product();
                let mut eps = Vec::with_capacity(per_sample * rngs.len());
                for rng in rngs.iter_mut() {
                    eps.extend(crate::random::standard_normal(rng, per_sample));
                }
                let eps = Tensor::from_vec(eps, dims, posterior.mean.device())?;
                (posterior.sample(&eps)? * scale)?
            }
            BatchInput::Latents(l) => (l * scale)?,
        }
        .detach();
        let context = self.context(&sb.captions)?;
        let weights = Tensor::new(sb.loss_weights.as_slice(), &self.device)?;
        let (_, c, h, w) = latents.dims4()?;
        let (mut noises, mut timesteps) = (Vec::new(), Vec::new());
        for rng in rngs.iter_mut() {
            let n = draw_noise(rng, (1, c, h, w), &self.opts.step, &self.device)?;
            noises.push(n.noise);
            timesteps.push(n.timesteps);
        }
        let noise = crate::step::StepNoise {
            noise: Tensor::cat(&noises, 0)?,
            timesteps: Tensor::cat(&timesteps, 0)?,
        };
        self.data_time.set(self.data_time.get() + loading.elapsed());
        let loss = training_loss(
            &self.sd.unet,
            &self.sd.schedule,
            &latents,
            &context,
            &weights,
            &noise,
            &self.opts.step,
        )?;
        Ok(Some((loss, sb.captions.len())))
    }

    /// Every batch of `epoch` came back empty: each of its images was skipped as unreadable.
    fn no_usable_batch(&self, epoch: usize) -> Error {
        let skipped = self.dataset.skipped_images();
        let shown: Vec<String> = skipped
            .iter()
            .take(5)
            .map(|s| format!("{} ({})", s.path.display(), s.reason))
            .collect();
        let more = skipped.len().saturating_sub(shown.len());
        Error::Config(format!(
            "epoch {epoch} has no usable batch: every image became unreadable after the dataset \
             was scanned ({} skipped: {}{}); replace or remove them and train again",
            skipped.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ))
    }

    fn diverged(&self, what: &str, lrs: &[f64]) -> Error {
        let lrs: Vec<String> = self
            .group_names
            .iter()
            .zip(lrs)
            .map(|(g, l)| format!("{g} {l:e}"))
            .collect();
        Error::Diverged(format!(
            "{what} at step {} of {} (epoch {}, lr {}): stopping before any weight is \
             written. Likely causes: a learning rate too high for {} (lower it or keep \
             max_grad_norm on), fp16 overflow (use bf16 or no mixed precision), or a broken \
             image or cached latent",
            self.position.step + 1,
            self.opts.max_train_steps,
            self.position.epoch,
            lrs.join(", "),
            self.opts.optimizer_type,
        ))
    }

    /// One optimizer update from accumulated gradients.
    fn update(
        &mut self,
        mut grads: GradStore,
        micro: usize,
        loss_sum: f32,
        samples: usize,
    ) -> Result<StepEvent> {
        let lrs = self.scheduler.lr(self.position.step);
        let finite = optim::all_finite(&grads, &self.vars)?;
        let skip = match &mut self.scaler {
            Some(scaler) => {
                let scale = scaler.scale;
                scaler.update(finite);
                if finite {
                    optim::scale_grads(&mut grads, &self.vars, 1.0 / scale)?;
                }
                !finite
            }
            None if !finite => {
                return Err(self.diverged("a LoRA gradient became NaN or infinite", &lrs));
            }
            None => false,
        };
        if skip {
            // An fp16 overflow: no update this step (the loss scale was halved).
            self.skipped_steps += 1;
            tracing::debug!(
                step = self.position.step + 1,
                "fp16 gradients overflowed: step skipped"
            );
        } else {
            if self.opts.max_grad_norm > 0.0 {
                optim::clip_grad_norm(&mut grads, &self.vars, self.opts.max_grad_norm)?;
            }
            self.optimizer.step(&grads, &lrs)?;
        }
        if !optim::params_finite(&self.vars)? {
            return Err(self.diverged("a LoRA weight became NaN or infinite in the update", &lrs));
        }
        self.position.step += 1;
        let used = self.optimizer.own_lrs().unwrap_or(lrs);
        let named = |v: Vec<f64>| -> Vec<(String, f64)> {
            self.group_names.iter().cloned().zip(v).collect()
        };
        Ok(StepEvent {
            step: self.position.step,
            total: self.opts.max_train_steps,
            epoch: self.position.epoch,
            loss: loss_sum / micro as f32,
            loss_average: self.loss.moving_average(),
            lrs: named(used),
            d_lrs: self.optimizer.d_lr().map(named),
            samples,
            data_seconds: self.data_time.take().as_secs_f64(),
            allreduce_seconds: self.allreduce_time.take().as_secs_f64(),
        })
    }

    /// The factor the loss is multiplied by before backward (1 without fp16 loss scaling).
    fn loss_scale(&self) -> f64 {
        self.scaler.map_or(1.0, |s| s.scale)
    }

    /// The fp16 loss scaler's state, when the run scales its loss.
    pub fn loss_scaler(&self) -> Option<LossScaler> {
        self.scaler
    }

    /// Optimizer steps skipped so far for overflowing fp16 gradients.
    pub fn skipped_steps(&self) -> usize {
        self.skipped_steps
    }

    /// Trains from the current position until `max_train_steps` or until a hook stops it.
    ///
    /// The steps run on a thread of a compute pool of the run's own (see [`crate::in_pool`]).
    pub fn run(&mut self, hooks: &mut (dyn Hooks + Send)) -> Result<Outcome> {
        crate::in_pool(|| self.run_steps(hooks))
    }

    fn run_steps(&mut self, hooks: &mut (dyn Hooks + Send)) -> Result<Outcome> {
        let accum = self.opts.gradient_accumulation_steps;
        let parallel = self.collective.is_some() && self.world_size > 1;
        while self.position.step < self.opts.max_train_steps {
            let epoch = self.position.epoch;
            let (batches, global_sizes) = self.rank_batches(epoch);
            if batches.is_empty() {
                return Err(Error::Config(
                    "the dataset yields no batches: every image was skipped".into(),
                ));
            }
            if self.position.batch > batches.len() {
                return Err(Error::Config(format!(
                    "the saved position (batch {} of epoch {epoch}) is past the epoch's {} \
                     batches: the dataset changed since the state was saved",
                    self.position.batch,
                    batches.len()
                )));
            }
            let (mut acc, mut micro, mut loss_sum, mut samples) = (None, 0usize, 0f32, 0usize);
            // Data-parallel: (slot, this rank's share of the micro-batch loss) until the step's
            // all-reduce, and the first non-finite loss this rank saw.
            let mut shares: Vec<(usize, f32)> = Vec::new();
            let mut non_finite: Option<f32> = None;
            let mut stop = false;
            // An epoch walked from its first batch in which no batch had a readable image
            // would repeat forever: every image failed after the scan.
            let whole_epoch = self.position.batch == 0;
            let mut usable = 0usize;
            while self.position.batch < batches.len() && !stop {
                let slot = self.position.batch;
                let batch = &batches[slot];
                self.position.batch += 1;
                let loaded = self.micro_batch_loss(batch, epoch)?;
                if loaded.is_some() {
                    usable += 1;
                }
                if parallel {
                    // Every rank counts every global batch, loaded or not, so that all ranks
                    // reach the accumulation boundary together.
                    micro += 1;
                    let mut share = 0f32;
                    if let Some((loss, n)) = loaded {
                        let value = loss.to_scalar::<f32>()?;
                        if value.is_finite() {
                            // This rank's samples' part of the global batch mean.
                            let weight = (n * self.world_size) as f64 / global_sizes[slot] as f64;
                            let grads =
                                (loss * (weight / accum as f64 * self.loss_scale()))?.backward()?;
                            accumulate(&mut acc, grads, &self.vars)?;
                            share = value * weight as f32;
                            samples += n;
                        } else {
                            non_finite.get_or_insert(value);
                        }
                    }
                    shares.push((slot, share));
                } else if let Some((loss, n)) = loaded {
                    let value = loss.to_scalar::<f32>()?;
                    if !value.is_finite() {
                        let lrs = self.scheduler.lr(self.position.step);
                        return Err(self.diverged(&format!("the loss became {value}"), &lrs));
                    }
                    let grads = (loss * (self.loss_scale() / accum as f64))?.backward()?;
                    accumulate(&mut acc, grads, &self.vars)?;
                    self.loss.add(slot, value);
                    loss_sum += value;
                    micro += 1;
                    samples += n;
                }
                // As accelerate does, the end of the epoch's data closes a short accumulation.
                let boundary =
                    micro == accum || (self.position.batch == batches.len() && micro > 0);
                if !boundary {
                    continue;
                }
                let grads = if parallel {
                    let reducing = Instant::now();
                    let reduced = self.reduce(acc.take(), &shares, samples, non_finite.take())?;
                    self.allreduce_time
                        .set(self.allreduce_time.get() + reducing.elapsed());
                    shares.clear();
                    match reduced {
                        Some((grads, sum, n)) => {
                            (loss_sum, samples) = (sum, n);
                            grads
                        }
                        None => {
                            (micro, samples) = (0, 0);
                            continue;
                        }
                    }
                } else {
                    let Some(grads) = acc.take() else { continue };
                    grads
                };
                let event = self.update(grads, micro, loss_sum, samples)?;
                (micro, loss_sum, samples) = (0, 0.0, 0);
                let flow = hooks.step_end(self, &event)?;
                if self.agree(flow)? == Flow::Stop {
                    stop = true;
                }
                if self.position.step >= self.opts.max_train_steps {
                    break;
                }
            }
            if whole_epoch && usable == 0 && self.position.batch == batches.len() {
                return Err(self.no_usable_batch(epoch));
            }
            let epoch_done = self.position.batch == batches.len()
                || self.position.step >= self.opts.max_train_steps;
            if epoch_done {
                let event = EpochEvent {
                    epoch,
                    step: self.position.step,
                    loss_average: self.loss.moving_average(),
                    last: self.position.step >= self.opts.max_train_steps,
                };
                let flow = hooks.epoch_end(self, &event)?;
                if self.agree(flow)? == Flow::Stop {
                    stop = true;
                }
                self.position.epoch += 1;
                self.position.batch = 0;
            }
            if stop && self.position.step < self.opts.max_train_steps {
                return Ok(Outcome::Stopped);
            }
        }
        Ok(Outcome::Finished)
    }

    /// Data-parallel ranks stop together: a stop asked on any rank (a signal that reached it
    /// first) stops every rank at the same step, so none waits for the others in vain.
    fn agree(&mut self, flow: Flow) -> Result<Flow> {
        if self.world_size <= 1 {
            return Ok(flow);
        }
        let Some(collective) = self.collective.as_mut() else {
            return Ok(flow);
        };
        let mut vote = [f32::from(u8::from(flow == Flow::Stop))];
        collective.all_reduce_mean(&mut vote)?;
        Ok(if vote[0] > 0.0 {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }

    /// The data-parallel all-reduce of one optimizer step: first the micro-batch loss shares,
    /// the sample count and one non-finite flag per rank (so every rank stops together if any
    /// saw a non-finite loss), then the LoRA gradients, flattened into buckets. Returns the
    /// mean gradients, the sum of the micro-batch losses and the samples of all ranks; `None`
    /// when no rank had a sample (every rank skips the step alike). The losses go into the
    /// loss window, so every rank's state stays identical.
    fn reduce(
        &mut self,
        acc: Option<GradStore>,
        shares: &[(usize, f32)],
        samples: usize,
        non_finite: Option<f32>,
    ) -> Result<Option<(GradStore, f32, usize)>> {
        let (w, m) = (self.world_size, shares.len());
        let mut scalars: Vec<f32> = shares.iter().map(|(_, s)| *s).collect();
        scalars.push(samples as f32);
        scalars.extend((0..w).map(|r| f32::from(u8::from(r == self.rank && non_finite.is_some()))));
        let collective = self
            .collective
            .as_mut()
            .expect("data-parallel without a collective");
        collective.all_reduce_mean(&mut scalars)?;
        let bad: Vec<String> = (0..w)
            .filter(|r| scalars[m + 1 + r] > 0.0)
            .map(|r| r.to_string())
            .collect();
        if !bad.is_empty() {
            let lrs = self.scheduler.lr(self.position.step);
            let what = match non_finite {
                Some(v) => format!("the loss became {v} on rank {}", self.rank),
                None => format!("the loss became NaN or infinite on rank {}", bad.join(", ")),
            };
            return Err(self.diverged(&what, &lrs));
        }
        let total = (scalars[m] * w as f32).round() as usize;
        if total == 0 {
            return Ok(None);
        }
        let mut loss_sum = 0f32;
        for ((slot, _), loss) in shares.iter().zip(&scalars[..m]) {
            self.loss.add(*slot, *loss);
            loss_sum += *loss;
        }
        let mut grads = match acc {
            Some(g) => g,
            None => zero_grads(&self.vars)?,
        };
        let mut flat = Vec::new();
        for v in &self.vars {
            match grads.get(v.as_tensor()) {
                Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => flat.resize(flat.len() + v.elem_count(), 0.0),
            }
        }
        let collective = self
            .collective
            .as_mut()
            .expect("data-parallel without a collective");
        for bucket in flat.chunks_mut(GRAD_BUCKET) {
            collective.all_reduce_mean(bucket)?;
        }
        let mut offset = 0;
        for v in &self.vars {
            let n = v.elem_count();
            let g = Tensor::from_slice(&flat[offset..offset + n], v.shape(), v.device())?
                .to_dtype(v.dtype())?;
            grads.insert(v.as_tensor(), g);
            offset += n;
        }
        Ok(Some((grads, loss_sum, total)))
    }

    fn state_file(&self) -> StateFile {
        let (loss_window, loss_total_bits) = self.loss.to_bits();
        StateFile {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            position: self.position,
            seed: self.opts.seed,
            optimizer_type: self.optimizer.name().into(),
            groups: self.group_names.clone(),
            max_train_steps: self.opts.max_train_steps,
            gradient_accumulation_steps: self.opts.gradient_accumulation_steps,
            batches_per_epoch: self.rank_batches(1).0.len(),
            loss_window,
            loss_total_bits,
            loss_scaler: self.scaler,
        }
    }

    /// Writes everything needed to continue bit-identically into the folder `dir` (replaced
    /// as a whole: a crash while saving leaves the previous state intact): `lora.safetensors`,
    /// `optimizer.safetensors` and `state.json`, as sd-scripts' state folders hold theirs.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(p) = parent {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "state".into());
        let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        self.net
            .save(&tmp.join("lora.safetensors"), DType::F32, HashMap::new())?;
        self.optimizer
            .state()?
            .save(&tmp.join("optimizer.safetensors"))?;
        let json = serde_json::to_vec_pretty(&self.state_file())
            .map_err(|e| Error::Internal(format!("encoding the training state: {e}")))?;
        crate::lora::write_file_atomic(&tmp.join("state.json"), &json)?;
        let old = dir.with_file_name(format!(".{name}.old-{}", std::process::id()));
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The same state as one `.safetensors` file (LoRA tensors under `lora/`, optimizer
    /// tensors under `optimizer/`, the rest as JSON metadata): what a cluster run uploads as
    /// its checkpoint. [`Trainer::load_state`] reads either form.
    pub fn save_state_file(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (k, t) in self.net.to_tensors(DType::F32)? {
            tensors.insert(format!("lora/{k}"), t);
        }
        let opt = self.optimizer.state()?;
        for (k, t) in opt.tensors {
            tensors.insert(format!("optimizer/{k}"), t);
        }
        let json = serde_json::to_string(&self.state_file())
            .map_err(|e| Error::Internal(format!("encoding the training state: {e}")))?;
        let mut meta = HashMap::new();
        meta.insert(STATE_KEY.to_string(), json);
        meta.insert(optim::SCALARS_KEY.to_string(), opt.scalars.to_string());
        crate::lora::write_safetensors_atomic(path, &tensors, meta)
    }

    /// Continues from a state folder written by [`Trainer::save_state`] (sd-scripts' `resume`)
    /// or a file written by [`Trainer::save_state_file`]. The run's options must match the
    /// saved ones where they decide what the next step does.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let bad = |msg: String| Error::bad_checkpoint(dir, msg);
        let (text, lora, opt_state) = if dir.is_file() {
            read_state_file(dir, &self.device)?
        } else {
            let path = dir.join("state.json");
            let text = std::fs::read(&path).map_err(|e| {
                Error::io(
                    &path,
                    std::io::Error::new(
                        e.kind(),
                        format!("{e}: `resume` must name a state folder written with save_state"),
                    ),
                )
            })?;
            let lora_path = dir.join("lora.safetensors");
            let lora = candle_core::safetensors::load(&lora_path, &self.device)?;
            let opt = OptimizerState::load(&dir.join("optimizer.safetensors"), &self.device)?;
            (text, lora, opt)
        };
        let s: StateFile = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("not a loractl training state: {e}")))?;
        if s.format != STATE_FORMAT || s.version != STATE_VERSION {
            return Err(bad(format!(
                "state format {} v{} is not {STATE_FORMAT} v{STATE_VERSION}",
                s.format, s.version
            )));
        }
        let mut mismatches = Vec::new();
        if s.seed != self.opts.seed {
            mismatches.push(format!("seed was {}, now {}", s.seed, self.opts.seed));
        }
        if !s.optimizer_type.eq_ignore_ascii_case(self.optimizer.name()) {
            mismatches.push(format!(
                "optimizer_type was {}, now {}",
                s.optimizer_type,
                self.optimizer.name()
            ));
        }
        if s.groups != self.group_names {
            mismatches.push(format!(
                "trained parts were {:?}, now {:?} (unet_lr / text_encoder_lr / \
                 network_train_*_only)",
                s.groups, self.group_names
            ));
        }
        if s.gradient_accumulation_steps != self.opts.gradient_accumulation_steps {
            mismatches.push(format!(
                "gradient_accumulation_steps was {}, now {}",
                s.gradient_accumulation_steps, self.opts.gradient_accumulation_steps
            ));
        }
        let batches = self.rank_batches(1).0.len();
        if s.batches_per_epoch != batches {
            mismatches.push(format!(
                "the dataset gave {} batches per epoch, now {batches} (images, repeats, \
                 buckets or batch size changed)",
                s.batches_per_epoch
            ));
        }
        if !mismatches.is_empty() {
            return Err(bad(format!(
                "cannot resume this run from it: {}; resume with the settings the state was \
                 saved with, or start a new run with network_weights to reuse only the LoRA",
                mismatches.join("; ")
            )));
        }
        if s.max_train_steps != self.opts.max_train_steps {
            tracing::warn!(
                saved = s.max_train_steps,
                now = self.opts.max_train_steps,
                "max_train_steps differs from the saved run: the lr schedule follows the new length"
            );
        }
        self.net.load_values(&lora, &dir.display().to_string())?;
        self.net.apply();
        self.optimizer.load_state(opt_state)?;
        self.position = s.position;
        self.loss = LossRecorder::from_bits(&s.loss_window, s.loss_total_bits);
        if self.scaler.is_some() {
            self.scaler = Some(s.loss_scaler.unwrap_or_default());
        }
        Ok(())
    }
}

/// Reads a single-file state: (state JSON, LoRA tensors, optimizer state).
fn read_state_file(
    path: &Path,
    device: &Device,
) -> Result<(Vec<u8>, HashMap<String, Tensor>, OptimizerState)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::bad_checkpoint(path, format!("not a safetensors state file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k).cloned().ok_or_else(|| {
            Error::bad_checkpoint(
                path,
                format!("no `{k}` metadata: not a training state written by loractl"),
            )
        })
    };
    let state = get(STATE_KEY)?.into_bytes();
    let scalars: serde_json::Value = serde_json::from_str(&get(optim::SCALARS_KEY)?)
        .map_err(|e| Error::bad_checkpoint(path, format!("bad optimizer scalars: {e}")))?;
    let (mut lora, mut opt) = (HashMap::new(), BTreeMap::new());
    for (k, t) in candle_core::safetensors::load_buffer(&bytes, device)? {
        if let Some(name) = k.strip_prefix("lora/") {
            lora.insert(name.to_string(), t);
        } else if let Some(name) = k.strip_prefix("optimizer/") {
            opt.insert(name.to_string(), t);
        } else {
            return Err(Error::bad_checkpoint(
                path,
                format!("unexpected tensor `{k}` in a training state"),
            ));
        }
    }
    Ok((
        state,
        lora,
        OptimizerState {
            tensors: opt,
            scalars,
        },
    ))
}

/// Trains a LoRA network on `sd` with `dataset` from scratch to `max_train_steps`; `on_step`
/// sees every optimizer step.
pub fn train(
    sd: &StableDiffusion,
    dataset: &Dataset,
    opts: &TrainOptions,
    device: &Device,
    on_step: impl FnMut(&StepEvent) + Send,
) -> Result<LoraNetwork> {
    let mut trainer = Trainer::new(sd, dataset, opts.clone(), device, None)?;
    trainer.run(&mut OnStep(on_step))?;
    Ok(trainer.net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scaler_halves_on_overflow_and_doubles_after_good_steps() {
        let mut s = LossScaler::new();
        assert_eq!(s.scale, 65536.0);
        s.update(false);
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!(
            (s.scale, s.good_steps),
            (32768.0, LossScaler::GROWTH_INTERVAL - 1)
        );
        s.update(true);
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        // An overflow resets the run of good steps.
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
        for _ in 0..100 {
            s.update(false);
        }
        assert_eq!(s.scale, 1.0 / 16_777_216.0);
    }

    #[test]
    fn loss_window_replaces_slots_like_sd_scripts() {
        let mut r = LossRecorder::default();
        r.add(0, 1.0);
        r.add(1, 3.0);
        assert_eq!(r.moving_average(), 2.0);
        r.add(0, 5.0); // next epoch, first batch
        assert_eq!(r.moving_average(), 4.0);
        let (l, t) = r.to_bits();
        assert_eq!(LossRecorder::from_bits(&l, t), r);
    }

    #[test]
    fn step_streams_differ_by_batch_and_repeat() {
        use rand::Rng;
        let a: u64 = step_rng(1, 1, 0, 0).random();
        let b: u64 = step_rng(1, 1, 1, 0).random();
        let c: u64 = step_rng(1, 2, 0, 0).random();
        let d: u64 = step_rng(1, 1, 0, 1).random();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(a, step_rng(1, 1, 0, 0).random::<u64>());
    }
}
