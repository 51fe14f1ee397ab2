//! Layers shared by the UNet, the text encoder and the VAE.
//!
//! Base weights are frozen: `Linear` and `Conv2d` compute their output without recording a graph
//! for the weight and attach a backward that produces only the input gradient (candle's own ops
//! would also compute a full-size gradient for every frozen weight). Norms and softmax are written
//! so their gradients flow (candle's fast `layer_norm` and `softmax_last_dim` are detached).
//! Every `Linear`/`Conv2d` built inside a LoRA scope registers a [`LoraSite`] so a LoRA network
//! can be attached to it later.

use std::sync::{Arc, Mutex, RwLock};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor, D};
use candle_nn::VarBuilder;

use crate::Result;

type BackwardFn = dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// `out = value` (computed without a graph); the gradient reaching `out` is turned into the
/// gradient of `input` by `backward`. `value` is copied once so the op owns its output.
struct AttachGrad {
    backward: Box<BackwardFn>,
}

fn copy_storage_cpu(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
    fn slice<T: Copy>(v: &[T], l: &Layout) -> candle_core::Result<Vec<T>> {
        match l.contiguous_offsets() {
            Some((a, b)) if b <= v.len() => Ok(v[a..b].to_vec()),
            _ => Err(candle_core::Error::Msg(
                "attach-grad: value must be contiguous".to_string(),
            )),
        }
    }
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(slice(v, l)?),
        CpuStorage::F16(v) => CpuStorage::F16(slice(v, l)?),
        CpuStorage::BF16(v) => CpuStorage::BF16(slice(v, l)?),
        CpuStorage::F64(v) => CpuStorage::F64(slice(v, l)?),
        _ => {
            return Err(candle_core::Error::Msg(
                "attach-grad: unsupported dtype".to_string(),
            ))
        }
    })
}

#[cfg(feature = "cuda")]
fn copy_storage_cuda(
    s: &candle_core::CudaStorage,
    l: &Layout,
) -> candle_core::Result<candle_core::CudaStorage> {
    use candle_core::backend::BackendStorage;
    match l.contiguous_offsets() {
        Some((0, _)) => s.try_clone(l),
        _ => Err(candle_core::Error::Msg(
            "attach-grad: value must be contiguous from offset 0".to_string(),
        )),
    }
}

impl CustomOp2 for AttachGrad {
    fn name(&self) -> &'static str {
        "attach-grad"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((copy_storage_cpu(s2, l2)?, l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((copy_storage_cuda(s2, l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _arg1: &Tensor,
        _arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.backward)(grad_res)?), None))
    }
}

/// Returns `value` as a function of `input`, with `backward` mapping d(out) to d(input).
/// When `input` carries no graph, `value` is returned as is.
pub fn attach_grad(
    input: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(value);
    }
    let value = value.contiguous()?;
    let value = if value.layout().start_offset() != 0 {
        value.copy()?
    } else {
        value
    };
    Ok(input.apply_op2(
        &value,
        AttachGrad {
            backward: Box::new(backward),
        },
    )?)
}

type Backward2Fn = dyn Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)> + Send + Sync;

/// Like [`AttachGrad`] with two inputs (activation and trainable weight).
struct AttachGrad2 {
    backward: Box<Backward2Fn>,
}

impl candle_core::CustomOp3 for AttachGrad2 {
    fn name(&self) -> &'static str {
        "attach-grad2"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((copy_storage_cpu(s3, l3)?, l3.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((copy_storage_cuda(s3, l3)?, l3.shape().clone()))
    }

    fn bwd(
        &self,
        _arg1: &Tensor,
        _arg2: &Tensor,
        _arg3: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ga, gb) = (self.backward)(grad_res)?;
        Ok((Some(ga), Some(gb), None))
    }
}

/// `value` as a function of `a` and `b`; `backward` maps d(out) to (d(a), d(b)).
pub fn attach_grad2(
    a: &Tensor,
    b: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        return Ok(value);
    }
    let value = value.contiguous()?;
    let value = if value.layout().start_offset() != 0 {
        value.copy()?
    } else {
        value
    };
    Ok(a.apply_op3(
        b,
        &value,
        AttachGrad2 {
            backward: Box::new(backward),
        },
    )?)
}

