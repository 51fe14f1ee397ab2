//! Inference samplers over the training schedule's ᾱ_t: diffusers' `DDIMScheduler` (η = 0),
//! `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`, reproduced step for step
//! (timesteps, sigmas and float32 arithmetic included) so preview images match sd-scripts'.

use std::str::FromStr;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::schedule::{DdpmSchedule, Prediction};
use crate::{Error, Result};

/// The sampling algorithm (sd-scripts' `--sample_sampler` / `--ss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SamplerKind {
    /// Deterministic DDIM (η = 0), sd-scripts' default.
    #[default]
    Ddim,
    /// Euler (Karras et al. 2022, Algorithm 2 without churn).
    Euler,
    /// Euler ancestral: each step adds fresh noise.
    EulerAncestral,
}

/// Samplers sd-scripts offers that are not implemented here.
const UNSUPPORTED: &[&str] = &[
    "ddpm",
    "pndm",
    "lms",
    "k_lms",
    "heun",
    "dpm_2",
    "k_dpm_2",
    "dpm_2_a",
    "k_dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
];

impl SamplerKind {
    /// The name sd-scripts uses for it.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_a",
        }
    }

    /// The spacing diffusers' scheduler class uses when its config names none.
    fn default_spacing(self) -> TimestepSpacing {
        match self {
            SamplerKind::Ddim => TimestepSpacing::Leading,
            SamplerKind::Euler | SamplerKind::EulerAncestral => TimestepSpacing::Linspace,
        }
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    /// sd-scripts' names (`k_` aliases included), case-insensitive.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ddim" => Ok(SamplerKind::Ddim),
            "euler" | "k_euler" => Ok(SamplerKind::Euler),
            "euler_a" | "k_euler_a" => Ok(SamplerKind::EulerAncestral),
            other if UNSUPPORTED.contains(&other) => Err(Error::Config(format!(
                "sampler `{s}` is not supported yet; use ddim, euler or euler_a"
            ))),
            _ => Err(Error::Config(format!(
                "unknown sampler `{s}`; use ddim, euler or euler_a"
            ))),
        }
    }
}

/// How the inference timesteps are picked from the training ones (diffusers `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepSpacing {
    /// 0, r, 2r, … (r = n / steps, integer) plus `steps_offset`, descending.
    Leading,
    /// `linspace(0, n − 1, steps)`, descending.
    Linspace,
    /// n − 1, n − 1 − r, … (r = n / steps, real).
    Trailing,
}

/// Sampler settings that are not the noise schedule itself. Defaults are what sd-scripts'
/// `get_my_scheduler` builds: diffusers class defaults except the betas.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerSettings {
    /// `None`: the sampler class's own default (DDIM `leading`, Euler `linspace`).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
    /// DDIM: ᾱ before the first timestep is 1 (true) or ᾱ_0 (false).
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted x0 to ±this (sd-scripts forces clipping on, range 1).
    pub clip_sample: Option<f64>,
}

impl Default for SamplerSettings {
    fn default() -> Self {
        Self::kohya()
    }
}

/// The keys of a diffusers `scheduler_config.json` that change sampling; missing keys take the
/// DDIM class defaults (the Euler classes share them where they have the key at all).
#[derive(Debug, Deserialize)]
struct ConfigKeys {
    #[serde(default)]
    timestep_spacing: Option<TimestepSpacing>,
    #[serde(default)]
    steps_offset: usize,
    #[serde(default = "yes")]
    set_alpha_to_one: bool,
    #[serde(default = "yes")]
    clip_sample: bool,
    #[serde(default = "one")]
    clip_sample_range: f64,
    #[serde(default)]
    thresholding: bool,
    #[serde(default)]
    use_karras_sigmas: bool,
    #[serde(default)]
    use_exponential_sigmas: bool,
    #[serde(default)]
    use_beta_sigmas: bool,
    #[serde(default)]
    interpolation_type: Option<String>,
    #[serde(default)]
    final_sigmas_type: Option<String>,
    #[serde(default)]
    timestep_type: Option<String>,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

impl SamplerSettings {
    /// sd-scripts' sampling schedulers: `DDIMScheduler(...)` / `Euler*DiscreteScheduler(...)`
    /// with only the betas given, i.e. DDIM with `set_alpha_to_one`, `steps_offset` 0 and x0
    /// clipped to ±1; Euler with `linspace` spacing.
    pub fn kohya() -> Self {
        Self {
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: Some(1.0),
        }
    }

