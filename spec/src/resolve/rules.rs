//! The rules of a job spec, section by section: each check reports its problems on the
//! [`Checker`] and returns the resolved values of its section.

use std::collections::BTreeMap;

use super::choices::{
    HuberSchedule, LossType, LrScheduler, MixedPrecision, OptimizerType, Sampler, SavePrecision,
};
use super::types::{
    Buckets, ConvLora, Gpus, KohyaArgs, Loss, ResolvedDataset, ResolvedModel, ResolvedOutput,
    ResolvedResources, ResolvedSample, ResolvedSpec, ResolvedTraining, TrainLength, WarmupSpec,
};
use super::Checker;
use crate::spec::{defaults, JobSpec, LrWarmup, OptimizerArgs, Resolution, SPEC_VERSION};
use crate::suggest::closest;

/// Upper bounds of numeric options. sd-scripts has none, so a typo (or `network_dim =
/// 4294967295`) used to pass validation and `plan` and abort in the trainer. Each bound is far
/// above any SD1.x/SD2.x LoRA job people run (the kohya_ss GUI's sliders, sd-scripts' examples)
/// and far below sizes that overflow the trainer's arithmetic.
pub mod limits {
    /// kohya_ss caps network_dim and conv_dim at 1024; a dim-1024 SD1.5 LoRA is already ~1.1 GB
    /// at fp16, where 128 is "large".
    pub const NETWORK_DIM: u64 = 1024;
    /// Alphas beyond the largest dim only scale the LoRA up; the GUI caps them at 1024 too.
    pub const NETWORK_ALPHA: f64 = 1024.0;
    /// SD1/SD2 train at 512 to 1024; 8192 per side (a 1024×1024 latent) is past any card.
    pub const RESOLUTION: u32 = 8192;
    /// Batches are per device; a few hundred SD images already need hundreds of GiB.
    pub const BATCH_SIZE: u64 = 256;
    pub const GRADIENT_ACCUMULATION_STEPS: u64 = 1024;
    /// Ten million steps is years of SD1.5 training at 1 step/s.
    pub const STEPS: u64 = 10_000_000;
    pub const EPOCHS: u64 = 100_000;
    /// Tags kept in front when shuffling; a 225-token caption has at most 225.
    pub const KEEP_TOKENS: u64 = 225;
    /// D-Adaptation and Prodigy use ~1.0, other optimizers 1e-6..1e-3: anything above is a typo.
    pub const LEARNING_RATE: f64 = 100.0;
    pub const LR_SCHEDULER_NUM_CYCLES: u64 = 10_000;
    pub const LR_SCHEDULER_POWER: f64 = 100.0;
    /// Clipping at 1000 is no clipping already (0 turns it off).
    pub const MAX_GRAD_NORM: f64 = 1000.0;
    /// kohya recommends ~0.1; an offset of 1 is already as large as the noise itself.
    pub const NOISE_OFFSET: f64 = 1.0;
    /// The min-SNR paper uses 5; 1000 is larger than every SNR of the first timesteps' range.
    pub const MIN_SNR_GAMMA: f64 = 1000.0;
    /// sd-scripts' default is 0.1; from about 1 on, huber is l2 for every normal residual.
    pub const HUBER_C: f64 = 10.0;
    pub const PRIOR_LOSS_WEIGHT: f64 = 100.0;
    pub const MAX_RESTARTS: u64 = 100;
    /// Data-parallel ranks across machines: far beyond any LoRA job, small enough that a typo
    /// cannot reserve a whole cluster.
    pub const MAX_WORKERS: u64 = 64;
    /// CPU ranks sharing one machine's cores: beyond a few, each gets too few cores to help.
    pub const MAX_RANKS_PER_WORKER: u64 = 64;
    /// File names are at most 255 bytes; the longest name loractl derives from output_name
    /// adds `-step00000000-state.safetensors` (31 bytes).
    pub const NAME_BYTES: usize = 200;
}