/// A convolution of `x` with a trainable kernel `w` (square, no groups/dilation) whose input
/// gradient is right for any H/W parity (candle's own backward sizes it from the height only).
pub fn conv2d_trainable(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(x.conv2d(w, padding, stride, 1, 1)?);
    }
    let (_, _, h, wd) = x.dims4()?;
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    let (xc, wc) = (x.detach(), w.detach());
    attach_grad2(x, w, y, move |g| {
        let gx = conv2d_input_grad(g, &wc, (h, wd), stride, padding)?;
        let (_, _, k0, k1) = wc.dims4()?;
        let gw = xc
            .transpose(0, 1)?
            .conv2d(&g.transpose(0, 1)?, padding, 1, stride, 1)?
            .transpose(0, 1)?;
        let gw = gw.narrow(2, 0, k0)?.narrow(3, 0, k1)?;
        Ok((gx, gw))
    })
}

/// Which kohya target family a layer belongs to; decides whether a LoRA network targets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Inside a UNet `Transformer2DModel` (always targeted).
    Transformer,
    /// Inside `ResnetBlock2D`, `Downsample2D` or `Upsample2D` (targeted with `conv_dim`).
    ResnetConv,
    /// Inside the text encoder's `CLIPAttention` / `CLIPMLP` (always targeted).
    TextEncoder,
}

/// Geometry of a layer a LoRA module can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    Linear {
        in_features: usize,
        out_features: usize,
    },
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
}

impl SiteKind {
    /// True for Linear and 1×1 convs (they take `network_dim`), false for 3×3 convs.
    pub fn is_linear_like(&self) -> bool {
        match self {
            SiteKind::Linear { .. } => true,
            SiteKind::Conv2d { kernel, .. } => *kernel == 1,
        }
    }
    pub fn in_dim(&self) -> usize {
        match *self {
            SiteKind::Linear { in_features, .. } => in_features,
            SiteKind::Conv2d { in_channels, .. } => in_channels,
        }
    }
    pub fn out_dim(&self) -> usize {
        match *self {
            SiteKind::Linear { out_features, .. } => out_features,
            SiteKind::Conv2d { out_channels, .. } => out_channels,
        }
    }
}

/// One LoRA adapter applied to a layer: `y += up(down(x)) * scale`.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub down: Tensor,
    pub up: Tensor,
    /// `alpha / rank * multiplier`.
    pub scale: f64,
}

/// Adapters currently attached to one layer.
pub type AdapterSlot = Arc<RwLock<Vec<Adapter>>>;

/// A layer that LoRA can target, named as kohya names it.
#[derive(Debug, Clone)]
pub struct LoraSite {
    /// kohya module name, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`.
    pub name: String,
    pub scope: Scope,
    pub kind: SiteKind,
    pub slot: AdapterSlot,
}

/// The LoRA sites of one model, in construction order.
#[derive(Debug, Clone, Default)]
pub struct Sites(Arc<Mutex<Vec<LoraSite>>>);

impl Sites {
    pub fn list(&self) -> Vec<LoraSite> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    fn push(&self, site: LoraSite) {
        match self.0.lock() {
            Ok(mut g) => g.push(site),
            Err(p) => p.into_inner().push(site),
        }
    }
}

/// A `VarBuilder` plus where LoRA sites are recorded and under which kohya prefix.
#[derive(Clone)]
pub struct Builder<'a> {
    vb: VarBuilder<'a>,
    sites: Sites,
    lora_prefix: &'static str,
    scope: Option<Scope>,
}

impl<'a> Builder<'a> {
    /// `lora_prefix` is `lora_unet` or `lora_te`.
    pub fn new(vb: VarBuilder<'a>, lora_prefix: &'static str) -> Self {
        Self {
            vb,
            sites: Sites::default(),
            lora_prefix,
            scope: None,
        }
    }
    pub fn pp(&self, s: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(s),
            ..self.clone()
        }
    }
    /// Layers built from the returned builder are LoRA sites of `scope`.
    pub fn scope(&self, scope: Scope) -> Self {
        Self {
            scope: Some(scope),
            ..self.clone()
        }
    }
    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }
    pub fn sites(&self) -> &Sites {
        &self.sites
    }
    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }
    pub fn device(&self) -> &candle_core::Device {
        self.vb.device()
    }
    /// Loads a tensor of the given shape at this path.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        Ok(self.vb.get(shape, name)?)
    }

    fn register(&self, kind: SiteKind) -> Option<AdapterSlot> {
        let scope = self.scope?;
        let slot: AdapterSlot = Arc::default();
        let path = self.vb.prefix().replace('.', "_");
        self.sites.push(LoraSite {
            name: format!("{}_{}", self.lora_prefix, path),
            scope,
            kind,
            slot: slot.clone(),
        });
        Some(slot)
    }
}

