//! A job spec run end to end on the tiny SD1 fixture: a generated dataset with two aspect
//! ratios, epoch files and the final LoRA in kohya's format (names, shapes, alphas, metadata,
//! hashes), a stopped-and-resumed run that writes the same bytes as an uninterrupted one, seed
//! determinism, the plan's arithmetic, and a diverging run that writes nothing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use candle_core::{DType, Device, Tensor};
use loractl_spec::JobSpec;
use loractl_trainer::run::{self, RunEvent, RunOptions, RunResult};
use loractl_trainer::Error;

mod support;
use support::{checkerboards, scratch_dir, sd1_diffusers, TempDir};

/// `root/train/{2_wide,1_tall}` with captioned checkerboards (the tall folder's last image has
/// no caption file, so its folder name is used).
fn make_job_dir(name: &str) -> anyhow::Result<TempDir> {
    let root = scratch_dir(&format!("run-{name}"))?;
    for (folder, size) in [("2_wide", (128, 64)), ("1_tall", (64, 128))] {
        checkerboards(&root.join("train").join(folder), size, 3, |i, colour| {
            (!(folder == "1_tall" && i == 2)).then(|| format!("{colour}, checkers"))
        })?;
    }
    Ok(root)
}

fn job_toml(extra_training: &str, extra_output: &str) -> String {
    format!(
        r#"
name = "tiny"
[model]
pretrained_model_name_or_path = "{model}"
[dataset]
train_data_dir = "train"
resolution = "128,64"
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 64
cache_latents = true
[network]
network_dim = 4
network_alpha = 2
[optimizer]
optimizer_type = "AdamW"
learning_rate = 2e-3
text_encoder_lr = 5e-4
lr_scheduler = "cosine"
lr_warmup_steps = 2
[training]
train_batch_size = 2
seed = 42
{extra_training}
[output]
output_dir = "out"
save_precision = "fp16"
{extra_output}
"#,
        model = sd1_diffusers().display()
    )
}

fn resolve(text: &str) -> anyhow::Result<loractl_spec::ResolvedSpec> {
    let spec = JobSpec::from_toml_str(text, "job.toml")?;
    Ok(spec.resolved()?)
}

/// Runs a job, collecting its events.
fn run_job(
    dir: &Path,
    text: &str,
    stop_at: Option<usize>,
) -> anyhow::Result<(RunResult, Vec<RunEvent>)> {
    run_job_with(dir, text, stop_at, false)
}

fn run_job_with(
    dir: &Path,
    text: &str,
    stop_at: Option<usize>,
    state_as_file: bool,
) -> anyhow::Result<(RunResult, Vec<RunEvent>)> {
    let spec = resolve(text)?;
    let ro = RunOptions {
        fixed_time: Some(1_700_000_000),
        state_as_file,
        ..RunOptions::default()
    };
    let stop = ro.stop.clone();
    let mut events = Vec::new();
    let result = run::run(&spec, dir, &ro, &mut |e| {
        if let (RunEvent::Step { step, .. }, Some(k)) = (e, stop_at) {
            if *step == k {
                stop.store(true, Ordering::SeqCst);
            }
        }
        events.push(e.clone());
    })?;
    Ok((result, events))
}

