//! The job spec as written in TOML: one struct per section, field names equal to sd-scripts'
//! option names, defaults in [`defaults`]. Values are kept as the user wrote them (choices are
//! strings) so that validation can report every bad value at once; [`crate::ResolvedSpec`] is
//! the typed view.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// The job spec version this crate reads and writes.
pub const SPEC_VERSION: u32 = 1;

/// Default values, written once. Where loractl departs from sd-scripts the constant says why.
pub mod defaults {
    pub const VERSION: u32 = super::SPEC_VERSION;
    /// sd-scripts defaults to `.caption`, but every kohya_ss tutorial and the GUI use `.txt`,
    /// and a wrong extension silently trains on folder names instead of captions
    /// (kohya_ss #927).
    pub const CAPTION_EXTENSION: &str = ".txt";
    pub const CAPTION_SEPARATOR: &str = ",";
    pub const MIN_BUCKET_RESO: u32 = 256;
    pub const MAX_BUCKET_RESO: u32 = 1024;
    pub const BUCKET_RESO_STEPS: u32 = 64;
    pub const PRIOR_LOSS_WEIGHT: f64 = 1.0;
    pub const VAE_BATCH_SIZE: u32 = 1;
    pub const NETWORK_MODULE: &str = "networks.lora";
    pub const NETWORK_DIM: u32 = 4;
    pub const NETWORK_ALPHA: f64 = 1.0;
    /// sd-scripts' conv_alpha when only conv_dim is given.
    pub const CONV_ALPHA: f64 = 1.0;
    pub const OPTIMIZER_TYPE: &str = "AdamW";
    /// sd-scripts' 2e-6 is its full fine-tuning default; a LoRA barely moves at it. 1e-4 is the
    /// kohya_ss GUI's LoRA default.
    pub const LEARNING_RATE: f64 = 1e-4;
    pub const LR_SCHEDULER: &str = "constant";
    pub const LR_SCHEDULER_NUM_CYCLES: u32 = 1;
    pub const LR_SCHEDULER_POWER: f64 = 1.0;
    pub const MAX_GRAD_NORM: f64 = 1.0;
    pub const TRAIN_BATCH_SIZE: u32 = 1;
    /// Used when neither max_train_steps nor max_train_epochs is given (sd-scripts' default).
    pub const MAX_TRAIN_STEPS: u64 = 1600;
    pub const GRADIENT_ACCUMULATION_STEPS: u32 = 1;
    pub const MIXED_PRECISION: &str = "no";
    pub const LOSS_TYPE: &str = "l2";
    pub const HUBER_C: f64 = 0.1;
    pub const HUBER_SCHEDULE: &str = "snr";
    /// sd-scripts requires `--output_dir`; a job gets a folder of its own, relative to the
    /// job's working directory.
    pub const OUTPUT_DIR: &str = "output";
    pub const SAVE_MODEL_AS: &str = "safetensors";
    pub const SAMPLE_SAMPLER: &str = "ddim";
    pub const GPUS: &str = "all";
    pub const WORKERS: u32 = 1;
    pub const RANKS_PER_WORKER: u32 = 1;
    pub const MAX_RESTARTS: u32 = 3;
    pub const MAX_TOKEN_LENGTH: u32 = 75;
}

/// A training job: what to train on and how, and what it needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Format version; absent means [`SPEC_VERSION`].
    #[serde(default = "version_default")]
    pub version: u32,
    /// Job name; also the default `output.output_name`.
    pub name: String,
    pub model: ModelConfig,
    pub dataset: DatasetConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub sample: SampleConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub resources: ResourcesConfig,
}

fn version_default() -> u32 {
    defaults::VERSION
}

/// `[model]`: the base checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Single-file LDM checkpoint (`.safetensors`/`.ckpt`) or diffusers folder.
    pub pretrained_model_name_or_path: PathBuf,
    #[serde(default)]
    pub v2: bool,
    #[serde(default)]
    pub v_parameterization: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<u32>,
    /// 75 (absent), 150 or 225.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_length: Option<u32>,
    #[serde(default)]
    pub no_half_vae: bool,
}

