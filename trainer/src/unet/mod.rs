//! The SD1.x/SD2.x `UNet2DConditionModel`, built module for module as diffusers builds it so the
//! `VarBuilder` paths are diffusers' tensor names and kohya's `lora_unet_*` names fall out of them;
//! LoRA sites in every `Transformer2DModel` and (for `conv_dim`) every resnet and resampler.

mod config;
mod ldm;

pub use config::{PerBlock, UNetConfig};
pub use ldm::{infer_ldm_config, ldm_key_map, LDM_UNET_PREFIX};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::checkpoint::checkpoint;
use crate::nn::{
    multi_head_attention, upsample_nearest, Builder, Conv2d, GroupNorm, LayerNorm, Linear,
};
use crate::nn::{LoraSite, Scope, Sites};
use crate::{Error, Result};

fn candle_error(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(t)))`.
#[derive(Debug, Clone)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(in_dim: usize, dim: usize, b: &Builder) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(in_dim, dim, true, &b.pp("linear_1"))?,
            linear_2: Linear::new(dim, dim, true, &b.pp("linear_2"))?,
        })
    }

    fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let h = self.linear_1.forward(t)?.silu()?;
        self.linear_2.forward(&h)
    }
}

/// Sinusoidal timestep features [B, dim] in f32, as diffusers' `get_timestep_embedding`
/// (max period 10000, scale 1). The frequencies are formed with the same f32 operations as
/// PyTorch so large timesteps (phase up to ~1000 rad) agree with the reference.
fn timestep_features(t: &Tensor, dim: usize, flip_sin_to_cos: bool, shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let log_period = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_period * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

/// `ResnetBlock2D` (pre-norm, SiLU, additive time embedding, output scale 1).
#[derive(Debug, Clone)]
struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    fn new(cfg: &UNetConfig, in_ch: usize, out_ch: usize, b: &Builder) -> Result<Self> {
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let conv_shortcut = if in_ch != out_ch {
            Some(Conv2d::new(in_ch, out_ch, 1, 1, 0, &b.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(groups, in_ch, eps, &b.pp("norm1"))?,
            conv1: Conv2d::new(in_ch, out_ch, 3, 1, 1, &b.pp("conv1"))?,
            time_emb_proj: Linear::new(cfg.time_embed_dim(), out_ch, true, &b.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(groups, out_ch, eps, &b.pp("norm2"))?,
            conv2: Conv2d::new(out_ch, out_ch, 3, 1, 1, &b.pp("conv2"))?,
            conv_shortcut,
        })
    }

    fn lora_tensors(&self) -> Vec<Tensor> {
        let mut t = self.conv1.lora_tensors();
        t.extend(self.time_emb_proj.lora_tensors());
        t.extend(self.conv2.lora_tensors());
        if let Some(c) = &self.conv_shortcut {
            t.extend(c.lora_tensors());
        }
        t
    }

    /// `temb_act` is `silu(temb)`, shared by every block.
    fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?;
        let h = self.conv1.forward(&h)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.norm2.forward_silu(&h)?;
        let h = self.conv2.forward(&h)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// diffusers `Attention` without biases on q/k/v (SD1.x/SD2.x), multi-head SDPA.
#[derive(Debug, Clone)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn new(dim: usize, context_dim: usize, heads: usize, b: &Builder) -> Result<Self> {
        Ok(Self {
            to_q: Linear::new(dim, dim, false, &b.pp("to_q"))?,
            to_k: Linear::new(context_dim, dim, false, &b.pp("to_k"))?,
            to_v: Linear::new(context_dim, dim, false, &b.pp("to_v"))?,
            to_out: Linear::new(dim, dim, true, &b.pp("to_out").pp(0))?,
            heads,
        })
    }

    fn lora_tensors(&self) -> Vec<Tensor> {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
            .into_iter()
            .flat_map(Linear::lora_tensors)
            .collect()
    }

    /// Self-attention when `context` is `None`, cross-attention otherwise.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        self.to_out
            .forward(&multi_head_attention(&q, &k, &v, self.heads)?)
    }
}

/// `FeedForward` with GEGLU: `net.2(a * gelu_erf(g))` where `[a, g] = net.0.proj(x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    fn new(dim: usize, b: &Builder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::new(dim, 2 * inner, true, &b.pp("net").pp(0).pp("proj"))?,
            out: Linear::new(inner, dim, true, &b.pp("net").pp(2))?,
            inner,
        })
    }

    fn lora_tensors(&self) -> Vec<Tensor> {
        let mut t = self.proj.lora_tensors();
        t.extend(self.out.lora_tensors());
        t
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let h = if crate::fused::applies(&h) {
            crate::fused::geglu(&h)?
        } else {
            let a = h.narrow(D::Minus1, 0, self.inner)?;
            let g = h.narrow(D::Minus1, self.inner, self.inner)?;
            (a * g.gelu_erf()?)?
        };
        self.out.forward(&h)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each pre-norm
/// with a residual.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(dim: usize, context_dim: usize, heads: usize, b: &Builder) -> Result<Self> {
        // The block's LayerNorms use diffusers' `norm_eps` default of 1e-5, not the UNet's.
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, &b.pp("norm1"))?,
            attn1: Attention::new(dim, dim, heads, &b.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, &b.pp("norm2"))?,
            attn2: Attention::new(dim, context_dim, heads, &b.pp("attn2"))?,
            norm3: LayerNorm::new(dim, 1e-5, &b.pp("norm3"))?,
            ff: FeedForward::new(dim, &b.pp("ff"))?,
        })
    }

    fn lora_tensors(&self) -> Vec<Tensor> {
        let mut t = self.attn1.lora_tensors();
        t.extend(self.attn2.lora_tensors());
        t.extend(self.ff.lora_tensors());
        t
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + &x)?)
    }
}