/// The metadata keys sd-scripts' `train_network.py` (kohya-ss/sd-scripts 48d368f, 2026-02) writes
/// into a LoRA of a DreamBooth-style folder dataset without `vae`, `network_args`,
/// `min/max_timestep` or `clip_skip`: its `metadata` dict, the dataset block, model name and
/// hashes, the per-save keys, `sshs_*`, and `modelspec.*` from `sai_model_spec.build_metadata`.
const KOHYA_KEYS: &[&str] = &[
    "ss_adaptive_noise_scale",
    "ss_base_model_version",
    "ss_batch_size_per_device",
    "ss_bucket_info",
    "ss_bucket_no_upscale",
    "ss_cache_latents",
    "ss_caption_dropout_every_n_epochs",
    "ss_caption_dropout_rate",
    "ss_caption_tag_dropout_rate",
    "ss_clip_skip",
    "ss_color_aug",
    "ss_dataset_dirs",
    "ss_debiased_estimation",
    "ss_enable_bucket",
    "ss_epoch",
    "ss_face_crop_aug_range",
    "ss_flip_aug",
    "ss_fp8_base",
    "ss_fp8_base_unet",
    "ss_full_fp16",
    "ss_gradient_accumulation_steps",
    "ss_gradient_checkpointing",
    "ss_huber_c",
    "ss_huber_scale",
    "ss_huber_schedule",
    "ss_ip_noise_gamma",
    "ss_ip_noise_gamma_random_strength",
    "ss_keep_tokens",
    "ss_learning_rate",
    "ss_loss_type",
    "ss_lowram",
    "ss_lr_scheduler",
    "ss_lr_warmup_steps",
    "ss_max_bucket_reso",
    "ss_max_grad_norm",
    "ss_max_token_length",
    "ss_max_train_steps",
    "ss_max_validation_steps",
    "ss_min_bucket_reso",
    "ss_min_snr_gamma",
    "ss_mixed_precision",
    "ss_multires_noise_discount",
    "ss_multires_noise_iterations",
    "ss_network_alpha",
    "ss_network_dim",
    "ss_network_dropout",
    "ss_network_module",
    "ss_new_sd_model_hash",
    "ss_noise_offset",
    "ss_noise_offset_random_strength",
    "ss_num_batches_per_epoch",
    "ss_num_epochs",
    "ss_num_reg_images",
    "ss_num_train_images",
    "ss_num_validation_images",
    "ss_optimizer",
    "ss_output_name",
    "ss_prior_loss_weight",
    "ss_random_crop",
    "ss_reg_dataset_dirs",
    "ss_resize_interpolation",
    "ss_resolution",
    "ss_scale_weight_norms",
    "ss_sd_model_hash",
    "ss_sd_model_name",
    "ss_sd_scripts_commit_hash",
    "ss_seed",
    "ss_session_id",
    "ss_shuffle_caption",
    "ss_steps",
    "ss_tag_frequency",
    "ss_text_encoder_lr",
    "ss_total_batch_size",
    "ss_training_comment",
    "ss_training_finished_at",
    "ss_training_started_at",
    "ss_unet_lr",
    "ss_v2",
    "ss_validate_every_n_epochs",
    "ss_validate_every_n_steps",
    "ss_validation_seed",
    "ss_validation_split",
    "ss_zero_terminal_snr",
    "sshs_legacy_hash",
    "sshs_model_hash",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.implementation_version",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.date",
    "modelspec.prediction_type",
];

