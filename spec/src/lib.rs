//! loractl's job spec: a versioned TOML file whose keys are kohya-ss/sd-scripts' option names,
//! grouped in sections. This crate parses it (every unknown key reported with its path, line and
//! a suggestion), validates it in one place ([`JobSpec::validate`], every problem with a fix),
//! and resolves the effective values ([`JobSpec::resolved`]). It has no candle dependency so the
//! coordinator and the CLI can validate specs without the training engine.
//!
//! ```
//! let text = r#"
//! name = "zenny"
//! [model]
//! pretrained_model_name_or_path = "/models/chilloutmix_Ni.safetensors"
//! [dataset]
//! train_data_dir = "train"
//! resolution = "512"
//! [training]
//! max_train_epochs = 1
//! "#;
//! let spec = loractl_spec::JobSpec::from_toml_str(text, "job.toml").unwrap();
//! let resolved = spec.resolved().unwrap();
//! assert_eq!(resolved.unet_lr, Some(1e-4));
//! assert_eq!(spec.dataset.caption_extension, ".txt");
//! ```
//!
//! Deliberate departures from sd-scripts, each documented where it is decided:
//! `caption_extension` defaults to `.txt` (not `.caption`); `learning_rate` defaults to 1e-4
//! (not the fine-tuning 2e-6); `output_dir` defaults to `output`; `output_name` defaults to the
//! job name; a non-zero warmup with `lr_scheduler = "constant"` runs as
//! `constant_with_warmup` with a warning instead of failing; `resolution` must be a multiple
//! of 64; only `safetensors` output and the `ddim`/`euler`/`euler_a` samplers exist.
//!
//! What validation accepts, the trainer runs: options sd-scripts has but loractl does not
//! implement yet (optimizers other than the seven of [`OptimizerType::implemented`], `l1` and
//! `smooth_l1` losses, huber schedules other than `constant`, `color_aug`,
//! `network_dropout`) are refused with
//! a sentence saying so, `optimizer_args` names are checked against the chosen optimizer, and
//! every number has a range ([`limits`]).

mod error;
mod parse;
pub mod py;
mod resolve;
mod spec;
mod suggest;

/// The `toml` crate, whose `Value` appears in [`OptimizerArgs::Table`].
pub use toml;

pub use error::{Error, ParseError, ParseErrors, Result, SpecError, SpecErrors, SpecWarning};
pub use resolve::{
    limits, optimizer_arg_names, Buckets, ConvLora, Gpus, HuberSchedule, KohyaArgs, Loss, LossType,
    LrScheduler, MixedPrecision, OptimizerType, ResolvedDataset, ResolvedModel, ResolvedOutput,
    ResolvedResources, ResolvedSample, ResolvedSpec, ResolvedTraining, Sampler, SavePrecision,
    TrainLength, WarmupSpec,
};
pub use spec::{
    defaults, DatasetConfig, JobSpec, LoggingConfig, LrWarmup, ModelConfig, NetworkArgs,
    NetworkConfig, OptimizerArgs, OptimizerConfig, OutputConfig, Resolution, ResourcesConfig,
    SampleConfig, TrainingConfig, SPEC_VERSION,
};
