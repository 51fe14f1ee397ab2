//! The loader: the same model from a diffusers folder, a single-file `.safetensors` and a
//! single-file `.ckpt` gives identical outputs (and matches diffusers), SD1 vs SD2 is detected,
//! and broken, truncated or wrong files fail with a message that names the problem.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use loractl_trainer::loader::{self, Family, Layout, LoadOptions, StableDiffusion};
use loractl_trainer::lora::LoraNetwork;
use loractl_trainer::schedule::Prediction;

mod support;
use support::{
    assert_mentions, fixture, get, load_tensors, max_abs_diff, scratch_dir, tiny_load_options,
};

fn reference(cfg: &str) -> anyhow::Result<HashMap<String, Tensor>> {
    load_tensors(&fixture(cfg).join("reference.safetensors"))
}

struct Outputs {
    unet: Tensor,
    text: Tensor,
    latent_mean: Tensor,
}

fn run(sd: &StableDiffusion, r: &HashMap<String, Tensor>) -> anyhow::Result<Outputs> {
    let unet = sd.unet.forward(
        get(r, "unet.sample")?,
        get(r, "unet.timesteps")?,
        get(r, "unet.encoder_hidden_states")?,
    )?;
    let text = sd.text_encoder.forward(get(r, "te.input_ids")?, 1)?;
    let latent_mean = sd.vae.encode(get(r, "vae.image")?)?.mean;
    Ok(Outputs {
        unet,
        text,
        latent_mean,
    })
}

#[test]
fn all_three_formats_load_to_identical_models() -> anyhow::Result<()> {
    for (cfg, family) in [("sd1", Family::Sd1), ("sd2", Family::Sd2)] {
        let r = reference(cfg)?;
        let opts = tiny_load_options(cfg)?;
        let folder = loader::load(&fixture(cfg).join("diffusers"), &LoadOptions::default())?;
        assert_eq!(folder.layout, Layout::Diffusers);
        assert_eq!(folder.family, family, "{cfg}");
        let base = run(&folder, &r)?;
        let unet_err = max_abs_diff(&base.unet, get(&r, "unet.out")?)?;
        let te_err = max_abs_diff(&base.text, get(&r, "te.hidden_clip1")?)?;
        let vae_err = max_abs_diff(&base.latent_mean, get(&r, "vae.mean")?)?;
        assert!(unet_err <= 1e-4, "{cfg} unet {unet_err}");
        assert!(te_err <= 1e-4, "{cfg} text encoder {te_err}");
        assert!(vae_err <= 1e-4, "{cfg} vae {vae_err}");
        for (file, layout) in [
            ("model.safetensors", Layout::SingleSafetensors),
            ("model.ckpt", Layout::SingleCkpt),
        ] {
            let sd = loader::load(&fixture(cfg).join(file), &opts)?;
            assert_eq!(sd.layout, layout);
            assert_eq!(sd.family, family, "{cfg} {file}");
            let out = run(&sd, &r)?;
            assert_eq!(
                max_abs_diff(&out.unet, &base.unet)?,
                0.0,
                "{cfg} {file} unet"
            );
            assert_eq!(max_abs_diff(&out.text, &base.text)?, 0.0, "{cfg} {file} te");
            assert_eq!(
                max_abs_diff(&out.latent_mean, &base.latent_mean)?,
                0.0,
                "{cfg} {file} vae"
            );
            assert_eq!(sd.sites().len(), folder.sites().len());
        }
    }
    Ok(())
}

#[test]
fn scheduler_prediction_comes_from_the_folder_or_the_option() -> anyhow::Result<()> {
    let sd2 = loader::load(&fixture("sd2").join("diffusers"), &LoadOptions::default())?;
    assert_eq!(sd2.schedule.prediction(), Prediction::V);
    let sd1 = loader::load(&fixture("sd1").join("diffusers"), &LoadOptions::default())?;
    assert_eq!(sd1.schedule.prediction(), Prediction::Epsilon);
    let opts = LoadOptions {
        v_parameterization: Some(true),
        ..tiny_load_options("sd1")?
    };
    let single = loader::load(&fixture("sd1").join("model.safetensors"), &opts)?;
    assert_eq!(single.schedule.prediction(), Prediction::V);
    Ok(())
}

