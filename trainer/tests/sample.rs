//! Preview-image sampling against diffusers and sd-scripts (fixtures from
//! scripts/fixtures/make_sample_fixtures.py): DDIM / Euler / Euler-ancestral steps on fixed model
//! outputs, emphasis parsing, weighted long-prompt conditioning, whole generations on the tiny
//! sd1/sd2 models down to the uint8 image; seeded end-to-end generation; prompt files.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use loractl_trainer::clip::{ClipTextConfig, ClipTextModel};
use loractl_trainer::loader::{self, LoadOptions};
use loractl_trainer::nn::Builder;
use loractl_trainer::sample::{
    load_prompts, parse_prompt_attention, parse_prompt_json, parse_prompt_text, parse_prompt_toml,
    LpwPromptEncoder, NoiseSource, PromptEncoder, SampleConfig, SampleModels, SamplePrompt,
    SampleRequest, SamplerKind, SamplerSettings, Scheduler,
};
use loractl_trainer::schedule::{DdpmSchedule, Prediction};
use loractl_trainer::tokenizer::ClipTokenizer;
use loractl_trainer::unet::{UNet2DConditionModel, UNetConfig};
use loractl_trainer::vae::{AutoencoderKL, VaeConfig};
use loractl_trainer::weights::{open_safetensors, prefixed, Weights};
use serde_json::Value;

mod support;
use support::{fixture, get, load_tensors, max_abs_diff, scratch_dir, sd1_diffusers};

/// Scheduler steps (no model): scaled error, see [`scaled_err`].
const STEP_TOL: f32 = 1e-5;
/// Model outputs (embeddings abs, latents scaled).
const TOL: f32 = 1e-4;

fn sample_dir() -> PathBuf {
    let dir = fixture("sample");
    assert!(
        dir.join("schedulers.json").exists(),
        "sampling fixtures missing at {} (regenerate with scripts/fixtures/make_sample_fixtures.py)",
        dir.display()
    );
    dir
}

fn json(path: &Path) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// Max abs error relative to the reference's scale (Euler latents reach ~60, where one f32 ulp
/// is 4e-6): max|a − b| / max(1, max|b|).
fn scaled_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale = b
        .to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    Ok(max_abs_diff(a, b)? / scale.max(1.0))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn sampler_of(name: &str) -> Result<SamplerKind> {
    Ok(name.parse()?)
}

fn settings_of(config: &str) -> Result<SamplerSettings> {
    if config.starts_with("kohya") {
        return Ok(SamplerSettings::kohya());
    }
    let path = sample_dir().join(format!("{config}_scheduler_config.json"));
    Ok(SamplerSettings::from_scheduler_config(
        &std::fs::read_to_string(path)?,
    )?)
}

fn schedule_for(prediction: &str) -> Result<DdpmSchedule> {
    let p = match prediction {
        "epsilon" => Prediction::Epsilon,
        "v_prediction" => Prediction::V,
        other => anyhow::bail!("prediction {other}"),
    };
    Ok(DdpmSchedule::sd()?.with_prediction(p))
}

