//! The loss of one training step as sd-scripts computes it: noise (plus `noise_offset`),
//! one timestep per sample in `[min_timestep, max_timestep)`, noisy latents, ε or v target,
//! per-sample loss averaged over C·H·W, per-sample weights (`prior_loss_weight`), min-SNR
//! weighting, then the batch mean.

use candle_core::{DType, Device, Tensor, D};
use rand::Rng;

use crate::schedule::{DdpmSchedule, Prediction};
use crate::unet::UNet2DConditionModel;
use crate::{Error, Result};

/// sd-scripts' `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossType {
    L2,
    /// Pseudo-Huber `2c(sqrt(d² + c²) − c)` with a constant `c` (`huber_schedule = constant`).
    Huber {
        c: f64,
    },
}

/// The options of sd-scripts that shape the step's loss.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOptions {
    pub noise_offset: f64,
    pub min_snr_gamma: Option<f64>,
    pub loss_type: LossType,
    pub min_timestep: usize,
    pub max_timestep: usize,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self {
            noise_offset: 0.0,
            min_snr_gamma: None,
            loss_type: LossType::L2,
            min_timestep: 0,
            max_timestep: 1000,
        }
    }
}

/// The random part of a step, drawn on the host from a seeded generator.
#[derive(Debug, Clone)]
pub struct StepNoise {
    /// [B, C, H, W] Gaussian noise, `noise_offset` included.
    pub noise: Tensor,
    /// [B] integer timesteps.
    pub timesteps: Tensor,
}

/// Draws noise for latents of `shape` and one timestep per sample.
pub fn draw_noise<R: Rng + ?Sized>(
    rng: &mut R,
    shape: (usize, usize, usize, usize),
    opts: &StepOptions,
    device: &Device,
) -> Result<StepNoise> {
    let (b, c, _, _) = shape;
    if opts.min_timestep >= opts.max_timestep {
        return Err(Error::Config(format!(
            "min_timestep ({}) must be below max_timestep ({})",
            opts.min_timestep, opts.max_timestep
        )));
    }
    let mut noise = crate::random::randn(rng, shape, device)?;
    if opts.noise_offset != 0.0 {
        // One offset per sample and channel, broadcast over H and W.
        let offset = crate::random::randn(rng, (b, c, 1, 1), device)?;
        noise = noise.broadcast_add(&(offset * opts.noise_offset)?)?;
    }
    let ts: Vec<u32> = (0..b)
        .map(|_| rng.random_range(opts.min_timestep..opts.max_timestep) as u32)
        .collect();
    let timesteps = Tensor::from_vec(ts, b, device)?;
    Ok(StepNoise { noise, timesteps })
}

/// The scalar training loss for a batch of (already scaled) latents and text contexts.
/// `sample_weights` [B] carries `prior_loss_weight` for regularisation images (1 otherwise).
pub fn training_loss(
    unet: &UNet2DConditionModel,
    schedule: &DdpmSchedule,
    latents: &Tensor,
    context: &Tensor,
    sample_weights: &Tensor,
    noise: &StepNoise,
    opts: &StepOptions,
) -> Result<Tensor> {
    let latents = latents.detach();
    let noisy = schedule.add_noise(&latents, &noise.noise, &noise.timesteps)?;
    let target = schedule.target(&latents, &noise.noise, &noise.timesteps)?;
    // The context keeps its graph: with a trained text encoder the loss reaches its LoRA
    // through it. Callers pass a detached context when the encoder is frozen.
    let pred = unet.forward(&noisy, &noise.timesteps, context)?;
    let diff = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?;
    let per_elem = match opts.loss_type {
        LossType::L2 => diff.sqr()?,
        LossType::Huber { c } => (((diff.sqr()? + c * c)?.sqrt()? - c)? * (2.0 * c))?,
    };
    let b = per_elem.dim(0)?;
    let mut per_sample = per_elem.reshape((b, ()))?.mean(D::Minus1)?;
    per_sample = (per_sample * sample_weights.to_dtype(DType::F32)?)?;
    if let Some(gamma) = opts.min_snr_gamma {
        let v = schedule.prediction() == Prediction::V;
        let w = schedule.min_snr_weight(&noise.timesteps, gamma, v)?;
        per_sample = (per_sample * w.to_dtype(DType::F32)?)?;
    }
    Ok(per_sample.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn timesteps_stay_in_range_and_noise_is_reproducible() -> Result<()> {
        let opts = StepOptions {
            min_timestep: 100,
            max_timestep: 110,
            noise_offset: 0.1,
            ..Default::default()
        };
        let draw = |seed| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            draw_noise(&mut rng, (64, 4, 2, 2), &opts, &Device::Cpu)
        };
        let a = draw(3)?;
        let ts = a.timesteps.to_vec1::<u32>()?;
        assert!(ts.iter().all(|t| (100..110).contains(t)), "{ts:?}");
        let b = draw(3)?;
        let same = (a.noise - b.noise)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(same, 0.0);
        let bad = StepOptions {
            min_timestep: 5,
            max_timestep: 5,
            ..Default::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let err = draw_noise(&mut rng, (1, 4, 2, 2), &bad, &Device::Cpu);
        assert!(err.is_err_and(|e| e.to_string().contains("max_timestep")));
        Ok(())
    }
}