/// `proj_in`/`proj_out`: 1×1 convs in SD1.x, Linear layers in SD2.x.
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(linear: bool, in_dim: usize, out_dim: usize, b: &Builder) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::new(in_dim, out_dim, true, b)?)
        } else {
            Projection::Conv(Conv2d::new(in_dim, out_dim, 1, 1, 0, b)?)
        })
    }

    fn lora_tensors(&self) -> Vec<Tensor> {
        match self {
            Projection::Conv(c) => c.lora_tensors(),
            Projection::Linear(l) => l.lora_tensors(),
        }
    }
}

/// `Transformer2DModel` (continuous input): GroupNorm, `proj_in`, transformer blocks,
/// `proj_out`, residual.
#[derive(Debug, Clone)]
struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    fn new(
        cfg: &UNetConfig,
        channels: usize,
        heads: usize,
        layers: usize,
        b: &Builder,
    ) -> Result<Self> {
        let linear = cfg.use_linear_projection;
        let blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    channels,
                    cfg.cross_attention_dim,
                    heads,
                    &b.pp("transformer_blocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            // diffusers builds this GroupNorm with eps 1e-6 whatever the UNet's norm_eps.
            norm: GroupNorm::new(cfg.norm_num_groups, channels, 1e-6, &b.pp("norm"))?,
            proj_in: Projection::new(linear, channels, channels, &b.pp("proj_in"))?,
            blocks,
            proj_out: Projection::new(linear, channels, channels, &b.pp("proj_out"))?,
        })
    }

    fn lora_tensors(&self) -> Vec<Tensor> {
        let mut t = self.proj_in.lora_tensors();
        for blk in &self.blocks {
            t.extend(blk.lora_tensors());
        }
        t.extend(self.proj_out.lora_tensors());
        t
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))?)
        };
        let mut t = match &self.proj_in {
            Projection::Conv(conv) => conv.forward_tokens(&to_tokens(n)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(n)?)?,
        };
        for blk in &self.blocks {
            t = blk.forward(&t, context)?;
        }
        let to_image = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            Ok(t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => to_image(conv.forward_tokens(&t)?)?,
            Projection::Linear(lin) => to_image(lin.forward(&t)?)?,
        };
        Ok((out + x)?)
    }
}