    /// The settings a diffusers pipeline gets from a model's `scheduler/scheduler_config.json`
    /// (`Scheduler.from_config`), e.g. SD1.5's: `steps_offset` 1, no alpha-to-one, no clipping.
    pub fn from_scheduler_config(json: &str) -> Result<Self> {
        let k: ConfigKeys = serde_json::from_str(json)
            .map_err(|e| Error::Config(format!("scheduler config: {e}")))?;
        let unsupported = |key: &str| {
            Err(Error::Config(format!(
                "scheduler config: `{key}` is not supported for sampling; remove it"
            )))
        };
        if k.thresholding {
            return unsupported("thresholding");
        }
        if k.use_karras_sigmas || k.use_exponential_sigmas || k.use_beta_sigmas {
            return unsupported("use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas");
        }
        if k.interpolation_type
            .as_deref()
            .is_some_and(|v| v != "linear")
        {
            return unsupported("interpolation_type other than linear");
        }
        if k.final_sigmas_type.as_deref().is_some_and(|v| v != "zero") {
            return unsupported("final_sigmas_type other than zero");
        }
        if k.timestep_type.as_deref().is_some_and(|v| v != "discrete") {
            return unsupported("timestep_type other than discrete");
        }
        Ok(Self {
            timestep_spacing: k.timestep_spacing,
            steps_offset: k.steps_offset,
            set_alpha_to_one: k.set_alpha_to_one,
            clip_sample: k.clip_sample.then_some(k.clip_sample_range),
        })
    }
}

/// `numpy.linspace(start, stop, num)` in f64.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `numpy.arange(start, 0, -step)` for a positive real `step`, filled as numpy does
/// (`start + i·delta`, delta taken from the first two values).
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = (start / step).ceil().max(0.0) as usize;
    let delta = (start - step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// The inference timesteps (descending) as diffusers computes them: DDIM casts to int64,
/// Euler keeps float32 values (`linspace` ones may be fractional).
fn inference_timesteps(
    kind: SamplerKind,
    spacing: TimestepSpacing,
    steps_offset: usize,
    n: usize,
    steps: usize,
) -> Vec<f64> {
    let euler = kind != SamplerKind::Ddim;
    match spacing {
        TimestepSpacing::Linspace => {
            let v = np_linspace(0.0, (n - 1) as f64, steps);
            v.into_iter()
                .rev()
                .map(|t| {
                    if euler {
                        f64::from(t as f32)
                    } else {
                        t.round_ties_even()
                    }
                })
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = n / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            np_arange_down(n as f64, ratio)
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// `numpy.interp(x, 0..len, fp)` (clamped at both ends).
fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

#[derive(Debug, Clone)]
enum Method {
    /// Per step (ᾱ_t, ᾱ_prev), float32 as diffusers holds them.
    Ddim {
        alphas: Vec<(f32, f32)>,
        clip: Option<f32>,
    },
    /// σ per step plus the final 0; `ancestral` adds noise every step.
    Euler { sigmas: Vec<f32>, ancestral: bool },
}

/// One configured sampling run: the timesteps for `steps` inference steps and the update rule.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SamplerKind,
    prediction: Prediction,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
    method: Method,
}

impl Scheduler {
    /// Sets up `steps` inference steps of `kind` over `schedule`'s ᾱ_t and prediction type.
    pub fn new(
        kind: SamplerKind,
        schedule: &DdpmSchedule,
        settings: &SamplerSettings,
        steps: usize,
    ) -> Result<Self> {
        let n = schedule.num_train_timesteps();
        if steps == 0 || steps > n {
            return Err(Error::Config(format!(
                "{steps} sampling steps: it must be between 1 and {n} (the training timesteps)"
            )));
        }
        let spacing = settings
            .timestep_spacing
            .unwrap_or_else(|| kind.default_spacing());
        let timesteps = inference_timesteps(kind, spacing, settings.steps_offset, n, steps);
        // diffusers holds ᾱ as float32; the schedule's default arithmetic gives exactly those.
        let ac: Vec<f32> = schedule
            .alphas_cumprod()
            .iter()
            .map(|&a| a as f32)
            .collect();
        let (method, init_noise_sigma) = match kind {
            SamplerKind::Ddim => {
                let final_alpha = if settings.set_alpha_to_one {
                    1.0
                } else {
                    ac[0]
                };
                let gap = (n / steps) as i64;
                let alphas = timesteps
                    .iter()
                    .map(|&t| {
                        let t = t as i64;
                        let at = usize::try_from(t)
                            .ok()
                            .and_then(|t| ac.get(t))
                            .copied()
                            .ok_or_else(|| {
                                Error::Config(format!(
                                    "DDIM timestep {t} is outside the {n} training timesteps \
                                     (steps_offset {} too large for {steps} steps)",
                                    settings.steps_offset
                                ))
                            })?;
                        let prev = t - gap;
                        let ap = if prev >= 0 {
                            ac[prev as usize]
                        } else {
                            final_alpha
                        };
                        Ok((at, ap))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let clip = settings.clip_sample.map(|c| c as f32);
                (Method::Ddim { alphas, clip }, 1.0)
            }
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                // Computed like diffusers: σ table in float32 torch ops, interpolated in f64 by
                // numpy, then stored as float32.
                let table: Vec<f64> = ac
                    .iter()
                    .map(|&a| f64::from(((1.0 - a) / a).sqrt()))
                    .collect();
                let mut sigmas: Vec<f32> = timesteps
                    .iter()
                    .map(|&t| np_interp(t, &table) as f32)
                    .collect();
                sigmas.push(0.0);
                let max = sigmas.iter().copied().fold(0f32, f32::max);
                let init = match spacing {
                    TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
                    TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
                };
                let ancestral = kind == SamplerKind::EulerAncestral;
                (Method::Euler { sigmas, ancestral }, init)
            }
        };
        Ok(Self {
            kind,
            prediction: schedule.prediction(),
            timesteps,
            init_noise_sigma,
            method,
        })
    }

    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The timestep the UNet sees at each step, descending.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Euler σ per step plus the final 0; `None` for DDIM.
    pub fn sigmas(&self) -> Option<&[f32]> {
        match &self.method {
            Method::Euler { sigmas, .. } => Some(sigmas),
            Method::Ddim { .. } => None,
        }
    }

    /// Standard deviation of the initial latents (unit normal noise is multiplied by this).
    pub fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    /// Whether [`Self::step`] needs fresh noise.
    pub fn needs_noise(&self) -> bool {
        matches!(
            self.method,
            Method::Euler {
                ancestral: true,
                ..
            }
        )
    }

    fn check_index(&self, i: usize) -> Result<()> {
        if i >= self.timesteps.len() {
            return Err(Error::Config(format!(
                "sampling step {i} is past the last of {} steps",
                self.timesteps.len()
            )));
        }
        Ok(())
    }

    /// The UNet input for step `i`: Euler divides by √(σ²+1), DDIM passes it through.
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        self.check_index(i)?;
        match &self.method {
            Method::Ddim { .. } => Ok(sample.clone()),
            Method::Euler { sigmas, .. } => {
                let s = sigmas[i];
                let denom = (s * s + 1.0).sqrt();
                Ok((sample / f64::from(denom))?)
            }
        }
    }

    /// One update x_t → x_prev from the (guided) model output of step `i`. `noise` (unit normal,
    /// shaped like `sample`) is required when [`Self::needs_noise`] and ignored otherwise.
    /// Works in f32; the result is detached.
    pub fn step(
        &self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.check_index(i)?;
        let eps_or_v = model_output.detach().to_dtype(DType::F32)?;
        let x = sample.detach().to_dtype(DType::F32)?;
        let v = self.prediction == Prediction::V;
        let out = match &self.method {
            Method::Ddim { alphas, clip } => {
                let (at, ap) = alphas[i];
                let (sa, sb) = (at.sqrt(), (1.0 - at).sqrt());
                let (x0, eps) = if v {
                    let x0 = ((&x * f64::from(sa))? - (&eps_or_v * f64::from(sb))?)?;
                    let eps = ((&eps_or_v * f64::from(sa))? + (&x * f64::from(sb))?)?;
                    (x0, eps)
                } else {
                    let x0 = ((&x - (&eps_or_v * f64::from(sb))?)? / f64::from(sa))?;
                    (x0, eps_or_v)
                };
                let x0 = match clip {
                    Some(c) => x0.clamp(-*c, *c)?,
                    None => x0,
                };
                // η = 0: no variance term.
                let dir = (1.0 - ap).sqrt();
                ((x0 * f64::from(ap.sqrt()))? + (eps * f64::from(dir))?)?
            }
            Method::Euler { sigmas, ancestral } => {
                let (sigma, next) = (sigmas[i], sigmas[i + 1]);
                let x0 = if v {
                    let a = -sigma / (sigma * sigma + 1.0).sqrt();
                    let b = 1.0 / (sigma * sigma + 1.0);
                    ((&eps_or_v * f64::from(a))? + (&x * f64::from(b))?)?
                } else {
                    (&x - (&eps_or_v * f64::from(sigma))?)?
                };
                let derivative = ((&x - x0)? / f64::from(sigma))?;
                if *ancestral {
                    let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
                    let down = (next * next - up * up).sqrt();
                    let noise = noise.ok_or_else(|| {
                        Error::Config("euler_a needs noise for every step".to_string())
                    })?;
                    let noise = noise.detach().to_dtype(DType::F32)?;
                    let prev = (&x + (derivative * f64::from(down - sigma))?)?;
                    (prev + (noise * f64::from(up))?)?
                } else {
                    (&x + (derivative * f64::from(next - sigma))?)?
                }
            }
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unsupported_are_named() {
        for k in [
            SamplerKind::Ddim,
            SamplerKind::Euler,
            SamplerKind::EulerAncestral,
        ] {
            assert_eq!(k.name().parse::<SamplerKind>().unwrap(), k);
        }
        assert_eq!(
            "K_EULER_A".parse::<SamplerKind>().unwrap(),
            SamplerKind::EulerAncestral
        );
        let e = "dpmsolver++"
            .parse::<SamplerKind>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported"), "{e}");
        let e = "foo".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(e.contains("unknown sampler `foo`"), "{e}");
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        // 1000 / 16 = 62.5: numpy rounds the .5 values to even.
        let t = inference_timesteps(SamplerKind::Ddim, TimestepSpacing::Trailing, 0, 1000, 16);
        assert_eq!(t.len(), 16);
        assert_eq!(&t[..6], &[999.0, 937.0, 874.0, 811.0, 749.0, 687.0]);
        assert_eq!(np_interp(1.5, &[0.0, 1.0, 3.0]), 2.0);
        assert_eq!(np_interp(5.0, &[0.0, 1.0, 3.0]), 3.0);
    }

    #[test]
    fn config_keys() -> Result<()> {
        let s = SamplerSettings::from_scheduler_config(
            r#"{"_class_name": "PNDMScheduler", "steps_offset": 1, "set_alpha_to_one": false,
                "clip_sample": false, "skip_prk_steps": true}"#,
        )?;
        assert_eq!(s.steps_offset, 1);
        assert!(!s.set_alpha_to_one && s.clip_sample.is_none());
        assert_eq!(s.timestep_spacing, None);
        let d = SamplerSettings::from_scheduler_config("{}")?;
        assert_eq!(d, SamplerSettings::kohya());
        assert!(SamplerSettings::from_scheduler_config(r#"{"use_karras_sigmas": true}"#).is_err());
        assert!(SamplerSettings::from_scheduler_config(r#"{"timestep_spacing": "x"}"#).is_err());
        Ok(())
    }

    #[test]
    fn step_count_and_offset_are_checked() -> Result<()> {
        let s = DdpmSchedule::sd()?;
        let k = SamplerSettings::kohya();
        assert!(Scheduler::new(SamplerKind::Ddim, &s, &k, 0).is_err());
        assert!(Scheduler::new(SamplerKind::Ddim, &s, &k, 1001).is_err());
        let offset = SamplerSettings {
            steps_offset: 1,
            ..k
        };
        assert!(Scheduler::new(SamplerKind::Ddim, &s, &offset, 1000).is_err());
        assert!(Scheduler::new(SamplerKind::Euler, &s, &offset, 1000).is_ok());
        Ok(())
    }
}
