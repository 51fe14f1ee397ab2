//! A job spec run end to end in this process, as sd-scripts' `train_network.py` does it: the
//! plan (what kohya prints before training, and more), latent caching, the training loop,
//! epoch/step LoRA files with kohya's names and metadata, resumable states, preview images,
//! and structured events for whoever watches (the CLI's progress bar, the worker's stream).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device};
use loractl_spec::{Loss, MixedPrecision, ResolvedSpec, SavePrecision, TrainLength};
use serde::Serialize;

use crate::dataset::{BadImagePolicy, Dataset, DatasetConfig};
use crate::loader::{self, Family, LoadOptions, StableDiffusion};
use crate::lora::LoraConfig;
use crate::metadata::{self, BaseModel, RunMetadata};
use crate::optim::OptimizerKind;
use crate::sample::{self, LpwPromptEncoder, SampleModels, SamplePrompt, SampleSchedule};
use crate::step::{LossType, StepOptions};
use crate::train::{EpochEvent, Flow, Hooks, Outcome, StepEvent, TrainOptions, Trainer};
use crate::{Error, Result};

/// What a run tells its watcher, in order. Serialises to JSON with a `kind` tag.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunEvent {
    /// Something slow started (loading the model, caching latents).
    Status { message: String },
    /// A phase before the first step (`load model`, `cache latents`) started, or ended
    /// (`done`); a cluster rank's worker makes each a span of the job's trace.
    Phase { name: String, done: bool },
    /// A non-fatal remark (skipped image, option adjusted).
    Warning { message: String },
    /// Training is about to start (or continue from `resumed_at`).
    Started {
        total_steps: usize,
        num_epochs: usize,
        resumed_at: usize,
    },
    Step {
        step: usize,
        total: usize,
        epoch: usize,
        /// `loss/current`.
        loss: f32,
        /// `loss/average`.
        loss_average: f32,
        /// `lr/<group>`.
        lrs: Vec<(String, f64)>,
        /// `lr/d*lr/<group>` for D-Adaptation and Prodigy.
        d_lrs: Option<Vec<(String, f64)>>,
        samples: usize,
        /// Seconds of the step spent on its inputs, and on all-reduces.
        data_seconds: f64,
        allreduce_seconds: f64,
    },
    Epoch {
        epoch: usize,
        num_epochs: usize,
        /// `loss/epoch_average`.
        loss_average: f32,
    },
    /// A LoRA file was written.
    Saved {
        path: PathBuf,
        step: usize,
        epoch: usize,
    },
    /// A resumable state folder was written.
    StateSaved { path: PathBuf, step: usize },
    /// Preview images were written.
    Sampled { paths: Vec<PathBuf>, step: usize },
    /// The run's TensorBoard event file is complete (the run ended or stopped).
    TrainingLog { path: PathBuf },
    /// The run reached `max_train_steps`; `path` is the final LoRA.
    Finished { path: PathBuf, steps: usize },
    /// The run was asked to stop; `state` resumes it.
    Stopped { state: PathBuf, step: usize },
}

/// How a run is carried out (not what it trains: that is the spec).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: Device,
    /// Set to stop at the next optimizer step with a resumable state saved.
    pub stop: Arc<AtomicBool>,
    /// Seconds since the epoch for every time written into files (`SOURCE_DATE_EPOCH`), so the
    /// same seed gives the same file bytes; `None` uses the clock.
    pub fixed_time: Option<u64>,
    /// Write states as single `NAME-state.safetensors` files instead of folders (what a
    /// cluster rank uploads as its checkpoint).
    pub state_as_file: bool,
    /// Also write a state every this many optimizer steps (`NAME-state`), whatever the spec's
    /// `save_state` says: a cluster run resumes from it after a lost worker.
    pub checkpoint_every_n_steps: Option<usize>,
    /// Folders every data file (images, captions, prompt file, cached latents) must lie in
    /// when opened: a cluster rank's allowed folders. Not confined by default.
    pub allowed_roots: crate::confine::AllowedRoots,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            stop: Arc::new(AtomicBool::new(false)),
            fixed_time: None,
            state_as_file: false,
            checkpoint_every_n_steps: None,
            allowed_roots: crate::confine::AllowedRoots::any(),
        }
    }
}

/// A path from the job spec: relative ones are relative to the job file's folder.
pub fn resolve_path(base_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// An input file or folder of the spec, resolved against `base_dir`; a missing one is a bad
/// config naming its key (rather than the OS error of whichever reader met it first).
pub fn input_path(key: &str, base_dir: &Path, p: &Path) -> Result<PathBuf> {
    let path = resolve_path(base_dir, p);
    let what = match key {
        "model.pretrained_model_name_or_path" => {
            "a .safetensors/.ckpt checkpoint file or a diffusers folder"
        }
        "model.vae" => "a VAE .safetensors/.ckpt file or diffusers folder",
        "network.network_weights" => "a kohya LoRA .safetensors file",
        "sample.sample_prompts" => "a text file with one prompt per line",
        "output.resume" => "a `-state` folder or file written by save_state",
        _ => "an existing file or folder",
    };
    match std::fs::metadata(&path) {
        Ok(_) => Ok(path),
        Err(e) => Err(Error::Config(format!(
            "{key} `{}` cannot be read ({}): give {what} (relative paths are taken from the \
             job file's folder)",
            path.display(),
            io_reason(&e)
        ))),
    }
}

/// An OS error without its "(os error N)" tail.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or folder".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Environment variable giving the memory of the GPU a run trains on, in bytes. The worker
/// knows it from NVML; `plan` and `run` refuse a job whose estimate exceeds it. Without it,
/// the limit is this machine's memory (`/proc/meminfo` MemTotal) for CPU training, and none
/// for a GPU.
pub const GPU_MEMORY_ENV: &str = "LORACTL_GPU_MEMORY_BYTES";

/// How much memory a run may use, and what that memory is (for the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub what: String,
}

