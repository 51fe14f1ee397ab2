//! Validation rules and resolved values, one behaviour per test, on specs built from a minimal
//! text and then changed in code.

use std::collections::BTreeMap;

use loractl_spec::{
    Buckets, ConvLora, Gpus, HuberSchedule, JobSpec, Loss, LrScheduler, LrWarmup, OptimizerArgs,
    OptimizerType, Resolution, ResolvedSpec, Sampler, SpecErrors, TrainLength, WarmupSpec,
};

const MINIMAL: &str = r#"
name = "t"
[model]
pretrained_model_name_or_path = "/m/sd15.safetensors"
[dataset]
train_data_dir = "train"
resolution = "512"
[training]
max_train_epochs = 1
"#;

fn base() -> JobSpec {
    JobSpec::from_toml_str(MINIMAL, "<test>").unwrap()
}

fn ok(spec: &JobSpec) -> ResolvedSpec {
    spec.resolved().unwrap_or_else(|e| panic!("{e}"))
}

fn errs(spec: &JobSpec) -> SpecErrors {
    spec.validate().expect_err("expected problems")
}

fn paths(errors: &SpecErrors) -> Vec<&str> {
    errors.iter().map(|e| e.path.as_str()).collect()
}

/// The problem validation reports at `path` once `change` is applied to the base spec.
fn problem_at(change: &dyn Fn(&mut JobSpec), path: &str) -> String {
    let mut spec = base();
    change(&mut spec);
    let e = errs(&spec);
    let problem = e
        .at(path)
        .next()
        .unwrap_or_else(|| panic!("no error at {path}: {e}"))
        .problem
        .clone();
    problem
}

fn warned(r: &ResolvedSpec, path: &str) -> String {
    r.warnings
        .iter()
        .find(|w| w.path == path)
        .unwrap_or_else(|| panic!("no warning at {path}: {:?}", r.warnings))
        .message
        .clone()
}

fn with(extra: &str) -> Result<JobSpec, loractl_spec::ParseErrors> {
    JobSpec::from_toml_str(&format!("{MINIMAL}{extra}"), "<test>")
}

#[test]
fn warmup_with_constant_becomes_constant_with_warmup() {
    let mut spec = base();
    spec.optimizer.lr_warmup_steps = LrWarmup::Steps(100);
    let r = ok(&spec);
    assert_eq!(r.lr_scheduler, LrScheduler::ConstantWithWarmup);
    assert_eq!(r.warmup, WarmupSpec::Steps(100));
    assert!(warned(&r, "optimizer.lr_scheduler").contains("constant_with_warmup"));

    spec.optimizer.lr_warmup_steps = LrWarmup::Percent(0.0);
    assert_eq!(ok(&spec).lr_scheduler, LrScheduler::Constant);
}

#[test]
fn warmup_forms() {
    let warmup = |value: &str| {
        with(&format!("[optimizer]\nlr_warmup_steps = {value}\n"))
            .map(|s| s.optimizer.lr_warmup_steps)
    };
    assert_eq!(warmup("250").unwrap(), LrWarmup::Steps(250));
    assert_eq!(warmup("0.05").unwrap(), LrWarmup::Fraction(0.05));
    assert_eq!(warmup("\"10%\"").unwrap(), LrWarmup::Percent(10.0));
    assert_eq!(warmup("\"100\"").unwrap(), LrWarmup::Steps(100));
    assert_eq!(warmup("\"0.1\"").unwrap(), LrWarmup::Fraction(0.1));
    let e = warmup("-5").unwrap_err();
    assert_eq!(e.0[0].path.as_deref(), Some("optimizer.lr_warmup_steps"));
    assert!(
        warmup("\"1.5\"").is_err(),
        "sd-scripts' int(\"1.5\") fails too"
    );

    let mut spec = base();
    spec.optimizer.lr_scheduler = "cosine".into();
    spec.optimizer.lr_warmup_steps = LrWarmup::Percent(10.0);
    let r = ok(&spec);
    assert_eq!(r.warmup, WarmupSpec::Fraction(0.1));
    assert_eq!(r.warmup.steps(1205), 120);

    spec.optimizer.lr_warmup_steps = LrWarmup::Fraction(100.0);
    let e = errs(&spec);
    assert_eq!(
        e.0[0].fix,
        "write 100 without the decimal point for a number of steps"
    );
    spec.optimizer.lr_warmup_steps = LrWarmup::Fraction(1.5);
    assert_eq!(paths(&errs(&spec)), ["optimizer.lr_warmup_steps"]);
}