/// `[dataset]`: images, captions, buckets and caching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Parent of `N_name` folders (N = repeats).
    pub train_data_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reg_data_dir: Option<PathBuf>,
    #[serde(default = "caption_extension_default")]
    pub caption_extension: String,
    #[serde(default)]
    pub shuffle_caption: bool,
    #[serde(default = "caption_separator_default")]
    pub caption_separator: String,
    #[serde(default)]
    pub keep_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_suffix: Option<String>,
    #[serde(default)]
    pub caption_dropout_rate: f64,
    #[serde(default)]
    pub caption_dropout_every_n_epochs: u32,
    #[serde(default)]
    pub caption_tag_dropout_rate: f64,
    /// `"512"`, `"512,768"` (width,height), `512` or `[512, 768]`.
    pub resolution: Resolution,
    #[serde(default)]
    pub enable_bucket: bool,
    #[serde(default = "min_bucket_reso_default")]
    pub min_bucket_reso: u32,
    #[serde(default = "max_bucket_reso_default")]
    pub max_bucket_reso: u32,
    #[serde(default = "bucket_reso_steps_default")]
    pub bucket_reso_steps: u32,
    #[serde(default)]
    pub bucket_no_upscale: bool,
    #[serde(default)]
    pub random_crop: bool,
    #[serde(default)]
    pub flip_aug: bool,
    #[serde(default)]
    pub color_aug: bool,
    #[serde(default)]
    pub cache_latents: bool,
    #[serde(default)]
    pub cache_latents_to_disk: bool,
    #[serde(default)]
    pub cache_text_encoder_outputs: bool,
    #[serde(default = "prior_loss_weight_default")]
    pub prior_loss_weight: f64,
    #[serde(default = "vae_batch_size_default")]
    pub vae_batch_size: u32,
}

fn caption_extension_default() -> String {
    defaults::CAPTION_EXTENSION.to_owned()
}
fn caption_separator_default() -> String {
    defaults::CAPTION_SEPARATOR.to_owned()
}
fn min_bucket_reso_default() -> u32 {
    defaults::MIN_BUCKET_RESO
}
fn max_bucket_reso_default() -> u32 {
    defaults::MAX_BUCKET_RESO
}
fn bucket_reso_steps_default() -> u32 {
    defaults::BUCKET_RESO_STEPS
}
fn prior_loss_weight_default() -> f64 {
    defaults::PRIOR_LOSS_WEIGHT
}
fn vae_batch_size_default() -> u32 {
    defaults::VAE_BATCH_SIZE
}

/// `[network]`: the LoRA itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Only `networks.lora` exists; accepted so that kohya configs read naturally.
    pub network_module: String,
    pub network_dim: u32,
    /// 0 means "= network_dim" (no scaling), as in sd-scripts.
    pub network_alpha: f64,
    #[serde(
        skip_serializing_if = "NetworkArgs::is_empty",
        deserialize_with = "deserialize_network_args"
    )]
    pub network_args: NetworkArgs,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_dropout: Option<f64>,
    pub network_train_unet_only: bool,
    pub network_train_text_encoder_only: bool,
    /// Initialise from an existing kohya LoRA file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_weights: Option<PathBuf>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            network_module: defaults::NETWORK_MODULE.to_owned(),
            network_dim: defaults::NETWORK_DIM,
            network_alpha: defaults::NETWORK_ALPHA,
            network_args: NetworkArgs::default(),
            network_dropout: None,
            network_train_unet_only: false,
            network_train_text_encoder_only: false,
            network_weights: None,
        }
    }
}

/// `[network.network_args]`. Also accepted in sd-scripts' list form,
/// `network_args = ["conv_dim=8", "conv_alpha=4"]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkArgs {
    /// Rank of LoRA on the 3×3 convs of ResNet blocks and down/upsamplers (LoCon-style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_dim: Option<u32>,
    /// Alpha for those; defaults to 1 when conv_dim is set; 0 means "= conv_dim".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_alpha: Option<f64>,
}

