//! Single-file (LDM / CompVis) checkpoints: the map from diffusers UNet tensor names to
//! `model.diffusion_model.*` names, and the UNet configuration read off the tensor shapes.
//!
//! LDM numbers the UNet as flat sequences: `input_blocks.0` is `conv_in`, then per down block
//! `layers_per_block` entries `[resnet, attention?]` and one `[downsample op]`; `middle_block`
//! is `[resnet, attention, resnet]`; `output_blocks` holds `layers_per_block + 1` entries per up
//! block, `[resnet, attention?, upsample?]`.

use crate::weights::{Fetch, KeyMap, TensorStore};
use crate::{Error, Result};

use super::config::{PerBlock, UNetConfig, CROSS_ATTN_DOWN, CROSS_ATTN_UP, DOWN, UP};

/// Prefix of the UNet's tensors in a single-file checkpoint.
pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";

/// ResnetBlock2D layer names, diffusers -> LDM `ResBlock`.
fn resnet_layer(name: &str) -> Option<&'static str> {
    Some(match name {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    })
}

/// `resnets.{j}.<layer>.<param>` -> `<ldm layer>.<param>`.
fn resnet_rest(rest: &str) -> Option<String> {
    let (layer, param) = rest.split_once('.')?;
    Some(format!("{}.{param}", resnet_layer(layer)?))
}