impl MemoryLimit {
    /// The GPU's memory from [`GPU_MEMORY_ENV`] when `gpu` (or whenever it is set), else the
    /// machine's MemTotal; `None` when neither is known.
    pub fn detect(gpu: bool) -> Option<Self> {
        let from_env = std::env::var(GPU_MEMORY_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&b| b > 0)
            .map(|bytes| Self {
                bytes,
                what: format!("the GPU's memory ({GPU_MEMORY_ENV})"),
            });
        if from_env.is_some() || gpu {
            return from_env;
        }
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        Some(Self {
            bytes: mem_total(&text)?,
            what: "this machine's memory (MemTotal in /proc/meminfo)".into(),
        })
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => n.checked_mul(1024),
        _ => None,
    }
}

/// Refuses a job whose memory estimate exceeds `limit`.
pub fn check_memory(estimate: u64, limit: Option<&MemoryLimit>) -> Result<()> {
    match limit {
        Some(l) if estimate > l.bytes => Err(Error::Config(format!(
            "the memory estimate of this job (about {}: f32 model weights, LoRA weights with \
             gradients and optimizer state, activations of train_batch_size images at the \
             resolution) exceeds {} ({}): lower training.train_batch_size, dataset.resolution \
             or network.network_dim",
            human_bytes(estimate),
            l.what,
            human_bytes(l.bytes)
        ))),
        _ => Ok(()),
    }
}

/// The dataset options of `spec`.
pub fn dataset_config(spec: &ResolvedSpec, base_dir: &Path) -> DatasetConfig {
    let d = &spec.dataset;
    let bs = spec.buckets;
    let no_buckets = DatasetConfig::default();
    DatasetConfig {
        train_data_dir: resolve_path(base_dir, &d.train_data_dir),
        reg_data_dir: d.reg_data_dir.as_ref().map(|p| resolve_path(base_dir, p)),
        caption_extension: d.caption_extension.clone(),
        shuffle_caption: d.shuffle_caption,
        caption_separator: d.caption_separator.clone(),
        keep_tokens: d.keep_tokens as usize,
        keep_tokens_separator: None,
        caption_prefix: d.caption_prefix.clone(),
        caption_suffix: d.caption_suffix.clone(),
        caption_dropout_rate: d.caption_dropout_rate,
        caption_dropout_every_n_epochs: d.caption_dropout_every_n_epochs as usize,
        caption_tag_dropout_rate: d.caption_tag_dropout_rate,
        resolution: (spec.resolution.width, spec.resolution.height),
        enable_bucket: bs.is_some(),
        // Without buckets the bucket sizes are not used.
        min_bucket_reso: bs.map_or(no_buckets.min_bucket_reso, |b| b.min_reso),
        max_bucket_reso: bs.map_or(no_buckets.max_bucket_reso, |b| b.max_reso),
        bucket_reso_steps: bs.map_or(no_buckets.bucket_reso_steps, |b| b.reso_steps),
        bucket_no_upscale: bs.is_some_and(|b| b.no_upscale),
        random_crop: d.random_crop,
        flip_aug: d.flip_aug,
        prior_loss_weight: d.prior_loss_weight,
        train_batch_size: spec.training.train_batch_size as usize,
        cache_latents: spec.cache_latents,
        cache_latents_to_disk: d.cache_latents_to_disk,
        latent_cache_dir: None,
        bad_image_policy: BadImagePolicy::Skip,
        allowed_roots: crate::confine::AllowedRoots::any(),
    }
}

/// Optimizer steps and epochs of the run, kohya's arithmetic (see [`Dataset::total_steps`]).
pub fn run_length(spec: &ResolvedSpec, dataset: &Dataset, world_size: usize) -> (usize, usize) {
    let accum = spec.training.gradient_accumulation_steps as usize;
    let (steps, epochs) = match spec.length {
        TrainLength::Steps(n) => (n as usize, None),
        TrainLength::Epochs(e) => (0, Some(e as usize)),
    };
    let total = dataset.total_steps(steps, epochs, world_size, accum);
    let num_epochs = dataset.num_epochs(total, world_size, accum);
    (total, num_epochs)
}