/// Nearest-neighbour resize of [B, C, H, W] to `(out_h, out_w)` with PyTorch's
/// `F.interpolate(size=..., mode="nearest")` index rule `floor(dst * (in / out))` in f32, which
/// the UNet needs when the latent size is not a multiple of 2^(blocks-1).
fn resize_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h.is_multiple_of(h) && out_w.is_multiple_of(w) {
        return upsample_nearest(x, out_h, out_w);
    }
    let index = |in_size: usize, out_size: usize| -> Result<Tensor> {
        let scale = in_size as f32 / out_size as f32;
        let idx: Vec<u32> = (0..out_size)
            .map(|d| ((d as f32 * scale).floor() as usize).min(in_size - 1) as u32)
            .collect();
        Ok(Tensor::from_vec(idx, out_size, x.device())?)
    };
    let x = x.index_select(&index(h, out_h)?, 2)?;
    Ok(x.index_select(&index(w, out_w)?, 3)?)
}

/// `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Conv2d>,
}

/// `CrossAttnUpBlock2D` (with attentions) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Conv2d>,
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

fn resnet(
    cfg: &UNetConfig,
    in_ch: usize,
    out_ch: usize,
    b: &Builder,
    i: usize,
) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        cfg,
        in_ch,
        out_ch,
        &b.pp("resnets").pp(i).scope(Scope::ResnetConv),
    )
}

fn transformer(
    cfg: &UNetConfig,
    channels: usize,
    block: usize,
    b: &Builder,
    i: usize,
) -> Result<Transformer2DModel> {
    Transformer2DModel::new(
        cfg,
        channels,
        cfg.heads(block),
        cfg.transformer_layers(block),
        &b.pp("attentions").pp(i).scope(Scope::Transformer),
    )
}

/// The SD1.x/SD2.x UNet with frozen weights and LoRA sites.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    cfg: UNetConfig,
    /// Shared by the clones of a model, so a run can switch it on a model it borrows.
    checkpointing: Arc<AtomicBool>,
    time_embedding: TimestepEmbedding,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    sites: Sites,
    dtype: DType,
}

