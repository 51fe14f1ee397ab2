//! Layers shared by the UNet, the text encoder and the VAE.
//!
//! Base weights are frozen: `Linear` and `Conv2d` compute their output without recording a graph
//! for the weight and attach a backward that produces only the input gradient (candle's own ops
//! would also compute a full-size gradient for every frozen weight). Norms and softmax are written
//! so their gradients flow (candle's fast `layer_norm` and `softmax_last_dim` are detached).
//! Every `Linear`/`Conv2d` built inside a LoRA scope registers a [`LoraSite`] so a LoRA network
//! can be attached to it later.

use std::sync::{Arc, Mutex, RwLock};

use candle_core::{CpuStorage, DType, Layout, Module, Shape, Tensor, D};
use candle_nn::VarBuilder;

use crate::Result;

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

/// Returns `value` as a function of `input`, with `backward` mapping d(out) to d(input).
/// When `input` carries no graph, `value` is returned as is.
pub fn attach_grad(
    input: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    attach_grad3([input, input, input], value, move |g, _| {
        Ok([Some(backward(g)?), None, None])
    })
}

/// `value` as a function of `a` and `b`; `backward` maps d(out) to (d(a), d(b)).
pub fn attach_grad2(
    a: &Tensor,
    b: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor) -> candle_core::Result<(Tensor, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    attach_grad3([a, b, b], value, move |g, _| {
        let (ga, gb) = backward(g)?;
        Ok([Some(ga), Some(gb), None])
    })
}

type BackwardFn = dyn Fn(&Tensor) -> candle_core::Result<[Option<Tensor>; 3]> + Send + Sync;

/// `out = value` (computed without a graph) as a function of up to three inputs; the gradient
/// reaching `out` is turned into the inputs' gradients by `backward`. The value is handed over
/// in the op itself and taken by the forward, so the graph does not hold a second copy of it.
struct AttachGrad {
    value: Mutex<Option<Tensor>>,
    backward: Box<BackwardFn>,
}

impl AttachGrad {
    fn take(&self) -> candle_core::Result<Tensor> {
        let value = match self.value.lock() {
            Ok(mut v) => v.take(),
            Err(p) => p.into_inner().take(),
        };
        value.ok_or_else(|| candle_core::Error::Msg("attach-grad: value taken twice".into()))
    }
}

impl candle_core::CustomOp3 for AttachGrad {
    fn name(&self) -> &'static str {
        "attach-grad"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => {
                Ok((copy_storage_cpu(s, layout)?, layout.shape().clone()))
            }
            _ => Err(candle_core::Error::Msg(
                "attach-grad: value is not on the CPU".into(),
            )),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
        _s3: &candle_core::CudaStorage,
        _l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => {
                Ok((copy_storage_cuda(s, layout)?, layout.shape().clone()))
            }
            _ => Err(candle_core::Error::Msg(
                "attach-grad: value is not on the GPU".into(),
            )),
        }
    }

    fn bwd(
        &self,
        _arg1: &Tensor,
        _arg2: &Tensor,
        _arg3: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [a, b, c] = (self.backward)(grad_res)?;
        Ok((a, b, c))
    }
}