fn adapters(slot: &Option<AdapterSlot>) -> Vec<Adapter> {
    match slot {
        None => Vec::new(),
        Some(s) => match s.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        },
    }
}

/// A frozen `nn.Linear` with optional LoRA adapters.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    slot: Option<AdapterSlot>,
}

impl Linear {
    pub fn new(in_features: usize, out_features: usize, bias: bool, b: &Builder) -> Result<Self> {
        let weight = b.get((out_features, in_features), "weight")?;
        let bias = if bias {
            Some(b.get(out_features, "bias")?)
        } else {
            None
        };
        let slot = b.register(SiteKind::Linear {
            in_features,
            out_features,
        });
        Ok(Self { weight, bias, slot })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_f = self.weight.dim(1)?;
        let out_f = self.weight.dim(0)?;
        let rows = x.elem_count() / in_f.max(1);
        let x2 = x.reshape((rows, in_f))?;
        let mut y = x2.detach().matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let w = self.weight.clone();
        let mut y = attach_grad(&x2, y, move |g| g.matmul(&w))?;
        for a in adapters(&self.slot) {
            let h = x2.matmul(&a.down.t()?)?.matmul(&a.up.t()?)?;
            y = (y + (h * a.scale)?)?;
        }
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = out_f;
        }
        Ok(y.reshape(out_dims)?)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// Reverses a tensor along dims 2 and 3 (kernel flip for the input gradient of a convolution).
fn flip_hw(w: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let dev = w.device();
    let ih: Vec<u32> = (0..kh as u32).rev().collect();
    let iw: Vec<u32> = (0..kw as u32).rev().collect();
    let w = w.index_select(&Tensor::new(ih.as_slice(), dev)?, 2)?;
    w.index_select(&Tensor::new(iw.as_slice(), dev)?, 3)
}

/// Input gradient of a frozen 2-D convolution with square kernel `w` [out, in, k, k].
fn conv2d_input_grad(
    g: &Tensor,
    w: &Tensor,
    input_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, k, _) = w.dims4()?;
    if stride == 1 && padding <= k.saturating_sub(1) {
        let wt = flip_hw(&w.transpose(0, 1)?.contiguous()?)?.contiguous()?;
        return g.conv2d(&wt, k - 1 - padding, 1, 1, 1);
    }
    let (_, _, gh, gw) = g.dims4()?;
    let out_h = (gh - 1) * stride + k - 2 * padding;
    let out_w = (gw - 1) * stride + k - 2 * padding;
    let op_h = input_hw.0.saturating_sub(out_h);
    let op_w = input_hw.1.saturating_sub(out_w);
    let op = op_h.max(op_w);
    let gx = g.conv_transpose2d(w, padding, op, stride, 1)?;
    gx.narrow(2, 0, input_hw.0)?.narrow(3, 0, input_hw.1)
}

/// A frozen `nn.Conv2d` (square kernel, no groups/dilation) with optional LoRA adapters.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    slot: Option<AdapterSlot>,
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        b: &Builder,
    ) -> Result<Self> {
        let weight = b.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = Some(b.get(out_channels, "bias")?);
        let slot = b.register(SiteKind::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
        });
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            slot,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut y = x
            .detach()
            .conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
        }
        let wt = self.weight.clone();
        let (stride, padding) = (self.stride, self.padding);
        let mut y = attach_grad(x, y, move |g| {
            conv2d_input_grad(g, &wt, (h, w), stride, padding)
        })?;
        for a in adapters(&self.slot) {
            let d = conv2d_trainable(x, &a.down, self.stride, self.padding)?;
            let hdn = d.conv2d(&a.up, 0, 1, 1, 1)?;
            y = (y + (hdn * a.scale)?)?;
        }
        Ok(y)
    }
}

/// Differentiable GroupNorm over [B, C, ...] (statistics in f32).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, b: &Builder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(crate::Error::Config(format!(
                "group norm: {channels} channels are not divisible into {groups} groups"
            )));
        }
        Ok(Self {
            weight: b.get(channels, "weight")?,
            bias: b.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }

    /// `silu(group_norm(x))`, fused into one op where [`crate::fused`] applies.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, true)
    }

    fn forward_with(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if crate::fused::applies(x) {
            return Ok(crate::fused::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            )?);
        }
        let dims = x.dims().to_vec();
        let (bsz, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let xg = x.to_dtype(DType::F32)?.reshape((bsz, self.groups, ()))?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let xn = xn.reshape(dims)?.to_dtype(dtype)?;
        let y = xn
            .broadcast_mul(&self.weight.reshape(shape.clone())?)?
            .broadcast_add(&self.bias.reshape(shape)?)?;
        Ok(if silu { y.silu()? } else { y })
    }
}