/// Timesteps, sigmas and init_noise_sigma for several step counts, then a 10-step run on fixed
/// model outputs (and fixed ancestral noise), for sd-scripts' and the hub's scheduler configs.
#[test]
fn scheduler_steps_match_diffusers() -> Result<()> {
    let dir = sample_dir();
    let meta = json(&dir.join("schedulers.json"))?;
    let t = load_tensors(&dir.join("schedulers.safetensors"))?;
    let mut worst = 0f32;
    let mut runs = 0;
    for (config, samplers) in meta.as_object().context("schedulers.json")? {
        let settings = settings_of(config)?;
        for (name, entry) in samplers.as_object().context("config entry")? {
            let kind = sampler_of(name)?;
            let schedule = schedule_for(entry["prediction_type"].as_str().unwrap_or_default())?;
            let what = format!("{config}/{name}");
            for (steps, info) in entry["info"].as_object().context("info")? {
                let s = Scheduler::new(kind, &schedule, &settings, steps.parse()?)?;
                let want = floats(&info["timesteps"]);
                anyhow::ensure!(
                    s.timesteps().len() == want.len()
                        && s.timesteps()
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| (a - b).abs() < 1e-4),
                    "{what} {steps} steps: timesteps {:?} vs {want:?}",
                    s.timesteps()
                );
                let init = info["init_noise_sigma"].as_f64().unwrap_or(f64::NAN);
                anyhow::ensure!(
                    (s.init_noise_sigma() - init).abs() < 1e-5,
                    "{what} {steps}: init_noise_sigma {} vs {init}",
                    s.init_noise_sigma()
                );
                if let Some(ours) = s.sigmas() {
                    let want = floats(&info["sigmas"]);
                    anyhow::ensure!(ours.len() == want.len(), "{what}: sigma count");
                    for (a, b) in ours.iter().zip(&want) {
                        anyhow::ensure!(
                            (f64::from(*a) - b).abs() < 1e-5,
                            "{what} {steps}: sigma {a} vs {b}"
                        );
                    }
                }
            }

            let key = |k: &str| format!("{config}.{name}.{k}");
            let s = Scheduler::new(kind, &schedule, &settings, 10)?;
            let outputs = get(&t, &key("model_outputs"))?;
            let noises = get(&t, &key("noises"))?;
            let inputs = get(&t, &key("inputs"))?;
            let samples = get(&t, &key("samples"))?;
            let mut x = (get(&t, &key("x_init"))? * s.init_noise_sigma())?;
            let mut used = 0;
            for i in 0..s.num_steps() {
                let input = s.scale_model_input(&x, i)?;
                let e = scaled_err(&input, &inputs.get(i)?)?;
                anyhow::ensure!(e <= STEP_TOL, "{what} step {i}: model input err {e}");
                worst = worst.max(e);
                let noise = if s.needs_noise() {
                    used += 1;
                    Some(noises.get(i)?)
                } else {
                    None
                };
                x = s.step(&outputs.get(i)?, i, &x, noise.as_ref())?;
                let e = scaled_err(&x, &samples.get(i)?)?;
                anyhow::ensure!(e <= STEP_TOL, "{what} step {i}: sample err {e}");
                worst = worst.max(e);
            }
            anyhow::ensure!(
                Some(used) == entry["noise_used"].as_u64(),
                "{what}: drew {used} noises"
            );
            runs += 1;
        }
    }
    assert_eq!(runs, 18);
    eprintln!("scheduler parity: {runs} runs, max scaled err {worst:.3e}");
    Ok(())
}

#[test]
fn emphasis_parsing_matches_sd_scripts() -> Result<()> {
    let cases = json(&sample_dir().join("attention_cases.json"))?;
    for case in cases.as_array().context("cases")? {
        let text = case["text"].as_str().context("text")?;
        let ours = parse_prompt_attention(text)?;
        let want: Vec<(String, f64)> = case["parsed"]
            .as_array()
            .context("parsed")?
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap_or_default().to_string(),
                    p[1].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect();
        assert_eq!(ours.len(), want.len(), "{text:?}: {ours:?} vs {want:?}");
        for ((a, wa), (b, wb)) in ours.iter().zip(&want) {
            assert_eq!(a, b, "{text:?}");
            assert!((wa - wb).abs() < 1e-12, "{text:?}: weight {wa} vs {wb}");
        }
    }
    Ok(())
}

/// The tiny fixture model, built as the unet/clip/vae tests build it.
struct Tiny {
    unet: UNet2DConditionModel,
    text_encoder: ClipTextModel,
    tokenizer: ClipTokenizer,
    vae: AutoencoderKL,
    schedule: DdpmSchedule,
}