impl NetworkArgs {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// The `key=value` names [`NetworkArgs`] knows, for list-form parsing and suggestions.
    pub const KEYS: &'static [&'static str] = &["conv_dim", "conv_alpha"];
}

/// `[optimizer]`: optimizer, learning rates and schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// sd-scripts' names, matched case-insensitively (AdamW, AdamW8bit, Lion, DAdaptation,
    /// Prodigy, ...).
    pub optimizer_type: String,
    #[serde(skip_serializing_if = "OptimizerArgs::is_empty")]
    pub optimizer_args: OptimizerArgs,
    pub learning_rate: f64,
    /// Defaults to learning_rate; 0 drops the U-Net LoRA from training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unet_lr: Option<f64>,
    /// Defaults to learning_rate; 0 drops the text-encoder LoRA from training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_lr: Option<f64>,
    pub lr_scheduler: String,
    pub lr_warmup_steps: LrWarmup,
    pub lr_scheduler_num_cycles: u32,
    pub lr_scheduler_power: f64,
    /// Gradient-norm clip; 0 turns clipping off.
    pub max_grad_norm: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            optimizer_type: defaults::OPTIMIZER_TYPE.to_owned(),
            optimizer_args: OptimizerArgs::default(),
            learning_rate: defaults::LEARNING_RATE,
            unet_lr: None,
            text_encoder_lr: None,
            lr_scheduler: defaults::LR_SCHEDULER.to_owned(),
            lr_warmup_steps: LrWarmup::default(),
            lr_scheduler_num_cycles: defaults::LR_SCHEDULER_NUM_CYCLES,
            lr_scheduler_power: defaults::LR_SCHEDULER_POWER,
            max_grad_norm: defaults::MAX_GRAD_NORM,
        }
    }
}

/// `[training]`: length, batch, precision, noise and loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Per GPU.
    pub train_batch_size: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_train_steps: Option<u64>,
    /// Overrides max_train_steps when both are given (as in sd-scripts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_train_epochs: Option<u32>,
    pub gradient_accumulation_steps: u32,
    /// `no`, `fp16` or `bf16`.
    pub mixed_precision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise_offset: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_snr_gamma: Option<f64>,
    /// Lowest timestep sampled (0..=999, default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_timestep: Option<u32>,
    /// One past the highest timestep sampled (1..=1000, default 1000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_timestep: Option<u32>,
    /// `l2`, `l1`, `huber` or `smooth_l1`.
    pub loss_type: String,
    pub huber_c: f64,
    /// `constant`, `exponential` or `snr` (how huber_c varies with the timestep).
    pub huber_schedule: String,
    pub gradient_checkpointing: bool,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            train_batch_size: defaults::TRAIN_BATCH_SIZE,
            max_train_steps: None,
            max_train_epochs: None,
            gradient_accumulation_steps: defaults::GRADIENT_ACCUMULATION_STEPS,
            mixed_precision: defaults::MIXED_PRECISION.to_owned(),
            seed: None,
            noise_offset: None,
            min_snr_gamma: None,
            min_timestep: None,
            max_timestep: None,
            loss_type: defaults::LOSS_TYPE.to_owned(),
            huber_c: defaults::HUBER_C,
            huber_schedule: defaults::HUBER_SCHEDULE.to_owned(),
            gradient_checkpointing: false,
        }
    }
}

/// `[output]`: where and how LoRA files and training state are saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    pub output_dir: PathBuf,
    /// File stem of the LoRA; defaults to the job name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_name: Option<String>,
    pub save_model_as: String,
    /// `fp16`, `bf16` or `float`; absent means the training dtype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_precision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every_n_epochs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every_n_steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_last_n_epochs: Option<u32>,
    pub save_state: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_comment: Option<String>,
    pub no_metadata: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from(defaults::OUTPUT_DIR),
            output_name: None,
            save_model_as: defaults::SAVE_MODEL_AS.to_owned(),
            save_precision: None,
            save_every_n_epochs: None,
            save_every_n_steps: None,
            save_last_n_epochs: None,
            save_state: false,
            resume: None,
            training_comment: None,
            no_metadata: false,
        }
    }
}