fn lora_tensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn lora_metadata(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let bytes = std::fs::read(path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    Ok(header.metadata().clone().unwrap_or_default())
}

#[test]
fn a_job_trains_and_writes_kohya_files() -> anyhow::Result<()> {
    let dir = make_job_dir("kohya")?;
    let text = job_toml(
        "max_train_epochs = 4",
        "save_every_n_epochs = 1\nsave_last_n_epochs = 2\nsave_every_n_steps = 7\n\
         [sample]\nsample_prompts = \"prompts.txt\"\nsample_every_n_epochs = 2\n\
         sample_sampler = \"euler_a\"",
    );
    std::fs::write(
        dir.join("prompts.txt"),
        "# previews\nred, checkers --w 64 --h 64 --s 3 --d 5\nblue, checkers --n red --w 64 --h 64 --s 3 --ss ddim --d 6\n",
    )?;
    let plan = run::plan(&resolve(&text)?, &dir, true)?;
    // 3 wide × 2 repeats = 6 samples → 3 batches of 2; 3 tall × 1 = 3 → 2 batches.
    assert_eq!(plan.dataset.batches_per_epoch, 5);
    assert_eq!(plan.total_steps, 20);
    assert_eq!(plan.num_epochs, 4);
    assert_eq!(plan.warmup_steps, 2);
    assert_eq!(plan.dataset.buckets.len(), 2);
    let (result, events) = run_job(&dir, &text, None)?;
    let RunResult::Finished { lora, steps } = result else {
        anyhow::bail!("the run did not finish: {result:?}");
    };
    assert_eq!(steps, 20);
    assert_eq!(lora, dir.join("out/tiny.safetensors"));
    let epoch_avgs: Vec<f32> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Epoch { loss_average, .. } => Some(*loss_average),
            _ => None,
        })
        .collect();
    assert_eq!(epoch_avgs.len(), 4);
    assert!(
        epoch_avgs[3] < epoch_avgs[0],
        "epoch average loss did not drop: {epoch_avgs:?}"
    );
    // Epoch files for epochs 1..3 (never the last), only the last two kept.
    assert!(!dir.join("out/tiny-000001.safetensors").exists());
    assert!(dir.join("out/tiny-000002.safetensors").exists());
    assert!(dir.join("out/tiny-000003.safetensors").exists());
    assert!(!dir.join("out/tiny-000004.safetensors").exists());

    for step in [7, 14] {
        assert!(
            dir.join(format!("out/tiny-step{step:08}.safetensors"))
                .exists(),
            "step {step} file missing"
        );
    }
    // Two prompts at the ends of epochs 2 and 4, named as sd-scripts names them.
    let mut samples: Vec<String> = std::fs::read_dir(dir.join("out/sample"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    samples.sort();
    assert_eq!(samples.len(), 4, "{samples:?}");
    assert!(
        samples[0].starts_with("tiny_e000002_00_") && samples[0].ends_with("_5.png"),
        "{samples:?}"
    );
    assert!(
        samples[3].starts_with("tiny_e000004_01_") && samples[3].ends_with("_6.png"),
        "{samples:?}"
    );
    let img = image::open(dir.join("out/sample").join(&samples[0]))?;
    assert_eq!((img.width(), img.height()), (64, 64));
    let sampled = events
        .iter()
        .filter(|e| matches!(e, RunEvent::Sampled { .. }))
        .count();
    assert_eq!(sampled, 2);

    let tensors = lora_tensors(&lora)?;
    let unet_modules: Vec<&String> = tensors
        .keys()
        .filter(|k| k.starts_with("lora_unet_") && k.ends_with(".alpha"))
        .collect();
    let te_modules = tensors
        .keys()
        .filter(|k| k.starts_with("lora_te_") && k.ends_with(".alpha"))
        .count();
    assert_eq!(
        Some(unet_modules.len()),
        plan.lora_modules_unet,
        "plan and file disagree"
    );
    assert_eq!(Some(te_modules), plan.lora_modules_text_encoder);
    assert!(te_modules > 0);
    let mut params = 0;
    for (k, t) in &tensors {
        assert_eq!(t.dtype(), DType::F16, "{k} not saved in fp16");
        if k.ends_with(".alpha") {
            assert_eq!(t.dims(), &[] as &[usize]);
            assert_eq!(t.to_dtype(DType::F32)?.to_scalar::<f32>()?, 2.0);
            let m = k.trim_end_matches(".alpha");
            let down = &tensors[&format!("{m}.lora_down.weight")];
            let up = &tensors[&format!("{m}.lora_up.weight")];
            assert_eq!(down.dim(0)?, 4, "{m} rank");
            assert_eq!(up.dim(1)?, 4, "{m} rank");
            params += down.elem_count() + up.elem_count();
        }
    }
    assert_eq!(Some(params), plan.lora_params);
    assert!(tensors.contains_key(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    ));
    assert!(tensors.contains_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"));
    // Every up weight (initialised to zero) moved: the UNet's and the text encoder's, whose
    // gradient reaches it only through the UNet's cross-attention.
    for (k, t) in tensors
        .iter()
        .filter(|(k, _)| k.ends_with("lora_up.weight"))
    {
        let norm = t
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(norm > 0.0, "{k} was never trained");
    }

    let meta = lora_metadata(&lora)?;
    let mut ours: Vec<&str> = meta.keys().map(String::as_str).collect();
    ours.sort_unstable();
    let mut kohya = KOHYA_KEYS.to_vec();
    kohya.sort_unstable();
    assert_eq!(
        ours, kohya,
        "the LoRA's metadata keys differ from sd-scripts'"
    );
    for (k, v) in [
        ("ss_validation_split", "0.0"),
        ("ss_huber_scale", "1.0"),
        ("ss_training_comment", "None"),
        ("ss_lowram", "False"),
        ("ss_sd_model_hash", "IsADirectory"),
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "2.0"),
        ("ss_base_model_version", "sd_v1"),
        ("ss_v2", "False"),
        ("ss_steps", "20"),
        ("ss_epoch", "4"),
        ("ss_num_epochs", "4"),
        ("ss_max_train_steps", "20"),
        ("ss_lr_warmup_steps", "2"),
        ("ss_lr_scheduler", "cosine"),
        ("ss_optimizer", "torch.optim.adamw.AdamW"),
        ("ss_seed", "42"),
        ("ss_output_name", "tiny"),
        ("ss_num_train_images", "9"),
        ("ss_num_batches_per_epoch", "5"),
        ("ss_batch_size_per_device", "2"),
        ("ss_learning_rate", "0.002"),
        ("ss_text_encoder_lr", "0.0005"),
        ("ss_unet_lr", "None"),
        ("ss_sd_model_name", "diffusers"),
        ("modelspec.sai_model_spec", "1.0.1"),
        ("modelspec.architecture", "stable-diffusion-v1/lora"),
        ("modelspec.title", "tiny"),
        ("modelspec.resolution", "128x64"),
        ("modelspec.prediction_type", "epsilon"),
        ("modelspec.date", "2023-11-14T22:13:20"),
    ] {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "metadata {k}");
    }
    let dirs: serde_json::Value = serde_json::from_str(&meta["ss_dataset_dirs"])?;
    assert_eq!(dirs["2_wide"]["n_repeats"], 2);
    assert_eq!(dirs["1_tall"]["img_count"], 3);
    let tags: serde_json::Value = serde_json::from_str(&meta["ss_tag_frequency"])?;
    assert_eq!(tags["2_wide"]["checkers"], 3);
    // sshs_model_hash is the sha256 of everything after the header.
    let bytes = std::fs::read(&lora)?;
    let header = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&bytes[8 + header..]);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(meta["sshs_model_hash"], hex);
    assert_eq!(meta["sshs_legacy_hash"].len(), 8);

    // The file loads back as a kohya LoRA onto the model it was trained for.
    let sd = loractl_trainer::loader::load(&sd1_diffusers(), &Default::default())?;
    let net = loractl_trainer::lora::LoraNetwork::load_file(&sd.sites(), &lora, 1.0, &Device::Cpu)?;
    assert_eq!(net.modules().len(), unet_modules.len() + te_modules);
    Ok(())
}