#[test]
fn warmup_longer_than_training_warns() {
    let mut spec = base();
    spec.training.max_train_epochs = None;
    spec.training.max_train_steps = Some(50);
    spec.optimizer.lr_scheduler = "linear".into();
    spec.optimizer.lr_warmup_steps = LrWarmup::Steps(80);
    assert!(warned(&ok(&spec), "optimizer.lr_warmup_steps").contains("never reached"));
}

#[test]
fn group_learning_rates_default_and_drop_at_zero() {
    let mut spec = base();
    spec.optimizer.learning_rate = 2e-4;
    spec.optimizer.text_encoder_lr = Some(5e-5);
    let r = ok(&spec);
    assert_eq!((r.unet_lr, r.text_encoder_lr), (Some(2e-4), Some(5e-5)));

    spec.optimizer.unet_lr = Some(0.0);
    let r = ok(&spec);
    assert_eq!((r.unet_lr, r.text_encoder_lr), (None, Some(5e-5)));

    spec.optimizer.text_encoder_lr = Some(0.0);
    let e = errs(&spec);
    assert_eq!(paths(&e), ["optimizer.unet_lr"]);
    assert!(e.0[0].problem.contains("nothing would be trained"));

    let mut spec = base();
    spec.optimizer.learning_rate = 0.0;
    assert_eq!(paths(&errs(&spec)), ["optimizer.learning_rate"]);
}

#[test]
fn train_only_flags_drop_the_other_group() {
    let mut spec = base();
    spec.network.network_train_unet_only = true;
    let r = ok(&spec);
    assert_eq!((r.unet_lr, r.text_encoder_lr), (Some(1e-4), None));

    let mut spec = base();
    spec.network.network_train_text_encoder_only = true;
    spec.optimizer.text_encoder_lr = Some(0.0);
    assert_eq!(paths(&errs(&spec)), ["optimizer.text_encoder_lr"]);
}

#[test]
fn text_encoder_output_cache_needs_frozen_encoder_and_fixed_captions() {
    let mut spec = base();
    spec.dataset.cache_text_encoder_outputs = true;
    assert_eq!(paths(&errs(&spec)), ["dataset.cache_text_encoder_outputs"]);

    spec.network.network_train_unet_only = true;
    ok(&spec);

    spec.dataset.shuffle_caption = true;
    spec.dataset.caption_tag_dropout_rate = 0.1;
    let e = errs(&spec);
    assert_eq!(
        paths(&e),
        [
            "dataset.shuffle_caption",
            "dataset.caption_tag_dropout_rate"
        ]
    );

    // A text encoder with learning rate 0 is not trained either.
    let mut spec = base();
    spec.dataset.cache_text_encoder_outputs = true;
    spec.optimizer.text_encoder_lr = Some(0.0);
    ok(&spec);
}

#[test]
fn latent_cache_excludes_per_epoch_augmentation() {
    let mut spec = base();
    spec.dataset.cache_latents = true;
    spec.dataset.random_crop = true;
    spec.dataset.flip_aug = true; // flipped latents are cached separately: fine
    assert_eq!(paths(&errs(&spec)), ["dataset.random_crop"]);

    let mut spec = base();
    spec.dataset.cache_latents_to_disk = true;
    let r = ok(&spec);
    assert!(r.cache_latents);
    assert_eq!(
        warned(&r, "dataset.cache_latents_to_disk"),
        "implies cache_latents = true"
    );
}

#[test]
fn buckets_round_like_sd_scripts_and_must_hold_the_resolution() {
    let mut spec = base();
    spec.dataset.enable_bucket = true;
    spec.dataset.min_bucket_reso = 300;
    spec.dataset.max_bucket_reso = 1000;
    let r = ok(&spec);
    assert_eq!(
        r.buckets,
        Some(Buckets {
            min_reso: 256,
            max_reso: 1024,
            reso_steps: 64,
            no_upscale: false
        })
    );
    assert!(warned(&r, "dataset.min_bucket_reso").contains("rounded down to 256"));
    assert!(warned(&r, "dataset.max_bucket_reso").contains("rounded up to 1024"));

    spec.dataset.resolution = Resolution {
        width: 768,
        height: 1152,
    };
    spec.dataset.min_bucket_reso = 1024;
    spec.dataset.max_bucket_reso = 1024;
    let e = errs(&spec);
    assert_eq!(
        paths(&e),
        ["dataset.min_bucket_reso", "dataset.max_bucket_reso"]
    );
    assert_eq!(
        e.0[1].fix,
        "set max_bucket_reso >= 1152 or lower the resolution"
    );

    spec.dataset.min_bucket_reso = 32;
    spec.dataset.max_bucket_reso = 2048;
    assert_eq!(paths(&errs(&spec)), ["dataset.min_bucket_reso"]);
}

