//! The resolved view of a job spec ([`ResolvedSpec`]) and the values it is made of.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use super::choices::{
    HuberSchedule, LossType, LrScheduler, MixedPrecision, OptimizerType, Sampler, SavePrecision,
};
use crate::error::SpecWarning;
use crate::spec::Resolution;

/// The loss and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    L2,
    /// Only `schedule = Constant` passes validation until the other schedules are implemented.
    Huber {
        c: f64,
        schedule: HuberSchedule,
    },
}

/// Warmup length, resolved from `lr_warmup_steps` (percentages become fractions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WarmupSpec {
    Steps(u64),
    /// Fraction of the scheduler's total steps, in [0, 1].
    Fraction(f64),
}

impl WarmupSpec {
    /// Warmup steps for a schedule of `total_steps` steps; fractions round down as in
    /// sd-scripts (`int(fraction * total)`).
    pub fn steps(self, total_steps: u64) -> u64 {
        match self {
            Self::Steps(n) => n,
            Self::Fraction(f) => (f * total_steps as f64).floor() as u64,
        }
    }
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainLength {
    Steps(u64),
    /// Steps = epochs × ceil(batches per epoch / GPUs / gradient accumulation), known only once
    /// the dataset is scanned.
    Epochs(u32),
}

/// Which devices a job uses on each worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    All,
    Cpu,
    /// Distinct GPU ids, in the order written.
    Ids(Vec<u32>),
}

impl Gpus {
    /// `"all"`, `"cpu"` or comma-separated distinct non-negative integers.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        if text.eq_ignore_ascii_case("cpu") {
            return Ok(Self::Cpu);
        }
        let mut ids = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            let id: u32 = part
                .parse()
                .map_err(|_| format!("`{part}` is not a GPU id (a non-negative integer)"))?;
            if ids.contains(&id) {
                return Err(format!("GPU {id} is listed twice"));
            }
            ids.push(id);
        }
        Ok(Self::Ids(ids))
    }
}

impl fmt::Display for Gpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Cpu => f.write_str("cpu"),
            Self::Ids(ids) => {
                let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                f.write_str(&ids.join(","))
            }
        }
    }
}

/// Aspect-ratio bucketing, with min/max already rounded to multiples of `reso_steps` as
/// sd-scripts does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    pub min_reso: u32,
    pub max_reso: u32,
    pub reso_steps: u32,
    pub no_upscale: bool,
}

/// LoRA on 3×3 convolutions (`network_args.conv_dim`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvLora {
    pub dim: u32,
    /// Effective alpha (0 already replaced by `dim`).
    pub alpha: f64,
}

/// A validated job spec with every effective value worked out: defaults filled in, kohya's
/// implications applied (`constant` with a warmup runs as `constant_with_warmup`, alpha 0 is
/// `network_dim`, `cache_latents_to_disk` implies `cache_latents`, ...) and every choice
/// typed. The spec's own strings are not kept, so nothing can read one that means something
/// else once resolved; values sd-scripts records verbatim in a LoRA's metadata are in
/// [`KohyaArgs`].
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSpec {
    /// The job name.
    pub name: String,
    /// `output.output_name`, else the job name.
    pub output_name: String,
    pub model: ResolvedModel,
    pub dataset: ResolvedDataset,
    pub resolution: Resolution,
    /// `None` without `enable_bucket`.
    pub buckets: Option<Buckets>,
    /// `cache_latents`, also implied by `cache_latents_to_disk`.
    pub cache_latents: bool,
    /// 75, 150 or 225.
    pub max_token_length: u32,
    /// `network.network_dim`: the LoRA rank.
    pub network_dim: u32,
    /// Effective alpha (0 replaced by `network_dim`).
    pub network_alpha: f64,
    pub conv: Option<ConvLora>,
    /// `network.network_weights`: a LoRA file the training starts from.
    pub network_weights: Option<PathBuf>,
    /// `None`: the U-Net LoRA is not trained (unet_lr 0 or network_train_text_encoder_only).
    pub unet_lr: Option<f64>,
    /// `None`: the text-encoder LoRA is not trained (lr 0 or network_train_unet_only).
    pub text_encoder_lr: Option<f64>,
    pub optimizer: OptimizerType,
    /// `key -> value` as sd-scripts would see `key=value` (values are Python literals).
    pub optimizer_args: BTreeMap<String, String>,
    /// Effective schedule: `constant` with a non-zero warmup becomes `constant_with_warmup`.
    pub lr_scheduler: LrScheduler,
    pub warmup: WarmupSpec,
    /// Cycles of `cosine_with_restarts` (at least 1).
    pub lr_scheduler_num_cycles: u32,
    /// Power of `polynomial` (> 0).
    pub lr_scheduler_power: f64,
    /// Gradient clipping norm; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub length: TrainLength,
    pub training: ResolvedTraining,
    pub mixed_precision: MixedPrecision,
    /// `None`: save in the training dtype.
    pub save_precision: Option<SavePrecision>,
    pub loss: Loss,
    /// Timesteps are drawn uniformly from `min..max`.
    pub timesteps: std::ops::Range<u32>,
    pub output: ResolvedOutput,
    pub sample: ResolvedSample,
    pub sampler: Sampler,
    /// `logging.logging_dir`: where the TensorBoard log goes; `None` writes none.
    pub logging_dir: Option<PathBuf>,
    pub gpus: Gpus,
    pub resources: ResolvedResources,
    /// sd-scripts' arguments as the job gives them, for the LoRA metadata only.
    pub kohya_args: KohyaArgs,
    /// Accepted values worth telling the user about.
    pub warnings: Vec<SpecWarning>,
}

