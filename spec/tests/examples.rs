//! The example specs in `spec/examples/` parse, validate, resolve to the values their comments
//! promise, and survive a TOML round trip.

use std::path::{Path, PathBuf};

use loractl_spec::{
    Gpus, JobSpec, LrScheduler, MixedPrecision, OptimizerType, ResolvedSpec, Sampler,
    SavePrecision, TrainLength, WarmupSpec,
};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn load(name: &str) -> (JobSpec, ResolvedSpec) {
    let spec = JobSpec::from_file(example(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let resolved = spec.resolved().unwrap_or_else(|e| panic!("{name}: {e}"));
    (spec, resolved)
}

fn round_trip(spec: &JobSpec) {
    let text = spec.to_toml_string().unwrap();
    let again =
        JobSpec::from_toml_str(&text, "<round trip>").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(&again, spec, "{text}");
    assert_eq!(again.to_toml_string().unwrap(), text);
}

#[test]
fn every_example_is_tested() {
    let mut names: Vec<String> = std::fs::read_dir(example(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["dadaptation_lr_find.toml", "minimal.toml", "zenny.toml"]
    );
}

#[test]
fn minimal_takes_defaults() {
    let (spec, r) = load("minimal.toml");
    assert_eq!(spec.version, 1);
    assert_eq!(r.dataset.caption_extension, ".txt");
    assert_eq!(r.network_dim, 4);
    assert_eq!(r.network_alpha, 1.0);
    assert_eq!(r.output_name, "sks-dog");
    assert_eq!(r.output.output_dir, Path::new("output"));
    assert_eq!((r.resolution.width, r.resolution.height), (512, 512));
    assert_eq!(r.buckets, None);
    assert_eq!(r.optimizer, OptimizerType::AdamW);
    assert_eq!(r.unet_lr, Some(1e-4));
    assert_eq!(r.text_encoder_lr, Some(1e-4));
    assert_eq!(r.lr_scheduler, LrScheduler::Constant);
    assert_eq!(r.warmup, WarmupSpec::Steps(0));
    assert_eq!(r.length, TrainLength::Epochs(1));
    assert_eq!(r.mixed_precision, MixedPrecision::No);
    assert_eq!(r.save_precision, None);
    assert_eq!(r.max_token_length, 75);
    assert_eq!(r.timesteps, 0..1000);
    assert_eq!(r.sampler, Sampler::Ddim);
    assert_eq!(r.gpus, Gpus::All);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    round_trip(&spec);
}

#[test]
fn zenny_tutorial() {
    let (spec, r) = load("zenny.toml");
    assert_eq!(r.optimizer, OptimizerType::AdamW8bit);
    assert_eq!(r.unet_lr, Some(3e-5));
    assert_eq!(r.text_encoder_lr, Some(3e-6));
    assert_eq!(r.lr_scheduler, LrScheduler::ConstantWithWarmup);
    assert_eq!(r.warmup, WarmupSpec::Fraction(0.0));
    assert_eq!(r.warmup.steps(1200), 0);
    assert_eq!(r.network_dim, 128);
    assert_eq!(r.network_alpha, 64.0);
    assert_eq!(r.conv, None);
    let buckets = r
        .buckets
        .map(|b| (b.min_reso, b.max_reso, b.reso_steps, b.no_upscale));
    assert_eq!(buckets, Some((256, 1024, 64, false)));
    assert!(r.cache_latents);
    assert_eq!(r.optimizer_args["weight_decay"], "0.01");
    assert_eq!(r.optimizer_args["betas"], "(0.9,0.999)");
    assert_eq!(r.mixed_precision, MixedPrecision::Bf16);
    assert_eq!(r.save_precision, Some(SavePrecision::Fp16));
    assert_eq!(r.sampler, Sampler::EulerA);
    assert_eq!(r.training.seed, Some(42));
    assert_eq!(r.model.clip_skip, Some(1));
    assert_eq!(r.output_name, "zenny");
    no_warnings(&r);
    round_trip(&spec);
}

#[test]
fn dadaptation_lr_find() {
    let (spec, r) = load("dadaptation_lr_find.toml");
    assert_eq!(r.optimizer, OptimizerType::DAdaptAdam);
    assert!(r.optimizer.is_adaptive());
    assert_eq!(r.unet_lr, Some(1.0));
    assert_eq!(r.text_encoder_lr, Some(0.5));
    assert_eq!(r.lr_scheduler, LrScheduler::Constant);
    assert_eq!(r.optimizer_args["decouple"], "True");
    assert_eq!(r.optimizer_args["weight_decay"], "0.01");
    assert_eq!(r.gpus, Gpus::Ids(vec![0]));
    assert!(r.logging_dir.is_none());
    no_warnings(&r);
    round_trip(&spec);
}

/// bf16 trains for real, so the examples resolve without a warning.
fn no_warnings(r: &ResolvedSpec) {
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}
