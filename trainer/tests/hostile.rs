//! Hostile model files: a tensor of the wrong rank or shape in any layout (single-file LDM
//! safetensors and `.ckpt`, diffusers folders, LoRA `network_weights`) is an error naming the
//! tensor and both shapes, never a panic; a base model given as `network_weights` is refused
//! saying what it is, and a LoRA saved as `.ckpt` is read as kohya reads it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::Device;
use loractl_trainer::loader::{self, LoadOptions};
use loractl_trainer::lora::{self, LoraConfig};
use loractl_trainer::ErrorKind;

mod support;
use support::{assert_mentions, fixture, tiny_load_options, TempDir};

/// The tiny SD1 model's configurations, as `from_single_file(config=...)` takes them; with
/// `infer_unet` the UNet's is left to be read from the tensor shapes.
fn tiny_options(infer_unet: bool) -> LoadOptions {
    let options = tiny_load_options("sd1").expect("fixture configs");
    LoadOptions {
        unet_config: options.unet_config.filter(|_| !infer_unet),
        ..options
    }
}

/// Loads `path`, turning a panic into a test failure that says so.
fn load_err(path: &Path, opts: &LoadOptions) -> String {
    let result = catch_unwind(AssertUnwindSafe(|| loader::load(path, opts)));
    match result {
        Err(_) => panic!("loading {} panicked", path.display()),
        Ok(Ok(_)) => panic!("{} loaded", path.display()),
        Ok(Err(e)) => {
            // A file that does not fit the model is the job's to fix: a bad config (exit 78),
            // never retried.
            assert_eq!(e.kind(), ErrorKind::BadConfig, "{e}");
            e.to_string()
        }
    }
}

/// The two files the issue reported (1-D `attn2.to_k.weight`, 0-D `out_layers.3.weight`) and
/// more: the single-file UNet configuration is read from shapes that are checked first.
#[test]
fn single_file_unet_tensors_of_the_wrong_rank_are_refused_while_inferring_the_config() {
    let t = TempDir::new("ldm-rank");
    let cases: [(&str, &[usize]); 5] = [
        (
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            &[64],
        ),
        (
            "model.diffusion_model.input_blocks.1.0.out_layers.3.weight",
            &[],
        ),
        ("model.diffusion_model.input_blocks.0.0.weight", &[32, 4]),
        ("model.diffusion_model.out.2.weight", &[4, 0, 3, 3]),
        ("model.diffusion_model.middle_block.1.proj_in.weight", &[64]),
    ];
    for (i, (name, shape)) in cases.into_iter().enumerate() {
        let file = t.join(format!("model{i}.safetensors"));
        std::fs::write(
            &file,
            support::with_tensor_reshaped(&fixture("sd1/model.safetensors"), name, shape),
        )
        .expect("write");
        for shapes_only in [false, true] {
            let opts = LoadOptions {
                shapes_only,
                ..tiny_options(true)
            };
            let msg = load_err(&file, &opts);
            assert_mentions(&msg, &[name, &format!("{shape:?}")]);
        }
    }
}

/// With the configuration given, every model's tensors are checked against it before they
/// are read: UNet, text encoder and VAE, in the single-file and diffusers layouts.
#[test]
fn every_layout_refuses_a_tensor_of_the_wrong_shape_naming_both_shapes() {
    let t = TempDir::new("shapes");
    let single: [(&str, &[usize], &str); 3] = [
        (
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            &[64],
            "[64, 32]",
        ),
        (
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
            &[],
            "[32, 32]",
        ),
        (
            "first_stage_model.encoder.conv_in.weight",
            &[3],
            "[32, 3, 3, 3]",
        ),
    ];
    for (i, (name, shape, expected)) in single.into_iter().enumerate() {
        let file = t.join(format!("single{i}.safetensors"));
        std::fs::write(
            &file,
            support::with_tensor_reshaped(&fixture("sd1/model.safetensors"), name, shape),
        )
        .expect("write");
        let msg = load_err(&file, &tiny_options(false));
        assert_mentions(&msg, &[name, &format!("{shape:?}"), expected]);
    }

    let diffusers: [(&str, &str, &[usize], &str); 3] = [
        (
            "unet/diffusion_pytorch_model.safetensors",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            &[64],
            "[64, 32]",
        ),
        (
            "text_encoder/model.safetensors",
            "text_model.encoder.layers.0.self_attn.k_proj.weight",
            &[],
            "[32, 32]",
        ),
        (
            "vae/diffusion_pytorch_model.safetensors",
            "encoder.conv_in.weight",
            &[32, 3, 3],
            "[32, 3, 3, 3]",
        ),
    ];
    for (i, (file, name, shape, expected)) in diffusers.into_iter().enumerate() {
        let folder = t.join(format!("diffusers{i}"));
        copy_dir(&fixture("sd1/diffusers"), &folder);
        std::fs::write(
            folder.join(file),
            support::with_tensor_reshaped(&fixture("sd1/diffusers").join(file), name, shape),
        )
        .expect("write");
        let msg = load_err(&folder, &LoadOptions::default());
        assert_mentions(&msg, &[name, &format!("{shape:?}"), expected]);
    }
}