/// `[model]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    /// Single-file LDM checkpoint (`.safetensors`/`.ckpt`) or diffusers folder.
    pub pretrained_model_name_or_path: PathBuf,
    pub v2: bool,
    pub v_parameterization: bool,
    pub vae: Option<PathBuf>,
    /// `None`: not given, the last layer (as 1).
    pub clip_skip: Option<u32>,
}

/// `[dataset]`, resolved, less what [`ResolvedSpec`] holds typed (`resolution`, `buckets`,
/// `cache_latents`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedDataset {
    pub train_data_dir: PathBuf,
    pub reg_data_dir: Option<PathBuf>,
    /// Starts with a dot.
    pub caption_extension: String,
    pub shuffle_caption: bool,
    pub caption_separator: String,
    pub keep_tokens: u32,
    pub caption_prefix: Option<String>,
    pub caption_suffix: Option<String>,
    pub caption_dropout_rate: f64,
    pub caption_dropout_every_n_epochs: u32,
    pub caption_tag_dropout_rate: f64,
    pub random_crop: bool,
    pub flip_aug: bool,
    /// Latents are cached on disk next to the images (implies `cache_latents`).
    pub cache_latents_to_disk: bool,
    pub prior_loss_weight: f64,
}

/// `[training]`, resolved, less the length, precision, loss and timesteps ([`ResolvedSpec`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedTraining {
    /// Per device (rank).
    pub train_batch_size: u32,
    pub gradient_accumulation_steps: u32,
    pub seed: Option<u64>,
    pub noise_offset: Option<f64>,
    pub min_snr_gamma: Option<f64>,
    /// Recompute the UNet blocks' activations in backward instead of keeping them.
    pub gradient_checkpointing: bool,
}

/// `[output]`, resolved, less `output_name` and `save_precision` ([`ResolvedSpec`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedOutput {
    pub output_dir: PathBuf,
    pub save_every_n_epochs: Option<u32>,
    pub save_every_n_steps: Option<u64>,
    /// Only with `save_every_n_epochs`.
    pub save_last_n_epochs: Option<u32>,
    pub save_state: bool,
    /// A `-state` folder or file to continue from.
    pub resume: Option<PathBuf>,
    pub training_comment: Option<String>,
    pub no_metadata: bool,
}

/// `[sample]`, resolved, less the sampler ([`ResolvedSpec::sampler`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSample {
    /// Set whenever an interval is.
    pub sample_prompts: Option<PathBuf>,
    pub sample_every_n_epochs: Option<u32>,
    pub sample_every_n_steps: Option<u64>,
}

/// `[resources]`, resolved, less the GPUs ([`ResolvedSpec::gpus`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedResources {
    /// At least 1.
    pub workers: u32,
    /// At least 1; above 1 only with `gpus = "cpu"`.
    pub ranks_per_worker: u32,
    pub max_restarts: u32,
}

/// sd-scripts' arguments that its `ss_*` metadata records as given (`ss_learning_rate`,
/// `ss_unet_lr`, `ss_max_token_length`, `ss_loss_type`, ...), which is not always what
/// training uses: read the other fields of [`ResolvedSpec`] for that.
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaArgs {
    pub learning_rate: f64,
    /// As given; the effective rate is [`ResolvedSpec::unet_lr`].
    pub unet_lr: Option<f64>,
    /// As given; the effective rate is [`ResolvedSpec::text_encoder_lr`].
    pub text_encoder_lr: Option<f64>,
    /// As given; the effective length is [`ResolvedSpec::max_token_length`].
    pub max_token_length: Option<u32>,
    /// As given (validation accepts only 0).
    pub network_dropout: Option<f64>,
    pub loss_type: LossType,
    /// Recorded whatever the loss; it applies only to [`Loss::Huber`].
    pub huber_schedule: HuberSchedule,
    pub huber_c: f64,
    /// As given; the effective range is [`ResolvedSpec::timesteps`].
    pub min_timestep: Option<u32>,
    pub max_timestep: Option<u32>,
}

impl ResolvedSpec {
    /// Data-parallel ranks on each worker of the job: one per GPU named, `ranks_per_worker`
    /// CPU ranks, or `None` for `gpus = "all"` (every GPU the worker pinned, known only once
    /// it is placed).
    pub fn ranks_per_worker(&self) -> Option<u32> {
        match &self.gpus {
            Gpus::All => None,
            Gpus::Cpu => Some(self.resources.ranks_per_worker.max(1)),
            Gpus::Ids(ids) => Some(ids.len() as u32),
        }
    }

    /// The job's world size when it does not depend on the workers chosen (see
    /// [`ResolvedSpec::ranks_per_worker`]).
    pub fn world_size(&self) -> Option<u32> {
        self.ranks_per_worker()
            .map(|r| r * self.resources.workers.max(1))
    }
}
