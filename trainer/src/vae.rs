//! The Stable Diffusion VAE (diffusers `AutoencoderKL`), forward only: images to latent
//! distributions and latents back to images. Layer paths equal diffusers tensor names;
//! [`ldm_key_map`] serves them from single-file LDM checkpoints (`first_stage_model.*`).

use std::sync::Arc;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use crate::nn::{attention, upsample_nearest2x, Builder, Conv2d, GroupNorm, Linear};
use crate::random::standard_normal;
use crate::weights::{Fetch, KeyMap, TensorStore};
use crate::{Error, Result};

/// The `vae/config.json` of a diffusers model; keys that do not change the architecture
/// (`sample_size`, `force_upcast`, `_class_name`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

// diffusers' AutoencoderKL defaults, used when a key is absent.
fn default_image_channels() -> usize {
    3
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// The VAE of SD 1.x and 2.x.
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            act_fn: "silu".to_string(),
            down_block_types: None,
            up_block_types: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    /// Parses a diffusers `vae/config.json` and checks it describes a VAE this code can build.
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Self =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("vae config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every problem with this configuration, in one error.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.block_out_channels.is_empty() {
            problems.push("block_out_channels is empty".to_string());
        }
        if self.layers_per_block == 0 {
            problems.push("layers_per_block must be at least 1".to_string());
        }
        if self.latent_channels == 0 || self.in_channels == 0 || self.out_channels == 0 {
            problems.push("in/out/latent channels must be at least 1".to_string());
        }
        let g = self.norm_num_groups;
        if g == 0 || self.block_out_channels.iter().any(|c| c % g != 0) {
            problems.push(format!(
                "block_out_channels {:?} are not all divisible by norm_num_groups {g}",
                self.block_out_channels
            ));
        }
        if self.act_fn != "silu" {
            problems.push(format!("act_fn `{}` is not supported (silu)", self.act_fn));
        }
        let n = self.block_out_channels.len();
        for (key, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(types) = types {
                if types.len() != n || types.iter().any(|t| t != want) {
                    problems.push(format!(
                        "{key} {types:?} must be {n} × `{want}` (one per block_out_channels entry)"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "vae config: {}",
                problems.join("; ")
            )))
        }
    }
}

const EPS: f64 = 1e-6;

