//! The metadata sd-scripts writes into a LoRA file (`ss_*` training facts, `sshs_*` hashes,
//! `modelspec.*`), which A1111's and ComfyUI's LoRA browsers read: a run's keys are worked out
//! from its spec, dataset and options ([`RunMetadata`]), values written as Python's `str()`
//! writes them ([`loractl_spec::py`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::UNIX_EPOCH;

use candle_core::Tensor;
use loractl_spec::{py, ResolvedSpec};
use sha2::{Digest, Sha256};

use crate::dataset::Dataset;
use crate::loader::Family;
use crate::optim::OptimizerKind;
use crate::sample;
use crate::train::TrainOptions;
use crate::{Error, Result};

/// Which base model the LoRA was trained on, as `modelspec` and `ss_base_model_version` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModel {
    Sd1,
    Sd2,
    Sd2V,
}

impl BaseModel {
    /// The base of a checkpoint of `family`, trained with or without `v_parameterization`.
    pub fn of(family: Family, v_parameterization: bool) -> Self {
        match (family, v_parameterization) {
            (Family::Sd1, _) => BaseModel::Sd1,
            (Family::Sd2, false) => BaseModel::Sd2,
            (Family::Sd2, true) => BaseModel::Sd2V,
        }
    }

    pub fn ss_version(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "sd_v1",
            BaseModel::Sd2 => "sd_v2",
            BaseModel::Sd2V => "sd_v2_v",
        }
    }
    pub fn architecture(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "stable-diffusion-v1/lora",
            BaseModel::Sd2 => "stable-diffusion-v2-512/lora",
            BaseModel::Sd2V => "stable-diffusion-v2-768-v/lora",
        }
    }
    pub fn prediction_type(self) -> &'static str {
        match self {
            BaseModel::Sd2V => "v",
            _ => "epsilon",
        }
    }
}

/// `modelspec.*` keys (Stability's model spec 1.0.1, as sd-scripts fills it for LoRA).
pub fn modelspec(
    base: BaseModel,
    title: &str,
    resolution: (usize, usize),
    date: &str,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("modelspec.{k}"), v);
    };
    put("sai_model_spec", "1.0.1".into());
    put("architecture", base.architecture().into());
    put("implementation", "diffusers".into());
    put("title", title.into());
    put("resolution", format!("{}x{}", resolution.0, resolution.1));
    put("date", date.into());
    put("prediction_type", base.prediction_type().into());
    // sd-scripts writes `sd-scripts/<commit>`: the implementation that wrote the file.
    put(
        "implementation_version",
        format!("loractl/{}", env!("CARGO_PKG_VERSION")),
    );
    m
}