#[test]
fn a_stopped_and_resumed_run_writes_the_same_file_as_an_uninterrupted_one() -> anyhow::Result<()> {
    // Gradient accumulation and an odd batch count put a short accumulation at each epoch end.
    // 5 batches per epoch in accumulations of 2: the third step of each epoch is short.
    let training = "max_train_steps = 5\ngradient_accumulation_steps = 2";
    let dir_a = make_job_dir("straight")?;
    let (a, _) = run_job(&dir_a, &job_toml(training, ""), None)?;
    let RunResult::Finished { lora: file_a, .. } = a else {
        anyhow::bail!("uninterrupted run did not finish: {a:?}");
    };

    let dir_b = make_job_dir("resumed")?;
    // The stopped run keeps its state as one file, as a cluster rank uploads it.
    let (b, events) = run_job_with(&dir_b, &job_toml(training, ""), Some(2), true)?;
    let RunResult::Stopped { state, step } = b else {
        anyhow::bail!("the run did not stop: {b:?}");
    };
    assert_eq!(step, 2);
    assert_eq!(state, dir_b.join("out/tiny-state.safetensors"));
    assert!(events.iter().any(|e| matches!(e, RunEvent::Stopped { .. })));
    assert!(!dir_b.join("out/tiny.safetensors").exists());
    let resumed = job_toml(training, "resume = \"out/tiny-state.safetensors\"");
    let (c, events) = run_job(&dir_b, &resumed, None)?;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RunEvent::Started { resumed_at: 2, .. })),
        "the resumed run did not start at step 2"
    );
    let first_step = events.iter().find_map(|e| match e {
        RunEvent::Step { step, .. } => Some(*step),
        _ => None,
    });
    assert_eq!(first_step, Some(3), "step count restarted");
    let RunResult::Finished {
        lora: file_c,
        steps,
    } = c
    else {
        anyhow::bail!("resumed run did not finish: {c:?}");
    };
    assert_eq!(steps, 5);
    let (bytes_a, bytes_c) = (std::fs::read(&file_a)?, std::fs::read(&file_c)?);
    assert!(
        bytes_a == bytes_c,
        "resumed LoRA differs from the uninterrupted one"
    );

    // Same seed, same bytes; another seed, other weights.
    let dir_d = make_job_dir("again")?;
    let (d, _) = run_job(&dir_d, &job_toml(training, ""), None)?;
    let RunResult::Finished { lora: file_d, .. } = d else {
        anyhow::bail!("repeat run did not finish");
    };
    assert!(
        std::fs::read(&file_d)? == bytes_a,
        "same seed gave another file"
    );
    let dir_e = make_job_dir("seed7")?;
    // The initial LoRA already depends on the seed: one step shows it.
    let other = job_toml("max_train_steps = 1", "")
        .replace("seed = 42", "seed = 7")
        .replace("lr_warmup_steps = 2", "lr_warmup_steps = 0");
    let (e, _) = run_job(&dir_e, &other, None)?;
    let RunResult::Finished { lora: file_e, .. } = e else {
        anyhow::bail!("seed-7 run did not finish");
    };
    let ta = lora_tensors(&file_a)?;
    let te = lora_tensors(&file_e)?;
    let key =
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight";
    let diff = (ta[key].to_dtype(DType::F32)? - te[key].to_dtype(DType::F32)?)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert!(diff > 0.0, "another seed gave the same weights");
    Ok(())
}