#[test]
fn resolution_forms() {
    let res = |value: &str| {
        let text = MINIMAL.replace("resolution = \"512\"", &format!("resolution = {value}"));
        JobSpec::from_toml_str(&text, "<test>").map(|s| s.dataset.resolution)
    };
    assert_eq!(res("512").unwrap(), Resolution::square(512));
    assert_eq!(
        res("\"768,512\"").unwrap(),
        Resolution {
            width: 768,
            height: 512
        }
    );
    assert_eq!(
        res("\" 640 , 448 \"").unwrap(),
        Resolution {
            width: 640,
            height: 448
        }
    );
    assert_eq!(
        res("[512, 768]").unwrap(),
        Resolution {
            width: 512,
            height: 768
        }
    );
    assert!(res("\"512,512,512\"").is_err());
    assert!(res("[512]").is_err());
    assert!(res("-512").is_err());
}

#[test]
fn gpus_syntax() {
    assert_eq!(Gpus::parse("all"), Ok(Gpus::All));
    assert_eq!(Gpus::parse("ALL"), Ok(Gpus::All));
    assert_eq!(Gpus::parse("cpu"), Ok(Gpus::Cpu));
    assert_eq!(Gpus::parse("0,2"), Ok(Gpus::Ids(vec![0, 2])));
    assert_eq!(Gpus::parse(" 3 , 1 "), Ok(Gpus::Ids(vec![3, 1])));
    assert_eq!(Gpus::Ids(vec![3, 1]).to_string(), "3,1");
    for bad in ["", "-1", "0,0", "gpu0", "0,,1", "0;1"] {
        assert!(Gpus::parse(bad).is_err(), "{bad:?}");
    }
    let mut spec = base();
    spec.resources.gpus = "0;1".into();
    spec.resources.workers = 0;
    let e = errs(&spec);
    assert_eq!(paths(&e), ["resources.workers", "resources.gpus"]);
    assert_eq!(
        e.0[1].problem,
        "`0;1`: `0;1` is not a GPU id (a non-negative integer)"
    );
}

#[test]
fn network_alpha_zero_means_dim_and_conv_args() {
    let mut spec = base();
    spec.network.network_dim = 32;
    spec.network.network_alpha = 0.0;
    let r = ok(&spec);
    assert_eq!(r.network_alpha, 32.0);
    assert!(warned(&r, "network.network_alpha").contains("no scaling"));

    let spec = with("[network]\nnetwork_args = [\"conv_dim=8\", \"conv_alpha = 0\"]\n").unwrap();
    assert_eq!(ok(&spec).conv, Some(ConvLora { dim: 8, alpha: 8.0 }));
    let spec = with("[network.network_args]\nconv_dim = 16\n").unwrap();
    assert_eq!(
        ok(&spec).conv,
        Some(ConvLora {
            dim: 16,
            alpha: 1.0
        })
    );

    let e = with("[network]\nnetwork_args = [\"conv_dimm=8\"]\n").unwrap_err();
    assert_eq!(e.0[0].path.as_deref(), Some("network.network_args"));
    assert!(
        e.0[0]
            .message
            .contains("unknown network_args key `conv_dimm`"),
        "{e}"
    );
    let e = with("[network.network_args]\nconv_dimm = 8\n").unwrap_err();
    assert_eq!(
        e.0[0].path.as_deref(),
        Some("network.network_args.conv_dimm")
    );
    assert_eq!(e.0[0].hint.as_deref(), Some("did you mean `conv_dim`?"));

    let mut spec = base();
    spec.network.network_args.conv_alpha = Some(4.0);
    assert_eq!(paths(&errs(&spec)), ["network.network_args.conv_alpha"]);
}

