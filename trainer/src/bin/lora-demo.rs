//! A short, real LoRA training run on the engine alone: loads a base model (by default the tiny
//! SD1-style model shipped with the tests), makes a small synthetic captioned image set, caches
//! VAE latents and text embeddings, trains a kohya LoRA on the UNet with AdamW, and writes it.
//! A fixed validation set (same noise and timesteps before and after) shows the loss dropping.
//!
//! Usage: lora-demo [--model PATH] [--resolution PX] [--steps N] [--lr LR] [--out FILE]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail};
use candle_core::{DType, Device, Tensor};
use loractl_trainer::loader::{self, LoadOptions, StableDiffusion};
use loractl_trainer::lora::{LoraConfig, LoraNetwork};
use loractl_trainer::optim::{AdamW, AdamWConfig};
use loractl_trainer::step::{draw_noise, training_loss, StepNoise, StepOptions};
use rand::SeedableRng;

const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd1/diffusers");

/// An `n`×`n` image: a coloured square on a coloured background, in [-1, 1]; positions and
/// size are given in 32ths of the side.
fn synthetic_image(
    n: usize,
    fg: [f32; 3],
    bg: [f32; 3],
    x0: usize,
    y0: usize,
    size: usize,
) -> Vec<f32> {
    let (x0, y0, size) = (x0 * n / 32, y0 * n / 32, size * n / 32);
    let mut v = vec![0f32; 3 * n * n];
    for c in 0..3 {
        for y in 0..n {
            for x in 0..n {
                let inside = x >= x0 && x < x0 + size && y >= y0 && y < y0 + size;
                v[c * n * n + y * n + x] = if inside { fg[c] } else { bg[c] };
            }
        }
    }
    v
}

struct Sample {
    latent: Tensor,
    context: Tensor,
}