impl Checker {
    pub(super) fn check(&mut self, spec: &JobSpec) -> Option<ResolvedSpec> {
        if spec.version != SPEC_VERSION {
            self.err(
                "version",
                format!("unsupported job spec version {}", spec.version),
                format!("this loractl reads version {SPEC_VERSION}"),
            );
        }
        self.file_stem("name", &spec.name);

        let max_token_length = self.check_model(spec);
        let (resolution, buckets, cache_latents) = self.check_dataset(spec);
        let (network_alpha, conv) = self.check_network(spec);
        let length = self.check_length(spec);
        let opt = self.check_optimizer(spec, length);
        self.check_caching_vs_text_encoder(spec);
        let training = self.check_training(spec);
        let (output_name, save_precision) = self.check_output(spec);
        let sampler = self.check_sample(spec);
        let gpus = self.check_resources(spec);

        let opt = opt?;
        let training = training?;
        let (m, d, n, o, t, out, smp, r) = (
            &spec.model,
            &spec.dataset,
            &spec.network,
            &spec.optimizer,
            &spec.training,
            &spec.output,
            &spec.sample,
            &spec.resources,
        );
        Some(ResolvedSpec {
            name: spec.name.clone(),
            output_name,
            model: ResolvedModel {
                pretrained_model_name_or_path: m.pretrained_model_name_or_path.clone(),
                v2: m.v2,
                v_parameterization: m.v_parameterization,
                vae: m.vae.clone(),
                clip_skip: m.clip_skip,
            },
            dataset: ResolvedDataset {
                train_data_dir: d.train_data_dir.clone(),
                reg_data_dir: d.reg_data_dir.clone(),
                caption_extension: d.caption_extension.clone(),
                shuffle_caption: d.shuffle_caption,
                caption_separator: d.caption_separator.clone(),
                keep_tokens: d.keep_tokens,
                caption_prefix: d.caption_prefix.clone(),
                caption_suffix: d.caption_suffix.clone(),
                caption_dropout_rate: d.caption_dropout_rate,
                caption_dropout_every_n_epochs: d.caption_dropout_every_n_epochs,
                caption_tag_dropout_rate: d.caption_tag_dropout_rate,
                random_crop: d.random_crop,
                flip_aug: d.flip_aug,
                cache_latents_to_disk: d.cache_latents_to_disk,
                prior_loss_weight: d.prior_loss_weight,
            },
            resolution,
            buckets,
            cache_latents,
            max_token_length,
            network_dim: n.network_dim,
            network_alpha,
            conv,
            network_weights: n.network_weights.clone(),
            unet_lr: opt.unet_lr,
            text_encoder_lr: opt.text_encoder_lr,
            optimizer: opt.optimizer,
            optimizer_args: opt.args,
            lr_scheduler: opt.scheduler,
            warmup: opt.warmup,
            lr_scheduler_num_cycles: o.lr_scheduler_num_cycles,
            lr_scheduler_power: o.lr_scheduler_power,
            max_grad_norm: o.max_grad_norm,
            length,
            training: ResolvedTraining {
                train_batch_size: t.train_batch_size,
                gradient_accumulation_steps: t.gradient_accumulation_steps,
                seed: t.seed,
                noise_offset: t.noise_offset,
                min_snr_gamma: t.min_snr_gamma,
                gradient_checkpointing: t.gradient_checkpointing,
            },
            mixed_precision: training.mixed_precision,
            save_precision: save_precision?,
            loss: training.loss,
            timesteps: training.timesteps,
            output: ResolvedOutput {
                output_dir: out.output_dir.clone(),
                save_every_n_epochs: out.save_every_n_epochs,
                save_every_n_steps: out.save_every_n_steps,
                save_last_n_epochs: out.save_last_n_epochs,
                save_state: out.save_state,
                resume: out.resume.clone(),
                training_comment: out.training_comment.clone(),
                no_metadata: out.no_metadata,
            },
            sample: ResolvedSample {
                sample_prompts: smp.sample_prompts.clone(),
                sample_every_n_epochs: smp.sample_every_n_epochs,
                sample_every_n_steps: smp.sample_every_n_steps,
            },
            sampler: sampler?,
            logging_dir: spec.logging.logging_dir.clone(),
            gpus: gpus?,
            resources: ResolvedResources {
                workers: r.workers,
                ranks_per_worker: r.ranks_per_worker,
                max_restarts: r.max_restarts,
            },
            kohya_args: KohyaArgs {
                learning_rate: o.learning_rate,
                unet_lr: o.unet_lr,
                text_encoder_lr: o.text_encoder_lr,
                max_token_length: m.max_token_length,
                network_dropout: n.network_dropout,
                loss_type: training.loss_type,
                huber_schedule: training.huber_schedule,
                huber_c: t.huber_c,
                min_timestep: t.min_timestep,
                max_timestep: t.max_timestep,
            },
            warnings: Vec::new(),
        })
    }

    fn check_model(&mut self, spec: &JobSpec) -> u32 {
        let m = &spec.model;
        if m.pretrained_model_name_or_path.as_os_str().is_empty() {
            self.err(
                "model.pretrained_model_name_or_path",
                "is empty",
                "give a .safetensors/.ckpt checkpoint file or a diffusers folder",
            );
        }
        if m.v_parameterization && !m.v2 {
            self.warn(
                "model.v_parameterization",
                "v-prediction without v2: only SD2 768-v checkpoints are trained with v_parameterization",
            );
        }
        if let Some(skip) = m.clip_skip {
            // SD1's CLIP has 12 layers; SD2's OpenCLIP text tower as loaded has 23.
            let layers = if m.v2 { 23 } else { 12 };
            if skip == 0 || skip > layers {
                self.err(
                    "model.clip_skip",
                    format!("must be between 1 and {layers} (1 = last layer), got {skip}"),
                    "use 1 for SD1 bases, 2 for anime/NovelAI-style bases, or remove it",
                );
            } else if m.v2 {
                self.warn(
                    "model.clip_skip",
                    "SD2 already uses the penultimate layer; clip_skip with v2 is unusual (sd-scripts warns too)",
                );
            }
        }
        match m.max_token_length {
            None => defaults::MAX_TOKEN_LENGTH,
            Some(n @ (75 | 150 | 225)) => n,
            Some(n) => {
                self.err(
                    "model.max_token_length",
                    format!("must be 75, 150 or 225, got {n}"),
                    "use 225 for long captions or remove it for 75",
                );
                defaults::MAX_TOKEN_LENGTH
            }
        }
    }