#[test]
fn optimizer_args_become_python_literals() {
    let mut spec = base();
    spec.optimizer.optimizer_type = "DAdaptAdam".into();
    spec.optimizer.learning_rate = 1.0;
    let mut table = BTreeMap::new();
    table.insert("decouple".to_owned(), toml::Value::Boolean(true));
    table.insert("eps".to_owned(), toml::Value::Float(1e-8));
    table.insert("d0".to_owned(), toml::Value::Float(1.0));
    table.insert(
        "betas".to_owned(),
        toml::Value::Array(vec![toml::Value::Float(0.9)]),
    );
    table.insert("growth_rate".to_owned(), toml::Value::String("inf".into()));
    spec.optimizer.optimizer_args = OptimizerArgs::Table(table.clone());
    let args = ok(&spec).optimizer_args;
    assert_eq!(args["decouple"], "True");
    assert_eq!(args["eps"], "1e-8");
    assert_eq!(args["d0"], "1.0");
    assert_eq!(args["betas"], "(0.9,)");
    assert_eq!(args["growth_rate"], "inf");

    table.insert("nested".to_owned(), toml::Value::Table(Default::default()));
    spec.optimizer.optimizer_args = OptimizerArgs::Table(table);
    assert_eq!(paths(&errs(&spec)), ["optimizer.optimizer_args.nested"]);

    spec.optimizer.optimizer_args = OptimizerArgs::List(vec![
        "betas=0.9,0.99".into(),
        "weight_decay".into(),
        "betas=1".into(),
    ]);
    let e = errs(&spec);
    assert_eq!(
        paths(&e),
        ["optimizer.optimizer_args[1]", "optimizer.optimizer_args[2]"]
    );
    assert_eq!(e.0[1].problem, "`betas` is given twice");
}

#[test]
fn training_length_defaults_to_sd_scripts_steps() {
    let mut spec = base();
    spec.training.max_train_epochs = None;
    let r = ok(&spec);
    assert_eq!(r.length, TrainLength::Steps(1600));
    assert!(warned(&r, "training.max_train_steps").contains("1600 steps"));

    spec.training.max_train_steps = Some(500);
    spec.training.max_train_epochs = Some(3);
    let r = ok(&spec);
    assert_eq!(r.length, TrainLength::Epochs(3));
    assert!(warned(&r, "training.max_train_steps").contains("ignored"));
}

#[test]
fn optimizer_names() {
    let mut spec = base();
    for (name, expected) in [
        ("adamw8bit", OptimizerType::AdamW8bit),
        ("dadaptadam", OptimizerType::DAdaptAdam),
        ("prodigy", OptimizerType::Prodigy),
        ("Lion", OptimizerType::Lion),
    ] {
        spec.optimizer.optimizer_type = name.into();
        spec.optimizer.learning_rate = 1.0;
        assert_eq!(ok(&spec).optimizer, expected, "{name}");
    }
    spec.optimizer.optimizer_type = "bitsandbytes.optim.AdEMAMix8bit".into();
    assert!(errs(&spec).0[0].problem.contains("Python class path"));

    assert_eq!(
        OptimizerType::parse("DAdaptAdamPreprint"),
        Some(OptimizerType::DAdaptation)
    );
    spec.optimizer.optimizer_type = "DAdaptAdam".into();
    spec.optimizer.learning_rate = 1e-4;
    assert!(warned(&ok(&spec), "optimizer.learning_rate").contains("around 1.0"));
}

#[test]
fn choices_and_aliases() {
    let mut spec = base();
    spec.sample.sample_sampler = "k_euler_a".into();
    spec.training.loss_type = "huber".into();
    spec.training.huber_schedule = "constant".into();
    spec.training.huber_c = 0.2;
    let r = ok(&spec);
    assert_eq!(r.sampler, Sampler::EulerA);
    assert_eq!(
        r.loss,
        Loss::Huber {
            c: 0.2,
            schedule: HuberSchedule::Constant
        }
    );

    spec.sample.sample_sampler = "dpmsolver++".into();
    spec.optimizer.lr_scheduler = "cosine_with_restart".into();
    let e = errs(&spec);
    assert_eq!(
        paths(&e),
        ["optimizer.lr_scheduler", "sample.sample_sampler"]
    );
    assert_eq!(e.0[0].fix, "did you mean `cosine_with_restarts`?");
    assert_eq!(e.0[1].fix, "use one of: ddim, euler, euler_a");
}

