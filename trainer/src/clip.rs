//! The CLIP text encoders of Stable Diffusion (SD1: OpenAI ViT-L/14, SD2: OpenCLIP ViT-H with
//! the last of its 24 layers dropped, as diffusers ships it), with kohya's clip-skip and long-prompt
//! encoding, and the key maps that load them from diffusers, transformers 5 and single-file files.

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use serde::Deserialize;

use crate::nn::{softmax_last_dim, Builder, LayerNorm, Linear, Scope};
use crate::weights::{Fetch, KeyMap, TensorStore};
use crate::{Error, Result};

/// kohya's long prompts are cut into chunks of this many tokens, each wrapped in BOS .. EOS.
pub const CHUNK_TOKENS: usize = 75;
/// `<|startoftext|>`.
pub const BOS_ID: u32 = 49406;
/// `<|endoftext|>`.
pub const EOS_ID: u32 = 49407;
/// SD2's tokenizer pads with `!`, id 0.
pub const SD2_PAD_ID: u32 = 0;

/// Activation of the MLP: OpenAI CLIP uses quick_gelu, OpenCLIP the exact (erf) GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    Gelu,
}

/// transformers' `CLIPTextConfig` (`text_encoder/config.json`); other keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// SD 1.x: OpenAI CLIP ViT-L/14 text tower.
    pub fn sd1() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// SD 2.x: OpenCLIP ViT-H/14 text tower, 23 of its 24 layers (diffusers drops the last,
    /// which SD2 never used: it conditions on the penultimate layer).
    pub fn sd2() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            max_position_embeddings: 77,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// Reads a transformers `config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| {
            Error::Config(format!(
                "{}: not a CLIP text encoder config: {e}",
                path.display()
            ))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Config(format!(
                "CLIP text encoder: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.num_hidden_layers == 0 {
            return Err(Error::Config(
                "CLIP text encoder: num_hidden_layers must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    fn new(cfg: &ClipTextConfig, b: &Builder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::new(h, h, true, &b.pp("q_proj"))?,
            k_proj: Linear::new(h, h, true, &b.pp("k_proj"))?,
            v_proj: Linear::new(h, h, true, &b.pp("v_proj"))?,
            out_proj: Linear::new(h, h, true, &b.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `x` [B, T, C]; `mask` [T, T] additive causal mask.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let d = c / self.heads;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split((self.q_proj.forward(x)? * (d as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let att = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(mask)?;
        let att = softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.out_proj.forward(&y)
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &ClipTextConfig, b: &Builder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(cfg.hidden_size, cfg.intermediate_size, true, &b.pp("fc1"))?,
            fc2: Linear::new(cfg.intermediate_size, cfg.hidden_size, true, &b.pp("fc2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let h = match self.act {
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        self.fc2.forward(&h)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, b: &Builder) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            layer_norm1: LayerNorm::new(cfg.hidden_size, eps, &b.pp("layer_norm1"))?,
            self_attn: Attention::new(cfg, &b.pp("self_attn").scope(Scope::TextEncoder))?,
            layer_norm2: LayerNorm::new(cfg.hidden_size, eps, &b.pp("layer_norm2"))?,
            mlp: Mlp::new(cfg, &b.pp("mlp").scope(Scope::TextEncoder))?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        Ok((x + h)?)
    }
}

/// transformers' `CLIPTextModel` (hidden states only; no pooling / projection).
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
    sites: crate::nn::Sites,
}

impl ClipTextModel {
    /// `builder` should carry the kohya prefix `lora_te`; tensors are read at transformers 4
    /// names (`text_model.…`), LoRA sites are the attention and MLP linears.
    pub fn new(cfg: &ClipTextConfig, builder: &Builder) -> Result<Self> {
        cfg.validate()?;
        let tm = builder.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = emb
            .pp("token_embedding")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?;
        let layers_b = tm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, &layers_b.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            &tm.pp("final_layer_norm"),
        )?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            cfg: cfg.clone(),
            sites: builder.sites().clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// The LoRA sites of this model (kohya `lora_te_*` names), in construction order.
    pub fn sites(&self) -> Vec<crate::nn::LoraSite> {
        self.sites.list()
    }

    /// Hidden state `clip_skip` layers from the end (1 = last layer), with the final layer norm
    /// applied, as sd-scripts conditions the UNet. `input_ids` is [B, T] (integer dtype),
    /// T ≤ max_position_embeddings. Output [B, T, hidden].
    pub fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let n_layers = self.layers.len();
        if clip_skip == 0 || clip_skip > n_layers {
            return Err(Error::Config(format!(
                "clip_skip must be between 1 (last layer) and {n_layers}, got {clip_skip}"
            )));
        }
        let (b, t) = input_ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Config(format!(
                "{t} tokens exceed the text encoder's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let dev = self.token_embedding.device();
        let dtype = self.token_embedding.dtype();
        let ids = input_ids
            .to_dtype(DType::U32)?
            .to_device(dev)?
            .flatten_all()?;
        // The embedding table is frozen: index_select on a constant records no weight gradient.
        let tok =
            self.token_embedding
                .index_select(&ids, 0)?
                .reshape((b, t, self.cfg.hidden_size))?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mask = causal_mask(t, dtype, dev)?;
        // hidden_states[-k] is the output of layer n - k + 1; later layers are not needed.
        for layer in &self.layers[..n_layers + 1 - clip_skip] {
            x = layer.forward(&x, &mask)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// kohya's long-prompt encoding (sd-scripts `get_input_ids` + `get_hidden_states`):
    /// `input_ids` [B, 2 + 75·k] as tokenized with `max_length = 2 + 75·k` is cut into k chunks
    /// `BOS, 75 tokens, last token`, each encoded alone, and the results joined back as the first
    /// chunk's BOS, the 75 middle states of every chunk and the last chunk's final state.
    /// `v2` selects the rewrapping for a tokenizer whose pad differs from EOS (SD2's `!`, id 0):
    /// a chunk that ends inside the text gets EOS as its last token, and an empty chunk
    /// (`BOS, pad, …`) gets EOS right after BOS. For 77 tokens this equals [`Self::forward`].
    pub fn encode_long(&self, input_ids: &Tensor, clip_skip: usize, v2: bool) -> Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        let per = CHUNK_TOKENS + 2;
        if n == per {
            return self.forward(input_ids, clip_skip);
        }
        let chunks = long_prompt_chunks(input_ids, v2)?;
        let k = chunks.dim(0)? / b;
        let h = self.forward(&chunks.to_device(self.token_embedding.device())?, clip_skip)?;
        let c = h.dim(D::Minus1)?;
        let h = h.reshape((b, k * per, c))?;
        // sd-scripts' v2 branch of get_hidden_states compares ids with the EOS *string*, which
        // never matches: both branches join the chunks the same way.
        let mut parts = vec![h.narrow(1, 0, 1)?];
        for i in 0..k {
            parts.push(h.narrow(1, i * per + 1, CHUNK_TOKENS)?);
        }
        parts.push(h.narrow(1, k * per - 1, 1)?);
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// sd-scripts' `get_input_ids` re-wrapping of long-prompt ids [B, 2 + 75·k] into [B·k, 77]
/// chunks `first id, 75 ids, last id` (see [`ClipTextModel::encode_long`] for the `v2` rules,
/// which assume SD2's pad id 0).
pub fn long_prompt_chunks(input_ids: &Tensor, v2: bool) -> Result<Tensor> {
    let (b, n) = input_ids.dims2()?;
    let per = CHUNK_TOKENS + 2;
    if n < per || !(n - 2).is_multiple_of(CHUNK_TOKENS) {
        return Err(Error::Config(format!(
            "long prompt input has {n} tokens; it must be 2 + 75·k (77, 152, 227)"
        )));
    }
    let k = (n - 2) / CHUNK_TOKENS;
    let rows = input_ids
        .to_dtype(DType::U32)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec2::<u32>()?;
    let mut chunks: Vec<u32> = Vec::with_capacity(b * k * per);
    for row in &rows {
        let (first, last) = (row[0], row[n - 1]);
        for c in 0..k {
            let start = 1 + c * CHUNK_TOKENS;
            let mut chunk = Vec::with_capacity(per);
            chunk.push(first);
            chunk.extend_from_slice(&row[start..start + CHUNK_TOKENS]);
            chunk.push(last);
            if v2 {
                // A chunk cut inside the text ends with EOS; an empty one starts BOS, EOS.
                let before_last = chunk[per - 2];
                if before_last != EOS_ID && before_last != SD2_PAD_ID {
                    chunk[per - 1] = EOS_ID;
                }
                if chunk[1] == SD2_PAD_ID {
                    chunk[1] = EOS_ID;
                }
            }
            chunks.extend(chunk);
        }
    }
    Ok(Tensor::from_vec(
        chunks,
        (b * k, per),
        &candle_core::Device::Cpu,
    )?)
}

fn causal_mask(t: usize, dtype: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let vals: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(vals, (t, t), dev)?.to_dtype(dtype)?)
}

const TOKEN_EMBEDDING: &str = "text_model.embeddings.token_embedding.weight";
const SD1_LDM_PREFIX: &str = "cond_stage_model.transformer.";
const SD2_LDM_PREFIX: &str = "cond_stage_model.model.";

/// Layout of diffusers folders written with transformers 4: the store uses the model's names.
pub fn diffusers_layout() -> KeyMap {
    Arc::new(|n: &str| Some(Fetch::Name(n.to_string())))
}

/// transformers ≥ 5 saves `CLIPTextModel` without the `text_model.` level.
pub fn transformers5_layout() -> KeyMap {
    Arc::new(|n: &str| {
        n.strip_prefix("text_model.")
            .map(|s| Fetch::Name(s.to_string()))
    })
}

/// SD1 single-file checkpoint: the transformers model under `cond_stage_model.transformer.`.
pub fn sd1_ldm_layout() -> KeyMap {
    crate::weights::prefixed(SD1_LDM_PREFIX)
}

/// SD1 single-file checkpoints whose text encoder was saved without the `text_model.` level.
fn sd1_ldm_flat_layout() -> KeyMap {
    Arc::new(|n: &str| {
        n.strip_prefix("text_model.")
            .map(|s| Fetch::Name(format!("{SD1_LDM_PREFIX}{s}")))
    })
}

/// SD2 single-file checkpoint: OpenCLIP names under `cond_stage_model.model.`; the fused
/// `in_proj` [3·hidden, hidden] is split into q, k, v rows.
pub fn sd2_ldm_layout(hidden_size: usize) -> KeyMap {
    Arc::new(move |n: &str| {
        let p = SD2_LDM_PREFIX;
        let n = n.strip_prefix("text_model.")?;
        let name = |s: &str| Some(Fetch::Name(format!("{p}{s}")));
        match n {
            "embeddings.token_embedding.weight" => return name("token_embedding.weight"),
            "embeddings.position_embedding.weight" => return name("positional_embedding"),
            _ => {}
        }
        if let Some(rest) = n.strip_prefix("final_layer_norm.") {
            return name(&format!("ln_final.{rest}"));
        }
        let rest = n.strip_prefix("encoder.layers.")?;
        let (idx, rest) = rest.split_once('.')?;
        let block = format!("transformer.resblocks.{idx}.");
        let (module, param) = rest.rsplit_once('.')?;
        let q_k_v = match module {
            "self_attn.q_proj" => Some(0),
            "self_attn.k_proj" => Some(1),
            "self_attn.v_proj" => Some(2),
            _ => None,
        };
        if let Some(i) = q_k_v {
            return Some(Fetch::Rows {
                name: format!("{p}{block}attn.in_proj_{param}"),
                start: i * hidden_size,
                len: hidden_size,
            });
        }
        let ldm = match module {
            "layer_norm1" => "ln_1",
            "layer_norm2" => "ln_2",
            "self_attn.out_proj" => "attn.out_proj",
            "mlp.fc1" => "mlp.c_fc",
            "mlp.fc2" => "mlp.c_proj",
            _ => return None,
        };
        name(&format!("{block}{ldm}.{param}"))
    })
}

/// Which text-encoder layout a store uses, as a key map from the model's names.
/// Recognises diffusers/transformers 4, transformers 5, SD1 and SD2 single-file checkpoints;
/// anything else gets the identity map (loading then reports the first missing tensor).
pub fn detect_layout(store: &dyn TensorStore) -> KeyMap {
    if store.contains(TOKEN_EMBEDDING) {
        return diffusers_layout();
    }
    if store.contains("embeddings.token_embedding.weight") {
        return transformers5_layout();
    }
    if store.contains(&format!("{SD1_LDM_PREFIX}{TOKEN_EMBEDDING}")) {
        return sd1_ldm_layout();
    }
    if store.contains(&format!(
        "{SD1_LDM_PREFIX}embeddings.token_embedding.weight"
    )) {
        return sd1_ldm_flat_layout();
    }
    if let Some(shape) = store.shape(&format!("{SD2_LDM_PREFIX}token_embedding.weight")) {
        return sd2_ldm_layout(shape.get(1).copied().unwrap_or(0));
    }
    diffusers_layout()
}

fn dim(store: &dyn TensorStore, name: &str, axis: usize) -> Result<usize> {
    let shape = store.shape(name).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
        stored_as: None,
        origin: store.origin(),
    })?;
    shape
        .get(axis)
        .copied()
        .ok_or_else(|| Error::ShapeMismatch {
            name: name.to_string(),
            stored_as: None,
            got: shape.clone(),
            expected: vec![0; axis + 1],
            origin: store.origin(),
        })
}

/// Distinct values of the integer path component that follows `prefix` in the store's names.
fn count_indices(store: &dyn TensorStore, prefix: &str) -> usize {
    store
        .names()
        .iter()
        .filter_map(|n| {
            n.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .collect::<BTreeSet<_>>()
        .len()
}

/// The text encoder configuration of a single-file (LDM) checkpoint, read from tensor shapes,
/// and whether it is SD2's OpenCLIP. The head count is not stored anywhere: it follows the real
/// models' rule (64 channels per head, at least one), so a model built with another head size
/// (tiny test models) needs its explicit config (`text_encoder/config.json`).
/// For SD2 the last OpenCLIP block is left out, as diffusers does.
pub fn infer_ldm_config(store: &dyn TensorStore) -> Result<(ClipTextConfig, bool)> {
    let sd1_tm = format!("{SD1_LDM_PREFIX}text_model.");
    let sd1_prefix = if store.contains(&format!("{sd1_tm}embeddings.token_embedding.weight")) {
        Some(sd1_tm)
    } else if store.contains(&format!(
        "{SD1_LDM_PREFIX}embeddings.token_embedding.weight"
    )) {
        Some(SD1_LDM_PREFIX.to_string())
    } else {
        None
    };
    let (cfg, is_sd2) = if let Some(p) = sd1_prefix {
        let tok = format!("{p}embeddings.token_embedding.weight");
        let cfg = ClipTextConfig {
            vocab_size: dim(store, &tok, 0)?,
            hidden_size: dim(store, &tok, 1)?,
            intermediate_size: dim(store, &format!("{p}encoder.layers.0.mlp.fc1.weight"), 0)?,
            num_hidden_layers: count_indices(store, &format!("{p}encoder.layers.")),
            num_attention_heads: (dim(store, &tok, 1)? / 64).max(1),
            max_position_embeddings: dim(
                store,
                &format!("{p}embeddings.position_embedding.weight"),
                0,
            )?,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        };
        (cfg, false)
    } else if store.contains(&format!("{SD2_LDM_PREFIX}token_embedding.weight")) {
        let p = SD2_LDM_PREFIX;
        let tok = format!("{p}token_embedding.weight");
        let blocks = count_indices(store, &format!("{p}transformer.resblocks."));
        let cfg = ClipTextConfig {
            vocab_size: dim(store, &tok, 0)?,
            hidden_size: dim(store, &tok, 1)?,
            intermediate_size: dim(
                store,
                &format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
                0,
            )?,
            num_hidden_layers: blocks.saturating_sub(1),
            num_attention_heads: (dim(store, &tok, 1)? / 64).max(1),
            max_position_embeddings: dim(store, &format!("{p}positional_embedding"), 0)?,
            hidden_act: Activation::Gelu,
            layer_norm_eps: 1e-5,
        };
        (cfg, true)
    } else {
        return Err(Error::bad_checkpoint(
            store.origin(),
            "no text encoder found: expected `cond_stage_model.transformer.*` (SD1) or \
             `cond_stage_model.model.*` (SD2) tensors",
        ));
    };
    cfg.validate().map_err(|e| {
        Error::bad_checkpoint(
            store.origin(),
            format!("text encoder shapes do not give a usable config ({e}); pass the config"),
        )
    })?;
    Ok((cfg, is_sd2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd2_map_splits_fused_projection() {
        let m = sd2_ldm_layout(1024);
        assert_eq!(
            m("text_model.encoder.layers.3.self_attn.k_proj.weight"),
            Some(Fetch::Rows {
                name: "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight".into(),
                start: 1024,
                len: 1024
            })
        );
        assert_eq!(
            m("text_model.encoder.layers.0.mlp.fc2.bias"),
            Some(Fetch::Name(
                "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.bias".into()
            ))
        );
        assert_eq!(
            m("text_model.embeddings.position_embedding.weight"),
            Some(Fetch::Name(
                "cond_stage_model.model.positional_embedding".into()
            ))
        );
        assert_eq!(
            m("text_model.final_layer_norm.weight"),
            Some(Fetch::Name("cond_stage_model.model.ln_final.weight".into()))
        );
    }

    #[test]
    fn transformers5_map_drops_prefix() {
        let m = transformers5_layout();
        assert_eq!(
            m("text_model.encoder.layers.1.layer_norm1.bias"),
            Some(Fetch::Name("encoder.layers.1.layer_norm1.bias".into()))
        );
    }

    #[test]
    fn config_parses_transformers_json() {
        let json = r#"{"architectures":["CLIPTextModel"],"hidden_act":"gelu","hidden_size":1024,
            "intermediate_size":4096,"max_position_embeddings":77,"num_attention_heads":16,
            "num_hidden_layers":23,"vocab_size":49408,"layer_norm_eps":1e-05,"projection_dim":512}"#;
        let cfg: ClipTextConfig = serde_json::from_str(json).expect("parse");
        assert_eq!(cfg, ClipTextConfig::sd2());
    }
}
