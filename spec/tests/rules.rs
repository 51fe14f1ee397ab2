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
    spec.dataset.color_aug = true;
    spec.dataset.flip_aug = true; // flipped latents are cached separately: fine
    assert_eq!(paths(&errs(&spec)), ["dataset.color_aug"]);

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
    let mut table = BTreeMap::new();
    table.insert("decouple".to_owned(), toml::Value::Boolean(true));
    table.insert("eps".to_owned(), toml::Value::Float(1e-8));
    table.insert("d0".to_owned(), toml::Value::Float(1.0));
    table.insert(
        "betas".to_owned(),
        toml::Value::Array(vec![toml::Value::Float(0.9)]),
    );
    table.insert("mode".to_owned(), toml::Value::String("fast".into()));
    spec.optimizer.optimizer_args = OptimizerArgs::Table(table.clone());
    let args = ok(&spec).optimizer_args;
    assert_eq!(args["decouple"], "True");
    assert_eq!(args["eps"], "1e-8");
    assert_eq!(args["d0"], "1.0");
    assert_eq!(args["betas"], "(0.9,)");
    assert_eq!(args["mode"], "fast");

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
        ("DAdaptAdamPreprint", OptimizerType::DAdaptation),
        ("prodigy", OptimizerType::Prodigy),
        ("Lion", OptimizerType::Lion),
    ] {
        spec.optimizer.optimizer_type = name.into();
        spec.optimizer.learning_rate = 1.0;
        assert_eq!(ok(&spec).optimizer, expected, "{name}");
    }
    spec.optimizer.optimizer_type = "bitsandbytes.optim.AdEMAMix8bit".into();
    assert!(errs(&spec).0[0].problem.contains("Python class path"));

    spec.optimizer.optimizer_type = "DAdaptation".into();
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