fn tiny(model: &str) -> Result<Tiny> {
    let dir = fixture(model).join("diffusers");
    let dev = Device::Cpu;
    let weights = |file: PathBuf| -> Result<Weights> {
        Ok(Weights::new(open_safetensors(&file)?, prefixed("")))
    };
    let ucfg = UNetConfig::from_json(
        &std::fs::read_to_string(dir.join("unet/config.json"))?,
        "unet/config.json",
    )?;
    let vb = weights(dir.join("unet/diffusion_pytorch_model.safetensors"))?
        .var_builder(DType::F32, &dev);
    let unet = UNet2DConditionModel::new(&ucfg, &Builder::new(vb, "lora_unet"))?;
    let tcfg = ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?;
    let vb = weights(dir.join("text_encoder/model.safetensors"))?.var_builder(DType::F32, &dev);
    let text_encoder = ClipTextModel::new(&tcfg, &Builder::new(vb, "lora_te"))?;
    let vcfg = VaeConfig::from_json(&std::fs::read_to_string(dir.join("vae/config.json"))?)?;
    let vb =
        weights(dir.join("vae/diffusion_pytorch_model.safetensors"))?.var_builder(DType::F32, &dev);
    let vae = AutoencoderKL::new(&vcfg, &Builder::new(vb, "vae"))?;
    let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
    let schedule = DdpmSchedule::from_scheduler_config(&std::fs::read_to_string(
        dir.join("scheduler/scheduler_config.json"),
    )?)?;
    Ok(Tiny {
        unet,
        text_encoder,
        tokenizer,
        vae,
        schedule,
    })
}

/// Serves recorded tensors in order (initial latents, then each step's ancestral noise).
struct Recorded(VecDeque<Tensor>);

