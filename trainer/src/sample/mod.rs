//! Preview images during training, as sd-scripts' `--sample_prompts`: prompt files, the DDIM /
//! Euler / Euler-ancestral samplers, emphasis-weighted long-prompt conditioning with
//! classifier-free guidance, VAE decoding, and PNGs named as sd-scripts names them.
//!
//! Everything here runs without a gradient graph: inputs and every model output are detached,
//! so live LoRA variables never make sampling record (and hold) a graph.

mod prompts;
mod scheduler;
mod text;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use prompts::{
    load_prompts, load_prompts_within, parse_prompt_json, parse_prompt_line, parse_prompt_text,
    parse_prompt_toml, SamplePrompt,
};
pub use scheduler::{SamplerKind, SamplerSettings, Scheduler, TimestepSpacing};
pub use text::{parse_prompt_attention, Conditioning, LpwPromptEncoder, PromptEncoder};

use crate::loader::StableDiffusion;
use crate::schedule::DdpmSchedule;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::{Error, Result};

/// Run-wide sampling settings; a prompt's own options override the first five.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleConfig {
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub scale: f64,
    /// `--sample_sampler`.
    pub sampler: SamplerKind,
    pub sampler_settings: SamplerSettings,
}

impl Default for SampleConfig {
    /// sd-scripts' defaults: 512×512, 30 steps, scale 7.5, DDIM, its scheduler settings.
    fn default() -> Self {
        Self {
            width: 512,
            height: 512,
            steps: 30,
            scale: 7.5,
            sampler: SamplerKind::Ddim,
            sampler_settings: SamplerSettings::kohya(),
        }
    }
}

/// A prompt with every default applied and the size rounded as sd-scripts does.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub scale: f64,
    pub sampler: SamplerKind,
    /// `None`: a fresh random seed (and none in the file name).
    pub seed: Option<u64>,
}

impl SampleRequest {
    /// Applies `cfg`'s defaults; width and height are rounded down to a multiple of 8, at
    /// least 64 (sd-scripts' `max(64, x - x % 8)`).
    pub fn resolve(p: &SamplePrompt, cfg: &SampleConfig) -> Self {
        let round = |x: u32| (x - x % 8).max(64);
        Self {
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            width: round(p.width.unwrap_or(cfg.width)),
            height: round(p.height.unwrap_or(cfg.height)),
            steps: p.steps.unwrap_or(cfg.steps),
            scale: p.scale.unwrap_or(cfg.scale),
            sampler: p.sampler.unwrap_or(cfg.sampler),
            seed: p.seed,
        }
    }
}

/// Where unit-normal noise comes from: the initial latents first, then (Euler ancestral) one
/// draw per step.
pub trait NoiseSource {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Noise from a ChaCha8 generator: the same seed gives the same image on every device.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        crate::random::randn(&mut self.rng, shape, device)
    }
}

/// A finished sample: the final latents `[1, 4, h, w]` (scaled as the UNet sees them) and the
/// decoded image.
#[derive(Debug, Clone)]
pub struct Generated {
    pub latents: Tensor,
    pub image: RgbImage,
}

/// The models a sample is drawn from. `device` is where the UNet and VAE live.
pub struct SampleModels<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub vae: &'a AutoencoderKL,
    pub schedule: &'a DdpmSchedule,
    pub encoder: &'a dyn PromptEncoder,
    pub device: Device,
}

impl<'a> SampleModels<'a> {
    /// A loaded model's UNet, VAE and schedule with `encoder` (usually an
    /// [`LpwPromptEncoder`] over the same model's text encoder and tokenizer).
    pub fn new(sd: &'a StableDiffusion, encoder: &'a dyn PromptEncoder, device: Device) -> Self {
        Self {
            unet: &sd.unet,
            vae: &sd.vae,
            schedule: &sd.schedule,
            encoder,
            device,
        }
    }

    /// One image for `prompt` with `cfg`'s defaults (seeded from `--d`, else randomly).
    pub fn generate(&self, prompt: &SamplePrompt, cfg: &SampleConfig) -> Result<RgbImage> {
        let req = SampleRequest::resolve(prompt, cfg);
        let seed = req.seed.unwrap_or_else(rand::random);
        let mut noise = SeededNoise::new(seed);
        Ok(self
            .generate_with(&req, &cfg.sampler_settings, &mut noise)?
            .image)
    }