#[test]
fn choices_parse_from_their_names_as_validation_reads_them() {
    assert_eq!("k_euler".parse(), Ok(Sampler::Euler));
    assert_eq!("PRODIGY".parse(), Ok(OptimizerType::Prodigy));
    assert_eq!("constant".parse(), Ok(LrScheduler::Constant));
    for s in LrScheduler::ALL {
        assert_eq!(s.as_str().parse(), Ok(*s));
    }
    assert_eq!(
        "Constant".parse::<LrScheduler>(),
        Err(
            "unknown value `Constant`: use one of: linear, cosine, cosine_with_restarts, \
             polynomial, constant, constant_with_warmup"
                .to_owned()
        )
    );
    assert!("fp8".parse::<loractl_spec::MixedPrecision>().is_err());
}

#[test]
fn model_checks() {
    let mut spec = base();
    spec.model.clip_skip = Some(0);
    assert_eq!(paths(&errs(&spec)), ["model.clip_skip"]);
    spec.model.clip_skip = Some(2);
    spec.model.v2 = true;
    assert!(warned(&ok(&spec), "model.clip_skip").contains("SD2"));
    spec.model.clip_skip = None;
    spec.model.v2 = false;
    spec.model.v_parameterization = true;
    spec.model.max_token_length = Some(225);
    let r = ok(&spec);
    assert_eq!(r.max_token_length, 225);
    assert!(warned(&r, "model.v_parameterization").contains("v2"));
}

#[test]
fn names_are_file_stems() {
    let mut spec = base();
    spec.name = "a/b".into();
    spec.output.output_name = Some(String::new());
    assert_eq!(paths(&errs(&spec)), ["name", "output.output_name"]);
    spec.name = "a".into();
    spec.output.output_name = None;
    assert_eq!(ok(&spec).output_name, "a");
}

#[test]
fn kohya_flat_keys_point_to_their_table() {
    let text = MINIMAL.replace(
        "name = \"t\"",
        "name = \"t\"\nlearning_rate = 1e-4\nnetwork_dim = 8",
    );
    let e = JobSpec::from_toml_str(&text, "<test>").unwrap_err();
    let hints: Vec<_> = e
        .iter()
        .map(|e| e.hint.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        hints,
        [
            "`learning_rate` belongs in the [optimizer] table",
            "`network_dim` belongs in the [network] table"
        ]
    );
}

#[test]
fn syntax_errors_have_line_and_column() {
    let e = JobSpec::from_toml_str("name = \"x\"\n[model]\npath = \n", "job.toml").unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!((e.0[0].line, e.0[0].path.as_deref()), (3, None));
    assert!(
        e.to_string()
            .starts_with("job spec does not parse: job.toml:3:"),
        "{e}"
    );
}

#[test]
fn round_trip_keeps_written_forms() {
    let spec = with(
        "[network]\nnetwork_args = [\"conv_dim=8\"]\n[optimizer]\noptimizer_args = [\"decouple=True\"]\nlr_warmup_steps = \"5%\"\nlr_scheduler = \"cosine\"\n",
    )
    .unwrap();
    let text = spec.to_toml_string().unwrap();
    assert!(text.contains("lr_warmup_steps = \"5%\""), "{text}");
    assert!(
        text.contains("optimizer_args = [\"decouple=True\"]"),
        "{text}"
    );
    assert_eq!(JobSpec::from_toml_str(&text, "<again>").unwrap(), spec);
}