impl NoiseSource for Recorded {
    fn randn(
        &mut self,
        shape: &[usize],
        _device: &Device,
    ) -> loractl_trainer::Result<candle_core::Tensor> {
        let t = self.0.pop_front().ok_or_else(|| {
            loractl_trainer::Error::Config("recorded noise exhausted".to_string())
        })?;
        Ok(t.reshape(shape)?)
    }
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

fn pipeline_parity(model: &str) -> Result<()> {
    let dir = sample_dir();
    let meta = json(&dir.join("pipeline.json"))?;
    let t = load_tensors(&dir.join("pipeline.safetensors"))?;
    let m = tiny(model)?;
    let entry = &meta[model];

    let mut worst_embed = 0f32;
    for (i, case) in entry["embeddings"]
        .as_array()
        .context("embeddings")?
        .iter()
        .enumerate()
    {
        let clip_skip = case["clip_skip"].as_u64().context("clip_skip")? as usize;
        let enc = LpwPromptEncoder::new(&m.text_encoder, &m.tokenizer, clip_skip);
        let prompt = case["prompt"].as_str().context("prompt")?;
        let negative = opt_str(&case["negative"]).unwrap_or_default();
        let c = enc.encode(prompt, Some(&negative))?;
        let uncond = c.uncond.context("uncond")?;
        for (name, ours) in [("cond", &c.cond), ("uncond", &uncond)] {
            let want = get(&t, &format!("{model}.embed{i}.{name}"))?;
            let e = max_abs_diff(ours, want)?;
            anyhow::ensure!(
                e <= TOL,
                "{model} embedding case {i} {name}: max abs err {e}"
            );
            worst_embed = worst_embed.max(e);
        }
    }

    let mut worst_latent = 0f32;
    let mut worst_pixel = 0u8;
    for (i, g) in entry["generations"]
        .as_array()
        .context("generations")?
        .iter()
        .enumerate()
    {
        let clip_skip = g["clip_skip"].as_u64().context("clip_skip")? as usize;
        let enc = LpwPromptEncoder::new(&m.text_encoder, &m.tokenizer, clip_skip);
        let models = SampleModels {
            unet: &m.unet,
            vae: &m.vae,
            schedule: &m.schedule,
            encoder: &enc,
            device: Device::Cpu,
        };
        let req = SampleRequest {
            prompt: g["prompt"].as_str().context("prompt")?.to_string(),
            negative_prompt: opt_str(&g["negative"]),
            width: g["width"].as_u64().context("width")? as u32,
            height: g["height"].as_u64().context("height")? as u32,
            steps: g["steps"].as_u64().context("steps")? as usize,
            scale: g["scale"].as_f64().context("scale")?,
            sampler: sampler_of(g["sampler"].as_str().context("sampler")?)?,
            seed: None,
        };
        let key = |k: &str| format!("{model}.gen{i}.{k}");
        let mut queue = VecDeque::from([get(&t, &key("init"))?.clone()]);
        if let Some(n) = t.get(&key("noises")) {
            for j in 0..n.dim(0)? {
                queue.push_back(n.get(j)?);
            }
        }
        let mut noise = Recorded(queue);
        let out = models.generate_with(&req, &SamplerSettings::kohya(), &mut noise)?;
        anyhow::ensure!(noise.0.is_empty(), "{model} gen {i}: unused noise");
        let e = scaled_err(&out.latents, get(&t, &key("latents"))?)?;
        anyhow::ensure!(
            e <= TOL,
            "{model} gen {i} ({}): latents err {e}",
            req.sampler
        );
        worst_latent = worst_latent.max(e);
        let want = get(&t, &key("image"))?;
        let (h, w, _) = want.dims3()?;
        anyhow::ensure!(
            (out.image.width(), out.image.height()) == (w as u32, h as u32),
            "{model} gen {i}: image size"
        );
        let want = want.flatten_all()?.to_vec1::<u8>()?;
        let diff = out
            .image
            .as_raw()
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        anyhow::ensure!(diff <= 1, "{model} gen {i}: pixel diff {diff}");
        worst_pixel = worst_pixel.max(diff);
    }
    eprintln!(
        "{model} pipeline: embeddings max abs err {worst_embed:.3e}, latents scaled err \
         {worst_latent:.3e}, max pixel diff {worst_pixel}"
    );
    Ok(())
}

support::tests_of!(pipeline_parity {
    sd1_pipeline_matches_sd_scripts => "sd1",
    sd2_v_pipeline_matches_sd_scripts => "sd2",
});

/// A seeded prompt-file line end to end on the tiny sd1 model: size, determinism, seed
/// sensitivity, PNG files named as sd-scripts names them.
#[test]
fn seeded_generation_end_to_end() -> Result<()> {
    let sd = loader::load(&sd1_diffusers(), &LoadOptions::default())?;
    let enc = LpwPromptEncoder::new(&sd.text_encoder, &sd.tokenizer, 1);
    let models = SampleModels::new(&sd, &enc, Device::Cpu);
    let cfg = SampleConfig {
        steps: 4,
        ..SampleConfig::default()
    };
    let text = "a (red:1.2) cat --n blurry, lowres --w 32 --h 32 --d 7 --l 7.5\n\
                a red cat --n blurry, lowres --w 32 --h 32 --d 8 --ss euler_a\n";
    let prompts = parse_prompt_text(text, "inline")?;
    let a = models.generate(&prompts[0], &cfg)?;
    // sd-scripts never samples below 64 pixels a side.
    assert_eq!(a.dimensions(), (64, 64));
    let again = models.generate(&prompts[0], &cfg)?;
    assert_eq!(a.as_raw(), again.as_raw(), "same seed, same image");
    let mut other = prompts[0].clone();
    other.seed = Some(8);
    let b = models.generate(&other, &cfg)?;
    let changed = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .count();
    assert!(
        changed > a.as_raw().len() / 2,
        "only {changed} bytes differ"
    );

    let out = scratch_dir("sample-e2e")?;
    let paths = models.sample_images(&prompts, &cfg, &out, Some("zenny"), None, 120)?;
    assert_eq!(paths.len(), 2);
    for (p, (idx, seed)) in paths.iter().zip([(0, 7), (1, 8)]) {
        assert_eq!(p.parent(), Some(out.join("sample").as_path()));
        let name = p.file_name().and_then(|n| n.to_str()).context("name")?;
        assert!(
            name.starts_with(&format!("zenny_000120_{idx:02}_")),
            "{name}"
        );
        assert!(name.ends_with(&format!("_{seed}.png")), "{name}");
        let img = image::open(p)?.to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        if idx == 0 {
            assert_eq!(
                img.as_raw(),
                a.as_raw(),
                "saved PNG differs from the generated image"
            );
        }
    }
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// Sampling with live LoRA variables must not leave a graph behind.
#[test]
fn closures_encode_and_outputs_are_detached() -> Result<()> {
    let m = tiny("sd1")?;
    let var = candle_core::Var::ones((1, 77, 32), DType::F32, &Device::Cpu)?;
    let seen = std::cell::Cell::new(false);
    let enc = |_: &str, neg: Option<&str>| -> loractl_trainer::Result<_> {
        seen.set(neg == Some(""));
        let live = (var.as_tensor() * 0.5)?;
        Ok(loractl_trainer::sample::Conditioning {
            cond: live.clone(),
            uncond: neg.map(|_| live),
        })
    };
    let models = SampleModels {
        unet: &m.unet,
        vae: &m.vae,
        schedule: &m.schedule,
        encoder: &enc,
        device: Device::Cpu,
    };
    let req = SampleRequest::resolve(
        &SamplePrompt {
            steps: Some(2),
            seed: Some(1),
            ..SamplePrompt::new("x")
        },
        &SampleConfig::default(),
    );
    let req = SampleRequest {
        width: 64,
        height: 64,
        ..req
    };
    let mut noise = loractl_trainer::sample::SeededNoise::new(1);
    let out = models.generate_with(&req, &SamplerSettings::kohya(), &mut noise)?;
    assert!(
        seen.get(),
        "no negative prompt means an empty one under guidance"
    );
    assert!(!out.latents.track_op(), "latents carry a graph");
    Ok(())
}

#[test]
fn prompt_text_files() -> Result<()> {
    let text = "# comment line\n\
                \n\
                masterpiece, 1girl --n low quality, worst quality --w 768 --H 512 --d 1234 --s 28 --l 6.5 --ss euler_a\n\
                \x20\x20# not a comment in sd-scripts (only column 0 counts)\n\
                plain prompt\r\n\
                steps clamp --s 0000 --s 5000\n";
    let p = parse_prompt_text(text, "prompts.txt")?;
    assert_eq!(p.len(), 4);
    assert_eq!(
        p[0],
        SamplePrompt {
            index: 0,
            prompt: "masterpiece, 1girl".into(),
            negative_prompt: Some("low quality, worst quality".into()),
            width: Some(768),
            height: Some(512),
            seed: Some(1234),
            steps: Some(28),
            scale: Some(6.5),
            sampler: Some(SamplerKind::EulerAncestral),
        }
    );
    assert_eq!(
        p[1].prompt,
        "# not a comment in sd-scripts (only column 0 counts)"
    );
    assert_eq!((p[2].index, p[2].prompt.as_str()), (2, "plain prompt"));
    assert_eq!(p[3].steps, Some(1000), "last --s wins, clamped to 1000");
    let r = SampleRequest::resolve(&p[2], &SampleConfig::default());
    assert_eq!(
        (r.width, r.height, r.steps, r.scale, r.sampler, r.seed),
        (512, 512, 30, 7.5, SamplerKind::Ddim, None)
    );

    let errors = [
        ("ok\nbad --w big", "line 2", "`--w`"),
        ("x --d -5", "line 1", "`--d`"),
        ("x --l -1", "line 1", "`--l`"),
        ("x --ss dpmsolver++", "line 1", "not supported"),
        ("x --ss sideways", "line 1", "unknown sampler `sideways`"),
        ("# c\n\nx --q 3", "line 3", "unknown option `--q`"),
        ("x --n", "line 1", "`--n`"),
        ("x -- --w 5", "line 1", "empty option"),
        ("x --cn img.png", "line 1", "`--cn`"),
    ];
    for (text, line, what) in errors {
        let e = parse_prompt_text(text, "p.txt").unwrap_err().to_string();
        assert!(
            e.contains("p.txt") && e.contains(line) && e.contains(what),
            "{text:?}: {e}"
        );
    }
    // Options of other model families are accepted and ignored, as in sd-scripts.
    assert_eq!(parse_prompt_text("x --g 3.5 --fs 3", "p")?[0].prompt, "x");
    Ok(())
}

#[test]
fn prompt_json_and_toml_files() -> Result<()> {
    let j = r#"["a cat --w 640 --d 3",
               {"prompt": "a dog", "negative_prompt": "ugly", "width": 768, "height": 512,
                "seed": 9, "sample_steps": 20, "scale": 5, "sample_sampler": "k_euler",
                "guidance_scale": 3.5, "negative_prompt_2": null}]"#;
    let p = parse_prompt_json(j, "p.json")?;
    assert_eq!((p[0].width, p[0].seed, p[0].index), (Some(640), Some(3), 0));
    assert_eq!(
        p[1],
        SamplePrompt {
            index: 1,
            prompt: "a dog".into(),
            negative_prompt: Some("ugly".into()),
            width: Some(768),
            height: Some(512),
            seed: Some(9),
            steps: Some(20),
            scale: Some(5.0),
            sampler: Some(SamplerKind::Euler),
        }
    );
    let e = parse_prompt_json(r#"[{"prompt": "x", "widht": 5}]"#, "p.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt 1") && e.contains("`widht`"), "{e}");
    let e = parse_prompt_json(r#"["ok", "x --w q"]"#, "p.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt 2") && e.contains("`--w`"), "{e}");
    assert!(parse_prompt_json(r#"{"prompt": "x"}"#, "p.json").is_err());

    let t = r#"
        [prompt]
        negative_prompt = "lowres"
        width = 512
        sample_steps = 25

        [[prompt.subset]]
        prompt = "a cat"
        seed = 1

        [[prompt.subset]]
        prompt = "a dog"
        width = 768
    "#;
    let p = parse_prompt_toml(t, "p.toml")?;
    assert_eq!(p.len(), 2);
    assert_eq!(
        (
            p[0].prompt.as_str(),
            p[0].negative_prompt.as_deref(),
            p[0].width,
            p[0].steps,
            p[0].seed
        ),
        ("a cat", Some("lowres"), Some(512), Some(25), Some(1))
    );
    assert_eq!((p[1].index, p[1].width), (1, Some(768)));
    let e = parse_prompt_toml("[prompt]\nwidth = 5\n", "p.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt.subset"), "{e}");
    let e = parse_prompt_toml("[prompt]\n[[prompt.subset]]\nprompt = 3\n", "p.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prompt.subset 1") && e.contains("`prompt`"),
        "{e}"
    );

    let dir = scratch_dir("prompts")?;
    for (name, body) in [
        ("a.txt", "x --d 1\n"),
        ("a.json", "[\"x --d 1\"]"),
        (
            "a.toml",
            "[prompt]\n[[prompt.subset]]\nprompt = \"x\"\nseed = 1\n",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body)?;
        let p = load_prompts(&path)?;
        assert_eq!((p[0].prompt.as_str(), p[0].seed), ("x", Some(1)), "{name}");
    }
    std::fs::write(dir.join("a.yaml"), "x")?;
    assert!(load_prompts(&dir.join("a.yaml")).is_err());
    assert!(load_prompts(&dir.join("missing.txt")).is_err());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