/// diffusers `ResnetBlock2D` without a time embedding.
#[derive(Debug, Clone)]
struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    fn new(in_c: usize, out_c: usize, groups: usize, b: &Builder) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, in_c, EPS, &b.pp("norm1"))?,
            conv1: Conv2d::new(in_c, out_c, 3, 1, 1, &b.pp("conv1"))?,
            norm2: GroupNorm::new(groups, out_c, EPS, &b.pp("norm2"))?,
            conv2: Conv2d::new(out_c, out_c, 3, 1, 1, &b.pp("conv2"))?,
            conv_shortcut: if in_c != out_c {
                Some(Conv2d::new(in_c, out_c, 1, 1, 0, &b.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// Query rows per attention chunk are chosen so one score block stays under this many elements
/// (64 MiB in f32): the mid-block attends over every latent pixel, H·W/64 squared.
const ATTENTION_BLOCK_ELEMS: usize = 1 << 24;

/// The mid-block self-attention: one head over all channels, with residual.
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(c: usize, groups: usize, b: &Builder) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(groups, c, EPS, &b.pp("group_norm"))?,
            to_q: Linear::new(c, c, true, &b.pp("to_q"))?,
            to_k: Linear::new(c, c, true, &b.pp("to_k"))?,
            to_v: Linear::new(c, c, true, &b.pp("to_v"))?,
            to_out: Linear::new(c, c, true, &b.pp("to_out").pp("0"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (bsz, c, h, w) = x.dims4()?;
        let len = h * w;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((bsz, c, len))?
            .transpose(1, 2)?
            .contiguous()?;
        // [B, 1 head, L, C]
        let q = self.to_q.forward(&tokens)?.unsqueeze(1)?;
        let k = self.to_k.forward(&tokens)?.unsqueeze(1)?;
        let v = self.to_v.forward(&tokens)?.unsqueeze(1)?;
        let out = chunked_attention(&q, &k, &v, ATTENTION_BLOCK_ELEMS)?.squeeze(1)?;
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((bsz, c, h, w))?;
        Ok((out + x)?)
    }
}

/// Attention over `[B, 1, L, d]` computed one sample and one block of query rows at a time so the
/// score matrix never exceeds `max_elems` elements (queries are independent; no gradient here).
fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor, max_elems: usize) -> Result<Tensor> {
    let (bsz, _, len, _) = q.dims4()?;
    let keys = k.dim(2)?.max(1);
    let rows = (max_elems / keys).clamp(1, len.max(1));
    let mut per_sample = Vec::with_capacity(bsz);
    for i in 0..bsz {
        let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
        let mut chunks = Vec::with_capacity(len.div_ceil(rows));
        let mut start = 0;
        while start < len {
            let n = rows.min(len - start);
            chunks.push(attention(&qi.narrow(2, start, n)?, &ki, &vi)?);
            start += n;
        }
        per_sample.push(Tensor::cat(&chunks, 2)?);
    }
    Ok(Tensor::cat(&per_sample, 0)?)
}

/// diffusers `UNetMidBlock2D` as the VAE uses it: resnet, attention, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(c: usize, cfg: &VaeConfig, b: &Builder) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Self {
            resnet0: ResnetBlock2D::new(c, c, g, &b.pp("resnets").pp("0"))?,
            attention: if cfg.mid_block_add_attention {
                Some(VaeAttention::new(c, g, &b.pp("attentions").pp("0"))?)
            } else {
                None
            },
            resnet1: ResnetBlock2D::new(c, c, g, &b.pp("resnets").pp("1"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    /// `Downsample2D` with padding 0: the input is first padded on the right and bottom only.
    downsample: Option<Conv2d>,
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, b: &Builder) -> Result<Self> {
        let chans = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = Conv2d::new(cfg.in_channels, chans[0], 3, 1, 1, &b.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(chans.len());
        let mut in_c = chans[0];
        for (i, &out_c) in chans.iter().enumerate() {
            let bb = b.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(c, out_c, g, &bb.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < chans.len() {
                let p = bb.pp("downsamplers").pp("0").pp("conv");
                Some(Conv2d::new(out_c, out_c, 3, 2, 0, &p)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock {
                resnets,
                downsample,
            });
            in_c = out_c;
        }
        let top = in_c;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(top, cfg, &b.pp("mid_block"))?,
            conv_norm_out: GroupNorm::new(g, top, EPS, &b.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(top, 2 * cfg.latent_channels, 3, 1, 1, &b.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            for r in &block.resnets {
                h = r.forward(&h)?;
            }
            if let Some(d) = &block.downsample {
                h = d.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        let h = self.mid_block.forward(&h)?;
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    /// `Upsample2D`: nearest 2× then this 3×3 conv.
    upsample: Option<Conv2d>,
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, b: &Builder) -> Result<Self> {
        let chans: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let top = chans[0];
        let conv_in = Conv2d::new(cfg.latent_channels, top, 3, 1, 1, &b.pp("conv_in"))?;
        let mid_block = MidBlock::new(top, cfg, &b.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(chans.len());
        let mut in_c = top;
        for (i, &out_c) in chans.iter().enumerate() {
            let bb = b.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(c, out_c, g, &bb.pp("resnets").pp(j))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < chans.len() {
                let p = bb.pp("upsamplers").pp("0").pp("conv");
                Some(Conv2d::new(out_c, out_c, 3, 1, 1, &p)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock { resnets, upsample });
            in_c = out_c;
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(g, in_c, EPS, &b.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(in_c, cfg.out_channels, 3, 1, 1, &b.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                h = r.forward(&h)?;
            }
            if let Some(u) = &block.upsample {
                h = u.forward(&upsample_nearest2x(&h)?)?;
            }
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

/// The posterior q(z|x) the encoder outputs: a Gaussian with diagonal covariance.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// `[B, latent_channels, H/f, W/f]`.
    pub mean: Tensor,
    /// exp(logvar / 2), logvar clamped to [-30, 20] as diffusers does.
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// mean + std · noise, with `noise` ~ N(0, 1) shaped like `mean`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let noise = noise.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + self.std.mul(&noise)?)?)
    }

    /// A sample drawn with `rng` (standard normals generated on the host, then moved to the
    /// mean's device), so cached latents are reproducible across devices.
    pub fn sample_with<R: Rng + ?Sized>(&self, rng: &mut R) -> Result<Tensor> {
        let noise = standard_normal(rng, self.mean.elem_count());
        let noise = Tensor::from_vec(noise, self.mean.shape(), self.mean.device())?;
        self.sample(&noise)
    }

    /// A sample drawn from a ChaCha8 generator seeded with `seed`.
    pub fn sample_seeded(&self, seed: u64) -> Result<Tensor> {
        self.sample_with(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }
}

/// diffusers `AutoencoderKL`. Inference only: inputs are detached so no graph is ever recorded,
/// and its layers are never LoRA targets.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    cfg: VaeConfig,
    dtype: DType,
}

impl AutoencoderKL {
    /// Builds the VAE from weights named as in diffusers (`encoder.conv_in.weight`, …) relative to
    /// `b`; the computation dtype is the builder's.
    pub fn new(cfg: &VaeConfig, b: &Builder) -> Result<Self> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(cfg, &b.pp("encoder"))?,
            decoder: Decoder::new(cfg, &b.pp("decoder"))?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::new(2 * l, 2 * l, 1, 1, 0, &b.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(l, l, 1, 1, 0, &b.pp("post_quant_conv"))?)
            } else {
                None
            },
            cfg: cfg.clone(),
            dtype: b.dtype(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Latents are multiplied by this before the UNet sees them (0.18215 for SD 1.x/2.x).
    pub fn scaling_factor(&self) -> f64 {
        self.cfg.scaling_factor
    }

    /// Image side length divided by latent side length (8 for SD).
    pub fn downscale(&self) -> usize {
        1 << (self.cfg.block_out_channels.len() - 1)
    }

    /// Encodes images `[B, 3, H, W]` in [-1, 1] (H, W multiples of [`Self::downscale`]) to the
    /// latent posterior. Latents are unscaled, as diffusers returns them.
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian> {
        let (_, c, h, w) = image.dims4()?;
        let f = self.downscale();
        if c != self.cfg.in_channels || h % f != 0 || w % f != 0 {
            return Err(Error::Config(format!(
                "vae encode: image shape {:?} needs {} channels and height/width divisible by {f}",
                image.dims(),
                self.cfg.in_channels
            )));
        }
        let x = image.detach().to_dtype(self.dtype)?;
        let mut moments = self.encoder.forward(&x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.cfg.latent_channels;
        let mean = moments.narrow(1, 0, l)?.contiguous()?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussian { mean, std })
    }

    /// Decodes unscaled latents `[B, latent_channels, h, w]` to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = latents.dims4()?;
        if c != self.cfg.latent_channels {
            return Err(Error::Config(format!(
                "vae decode: latents {:?} need {} channels",
                latents.dims(),
                self.cfg.latent_channels
            )));
        }
        let mut z = latents.detach().to_dtype(self.dtype)?;
        if let Some(p) = &self.post_quant_conv {
            z = p.forward(&z)?;
        }
        self.decoder.forward(&z)
    }
}

/// Prefix of the VAE inside a single-file SD checkpoint.
pub const LDM_PREFIX: &str = "first_stage_model.";

/// Key map from diffusers VAE names to a single-file LDM checkpoint (`first_stage_model.*`).
pub fn ldm_key_map(cfg: &VaeConfig) -> KeyMap {
    ldm_key_map_with_prefix(cfg, LDM_PREFIX)
}

/// Same as [`ldm_key_map`] for LDM-layout files with another prefix (standalone VAE files such
/// as `vae-ft-mse-840000-ema-pruned` use none).
pub fn ldm_key_map_with_prefix(cfg: &VaeConfig, prefix: &str) -> KeyMap {
    let blocks = cfg.block_out_channels.len();
    let prefix = prefix.to_string();
    Arc::new(move |name: &str| ldm_name(name, blocks).map(|f| with_prefix(f, &prefix)))
}

/// The LDM name of one diffusers VAE tensor, without the prefix.
fn ldm_name(name: &str, blocks: usize) -> Option<Fetch> {
    let plain = |s: String| Some(Fetch::Name(s));
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return plain(name.to_string());
    }
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let parts: Vec<&str> = rest.split('.').collect();
    let mapped = match parts.as_slice() {
        ["conv_in" | "conv_out", _] => rest.to_string(),
        ["conv_norm_out", p] => format!("norm_out.{p}"),
        ["down_blocks", i, "resnets", j, tail @ ..] if side == "encoder" => {
            format!("down.{i}.block.{j}.{}", resnet_tail(tail)?)
        }
        ["down_blocks", i, "downsamplers", "0", "conv", p] if side == "encoder" => {
            format!("down.{i}.downsample.conv.{p}")
        }
        ["up_blocks", i, "resnets", j, tail @ ..] if side == "decoder" => {
            let i = reversed(i, blocks)?;
            format!("up.{i}.block.{j}.{}", resnet_tail(tail)?)
        }
        ["up_blocks", i, "upsamplers", "0", "conv", p] if side == "decoder" => {
            let i = reversed(i, blocks)?;
            format!("up.{i}.upsample.conv.{p}")
        }
        ["mid_block", "resnets", j @ ("0" | "1"), tail @ ..] => {
            let k = if *j == "0" { 1 } else { 2 };
            format!("mid.block_{k}.{}", resnet_tail(tail)?)
        }
        ["mid_block", "attentions", "0", "group_norm", p] => format!("mid.attn_1.norm.{p}"),
        ["mid_block", "attentions", "0", proj @ .., p] => {
            let ldm = match proj {
                ["to_q"] => "q",
                ["to_k"] => "k",
                ["to_v"] => "v",
                ["to_out", "0"] => "proj_out",
                _ => return None,
            };
            // Stored as 1×1 convolutions [C, C, 1, 1]; diffusers holds Linear [C, C].
            return Some(Fetch::Squeeze(format!("{side}.mid.attn_1.{ldm}.{p}")));
        }
        _ => return None,
    };
    plain(format!("{side}.{mapped}"))
}

fn resnet_tail(tail: &[&str]) -> Option<String> {
    match tail {
        ["conv_shortcut", p] => Some(format!("nin_shortcut.{p}")),
        [layer @ ("norm1" | "conv1" | "norm2" | "conv2"), p] => Some(format!("{layer}.{p}")),
        _ => None,
    }
}

/// LDM numbers decoder levels from the lowest resolution up; diffusers in execution order.
fn reversed(i: &str, blocks: usize) -> Option<usize> {
    let i: usize = i.parse().ok()?;
    (i < blocks).then(|| blocks - 1 - i)
}

fn with_prefix(fetch: Fetch, prefix: &str) -> Fetch {
    match fetch {
        Fetch::Name(n) => Fetch::Name(format!("{prefix}{n}")),
        Fetch::Squeeze(n) => Fetch::Squeeze(format!("{prefix}{n}")),
        Fetch::Transpose(n) => Fetch::Transpose(format!("{prefix}{n}")),
        Fetch::Rows { name, start, len } => Fetch::Rows {
            name: format!("{prefix}{name}"),
            start,
            len,
        },
    }
}

/// The prefix under which `store` holds an LDM-layout VAE: `first_stage_model.` in full
/// checkpoints, none in standalone VAE files; `None` if it holds none.
pub fn ldm_vae_prefix(store: &dyn TensorStore) -> Option<&'static str> {
    [LDM_PREFIX, ""]
        .into_iter()
        .find(|p| store.contains(&format!("{p}encoder.down.0.block.0.conv1.weight")))
}

/// Reads the VAE architecture of an LDM-layout checkpoint from its tensor shapes. Group count and
/// scaling factor are not recorded in the file; SD's (32, 0.18215) are assumed and can be
/// overridden before the model is built (which validates the result).
pub fn infer_ldm_config(store: &dyn TensorStore) -> Result<VaeConfig> {
    let prefix = ldm_vae_prefix(store).ok_or_else(|| {
        Error::bad_checkpoint(
            store.origin(),
            "no VAE in LDM layout (`first_stage_model.encoder.down.0.block.0.conv1.weight`)",
        )
    })?;
    let shape = |name: &str| -> Result<Vec<usize>> {
        let full = format!("{prefix}{name}");
        store.shape(&full).ok_or_else(|| Error::MissingTensor {
            name: full,
            stored_as: None,
            origin: store.origin(),
        })
    };
    let dim = |name: &str, d: usize| -> Result<usize> {
        let s = shape(name)?;
        s.get(d).copied().ok_or_else(|| {
            Error::bad_checkpoint(
                store.origin(),
                format!("`{prefix}{name}` has shape {s:?}, expected a convolution weight"),
            )
        })
    };
    let has = |name: &str| store.contains(&format!("{prefix}{name}"));

    let mut block_out_channels = Vec::new();
    while has(&format!(
        "encoder.down.{}.block.0.conv1.weight",
        block_out_channels.len()
    )) {
        let i = block_out_channels.len();
        block_out_channels.push(dim(&format!("encoder.down.{i}.block.0.conv1.weight"), 0)?);
    }
    let mut layers_per_block = 0;
    while has(&format!(
        "encoder.down.0.block.{layers_per_block}.conv1.weight"
    )) {
        layers_per_block += 1;
    }
    let latent_channels = dim("decoder.conv_in.weight", 1)?;
    let moments = dim("encoder.conv_out.weight", 0)?;
    if moments != 2 * latent_channels {
        return Err(Error::bad_checkpoint(
            store.origin(),
            format!(
                "VAE encoder outputs {moments} channels but the decoder takes {latent_channels} \
                 latent channels (expected twice as many)"
            ),
        ));
    }
    let cfg = VaeConfig {
        in_channels: dim("encoder.conv_in.weight", 1)?,
        out_channels: dim("decoder.conv_out.weight", 0)?,
        block_out_channels,
        layers_per_block,
        latent_channels,
        use_quant_conv: has("quant_conv.weight"),
        use_post_quant_conv: has("post_quant_conv.weight"),
        mid_block_add_attention: has("encoder.mid.attn_1.q.weight"),
        ..VaeConfig::sd()
    };
    // Not validated here: a caller who knows the group count sets it before building.
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldm_names_follow_the_conversion_rules() {
        let cfg = VaeConfig::sd();
        let map = ldm_key_map(&cfg);
        let name = |n: &str| map(n);
        let p = |s: &str| Some(Fetch::Name(format!("first_stage_model.{s}")));
        let sq = |s: &str| Some(Fetch::Squeeze(format!("first_stage_model.{s}")));
        assert_eq!(
            name("encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
            p("encoder.down.1.block.0.nin_shortcut.weight")
        );
        assert_eq!(
            name("encoder.down_blocks.2.downsamplers.0.conv.bias"),
            p("encoder.down.2.downsample.conv.bias")
        );
        assert_eq!(
            name("decoder.up_blocks.0.resnets.2.norm1.weight"),
            p("decoder.up.3.block.2.norm1.weight")
        );
        assert_eq!(
            name("decoder.up_blocks.2.upsamplers.0.conv.weight"),
            p("decoder.up.1.upsample.conv.weight")
        );
        assert_eq!(
            name("decoder.mid_block.resnets.1.conv2.weight"),
            p("decoder.mid.block_2.conv2.weight")
        );
        assert_eq!(
            name("encoder.mid_block.attentions.0.group_norm.bias"),
            p("encoder.mid.attn_1.norm.bias")
        );
        assert_eq!(
            name("encoder.mid_block.attentions.0.to_out.0.weight"),
            sq("encoder.mid.attn_1.proj_out.weight")
        );
        assert_eq!(
            name("decoder.mid_block.attentions.0.to_k.bias"),
            sq("decoder.mid.attn_1.k.bias")
        );
        assert_eq!(
            name("encoder.conv_norm_out.weight"),
            p("encoder.norm_out.weight")
        );
        assert_eq!(name("post_quant_conv.weight"), p("post_quant_conv.weight"));
        assert_eq!(name("decoder.up_blocks.4.resnets.0.conv1.weight"), None);
        assert_eq!(name("encoder.up_blocks.0.resnets.0.conv1.weight"), None);
        assert_eq!(name("unet.conv_in.weight"), None);
    }

    #[test]
    fn config_reads_diffusers_json() -> Result<()> {
        let json = r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0",
            "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                "UpDecoderBlock2D"]}"#;
        let cfg = VaeConfig::from_json(json)?;
        let want = VaeConfig {
            down_block_types: cfg.down_block_types.clone(),
            up_block_types: cfg.up_block_types.clone(),
            ..VaeConfig::sd()
        };
        assert_eq!(cfg, want);
        let bad = r#"{"block_out_channels": [64, 48], "norm_num_groups": 32,
            "down_block_types": ["DownEncoderBlock2D"]}"#;
        let err = VaeConfig::from_json(bad).err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.contains("norm_num_groups") && err.contains("down_block_types"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn chunked_attention_equals_whole() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 1, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 1, 37, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 1, 37, 8), &dev)?;
        let whole = attention(&q, &k, &v)?;
        // 37 keys × 3 rows per block: 13 blocks, the last one short.
        let chunked = chunked_attention(&q, &k, &v, 37 * 3)?;
        let d = (whole - chunked)?.abs()?.flatten_all()?.max(0)?;
        assert!(d.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }
}