#[test]
fn resuming_with_another_seed_or_dataset_is_refused() -> anyhow::Result<()> {
    let training = "max_train_steps = 3";
    let dir = make_job_dir("refuse")?;
    let (b, _) = run_job(&dir, &job_toml(training, "save_state = true"), None)?;
    assert!(matches!(b, RunResult::Finished { .. }));
    assert!(dir.join("out/tiny-state/state.json").is_file());
    let text = job_toml(training, "resume = \"out/tiny-state\"").replace("seed = 42", "seed = 1");
    let err = run_job(&dir, &text, None).expect_err("resume with another seed must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("seed was 42, now 1"), "{msg}");
    let text = job_toml(training, "resume = \"out/nope-state\"");
    let msg = format!(
        "{:#}",
        run_job(&dir, &text, None).expect_err("missing state")
    );
    assert!(
        msg.contains("nope-state") && msg.contains("save_state"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn a_diverging_job_stops_and_writes_no_lora() -> anyhow::Result<()> {
    let dir = make_job_dir("nan")?;
    let text = job_toml("max_train_steps = 6", "save_every_n_steps = 1")
        .replace("lr_warmup_steps = 2", "lr_warmup_steps = 0")
        .replace(
            "optimizer_type = \"AdamW\"",
            "optimizer_type = \"SGDNesterov\"",
        )
        .replace("[optimizer]", "[optimizer]\nmax_grad_norm = 0.0")
        .replace("save_precision = \"fp16\"", "save_precision = \"float\"");
    let mut spec = resolve(&text)?;
    // Validation caps learning rates; the trainer's divergence guard is tested past the cap.
    spec.unet_lr = Some(1e30);
    spec.text_encoder_lr = Some(1e30);
    let err = run::run(&spec, &dir, &RunOptions::default(), &mut |_| {})
        .expect_err("a 1e30 learning rate must diverge");
    assert!(matches!(err, Error::Diverged(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("at step") && msg.contains("lr"), "{msg}");
    let finals: Vec<_> = std::fs::read_dir(dir.join("out"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    // Step files written before the loss went non-finite are finite; none after.
    for f in &finals {
        let t = lora_tensors(f)?;
        for (k, v) in t {
            let ok = v
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|x| x.is_finite());
            assert!(ok, "{} holds a non-finite {k}", f.display());
        }
    }
    assert!(!dir.join("out/tiny.safetensors").exists());
    Ok(())
}

#[test]
fn a_run_whose_images_all_become_unreadable_fails_naming_them() -> anyhow::Result<()> {
    let dir = make_job_dir("unreadable")?;
    let text = job_toml("max_train_epochs = 3", "").replace("cache_latents = true", "");
    let spec = resolve(&text)?;
    let ro = RunOptions {
        fixed_time: Some(1_700_000_000),
        ..RunOptions::default()
    };
    let train = dir.join("train");
    let mut broken = false;
    let mut epochs = 0;
    let result = run::run(&spec, &dir, &ro, &mut |e| {
        // The dataset is scanned before the model loads: break every image after the scan.
        if matches!(e, RunEvent::Status { .. }) && !broken {
            broken = true;
            for folder in ["2_wide", "1_tall"] {
                for i in 0..3 {
                    std::fs::write(train.join(folder).join(format!("{i}.png")), b"not a png")
                        .unwrap();
                }
            }
        }
        if matches!(e, RunEvent::Epoch { .. }) {
            epochs += 1;
        }
    });
    let err = match result {
        Ok(r) => panic!("a run with no readable image finished: {r:?}"),
        Err(e) => e,
    };
    assert!(broken);
    assert_eq!(epochs, 0, "an empty epoch was counted");
    assert_eq!(err.kind(), loractl_trainer::ErrorKind::BadConfig);
    let text = err.to_string();
    assert!(text.contains("no usable batch"), "{text}");
    assert!(text.contains("0.png"), "{text}");
    Ok(())
}

#[test]
fn a_missing_base_model_names_its_key_once() -> anyhow::Result<()> {
    let dir = make_job_dir("nomodel")?;
    let text = job_toml("max_train_steps = 1", "").replace(
        &sd1_diffusers().display().to_string(),
        "/nonexistent/sd15.safetensors",
    );
    let spec = resolve(&text)?;
    let plan_err = run::plan(&spec, &dir, true).unwrap_err();
    let run_err = run::run(&spec, &dir, &RunOptions::default(), &mut |_| {}).unwrap_err();
    for err in [plan_err, run_err] {
        assert_eq!(err.kind(), loractl_trainer::ErrorKind::BadConfig);
        let text = format!("{:#}", anyhow::Error::from(err));
        assert!(
            text.contains("model.pretrained_model_name_or_path")
                && text.contains("/nonexistent/sd15.safetensors"),
            "{text}"
        );
        assert!(!text.contains("os error"), "{text}");
    }
    Ok(())
}

#[test]
fn plan_refuses_a_job_larger_than_the_memory() -> anyhow::Result<()> {
    let dir = make_job_dir("memory")?;
    let spec = resolve(&job_toml("max_train_steps = 1", ""))?;
    let plan = run::plan(&spec, &dir, true)?;
    let estimate = plan
        .memory_bytes
        .expect("an estimate with the model inspected");
    let small = run::MemoryLimit {
        bytes: estimate - 1,
        what: "the GPU's memory".into(),
    };
    let err = run::check_memory(estimate, Some(&small)).unwrap_err();
    assert_eq!(err.kind(), loractl_trainer::ErrorKind::BadConfig);
    let text = err.to_string();
    assert!(
        text.contains("memory estimate") && text.contains("the GPU's memory"),
        "{text}"
    );
    let roomy = run::MemoryLimit {
        bytes: estimate,
        what: "x".into(),
    };
    run::check_memory(estimate, Some(&roomy))?;
    run::check_memory(estimate, None)?;
    assert_eq!(
        run::mem_total("MemTotal:       16318412 kB\nMemFree: 1 kB\n"),
        Some(16318412 * 1024)
    );
    assert_eq!(run::mem_total("MemFree: 1 kB\n"), None);
    Ok(())
}

#[test]
fn logging_dir_gets_a_tensorboard_log_with_kohyas_scalars() -> anyhow::Result<()> {
    let dir = make_job_dir("tensorboard")?;
    let text = job_toml("max_train_steps = 4", "[logging]\nlogging_dir = \"logs\"");
    let (_, events) = run_job(&dir, &text, None)?;
    let log = events
        .iter()
        .find_map(|e| match e {
            RunEvent::TrainingLog { path } => Some(path.clone()),
            _ => None,
        })
        .expect("the run announces its TensorBoard log");
    // sd-scripts' layout: a run folder named by the start time, accelerate's project inside.
    assert!(
        log.starts_with(dir.join("logs/20231114221320/network_train")),
        "{}",
        log.display()
    );
    let file = loractl_trainer::tensorboard::read(&log)?;
    let steps: Vec<(usize, f32, f32)> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Step {
                step,
                loss,
                loss_average,
                ..
            } => Some((*step, *loss, *loss_average)),
            _ => None,
        })
        .collect();
    assert_eq!(steps.len(), 4);
    let logged = |tag: &str| -> Vec<(i64, f32)> {
        file.scalars
            .iter()
            .filter(|s| s.tag == tag)
            .map(|s| (s.step, s.value))
            .collect()
    };
    let current: Vec<(i64, f32)> = steps.iter().map(|(s, l, _)| (*s as i64, *l)).collect();
    let average: Vec<(i64, f32)> = steps.iter().map(|(s, _, a)| (*s as i64, *a)).collect();
    assert_eq!(logged("loss/current"), current);
    assert_eq!(logged("loss/average"), average);
    for group in ["lr/unet", "lr/textencoder"] {
        let lrs = logged(group);
        assert_eq!(lrs.len(), 4, "{group}");
        assert!(
            lrs.iter().all(|(_, lr)| lr.is_finite() && *lr >= 0.0),
            "{group}: {lrs:?}"
        );
    }
    let epochs = logged("loss/epoch_average");
    assert!(
        !epochs.is_empty() && epochs.iter().all(|(_, l)| l.is_finite()),
        "{epochs:?}"
    );
    assert!(file.scalars.iter().all(|s| s.wall_time == 1_700_000_000.0));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