/// What validation accepts, the trainer runs: sd-scripts options loractl does not implement yet
/// are refused, each with a sentence saying so, at the key that asks for them.
#[test]
fn options_not_implemented_yet_are_refused_at_validation() {
    let refused = |change: &dyn Fn(&mut JobSpec), path: &str, words: &str| {
        let problem = problem_at(change, path);
        assert!(
            problem.contains(words),
            "{path}: {problem} does not say {words:?}"
        );
    };
    for name in [
        "Lion8bit",
        "PagedAdamW8bit",
        "DAdaptation",
        "AdamWScheduleFree",
    ] {
        refused(
            &|s| {
                s.optimizer.optimizer_type = name.into();
                s.optimizer.learning_rate = 1.0;
            },
            "optimizer.optimizer_type",
            "does not implement yet",
        );
    }
    for loss in ["l1", "smooth_l1"] {
        refused(
            &|s| s.training.loss_type = loss.into(),
            "training.loss_type",
            "not implemented yet",
        );
    }
    refused(
        &|s| s.training.loss_type = "huber".into(),
        "training.huber_schedule",
        "not implemented yet",
    );
    refused(
        &|s| s.resources.workers = 65,
        "resources.workers",
        "between 1 and 64",
    );
    refused(
        &|s| {
            s.resources.gpus = "0,1".into();
            s.resources.ranks_per_worker = 2;
        },
        "resources.ranks_per_worker",
        "a GPU job runs one rank per GPU",
    );
    refused(
        &|s| {
            s.resources.gpus = "cpu".into();
            s.resources.ranks_per_worker = 65;
        },
        "resources.ranks_per_worker",
        "between 1 and 64",
    );
    refused(
        &|s| s.dataset.color_aug = true,
        "dataset.color_aug",
        "not implemented yet",
    );
    refused(
        &|s| s.network.network_dropout = Some(0.1),
        "network.network_dropout",
        "not implemented yet",
    );

    // The same options switched off are fine, and gradient checkpointing is implemented.
    let mut spec = base();
    spec.training.gradient_checkpointing = true;
    spec.network.network_dropout = Some(0.0);
    spec.resources.gpus = "1".into();
    ok(&spec);
    // Several GPUs on a worker: one rank each.
    spec.resources.gpus = "0,1".into();
    ok(&spec);
    assert_eq!(spec.resolved().unwrap().world_size(), Some(2));
    spec.resources.gpus = "cpu".into();
    spec.resources.ranks_per_worker = 3;
    spec.resources.workers = 2;
    assert_eq!(spec.resolved().unwrap().world_size(), Some(6));
    spec.resources.gpus = "all".into();
    spec.resources.ranks_per_worker = 1;
    assert_eq!(
        spec.resolved().unwrap().world_size(),
        None,
        "known once placed"
    );
    spec.resources.workers = 1;
    spec.training.loss_type = "huber".into();
    spec.training.huber_schedule = "constant".into();
    ok(&spec);
    for o in OptimizerType::implemented() {
        spec.optimizer.optimizer_type = o.as_str().into();
        ok(&spec);
    }
}

#[test]
fn optimizer_args_must_be_arguments_of_the_optimizer() {
    let mut spec = base();
    spec.optimizer.optimizer_args =
        OptimizerArgs::List(vec!["weight_dacay=0.1".into(), "betas=0.9,0.99".into()]);
    let e = errs(&spec);
    assert_eq!(paths(&e), ["optimizer.optimizer_args.weight_dacay"]);
    assert_eq!(e.0[0].problem, "`weight_dacay` is not an argument of AdamW");
    assert_eq!(
        e.0[0].fix,
        "did you mean `weight_decay`? AdamW takes: betas, eps, weight_decay, amsgrad"
    );
    // Prodigy's own arguments are Prodigy's, not AdamW's.
    spec.optimizer.optimizer_args = OptimizerArgs::List(vec!["d_coef=2".into()]);
    assert_eq!(paths(&errs(&spec)), ["optimizer.optimizer_args.d_coef"]);
    spec.optimizer.optimizer_type = "Prodigy".into();
    spec.optimizer.learning_rate = 1.0;
    ok(&spec);
}