    fn check_dataset(&mut self, spec: &JobSpec) -> (Resolution, Option<Buckets>, bool) {
        let d = &spec.dataset;
        if d.train_data_dir.as_os_str().is_empty() {
            self.err(
                "dataset.train_data_dir",
                "is empty",
                "give the parent of folders like `30_zenny` (repeats_name)",
            );
        }
        if !d.caption_extension.starts_with('.') {
            self.err(
                "dataset.caption_extension",
                format!(
                    "`{}` does not start with a dot, so caption files would never be found",
                    d.caption_extension
                ),
                format!("use \".{}\"", d.caption_extension.trim_start_matches('.')),
            );
        }
        if d.caption_extension.contains(['/', '\\'])
            || d.caption_extension.chars().any(char::is_control)
        {
            self.err(
                "dataset.caption_extension",
                format!(
                    "{:?} must not contain path separators or control characters: it is appended to each image's name",
                    d.caption_extension
                ),
                "use \".txt\" or \".caption\"",
            );
        }
        if d.caption_separator.is_empty() {
            self.err("dataset.caption_separator", "is empty", "use \",\"");
        }
        self.at_most_u(
            "dataset.keep_tokens",
            d.keep_tokens.into(),
            0,
            limits::KEEP_TOKENS,
            "use the number of leading tags to keep in place, e.g. 1",
        );
        self.at_most_u(
            "dataset.caption_dropout_every_n_epochs",
            d.caption_dropout_every_n_epochs.into(),
            0,
            limits::EPOCHS,
            "use e.g. 3, or 0 for never",
        );
        self.rate("dataset.caption_dropout_rate", d.caption_dropout_rate);
        self.rate(
            "dataset.caption_tag_dropout_rate",
            d.caption_tag_dropout_rate,
        );
        let fix = "use 1.0 (regularisation images weigh as much as training images)";
        if self.non_negative("dataset.prior_loss_weight", d.prior_loss_weight, fix) {
            self.at_most(
                "dataset.prior_loss_weight",
                d.prior_loss_weight,
                limits::PRIOR_LOSS_WEIGHT,
                fix,
            );
        }
        self.nonzero(
            "dataset.vae_batch_size",
            d.vae_batch_size.into(),
            "use 1 or more",
        );
        self.at_most_u(
            "dataset.vae_batch_size",
            d.vae_batch_size.into(),
            1,
            limits::BATCH_SIZE,
            "use 1 to 8",
        );

        let res = d.resolution;
        for (side, value) in [("width", res.width), ("height", res.height)] {
            if value > limits::RESOLUTION {
                self.err(
                    "dataset.resolution",
                    format!(
                        "{side} {value} is out of range: it must be between 64 and {} (a multiple of 64)",
                        limits::RESOLUTION
                    ),
                    "SD1 trains at 512, SD2-768-v at 768",
                );
            } else if value < 64 || value % 64 != 0 {
                let down = value / 64 * 64;
                let fix = if down == 0 {
                    "use at least 64; SD1 trains at 512, SD2-768-v at 768".to_owned()
                } else if let Some(up) = down.checked_add(64) {
                    format!("use {down} or {up}")
                } else {
                    format!("use {down}")
                };
                self.err(
                    "dataset.resolution",
                    format!("{side} {value} is not a multiple of 64 (the UNet halves the 1/8-size latent three times)"),
                    fix,
                );
            }
        }

        let buckets = if d.enable_bucket {
            self.check_buckets(spec)
        } else {
            if d.bucket_no_upscale {
                self.warn(
                    "dataset.bucket_no_upscale",
                    "has no effect without enable_bucket = true",
                );
            }
            None
        };

        if d.color_aug {
            self.err(
                "dataset.color_aug",
                "is not implemented yet: images would be trained without colour augmentation",
                "set color_aug = false (or remove it)",
            );
        }
        let cache_latents = d.cache_latents || d.cache_latents_to_disk;
        if d.cache_latents_to_disk && !d.cache_latents {
            self.warn(
                "dataset.cache_latents_to_disk",
                "implies cache_latents = true",
            );
        }
        if cache_latents {
            let key = if d.cache_latents {
                "cache_latents"
            } else {
                "cache_latents_to_disk"
            };
            for (name, on) in [("random_crop", d.random_crop)] {
                if on {
                    self.err(
                        &format!("dataset.{name}"),
                        format!("changes the image every epoch, so it cannot be used with dataset.{key}: cached latents are computed once"),
                        format!("set {name} = false, or set cache_latents and cache_latents_to_disk to false"),
                    );
                }
            }
        }
        (res, buckets, cache_latents)
    }

    fn check_buckets(&mut self, spec: &JobSpec) -> Option<Buckets> {
        let d = &spec.dataset;
        let steps = d.bucket_reso_steps;
        let mut in_range = true;
        for (key, value) in [
            ("dataset.min_bucket_reso", d.min_bucket_reso),
            ("dataset.max_bucket_reso", d.max_bucket_reso),
            ("dataset.bucket_reso_steps", steps),
        ] {
            in_range &= self.at_most_u(
                key,
                value.into(),
                0,
                limits::RESOLUTION.into(),
                "SD1/SD2 buckets lie between 256 and 1024 in steps of 64",
            );
        }
        if !in_range {
            return None;
        }
        if steps == 0 || !steps.is_multiple_of(64) {
            self.err(
                "dataset.bucket_reso_steps",
                format!("{steps} is not a multiple of 64 (SD1/SD2 latents must halve three times)"),
                "use 64 (or 128)",
            );
            return None;
        }
        // sd-scripts rounds min down and max up to the step with a warning; so do we.
        let min = d.min_bucket_reso - d.min_bucket_reso % steps;
        let max = d.max_bucket_reso.div_ceil(steps).saturating_mul(steps);
        if min != d.min_bucket_reso {
            self.warn(
                "dataset.min_bucket_reso",
                format!(
                    "{} rounded down to {min}, a multiple of bucket_reso_steps",
                    d.min_bucket_reso
                ),
            );
        }
        if max != d.max_bucket_reso {
            self.warn(
                "dataset.max_bucket_reso",
                format!(
                    "{} rounded up to {max}, a multiple of bucket_reso_steps",
                    d.max_bucket_reso
                ),
            );
        }
        let mut ok = true;
        if min == 0 {
            ok = false;
            self.err(
                "dataset.min_bucket_reso",
                format!(
                    "{} is smaller than bucket_reso_steps ({steps})",
                    d.min_bucket_reso
                ),
                format!(
                    "use {steps} or more (the default is {})",
                    defaults::MIN_BUCKET_RESO
                ),
            );
        }
        if min > max {
            ok = false;
            self.err(
                "dataset.min_bucket_reso",
                format!("{min} is larger than max_bucket_reso ({max})"),
                "swap them or lower min_bucket_reso",
            );
        }
        let res = d.resolution;
        let (small, large) = (res.width.min(res.height), res.width.max(res.height));
        if small < min {
            ok = false;
            self.err(
                "dataset.min_bucket_reso",
                format!("{min} is larger than the resolution's smaller side ({small})"),
                format!("set min_bucket_reso <= {small} or raise the resolution"),
            );
        }
        if large > max {
            ok = false;
            self.err(
                "dataset.max_bucket_reso",
                format!("{max} is smaller than the resolution's larger side ({large})"),
                format!("set max_bucket_reso >= {large} or lower the resolution"),
            );
        }
        ok.then_some(Buckets {
            min_reso: min,
            max_reso: max,
            reso_steps: steps,
            no_upscale: d.bucket_no_upscale,
        })
    }

