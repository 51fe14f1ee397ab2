//! The DDPM noise schedule used for training: ᾱ_t tables, per-sample forward noising, the
//! v-prediction target and min-SNR loss weights. By default ᾱ_t reproduces diffusers'
//! `DDPMScheduler` (what sd-scripts trains with) bit for bit; exact f64 arithmetic is an option.

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

/// How ᾱ_t is computed. The two differ by up to 4.7e-7 in ᾱ for SD's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arithmetic {
    /// As diffusers' `DDPMScheduler` on CPU: betas and 1−β in float32, the running product kept
    /// in f64 and rounded to f32 per entry (PyTorch's CPU `cumprod` accumulates float in
    /// double). Matches the schedule sd-scripts trains with exactly.
    #[default]
    TorchF32,
    /// Everything in f64.
    F64,
}

/// How β_t is laid out over the timesteps.
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    /// β = linspace(√start, √end, n)² (Stable Diffusion).
    ScaledLinear { start: f64, end: f64 },
    /// β = linspace(start, end, n).
    Linear { start: f64, end: f64 },
    /// Explicit β values (diffusers `trained_betas`).
    Trained(Vec<f64>),
}

/// `torch.linspace(start, end, n)` value for value. PyTorch's CPU kernel fills the first half
/// forwards from `start` and the second half backwards from `end` with a fused multiply-add;
/// reproducing that is what makes the float32 schedule match diffusers to the last bit.
macro_rules! linspace_impl {
    ($name:ident, $t:ty) => {
        fn $name(start: $t, end: $t, n: usize) -> Vec<$t> {
            if n == 1 {
                return vec![start];
            }
            let step = (end - start) / (n - 1) as $t;
            let halfway = n / 2;
            (0..n)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as $t, start)
                    } else {
                        (-step).mul_add((n - i - 1) as $t, end)
                    }
                })
                .collect()
        }
    };
}
linspace_impl!(linspace_f32, f32);
linspace_impl!(linspace_f64, f64);

