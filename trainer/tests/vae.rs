//! VAE parity with diffusers `AutoencoderKL` on the sd1/sd2 fixtures, loaded both from the
//! diffusers folder and from the single-file LDM checkpoint through `ldm_key_map`.
//! References come from scripts/fixtures/make_fixtures.py (`vae.*` in reference.safetensors).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use loractl_trainer::nn::Builder;
use loractl_trainer::vae::{infer_ldm_config, ldm_key_map, AutoencoderKL, VaeConfig};
use loractl_trainer::weights::{open_safetensors, prefixed, Fetch, MemoryStore, Weights};

mod support;
use support::{load_tensors, max_abs_diff, model_fixture};

const TOL: f32 = 1e-4;

fn load_vae(cfg: &VaeConfig, weights: &Weights) -> Result<AutoencoderKL> {
    let vb = weights.var_builder(DType::F32, &Device::Cpu);
    Ok(AutoencoderKL::new(cfg, &Builder::new(vb, "vae"))?)
}

/// Runs encode (mean, std) and decode(mean), returning the max abs error of each.
fn check(vae: &AutoencoderKL, reference: &HashMap<String, Tensor>, what: &str) -> Result<[f32; 3]> {
    let get = |k: &str| support::get(reference, k);
    let posterior = vae.encode(get("vae.image")?)?;
    let decoded = vae.decode(get("vae.mean")?)?;
    let errs = [
        max_abs_diff(&posterior.mean, get("vae.mean")?)?,
        max_abs_diff(&posterior.std, get("vae.std")?)?,
        max_abs_diff(&decoded, get("vae.decoded")?)?,
    ];
    eprintln!(
        "{what}: max abs err mean {:.3e} std {:.3e} decoded {:.3e}",
        errs[0], errs[1], errs[2]
    );
    for (e, name) in errs.iter().zip(["mean", "std", "decoded"]) {
        anyhow::ensure!(*e <= TOL, "{what}: {name} max abs err {e} > {TOL}");
    }
    Ok(errs)
}

fn parity(config: &str) -> Result<()> {
    let dir = model_fixture(config);
    let reference = load_tensors(&dir.join("reference.safetensors"))?;

    let vae_dir = dir.join("diffusers/vae");
    let json = std::fs::read_to_string(vae_dir.join("config.json"))?;
    let cfg = VaeConfig::from_json(&json)?;
    let store = open_safetensors(&vae_dir.join("diffusion_pytorch_model.safetensors"))?;
    let diffusers = load_vae(&cfg, &Weights::new(store, prefixed("")))?;
    check(&diffusers, &reference, &format!("{config} diffusers"))?;

    let single = open_safetensors(&dir.join("model.safetensors"))?;
    let inferred = infer_ldm_config(single.as_ref())?;
    assert_eq!(inferred.block_out_channels, cfg.block_out_channels);
    assert_eq!(inferred.layers_per_block, cfg.layers_per_block);
    assert_eq!(inferred.latent_channels, cfg.latent_channels);
    assert_eq!(inferred.in_channels, cfg.in_channels);
    assert_eq!(inferred.out_channels, cfg.out_channels);
    // Group count is not recorded in LDM files; the fixture's diffusers config supplies it.
    let ldm_cfg = VaeConfig {
        norm_num_groups: cfg.norm_num_groups,
        ..inferred
    };
    let ldm = load_vae(&ldm_cfg, &Weights::new(single, ldm_key_map(&ldm_cfg)))?;
    check(&ldm, &reference, &format!("{config} single-file"))?;

    // Both layouts hold the same weights: outputs must agree exactly.
    let image = &reference["vae.image"];
    let (a, b) = (diffusers.encode(image)?, ldm.encode(image)?);
    assert_eq!(max_abs_diff(&a.mean, &b.mean)?, 0.0);
    assert_eq!(max_abs_diff(&a.std, &b.std)?, 0.0);
    Ok(())
}