    /// The sampling loop of sd-scripts' pipeline with noise from `noise`: initial latents ×
    /// `init_noise_sigma`, then per step the UNet on [uncond, cond] (guidance when
    /// scale > 1), `uncond + scale·(cond − uncond)`, one scheduler step; finally
    /// VAE-decode `latents / scaling_factor`.
    pub fn generate_with(
        &self,
        req: &SampleRequest,
        settings: &SamplerSettings,
        noise: &mut dyn NoiseSource,
    ) -> Result<Generated> {
        let dev = &self.device;
        let guidance = req.scale > 1.0;
        let negative = guidance.then(|| req.negative_prompt.as_deref().unwrap_or(""));
        let c = self.encoder.encode(&req.prompt, negative)?;
        let cond = c.cond.detach().to_device(dev)?;
        let context = match (guidance, c.uncond) {
            (true, Some(u)) => Tensor::cat(&[&u.detach().to_device(dev)?, &cond], 0)?,
            (true, None) => {
                return Err(Error::Config(
                    "prompt encoder gave no negative conditioning under guidance".to_string(),
                ))
            }
            (false, _) => cond,
        };

        let f = self.vae.downscale() as u32;
        if !req.width.is_multiple_of(f) || !req.height.is_multiple_of(f) {
            return Err(Error::Config(format!(
                "sample size {}x{} is not a multiple of the VAE's factor {f}",
                req.width, req.height
            )));
        }
        let channels = self.unet.config().in_channels;
        let shape = [
            1,
            channels,
            (req.height / f) as usize,
            (req.width / f) as usize,
        ];
        let sched = Scheduler::new(req.sampler, self.schedule, settings, req.steps)?;
        let mut latents =
            (noise.randn(&shape, dev)?.to_dtype(DType::F32)? * sched.init_noise_sigma())?;
        for (i, &t) in sched.timesteps().iter().enumerate() {
            let x = if guidance {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let x = sched.scale_model_input(&x, i)?;
            let t = Tensor::new(&[t as f32], dev)?;
            let out = self
                .unet
                .forward(&x, &t, &context)?
                .detach()
                .to_dtype(DType::F32)?;
            let out = if guidance {
                let u = out.narrow(0, 0, 1)?;
                let c = out.narrow(0, 1, 1)?;
                (&u + ((c - &u)? * req.scale)?)?
            } else {
                out
            };
            let step_noise = if sched.needs_noise() {
                Some(noise.randn(&shape, dev)?)
            } else {
                None
            };
            latents = sched.step(&out, i, &latents, step_noise.as_ref())?;
        }
        let decoded = self
            .vae
            .decode(&(&latents / self.vae.scaling_factor())?)?
            .detach();
        Ok(Generated {
            image: to_rgb(&decoded)?,
            latents,
        })
    }

    /// Generates every prompt and saves it under `output_dir/sample/` with sd-scripts' name
    /// (see [`sample_file_name`]); returns the paths written.
    pub fn sample_images(
        &self,
        prompts: &[SamplePrompt],
        cfg: &SampleConfig,
        output_dir: &Path,
        output_name: Option<&str>,
        epoch: Option<usize>,
        step: usize,
    ) -> Result<Vec<PathBuf>> {
        let dir = output_dir.join("sample");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut written = Vec::with_capacity(prompts.len());
        for p in prompts {
            tracing::info!(index = p.index, prompt = %p.prompt, step, "generating sample image");
            let image = self.generate(p, cfg)?;
            let name = sample_file_name(
                output_name,
                epoch,
                step,
                p.index,
                &timestamp(SystemTime::now()),
                p.seed,
            );
            let path = dir.join(name);
            save_png(&image, &path)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Decoded `[1, 3, H, W]` in about [-1, 1] to 8-bit RGB: `round(clamp(x/2 + 0.5, 0, 1) · 255)`
/// with numpy's round-half-to-even.
fn to_rgb(decoded: &Tensor) -> Result<RgbImage> {
    let (b, c, h, w) = decoded.dims4()?;
    if b != 1 || c != 3 {
        return Err(Error::Config(format!(
            "decoded image has shape {:?}, expected [1, 3, H, W]",
            decoded.dims()
        )));
    }
    let x = decoded
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .squeeze(0)?
        .permute((1, 2, 0))?
        .affine(0.5, 0.5)?
        .clamp(0f32, 1f32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes: Vec<u8> = x
        .into_iter()
        .map(|v| (v * 255.0).round_ties_even() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::Config("decoded image buffer has the wrong size".to_string()))
}

/// Writes `image` as a PNG.
pub fn save_png(image: &RgbImage, path: &Path) -> Result<()> {
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| match e {
            image::ImageError::IoError(e) => Error::io(path, e),
            other => Error::io(path, std::io::Error::other(other)),
        })
}

/// sd-scripts' sample image name:
/// `{output_name}_{e{epoch:06} | {step:06}}_{index:02}_{timestamp}[_{seed}].png` (the
/// `output_name_` part only when there is one; the epoch form at an epoch end).
pub fn sample_file_name(
    output_name: Option<&str>,
    epoch: Option<usize>,
    step: usize,
    index: usize,
    timestamp: &str,
    seed: Option<u64>,
) -> String {
    let prefix = output_name.map(|n| format!("{n}_")).unwrap_or_default();
    let at = match epoch {
        Some(e) => format!("e{e:06}"),
        None => format!("{step:06}"),
    };
    let seed = seed.map(|s| format!("_{s}")).unwrap_or_default();
    format!("{prefix}{at}_{index:02}_{timestamp}{seed}.png")
}

/// `YYYYMMDDhhmmss` of `t` in UTC (sd-scripts uses local time; UTC needs no time-zone data).
pub fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// When sd-scripts samples (`--sample_every_n_steps`, `--sample_every_n_epochs`, which wins,
/// and `--sample_at_first`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SampleSchedule {
    pub every_n_steps: Option<usize>,
    pub every_n_epochs: Option<usize>,
    pub at_first: bool,
}

impl SampleSchedule {
    /// Whether to sample at global step `step` (0 before training starts) — `epoch` is
    /// `Some(epochs completed)` at an epoch end and before training (`Some(0)`), `None` after an
    /// optimizer step, exactly the arguments sd-scripts' trainer passes.
    pub fn due(&self, epoch: Option<usize>, step: usize) -> bool {
        if step == 0 {
            return self.at_first;
        }
        match (self.every_n_epochs, self.every_n_steps) {
            (Some(n), _) => n > 0 && epoch.is_some_and(|e| e.is_multiple_of(n)),
            (None, Some(n)) => n > 0 && epoch.is_none() && step.is_multiple_of(n),
            (None, None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_time() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_199); // 2024-02-29 23:59:59
        assert_eq!(timestamp(t), "20240229235959");
        assert_eq!(timestamp(UNIX_EPOCH), "19700101000000");
    }

    #[test]
    fn file_names_follow_sd_scripts() {
        let ts = "20260101120000";
        assert_eq!(
            sample_file_name(Some("zenny"), None, 250, 3, ts, Some(42)),
            "zenny_000250_03_20260101120000_42.png"
        );
        assert_eq!(
            sample_file_name(None, Some(2), 250, 0, ts, None),
            "e000002_00_20260101120000.png"
        );
    }

    #[test]
    fn schedule_matches_sd_scripts() {
        let steps = SampleSchedule {
            every_n_steps: Some(100),
            ..Default::default()
        };
        assert!(!steps.due(Some(0), 0));
        assert!(steps.due(None, 200) && !steps.due(None, 150) && !steps.due(Some(1), 200));
        let epochs = SampleSchedule {
            every_n_steps: Some(100),
            every_n_epochs: Some(2),
            at_first: true,
        };
        assert!(epochs.due(Some(0), 0));
        assert!(!epochs.due(None, 200) && epochs.due(Some(2), 37) && !epochs.due(Some(3), 40));
    }

    #[test]
    fn sizes_round_like_sd_scripts() {
        let cfg = SampleConfig::default();
        let mut p = SamplePrompt::new("x");
        p.width = Some(770);
        p.height = Some(32);
        let r = SampleRequest::resolve(&p, &cfg);
        assert_eq!((r.width, r.height, r.steps, r.scale), (768, 64, 30, 7.5));
    }

    #[test]
    fn seeded_noise_is_reproducible() -> Result<()> {
        let a = SeededNoise::new(7).randn(&[2, 3], &Device::Cpu)?;
        let b = SeededNoise::new(7).randn(&[2, 3], &Device::Cpu)?;
        let c = SeededNoise::new(8).randn(&[2, 3], &Device::Cpu)?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        assert_ne!(a.to_vec2::<f32>()?, c.to_vec2::<f32>()?);
        Ok(())
    }
}