/// sd-scripts' `sshs_model_hash` and `sshs_legacy_hash` for `tensors` saved with `metadata`:
/// the hash is taken over the file as written with only the `ss_*` keys (the ones meant to be
/// immutable), so renaming a title later doesn't change it. Model hash = sha256 of the bytes
/// after the header; legacy hash = first 8 hex digits of sha256 of bytes 0x100000..0x110000.
pub fn sshs_hashes(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> Result<(String, String)> {
    let ss: HashMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bytes = crate::lora::serialize_safetensors(tensors, &ss)?;
    if bytes.len() < 8 {
        return Err(Error::Lora(
            "serialised LoRA is shorter than its header".into(),
        ));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    let header = u64::from_le_bytes(n) as usize;
    let data = bytes.get(8 + header..).unwrap_or(&[]);
    let model_hash = hex(&Sha256::digest(data));
    let start = 0x100000.min(bytes.len());
    let end = (0x100000 + 0x10000).min(bytes.len());
    let legacy = hex(&Sha256::digest(&bytes[start..end]));
    Ok((model_hash, legacy[..8].to_string()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sd-scripts' module path of each optimizer class (for `ss_optimizer`).
fn optimizer_class(kind: OptimizerKind) -> &'static str {
    match kind {
        OptimizerKind::AdamW => "torch.optim.adamw.AdamW",
        OptimizerKind::AdamW8bit => "bitsandbytes.optim.adamw.AdamW8bit",
        OptimizerKind::Lion => "lion_pytorch.lion_pytorch.Lion",
        OptimizerKind::SgdNesterov => "torch.optim.sgd.SGD",
        OptimizerKind::DAdaptAdam => "dadaptation.dadapt_adam.DAdaptAdam",
        OptimizerKind::Prodigy => "prodigyopt.prodigy.Prodigy",
        OptimizerKind::Adafactor => "transformers.optimization.Adafactor",
    }
}

/// Civil UTC date-time `YYYY-MM-DDTHH:MM:SS` for `modelspec.date`.
fn iso_date(secs: u64) -> String {
    let ts = sample::timestamp(UNIX_EPOCH + std::time::Duration::from_secs(secs));
    format!(
        "{}-{}-{}T{}:{}:{}",
        &ts[0..4],
        &ts[4..6],
        &ts[6..8],
        &ts[8..10],
        &ts[10..12],
        &ts[12..14]
    )
}

/// The LoRA metadata of a run (sd-scripts' `train_network.py` keys): the fixed part worked out
/// once, completed for each file by [`RunMetadata::at`].
pub(crate) struct RunMetadata {
    common: BTreeMap<String, String>,
    minimal: BTreeMap<String, String>,
    base: BaseModel,
    title: String,
    resolution: (usize, usize),
    timestep_range: Option<(u32, u32)>,
    encoder_layer: Option<u32>,
    no_metadata: bool,
}

impl RunMetadata {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        spec: &ResolvedSpec,
        dataset: &Dataset,
        base: BaseModel,
        opts: &TrainOptions,
        model_path: &Path,
        num_epochs: usize,
        started_at: u64,
        model_hashes: (String, String),
        vae: Option<(&Path, (String, String))>,
    ) -> Self {
        let k = &spec.kohya_args;
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        let mut net_args = serde_json::Map::new();
        if let Some(c) = spec.conv {
            net_args.insert("conv_dim".into(), c.dim.to_string().into());
            net_args.insert("conv_alpha".into(), py::float_repr(c.alpha).into());
        }
        let mut minimal: BTreeMap<String, String> = [
            ("ss_v2", py::bool_str(spec.model.v2)),
            ("ss_base_model_version", base.ss_version().to_string()),
            ("ss_network_module", "networks.lora".to_string()),
            ("ss_network_dim", spec.network_dim.to_string()),
            ("ss_network_alpha", py::float_repr(spec.network_alpha)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // sd-scripts writes ss_network_args only when network_args were given.
        if !net_args.is_empty() {
            minimal.insert(
                "ss_network_args".into(),
                serde_json::Value::Object(net_args).to_string(),
            );
        }
        for (k, v) in &minimal {
            put(k, v.clone());
        }
        let session_id = opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 33;
        put("ss_session_id", session_id.to_string());
        put("ss_training_started_at", py::float_repr(started_at as f64));
        put("ss_output_name", spec.output_name.clone());
        put("ss_learning_rate", py::float_repr(k.learning_rate));
        put("ss_text_encoder_lr", py::opt_float_repr(k.text_encoder_lr));
        put("ss_unet_lr", py::opt_float_repr(k.unet_lr));
        put("ss_num_epochs", num_epochs.to_string());
        put(
            "ss_gradient_checkpointing",
            py::bool_str(spec.training.gradient_checkpointing),
        );
        put(
            "ss_gradient_accumulation_steps",
            opts.gradient_accumulation_steps.to_string(),
        );
        put("ss_max_train_steps", opts.max_train_steps.to_string());
        put("ss_lr_warmup_steps", opts.lr_warmup_steps.to_string());
        put("ss_lr_scheduler", opts.lr_scheduler.to_string());
        let args: Vec<String> = opts
            .optimizer_args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let class = optimizer_class(opts.optimizer_type);
        put(
            "ss_optimizer",
            if args.is_empty() {
                class.to_string()
            } else {
                format!("{class}({})", args.join(","))
            },
        );
        put("ss_mixed_precision", spec.mixed_precision.to_string());
        put("ss_full_fp16", "False".into());
        put("ss_clip_skip", py::opt_str(spec.model.clip_skip));
        put("ss_max_token_length", py::opt_str(k.max_token_length));
        put("ss_seed", opts.seed.to_string());
        put(
            "ss_noise_offset",
            py::opt_float_repr(spec.training.noise_offset),
        );
        put(
            "ss_min_snr_gamma",
            py::opt_float_repr(spec.training.min_snr_gamma),
        );
        put("ss_max_grad_norm", py::float_repr(spec.max_grad_norm));
        // sd-scripts has no ss_min/max_timestep; the range goes to modelspec.timestep_range.
        put("ss_loss_type", k.loss_type.to_string());
        put("ss_huber_schedule", k.huber_schedule.to_string());
        put("ss_huber_scale", py::float_repr(1.0));
        put("ss_huber_c", py::float_repr(k.huber_c));
        put("ss_network_dropout", py::opt_float_repr(k.network_dropout));
        put("ss_zero_terminal_snr", "False".into());
        put("ss_debiased_estimation", "False".into());
        put("ss_scale_weight_norms", "None".into());
        put("ss_ip_noise_gamma", "None".into());
        put("ss_adaptive_noise_scale", "None".into());
        put("ss_multires_noise_iterations", "None".into());
        put("ss_multires_noise_discount", "0.3".into());
        put("ss_face_crop_aug_range", "None".into());
        // Options loractl does not have, as sd-scripts writes them when they are off.
        put("ss_lowram", "False".into());
        put("ss_fp8_base", "False".into());
        put("ss_fp8_base_unet", "False".into());
        put("ss_noise_offset_random_strength", "False".into());
        put("ss_ip_noise_gamma_random_strength", "False".into());
        put("ss_resize_interpolation", "None".into());
        put("ss_num_validation_images", "0".into());
        put("ss_validation_seed", "None".into());
        put("ss_validation_split", "0.0".into());
        put("ss_max_validation_steps", "None".into());
        put("ss_validate_every_n_epochs", "None".into());
        put("ss_validate_every_n_steps", "None".into());
        // sd-scripts' own git revision, "(unknown)" when it cannot tell; loractl is not sd-scripts.
        put("ss_sd_scripts_commit_hash", "(unknown)".into());
        put(
            "ss_caption_tag_dropout_rate",
            py::float_repr(spec.dataset.caption_tag_dropout_rate),
        );
        put(
            "ss_total_batch_size",
            (spec.training.train_batch_size as usize * opts.gradient_accumulation_steps)
                .to_string(),
        );
        let file_name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        };
        put("ss_sd_model_name", file_name(model_path));
        put("ss_sd_model_hash", model_hashes.0);
        put("ss_new_sd_model_hash", model_hashes.1);
        // sd-scripts writes the VAE's name and hashes only when a VAE is given.
        if let Some((vae_path, (hash, sha256))) = vae {
            put("ss_vae_name", file_name(vae_path));
            put("ss_vae_hash", hash);
            put("ss_new_vae_hash", sha256);
        }
        put(
            "ss_training_comment",
            py::opt_str(spec.output.training_comment.as_deref()),
        );
        for (k, v) in dataset.metadata() {
            put(&k, v);
        }
        Self {
            common: m,
            minimal,
            base,
            title: spec.output_name.clone(),
            resolution: (
                spec.resolution.width as usize,
                spec.resolution.height as usize,
            ),
            // As sd-scripts' get_sai_model_spec: only when the job sets them.
            timestep_range: (k.min_timestep.is_some() || k.max_timestep.is_some())
                .then_some((spec.timesteps.start, spec.timesteps.end)),
            encoder_layer: spec.model.clip_skip,
            no_metadata: spec.output.no_metadata,
        }
    }

    /// The metadata of a LoRA file saved at `step` of `epoch`, at `now` (seconds since the
    /// epoch); only the minimal keys with `no_metadata`.
    pub(crate) fn at(&self, step: usize, epoch: usize, now: u64) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = if self.no_metadata {
            self.minimal.clone().into_iter().collect()
        } else {
            self.common.clone().into_iter().collect()
        };
        if !self.no_metadata {
            m.insert("ss_training_finished_at".into(), py::float_repr(now as f64));
            m.insert("ss_steps".into(), step.to_string());
            m.insert("ss_epoch".into(), epoch.to_string());
        }
        m.extend(modelspec(
            self.base,
            &self.title,
            self.resolution,
            &iso_date(now),
        ));
        if let Some((lo, hi)) = self.timestep_range {
            m.insert("modelspec.timestep_range".into(), format!("{lo},{hi}"));
        }
        if let Some(layer) = self.encoder_layer {
            m.insert("modelspec.encoder_layer".into(), layer.to_string());
        }
        m
    }
}

/// sd-scripts' `model_hash` (A1111's old 8-hex hash of 64 KiB at 1 MiB) and the sha256 of the
/// whole file; for a diffusers folder both are "IsADirectory", as sd-scripts' hash functions
/// return on Linux.
pub(crate) fn model_hashes(path: &Path) -> Result<(String, String)> {
    use std::io::{Read, Seek, SeekFrom};
    if path.is_dir() {
        return Ok(("IsADirectory".into(), "IsADirectory".into()));
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut full = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        full.update(&buf[..n]);
    }
    f.seek(SeekFrom::Start(0x100000))
        .map_err(|e| Error::io(path, e))?;
    let mut chunk = Vec::new();
    f.take(0x10000)
        .read_to_end(&mut chunk)
        .map_err(|e| Error::io(path, e))?;
    let legacy = hex(&Sha256::digest(&chunk));
    Ok((legacy[..8].to_string(), hex(&full.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hashes_ignore_non_ss_metadata_and_match_a_hand_computation() -> Result<()> {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "a.lora_down.weight".to_string(),
            Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((3, 4))?,
        );
        let mut meta = HashMap::new();
        meta.insert("ss_network_dim".to_string(), "4".to_string());
        let (h1, l1) = sshs_hashes(&tensors, &meta)?;
        meta.insert("modelspec.title".to_string(), "renamed".to_string());
        let (h2, l2) = sshs_hashes(&tensors, &meta)?;
        assert_eq!((h1.clone(), l1.clone()), (h2, l2));
        // The data block of this file is the 12 f32 values, little-endian.
        let data: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
        assert_eq!(h1, hex(&Sha256::digest(&data)));
        // A file shorter than 1 MiB hashes the empty slice for the legacy hash.
        assert_eq!(l1, hex(&Sha256::digest(b""))[..8]);
        Ok(())
    }

    #[test]
    fn modelspec_names_the_architecture() {
        let m = modelspec(BaseModel::Sd2V, "zenny", (768, 768), "2026-01-01T00:00:00");
        assert_eq!(
            m["modelspec.architecture"],
            "stable-diffusion-v2-768-v/lora"
        );
        assert_eq!(m["modelspec.prediction_type"], "v");
        assert_eq!(m["modelspec.resolution"], "768x768");
    }
}