/// `[sample]`: preview images during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    /// Text file of prompts with `--n --w --h --d --s --l` options, one per line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_prompts: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_every_n_epochs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_every_n_steps: Option<u64>,
    /// `ddim`, `euler` or `euler_a` (sd-scripts' `k_euler`, `k_euler_a` also accepted).
    pub sample_sampler: String,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            sample_prompts: None,
            sample_every_n_epochs: None,
            sample_every_n_steps: None,
            sample_sampler: defaults::SAMPLE_SAMPLER.to_owned(),
        }
    }
}

/// `[logging]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// TensorBoard-style scalars (`loss/average`, `lr/unet`, `lr/d*lr/...`) are written here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging_dir: Option<PathBuf>,
}

/// `[resources]`: what the job asks of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    /// Per worker: `"all"`, `"cpu"`, or GPU ids such as `"0,2"`.
    pub gpus: String,
    /// Workers the job spans (>1 is multi-node data parallel). On each, a GPU job runs one
    /// rank per GPU it takes.
    pub workers: u32,
    /// CPU jobs (`gpus = "cpu"`): data-parallel rank processes on each worker, which share its
    /// cores. GPU jobs run one rank per GPU and leave this at 1.
    pub ranks_per_worker: u32,
    /// Restarts after failures that count (a lost worker does not).
    pub max_restarts: u32,
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        Self {
            gpus: defaults::GPUS.to_owned(),
            workers: defaults::WORKERS,
            ranks_per_worker: defaults::RANKS_PER_WORKER,
            max_restarts: defaults::MAX_RESTARTS,
        }
    }
}

/// Training resolution, width × height. Written `"512"`, `"512,768"`, `512` or `[512, 768]`;
/// written back as a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    pub width: u32,
    pub height: u32,
}

impl Resolution {
    pub fn square(size: u32) -> Self {
        Self {
            width: size,
            height: size,
        }
    }

    /// sd-scripts' `--resolution` syntax: `"size"` or `"width,height"`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(',').map(|p| p.trim().parse::<u32>());
        let width = parts.next()?.ok()?;
        match parts.next() {
            None => Some(Self::square(width)),
            Some(height) => {
                let height = height.ok()?;
                parts.next().is_none().then_some(Self { width, height })
            }
        }
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.width == self.height {
            write!(f, "{}", self.width)
        } else {
            write!(f, "{},{}", self.width, self.height)
        }
    }
}

impl Serialize for Resolution {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Resolution {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "a resolution such as \"512\" or \"512,768\" (width,height)";
        impl<'de> Visitor<'de> for V {
            type Value = Resolution;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Resolution, E> {
                Resolution::parse(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Resolution, E> {
                u32::try_from(v)
                    .map(Resolution::square)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Resolution, E> {
                u32::try_from(v)
                    .map(Resolution::square)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Resolution, A::Error> {
                let width: u32 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let height: u32 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(Resolution { width, height })
            }
        }
        d.deserialize_any(V)
    }
}

/// `lr_warmup_steps` as written: a step count, a fraction of the total steps, or a percentage.
/// Strings follow sd-scripts' `int_or_float`: `"10%"`, `"0.1"`, `"100"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrWarmup {
    Steps(u64),
    /// Fraction of the total steps, written as a float below 1 (e.g. `0.05`).
    Fraction(f64),
    /// Percentage of the total steps, written as a string (e.g. `"5%"`).
    Percent(f64),
}

impl Default for LrWarmup {
    fn default() -> Self {
        Self::Steps(0)
    }
}

impl LrWarmup {
    /// sd-scripts' `int_or_float` for a string value.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if let Some(pct) = text.strip_suffix('%') {
            return pct.trim().parse().ok().map(Self::Percent);
        }
        if let Ok(steps) = text.parse::<u64>() {
            return Some(Self::Steps(steps));
        }
        // A float of 1 or more must be an integer in sd-scripts (`int("1.5")` fails).
        let value: f64 = text.parse().ok()?;
        (value < 1.0).then_some(Self::Fraction(value))
    }