impl UNet2DConditionModel {
    /// Builds the model from a builder rooted at the UNet's own tensors (`conv_in.weight`,
    /// `down_blocks.0.resnets.0.conv1.weight`, ...) with LoRA prefix `lora_unet`.
    pub fn new(cfg: &UNetConfig, b: &Builder) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.num_blocks();
        let ch = &cfg.block_out_channels;
        let layers = cfg.layers_per_block;
        let temb_dim = cfg.time_embed_dim();
        let time_embedding = TimestepEmbedding::new(ch[0], temb_dim, &b.pp("time_embedding"))?;
        let conv_in = Conv2d::new(cfg.in_channels, ch[0], 3, 1, 1, &b.pp("conv_in"))?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let bb = b.pp("down_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = block_ch;
            let mut resnets = Vec::with_capacity(layers);
            let mut attentions = Vec::new();
            for j in 0..layers {
                let r_in = if j == 0 { in_ch } else { out_ch };
                resnets.push(resnet(cfg, r_in, out_ch, &bb, j)?);
                if cfg.down_has_attention(i) {
                    attentions.push(transformer(cfg, out_ch, i, &bb, j)?);
                }
            }
            let downsampler = if i + 1 < n {
                let db = bb.pp("downsamplers").pp(0).scope(Scope::ResnetConv);
                Some(Conv2d::new(out_ch, out_ch, 3, 2, 1, &db.pp("conv"))?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid_ch = ch[n - 1];
        let mb = b.pp("mid_block");
        let mid_block = MidBlock {
            resnets: vec![
                resnet(cfg, mid_ch, mid_ch, &mb, 0)?,
                resnet(cfg, mid_ch, mid_ch, &mb, 1)?,
            ],
            attentions: vec![transformer(cfg, mid_ch, n - 1, &mb, 0)?],
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        for i in 0..n {
            let bb = b.pp("up_blocks").pp(i);
            let down_index = n - 1 - i;
            let prev_out = out_ch;
            out_ch = ch[down_index];
            // Channels of the skip that the last resnet of this block concatenates: the input
            // of the matching down block.
            let skip_in = ch[down_index.saturating_sub(1)];
            let mut resnets = Vec::with_capacity(layers + 1);
            let mut attentions = Vec::new();
            for j in 0..=layers {
                let skip = if j == layers { skip_in } else { out_ch };
                let r_in = if j == 0 { prev_out } else { out_ch };
                resnets.push(resnet(cfg, r_in + skip, out_ch, &bb, j)?);
                if cfg.up_has_attention(i) {
                    attentions.push(transformer(cfg, out_ch, down_index, &bb, j)?);
                }
            }
            let upsampler = if i + 1 < n {
                let ub = bb.pp("upsamplers").pp(0).scope(Scope::ResnetConv);
                Some(Conv2d::new(out_ch, out_ch, 3, 1, 1, &ub.pp("conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            cfg: cfg.clone(),
            time_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                cfg.norm_num_groups,
                ch[0],
                cfg.norm_eps,
                &b.pp("conv_norm_out"),
            )?,
            conv_out: Conv2d::new(ch[0], cfg.out_channels, 3, 1, 1, &b.pp("conv_out"))?,
            sites: b.sites().clone(),
            dtype: b.dtype(),
            checkpointing: Arc::default(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The LoRA sites of this model, in construction order.
    pub fn sites(&self) -> Vec<LoraSite> {
        self.sites.list()
    }

    /// The frozen weight of every `Linear` layer (time embedding, attention, feed-forward,
    /// resnet time projections and, in SD2, transformer projections). None of them ever gets a
    /// gradient entry; tests use them to check that.
    pub fn frozen_linear_weights(&self) -> Vec<Tensor> {
        let mut out = vec![
            self.time_embedding.linear_1.weight().clone(),
            self.time_embedding.linear_2.weight().clone(),
        ];
        let mut resnets: Vec<&ResnetBlock2D> = Vec::new();
        let mut transformers: Vec<&Transformer2DModel> = Vec::new();
        for d in &self.down_blocks {
            resnets.extend(&d.resnets);
            transformers.extend(&d.attentions);
        }
        resnets.extend(&self.mid_block.resnets);
        transformers.extend(&self.mid_block.attentions);
        for u in &self.up_blocks {
            resnets.extend(&u.resnets);
            transformers.extend(&u.attentions);
        }
        out.extend(resnets.iter().map(|r| r.time_emb_proj.weight().clone()));
        for t in transformers {
            for p in [&t.proj_in, &t.proj_out] {
                if let Projection::Linear(l) = p {
                    out.push(l.weight().clone());
                }
            }
            for blk in &t.blocks {
                for a in [&blk.attn1, &blk.attn2] {
                    for l in [&a.to_q, &a.to_k, &a.to_v, &a.to_out] {
                        out.push(l.weight().clone());
                    }
                }
                out.push(blk.ff.proj.weight().clone());
                out.push(blk.ff.out.weight().clone());
            }
        }
        out
    }

    /// Recompute each resnet and transformer block's activations in backward instead of
    /// keeping them (`gradient_checkpointing`): gradients are the same, memory is lower and a
    /// step does one more forward pass of the blocks.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed);
    }

    fn resnet(&self, r: &ResnetBlock2D, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let blk = r.clone();
        self.block(x, temb, || r.lora_tensors(), move |x, t| blk.forward(x, t))
    }

    fn transformer(&self, a: &Transformer2DModel, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let blk = a.clone();
        self.block(
            x,
            context,
            || a.lora_tensors(),
            move |x, c| blk.forward(x, c),
        )
    }

    /// `f(x, c)`, checkpointed when gradient checkpointing is on (`lora`: the block's LoRA
    /// tensors).
    fn block(
        &self,
        x: &Tensor,
        c: &Tensor,
        lora: impl FnOnce() -> Vec<Tensor>,
        f: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
    ) -> Result<Tensor> {
        if !self.checkpointing.load(Ordering::Relaxed) {
            return f(x, c);
        }
        checkpoint(x, c, lora(), move |x, c| f(x, c).map_err(candle_error))
    }

    /// Predicts the noise (or v) for `sample` [B, in_channels, H, W] at `timesteps` [B] (one per
    /// sample, any integer or float dtype; a single value is used for the whole batch) given
    /// the text encoder's `encoder_hidden_states` [B, L, cross_attention_dim].
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let (bsz, c, _, _) = sample.dims4()?;
        if c != self.cfg.in_channels {
            return Err(Error::Config(format!(
                "UNet input has {c} channels, the model takes {}",
                self.cfg.in_channels
            )));
        }
        let (eb, _, ec) = encoder_hidden_states.dims3()?;
        if eb != bsz || ec != self.cfg.cross_attention_dim {
            return Err(Error::Config(format!(
                "encoder_hidden_states is {:?}; the UNet needs [{bsz}, L, {}]",
                encoder_hidden_states.dims(),
                self.cfg.cross_attention_dim
            )));
        }
        let t = timesteps.flatten_all()?;
        let t = match t.dim(0)? {
            n if n == bsz => t,
            1 => t.broadcast_as(bsz)?.contiguous()?,
            n => {
                return Err(Error::Config(format!(
                    "{n} timesteps for a batch of {bsz}: pass one per sample"
                )))
            }
        };
        let sample = sample.to_dtype(self.dtype)?;
        let context = encoder_hidden_states.to_dtype(self.dtype)?;

        let t_feat = timestep_features(
            &t,
            self.cfg.block_out_channels[0],
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift,
        )?
        .to_dtype(self.dtype)?;
        let temb_act = self.time_embedding.forward(&t_feat)?.silu()?;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for blk in &self.down_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = self.resnet(r, &x, &temb_act)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = self.transformer(a, &x, &context)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &blk.downsampler {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }

        x = self.resnet(&self.mid_block.resnets[0], &x, &temb_act)?;
        for (a, r) in self
            .mid_block
            .attentions
            .iter()
            .zip(&self.mid_block.resnets[1..])
        {
            x = self.transformer(a, &x, &context)?;
            x = self.resnet(r, &x, &temb_act)?;
        }

        for blk in &self.up_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    Error::Config("UNet up path ran out of skip connections".into())
                })?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = self.resnet(r, &x, &temb_act)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = self.transformer(a, &x, &context)?;
                }
            }
            if let Some(u) = &blk.upsampler {
                // Resize to the skip the next block concatenates, so latents whose size is not
                // a multiple of 2^(blocks-1) work as in diffusers.
                let (_, _, h, w) = x.dims4()?;
                let (th, tw) = match skips.last() {
                    Some(s) => {
                        let (_, _, sh, sw) = s.dims4()?;
                        (sh, sw)
                    }
                    None => (2 * h, 2 * w),
                };
                x = u.forward(&resize_nearest(&x, th, tw)?)?;
            }
        }

        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn resize_matches_pytorch_nearest_indices() -> anyhow::Result<()> {
        // torch.nn.functional.interpolate(torch.arange(4.).view(1,1,1,4), size=(1,7)) ->
        // [0, 0, 1, 1, 2, 2, 3].
        let x = Tensor::arange(0f32, 4., &Device::Cpu)?.reshape((1, 1, 1, 4))?;
        let y = resize_nearest(&x, 1, 7)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![0., 0., 1., 1., 2., 2., 3.]);
        let y = resize_nearest(&x, 2, 8)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y[..8], [0., 0., 1., 1., 2., 2., 3., 3.]);
        Ok(())
    }

    #[test]
    fn timestep_features_layout() -> anyhow::Result<()> {
        let t = Tensor::new(&[0u32, 10], &Device::Cpu)?;
        let e = timestep_features(&t, 8, true, 0.0)?;
        assert_eq!(e.dims(), &[2, 8]);
        let row0 = e.get(0)?.to_vec1::<f32>()?;
        // t = 0: cos = 1 first, sin = 0 second.
        assert_eq!(row0, vec![1., 1., 1., 1., 0., 0., 0., 0.]);
        let row1 = e.get(1)?.to_vec1::<f32>()?;
        assert!((row1[0] - 10f32.cos()).abs() < 1e-6);
        assert!((row1[4] - 10f32.sin()).abs() < 1e-6);
        Ok(())
    }
}