fn loss_on(sd: &StableDiffusion, batch: &[&Sample], noise: &StepNoise) -> anyhow::Result<Tensor> {
    let latents = Tensor::cat(&batch.iter().map(|s| &s.latent).collect::<Vec<_>>(), 0)?;
    let ctx = Tensor::cat(&batch.iter().map(|s| &s.context).collect::<Vec<_>>(), 0)?;
    let weights = Tensor::ones(batch.len(), DType::F32, latents.device())?;
    Ok(training_loss(
        &sd.unet,
        &sd.schedule,
        &latents,
        &ctx,
        &weights,
        noise,
        &StepOptions::default(),
    )?)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut model = PathBuf::from(DEFAULT_MODEL);
    let mut steps = 150usize;
    let mut lr = 1e-3f64;
    let mut out = PathBuf::from("target/lora-demo/demo.safetensors");
    let mut res = 32usize;
    while let Some(a) = args.next() {
        let mut val = |flag: &str| args.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match a.as_str() {
            "--model" => model = PathBuf::from(val("--model")?),
            "--steps" => steps = val("--steps")?.parse()?,
            "--lr" => lr = val("--lr")?.parse()?,
            "--out" => out = PathBuf::from(val("--out")?),
            "--resolution" => res = val("--resolution")?.parse()?,
            "-h" | "--help" => {
                println!("usage: lora-demo [--model PATH] [--resolution PX] [--steps N] [--lr LR] [--out FILE]");
                return Ok(());
            }
            s => bail!("unknown argument `{s}`"),
        }
    }
    if res == 0 || (!res.is_multiple_of(64) && res != 32) {
        bail!("--resolution must be a multiple of 64 (or 32 for the shipped tiny model)");
    }
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let sd = loader::load(&model, &LoadOptions::default())?;
    println!(
        "loaded {} ({:?}, {:?}) in {:.1}s",
        model.display(),
        sd.family,
        sd.layout,
        t0.elapsed().as_secs_f64()
    );

    // A tiny captioned dataset: colour and position are what the captions describe.
    let items = [
        (
            [1.0, -1.0, -1.0],
            [-1.0, -1.0, 1.0],
            4,
            4,
            "a red square on blue, top left",
        ),
        (
            [-1.0, 1.0, -1.0],
            [1.0, 1.0, 1.0],
            16,
            16,
            "a green square on white, bottom right",
        ),
        (
            [1.0, 1.0, -1.0],
            [-1.0, -1.0, -1.0],
            8,
            12,
            "a yellow square on black",
        ),
        (
            [-1.0, -1.0, 1.0],
            [1.0, -1.0, -1.0],
            12,
            4,
            "a blue square on red",
        ),
    ];
    let mut data = Vec::new();
    for (i, (fg, bg, x, y, caption)) in items.iter().enumerate() {
        let pixels = synthetic_image(res, *fg, *bg, *x, *y, 12);
        let img = Tensor::from_vec(pixels, (1, 3, res, res), &dev)?;
        let dist = sd.vae.encode(&img)?;
        let latent = (dist.sample_seeded(i as u64)? * sd.vae.scaling_factor())?.detach();
        let ids = sd.tokenizer.encode(caption, 77)?;
        let ids = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
        let context = sd.text_encoder.forward(&ids, 1)?.detach();
        data.push(Sample { latent, context });
    }
    let (c, h, w) = data[0].latent.dims4().map(|(_, c, h, w)| (c, h, w))?;

    let lora_cfg = LoraConfig {
        rank: 8,
        alpha: 8.0,
        train_text_encoder: false,
        ..Default::default()
    };
    let net = LoraNetwork::new(&sd.unet.sites(), &lora_cfg, &dev, 42)?;
    net.apply();
    println!(
        "LoRA: {} UNet modules, {} parameters",
        net.modules().len(),
        net.param_count()
    );
    let mut opt = AdamW::new(
        net.vars(),
        AdamWConfig {
            lr,
            ..Default::default()
        },
    )?;

    // Validation: the whole set with fixed noise and spread timesteps.
    let all: Vec<&Sample> = data.iter().collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let val = StepNoise {
        noise: loractl_trainer::random::randn(&mut rng, (all.len(), c, h, w), &dev)?,
        timesteps: Tensor::new(&[100u32, 350, 600, 850], &dev)?,
    };
    let before = loss_on(&sd, &all, &val)?.to_scalar::<f32>()?;
    println!("validation loss before training: {before:.5}");

    let t_train = Instant::now();
    let mut avg = 0f32;
    for step in 1..=steps {
        let batch: Vec<&Sample> = vec![&data[(step - 1) % data.len()], &data[step % data.len()]];
        let noise = draw_noise(&mut rng, (2, c, h, w), &StepOptions::default(), &dev)?;
        let loss = loss_on(&sd, &batch, &noise)?;
        let lv = loss.to_scalar::<f32>()?;
        if !lv.is_finite() {
            bail!("loss became {lv} at step {step} (lr {lr}): lower the learning rate");
        }
        let grads = loss.backward()?;
        opt.step(&grads)?;
        avg = if step == 1 {
            lv
        } else {
            0.95 * avg + 0.05 * lv
        };
        if step % 25 == 0 || step == steps {
            println!(
                "step {step}/{steps}  loss {lv:.5}  avg {avg:.5}  {:.1} it/s",
                step as f64 / t_train.elapsed().as_secs_f64()
            );
        }
    }
    let after = loss_on(&sd, &all, &val)?.to_scalar::<f32>()?;
    println!(
        "validation loss after {steps} steps: {after:.5} ({:+.1}%)",
        (after / before - 1.0) * 100.0
    );

    let mut meta = std::collections::HashMap::new();
    meta.insert("ss_network_module".into(), "networks.lora".into());
    meta.insert("ss_network_dim".into(), lora_cfg.rank.to_string());
    meta.insert("ss_network_alpha".into(), lora_cfg.alpha.to_string());
    meta.insert("ss_steps".into(), steps.to_string());
    net.save(&out, DType::F16, meta)?;
    let reloaded = LoraNetwork::load_file(&sd.sites(), &out, 1.0, &dev)?;
    if reloaded.modules().len() != net.modules().len() {
        bail!("the written LoRA does not reload with the same modules");
    }
    println!(
        "wrote {} ({} modules, fp16) in {:.1}s total",
        out.display(),
        reloaded.modules().len(),
        t0.elapsed().as_secs_f64()
    );
    if after >= before {
        bail!("validation loss did not drop ({before} -> {after})");
    }
    Ok(())
}
