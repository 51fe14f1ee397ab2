//! CLIP text encoder parity with transformers' `CLIPTextModel` on the sd1/sd2 fixtures, loaded
//! from the diffusers folder, the single-file LDM checkpoint and a transformers-5-style copy;
//! kohya long prompts and LoRA gradients. References come from scripts/fixtures/make_fixtures.py
//! (`te.*` in reference.safetensors and grads.safetensors).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use loractl_trainer::clip::{
    detect_layout, infer_ldm_config, long_prompt_chunks, ClipTextConfig, ClipTextModel,
};
use loractl_trainer::lora::LoraNetwork;
use loractl_trainer::nn::{Builder, LoraSite};
use loractl_trainer::weights::{open_safetensors, KeyMap, MemoryStore, TensorStore, Weights};

mod support;
use support::{get, load_tensors, max_abs_diff, model_fixture};

const TOL: f32 = 1e-4;

fn build(
    cfg: &ClipTextConfig,
    store: Arc<dyn TensorStore>,
    map: KeyMap,
) -> Result<(ClipTextModel, Vec<LoraSite>)> {
    let vb = Weights::new(store, map).var_builder(DType::F32, &Device::Cpu);
    let b = Builder::new(vb, "lora_te");
    let model = ClipTextModel::new(cfg, &b)?;
    Ok((model, b.sites().list()))
}

fn diffusers_config(dir: &Path) -> Result<ClipTextConfig> {
    Ok(ClipTextConfig::from_file(
        &dir.join("diffusers/text_encoder/config.json"),
    )?)
}

/// Every `te.*` output of the fixture: (name, ours); asserts each within TOL and returns them.
fn outputs(
    model: &ClipTextModel,
    r: &HashMap<String, Tensor>,
    v2: bool,
    what: &str,
) -> Result<Vec<(String, Tensor)>> {
    let ids = get(r, "te.input_ids")?;
    let mut out = vec![
        ("te.hidden_clip1".to_string(), model.forward(ids, 1)?),
        ("te.hidden_clip2".to_string(), model.forward(ids, 2)?),
    ];
    for long in ["te.long", "te.long_trunc"] {
        let ids = get(r, &format!("{long}_input_ids"))?;
        out.push((format!("{long}_hidden"), model.encode_long(ids, 1, v2)?));
        out.push((
            format!("{long}_hidden_clip2"),
            model.encode_long(ids, 2, v2)?,
        ));
    }
    for (name, ours) in &out {
        let err = max_abs_diff(ours, get(r, name)?)?;
        eprintln!("{what}: {name} max abs err {err:.3e}");
        assert!(err <= TOL, "{what}: {name} max abs err {err} > {TOL}");
    }
    Ok(out)
}

fn same(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) -> Result<()> {
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let err = max_abs_diff(x, y)?;
        assert!(err == 0.0, "{what}: {name} differs from diffusers by {err}");
    }
    Ok(())
}

fn parity(config: &str, v2: bool) -> Result<()> {
    let dir = model_fixture(config);
    let r = load_tensors(&dir.join("reference.safetensors"))?;
    let cfg = diffusers_config(&dir)?;

    // diffusers folder (transformers 4 names).
    let te_path = dir.join("diffusers/text_encoder/model.safetensors");
    let store = open_safetensors(&te_path)?;
    let map = detect_layout(store.as_ref());
    let (model, _) = build(&cfg, store, map)?;
    let reference = outputs(&model, &r, v2, &format!("{config} diffusers"))?;

    // Single-file LDM checkpoint through the LDM map.
    let store = open_safetensors(&dir.join("model.safetensors"))?;
    let (inferred, is_sd2) = infer_ldm_config(store.as_ref())?;
    assert_eq!(is_sd2, v2, "{config}: infer_ldm_config is_sd2");
    // Heads cannot be read from shapes (64 per head in real models); the rest must match.
    assert_eq!(
        ClipTextConfig {
            num_attention_heads: cfg.num_attention_heads,
            ..inferred
        },
        cfg,
        "{config}: inferred LDM config"
    );
    let map = detect_layout(store.as_ref());
    let (model, _) = build(&cfg, store, map)?;
    let ldm = outputs(&model, &r, v2, &format!("{config} single file"))?;
    same(&reference, &ldm, &format!("{config} single file"))?;

    // transformers 5 layout: the same tensors without the `text_model.` prefix.
    let tensors = load_tensors(&te_path)?
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
        .collect();
    let store: Arc<dyn TensorStore> = Arc::new(MemoryStore {
        origin: "transformers-5 copy".into(),
        tensors,
    });
    assert!(store.contains("embeddings.token_embedding.weight"));
    let map = detect_layout(store.as_ref());
    let (model, _) = build(&cfg, store, map)?;
    let t5 = outputs(&model, &r, v2, &format!("{config} transformers-5"))?;
    same(&reference, &t5, &format!("{config} transformers-5"))?;

    // sd-scripts' re-wrapped chunks.
    for long in ["te.long", "te.long_trunc"] {
        let ours = long_prompt_chunks(get(&r, &format!("{long}_input_ids"))?, v2)?;
        let want = get(&r, &format!("{long}_chunk_ids"))?
            .to_dtype(DType::U32)?
            .reshape(ours.dims())?;
        assert_eq!(
            ours.to_vec2::<u32>()?,
            want.to_vec2::<u32>()?,
            "{config}: {long} chunks"
        );
    }
    Ok(())
}