support::tests_of!(parity {
    sd1_vae_matches_diffusers => "sd1",
    sd2_vae_matches_diffusers => "sd2",
});

/// A tiny VAE with random weights, as a store in diffusers layout.
fn tiny_random_vae() -> Result<(VaeConfig, MemoryStore)> {
    let cfg = VaeConfig {
        block_out_channels: vec![8, 16],
        layers_per_block: 1,
        norm_num_groups: 4,
        latent_channels: 2,
        ..VaeConfig::sd()
    };
    // Building from a VarMap creates every tensor the model asks for, under its diffusers name.
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    AutoencoderKL::new(&cfg, &Builder::new(vb, "vae"))?;
    let data = varmap.data().lock().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tensors = HashMap::new();
    for (name, var) in data.iter() {
        let t = Tensor::randn(0f32, 0.3, var.shape(), &Device::Cpu)?;
        tensors.insert(name.clone(), t);
    }
    let store = MemoryStore {
        origin: "tiny".to_string(),
        tensors,
    };
    Ok((cfg, store))
}

#[test]
fn encode_detaches_and_samples_reproducibly() -> Result<()> {
    let (cfg, store) = tiny_random_vae()?;
    let vae = load_vae(&cfg, &Weights::new(Arc::new(store), prefixed("")))?;
    // The graph must not be recorded even for an input that tracks gradients.
    let image = Var::from_tensor(&Tensor::randn(0f32, 0.5, (1, 3, 8, 8), &Device::Cpu)?)?;
    let posterior = vae.encode(image.as_tensor())?;
    assert!(!posterior.mean.track_op() && !posterior.std.track_op());
    assert_eq!(posterior.mean.dims(), &[1, 2, 4, 4]);
    let a = posterior.sample_seeded(3)?;
    let b = posterior.sample_seeded(3)?;
    let c = posterior.sample_seeded(4)?;
    assert_eq!(max_abs_diff(&a, &b)?, 0.0);
    assert!(max_abs_diff(&a, &c)? > 0.0);
    let decoded = vae.decode(&a)?;
    assert_eq!(decoded.dims(), &[1, 3, 8, 8]);
    assert!(!decoded.track_op());
    Ok(())
}

#[test]
fn ldm_layout_round_trip() -> Result<()> {
    let (cfg, store) = tiny_random_vae()?;
    // Rename every tensor to its LDM name, attention projections as 1×1 conv weights.
    let map = ldm_key_map(&cfg);
    let mut ldm = HashMap::new();
    for (name, t) in &store.tensors {
        match map(name).with_context(|| format!("no LDM name for `{name}`"))? {
            Fetch::Name(n) => ldm.insert(n, t.clone()),
            Fetch::Squeeze(n) if t.rank() == 2 => ldm.insert(n, t.unsqueeze(2)?.unsqueeze(3)?),
            Fetch::Squeeze(n) => ldm.insert(n, t.clone()),
            other => anyhow::bail!("unexpected fetch {other:?}"),
        };
    }
    assert_eq!(ldm.len(), store.tensors.len());
    let ldm = MemoryStore {
        origin: "tiny-ldm".to_string(),
        tensors: ldm,
    };
    let inferred = infer_ldm_config(&ldm)?;
    assert_eq!(
        VaeConfig {
            norm_num_groups: cfg.norm_num_groups,
            ..inferred.clone()
        },
        cfg
    );
    let a = load_vae(&cfg, &Weights::new(Arc::new(store), prefixed("")))?;
    let b = load_vae(&cfg, &Weights::new(Arc::new(ldm), ldm_key_map(&cfg)))?;
    let image = Tensor::randn(0f32, 0.5, (2, 3, 8, 16), &Device::Cpu)?;
    let (pa, pb) = (a.encode(&image)?, b.encode(&image)?);
    assert_eq!(max_abs_diff(&pa.mean, &pb.mean)?, 0.0);
    assert_eq!(
        max_abs_diff(&a.decode(&pa.mean)?, &b.decode(&pb.mean)?)?,
        0.0
    );
    Ok(())
}