#[test]
fn kohya_lora_files_load_into_the_loaded_model() -> anyhow::Result<()> {
    let sd = loader::load(&fixture("sd1").join("diffusers"), &LoadOptions::default())?;
    let sites = sd.sites();
    for file in ["lora_unet.safetensors", "lora_te.safetensors"] {
        let net = LoraNetwork::load_file(&sites, &fixture("sd1").join(file), 1.0, &Device::Cpu)?;
        assert!(!net.modules().is_empty(), "{file}");
    }
    Ok(())
}

fn load_err(path: &Path, opts: &LoadOptions) -> String {
    match loader::load(path, opts) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_and_corrupted_files_give_clear_errors() -> anyhow::Result<()> {
    let dir = scratch_dir("loader-broken")?;
    let opts = tiny_load_options("sd1")?;
    for file in ["model.safetensors", "model.ckpt"] {
        let bytes = std::fs::read(fixture("sd1").join(file))?;
        for (what, data) in [
            ("half", bytes[..bytes.len() / 2].to_vec()),
            ("tail", bytes[..bytes.len() - 100].to_vec()),
            ("head", bytes[..20].to_vec()),
        ] {
            let p = dir.join(format!("{what}-{file}"));
            std::fs::write(&p, data)?;
            let msg = load_err(&p, &opts);
            assert_mentions(&msg, &[&p.display().to_string()]);
        }
    }
    let p = dir.join("noise.safetensors");
    std::fs::write(
        &p,
        (0..4096u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<_>>(),
    )?;
    assert_mentions(
        &load_err(&p, &opts),
        &["neither a .safetensors file nor a PyTorch zip checkpoint"],
    );
    let p = dir.join("empty.ckpt");
    std::fs::write(&p, b"")?;
    assert_mentions(&load_err(&p, &opts), &["empty.ckpt"]);
    let missing = dir.join("does-not-exist.safetensors");
    assert_mentions(&load_err(&missing, &opts), &["does-not-exist.safetensors"]);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn write_safetensors(path: &Path, names: &[&str]) -> anyhow::Result<()> {
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?;
    let map: HashMap<String, Tensor> = names.iter().map(|n| (n.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, path)?;
    Ok(())
}

#[test]
fn wrong_kinds_of_files_are_named() -> anyhow::Result<()> {
    let dir = scratch_dir("loader-wrong")?;
    let opts = LoadOptions::default();
    let lora = fixture("sd1").join("lora_unet.safetensors");
    assert_mentions(&load_err(&lora, &opts), &["LoRA file", "network_weights"]);
    let cases = [
        (
            "sdxl.safetensors",
            vec![
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
            ],
            "SDXL",
        ),
        (
            "vae.safetensors",
            vec![
                "encoder.down.0.block.0.conv1.weight",
                "decoder.conv_in.weight",
            ],
            "only a VAE",
        ),
        (
            "other.safetensors",
            vec!["foo.weight"],
            "no Stable Diffusion UNet",
        ),
    ];
    for (name, keys, needle) in cases {
        let p = dir.join(name);
        write_safetensors(&p, &keys)?;
        assert_mentions(&load_err(&p, &opts), &[needle]);
    }
    // A diffusers folder without its unet.
    let folder = dir.join("incomplete");
    for sub in ["text_encoder", "vae", "tokenizer"] {
        std::fs::create_dir_all(folder.join(sub))?;
    }
    assert_mentions(&load_err(&folder, &opts), &["`unet/` is missing"]);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_checkpoint_for_another_architecture_names_the_tensor() -> anyhow::Result<()> {
    // SD2's single file read with SD1's (conv-projection) UNet configuration.
    let opts = LoadOptions {
        unet_config: tiny_load_options("sd1")?.unet_config,
        text_config: tiny_load_options("sd2")?.text_config,
        ..LoadOptions::default()
    };
    let msg = load_err(&fixture("sd2").join("model.safetensors"), &opts);
    assert_mentions(&msg, &["proj_in", "different model configuration"]);
    Ok(())
}
