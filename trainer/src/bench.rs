//! The benchmark model shared by the `lora-bench` style binaries: a UNet of one of the
//! configs in `scripts/bench/unet_configs.json` with random weights, optionally the config's
//! CLIP text encoder trained beside it (kohya's `network_train_text_encoder`), kohya's LoRA
//! targets on them (up weights non-zero, so a step does the work of any later step) and
//! AdamW, plus one training step split into its parts so a data-parallel benchmark can put
//! an all-reduce between backward and the optimizer.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraNetwork};
use crate::nn::Builder;
use crate::optim::{AdamW, AdamWConfig};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::weights::RandomWeights;

/// The benchmark configs (`tiny`, `small`, `sd15`), as `scripts/bench/torch_step.py` reads
/// them too.
pub const CONFIGS: &str = include_str!("../../scripts/bench/unet_configs.json");

/// What one step trains on.
pub struct BenchInputs {
    batch: usize,
    x: Tensor,
    /// The UNet's text context, or the token ids [batch, 77] the text encoder turns into it.
    context: Tensor,
    target: Tensor,
}

/// A UNet with a LoRA and its optimizer, ready to time steps.
pub struct BenchModel {
    pub name: String,
    unet: UNet2DConditionModel,
    /// Trained beside the UNet when the benchmark asks for it.
    text_encoder: Option<ClipTextModel>,
    pub net: LoraNetwork,
    opt: AdamW,
    vars: Vec<Var>,
    latent: (usize, usize),
    context: (usize, usize),
    device: Device,
}

impl BenchModel {
    /// Builds config `name` with a LoRA of `rank`/`alpha` on `device`, the UNet in f32.
    pub fn build(name: &str, rank: usize, alpha: f64, device: &Device) -> Result<Self> {
        Self::build_in(name, rank, alpha, device, DType::F32, false)
    }

    /// [`BenchModel::build`] with the frozen models in `dtype` (bf16/f16 for mixed precision;
    /// the LoRA and AdamW stay f32), and with `text_encoder` the config's CLIP text encoder
    /// and its LoRA trained too: each step then encodes random tokens into the UNet's context.
    pub fn build_in(
        name: &str,
        rank: usize,
        alpha: f64,
        device: &Device,
        dtype: DType,
        text_encoder: bool,
    ) -> Result<Self> {
        let all: serde_json::Value = serde_json::from_str(CONFIGS)
            .map_err(|e| Error::Internal(format!("benchmark configs: {e}")))?;
        let spec = all.get(name).ok_or_else(|| {
            Error::Config(format!(
                "unknown benchmark config `{name}`: tiny, small or sd15"
            ))
        })?;
        let dims = |key: &str| -> Result<(usize, usize)> {
            let v = &spec[key];
            match (
                v.get(0).and_then(|x| x.as_u64()),
                v.get(1).and_then(|x| x.as_u64()),
            ) {
                (Some(a), Some(b)) => Ok((a as usize, b as usize)),
                _ => Err(Error::Internal(format!(
                    "benchmark config `{name}`: bad `{key}`"
                ))),
            }
        };
        let cfg = UNetConfig::from_json(&spec["unet"].to_string(), name)?;
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
        let unet = UNet2DConditionModel::new(&cfg, &Builder::new(vb.clone(), "lora_unet"))?;
        let text_encoder = match text_encoder {
            true => {
                let te: ClipTextConfig = serde_json::from_value(spec["text_encoder"].clone())
                    .map_err(|e| {
                        Error::Internal(format!("benchmark config `{name}`: text_encoder: {e}"))
                    })?;
                Some(ClipTextModel::new(&te, &Builder::new(vb, "lora_te"))?)
            }
            false => None,
        };
        let lora = LoraConfig {
            rank,
            alpha,
            train_text_encoder: text_encoder.is_some(),
            ..Default::default()
        };
        let mut sites = unet.sites();
        if let Some(te) = &text_encoder {
            sites.extend(te.sites());
        }
        let net = LoraNetwork::new(&sites, &lora, device, 0)?;
        for m in net.modules() {
            m.up.set(&(m.up.as_tensor().randn_like(0.0, 0.01)?))?;
        }
        net.apply();
        let vars = net.vars();
        let opt = AdamW::new(
            vars.clone(),
            AdamWConfig {
                lr: 1e-4,
                ..Default::default()
            },
        )?;
        Ok(Self {
            name: name.to_owned(),
            unet,
            text_encoder,
            net,
            opt,
            vars,
            latent: dims("latent")?,
            context: dims("context")?,
            device: device.clone(),
        })
    }

    /// The latent height and width the steps train on.
    pub fn latent_size(&self) -> (usize, usize) {
        self.latent
    }

    /// Trains on `size`×`size` latents instead of the config's.
    pub fn set_latent_size(&mut self, size: usize) {
        self.latent = (size, size);
    }

