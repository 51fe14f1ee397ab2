//! UNet parity with diffusers (fixtures from `scripts/fixtures/make_fixtures.py`): forward from
//! the diffusers folder and from the single-file checkpoint, LoRA gradients against PyTorch's,
//! and the LoRA sites and LDM layout of the real SD1.5 / SD2.1 configurations.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use loractl_trainer::lora::LoraNetwork;
use loractl_trainer::nn::{Builder, Scope};
use loractl_trainer::unet::{
    infer_ldm_config, ldm_key_map, PerBlock, UNet2DConditionModel, UNetConfig, LDM_UNET_PREFIX,
};
use loractl_trainer::weights::{open_safetensors, prefixed, TensorStore, Weights};

mod support;
use support::{fixture, get, load_tensors, max_abs_diff, norm};

const FORWARD_TOL: f32 = 1e-4;
const GRAD_REL_TOL: f64 = 1e-3;

fn diffusers_config(cfg: &str) -> anyhow::Result<UNetConfig> {
    let path = fixture(cfg).join("diffusers/unet/config.json");
    Ok(UNetConfig::from_json(
        &std::fs::read_to_string(&path)?,
        &path.display().to_string(),
    )?)
}

/// The UNet from the fixture's diffusers folder.
fn diffusers_unet(cfg: &str) -> anyhow::Result<UNet2DConditionModel> {
    let config = diffusers_config(cfg)?;
    let store =
        open_safetensors(&fixture(cfg).join("diffusers/unet/diffusion_pytorch_model.safetensors"))?;
    let vb = Weights::new(store, prefixed("")).var_builder(DType::F32, &Device::Cpu);
    Ok(UNet2DConditionModel::new(
        &config,
        &Builder::new(vb, "lora_unet"),
    )?)
}

/// (name, shape) of every tensor the model asked for, in order.
type Requested = Vec<(String, Vec<usize>)>;
type Recorded = Arc<Mutex<Requested>>;

/// Records every name the model asks for, serving the tensors from `inner`.
struct Recording<B> {
    inner: B,
    names: Recorded,
}

impl<B: SimpleBackend> SimpleBackend for Recording<B> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut g) = self.names.lock() {
            g.push((name.to_string(), s.dims().to_vec()));
        }
        self.inner.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Zero tensors of any shape without allocating them (a broadcast scalar), so the full-size
/// SD1.5 / SD2.1 graphs can be built to list their sites and tensor names.
struct LazyZeros;