fn split_index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// The LDM name (without prefix) of diffusers UNet tensor `name`, or `None` if `name` is not
/// a UNet tensor of this configuration.
fn ldm_name(layers: usize, up_attention: &[bool], name: &str) -> Option<String> {
    let per = layers + 1;
    let (head, rest) = name.split_once('.')?;
    match head {
        "time_embedding" => {
            let (layer, param) = rest.split_once('.')?;
            let i = match layer {
                "linear_1" => 0,
                "linear_2" => 2,
                _ => return None,
            };
            Some(format!("time_embed.{i}.{param}"))
        }
        "conv_in" => Some(format!("input_blocks.0.0.{rest}")),
        "conv_norm_out" => Some(format!("out.0.{rest}")),
        "conv_out" => Some(format!("out.2.{rest}")),
        "down_blocks" => {
            let (b, rest) = split_index(rest)?;
            let (kind, rest) = rest.split_once('.')?;
            let base = 1 + b * per;
            match kind {
                "resnets" => {
                    let (j, rest) = split_index(rest)?;
                    (j < layers).then_some(())?;
                    Some(format!(
                        "input_blocks.{}.0.{}",
                        base + j,
                        resnet_rest(rest)?
                    ))
                }
                "attentions" => {
                    let (j, rest) = split_index(rest)?;
                    (j < layers).then_some(())?;
                    Some(format!("input_blocks.{}.1.{rest}", base + j))
                }
                "downsamplers" => {
                    let param = rest.strip_prefix("0.conv.")?;
                    Some(format!("input_blocks.{}.0.op.{param}", base + layers))
                }
                _ => None,
            }
        }
        "mid_block" => {
            let (kind, rest) = rest.split_once('.')?;
            let (j, rest) = split_index(rest)?;
            match (kind, j) {
                ("resnets", 0) => Some(format!("middle_block.0.{}", resnet_rest(rest)?)),
                ("resnets", 1) => Some(format!("middle_block.2.{}", resnet_rest(rest)?)),
                ("attentions", 0) => Some(format!("middle_block.1.{rest}")),
                _ => None,
            }
        }
        "up_blocks" => {
            let (b, rest) = split_index(rest)?;
            let (kind, rest) = rest.split_once('.')?;
            let base = b * per;
            match kind {
                "resnets" => {
                    let (j, rest) = split_index(rest)?;
                    (j <= layers).then_some(())?;
                    Some(format!(
                        "output_blocks.{}.0.{}",
                        base + j,
                        resnet_rest(rest)?
                    ))
                }
                "attentions" => {
                    let (j, rest) = split_index(rest)?;
                    (j <= layers).then_some(())?;
                    Some(format!("output_blocks.{}.1.{rest}", base + j))
                }
                "upsamplers" => {
                    let param = rest.strip_prefix("0.conv.")?;
                    // The upsampler follows the attention when the block has one.
                    let slot = if *up_attention.get(b)? { 2 } else { 1 };
                    Some(format!(
                        "output_blocks.{}.{slot}.conv.{param}",
                        base + layers
                    ))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Maps every diffusers UNet tensor name of `cfg` to its `model.diffusion_model.` name in a
/// single-file checkpoint (all tensors keep their shape: SD1's 1×1 `proj_in`/`proj_out` convs
/// and SD2's linear ones are stored the same way in both layouts).
pub fn ldm_key_map(cfg: &UNetConfig) -> KeyMap {
    let layers = cfg.layers_per_block;
    let up_attention: Vec<bool> = (0..cfg.num_blocks())
        .map(|i| cfg.up_has_attention(i))
        .collect();
    std::sync::Arc::new(move |name: &str| {
        ldm_name(layers, &up_attention, name).map(|n| Fetch::Name(format!("{LDM_UNET_PREFIX}{n}")))
    })
}

/// Indices `N` present as `{prefix}N.` in `names`.
fn indices(names: &[String], prefix: &str) -> Vec<usize> {
    let mut v: Vec<usize> = names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix))
        .filter_map(|r| r.split_once('.'))
        .filter_map(|(i, _)| i.parse().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Reads the UNet configuration off the tensor shapes of a single-file checkpoint:
/// channels, block count and types, layers per block, transformer depth,
/// `cross_attention_dim`, and linear-vs-conv projections.
///
/// Head counts cannot be read from shapes; they follow the real models: 1×1-conv projections
/// mean SD1.x (8 heads in every block), linear projections mean SD2.x (head size 64, i.e.
/// `channels / 64` heads). Models that break that rule need their `config.json` instead.
/// Normalisation groups (32), eps (1e-5) and the timestep embedding (`flip_sin_to_cos`,
/// `freq_shift` 0) are the SD values.
pub fn infer_ldm_config(store: &dyn TensorStore) -> Result<UNetConfig> {
    let p = LDM_UNET_PREFIX;
    let origin = store.origin();
    let names: Vec<String> = store
        .names()
        .into_iter()
        .filter(|n| n.starts_with(p))
        .collect();
    let bad = |msg: String| Error::bad_checkpoint(&origin, msg);
    if names.is_empty() {
        return Err(bad(format!(
            "no `{p}*` tensors: not a single-file Stable Diffusion checkpoint (a diffusers \
             folder needs its unet/config.json)"
        )));
    }
    if names
        .iter()
        .any(|n| n.starts_with(&format!("{p}label_emb.")))
    {
        return Err(bad(
            "the UNet has class/size conditioning (`label_emb`): SDXL and upscaler models are \
             not supported, only SD1.x/SD2.x"
                .into(),
        ));
    }
    let shape = |n: &str| -> Result<Vec<usize>> {
        store
            .shape(&format!("{p}{n}"))
            .ok_or_else(|| bad(format!("missing tensor `{p}{n}`")))
    };
    // Every shape read here is checked before it is indexed: a hostile file may give any
    // tensor any rank, including none.
    let shape_of = |n: &str, ranks: &[usize], what: &str| -> Result<Vec<usize>> {
        let s = shape(n)?;
        if !ranks.contains(&s.len()) || s.contains(&0) {
            let ranks: Vec<String> = ranks.iter().map(|r| format!("{r}-D")).collect();
            return Err(bad(format!(
                "tensor `{p}{n}` has shape {s:?}, but a {what} is {} with no empty dimension: \
                 the file is damaged or not a Stable Diffusion 1.x/2.x checkpoint",
                ranks.join(" or ")
            )));
        }
        Ok(s)
    };
    let has = |n: &str| store.contains(&format!("{p}{n}"));

    let conv_in = shape_of("input_blocks.0.0.weight", &[4], "convolution weight")?;
    let conv_out = shape_of("out.2.weight", &[4], "convolution weight")?;
    let inputs = indices(&names, &format!("{p}input_blocks."));
    let num_inputs = inputs.last().map_or(0, |i| i + 1);
    if inputs.len() != num_inputs || num_inputs < 2 {
        return Err(bad(format!(
            "input_blocks are not numbered 0..N (found {inputs:?})"
        )));
    }
    let ops: Vec<usize> = inputs
        .iter()
        .copied()
        .filter(|i| has(&format!("input_blocks.{i}.0.op.weight")))
        .collect();
    // Down blocks end in a downsampler except the last, so the first `op` sits right after
    // the first block's resnets.
    let layers = match ops.first() {
        Some(&first) => first - 1,
        None => num_inputs - 1,
    };
    let per = layers + 1;
    let n = ops.len() + 1;
    if layers == 0 || n * per != num_inputs {
        return Err(bad(format!(
            "{num_inputs} input_blocks with downsamplers at {ops:?} do not form equal down \
             blocks"
        )));
    }
    let outputs = indices(&names, &format!("{p}output_blocks."));
    if outputs.len() != n * per {
        return Err(bad(format!(
            "{} output_blocks, expected {} for {n} blocks of {layers} layers",
            outputs.len(),
            n * per
        )));
    }

    let mut block_out_channels = Vec::with_capacity(n);
    let mut down_block_types = Vec::with_capacity(n);
    let mut up_block_types = Vec::with_capacity(n);
    for b in 0..n {
        let first = 1 + b * per;
        let w = shape_of(
            &format!("input_blocks.{first}.0.out_layers.3.weight"),
            &[4],
            "convolution weight",
        )?;
        block_out_channels.push(w[0]);
        let attends = has(&format!("input_blocks.{first}.1.proj_in.weight"));
        down_block_types.push(if attends { CROSS_ATTN_DOWN } else { DOWN }.to_string());
        let attends = has(&format!("output_blocks.{}.1.proj_in.weight", b * per));
        up_block_types.push(if attends { CROSS_ATTN_UP } else { UP }.to_string());
    }

    // The mid block always has attention; it gives the projection kind, cross-attention width
    // and transformer depth.
    let proj_in = shape_of(
        "middle_block.1.proj_in.weight",
        &[2, 4],
        "linear or 1x1 convolution weight",
    )?;
    let use_linear_projection = proj_in.len() == 2;
    let cross_attention_dim = shape_of(
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        &[2],
        "linear weight",
    )?[1];
    let depth_of =
        |prefix: &str| indices(&names, &format!("{p}{prefix}.transformer_blocks.")).len();
    let mut depths = Vec::with_capacity(n);
    for b in 0..n {
        let first = 1 + b * per;
        let d = if down_block_types[b] == CROSS_ATTN_DOWN {
            depth_of(&format!("input_blocks.{first}.1"))
        } else if up_block_types[n - 1 - b] == CROSS_ATTN_UP {
            depth_of(&format!("output_blocks.{}.1", (n - 1 - b) * per))
        } else if b + 1 == n {
            depth_of("middle_block.1")
        } else {
            1
        };
        depths.push(d.max(1));
    }
    let transformer_layers_per_block = if depths.iter().all(|d| *d == depths[0]) {
        PerBlock::All(depths[0])
    } else {
        PerBlock::Each(depths)
    };

    let attention_head_dim = if use_linear_projection {
        PerBlock::Each(block_out_channels.iter().map(|c| (c / 64).max(1)).collect())
    } else {
        PerBlock::All(8)
    };
    let cfg = UNetConfig {
        in_channels: conv_in[1],
        out_channels: conv_out[0],
        block_out_channels,
        layers_per_block: layers,
        down_block_types,
        up_block_types,
        attention_head_dim,
        cross_attention_dim,
        use_linear_projection,
        transformer_layers_per_block,
        ..UNetConfig::default()
    };
    cfg.validate()
        .map_err(|e| bad(format!("inferred UNet configuration is unusable: {e}")))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(cfg: &UNetConfig, name: &str) -> Option<String> {
        (ldm_key_map(cfg))(name).map(|f| f.source().to_string())
    }

    #[test]
    fn sd15_names_follow_the_ldm_numbering() {
        let cfg = UNetConfig::sd15();
        let m = |n: &str| map(&cfg, n);
        let p = LDM_UNET_PREFIX;
        let cases = [
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("conv_in.weight", "input_blocks.0.0.weight"),
            (
                "down_blocks.0.resnets.1.conv1.weight",
                "input_blocks.2.0.in_layers.2.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "input_blocks.4.0.skip_connection.weight",
            ),
            (
                "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.bias",
                "input_blocks.9.0.op.bias",
            ),
            (
                "down_blocks.3.resnets.1.time_emb_proj.weight",
                "input_blocks.11.0.emb_layers.1.weight",
            ),
            (
                "mid_block.resnets.1.norm2.weight",
                "middle_block.2.out_layers.0.weight",
            ),
            (
                "mid_block.attentions.0.proj_out.bias",
                "middle_block.1.proj_out.bias",
            ),
            (
                "up_blocks.0.resnets.2.conv2.weight",
                "output_blocks.2.0.out_layers.3.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.attentions.0.norm.weight",
                "output_blocks.3.1.norm.weight",
            ),
            (
                "up_blocks.2.upsamplers.0.conv.bias",
                "output_blocks.8.2.conv.bias",
            ),
            (
                "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
            ),
            ("conv_norm_out.bias", "out.0.bias"),
            ("conv_out.weight", "out.2.weight"),
        ];
        for (d, l) in cases {
            assert_eq!(m(d).as_deref(), Some(format!("{p}{l}").as_str()), "{d}");
        }
        for d in [
            "down_blocks.0.resnets.2.conv1.weight",
            "mid_block.resnets.2.conv1.weight",
            "up_blocks.0.resnets.3.conv1.weight",
            "time_embedding.linear_3.weight",
            "add_embedding.linear_1.weight",
            "down_blocks.0.resnets.0.nonsense.weight",
        ] {
            assert_eq!(m(d), None, "{d}");
        }
    }
}