/// `value` as a function of `a`, `b` and `c`; `backward` maps d(out) to their gradients and
/// is told which of them carry a graph (the others need none).
pub fn attach_grad3(
    [a, b, c]: [&Tensor; 3],
    value: Tensor,
    backward: impl Fn(&Tensor, [bool; 3]) -> candle_core::Result<[Option<Tensor>; 3]>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    let need = [a.track_op(), b.track_op(), c.track_op()];
    if need == [false; 3] {
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
        c,
        AttachGrad {
            value: Mutex::new(Some(value)),
            backward: Box::new(move |g| backward(g, need)),
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
    /// The weight `name` of this builder's prefix; a refusal of the weights' store keeps its
    /// own error (a missing tensor or wrong shape is a bad config, not candle's string).
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let _ = crate::weights::take_refusal();
        self.vb
            .get(shape, name)
            .map_err(|e| crate::weights::take_refusal().unwrap_or(e.into()))
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

/// The adapters with their (f32 master) weights cast to `dtype`, the dtype of the
/// activations they multiply; the cast is part of the graph, so the gradients reach the f32
/// weights.
fn adapters_as(adapters: Vec<Adapter>, dtype: DType) -> Result<Vec<Adapter>> {
    adapters
        .into_iter()
        .map(|a| {
            Ok(Adapter {
                down: a.down.to_dtype(dtype)?,
                up: a.up.to_dtype(dtype)?,
                scale: a.scale,
            })
        })
        .collect()
}

/// Whether convolutions of `x` must run in f32: candle has no half-precision convolution on
/// the CPU.
fn conv_needs_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() != DType::F32 && x.dtype() != DType::F64
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
        linear(x, &self.weight, self.bias.as_ref(), adapters(&self.slot))
    }

    /// The LoRA tensors attached to this layer.
    pub fn lora_tensors(&self) -> Vec<Tensor> {
        lora_tensors(&self.slot)
    }
}

fn lora_tensors(slot: &Option<AdapterSlot>) -> Vec<Tensor> {
    adapters(slot)
        .into_iter()
        .flat_map(|a| [a.down, a.up])
        .collect()
}

/// `x·Wᵀ + b` over the last dimension of `x` plus the LoRA `adapters` (2-D down and up
/// weights); the frozen `W` gets no gradient.
fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    adapters: Vec<Adapter>,
) -> Result<Tensor> {
    let adapters = adapters_as(adapters, x.dtype())?;
    let dims = x.dims().to_vec();
    let (out_f, in_f) = weight.dims2()?;
    let rows = x.elem_count() / in_f.max(1);
    let x2 = x.reshape((rows, in_f))?;
    if crate::fused::applies(x) && weight.dtype() == DType::F32 && adapters.len() <= 1 {
        let adapter = adapters.first().map(|a| (&a.down, &a.up, a.scale));
        let y = crate::dense::linear(&x2, weight, bias, adapter)?;
        return Ok(y.reshape(out_shape(&dims, out_f))?);
    }
    let mut y = x2.detach().matmul(&weight.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let w = weight.clone();
    let mut y = match adapters.as_slice() {
        [a] => return Ok(lora_linear(&x2, &w, y, a)?.reshape(out_shape(&dims, out_f))?),
        _ => attach_grad(&x2, y, move |g| g.matmul(&w))?,
    };
    for a in adapters {
        let h = x2.matmul(&a.down.t()?)?.matmul(&a.up.t()?)?;
        y = (y + (h * a.scale)?)?;
    }
    Ok(y.reshape(out_shape(&dims, out_f))?)
}

/// `dims` with the last one replaced by `last`.
fn out_shape(dims: &[usize], last: usize) -> Vec<usize> {
    let mut out = dims.to_vec();
    if let Some(l) = out.last_mut() {
        *l = last;
    }
    out
}

/// A frozen linear layer with one LoRA adapter as one graph node: `base` is `x·Wᵀ + b`
/// (computed without a graph) and the result is `base + s·(x·Dᵀ)·Uᵀ` with the gradients
/// `dX = g·W + s·(g·U)·D`, `dD = s·(g·U)ᵀ·x`, `dU = s·gᵀ·(x·Dᵀ)`. The rank-sized product
/// `x·Dᵀ` is recomputed in backward instead of kept.
fn lora_linear(x: &Tensor, w: &Tensor, base: Tensor, a: &Adapter) -> Result<Tensor> {
    let (xd, down, up, s) = (x.detach(), a.down.detach(), a.up.detach(), a.scale);
    let h = (xd.matmul(&down.t()?)? * s)?.matmul(&up.t()?)?;
    let y = (base + h)?;
    let w = w.clone();
    attach_grad3([x, &a.down, &a.up], y, move |g, need| {
        let gu = (g.matmul(&up)? * s)?;
        let dx = match need[0] {
            true => Some((g.matmul(&w)? + gu.matmul(&down)?)?),
            false => None,
        };
        let dd = match need[1] {
            true => Some(gu.t()?.matmul(&xd)?),
            false => None,
        };
        let du = match need[2] {
            true => Some(g.t()?.matmul(&(xd.matmul(&down.t()?)? * s)?)?),
            false => None,
        };
        Ok([dx, dd, du])
    })
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// Input gradient of a frozen 2-D convolution with square kernel `w` [out, in, k, k].
fn conv2d_input_grad(
    g: &Tensor,
    w: &Tensor,
    input_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    match crate::fused::conv2d_input_grad(g, w, input_hw, stride, padding)? {
        Some(gx) => Ok(gx),
        None => conv2d_input_grad_composed(g, w, input_hw, stride, padding),
    }
}

/// [`conv2d_input_grad`] from candle's convolutions (off the CPU): a stride-1 convolution
/// with the flipped, transposed kernel, else a transposed convolution.
fn conv2d_input_grad_composed(
    g: &Tensor,
    w: &Tensor,
    input_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    if conv_needs_f32(g) {
        let gx = conv2d_input_grad_composed(
            &g.to_dtype(DType::F32)?,
            &w.to_dtype(DType::F32)?,
            input_hw,
            stride,
            padding,
        )?;
        return gx.to_dtype(g.dtype());
    }
    let (_, _, k, _) = w.dims4()?;
    if stride == 1 && padding <= k.saturating_sub(1) {
        // w[o, i, kh, kw] → w[i, o, k-1-kh, k-1-kw]
        let dev = w.device();
        let flip: Vec<u32> = (0..k as u32).rev().collect();
        let flip = Tensor::new(flip.as_slice(), dev)?;
        let wt = w
            .transpose(0, 1)?
            .contiguous()?
            .index_select(&flip, 2)?
            .index_select(&flip, 3)?;
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

    /// The LoRA tensors attached to this layer.
    pub fn lora_tensors(&self) -> Vec<Tensor> {
        lora_tensors(&self.slot)
    }

    /// A 1×1, stride-1 convolution applied to channels-last tokens `[.., C]`: the same
    /// layer as a linear one, without the layout changes to and from [B, C, H, W].
    pub fn forward_tokens(&self, t: &Tensor) -> Result<Tensor> {
        let (out_c, in_c, k, _) = self.weight.dims4()?;
        if k != 1 || self.stride != 1 || self.padding != 0 {
            return Err(crate::Error::Internal(format!(
                "a {k}×{k} convolution with stride {} and padding {} is not per-token",
                self.stride, self.padding
            )));
        }
        let adapters = adapters(&self.slot)
            .into_iter()
            .map(|a| {
                let rank = a.down.dim(0)?;
                Ok(Adapter {
                    down: a.down.reshape((rank, in_c))?,
                    up: a.up.reshape((out_c, rank))?,
                    scale: a.scale,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let weight = self.weight.reshape((out_c, in_c))?;
        linear(t, &weight, self.bias.as_ref(), adapters)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (stride, padding) = (self.stride, self.padding);
        let fused =
            crate::fused::frozen_conv2d(x, &self.weight, self.bias.as_ref(), stride, padding)?;
        let mut y = match fused {
            Some(y) => y,
            None => {
                let (_, _, h, w) = x.dims4()?;
                let mut y = x.detach().conv2d(&self.weight, padding, stride, 1, 1)?;
                if let Some(b) = &self.bias {
                    y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
                }
                let wt = self.weight.clone();
                attach_grad(x, y, move |g| {
                    conv2d_input_grad(g, &wt, (h, w), stride, padding)
                })?
            }
        };
        let adapters = adapters(&self.slot);
        if adapters.is_empty() {
            return Ok(y);
        }
        let lora_dtype = if conv_needs_f32(x) {
            DType::F32
        } else {
            x.dtype()
        };
        let xl = x.to_dtype(lora_dtype)?;
        for a in adapters_as(adapters, lora_dtype)? {
            let d = conv2d_trainable(&xl, &a.down, self.stride, self.padding)?;
            let hdn = d.conv2d(&a.up, 0, 1, 1, 1)?;
            let hdn = (hdn * a.scale)?.to_dtype(y.dtype())?;
            y = (y + hdn)?;
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
    let y = crate::fused::softmax_last_dim(&x.detach())?;
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

/// Multi-head scaled dot-product attention on the projections as they come out of the
/// linear layers: q [B, Lq, heads·d], k and v [B, Lk, heads·d] in, [B, Lq, heads·d] out.
///
/// On the CPU this is [`crate::flash::attention`], block by block without splitting the heads
/// (half-precision inputs are computed in f32, as PyTorch's CPU attention does); elsewhere the
/// heads are split out for [`attention`].
pub fn multi_head_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if q.device().is_cpu() {
        if q.dtype() != DType::F32 {
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let out =
                crate::flash::attention(&f(q)?, &f(k)?, &f(v)?, heads, crate::flash::BLOCK_SCORES)?;
            return Ok(out.to_dtype(q.dtype())?);
        }
        return Ok(crate::flash::attention(
            q,
            k,
            v,
            heads,
            crate::flash::BLOCK_SCORES,
        )?);
    }
    let split = |x: &Tensor| -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        Ok(x.reshape((b, l, heads, c / heads.max(1)))?
            .transpose(1, 2)?)
    };
    let o = attention(&split(q)?, &split(k)?, &split(v)?)?;
    let (b, h, l, d) = o.dims4()?;
    Ok(o.transpose(1, 2)?.reshape((b, l, h * d))?)
}

/// Largest attention-score block computed at once. Rows of the score matrix are independent,
/// so queries are processed in slices whose [B, heads, rows, L] scores stay under this size:
/// small buffers are reused by the allocator instead of being mapped and faulted in afresh at
/// every step (a 512² SD1.5 sample has 4096×4096 scores per head, 512 MiB in one piece).
const ATTENTION_BLOCK_BYTES: usize = 16 << 20;

/// Scaled dot-product attention on [B, heads, L, d] tensors, as one graph node.
///
/// Forward and backward go through the queries in blocks (see [`ATTENTION_BLOCK_BYTES`]);
/// the softmax probabilities are not kept for backward but recomputed block by block, so the
/// graph holds only q, k and v. With `P = softmax(s·q·kᵀ)` and `O = P·v`:
/// `dv = Pᵀ·dO`, `dS = P ∘ (dO·vᵀ − rowsum(P ∘ dO·vᵀ))`, `dq = s·dS·k`, `dk = s·dSᵀ·q`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let kt = kd.t()?.contiguous()?;
    let row_bytes = (b * h * lk * q.dtype().size_in_bytes()).max(1);
    let rows = (ATTENTION_BLOCK_BYTES / row_bytes).clamp(1, lq.max(1));
    let blocks: Vec<(usize, usize)> = (0..lq)
        .step_by(rows)
        .map(|start| (start, rows.min(lq - start)))
        .collect();
    let probs = move |qb: &Tensor| -> candle_core::Result<Tensor> {
        crate::fused::softmax_last_dim(&(qb * scale)?.matmul(&kt)?)
    };
    let mut parts = Vec::with_capacity(blocks.len());
    for &(start, n) in &blocks {
        parts.push(probs(&qd.narrow(2, start, n)?)?.matmul(&vd)?);
    }
    let out = Tensor::cat(&parts, 2)?;
    drop(parts);
    attach_grad3([&q, &k, &v], out, move |g, need| {
        let g = g.contiguous()?;
        let vt = vd.t()?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        let acc = |sum: Option<Tensor>, t: Tensor| match sum {
            Some(s) => s + t,
            None => Ok(t),
        };
        for &(start, n) in &blocks {
            let qb = qd.narrow(2, start, n)?;
            let gb = g.narrow(2, start, n)?;
            let p = probs(&qb)?;
            if need[2] {
                dv = Some(acc(dv, p.t()?.matmul(&gb)?)?);
            }
            if !need[0] && !need[1] {
                continue;
            }
            let ds = crate::fused::softmax_backward(&p, &gb.matmul(&vt)?)?;
            drop(p);
            if need[0] {
                dq.push((ds.matmul(&kd)? * scale)?);
            }
            if need[1] {
                dk = Some(acc(dk, (ds.t()?.matmul(&qb)? * scale)?)?);
            }
        }
        let dq = match need[0] {
            true => Some(Tensor::cat(&dq, 2)?),
            false => None,
        };
        Ok([dq, dk, dv])
    })
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

    /// The gradients of `<out, g>` for `vars` under two computations of `out`.
    fn same_gradients(
        vars: &[&Var],
        fused: &Tensor,
        composed: &Tensor,
        tol: f32,
    ) -> anyhow::Result<()> {
        assert_close(fused, composed, tol);
        let g = Tensor::randn(0f32, 1., composed.shape(), composed.device())?;
        let gf = (fused * &g)?.sum_all()?.backward()?;
        let gc = (composed * &g)?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            match (gf.get(v.as_tensor()), gc.get(v.as_tensor())) {
                (Some(a), Some(b)) => {
                    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    assert!(scale > 0.0, "input {i}: reference gradient is zero");
                    assert_close(a, b, tol * scale.max(1.0));
                }
                _ => anyhow::bail!("input {i}: no gradient"),
            }
        }
        Ok(())
    }

    #[test]
    fn blocked_attention_equals_composed_attention_with_gradients() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // 1 × 2 heads × 3000 queries × 2800 keys × 4 bytes = 67 MB of scores: five blocks.
        let var = |l| -> anyhow::Result<Var> {
            Ok(Var::from_tensor(&Tensor::randn(
                0f32,
                1.,
                (1, 2, l, 4),
                &dev,
            )?)?)
        };
        let (q, k, v) = (var(3000)?, var(2800)?, var(2800)?);
        let blocked = attention(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
        let att = (q.as_tensor().matmul(&k.as_tensor().t()?)? * 0.5)?;
        let whole = candle_nn::ops::softmax(&att, D::Minus1)?.matmul(v.as_tensor())?;
        same_gradients(&[&q, &k, &v], &blocked, &whole, 1e-4)
    }

    /// Attention on [B, L, heads·d] tensors from the composed ops: heads split out, scores,
    /// candle's softmax, values, heads merged.
    fn composed_multi_head(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        let split = |x: &Tensor| -> Result<Tensor> {
            let (b, l, c) = x.dims3()?;
            Ok(x.reshape((b, l, heads, c / heads))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let o = candle_nn::ops::softmax(&att, D::Minus1)?.matmul(&v)?;
        let (b, h, l, d) = o.dims4()?;
        Ok(o.transpose(1, 2)?.reshape((b, l, h * d))?)
    }

    #[test]
    fn flash_attention_equals_composed_attention_with_gradients() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // (batch, queries, keys, heads, head dim, scores per block): several blocks with a
        // short last one; one head alone, whose blocks are split between backward tasks;
        // one block holding every query; cross-attention with fewer keys than queries.
        for &(b, lq, lk, heads, d, block) in &[
            (2, 70, 33, 3, 5, 33 * 8),
            (1, 50, 50, 1, 4, 50 * 6),
            (1, 20, 20, 2, 8, 1 << 16),
            (2, 64, 7, 4, 3, 7 * 16),
        ] {
            let var = |l| -> anyhow::Result<Var> {
                Ok(Var::from_tensor(&Tensor::randn(
                    0f32,
                    1.,
                    (b, l, heads * d),
                    &dev,
                )?)?)
            };
            let (q, k, v) = (var(lq)?, var(lk)?, var(lk)?);
            let fused =
                crate::flash::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, block)?;
            let composed = composed_multi_head(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads)?;
            same_gradients(&[&q, &k, &v], &fused, &composed, 1e-5)?;
        }
        Ok(())
    }

    #[test]
    fn multi_head_attention_in_bf16_stays_close_to_f32() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = |l| Tensor::randn(0f32, 1., (1, l, 16), &dev);
        let (q, k, v) = (x(40)?, x(30)?, x(30)?);
        let want = composed_multi_head(&q, &k, &v, 2)?;
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let got = multi_head_attention(&bf(&q)?, &bf(&k)?, &bf(&v)?, 2)?;
        assert_eq!(got.dtype(), DType::BF16);
        // bf16 keeps 8 bits of mantissa: inputs and output are each rounded once.
        assert_close(&got.to_dtype(DType::F32)?, &want, 3e-2);
        Ok(())
    }

    #[test]
    fn lora_linear_equals_composed_ops_with_gradients() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (37, 24), &dev)?)?;
        let down = Var::from_tensor(&Tensor::randn(0f32, 0.2, (4, 24), &dev)?)?;
        let up = Var::from_tensor(&Tensor::randn(0f32, 0.2, (16, 4), &dev)?)?;
        let w = Tensor::randn(0f32, 0.2, (16, 24), &dev)?;
        let bias = Tensor::randn(0f32, 0.2, 16, &dev)?;
        let adapter = Adapter {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            scale: 0.75,
        };
        let base = x
            .as_tensor()
            .detach()
            .matmul(&w.t()?)?
            .broadcast_add(&bias)?;
        let fused = lora_linear(x.as_tensor(), &w, base, &adapter)?;
        let lora = x
            .as_tensor()
            .matmul(&down.as_tensor().t()?)?
            .matmul(&up.as_tensor().t()?)?;
        let composed = (x.as_tensor().matmul(&w.t()?)?.broadcast_add(&bias)? + (lora * 0.75)?)?;
        same_gradients(&[&x, &down, &up], &fused, &composed, 1e-5)
    }

    #[test]
    fn fused_linear_equals_composed_ops_with_gradients() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for (rows, with_bias, with_lora, input_grad) in [
            (37, true, true, true),
            (5, false, true, true),
            (19, true, false, true),
            (8, true, true, false),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (rows, 24), &dev)?)?;
            let down = Var::from_tensor(&Tensor::randn(0f32, 0.2, (4, 24), &dev)?)?;
            let up = Var::from_tensor(&Tensor::randn(0f32, 0.2, (16, 4), &dev)?)?;
            let w = Tensor::randn(0f32, 0.2, (16, 24), &dev)?;
            let bias = Tensor::randn(0f32, 0.2, 16, &dev)?;
            let xin = match input_grad {
                true => x.as_tensor().clone(),
                false => x.as_tensor().detach(),
            };
            let adapter = with_lora.then_some((down.as_tensor(), up.as_tensor(), 0.75));
            let fused = crate::dense::linear(&xin, &w, with_bias.then_some(&bias), adapter)?;
            let mut composed = xin.matmul(&w.t()?)?;
            if with_bias {
                composed = composed.broadcast_add(&bias)?;
            }
            if with_lora {
                let lora = xin
                    .matmul(&down.as_tensor().t()?)?
                    .matmul(&up.as_tensor().t()?)?;
                composed = (composed + (lora * 0.75)?)?;
            }
            let vars: Vec<&Var> = [(input_grad, &x), (with_lora, &down), (with_lora, &up)]
                .into_iter()
                .filter_map(|(on, v)| on.then_some(v))
                .collect();
            same_gradients(&vars, &fused, &composed, 1e-5)?;
            if !input_grad {
                let g = fused.sum_all()?.backward()?;
                assert!(
                    g.get(x.as_tensor()).is_none(),
                    "a gradient for a detached input"
                );
            }
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
            // The CPU kernel, and candle's convolutions as used off the CPU.
            let composed = conv2d_input_grad_composed(&g, &wt, (h, w), stride, pad)?;
            let wt2 = wt.clone();
            let out = attach_grad(xv.as_tensor(), y, move |gr| {
                conv2d_input_grad(gr, &wt2, (h, w), stride, pad)
            })?;
            let got = (out * &g)?.sum_all()?.backward()?;
            let got = got.get(xv.as_tensor()).expect("grad");
            assert_close(got, &composed, 1e-4);
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