impl SimpleBackend for LazyZeros {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("lazy zeros: no shape for `{name}`")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn build_recording<B: SimpleBackend + 'static>(
    cfg: &UNetConfig,
    inner: B,
) -> anyhow::Result<(UNet2DConditionModel, Requested)> {
    let names: Recorded = Arc::default();
    let backend = Recording {
        inner,
        names: names.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let model = UNet2DConditionModel::new(cfg, &Builder::new(vb, "lora_unet"))?;
    let list = names
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    Ok((model, list))
}

fn forward_parity(cfg: &str) -> anyhow::Result<()> {
    let unet = diffusers_unet(cfg)?;
    let r = load_tensors(&fixture(cfg).join("reference.safetensors"))?;
    for tag in ["", "_rect"] {
        let out = unet.forward(
            get(&r, &format!("unet.sample{tag}"))?,
            get(&r, &format!("unet.timesteps{tag}"))?,
            get(&r, &format!("unet.encoder_hidden_states{tag}"))?,
        )?;
        let want = get(&r, &format!("unet.out{tag}"))?;
        let err = max_abs_diff(&out, want)?;
        println!(
            "{cfg} unet.out{tag}: max abs error {err:.3e} (|ref| max {:.3})",
            want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?
        );
        assert!(err <= FORWARD_TOL, "{cfg}{tag}: max abs error {err}");
    }
    Ok(())
}

support::tests_of!(forward_parity {
    sd1_forward_matches_diffusers => "sd1",
    sd2_forward_matches_diffusers => "sd2",
});

/// The single-file checkpoint through `ldm_key_map` gives the same model, bit for bit, reads
/// every UNet tensor of the file, and `infer_ldm_config` recovers the configuration.
fn single_file_parity(cfg: &str) -> anyhow::Result<()> {
    let config = diffusers_config(cfg)?;
    let store = open_safetensors(&fixture(cfg).join("model.safetensors"))?;

    let inferred = infer_ldm_config(store.as_ref())?;
    let expected_heads = if config.use_linear_projection {
        // The fixture's tiny SD2 does not follow the real model's 64-wide heads; a caller with
        // such a model passes its config, as here.
        assert_eq!(inferred.attention_head_dim, PerBlock::Each(vec![1, 1]));
        inferred.attention_head_dim.clone()
    } else {
        assert_eq!(inferred.attention_head_dim, PerBlock::All(8));
        config.attention_head_dim.clone()
    };
    let comparable = UNetConfig {
        attention_head_dim: expected_heads,
        norm_num_groups: inferred.norm_num_groups,
        other: BTreeMap::new(),
        ..config.clone()
    };
    assert_eq!(inferred, comparable, "{cfg}: inferred config");

    let weights = Weights::new(store.clone(), ldm_key_map(&config));
    let (unet, requested) = build_recording(&config, weights)?;
    let map = ldm_key_map(&config);
    let used: BTreeSet<String> = requested
        .iter()
        .filter_map(|(n, _)| map(n).map(|f| f.source().to_string()))
        .collect();
    let in_file: BTreeSet<String> = store
        .names()
        .into_iter()
        .filter(|n| n.starts_with(LDM_UNET_PREFIX))
        .collect();
    assert_eq!(
        used.len(),
        requested.len(),
        "two model tensors share an LDM name"
    );
    assert_eq!(used, in_file, "{cfg}: LDM tensors read vs present");

    let reference = diffusers_unet(cfg)?;
    let r = load_tensors(&fixture(cfg).join("reference.safetensors"))?;
    for tag in ["", "_rect"] {
        let args = [
            get(&r, &format!("unet.sample{tag}"))?,
            get(&r, &format!("unet.timesteps{tag}"))?,
            get(&r, &format!("unet.encoder_hidden_states{tag}"))?,
        ];
        let a = unet.forward(args[0], args[1], args[2])?;
        let b = reference.forward(args[0], args[1], args[2])?;
        let err = max_abs_diff(&a, &b)?;
        println!("{cfg} single-file vs diffusers folder{tag}: max abs difference {err:e}");
        assert_eq!(err, 0.0, "{cfg}{tag}: single-file output differs");
    }
    Ok(())
}

support::tests_of!(single_file_parity {
    sd1_single_file_matches_diffusers_folder => "sd1",
    sd2_single_file_matches_diffusers_folder => "sd2",
});

fn lora_gradient_parity(cfg: &str) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let unet = diffusers_unet(cfg)?;
    let sites = unet.sites();
    let lora = load_tensors(&fixture(cfg).join("lora_unet.safetensors"))?;
    let grads_ref = load_tensors(&fixture(cfg).join("grads.safetensors"))?;
    let r = load_tensors(&fixture(cfg).join("reference.safetensors"))?;

    let modules_in_file: BTreeSet<&str> = lora
        .keys()
        .filter_map(|k| k.split_once('.').map(|(m, _)| m))
        .collect();
    let net = LoraNetwork::from_tensors(&sites, &lora, 1.0, &dev, "lora_unet.safetensors")?;
    assert_eq!(net.modules().len(), modules_in_file.len());
    // The fixture LoRA targets every site (transformers and conv_dim), as kohya would.
    assert_eq!(sites.len(), modules_in_file.len(), "{cfg}: site count");
    net.apply();

    let out = unet.forward(
        get(&r, "unet.sample")?,
        get(&r, "unet.timesteps")?,
        get(&r, "unet.encoder_hidden_states")?,
    )?;
    let out_err = max_abs_diff(&out, get(&grads_ref, "unet.lora_out")?)?;
    println!("{cfg} LoRA'd unet output: max abs error {out_err:.3e}");
    assert!(out_err <= FORWARD_TOL, "{cfg}: LoRA output error {out_err}");
    let loss = (out - get(&grads_ref, "unet.lora_target")?)?
        .sqr()?
        .mean_all()?;
    let loss_err = max_abs_diff(&loss, &get(&grads_ref, "unet.loss")?.reshape(())?)?;
    assert!(loss_err <= FORWARD_TOL, "{cfg}: loss error {loss_err}");

    let grads = loss.backward()?;
    let mut worst = (0.0f64, String::new());
    for m in net.modules() {
        for (what, var) in [("lora_down", &m.down), ("lora_up", &m.up)] {
            let key = format!("unet.{}.{what}.weight", m.name);
            let want = get(&grads_ref, &key)?.reshape(var.dims())?;
            let got = grads
                .get(var.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("{cfg}: no gradient for {key}"))?;
            let got_norm = norm(got)?;
            assert!(got_norm > 0.0, "{cfg}: zero gradient for {key}");
            let rel = norm(&(got - &want)?)? / norm(&want)?;
            if rel > worst.0 {
                worst = (rel, key.clone());
            }
            assert!(rel <= GRAD_REL_TOL, "{cfg}: {key} relative error {rel}");
        }
    }
    println!(
        "{cfg}: {} LoRA modules, worst gradient relative error {:.3e} ({})",
        net.modules().len(),
        worst.0,
        worst.1
    );

    // Frozen weights stay out of the backward pass entirely.
    let frozen = unet.frozen_linear_weights();
    assert!(!frozen.is_empty());
    for w in &frozen {
        assert!(
            grads.get(w).is_none(),
            "{cfg}: a frozen weight got a gradient"
        );
    }
    let frozen_ids: HashSet<_> = frozen.iter().map(|w| w.id()).collect();
    assert!(grads.get_ids().all(|id| !frozen_ids.contains(id)));
    Ok(())
}