/// Differentiable LayerNorm over the last dimension (statistics in f32).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, b: &Builder) -> Result<Self> {
        Ok(Self {
            weight: b.get(dim, "weight")?,
            bias: b.get(dim, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::fused::applies(x) {
            return Ok(crate::fused::layer_norm(
                x,
                &self.weight,
                &self.bias,
                self.eps,
            )?);
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Softmax over the last dimension: candle's fast kernel forward, exact gradient
/// `y * (g - sum(g * y))`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    let y2 = y.clone();
    attach_grad(x, y, move |g| crate::fused::softmax_backward(&y2, g))
}

/// Nearest-neighbour 2× upsampling of [B, C, H, W] written with broadcast so its gradient sums.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, h * 2, w * 2))?)
}

/// Nearest-neighbour upsampling to an explicit size (integer factors only).
pub fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !out_h.is_multiple_of(h) || !out_w.is_multiple_of(w) {
        return Err(crate::Error::Config(format!(
            "upsample from {h}x{w} to {out_h}x{out_w} is not an integer factor"
        )));
    }
    let (fh, fw) = (out_h / h, out_w / w);
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, fh, w, fw))?
        .contiguous()?
        .reshape((b, c, out_h, out_w))?)
}

/// Largest attention-score block computed at once. Rows of the score matrix are independent,
/// so queries are processed in slices whose [B, heads, rows, L] scores stay under this size:
/// small buffers are reused by the allocator instead of being mapped and faulted in afresh at
/// every step (a 512² SD1.5 sample has 4096×4096 scores per head, 512 MiB in one piece).
const ATTENTION_BLOCK_BYTES: usize = 16 << 20;