    /// Random latents, text context (or token ids for the text encoder) and targets for
    /// `batch` samples, made once and reused by every step so that the steps time the model
    /// alone.
    pub fn inputs(&self, batch: usize) -> Result<BenchInputs> {
        let (h, w) = self.latent;
        let (seq, dim) = self.context;
        let context = match &self.text_encoder {
            Some(te) => {
                let vocab = te.config().vocab_size as u64;
                // Any fixed spread of ids: the work of a step does not depend on them.
                let ids: Vec<u32> = (0..(batch * seq) as u64)
                    .map(|i| ((i * 7919 + 13) % vocab) as u32)
                    .collect();
                Tensor::from_vec(ids, (batch, seq), &self.device)?
            }
            None => Tensor::randn(0f32, 1., (batch, seq, dim), &self.device)?,
        };
        Ok(BenchInputs {
            batch,
            x: Tensor::randn(0f32, 1., (batch, 4, h, w), &self.device)?,
            context,
            target: Tensor::randn(0f32, 1., (batch, 4, h, w), &self.device)?,
        })
    }

    /// The forward pass and its MSE loss; step `i` picks the timesteps (sample `b` of step
    /// `i` gets `(i * batch + b) * 397 mod 1000`).
    pub fn loss(&self, inputs: &BenchInputs, i: usize) -> Result<Tensor> {
        let batch = inputs.batch;
        let t: Vec<u32> = (0..batch)
            .map(|b| (((i * batch + b) * 397) % 1000) as u32)
            .collect();
        let t = Tensor::new(t.as_slice(), &self.device)?;
        let context = match &self.text_encoder {
            Some(te) => te.forward(&inputs.context, 1)?,
            None => inputs.context.clone(),
        };
        let out = self.unet.forward(&inputs.x, &t, &context)?;
        Ok((out.to_dtype(DType::F32)? - &inputs.target)?
            .sqr()?
            .mean_all()?)
    }

    /// The LoRA gradients of `grads` as one flat buffer (zeros where a variable has none).
    pub fn flatten(&self, grads: &GradStore) -> Result<Vec<f32>> {
        let mut flat = Vec::with_capacity(self.net.param_count());
        for v in &self.vars {
            match grads.get(v.as_tensor()) {
                Some(g) => flat.extend(g.flatten_all()?.to_vec1::<f32>()?),
                None => flat.resize(flat.len() + v.elem_count(), 0.0),
            }
        }
        Ok(flat)
    }

    /// Puts a flat buffer of [`BenchModel::flatten`]'s layout back into `grads`.
    pub fn unflatten(&self, flat: &[f32], grads: &mut GradStore) -> Result<()> {
        let mut offset = 0;
        for v in &self.vars {
            let n = v.elem_count();
            let slice = flat.get(offset..offset + n).ok_or_else(|| {
                Error::Internal(format!(
                    "gradient buffer of {} values is too short",
                    flat.len()
                ))
            })?;
            grads.insert(
                v.as_tensor(),
                Tensor::from_slice(slice, v.shape(), v.device())?,
            );
            offset += n;
        }
        Ok(())
    }

    /// See [`UNet2DConditionModel::set_gradient_checkpointing`].
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.unet.set_gradient_checkpointing(on);
    }

    /// The trained LoRA tensors.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The optimizer step.
    pub fn update(&mut self, grads: &GradStore) -> Result<()> {
        self.opt.step(grads)?;
        Ok(())
    }
}

/// A `/proc/self/status` figure in MiB (`VmHWM` = peak resident, `RssAnon` = resident
/// anonymous memory).
pub fn status_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time of every thread of this process so far, user and system, in seconds.
pub fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer it is given.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return f64::NAN;
        }
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Compute threads of this process: `RAYON_NUM_THREADS`, else every core.
pub fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The median of `values` (sorted in place); NaN when empty.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A bench binary's exit: success, or its error on stderr after `name` and exit code 1.
pub fn exit<E: std::fmt::Display>(
    name: &str,
    result: std::result::Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the text encoder, its LoRA (6 linears per layer, as kohya targets them) is
    /// trained beside the UNet's: every adapter of both gets a gradient.
    #[test]
    fn the_text_encoder_trains_beside_the_unet() -> Result<()> {
        let dev = Device::Cpu;
        let unet_only = BenchModel::build("tiny", 4, 4.0, &dev)?;
        let both = BenchModel::build_in("tiny", 4, 4.0, &dev, DType::F32, true)?;
        let te: Vec<_> = both
            .net
            .modules()
            .iter()
            .filter(|m| m.is_text_encoder())
            .collect();
        // tiny's text encoder has 2 layers.
        assert_eq!(te.len(), 12);
        assert_eq!(
            both.net.modules().len(),
            unet_only.net.modules().len() + te.len()
        );
        let inputs = both.inputs(1)?;
        let grads = both.loss(&inputs, 0)?.backward()?;
        for m in both.net.modules() {
            for (part, v) in [("down", &m.down), ("up", &m.up)] {
                let g = grads
                    .get(v.as_tensor())
                    .ok_or_else(|| Error::Internal(format!("{} {part}: no gradient", m.name)))?;
                let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
                assert!(norm > 0.0, "{} {part}: zero gradient", m.name);
            }
        }
        Ok(())
    }
}