/// The training options of `spec` for a run of `total_steps`.
pub fn train_options(spec: &ResolvedSpec, total_steps: usize) -> Result<TrainOptions> {
    let optimizer_type = OptimizerKind::try_from(spec.optimizer)?;
    let loss_type = match spec.loss {
        Loss::L2 => LossType::L2,
        Loss::Huber {
            c,
            schedule: loractl_spec::HuberSchedule::Constant,
        } => LossType::Huber { c },
        other => {
            return Err(Error::Config(format!(
                "training.loss_type {other:?} is not implemented yet; use \"l2\", or \"huber\" \
                 with huber_schedule = \"constant\""
            )))
        }
    };
    Ok(TrainOptions {
        lora: LoraConfig {
            rank: spec.network_dim as usize,
            alpha: spec.network_alpha,
            conv_rank: spec.conv.map(|c| c.dim as usize),
            conv_alpha: spec.conv.map(|c| c.alpha),
            train_unet: spec.unet_lr.is_some(),
            train_text_encoder: spec.text_encoder_lr.is_some(),
            ..LoraConfig::default()
        },
        optimizer_type,
        optimizer_args: spec.optimizer_args.clone(),
        unet_lr: spec.unet_lr,
        text_encoder_lr: spec.text_encoder_lr,
        lr_scheduler: spec.lr_scheduler,
        lr_warmup_steps: spec.warmup.steps(total_steps as u64) as usize,
        lr_scheduler_num_cycles: spec.lr_scheduler_num_cycles as usize,
        lr_scheduler_power: spec.lr_scheduler_power,
        max_train_steps: total_steps,
        gradient_accumulation_steps: spec.training.gradient_accumulation_steps as usize,
        max_grad_norm: spec.max_grad_norm,
        seed: spec.training.seed.unwrap_or(0),
        clip_skip: spec.model.clip_skip.unwrap_or(1) as usize,
        max_token_length: spec.max_token_length as usize,
        gradient_checkpointing: spec.training.gradient_checkpointing,
        fp16_loss_scaling: spec.mixed_precision == MixedPrecision::Fp16,
        step: StepOptions {
            noise_offset: spec.training.noise_offset.unwrap_or(0.0),
            min_snr_gamma: spec.training.min_snr_gamma,
            loss_type,
            min_timestep: spec.timesteps.start as usize,
            max_timestep: spec.timesteps.end as usize,
        },
    })
}

fn load_options(spec: &ResolvedSpec, base_dir: &Path, device: &Device) -> LoadOptions {
    let m = &spec.model;
    LoadOptions {
        device: device.clone(),
        dtype: model_dtype(spec),
        v_parameterization: Some(m.v_parameterization),
        vae_path: m.vae.as_ref().map(|p| resolve_path(base_dir, p)),
        ..LoadOptions::default()
    }
}