#[test]
fn sd1_text_encoder_parity() -> Result<()> {
    parity("sd1", false)
}

#[test]
fn sd2_text_encoder_parity() -> Result<()> {
    parity("sd2", true)
}

support::tests_of!(lora_gradients {
    sd1_lora_gradients => "sd1",
    sd2_lora_gradients => "sd2",
});

fn lora_gradients(config: &str) -> Result<()> {
    let dir = model_fixture(config);
    let grads_ref = load_tensors(&dir.join("grads.safetensors"))?;
    let r = load_tensors(&dir.join("reference.safetensors"))?;
    let cfg = diffusers_config(&dir)?;
    let store = open_safetensors(&dir.join("diffusers/text_encoder/model.safetensors"))?;
    let map = detect_layout(store.as_ref());
    let (model, sites) = build(&cfg, store, map)?;
    assert_eq!(
        sites.len(),
        cfg.num_hidden_layers * 6,
        "{config}: LoRA sites"
    );

    let lora = load_tensors(&dir.join("lora_te.safetensors"))?;
    let net = LoraNetwork::from_tensors(&sites, &lora, 1.0, &Device::Cpu, "lora_te")?;
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("../lora_modules.json"))?)?;
    assert_eq!(
        Some(net.modules().len() as u64),
        counts[config]["lora_te_modules"].as_u64(),
        "{config}: module count"
    );
    net.apply();

    let out = model.forward(get(&r, "te.input_ids")?, 1)?;
    let lora_out_err = max_abs_diff(&out, get(&grads_ref, "te.lora_out")?)?;
    let loss = (out - get(&grads_ref, "te.lora_target")?)?
        .sqr()?
        .mean_all()?;
    let want_loss = get(&grads_ref, "te.loss")?.to_dtype(DType::F32)?;
    let loss_err = (loss.to_scalar::<f32>()? - want_loss.flatten_all()?.to_vec1::<f32>()?[0]).abs();
    eprintln!("{config}: lora_out max abs err {lora_out_err:.3e}, loss err {loss_err:.3e}");
    assert!(lora_out_err <= TOL && loss_err <= TOL);

    let grads = loss.backward()?;
    let mut worst = 0f32;
    for m in net.modules() {
        for (var, part) in [(&m.down, "lora_down"), (&m.up, "lora_up")] {
            let key = format!("te.{}.{part}.weight", m.name);
            let want = get(&grads_ref, &key)?;
            let got = grads
                .get(var.as_tensor())
                .with_context(|| format!("{key}: no gradient"))?;
            let norm =
                |t: &Tensor| -> Result<f32> { Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?) };
            let got_norm = norm(got)?;
            assert!(got_norm > 0.0, "{key}: zero gradient");
            let rel = norm(&(got - want)?)? / norm(want)?;
            worst = worst.max(rel);
            assert!(rel <= 1e-3, "{key}: gradient rel err {rel}");
        }
    }
    eprintln!(
        "{config}: {} LoRA modules, worst gradient rel err {worst:.3e}",
        net.modules().len()
    );
    Ok(())
}

#[test]
fn clip_skip_out_of_range_is_an_error() -> Result<()> {
    let dir = model_fixture("sd1");
    let cfg = diffusers_config(&dir)?;
    let store = open_safetensors(&dir.join("diffusers/text_encoder/model.safetensors"))?;
    let map = detect_layout(store.as_ref());
    let (model, _) = build(&cfg, store, map)?;
    let ids = Tensor::zeros((1, 77), DType::U32, &Device::Cpu)?;
    assert!(model.forward(&ids, 0).is_err());
    assert!(model.forward(&ids, cfg.num_hidden_layers + 1).is_err());
    let bad = Tensor::zeros((1, 100), DType::U32, &Device::Cpu)?;
    assert!(model.encode_long(&bad, 1, false).is_err());
    Ok(())
}