/// β_t in f32 as diffusers builds them (`torch.float32` tensors).
fn betas_f32(schedule: &BetaSchedule, n: usize) -> Vec<f32> {
    match schedule {
        BetaSchedule::ScaledLinear { start, end } => {
            linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        BetaSchedule::Linear { start, end } => linspace_f32(*start as f32, *end as f32, n),
        BetaSchedule::Trained(b) => b.iter().map(|&x| x as f32).collect(),
    }
}

fn betas_f64(schedule: &BetaSchedule, n: usize) -> Vec<f64> {
    match schedule {
        BetaSchedule::ScaledLinear { start, end } => linspace_f64(start.sqrt(), end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::Linear { start, end } => linspace_f64(*start, *end, n),
        BetaSchedule::Trained(b) => b.clone(),
    }
}

/// The training noise schedule: β_t and ᾱ_t for t in `0..num_train_timesteps`.
#[derive(Debug, Clone)]
pub struct DdpmSchedule {
    schedule: BetaSchedule,
    arithmetic: Arithmetic,
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    prediction: Prediction,
}

impl DdpmSchedule {
    /// A schedule of `n` timesteps, ε-prediction.
    pub fn new(schedule: BetaSchedule, n: usize, arithmetic: Arithmetic) -> Result<Self> {
        if let BetaSchedule::Trained(b) = &schedule {
            if b.len() != n {
                return Err(Error::Config(format!(
                    "noise schedule: {} trained betas for {n} timesteps",
                    b.len()
                )));
            }
        }
        if n == 0 {
            return Err(Error::Config(
                "noise schedule: num_train_timesteps must be at least 1".to_string(),
            ));
        }
        let (betas, alphas_cumprod) = match arithmetic {
            Arithmetic::TorchF32 => {
                let betas = betas_f32(&schedule, n);
                let mut acc = 1f64;
                let ac = betas
                    .iter()
                    .map(|&b| {
                        acc *= f64::from(1f32 - b);
                        f64::from(acc as f32)
                    })
                    .collect();
                (betas.into_iter().map(f64::from).collect::<Vec<_>>(), ac)
            }
            Arithmetic::F64 => {
                let betas = betas_f64(&schedule, n);
                let mut acc = 1f64;
                let ac = betas
                    .iter()
                    .map(|&b| {
                        acc *= 1.0 - b;
                        acc
                    })
                    .collect();
                (betas, ac)
            }
        };
        if let Some((t, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(b.is_finite() && **b > 0.0 && **b < 1.0))
        {
            return Err(Error::Config(format!(
                "noise schedule: beta[{t}] = {b} is outside (0, 1)"
            )));
        }
        Ok(Self {
            schedule,
            arithmetic,
            betas,
            alphas_cumprod,
            prediction: Prediction::Epsilon,
        })
    }

    /// β = linspace(√start, √end, n)², e.g. (0.00085, 0.012, 1000); diffusers arithmetic.
    pub fn scaled_linear(beta_start: f64, beta_end: f64, n: usize) -> Result<Self> {
        let schedule = BetaSchedule::ScaledLinear {
            start: beta_start,
            end: beta_end,
        };
        Self::new(schedule, n, Arithmetic::default())
    }

    /// β = linspace(start, end, n); diffusers arithmetic.
    pub fn linear(beta_start: f64, beta_end: f64, n: usize) -> Result<Self> {
        let schedule = BetaSchedule::Linear {
            start: beta_start,
            end: beta_end,
        };
        Self::new(schedule, n, Arithmetic::default())
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
        let (start, end) = (cfg.beta_start, cfg.beta_end);
        let schedule = match (cfg.trained_betas, cfg.beta_schedule.as_str()) {
            (Some(b), _) => BetaSchedule::Trained(b),
            (None, "scaled_linear") => BetaSchedule::ScaledLinear { start, end },
            (None, "linear") => BetaSchedule::Linear { start, end },
            (None, other) => {
                return Err(Error::Config(format!(
                    "scheduler config: beta_schedule `{other}` is not supported \
                     (expected `scaled_linear` or `linear`)"
                )))
            }
        };
        let n = cfg.num_train_timesteps;
        Ok(Self::new(schedule, n, Arithmetic::default())?.with_prediction(prediction))
    }

    /// The same schedule with ᾱ recomputed in `arithmetic`.
    pub fn with_arithmetic(self, arithmetic: Arithmetic) -> Result<Self> {
        let n = self.num_train_timesteps();
        Ok(Self::new(self.schedule, n, arithmetic)?.with_prediction(self.prediction))
    }

    pub fn arithmetic(&self) -> Arithmetic {
        self.arithmetic
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
        if timesteps.rank() != 1 {
            return Err(Error::Config(format!(
                "timesteps must have shape [batch], got {:?}",
                timesteps.dims()
            )));
        }
        let n = self.num_train_timesteps();
        let values = timesteps.to_dtype(DType::I64)?.to_vec1::<i64>()?;
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
        assert_eq!(linspace_f64(0.3, 0.7, 1), vec![0.3]);
        let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let v = linspace_f32(a as f32, b as f32, 1000);
        assert_eq!((v[0], v[999]), (a as f32, b as f32));
        let v = linspace_f64(a, b, 1000);
        assert_eq!((v[0], v[999]), (a, b));
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
    fn arithmetic_modes_agree_closely() -> Result<()> {
        let torch = DdpmSchedule::sd()?;
        let exact = torch.clone().with_arithmetic(Arithmetic::F64)?;
        let diff = torch
            .alphas_cumprod()
            .iter()
            .zip(exact.alphas_cumprod())
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(diff > 0.0 && diff < 1e-6, "{diff}");
        let trained = BetaSchedule::Trained(vec![0.1, 0.2]);
        assert!(DdpmSchedule::new(trained, 3, Arithmetic::F64).is_err());
        let bad = BetaSchedule::Linear {
            start: 0.0,
            end: 0.1,
        };
        assert!(DdpmSchedule::new(bad, 10, Arithmetic::F64).is_err());
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