/// The model and the spec must agree on SD1 vs SD2, as sd-scripts' `--v2` must.
fn check_family(spec: &ResolvedSpec, sd: &StableDiffusion) -> Result<()> {
    let v2 = spec.model.v2;
    match (v2, sd.family) {
        (true, Family::Sd1) => Err(Error::Config(
            "model.v2 = true but the checkpoint is an SD1.x model: set v2 = false".into(),
        )),
        (false, Family::Sd2) => Err(Error::Config(
            "the checkpoint is an SD2.x model: set model.v2 = true (and v_parameterization = true \
             for 768-v models)"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// What a run will do, worked out before any training (`loractl plan`).
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    pub model: PathBuf,
    pub base_model: Option<String>,
    /// Folders, buckets, image counts, batches per epoch.
    pub dataset: crate::dataset::DatasetSummary,
    pub world_size: usize,
    /// `gpus = "all"`: every worker runs one rank per GPU it pinned, known once the job is
    /// placed; `world_size` assumes one GPU per worker.
    pub world_size_assumed: bool,
    pub gradient_accumulation_steps: usize,
    pub steps_per_epoch: usize,
    pub num_epochs: usize,
    pub total_steps: usize,
    pub warmup_steps: usize,
    pub lora_modules_unet: Option<usize>,
    pub lora_modules_text_encoder: Option<usize>,
    pub lora_params: Option<usize>,
    pub file_bytes: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// What the models are trained in: `f32`, or `bf16` weights with an f32 LoRA.
    pub precision: String,
    pub outputs: Vec<String>,
    pub warnings: Vec<String>,
}

/// The dtype the frozen models are stored and computed in: bf16 or f16 with `mixed_precision`
/// (the LoRA and the optimizer stay f32; fp16 scales its loss), f32 otherwise.
pub fn model_dtype(spec: &ResolvedSpec) -> DType {
    match spec.mixed_precision {
        MixedPrecision::Bf16 => DType::BF16,
        MixedPrecision::Fp16 => DType::F16,
        MixedPrecision::No => DType::F32,
    }
}

/// Bytes per element of the saved LoRA.
fn save_dtype(spec: &ResolvedSpec) -> DType {
    match spec.save_precision {
        Some(SavePrecision::Fp16) => DType::F16,
        Some(SavePrecision::Bf16) => DType::BF16,
        Some(SavePrecision::Float) | None => DType::F32,
    }
}

/// Works out the plan of `spec`. With `inspect_model`, the checkpoint is read for its tensor
/// shapes only (no weights are loaded) to count LoRA modules and parameters.
///
/// With `inspect_model`, a memory estimate above the machine's memory (or the GPU's, from
/// [`GPU_MEMORY_ENV`]) is an error that gives the estimate.
pub fn plan(spec: &ResolvedSpec, base_dir: &Path, inspect_model: bool) -> Result<Plan> {
    let dataset = Dataset::open(dataset_config(spec, base_dir))?;
    let limit = MemoryLimit::detect(false);
    plan_on(spec, base_dir, &dataset, inspect_model, limit.as_ref())
}

fn plan_on(
    spec: &ResolvedSpec,
    base_dir: &Path,
    dataset: &Dataset,
    inspect_model: bool,
    limit: Option<&MemoryLimit>,
) -> Result<Plan> {
    // Data-parallel ranks: one per GPU of each worker, or `ranks_per_worker` CPU ranks.
    let world_size = spec.world_size().unwrap_or(spec.resources.workers.max(1)) as usize;
    let (total_steps, num_epochs) = run_length(spec, dataset, world_size);
    let summary = dataset.summary();
    let accum = spec.training.gradient_accumulation_steps as usize;
    let opts = train_options(spec, total_steps)?;
    let mut warnings: Vec<String> = spec.warnings.iter().map(|w| w.to_string()).collect();
    warnings.extend(summary.warnings.iter().cloned());
    for (p, why) in &summary.skipped_images {
        warnings.push(format!("{}: skipped ({why})", p.display()));
    }
    let model = resolve_path(base_dir, &spec.model.pretrained_model_name_or_path);
    let (mut base_model, mut mods_u, mut mods_t, mut params, mut file, mut mem) =
        (None, None, None, None, None, None);
    if inspect_model {
        let model = input_path(
            "model.pretrained_model_name_or_path",
            base_dir,
            &spec.model.pretrained_model_name_or_path,
        )?;
        check_inputs(spec, base_dir)?;
        let lo = LoadOptions {
            shapes_only: true,
            ..load_options(spec, base_dir, &Device::Cpu)
        };
        let sd = loader::load(&model, &lo)?;
        check_family(spec, &sd)?;
        base_model = Some(
            BaseModel::of(sd.family, spec.model.v_parameterization)
                .ss_version()
                .to_string(),
        );
        let lora_cfg = LoraConfig {
            train_unet: opts.unet_lr.is_some_and(|l| l > 0.0),
            train_text_encoder: opts.text_encoder_lr.is_some_and(|l| l > 0.0),
            ..opts.lora.clone()
        };
        let sites = sd.sites();
        if let Some(w) = &spec.network_weights {
            let store = crate::lora::open_network_weights(&resolve_path(base_dir, w))?;
            crate::lora::check_network_weights(store.as_ref(), &sites, &lora_cfg)?;
        }
        let (mut u, mut t, mut p) = (0usize, 0usize, 0usize);
        for site in &sites {
            if let Some((rank, _)) = lora_cfg.target(site) {
                let down: usize = crate::lora::LoraModule::down_shape(&site.kind, rank)
                    .iter()
                    .product();
                let up: usize = crate::lora::LoraModule::up_shape(&site.kind, rank)
                    .iter()
                    .product();
                p += down + up;
                if site.name.starts_with("lora_te") {
                    t += 1;
                } else {
                    u += 1;
                }
            }
        }
        let elem = save_dtype(spec).size_in_bytes() as u64;
        // Tensors plus one alpha per module plus about 120 bytes of header per tensor and
        // 16 KiB of metadata (tag frequencies grow with the dataset).
        let n_mod = (u + t) as u64;
        file = Some(p as u64 * elem + n_mod * (elem + 3 * 120) + 16 * 1024);
        // Weights of the three models (f32 or bf16), f32 LoRA weights with gradients and
        // optimizer moments, and activations of one batch (a per-pixel figure measured on
        // SD1.5: within 10% of the peak at 128² and 256²).
        let model_params = sd.model_params.unwrap_or(0);
        let optim_copies = optimizer_copies(spec);
        let pixels = (spec.resolution.width as u64) * (spec.resolution.height as u64);
        let act = pixels
            .saturating_mul(spec.training.train_batch_size as u64)
            .saturating_mul(9 * 1024);
        let estimate = model_params
            .saturating_mul(model_dtype(spec).size_in_bytes() as u64)
            .saturating_add((p as u64).saturating_mul(4 * (2 + optim_copies)))
            .saturating_add(act);
        check_memory(estimate, limit)?;
        mem = Some(estimate);
        mods_u = Some(u);
        mods_t = Some(t);
        params = Some(p);
    } else if let Some(w) = &spec.network_weights {
        crate::lora::open_network_weights(&resolve_path(base_dir, w))?;
    }
    let name = spec.output_name.clone();
    let mut outputs = Vec::new();
    let o = &spec.output;
    if let Some(n) = o.save_every_n_epochs {
        let n = n as usize;
        for e in (n..num_epochs).step_by(n.max(1)).take(3) {
            outputs.push(format!("{name}-{e:06}.safetensors"));
        }
    }
    if let Some(n) = o.save_every_n_steps {
        let n = n as usize;
        for s in (n..=total_steps).step_by(n.max(1)).take(3) {
            outputs.push(format!("{name}-step{s:08}.safetensors"));
        }
    }
    outputs.push(format!("{name}.safetensors"));
    // Counted on the global batches the ranks share, as the run counts them.
    let steps_per_epoch = dataset
        .global_batches_per_epoch(world_size)
        .div_ceil(accum.max(1));
    Ok(Plan {
        name: spec.name.clone(),
        model,
        base_model,
        dataset: summary.clone(),
        world_size,
        world_size_assumed: spec.world_size().is_none(),
        gradient_accumulation_steps: accum,
        steps_per_epoch,
        num_epochs,
        total_steps,
        warmup_steps: opts.lr_warmup_steps,
        lora_modules_unet: mods_u,
        lora_modules_text_encoder: mods_t,
        lora_params: params,
        file_bytes: file,
        memory_bytes: mem,
        precision: match model_dtype(spec) {
            DType::BF16 => "bf16 weights, f32 LoRA".to_string(),
            DType::F16 => "fp16 weights, f32 LoRA, loss scaling".to_string(),
            _ => "f32".to_string(),
        },
        outputs,
        warnings,
    })
}

/// The spec's other input paths, each checked to exist with an error naming its key.
fn check_inputs(spec: &ResolvedSpec, base_dir: &Path) -> Result<()> {
    let inputs = [
        ("model.vae", spec.model.vae.as_ref()),
        ("network.network_weights", spec.network_weights.as_ref()),
        ("sample.sample_prompts", spec.sample.sample_prompts.as_ref()),
        ("output.resume", spec.output.resume.as_ref()),
    ];
    for (key, p) in inputs {
        if let Some(p) = p {
            input_path(key, base_dir, p)?;
        }
    }
    Ok(())
}

/// Full-size copies of the LoRA weights an optimizer keeps (moments, D-Adaptation sums).
fn optimizer_copies(spec: &ResolvedSpec) -> u64 {
    use loractl_spec::OptimizerType::*;
    match spec.optimizer {
        SgdNesterov | Lion | Adafactor => 1,
        AdamW8bit => 1, // two 8-bit moments
        DAdaptAdam | Prodigy => 4,
        _ => 2,
    }
}

fn human_bytes(n: u64) -> String {
    let (v, unit) = if n >= 1 << 30 {
        (n as f64 / (1u64 << 30) as f64, "GiB")
    } else if n >= 1 << 20 {
        (n as f64 / (1u64 << 20) as f64, "MiB")
    } else {
        (n as f64 / 1024.0, "KiB")
    };
    format!("{v:.1} {unit}")
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "job `{}` on {}", self.name, self.model.display())?;
        if let Some(b) = &self.base_model {
            writeln!(f, "  base model: {b}")?;
        }
        let d = &self.dataset;
        writeln!(f, "folders:")?;
        for x in &d.folders {
            writeln!(
                f,
                "  {}{}: {} images × {} repeats = {} samples per epoch{}",
                x.name,
                if x.is_reg { " (regularization)" } else { "" },
                x.img_count,
                x.repeats,
                x.samples_per_epoch,
                if x.missing_captions > 0 {
                    format!(
                        ", {} without caption file (folder name used)",
                        x.missing_captions
                    )
                } else {
                    String::new()
                }
            )?;
        }
        writeln!(f, "buckets:")?;
        for b in &d.buckets {
            writeln!(
                f,
                "  {}×{}: {} images, {} samples, {} batches",
                b.resolution.0, b.resolution.1, b.images, b.count, b.batches
            )?;
        }
        writeln!(
            f,
            "num train images × repeats: {}\nnum reg images: {}",
            d.num_train_images, d.num_reg_images
        )?;
        writeln!(
            f,
            "batch size per device: {}\nbatches per epoch: {}\nprocesses (world size): {}{}\n\
             global batch (per device × world × accumulation): {}\n\
             gradient accumulation steps: {}\noptimizer steps per epoch: {}\nepochs: {}\n\
             total optimization steps: {}\nwarmup steps: {}",
            d.batch_size,
            d.batches_per_epoch,
            self.world_size,
            if self.world_size_assumed {
                " (gpus = \"all\": one rank per GPU each worker pinned; one GPU per worker assumed)"
            } else {
                ""
            },
            d.batch_size * self.world_size * self.gradient_accumulation_steps,
            self.gradient_accumulation_steps,
            self.steps_per_epoch,
            self.num_epochs,
            self.total_steps,
            self.warmup_steps
        )?;
        if let (Some(u), Some(t), Some(p)) = (
            self.lora_modules_unet,
            self.lora_modules_text_encoder,
            self.lora_params,
        ) {
            writeln!(
                f,
                "LoRA modules: {u} UNet + {t} text encoder, {p} parameters"
            )?;
        }
        if let Some(b) = self.file_bytes {
            writeln!(f, "LoRA file size: about {}", human_bytes(b))?;
        }
        if let Some(b) = self.memory_bytes {
            writeln!(
                f,
                "memory estimate ({} training): about {}",
                self.precision,
                human_bytes(b)
            )?;
        }
        writeln!(f, "outputs: {}", self.outputs.join(", "))?;
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// Saving, sampling and events at the trainer's boundaries.
struct RunHooks<'r, 'e> {
    spec: &'r ResolvedSpec,
    output_dir: PathBuf,
    name: String,
    meta: RunMetadata,
    num_epochs: usize,
    save_dtype: DType,
    prompts: Vec<SamplePrompt>,
    schedule: SampleSchedule,
    sample_cfg: sample::SampleConfig,
    stop: Arc<AtomicBool>,
    fixed_time: Option<u64>,
    state_as_file: bool,
    checkpoint_every: Option<usize>,
    /// Rank 0 of a data-parallel run (or a run alone): the one rank that writes files.
    writer: bool,
    /// The TensorBoard log of `logging.logging_dir` (rank 0 only).
    tensorboard: Option<crate::tensorboard::EventWriter>,
    events: &'e mut (dyn FnMut(&RunEvent) + Send),
}

impl RunHooks<'_, '_> {
    /// sd-scripts' scalars of one optimizer step, or of an epoch (`epoch` set).
    fn log_scalars(&mut self, step: usize, scalars: &[(String, f32)]) -> Result<()> {
        let now = self.now() as f64;
        let Some(tb) = self.tensorboard.as_mut() else {
            return Ok(());
        };
        for (tag, value) in scalars {
            tb.scalar(tag, *value, step as i64, now)?;
        }
        tb.flush()
    }

    fn now(&self) -> u64 {
        self.fixed_time.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
    }

    /// Writes the LoRA as `file_stem.safetensors` with metadata and its sshs hashes.
    fn save_lora(
        &mut self,
        t: &Trainer<'_>,
        file_stem: &str,
        step: usize,
        epoch: usize,
    ) -> Result<PathBuf> {
        let path = self.output_dir.join(format!("{file_stem}.safetensors"));
        if !self.writer {
            return Ok(path);
        }
        let mut meta = self.meta.at(step, epoch, self.now());
        let tensors = t.network().to_tensors(self.save_dtype)?;
        let (model_hash, legacy) = metadata::sshs_hashes(&tensors, &meta)?;
        meta.insert("sshs_model_hash".into(), model_hash);
        meta.insert("sshs_legacy_hash".into(), legacy);
        t.network().save(&path, self.save_dtype, meta)?;
        (self.events)(&RunEvent::Saved {
            path: path.clone(),
            step,
            epoch,
        });
        Ok(path)
    }

    fn save_state(&mut self, t: &Trainer<'_>, dir_name: &str) -> Result<PathBuf> {
        if !self.writer {
            // Every rank holds the same state; rank 0's is the one written.
            let ext = if self.state_as_file {
                ".safetensors"
            } else {
                ""
            };
            return Ok(self.output_dir.join(format!("{dir_name}{ext}")));
        }
        let dir = if self.state_as_file {
            let path = self.output_dir.join(format!("{dir_name}.safetensors"));
            t.save_state_file(&path)?;
            path
        } else {
            let dir = self.output_dir.join(dir_name);
            t.save_state(&dir)?;
            dir
        };
        (self.events)(&RunEvent::StateSaved {
            path: dir.clone(),
            step: t.position().step,
        });
        Ok(dir)
    }

    fn sample(
        &mut self,
        t: &Trainer<'_>,
        sd: &StableDiffusion,
        epoch: Option<usize>,
        step: usize,
    ) -> Result<()> {
        if !self.writer || self.prompts.is_empty() || !self.schedule.due(epoch, step) {
            return Ok(());
        }
        let clip_skip = t.options().clip_skip;
        let encoder = LpwPromptEncoder::new(&sd.text_encoder, &sd.tokenizer, clip_skip);
        let models = SampleModels::new(sd, &encoder, t.device().clone());
        let paths = models.sample_images(
            &self.prompts,
            &self.sample_cfg,
            &self.output_dir,
            Some(&self.name),
            epoch,
            step,
        )?;
        (self.events)(&RunEvent::Sampled { paths, step });
        Ok(())
    }
}

struct BoundHooks<'r, 'e, 's> {
    inner: RunHooks<'r, 'e>,
    sd: &'s StableDiffusion,
}

impl Hooks for BoundHooks<'_, '_, '_> {
    fn step_end(&mut self, t: &Trainer<'_>, e: &StepEvent) -> Result<Flow> {
        let h = &mut self.inner;
        let mut scalars = vec![
            ("loss/current".to_owned(), e.loss),
            ("loss/average".to_owned(), e.loss_average),
        ];
        scalars.extend(e.lrs.iter().map(|(g, lr)| (format!("lr/{g}"), *lr as f32)));
        for (g, d_lr) in e.d_lrs.iter().flatten() {
            scalars.push((format!("lr/d*lr/{g}"), *d_lr as f32));
        }
        h.log_scalars(e.step, &scalars)?;
        (h.events)(&RunEvent::Step {
            step: e.step,
            total: e.total,
            epoch: e.epoch,
            loss: e.loss,
            loss_average: e.loss_average,
            lrs: e.lrs.clone(),
            d_lrs: e.d_lrs.clone(),
            samples: e.samples,
            data_seconds: e.data_seconds,
            allreduce_seconds: e.allreduce_seconds,
        });
        let last = e.step >= e.total;
        if let Some(n) = h.spec.output.save_every_n_steps {
            if n > 0 && (e.step as u64).is_multiple_of(n) && !last {
                let stem = format!("{}-step{:08}", h.name, e.step);
                h.save_lora(t, &stem, e.step, e.epoch)?;
                if h.spec.output.save_state {
                    h.save_state(t, &format!("{stem}-state"))?;
                }
            }
        }
        if let Some(n) = h.checkpoint_every {
            if e.step.is_multiple_of(n) && !last {
                h.save_state(t, &format!("{}-state", h.name))?;
            }
        }
        h.sample(t, self.sd, None, e.step)?;
        Ok(if h.stop.load(Ordering::SeqCst) {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }

    fn epoch_end(&mut self, t: &Trainer<'_>, e: &EpochEvent) -> Result<Flow> {
        let h = &mut self.inner;
        // sd-scripts logs the epoch's loss at step = epoch number.
        h.log_scalars(
            e.epoch,
            &[("loss/epoch_average".to_owned(), e.loss_average)],
        )?;
        (h.events)(&RunEvent::Epoch {
            epoch: e.epoch,
            num_epochs: h.num_epochs,
            loss_average: e.loss_average,
        });
        if let Some(n) = h.spec.output.save_every_n_epochs {
            let n = n as usize;
            if n > 0 && e.epoch.is_multiple_of(n) && !e.last && e.epoch < h.num_epochs {
                let stem = format!("{}-{:06}", h.name, e.epoch);
                h.save_lora(t, &stem, e.step, e.epoch)?;
                if h.spec.output.save_state {
                    h.save_state(t, &format!("{stem}-state"))?;
                }
                if let Some(keep) = h.spec.output.save_last_n_epochs {
                    // sd-scripts removes the file `save_every_n_epochs × keep` epochs back.
                    let old = e.epoch as i64 - (n as i64) * keep as i64;
                    if old > 0 {
                        let stem = format!("{}-{:06}", h.name, old);
                        let _ =
                            std::fs::remove_file(h.output_dir.join(format!("{stem}.safetensors")));
                        let _ = std::fs::remove_dir_all(h.output_dir.join(format!("{stem}-state")));
                    }
                }
            }
        }
        h.sample(t, self.sd, Some(e.epoch), e.step)?;
        Ok(if h.stop.load(Ordering::SeqCst) {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }
}

/// What a finished or stopped run left behind.
#[derive(Debug, Clone, PartialEq)]
pub enum RunResult {
    Finished { lora: PathBuf, steps: usize },
    Stopped { state: PathBuf, step: usize },
}

/// Runs `spec` (paths relative to `base_dir`) in this process.
pub fn run(
    spec: &ResolvedSpec,
    base_dir: &Path,
    ro: &RunOptions,
    events: &mut (dyn FnMut(&RunEvent) + Send),
) -> Result<RunResult> {
    run_with(spec, base_dir, ro, None, events)
}

/// [`run`] as one rank of a data-parallel run: every rank calls it with the same spec and its
/// end of `collective`; steps are counted on the global batch, and only rank 0 writes LoRA
/// files, states and samples (the others return the same paths).
pub fn run_parallel(
    spec: &ResolvedSpec,
    base_dir: &Path,
    ro: &RunOptions,
    collective: Box<dyn loractl_collective::Collective>,
    events: &mut (dyn FnMut(&RunEvent) + Send),
) -> Result<RunResult> {
    run_with(spec, base_dir, ro, Some(collective), events)
}

fn run_with(
    spec: &ResolvedSpec,
    base_dir: &Path,
    ro: &RunOptions,
    collective: Option<Box<dyn loractl_collective::Collective>>,
    events: &mut (dyn FnMut(&RunEvent) + Send),
) -> Result<RunResult> {
    let world_size = collective.as_ref().map_or(1, |c| c.world_size());
    let started_at = ro.fixed_time.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    for w in &spec.warnings {
        events(&RunEvent::Warning {
            message: w.to_string(),
        });
    }
    let model_path = input_path(
        "model.pretrained_model_name_or_path",
        base_dir,
        &spec.model.pretrained_model_name_or_path,
    )?;
    check_inputs(spec, base_dir)?;
    let dataset = Dataset::open(DatasetConfig {
        allowed_roots: ro.allowed_roots.clone(),
        ..dataset_config(spec, base_dir)
    })?;
    for w in dataset.warnings() {
        events(&RunEvent::Warning { message: w.clone() });
    }
    // The plan's memory check, before any weight is loaded: the model is read for its shapes.
    if let Some(limit) = MemoryLimit::detect(!ro.device.is_cpu()) {
        plan_on(spec, base_dir, &dataset, true, Some(&limit))?;
    }
    let (total_steps, num_epochs) = run_length(spec, &dataset, world_size);
    let opts = train_options(spec, total_steps)?;
    events(&RunEvent::Status {
        message: format!("loading {}", model_path.display()),
    });
    let phase = |name: &str, done: bool| RunEvent::Phase {
        name: name.to_owned(),
        done,
    };
    events(&phase("load model", false));
    // sd-scripts' model hashes read the whole file: computed beside loading and caching.
    let hashing = {
        let path = model_path.clone();
        std::thread::spawn(move || metadata::model_hashes(&path))
    };
    let sd = loader::load(&model_path, &load_options(spec, base_dir, &ro.device))?;
    events(&phase("load model", true));
    check_family(spec, &sd)?;
    let prompts = match &spec.sample.sample_prompts {
        Some(p) => sample::load_prompts_within(&resolve_path(base_dir, p), &ro.allowed_roots)?,
        None => Vec::new(),
    };
    let initial = match &spec.network_weights {
        Some(p) => {
            // Checked by names and shapes before a byte is read, with the targets the trainer
            // will build (a learning rate of 0 leaves that model out).
            let store = crate::lora::open_network_weights(&resolve_path(base_dir, p))?;
            let lora_cfg = LoraConfig {
                train_unet: opts.lora.train_unet && opts.unet_lr.is_some_and(|l| l > 0.0),
                train_text_encoder: opts.lora.train_text_encoder
                    && opts.text_encoder_lr.is_some_and(|l| l > 0.0),
                ..opts.lora.clone()
            };
            crate::lora::check_network_weights(store.as_ref(), &sd.sites(), &lora_cfg)?;
            Some(crate::lora::read_network_weights(
                store.as_ref(),
                &ro.device,
            )?)
        }
        None => None,
    };
    let mut trainer = Trainer::new(&sd, &dataset, opts.clone(), &ro.device, initial.as_ref())?;
    if let Some(c) = collective {
        trainer = trainer.with_collective(c);
    }
    let vae_id = vae_fingerprint(spec, base_dir, &model_path)?;
    if let Some(cache) = dataset.latent_cache(&vae_id)? {
        events(&RunEvent::Status {
            message: format!("caching latents of {} images", dataset.images().len()),
        });
        events(&phase("cache latents", false));
        let stats = Trainer::cache_latents(&sd, &dataset, &cache, opts.seed, &ro.device)?;
        events(&phase("cache latents", true));
        tracing::info!(?stats, "latents cached");
        trainer = trainer.with_latent_cache(cache);
    }
    if let Some(r) = &spec.output.resume {
        let dir = resolve_path(base_dir, r);
        events(&RunEvent::Status {
            message: format!("resuming from {}", dir.display()),
        });
        trainer.load_state(&dir)?;
    }
    let output_dir = resolve_path(base_dir, &spec.output.output_dir);
    std::fs::create_dir_all(&output_dir).map_err(|e| Error::io(&output_dir, e))?;
    let hashes = hashing
        .join()
        .map_err(|_| Error::Internal("the model hashing thread panicked".into()))??;
    let vae_path = spec.model.vae.as_ref().map(|v| resolve_path(base_dir, v));
    let vae = match &vae_path {
        Some(p) => Some((p.as_path(), metadata::model_hashes(p)?)),
        None => None,
    };
    let meta = RunMetadata::new(
        spec,
        &dataset,
        BaseModel::of(sd.family, spec.model.v_parameterization),
        &opts,
        &model_path,
        num_epochs,
        started_at,
        hashes,
        vae,
    );
    let sampler = match spec.sampler {
        loractl_spec::Sampler::Ddim => sample::SamplerKind::Ddim,
        loractl_spec::Sampler::Euler => sample::SamplerKind::Euler,
        loractl_spec::Sampler::EulerA => sample::SamplerKind::EulerAncestral,
    };
    let sp = &spec.sample;
    let tensorboard = match &spec.logging_dir {
        Some(dir) if trainer.rank() == 0 => {
            let tb =
                crate::tensorboard::EventWriter::for_run(&resolve_path(base_dir, dir), started_at)?;
            events(&RunEvent::Status {
                message: format!("TensorBoard log: {}", tb.path().display()),
            });
            Some(tb)
        }
        _ => None,
    };
    let mut hooks = BoundHooks {
        inner: RunHooks {
            spec,
            output_dir: output_dir.clone(),
            name: spec.output_name.clone(),
            meta,
            num_epochs,
            save_dtype: save_dtype(spec),
            prompts,
            schedule: SampleSchedule {
                every_n_steps: sp.sample_every_n_steps.map(|n| n as usize),
                every_n_epochs: sp.sample_every_n_epochs.map(|n| n as usize),
                at_first: false,
            },
            sample_cfg: sample::SampleConfig {
                sampler,
                ..sample::SampleConfig::default()
            },
            stop: ro.stop.clone(),
            fixed_time: ro.fixed_time,
            state_as_file: ro.state_as_file,
            checkpoint_every: ro.checkpoint_every_n_steps.filter(|n| *n > 0),
            writer: trainer.rank() == 0,
            tensorboard,
            events,
        },
        sd: &sd,
    };
    (hooks.inner.events)(&RunEvent::Started {
        total_steps,
        num_epochs,
        resumed_at: trainer.position().step,
    });
    let outcome = trainer.run(&mut hooks)?;
    let h = &mut hooks.inner;
    if let Some(tb) = h.tensorboard.as_mut() {
        tb.flush()?;
        let path = tb.path().to_path_buf();
        (h.events)(&RunEvent::TrainingLog { path });
    }
    let pos = trainer.position();
    match outcome {
        Outcome::Finished => {
            let epoch = pos.epoch.saturating_sub(1).max(1);
            let path = h.save_lora(&trainer, &h.name.clone(), pos.step, epoch)?;
            if spec.output.save_state {
                h.save_state(&trainer, &format!("{}-state", h.name))?;
            }
            (h.events)(&RunEvent::Finished {
                path: path.clone(),
                steps: pos.step,
            });
            Ok(RunResult::Finished {
                lora: path,
                steps: pos.step,
            })
        }
        Outcome::Stopped => {
            let state = h.save_state(&trainer, &format!("{}-state", h.name))?;
            (h.events)(&RunEvent::Stopped {
                state: state.clone(),
                step: pos.step,
            });
            Ok(RunResult::Stopped {
                state,
                step: pos.step,
            })
        }
    }
}

/// What identifies the VAE for the latent cache key: the VAE file (or the model) by name,
/// size and modification time, so replacing either invalidates cached latents.
fn vae_fingerprint(spec: &ResolvedSpec, base_dir: &Path, model: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let source = match &spec.model.vae {
        Some(v) => resolve_path(base_dir, v),
        None if model.is_dir() => model.join("vae"),
        None => model.to_path_buf(),
    };
    let mut files = Vec::new();
    if source.is_dir() {
        for e in std::fs::read_dir(&source).map_err(|e| Error::io(&source, e))? {
            files.push(e.map_err(|e| Error::io(&source, e))?.path());
        }
        files.sort();
    } else {
        files.push(source.clone());
    }
    let mut h = Sha256::new();
    for f in files {
        let m = std::fs::metadata(&f).map_err(|e| Error::io(&f, e))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(f.display().to_string().as_bytes());
        h.update(m.len().to_le_bytes());
        h.update(mtime.to_le_bytes());
    }
    let d = h.finalize();
    Ok(d[..8].iter().map(|b| format!("{b:02x}")).collect())
}