    fn check_network(&mut self, spec: &JobSpec) -> (f64, Option<ConvLora>) {
        let n = &spec.network;
        if n.network_module != defaults::NETWORK_MODULE {
            self.err(
                "network.network_module",
                format!("`{}` is not supported", n.network_module),
                format!("use \"{}\" (or remove the key)", defaults::NETWORK_MODULE),
            );
        }
        self.nonzero(
            "network.network_dim",
            n.network_dim.into(),
            "use e.g. 32, 64 or 128",
        );
        self.at_most_u(
            "network.network_dim",
            n.network_dim.into(),
            1,
            limits::NETWORK_DIM,
            "use e.g. 32, 64 or 128",
        );
        let mut alpha = n.network_alpha;
        let alpha_fix = "use e.g. half of network_dim, or network_dim for no scaling";
        if self.non_negative("network.network_alpha", n.network_alpha, alpha_fix)
            && self.at_most(
                "network.network_alpha",
                n.network_alpha,
                limits::NETWORK_ALPHA,
                alpha_fix,
            )
            && alpha == 0.0
        {
            self.warn(
                "network.network_alpha",
                "0 means alpha = network_dim (no scaling), as in sd-scripts",
            );
            alpha = n.network_dim as f64;
        }
        if let Some(p) = n.network_dropout.filter(|&p| p != 0.0) {
            self.err(
                "network.network_dropout",
                format!("{p}: LoRA dropout is not implemented yet"),
                "remove network_dropout (or set it to 0)",
            );
        }
        if n.network_weights
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            self.err(
                "network.network_weights",
                "is empty",
                "give a LoRA .safetensors file or remove the key",
            );
        }
        if n.network_train_unet_only && n.network_train_text_encoder_only {
            self.err(
                "network.network_train_text_encoder_only",
                "cannot be combined with network.network_train_unet_only: nothing would be trained",
                "keep at most one of them",
            );
        }
        let args = &n.network_args;
        let conv = match (args.conv_dim, args.conv_alpha) {
            (None, None) => None,
            (None, Some(_)) => {
                self.err(
                    "network.network_args.conv_alpha",
                    "has no effect without conv_dim",
                    "set conv_dim too, or remove conv_alpha",
                );
                None
            }
            (Some(0), _) => {
                self.err(
                    "network.network_args.conv_dim",
                    "must be at least 1, got 0",
                    "use e.g. 8, or remove conv_dim to leave 3x3 convolutions alone",
                );
                None
            }
            (Some(dim), alpha) => {
                let alpha = alpha.unwrap_or(defaults::CONV_ALPHA);
                let dim_ok = self.at_most_u(
                    "network.network_args.conv_dim",
                    dim.into(),
                    1,
                    limits::NETWORK_DIM,
                    "use e.g. 8 or 16",
                );
                let fix = "use e.g. half of conv_dim";
                if self.non_negative("network.network_args.conv_alpha", alpha, fix)
                    && self.at_most(
                        "network.network_args.conv_alpha",
                        alpha,
                        limits::NETWORK_ALPHA,
                        fix,
                    )
                    && dim_ok
                {
                    let alpha = if alpha == 0.0 { dim as f64 } else { alpha };
                    Some(ConvLora { dim, alpha })
                } else {
                    None
                }
            }
        };
        (alpha, conv)
    }

    fn check_length(&mut self, spec: &JobSpec) -> TrainLength {
        let t = &spec.training;
        match (t.max_train_steps, t.max_train_epochs) {
            (None, None) => {
                self.warn(
                    "training.max_train_steps",
                    format!(
                        "neither max_train_steps nor max_train_epochs is set: training runs {} steps (sd-scripts' default)",
                        defaults::MAX_TRAIN_STEPS
                    ),
                );
                TrainLength::Steps(defaults::MAX_TRAIN_STEPS)
            }
            (Some(steps), None) => {
                self.nonzero(
                    "training.max_train_steps",
                    steps,
                    "use 1 or more, or set max_train_epochs",
                );
                self.at_most_u(
                    "training.max_train_steps",
                    steps,
                    1,
                    limits::STEPS,
                    "use e.g. 1600, or set max_train_epochs",
                );
                TrainLength::Steps(steps)
            }
            (steps, Some(epochs)) => {
                self.nonzero(
                    "training.max_train_epochs",
                    epochs.into(),
                    "use 1 or more, or set max_train_steps",
                );
                self.at_most_u(
                    "training.max_train_epochs",
                    epochs.into(),
                    1,
                    limits::EPOCHS,
                    "use e.g. 10, or set max_train_steps",
                );
                if steps.is_some() {
                    self.warn(
                        "training.max_train_steps",
                        "ignored because max_train_epochs is set (as in sd-scripts)",
                    );
                }
                TrainLength::Epochs(epochs)
            }
        }
    }

    fn check_optimizer(&mut self, spec: &JobSpec, length: TrainLength) -> Option<OptimizerChoice> {
        let o = &spec.optimizer;
        let n = &spec.network;
        let optimizer = if o.optimizer_type.contains('.') {
            self.err(
                "optimizer.optimizer_type",
                format!(
                    "`{}` looks like a Python class path, which loractl cannot load",
                    o.optimizer_type
                ),
                "use one of sd-scripts' optimizer names, e.g. AdamW8bit, Lion, Prodigy",
            );
            None
        } else {
            self.choice(
                "optimizer.optimizer_type",
                &o.optimizer_type,
                OptimizerType::parse,
                OptimizerType::names(),
            )
        };
        let optimizer = optimizer.and_then(|opt| {
            if opt.is_implemented() {
                return Some(opt);
            }
            let fix = match opt {
                OptimizerType::DAdaptation => {
                    "use DAdaptAdam (its successor) or Prodigy".to_owned()
                }
                _ => format!(
                    "use one of: {}",
                    implemented_names().collect::<Vec<_>>().join(", ")
                ),
            };
            self.err(
                "optimizer.optimizer_type",
                format!("`{opt}` is an sd-scripts optimizer that loractl does not implement yet"),
                fix,
            );
            None
        });
        let args = self.optimizer_args(&o.optimizer_args);
        if let (Some(opt), Some(args)) = (optimizer, &args) {
            self.optimizer_arg_names(opt, args);
        }

        let lr_fix = "use e.g. 1e-4 (AdamW) or 1.0 (DAdaptAdam, Prodigy)";
        let mut lrs_ok = true;
        for (key, lr) in [
            ("optimizer.learning_rate", Some(o.learning_rate)),
            ("optimizer.unet_lr", o.unet_lr),
            ("optimizer.text_encoder_lr", o.text_encoder_lr),
        ] {
            if let Some(lr) = lr {
                lrs_ok &= self.non_negative(key, lr, lr_fix)
                    && self.at_most(key, lr, limits::LEARNING_RATE, lr_fix);
            }
        }
        // sd-scripts: a group's lr defaults to learning_rate; a group with lr 0 is dropped.
        let unet_lr = o.unet_lr.unwrap_or(o.learning_rate);
        let te_lr = o.text_encoder_lr.unwrap_or(o.learning_rate);
        let unet = (!n.network_train_text_encoder_only && unet_lr != 0.0).then_some(unet_lr);
        let te = (!n.network_train_unet_only && te_lr != 0.0).then_some(te_lr);
        if lrs_ok
            && unet.is_none()
            && te.is_none()
            && !(n.network_train_unet_only && n.network_train_text_encoder_only)
        {
            let (path, fix) = if n.network_train_unet_only {
                (
                    "optimizer.unet_lr",
                    "give the U-Net a learning rate above 0",
                )
            } else if n.network_train_text_encoder_only {
                (
                    "optimizer.text_encoder_lr",
                    "give the text encoder a learning rate above 0",
                )
            } else if o.unet_lr.is_some() || o.text_encoder_lr.is_some() {
                (
                    "optimizer.unet_lr",
                    "give unet_lr or text_encoder_lr a value above 0",
                )
            } else {
                ("optimizer.learning_rate", "use a learning rate above 0")
            };
            self.err(
                path,
                "every LoRA group has learning rate 0, so nothing would be trained",
                fix,
            );
        }
        if let Some(opt) = optimizer.filter(|o| o.is_adaptive()) {
            if let Some(lr) = [unet, te].into_iter().flatten().find(|&lr| lr <= 0.1) {
                self.warn(
                    "optimizer.learning_rate",
                    format!("{opt} adapts the step size itself and expects learning rates around 1.0; {lr} will train very slowly"),
                );
            }
        }

        let scheduler = self.choice(
            "optimizer.lr_scheduler",
            &o.lr_scheduler,
            LrScheduler::parse,
            LrScheduler::names(),
        );
        let warmup = self.warmup(o.lr_warmup_steps, length);
        // sd-scripts raises "constant does not require num_warmup_steps"; we accept it and do
        // what the user evidently wants.
        let scheduler = match scheduler {
            Some(LrScheduler::Constant) if !o.lr_warmup_steps.is_zero() => {
                self.warn(
                    "optimizer.lr_scheduler",
                    format!(
                        "\"constant\" with lr_warmup_steps = {} runs as \"constant_with_warmup\" (sd-scripts rejects this combination)",
                        o.lr_warmup_steps
                    ),
                );
                Some(LrScheduler::ConstantWithWarmup)
            }
            s => s,
        };
        if let Some(opt) = optimizer.filter(|o| o.is_schedule_free()) {
            if scheduler != Some(LrScheduler::Constant) {
                self.warn(
                    "optimizer.lr_scheduler",
                    format!("{opt} is schedule-free: lr_scheduler and lr_warmup_steps are ignored"),
                );
            }
        }
        self.nonzero(
            "optimizer.lr_scheduler_num_cycles",
            o.lr_scheduler_num_cycles.into(),
            "use 1 or more",
        );
        self.at_most_u(
            "optimizer.lr_scheduler_num_cycles",
            o.lr_scheduler_num_cycles.into(),
            1,
            limits::LR_SCHEDULER_NUM_CYCLES,
            "use 1 or a few",
        );
        let fix = "use 1.0 for a linear decay";
        if self.positive("optimizer.lr_scheduler_power", o.lr_scheduler_power, fix) {
            self.at_most(
                "optimizer.lr_scheduler_power",
                o.lr_scheduler_power,
                limits::LR_SCHEDULER_POWER,
                fix,
            );
        }
        let fix = "use 1.0, or 0 to turn clipping off";
        if self.non_negative("optimizer.max_grad_norm", o.max_grad_norm, fix) {
            self.at_most(
                "optimizer.max_grad_norm",
                o.max_grad_norm,
                limits::MAX_GRAD_NORM,
                fix,
            );
        }

        Some(OptimizerChoice {
            optimizer: optimizer?,
            args: args?,
            unet_lr: unet,
            text_encoder_lr: te,
            scheduler: scheduler?,
            warmup: warmup?,
        })
    }

    fn warmup(&mut self, warmup: LrWarmup, length: TrainLength) -> Option<WarmupSpec> {
        let path = "optimizer.lr_warmup_steps";
        match warmup {
            LrWarmup::Steps(n) => {
                if !self.at_most_u(
                    path,
                    n,
                    0,
                    limits::STEPS,
                    "use a step count, a fraction below 1 or a percentage such as \"5%\"",
                ) {
                    return None;
                }
                if let TrainLength::Steps(total) = length {
                    if n > total {
                        self.warn(path, format!("{n} warmup steps exceed the {total} training steps: the full learning rate is never reached"));
                    }
                }
                Some(WarmupSpec::Steps(n))
            }
            LrWarmup::Fraction(f) if (0.0..=1.0).contains(&f) => Some(WarmupSpec::Fraction(f)),
            LrWarmup::Fraction(f) => {
                let fix = if f >= 1.0 && f.fract() == 0.0 {
                    format!(
                        "write {} without the decimal point for a number of steps",
                        f as u64
                    )
                } else {
                    "use an integer number of steps, a fraction below 1, or a percentage such as \"5%\"".to_owned()
                };
                self.err(
                    path,
                    format!("{f} is neither a step count nor a fraction of the steps"),
                    fix,
                );
                None
            }
            LrWarmup::Percent(p) if (0.0..=100.0).contains(&p) => {
                Some(WarmupSpec::Fraction(p / 100.0))
            }
            LrWarmup::Percent(p) => {
                self.err(
                    path,
                    format!("{p}% is not between 0% and 100%"),
                    "use e.g. \"5%\"",
                );
                None
            }
        }
    }

    fn optimizer_args(&mut self, args: &OptimizerArgs) -> Option<BTreeMap<String, String>> {
        let base = "optimizer.optimizer_args";
        let mut out = BTreeMap::new();
        let mut ok = true;
        match args {
            OptimizerArgs::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    // sd-scripts: `key, value = arg.split("=")`, so exactly one `=`.
                    let mut parts = item.split('=');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(key), Some(value), None)
                            if !key.trim().is_empty() && !value.trim().is_empty() =>
                        {
                            let key = key.trim().to_owned();
                            if out.insert(key.clone(), value.trim().to_owned()).is_some() {
                                ok = false;
                                self.err(
                                    &format!("{base}[{i}]"),
                                    format!("`{key}` is given twice"),
                                    "keep one",
                                );
                            }
                        }
                        _ => {
                            ok = false;
                            self.err(
                                &format!("{base}[{i}]"),
                                format!("`{item}` is not of the form key=value"),
                                "write e.g. \"weight_decay=0.01\" or \"betas=0.9,0.999\"",
                            );
                        }
                    }
                }
            }
            OptimizerArgs::Table(table) => {
                for (key, value) in table {
                    match crate::py::literal(value) {
                        Some(text) => {
                            out.insert(key.clone(), text);
                        }
                        None => {
                            ok = false;
                            self.err(
                                &format!("{base}.{key}"),
                                format!("a {} cannot be passed to an optimizer", value.type_str()),
                                "use a number, string, boolean or array of numbers",
                            );
                        }
                    }
                }
            }
        }
        ok.then_some(out)
    }

    /// Every `optimizer_args` name must be an argument of the chosen optimizer.
    fn optimizer_arg_names(&mut self, opt: OptimizerType, args: &BTreeMap<String, String>) {
        let known = opt.arg_names().unwrap_or(&[]);
        for key in args.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            let list = known.join(", ");
            let fix = match closest(key, known.iter().copied()) {
                Some(name) => format!("did you mean `{name}`? {opt} takes: {list}"),
                None => format!("{opt} takes: {list}"),
            };
            self.err(
                &format!("optimizer.optimizer_args.{key}"),
                format!("`{key}` is not an argument of {opt}"),
                fix,
            );
        }
    }

    /// cache_text_encoder_outputs freezes one embedding per caption, so it needs a frozen
    /// text encoder and captions that never change (sd-scripts' SDXL rules).
    fn check_caching_vs_text_encoder(&mut self, spec: &JobSpec) {
        let d = &spec.dataset;
        if !d.cache_text_encoder_outputs {
            return;
        }
        let o = &spec.optimizer;
        let te_trained = !spec.network.network_train_unet_only
            && o.text_encoder_lr.unwrap_or(o.learning_rate) != 0.0;
        if te_trained {
            self.err(
                "dataset.cache_text_encoder_outputs",
                "the text encoder LoRA is trained, so its outputs change every step and cannot be cached",
                "set network.network_train_unet_only = true, or remove cache_text_encoder_outputs",
            );
        }
        let varying = [
            ("shuffle_caption", d.shuffle_caption),
            ("caption_dropout_rate", d.caption_dropout_rate != 0.0),
            (
                "caption_tag_dropout_rate",
                d.caption_tag_dropout_rate != 0.0,
            ),
            (
                "caption_dropout_every_n_epochs",
                d.caption_dropout_every_n_epochs != 0,
            ),
        ];
        for (name, on) in varying {
            if on {
                self.err(
                    &format!("dataset.{name}"),
                    "changes captions during training, so it cannot be used with dataset.cache_text_encoder_outputs",
                    format!("turn {name} off, or remove cache_text_encoder_outputs"),
                );
            }
        }
    }

    fn check_training(&mut self, spec: &JobSpec) -> Option<TrainingChoice> {
        let t = &spec.training;
        self.nonzero(
            "training.train_batch_size",
            t.train_batch_size.into(),
            "use 1 or more",
        );
        self.at_most_u(
            "training.train_batch_size",
            t.train_batch_size.into(),
            1,
            limits::BATCH_SIZE,
            "use 1 to 8 per GPU, and gradient_accumulation_steps for larger effective batches",
        );
        self.nonzero(
            "training.gradient_accumulation_steps",
            t.gradient_accumulation_steps.into(),
            "use 1 for no accumulation",
        );
        self.at_most_u(
            "training.gradient_accumulation_steps",
            t.gradient_accumulation_steps.into(),
            1,
            limits::GRADIENT_ACCUMULATION_STEPS,
            "use 1 for no accumulation, or a few",
        );
        let precision = self.choice(
            "training.mixed_precision",
            &t.mixed_precision,
            MixedPrecision::parse,
            MixedPrecision::names(),
        );
        // bf16 and fp16 train the frozen models in half precision (fp16 with loss scaling).
        if let Some(x) = t.noise_offset {
            let fix = "use about 0.1, or remove it";
            if self.non_negative("training.noise_offset", x, fix) {
                self.at_most("training.noise_offset", x, limits::NOISE_OFFSET, fix);
            }
        }
        if let Some(g) = t.min_snr_gamma {
            let fix = "use 5 (the paper's value), or remove it";
            if self.positive("training.min_snr_gamma", g, fix) {
                self.at_most("training.min_snr_gamma", g, limits::MIN_SNR_GAMMA, fix);
            }
        }
        let min = t.min_timestep.unwrap_or(0);
        let max = t.max_timestep.unwrap_or(1000);
        let mut timesteps_ok = true;
        if min > 999 {
            timesteps_ok = false;
            self.err(
                "training.min_timestep",
                format!("must be between 0 and 999, got {min}"),
                "use 0",
            );
        }
        if max == 0 || max > 1000 {
            timesteps_ok = false;
            self.err(
                "training.max_timestep",
                format!("must be between 1 and 1000, got {max}"),
                "use 1000",
            );
        }
        if timesteps_ok && min >= max {
            timesteps_ok = false;
            self.err(
                "training.min_timestep",
                format!(
                    "{min} is not below max_timestep ({max}): timesteps are drawn from min..max"
                ),
                "lower min_timestep or raise max_timestep",
            );
        }
        let loss_type = self.choice(
            "training.loss_type",
            &t.loss_type,
            LossType::parse,
            LossType::names(),
        );
        let schedule = self.choice(
            "training.huber_schedule",
            &t.huber_schedule,
            HuberSchedule::parse,
            HuberSchedule::names(),
        );
        let c_ok = self.positive("training.huber_c", t.huber_c, "use 0.1")
            && self.at_most("training.huber_c", t.huber_c, limits::HUBER_C, "use 0.1");
        // The trainer implements the l2 loss and huber with a constant c; the other losses and
        // schedules of sd-scripts are refused here until they are implemented.
        let loss = match loss_type? {
            LossType::L2 => Loss::L2,
            LossType::Huber => {
                let schedule = schedule?;
                if schedule != HuberSchedule::Constant {
                    self.err(
                        "training.huber_schedule",
                        format!("`{schedule}` is not implemented yet for the huber loss (only `constant` is)"),
                        "set huber_schedule = \"constant\" (the default, `snr`, is not available yet)",
                    );
                    return None;
                }
                Loss::Huber {
                    c: c_ok.then_some(t.huber_c)?,
                    schedule,
                }
            }
            other @ (LossType::L1 | LossType::SmoothL1) => {
                self.err(
                    "training.loss_type",
                    format!("`{other}` is not implemented yet"),
                    "use \"l2\" (the default), or \"huber\" with huber_schedule = \"constant\"",
                );
                return None;
            }
        };
        Some(TrainingChoice {
            mixed_precision: precision?,
            loss,
            timesteps: timesteps_ok.then_some(min..max)?,
            loss_type: loss_type?,
            huber_schedule: schedule?,
        })
    }

    fn check_output(&mut self, spec: &JobSpec) -> (String, Option<Option<SavePrecision>>) {
        let o = &spec.output;
        if o.output_dir.as_os_str().is_empty() {
            self.err(
                "output.output_dir",
                "is empty",
                format!("use \"{}\" or remove the key", defaults::OUTPUT_DIR),
            );
        }
        let name = match &o.output_name {
            Some(name) => {
                self.file_stem("output.output_name", name);
                name.clone()
            }
            None => spec.name.clone(),
        };
        if o.save_model_as != defaults::SAVE_MODEL_AS {
            self.err(
                "output.save_model_as",
                format!(
                    "`{}` is not supported: loractl writes LoRA files as safetensors only",
                    o.save_model_as
                ),
                "use \"safetensors\" (or remove the key)",
            );
        }
        let precision = match &o.save_precision {
            None => Some(None),
            Some(p) => self
                .choice(
                    "output.save_precision",
                    p,
                    SavePrecision::parse,
                    SavePrecision::names(),
                )
                .map(Some),
        };
        if let Some(n) = o.save_every_n_epochs {
            self.interval(
                "output.save_every_n_epochs",
                n.into(),
                limits::EPOCHS,
                "use 1 to save after every epoch",
            );
        }
        if let Some(n) = o.save_every_n_steps {
            self.interval(
                "output.save_every_n_steps",
                n,
                limits::STEPS,
                "use e.g. 500, or remove the key",
            );
        }
        if let Some(n) = o.save_last_n_epochs {
            self.interval(
                "output.save_last_n_epochs",
                n.into(),
                limits::EPOCHS,
                "use 1 or more, or remove the key",
            );
            if o.save_every_n_epochs.is_none() {
                self.err(
                    "output.save_last_n_epochs",
                    "only prunes files written by save_every_n_epochs, which is not set",
                    "set save_every_n_epochs too, or remove save_last_n_epochs",
                );
            }
        }
        if o.resume.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            self.err(
                "output.resume",
                "is empty",
                "give a `-state` folder written by save_state, or remove the key",
            );
        }
        (name, precision)
    }

    fn check_sample(&mut self, spec: &JobSpec) -> Option<Sampler> {
        let s = &spec.sample;
        let sampler = self.choice(
            "sample.sample_sampler",
            &s.sample_sampler,
            Sampler::parse,
            Sampler::names(),
        );
        if let Some(n) = s.sample_every_n_epochs {
            self.interval(
                "sample.sample_every_n_epochs",
                n.into(),
                limits::EPOCHS,
                "use 1 or more, or remove the key",
            );
        }
        if let Some(n) = s.sample_every_n_steps {
            self.interval(
                "sample.sample_every_n_steps",
                n,
                limits::STEPS,
                "use e.g. 100, or remove the key",
            );
        }
        let scheduled = s.sample_every_n_epochs.is_some() || s.sample_every_n_steps.is_some();
        match (&s.sample_prompts, scheduled) {
            (None, true) => {
                let key = if s.sample_every_n_epochs.is_some() {
                    "sample.sample_every_n_epochs"
                } else {
                    "sample.sample_every_n_steps"
                };
                self.err(
                    key,
                    "is set but sample.sample_prompts is not, so there is nothing to sample",
                    "set sample_prompts to a text file with one prompt per line",
                );
            }
            (Some(p), _) if p.as_os_str().is_empty() => {
                self.err(
                    "sample.sample_prompts",
                    "is empty",
                    "give a text file with one prompt per line",
                );
            }
            (Some(_), false) => {
                self.warn(
                    "sample.sample_prompts",
                    "no images are sampled: set sample_every_n_epochs or sample_every_n_steps",
                );
            }
            _ => {}
        }
        sampler
    }

    fn check_resources(&mut self, spec: &JobSpec) -> Option<Gpus> {
        let r = &spec.resources;
        self.nonzero(
            "resources.workers",
            r.workers.into(),
            "use 1 for a single machine",
        );
        // Data-parallel ranks: one per GPU on each worker, or `ranks_per_worker` CPU ranks.
        self.at_most_u(
            "resources.workers",
            r.workers.into(),
            1,
            limits::MAX_WORKERS,
            "use fewer workers",
        );
        self.at_most_u(
            "resources.max_restarts",
            r.max_restarts.into(),
            0,
            limits::MAX_RESTARTS,
            "use e.g. 3",
        );
        self.nonzero(
            "resources.ranks_per_worker",
            r.ranks_per_worker.into(),
            "use 1 for one rank per worker",
        );
        self.at_most_u(
            "resources.ranks_per_worker",
            r.ranks_per_worker.into(),
            1,
            limits::MAX_RANKS_PER_WORKER,
            "use fewer ranks per worker",
        );
        let gpus = match Gpus::parse(&r.gpus) {
            Ok(gpus) => gpus,
            Err(why) => {
                self.err(
                    "resources.gpus",
                    format!("`{}`: {why}", r.gpus),
                    "use \"all\", \"cpu\", or distinct GPU ids such as \"0,2\"",
                );
                return None;
            }
        };
        if gpus != Gpus::Cpu && r.ranks_per_worker > 1 {
            self.err(
                "resources.ranks_per_worker",
                format!(
                    "{} ranks per worker with gpus = \"{}\": a GPU job runs one rank per GPU",
                    r.ranks_per_worker, r.gpus
                ),
                "name the GPUs each worker gives (e.g. gpus = \"0,1\" or \"all\") and remove \
                 ranks_per_worker, or train on the CPU with gpus = \"cpu\"",
            );
        }
        Some(gpus)
    }
}

struct OptimizerChoice {
    optimizer: OptimizerType,
    args: BTreeMap<String, String>,
    unet_lr: Option<f64>,
    text_encoder_lr: Option<f64>,
    scheduler: LrScheduler,
    warmup: WarmupSpec,
}

fn implemented_names() -> impl Iterator<Item = &'static str> + Clone {
    OptimizerType::implemented().map(OptimizerType::as_str)
}

struct TrainingChoice {
    mixed_precision: MixedPrecision,
    loss: Loss,
    timesteps: std::ops::Range<u32>,
    /// As written, for [`KohyaArgs`].
    loss_type: LossType,
    huber_schedule: HuberSchedule,
}