    /// True when no warmup happens at all.
    pub fn is_zero(&self) -> bool {
        match *self {
            Self::Steps(n) => n == 0,
            Self::Fraction(f) | Self::Percent(f) => f == 0.0,
        }
    }
}

impl fmt::Display for LrWarmup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Steps(n) => write!(f, "{n}"),
            Self::Fraction(x) => write!(f, "{x}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for LrWarmup {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Self::Steps(n) => s.serialize_u64(n),
            Self::Fraction(x) => s.serialize_f64(x),
            Self::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for LrWarmup {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LrWarmup;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a step count (100), a fraction of the steps below 1 (0.05) or a percentage (\"5%\")")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LrWarmup, E> {
                u64::try_from(v)
                    .map(LrWarmup::Steps)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LrWarmup, E> {
                Ok(LrWarmup::Steps(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<LrWarmup, E> {
                // The range is checked by validation, which can say what the user meant.
                Ok(LrWarmup::Fraction(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LrWarmup, E> {
                LrWarmup::parse(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// `optimizer_args`: a table (`[optimizer.optimizer_args]` with `weight_decay = 0.1`) or
/// sd-scripts' list of `"key=value"` strings (`["weight_decay=0.1", "betas=0.9,0.99"]`).
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerArgs {
    Table(BTreeMap<String, toml::Value>),
    List(Vec<String>),
}

impl Default for OptimizerArgs {
    fn default() -> Self {
        Self::Table(BTreeMap::new())
    }
}

impl OptimizerArgs {
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Table(t) => t.is_empty(),
            Self::List(l) => l.is_empty(),
        }
    }
}

impl Serialize for OptimizerArgs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Table(t) => t.serialize(s),
            Self::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for OptimizerArgs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OptimizerArgs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of optimizer arguments or a list of \"key=value\" strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<OptimizerArgs, A::Error> {
                BTreeMap::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(OptimizerArgs::Table)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<OptimizerArgs, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(OptimizerArgs::List)
            }
        }
        d.deserialize_any(V)
    }
}

/// Accepts the table form through the derived (unknown-key-rejecting) impl and sd-scripts'
/// list form by hand.
fn deserialize_network_args<'de, D: Deserializer<'de>>(d: D) -> Result<NetworkArgs, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = NetworkArgs;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table such as { conv_dim = 8, conv_alpha = 4 } or a list of \"key=value\" strings")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<NetworkArgs, A::Error> {
            NetworkArgs::deserialize(de::value::MapAccessDeserializer::new(map))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NetworkArgs, A::Error> {
            let mut args = NetworkArgs::default();
            while let Some(item) = seq.next_element::<String>()? {
                let Some((key, value)) = item.split_once('=') else {
                    return Err(de::Error::custom(format!(
                        "network_args item `{item}` is not of the form key=value"
                    )));
                };
                let (key, value) = (key.trim(), value.trim());
                let bad = |what: &str| {
                    de::Error::custom(format!("network_args `{key}={value}`: expected {what}"))
                };
                match key {
                    "conv_dim" => {
                        args.conv_dim =
                            Some(value.parse().map_err(|_| bad("a non-negative integer"))?)
                    }
                    "conv_alpha" => {
                        args.conv_alpha = Some(value.parse().map_err(|_| bad("a number"))?)
                    }
                    _ => {
                        return Err(de::Error::custom(format!(
                            "unknown network_args key `{key}` (known: {})",
                            NetworkArgs::KEYS.join(", ")
                        )))
                    }
                }
            }
            Ok(args)
        }
    }
    d.deserialize_any(V)
}