/// Scaled dot-product attention on [B, heads, L, d] tensors.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let block = |q: &Tensor| -> Result<Tensor> {
        let att = (q.contiguous()?.matmul(&kt)? * scale)?;
        let att = softmax_last_dim(&att)?;
        Ok(att.matmul(&v)?)
    };
    let row_bytes = (b * h * lk * q.dtype().size_in_bytes()).max(1);
    let rows = (ATTENTION_BLOCK_BYTES / row_bytes).max(1);
    if rows >= lq {
        return block(q);
    }
    let mut parts = Vec::with_capacity(lq.div_ceil(rows));
    for start in (0..lq).step_by(rows) {
        parts.push(block(&q.narrow(2, start, rows.min(lq - start))?)?);
    }
    Ok(Tensor::cat(&parts, 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= tol, "max abs diff {d} > {tol}");
    }

    #[test]
    fn blocked_attention_equals_one_block_with_gradients() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // 1 × 2 heads × 3000 queries × 2800 keys × 4 bytes = 67 MB of scores: five blocks.
        let q = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 2, 3000, 4), &dev)?)?;
        let k = Tensor::randn(0f32, 1., (1, 2, 2800, 4), &dev)?;
        let v = Tensor::randn(0f32, 1., (1, 2, 2800, 4), &dev)?;
        let blocked = attention(q.as_tensor(), &k, &v)?;
        let whole = {
            let att = (q.as_tensor().matmul(&k.t()?.contiguous()?)? * 0.5)?;
            softmax_last_dim(&att)?.matmul(&v)?
        };
        assert_close(&blocked, &whole, 1e-5);
        let g1 = blocked.sum_all()?.backward()?;
        let g2 = whole.sum_all()?.backward()?;
        let (a, b) = (g1.get(q.as_tensor()), g2.get(q.as_tensor()));
        match (a, b) {
            (Some(a), Some(b)) => assert_close(a, b, 1e-4),
            _ => anyhow::bail!("no gradient for q"),
        }
        Ok(())
    }

    #[test]
    fn frozen_conv_input_grad_matches_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for &(k, stride, pad, h, w) in &[
            (3, 1, 1, 8, 6),
            (1, 1, 0, 5, 7),
            (3, 2, 1, 8, 8),
            (3, 2, 1, 7, 8),
        ] {
            let wt = Tensor::randn(0f32, 1., (5, 3, k, k), &dev)?;
            let xv = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?)?;
            let reference = xv.as_tensor().conv2d(&wt, pad, stride, 1, 1)?;
            let g = Tensor::randn(0f32, 1., reference.shape(), &dev)?;
            let y = xv.as_tensor().detach().conv2d(&wt, pad, stride, 1, 1)?;
            let wt2 = wt.clone();
            let out = attach_grad(xv.as_tensor(), y, move |gr| {
                conv2d_input_grad(gr, &wt2, (h, w), stride, pad)
            })?;
            let got = (out * &g)?.sum_all()?.backward()?;
            let got = got.get(xv.as_tensor()).expect("grad");
            // The input gradient is the adjoint of the convolution: <conv(x), g> = <x, dx(g)>.
            let lhs = (&reference * &g)?.sum_all()?.to_scalar::<f32>()?;
            let rhs = (xv.as_tensor() * got)?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                "{lhs} vs {rhs}"
            );
            // candle's own conv backward mishandles odd/even H vs W with stride 2.
            if h % 2 == w % 2 || stride == 1 {
                let want = (reference * &g)?.sum_all()?.backward()?;
                let want = want.get(xv.as_tensor()).expect("grad");
                assert_close(want, got, 1e-4);
            }
        }
        Ok(())
    }

    #[test]
    fn trainable_conv_gradients_are_adjoints_for_any_parity() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for &(h, w) in &[(8, 8), (7, 8), (8, 11), (13, 10)] {
            let xv = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?)?;
            let wv = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev)?)?;
            let y = conv2d_trainable(xv.as_tensor(), wv.as_tensor(), 2, 1)?;
            let reference = xv.as_tensor().conv2d(wv.as_tensor(), 1, 2, 1, 1)?;
            assert_close(&y, &reference, 1e-5);
            let g = Tensor::randn(0f32, 1., y.shape(), &dev)?;
            let grads = (&y * &g)?.sum_all()?.backward()?;
            let gx = grads.get(xv.as_tensor()).expect("x grad");
            let gw = grads.get(wv.as_tensor()).expect("w grad");
            // conv is linear in x and in w: <conv(dx, w), g> = <dx, gx>, <conv(x, dw), g> = <dw, gw>
            let dx = Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?;
            let lhs = (dx.conv2d(wv.as_tensor(), 1, 2, 1, 1)? * &g)?.sum_all()?;
            let rhs = (&dx * gx)?.sum_all()?;
            let (lhs, rhs) = (lhs.to_scalar::<f32>()?, rhs.to_scalar::<f32>()?);
            assert!(
                (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                "{lhs} vs {rhs}"
            );
            let dw = Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev)?;
            let lhs = (xv.as_tensor().conv2d(&dw, 1, 2, 1, 1)? * &g)?.sum_all()?;
            let rhs = (&dw * gw)?.sum_all()?;
            let (lhs, rhs) = (lhs.to_scalar::<f32>()?, rhs.to_scalar::<f32>()?);
            assert!(
                (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                "{lhs} vs {rhs}"
            );
        }
        Ok(())
    }

    #[test]
    fn softmax_and_norm_gradients_match_composed_ops() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 7), &dev)?)?;
        let g = Tensor::randn(0f32, 1., (2, 3, 7), &dev)?;
        let want = candle_nn::ops::softmax(xv.as_tensor(), D::Minus1)?;
        let got = softmax_last_dim(xv.as_tensor())?;
        assert_close(&want, &got, 1e-6);
        let gw = (want * &g)?.sum_all()?.backward()?;
        let gg = (got * &g)?.sum_all()?.backward()?;
        let (a, b) = (gw.get(xv.as_tensor()), gg.get(xv.as_tensor()));
        assert_close(a.expect("grad"), b.expect("grad"), 1e-5);
        Ok(())
    }

    #[test]
    fn upsample_gradient_sums_over_copies() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 2, 3, 4), &dev)?)?;
        let y = upsample_nearest2x(xv.as_tensor())?;
        let want = xv.as_tensor().upsample_nearest2d(6, 8)?;
        assert_close(&y, &want, 0.0);
        let grads = y.sum_all()?.backward()?;
        let g = grads.get(xv.as_tensor()).expect("grad");
        assert_close(g, &Tensor::full(4f32, (1, 2, 3, 4), &dev)?, 0.0);
        Ok(())
    }
}