#[test]
fn numeric_options_have_ranges_named_in_the_error() {
    let out_of_range = |change: &dyn Fn(&mut JobSpec), path: &str, range: &str| {
        let problem = problem_at(change, path);
        assert!(
            problem.contains(range),
            "{path}: `{problem}` does not give the range {range:?}"
        );
    };
    let big = u32::MAX;
    out_of_range(
        &|s| s.network.network_dim = big,
        "network.network_dim",
        "between 1 and 1024",
    );
    out_of_range(
        &|s| s.network.network_args.conv_dim = Some(big),
        "network.network_args.conv_dim",
        "between 1 and 1024",
    );
    out_of_range(
        &|s| s.network.network_alpha = 1e9,
        "network.network_alpha",
        "between 0 and 1024",
    );
    out_of_range(
        &|s| s.dataset.resolution = Resolution::square(big - 63),
        "dataset.resolution",
        "between 64 and 8192",
    );
    out_of_range(
        &|s| s.training.train_batch_size = big,
        "training.train_batch_size",
        "between 1 and 256",
    );
    out_of_range(
        &|s| s.training.gradient_accumulation_steps = big,
        "training.gradient_accumulation_steps",
        "between 1 and 1024",
    );
    out_of_range(
        &|s| {
            s.training.max_train_epochs = None;
            s.training.max_train_steps = Some(u64::MAX);
        },
        "training.max_train_steps",
        "between 1 and 10000000",
    );
    out_of_range(
        &|s| s.training.max_train_epochs = Some(big),
        "training.max_train_epochs",
        "between 1 and 100000",
    );
    out_of_range(
        &|s| s.optimizer.learning_rate = 1e9,
        "optimizer.learning_rate",
        "between 0 and 100",
    );
    out_of_range(
        &|s| s.optimizer.lr_warmup_steps = LrWarmup::Steps(u64::MAX),
        "optimizer.lr_warmup_steps",
        "between 0 and 10000000",
    );
    out_of_range(
        &|s| s.training.noise_offset = Some(5.0),
        "training.noise_offset",
        "between 0 and 1",
    );
    out_of_range(
        &|s| s.output.save_every_n_steps = Some(u64::MAX),
        "output.save_every_n_steps",
        "between 1 and 10000000",
    );
    out_of_range(
        &|s| s.dataset.keep_tokens = big,
        "dataset.keep_tokens",
        "between 0 and 225",
    );
    out_of_range(
        &|s| s.resources.max_restarts = big,
        "resources.max_restarts",
        "between 0 and 100",
    );
    // Bucket sizes near 2^32 used to overflow while rounding.
    out_of_range(
        &|s| {
            s.dataset.enable_bucket = true;
            s.dataset.max_bucket_reso = big;
        },
        "dataset.max_bucket_reso",
        "between 0 and 8192",
    );
    // The limits themselves are accepted.
    let mut spec = base();
    spec.network.network_dim = 1024;
    spec.dataset.resolution = Resolution::square(8192);
    spec.training.train_batch_size = 256;
    ok(&spec);
}

#[test]
fn output_name_is_a_plain_file_name() {
    for bad in ["a\0b", "a/b", "tab\there", &"x".repeat(201)] {
        let mut spec = base();
        spec.output.output_name = Some(bad.to_owned());
        assert_eq!(paths(&errs(&spec)), ["output.output_name"], "{bad:?}");
        let mut spec = base();
        spec.name = bad.to_owned();
        assert_eq!(paths(&errs(&spec)), ["name"], "{bad:?}");
    }
    let mut spec = base();
    spec.dataset.caption_extension = ".txt/../../x".into();
    assert_eq!(paths(&errs(&spec)), ["dataset.caption_extension"]);
}

#[test]
fn kohya_args_keep_what_the_job_wrote_and_sections_what_it_runs() {
    let mut spec = base();
    spec.optimizer.learning_rate = 2e-4;
    spec.optimizer.unet_lr = Some(0.0);
    spec.training.min_timestep = Some(100);
    spec.training.loss_type = "huber".into();
    spec.training.huber_schedule = "constant".into();
    spec.training.huber_c = 0.2;
    spec.network.network_dropout = Some(0.0);
    spec.output.resume = Some("out/t-state".into());
    spec.resources.gpus = "cpu".into();
    spec.resources.ranks_per_worker = 3;
    let r = ok(&spec);
    let k = &r.kohya_args;
    assert_eq!(k.learning_rate, 2e-4);
    assert_eq!((k.unet_lr, r.unet_lr), (Some(0.0), None));
    assert_eq!((k.text_encoder_lr, r.text_encoder_lr), (None, Some(2e-4)));
    assert_eq!((k.max_token_length, r.max_token_length), (None, 75));
    assert_eq!((k.min_timestep, k.max_timestep), (Some(100), None));
    assert_eq!(r.timesteps, 100..1000);
    assert_eq!(k.loss_type, loractl_spec::LossType::Huber);
    assert_eq!(k.huber_schedule, HuberSchedule::Constant);
    assert_eq!(k.huber_c, 0.2);
    assert_eq!(k.network_dropout, Some(0.0));
    assert_eq!(r.name, "t");
    assert_eq!(
        r.model.pretrained_model_name_or_path,
        spec.model.pretrained_model_name_or_path
    );
    assert_eq!(r.dataset.train_data_dir, spec.dataset.train_data_dir);
    assert_eq!(r.output.resume, spec.output.resume);
    assert_eq!(r.resources.ranks_per_worker, 3);
    assert_eq!(r.world_size(), Some(3));
}