/// The same through the `.ckpt` reader: the UNet's tensors as float32 storages, one of them
/// 1-D.
#[test]
fn a_ckpt_with_a_tensor_of_the_wrong_rank_is_refused_naming_it() {
    let t = TempDir::new("ckpt-rank");
    let bad = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight";
    let tensors: Vec<(String, Vec<u64>, Vec<u8>)> =
        support::read_safetensors(&fixture("sd1/model.safetensors"))
            .into_iter()
            .filter(|(_, dtype, _, _)| dtype == "F16")
            .map(|(name, _, shape, bytes)| {
                let f32s: Vec<u8> = bytes
                    .chunks_exact(2)
                    .flat_map(|b| {
                        half::f16::from_le_bytes([b[0], b[1]])
                            .to_f32()
                            .to_le_bytes()
                    })
                    .collect();
                let shape: Vec<u64> = if name == bad {
                    vec![shape.iter().product::<usize>() as u64]
                } else {
                    shape.iter().map(|&d| d as u64).collect()
                };
                (name, shape, f32s)
            })
            .collect();
    let bytes = support::float32_checkpoint(&tensors);
    let file = t.join("model.ckpt");
    std::fs::write(&file, bytes).expect("write");
    let msg = load_err(&file, &tiny_options(true));
    assert_mentions(&msg, &[bad, "[2048]"]);
    let msg = load_err(&file, &tiny_options(false));
    assert_mentions(&msg, &[bad, "[2048]", "[64, 32]"]);
}

fn sites() -> Vec<loractl_trainer::nn::LoraSite> {
    let opts = LoadOptions {
        shapes_only: true,
        ..LoadOptions::default()
    };
    loader::load(&fixture("sd1/diffusers"), &opts)
        .expect("tiny model")
        .sites()
}

fn unet_only() -> LoraConfig {
    // The fixture LoRA's network: network_dim 4, conv_dim 4 (conv_alpha 1), UNet only.
    LoraConfig {
        rank: 4,
        conv_rank: Some(4),
        conv_alpha: Some(1.0),
        train_text_encoder: false,
        ..LoraConfig::default()
    }
}

/// A LoRA file with a tensor of the wrong rank: an error naming it, at the check and when
/// read.
#[test]
fn a_lora_tensor_of_the_wrong_rank_is_refused_naming_it() {
    let t = TempDir::new("lora-rank");
    let original = fixture("sd1/lora_unet.safetensors");
    let name = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight";
    let file = t.join("lora.safetensors");
    let sites = sites();
    for shape in [&[][..], &[4][..], &[4, 32, 1, 1, 1][..]] {
        std::fs::write(&file, support::with_tensor_reshaped(&original, name, shape))
            .expect("write");
        let store = lora::open_network_weights(&file).expect("a LoRA by its names");
        let err = catch_unwind(AssertUnwindSafe(|| {
            lora::check_network_weights(store.as_ref(), &sites, &unet_only())
        }))
        .expect("no panic")
        .expect_err("wrong shape");
        assert_mentions(&err.to_string(), &[name, &format!("{shape:?}")]);
        let loaded = catch_unwind(AssertUnwindSafe(|| {
            lora::LoraNetwork::load_file(&sites, &file, 1.0, &Device::Cpu)
        }))
        .expect("no panic");
        assert!(loaded.is_err(), "{shape:?} loaded");
    }
    // The untouched file passes the check.
    let store = lora::open_network_weights(&original).expect("fixture");
    lora::check_network_weights(store.as_ref(), &sites, &unet_only()).expect("fixture fits");
}

fn refused(path: &Path) -> loractl_trainer::Error {
    match lora::open_network_weights(path) {
        Ok(_) => panic!("{} was taken as a LoRA", path.display()),
        Err(e) => e,
    }
}

/// sd-scripts' `network_weights` given a base model: refused by what it is, in every format.
#[test]
fn a_base_model_given_as_network_weights_is_refused_saying_so() {
    for p in ["sd1/model.safetensors", "sd1/model.ckpt"] {
        let err = refused(&fixture(p));
        assert!(
            matches!(err, loractl_trainer::Error::Config(_)),
            "{p}: {err:?}"
        );
        assert_mentions(
            &err.to_string(),
            &[
                "network_weights",
                p,
                "base model",
                "pretrained_model_name_or_path",
            ],
        );
    }
    let err = refused(&fixture("sd1/diffusers"));
    assert_mentions(&err.to_string(), &["is a folder"]);
    let err = refused(&fixture("sd1/diffusers/unet/config.json"));
    assert_mentions(
        &err.to_string(),
        &["network_weights", "not a readable LoRA file"],
    );
}

/// A LoRA saved with `torch.save` (kohya reads those with `torch.load`) gives the same tensors
/// as its safetensors twin.
#[test]
fn a_lora_saved_as_ckpt_reads_like_its_safetensors_twin() {
    let t = TempDir::new("lora-ckpt");
    let tensors: Vec<(String, Vec<u64>, Vec<u8>)> =
        support::read_safetensors(&fixture("sd1/lora_unet.safetensors"))
            .into_iter()
            .map(|(name, _, shape, bytes)| (name, shape.iter().map(|&d| d as u64).collect(), bytes))
            .collect();
    let bytes = support::float32_checkpoint(&tensors);
    let file = t.join("lora.ckpt");
    std::fs::write(&file, bytes).expect("write");
    let store = lora::open_network_weights(&file).expect("a .ckpt LoRA");
    lora::check_network_weights(store.as_ref(), &sites(), &unet_only()).expect("fits");
    let from_ckpt = lora::read_network_weights(store.as_ref(), &Device::Cpu).expect("read");
    let twin = candle_core::safetensors::load(fixture("sd1/lora_unet.safetensors"), &Device::Cpu)
        .expect("twin");
    assert_eq!(from_ckpt.len(), twin.len());
    for (name, want) in &twin {
        let got = &from_ckpt[name];
        assert_eq!(got.dims(), want.dims(), "{name}");
        let diff = (got - want)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("compare");
        assert_eq!(diff, 0.0, "{name}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).expect("copy");
        }
    }
}
