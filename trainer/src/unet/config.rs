//! The UNet's configuration: a diffusers `unet/config.json` read with serde (defaults are
//! diffusers' constructor defaults), the real SD1.5 / SD2.1 values, and the check that rejects
//! every option this implementation does not model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One value for every block, or one per down block (diffusers accepts both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The value for down block `i` (up block `n - 1 - i`).
    pub fn get(&self, i: usize) -> Option<T> {
        match self {
            PerBlock::All(v) => Some(*v),
            PerBlock::Each(v) => v.get(i).copied(),
        }
    }
    fn values(&self) -> Vec<T> {
        match self {
            PerBlock::All(v) => vec![*v],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

pub const CROSS_ATTN_DOWN: &str = "CrossAttnDownBlock2D";
pub const DOWN: &str = "DownBlock2D";
pub const CROSS_ATTN_UP: &str = "CrossAttnUpBlock2D";
pub const UP: &str = "UpBlock2D";

/// A `UNet2DConditionModel` configuration as diffusers writes it.
///
/// `attention_head_dim` is, despite its name, the number of attention HEADS per block: diffusers
/// kept the key for backward compatibility (`num_attention_heads = num_attention_heads or
/// attention_head_dim`). SD1.x stores 8 (8 heads everywhere); SD2.x stores `[5, 10, 20, 20]`,
/// which with channels `[320, 640, 1280, 1280]` is a head size of 64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    /// Attention head COUNT per block (see the type's docs).
    pub attention_head_dim: PerBlock<usize>,
    pub cross_attention_dim: usize,
    /// `proj_in`/`proj_out` of each transformer are `Linear` (SD2) instead of 1×1 convs (SD1).
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// Accepted and ignored: diffusers' default (SDPA) attention processor ignores it too, and
    /// it changes nothing in f32.
    pub upcast_attention: bool,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub only_cross_attention: PerBlock<bool>,
    /// Every other key of the file; the ones that would change the network are checked by
    /// [`UNetConfig::validate`], the rest (`sample_size`, `_class_name`, ...) are ignored.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl Default for UNetConfig {
    /// diffusers' `UNet2DConditionModel.__init__` defaults.
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            down_block_types: vec![
                CROSS_ATTN_DOWN.into(),
                CROSS_ATTN_DOWN.into(),
                CROSS_ATTN_DOWN.into(),
                DOWN.into(),
            ],
            up_block_types: vec![
                UP.into(),
                CROSS_ATTN_UP.into(),
                CROSS_ATTN_UP.into(),
                CROSS_ATTN_UP.into(),
            ],
            attention_head_dim: PerBlock::All(8),
            cross_attention_dim: 1280,
            use_linear_projection: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            upcast_attention: false,
            transformer_layers_per_block: PerBlock::All(1),
            only_cross_attention: PerBlock::All(false),
            other: BTreeMap::new(),
        }
    }
}

/// Keys this implementation does not model, with the only value(s) it accepts (diffusers'
/// defaults for SD1.x/SD2.x). `Null` means the key must be absent or null.
fn unsupported_keys() -> Vec<(&'static str, Vec<serde_json::Value>)> {
    use serde_json::{json, Value};
    vec![
        ("num_attention_heads", vec![Value::Null]),
        ("class_embed_type", vec![Value::Null]),
        ("num_class_embeds", vec![Value::Null]),
        ("addition_embed_type", vec![Value::Null]),
        ("encoder_hid_dim", vec![Value::Null]),
        ("encoder_hid_dim_type", vec![Value::Null]),
        ("time_cond_proj_dim", vec![Value::Null]),
        ("timestep_post_act", vec![Value::Null]),
        ("time_embedding_dim", vec![Value::Null]),
        ("time_embedding_act_fn", vec![Value::Null]),
        ("projection_class_embeddings_input_dim", vec![Value::Null]),
        ("reverse_transformer_layers_per_block", vec![Value::Null]),
        ("cross_attention_norm", vec![Value::Null]),
        (
            "mid_block_only_cross_attention",
            vec![Value::Null, json!(false)],
        ),
        ("mid_block_type", vec![json!("UNetMidBlock2DCrossAttn")]),
        ("act_fn", vec![json!("silu"), json!("swish")]),
        ("resnet_time_scale_shift", vec![json!("default")]),
        ("time_embedding_type", vec![json!("positional")]),
        ("attention_type", vec![json!("default")]),
        ("center_input_sample", vec![json!(false)]),
        ("dual_cross_attention", vec![json!(false)]),
        ("resnet_skip_time_act", vec![json!(false)]),
        ("class_embeddings_concat", vec![json!(false)]),
        ("downsample_padding", vec![json!(1)]),
        ("mid_block_scale_factor", vec![json!(1)]),
        ("resnet_out_scale_factor", vec![json!(1)]),
        ("conv_in_kernel", vec![json!(3)]),
        ("conv_out_kernel", vec![json!(3)]),
        ("dropout", vec![json!(0)]),
    ]
}

fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

impl UNetConfig {
    /// Stable Diffusion 1.5 (`runwayml/stable-diffusion-v1-5/unet/config.json`).
    pub fn sd15() -> Self {
        Self {
            cross_attention_dim: 768,
            ..Self::default()
        }
    }

    /// Stable Diffusion 2.1 (`stabilityai/stable-diffusion-2-1/unet/config.json`; the 512-base
    /// model differs only in `upcast_attention`, which is ignored).
    pub fn sd21() -> Self {
        Self {
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            cross_attention_dim: 1024,
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::default()
        }
    }

    /// Parses a diffusers `unet/config.json` and validates it.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: not a UNet config.json: {e}")))?;
        cfg.validate()
            .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    pub fn num_blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Heads of the attention in down block `i`, also used by up block `n - 1 - i`.
    pub fn heads(&self, i: usize) -> usize {
        self.attention_head_dim.get(i).unwrap_or(1)
    }

    /// Transformer blocks per `Transformer2DModel` in down block `i` (up block `n - 1 - i`).
    pub fn transformer_layers(&self, i: usize) -> usize {
        self.transformer_layers_per_block.get(i).unwrap_or(1)
    }

    /// Width of the time embedding (`4 * block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels.first().copied().unwrap_or(0) * 4
    }

    pub fn down_has_attention(&self, i: usize) -> bool {
        self.down_block_types.get(i).map(String::as_str) == Some(CROSS_ATTN_DOWN)
    }

    pub fn up_has_attention(&self, i: usize) -> bool {
        self.up_block_types.get(i).map(String::as_str) == Some(CROSS_ATTN_UP)
    }

    /// Every problem with this configuration, each naming its key; `Ok` if the model can be
    /// built.
    pub fn validate(&self) -> Result<()> {
        let mut errs: Vec<String> = Vec::new();
        let n = self.block_out_channels.len();
        if n == 0 {
            errs.push("block_out_channels: must not be empty".into());
        }
        if let Some(i) = self.block_out_channels.iter().position(|&c| c == 0) {
            errs.push(format!("block_out_channels[{i}]: must be positive"));
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            errs.push("in_channels/out_channels: must be positive".into());
        }
        if self.layers_per_block == 0 {
            errs.push("layers_per_block: must be at least 1".into());
        }
        if self.cross_attention_dim == 0 {
            errs.push("cross_attention_dim: must be positive".into());
        }
        if self.down_block_types.len() != n {
            errs.push(format!(
                "down_block_types: {} entries for {n} block_out_channels",
                self.down_block_types.len()
            ));
        }
        if self.up_block_types.len() != n {
            errs.push(format!(
                "up_block_types: {} entries for {n} block_out_channels",
                self.up_block_types.len()
            ));
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if t != CROSS_ATTN_DOWN && t != DOWN {
                errs.push(format!(
                    "down_block_types[{i}]: `{t}` is not supported (only {CROSS_ATTN_DOWN} and \
                     {DOWN}, as in SD1.x/SD2.x)"
                ));
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if t != CROSS_ATTN_UP && t != UP {
                errs.push(format!(
                    "up_block_types[{i}]: `{t}` is not supported (only {CROSS_ATTN_UP} and {UP}, \
                     as in SD1.x/SD2.x)"
                ));
            }
        }
        let per_block_len = |key: &str, len: Option<usize>, errs: &mut Vec<String>| {
            if let Some(len) = len {
                if len != n {
                    errs.push(format!("{key}: {len} entries for {n} blocks"));
                }
            }
        };
        let list_len = |p: &PerBlock<usize>| match p {
            PerBlock::All(_) => None,
            PerBlock::Each(v) => Some(v.len()),
        };
        per_block_len(
            "attention_head_dim",
            list_len(&self.attention_head_dim),
            &mut errs,
        );
        per_block_len(
            "transformer_layers_per_block",
            list_len(&self.transformer_layers_per_block),
            &mut errs,
        );
        if self.transformer_layers_per_block.values().contains(&0) {
            errs.push("transformer_layers_per_block: must be at least 1".into());
        }
        if self.only_cross_attention.values().contains(&true) {
            errs.push(
                "only_cross_attention: true is not supported (SD1.x/SD2.x use self-attention)"
                    .into(),
            );
        }
        if self.norm_num_groups == 0 {
            errs.push("norm_num_groups: must be positive".into());
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            errs.push("norm_eps: must be positive".into());
        }
        // Every block with attention (and the mid block, which uses the last block's heads)
        // must split its channels evenly into heads.
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            let reversed = n - 1 - i;
            let attends =
                self.down_has_attention(i) || self.up_has_attention(reversed) || i + 1 == n;
            let heads = self.heads(i);
            if attends && (heads == 0 || !ch.is_multiple_of(heads)) {
                errs.push(format!(
                    "attention_head_dim[{i}]: {heads} heads do not divide {ch} channels \
                     (attention_head_dim is the head COUNT in diffusers configs)"
                ));
            }
            if self.norm_num_groups > 0 && !ch.is_multiple_of(self.norm_num_groups) {
                errs.push(format!(
                    "block_out_channels[{i}]: {ch} channels are not divisible into \
                     norm_num_groups = {} groups",
                    self.norm_num_groups
                ));
            }
        }
        for (key, allowed) in unsupported_keys() {
            let Some(v) = self.other.get(key) else {
                continue;
            };
            if !allowed.iter().any(|a| json_eq(v, a)) {
                let want: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
                errs.push(format!(
                    "{key}: {v} is not supported (only {}, as in SD1.x/SD2.x)",
                    want.join(" or ")
                ));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!("UNet: {}", errs.join("; "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15_JSON: &str = r#"{
      "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
      "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
      "center_input_sample": false, "cross_attention_dim": 768,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                           "CrossAttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
      "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
      "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                         "CrossAttnUpBlock2D"]
    }"#;

    const SD21_JSON: &str = r#"{
      "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
      "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
      "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
      "cross_attention_dim": 1024,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                           "CrossAttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true,
      "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
      "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": null,
      "only_cross_attention": false, "out_channels": 4, "sample_size": 96,
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                         "CrossAttnUpBlock2D"],
      "upcast_attention": true, "use_linear_projection": true
    }"#;

    fn core(c: &UNetConfig) -> UNetConfig {
        UNetConfig {
            other: BTreeMap::new(),
            ..c.clone()
        }
    }

    #[test]
    fn presets_equal_the_hub_configs() {
        let sd15 = UNetConfig::from_json(SD15_JSON, "sd15").expect("sd15 parses");
        assert_eq!(core(&sd15), UNetConfig::sd15());
        let sd21 = UNetConfig::from_json(SD21_JSON, "sd21").expect("sd21 parses");
        assert_eq!(core(&sd21), UNetConfig::sd21());
        assert_eq!(sd21.heads(2), 20);
        assert_eq!(sd21.time_embed_dim(), 1280);
    }

    #[test]
    fn unsupported_options_are_named() {
        let mut v: serde_json::Value = serde_json::from_str(SD15_JSON).expect("json");
        v["addition_embed_type"] = "text_time".into();
        v["down_block_types"][0] = "SimpleCrossAttnDownBlock2D".into();
        v["only_cross_attention"] = true.into();
        v["attention_head_dim"] = 7.into();
        let err = UNetConfig::from_json(&v.to_string(), "x.json")
            .expect_err("must be rejected")
            .to_string();
        for needle in [
            "x.json",
            "addition_embed_type",
            "down_block_types[0]",
            "only_cross_attention",
            "attention_head_dim[0]",
        ] {
            assert!(err.contains(needle), "`{needle}` missing from: {err}");
        }
    }

    #[test]
    fn numeric_defaults_compare_by_value() {
        let mut v: serde_json::Value = serde_json::from_str(SD15_JSON).expect("json");
        v["mid_block_scale_factor"] = 1.0.into();
        v["dropout"] = 0.0.into();
        UNetConfig::from_json(&v.to_string(), "x").expect("1.0 == 1");
        v["dropout"] = 0.1.into();
        assert!(UNetConfig::from_json(&v.to_string(), "x").is_err());
    }
}
