//! The DDPM noise schedule used for training: ᾱ_t tables, per-sample forward noising, the
//! v-prediction target and min-SNR loss weights. ᾱ_t reproduces diffusers' `DDPMScheduler`
//! (float32 betas, cumulative product accumulated in f64) bit for bit, widened to f64.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// What the UNet is trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// The added noise ε.
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x0 (SD 2.x 768-v models).
    V,
}

/// The `scheduler/scheduler_config.json` keys that define the training schedule; everything
/// else in that file (sampler settings, `_class_name`, …) is irrelevant to training and ignored.
#[derive(Debug, Clone, Deserialize)]
struct SchedulerConfig {
    #[serde(default = "default_num_train_timesteps")]
    num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    beta_start: f64,
    #[serde(default = "default_beta_end")]
    beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    beta_schedule: String,
    #[serde(default)]
    trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction_type")]
    prediction_type: String,
    #[serde(default)]
    rescale_betas_zero_snr: bool,
}

// diffusers' DDPMScheduler defaults, used when a key is absent.
fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".to_string()
}
fn default_prediction_type() -> String {
    "epsilon".to_string()
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` value for value. PyTorch's CPU kernel
/// fills the first half forwards from `start` and the second half backwards from `end`, with the
/// multiply-add fused; reproducing that exactly is what makes ᾱ match diffusers to the last bit.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

/// The training noise schedule: β_t and ᾱ_t for t in `0..num_train_timesteps`.
#[derive(Debug, Clone)]
pub struct DdpmSchedule {
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    prediction: Prediction,
}

impl DdpmSchedule {
    /// Stable Diffusion's schedule: β = linspace(√start, √end, n)², e.g. (0.00085, 0.012, 1000).
    pub fn scaled_linear(beta_start: f64, beta_end: f64, n: usize) -> Result<Self> {
        let betas = linspace_f32(beta_start.sqrt(), beta_end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect();
        Self::from_betas_f32(betas)
    }

    /// β = linspace(start, end, n).
    pub fn linear(beta_start: f64, beta_end: f64, n: usize) -> Result<Self> {
        Self::from_betas_f32(linspace_f32(beta_start, beta_end, n))
    }

    /// The schedule every SD 1.x/2.x model was trained with (what sd-scripts hard-codes):
    /// scaled_linear 0.00085..0.012 over 1000 steps, ε-prediction.
    pub fn sd() -> Result<Self> {
        Self::scaled_linear(0.00085, 0.012, 1000)
    }

    /// Builds the schedule a diffusers `scheduler/scheduler_config.json` describes.
    pub fn from_scheduler_config(json: &str) -> Result<Self> {
        let cfg: SchedulerConfig = serde_json::from_str(json)
            .map_err(|e| Error::Config(format!("scheduler config: {e}")))?;
        if cfg.rescale_betas_zero_snr {
            return Err(Error::Config(
                "scheduler config: rescale_betas_zero_snr is not supported; set it to false"
                    .to_string(),
            ));
        }
        let prediction = match cfg.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            other => {
                return Err(Error::Config(format!(
                    "scheduler config: prediction_type `{other}` is not supported \
                     (expected `epsilon` or `v_prediction`)"
                )))
            }
        };
        let n = cfg.num_train_timesteps;
        let schedule = match (&cfg.trained_betas, cfg.beta_schedule.as_str()) {
            (Some(b), _) => Self::from_betas_f32(b.iter().map(|&x| x as f32).collect()),
            (None, "scaled_linear") => Self::scaled_linear(cfg.beta_start, cfg.beta_end, n),
            (None, "linear") => Self::linear(cfg.beta_start, cfg.beta_end, n),
            (None, other) => Err(Error::Config(format!(
                "scheduler config: beta_schedule `{other}` is not supported \
                 (expected `scaled_linear` or `linear`)"
            ))),
        }?;
        Ok(schedule.with_prediction(prediction))
    }

    /// ᾱ as diffusers computes it: 1−β in f32, the running product kept in f64 and each entry
    /// rounded to f32 (PyTorch's CPU `cumprod` accumulates float in double).
    fn from_betas_f32(betas: Vec<f32>) -> Result<Self> {
        if betas.is_empty() {
            return Err(Error::Config(
                "noise schedule: num_train_timesteps must be at least 1".to_string(),
            ));
        }
        if let Some((t, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(b.is_finite() && **b > 0.0 && **b < 1.0))
        {
            return Err(Error::Config(format!(
                "noise schedule: beta[{t}] = {b} is outside (0, 1)"
            )));
        }
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= f64::from(1f32 - b);
                f64::from(acc as f32)
            })
            .collect();
        Ok(Self {
            betas: betas.into_iter().map(f64::from).collect(),
            alphas_cumprod,
            prediction: Prediction::Epsilon,
        })
    }

    pub fn with_prediction(mut self, prediction: Prediction) -> Self {
        self.prediction = prediction;
        self
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// ᾱ_t for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Reads timesteps `[B]` (any integer dtype, any device) and checks they are in range.
    fn timestep_values(&self, timesteps: &Tensor) -> Result<Vec<usize>> {
        if !timesteps.dtype().is_int() {
            return Err(Error::Config(format!(
                "timesteps must be an integer tensor, got {:?}",
                timesteps.dtype()
            )));
        }
        let n = self.num_train_timesteps();
        let values = timesteps
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        if timesteps.rank() != 1 {
            return Err(Error::Config(format!(
                "timesteps must have shape [batch], got {:?}",
                timesteps.dims()
            )));
        }
        values
            .into_iter()
            .map(|t| {
                usize::try_from(t)
                    .ok()
                    .filter(|&t| t < n)
                    .ok_or_else(|| Error::Config(format!("timestep {t} is outside 0..{n}")))
            })
            .collect()
    }

    /// Per-sample coefficients `f(ᾱ_t)` as a `[B, 1, …, 1]` tensor that broadcasts against `like`.
    fn coefficients(
        &self,
        timesteps: &Tensor,
        like: &Tensor,
        f: impl Fn(f64) -> f64,
    ) -> Result<Tensor> {
        let ts = self.timestep_values(timesteps)?;
        let batch = like.dim(0)?;
        if ts.len() != batch {
            return Err(Error::Config(format!(
                "{} timesteps for a batch of {batch}",
                ts.len()
            )));
        }
        let values: Vec<f64> = ts.iter().map(|&t| f(self.alphas_cumprod[t])).collect();
        let mut shape = vec![1; like.rank()];
        shape[0] = batch;
        Ok(Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())?)
    }

    /// Forward diffusion per sample: √ᾱ_t·x0 + √(1−ᾱ_t)·ε, with `x0`, `noise` `[B, …]` and one
    /// timestep per sample. Differentiable in `x0` and `noise`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let a = self.coefficients(timesteps, x0, f64::sqrt)?;
        let s = self.coefficients(timesteps, x0, |ac| (1.0 - ac).sqrt())?;
        let noise = noise.to_dtype(x0.dtype())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// The v-prediction target √ᾱ_t·ε − √(1−ᾱ_t)·x0.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let a = self.coefficients(timesteps, x0, f64::sqrt)?;
        let s = self.coefficients(timesteps, x0, |ac| (1.0 - ac).sqrt())?;
        let noise = noise.to_dtype(x0.dtype())?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// What the UNet output is compared with under this schedule's prediction type.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.to_dtype(x0.dtype())?),
            Prediction::V => self.velocity(x0, noise, timesteps),
        }
    }

    fn per_sample_f32(&self, timesteps: &Tensor, f: impl Fn(f64) -> f64) -> Result<Tensor> {
        let values: Vec<f32> = self
            .timestep_values(timesteps)?
            .into_iter()
            .map(|t| f(self.alphas_cumprod[t]) as f32)
            .collect();
        let n = values.len();
        Ok(Tensor::from_vec(values, n, timesteps.device())?)
    }

    /// Signal-to-noise ratio ᾱ_t / (1−ᾱ_t) per sample, `[B]` f32 on the timesteps' device.
    pub fn snr(&self, timesteps: &Tensor) -> Result<Tensor> {
        self.per_sample_f32(timesteps, snr_of)
    }

    /// Min-SNR-γ loss weight per sample (Hang et al. 2023, as sd-scripts applies it):
    /// min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction. `[B]` f32.
    pub fn min_snr_weight(
        &self,
        timesteps: &Tensor,
        gamma: f64,
        v_prediction: bool,
    ) -> Result<Tensor> {
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(Error::Config(format!(
                "min_snr_gamma must be a positive number, got {gamma}"
            )));
        }
        self.per_sample_f32(timesteps, |ac| {
            let snr = snr_of(ac);
            let denom = if v_prediction { snr + 1.0 } else { snr };
            snr.min(gamma) / denom
        })
    }

    /// All ᾱ_t as an f64 tensor (for callers that gather on device).
    pub fn alphas_cumprod_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::new(self.alphas_cumprod.as_slice(), device)?)
    }
}

fn snr_of(alpha_cumprod: f64) -> f64 {
    alpha_cumprod / (1.0 - alpha_cumprod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_endpoints_and_halves() {
        let v = linspace_f32(0.0, 1.0, 5);
        assert_eq!(v, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(linspace_f32(0.3, 0.7, 1), vec![0.3f32]);
        let v = linspace_f32(0.00085f64.sqrt(), 0.012f64.sqrt(), 1000);
        assert_eq!(v[0], 0.00085f64.sqrt() as f32);
        assert_eq!(v[999], 0.012f64.sqrt() as f32);
    }

    #[test]
    fn config_parsing_picks_schedule_and_prediction() -> Result<()> {
        let json = r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "prediction_type": "v_prediction", "set_alpha_to_one": false, "trained_betas": null}"#;
        let s = DdpmSchedule::from_scheduler_config(json)?;
        assert_eq!(s.prediction(), Prediction::V);
        assert_eq!(s.alphas_cumprod(), DdpmSchedule::sd()?.alphas_cumprod());
        let bad = r#"{"beta_schedule": "squaredcos_cap_v2"}"#;
        assert!(DdpmSchedule::from_scheduler_config(bad).is_err());
        let bad = r#"{"prediction_type": "sample"}"#;
        assert!(DdpmSchedule::from_scheduler_config(bad).is_err());
        Ok(())
    }

    #[test]
    fn timesteps_are_validated() -> Result<()> {
        let s = DdpmSchedule::sd()?;
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 1, 2, 2), DType::F32, &dev)?;
        let ok = Tensor::new(&[0u8, 255], &dev)?;
        assert!(s.add_noise(&x, &x, &ok).is_ok());
        let out_of_range = Tensor::new(&[0i64, 1000], &dev)?;
        assert!(s.add_noise(&x, &x, &out_of_range).is_err());
        let negative = Tensor::new(&[-1i64, 3], &dev)?;
        assert!(s.add_noise(&x, &x, &negative).is_err());
        let wrong_batch = Tensor::new(&[1u32, 2, 3], &dev)?;
        assert!(s.add_noise(&x, &x, &wrong_batch).is_err());
        let float = Tensor::new(&[1f32, 2.], &dev)?;
        assert!(s.snr(&float).is_err());
        Ok(())
    }
}