support::tests_of!(lora_gradient_parity {
    sd1_lora_gradients_match_pytorch => "sd1",
    sd2_lora_gradients_match_pytorch => "sd2",
});

/// The site names equal the fixture's kohya module list.
#[test]
fn site_names_match_kohya() -> anyhow::Result<()> {
    let listing: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora_modules.json"),
    )?)?;
    for cfg in ["sd1", "sd2"] {
        let want: BTreeSet<String> = listing[cfg]["lora_unet_names"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("lora_unet_names missing"))?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let got: BTreeSet<String> = diffusers_unet(cfg)?
            .sites()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(got, want, "{cfg}");
    }
    Ok(())
}

/// The real SD1.5 / SD2.1 graphs, built over zero tensors that are never allocated: kohya's
/// module counts, diffusers' tensor count, and the LDM layout round trip through
/// `infer_ldm_config`.
#[test]
fn real_presets_sites_and_ldm_layout() -> anyhow::Result<()> {
    for (name, cfg) in [("sd15", UNetConfig::sd15()), ("sd21", UNetConfig::sd21())] {
        let (model, tensors) = build_recording(&cfg, LazyZeros)?;
        let sites = model.sites();
        let count = |scope: Scope| sites.iter().filter(|s| s.scope == scope).count();
        assert_eq!(count(Scope::Transformer), 192, "{name}: transformer sites");
        // 22 resnets × (conv1, conv2, time_emb_proj), 14 shortcuts (2 down, all 12 up),
        // 3 down- and 3 upsamplers.
        assert_eq!(
            count(Scope::ResnetConv),
            22 * 3 + 14 + 6,
            "{name}: resnet sites"
        );
        assert_eq!(sites.len(), 192 + 86);
        assert!(sites
            .iter()
            .any(|s| s.name
                == "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"));
        // diffusers' UNet2DConditionModel state dict for SD1.5 / SD2.1 has 686 tensors.
        assert_eq!(tensors.len(), 686, "{name}: tensor count");

        let map = ldm_key_map(&cfg);
        let shapes: HashMap<String, Vec<usize>> = tensors
            .iter()
            .map(|(n, s)| {
                let f = map(n).ok_or_else(|| anyhow::anyhow!("{name}: `{n}` has no LDM name"))?;
                Ok((f.source().to_string(), s.clone()))
            })
            .collect::<anyhow::Result<_>>()?;
        assert_eq!(shapes.len(), tensors.len(), "{name}: LDM names collide");
        let inferred = infer_ldm_config(&ShapeStore(shapes))?;
        assert_eq!(
            inferred,
            UNetConfig {
                upcast_attention: false,
                ..cfg.clone()
            },
            "{name}"
        );
    }
    Ok(())
}

/// A store that knows only names and shapes (enough for `infer_ldm_config`).
struct ShapeStore(HashMap<String, Vec<usize>>);

impl TensorStore for ShapeStore {
    fn origin(&self) -> String {
        "shapes".into()
    }
    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.get(name).cloned()
    }
    fn load(&self, name: &str, _: &Device) -> loractl_trainer::Result<Tensor> {
        Err(loractl_trainer::Error::MissingTensor {
            name: name.into(),
            stored_as: None,
            origin: "shapes".into(),
        })
    }
}

/// Latents whose size is not a multiple of 2^(blocks-1) (7×9 here) go through the resized
/// upsampling path; forward and LoRA backward both run. (Ad-hoc diffusers comparison at 7×9
/// agreed to 1.3e-6; the committed fixtures hold only 16×16 and 16×24.)
#[test]
fn odd_latent_size_runs_forward_and_backward() -> anyhow::Result<()> {
    let unet = diffusers_unet("sd1")?;
    let r = load_tensors(&fixture("sd1").join("reference.safetensors"))?;
    let sample = get(&r, "unet.sample")?.narrow(2, 0, 7)?.narrow(3, 0, 9)?;
    let lora = load_tensors(&fixture("sd1").join("lora_unet.safetensors"))?;
    let net = LoraNetwork::from_tensors(&unet.sites(), &lora, 1.0, &Device::Cpu, "lora")?;
    net.apply();
    let out = unet.forward(
        &sample,
        get(&r, "unet.timesteps")?,
        get(&r, "unet.encoder_hidden_states")?,
    )?;
    assert_eq!(out.dims(), &[3, 4, 7, 9]);
    let grads = out.sqr()?.mean_all()?.backward()?;
    for m in net.modules() {
        let g = grads
            .get(m.up.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient for {}", m.name))?;
        assert!(norm(g)?.is_finite() && norm(g)? > 0.0, "{}", m.name);
    }
    Ok(())
}
