//! Fused CPU kernels with their own backward for the element-wise parts of a training step.
//!
//! Written as candle ops, GroupNorm + SiLU is about ten graph nodes, and candle's backward pass
//! turns every node into a zero-filled gradient buffer, an add and the node's own passes over
//! memory. Here each of these layers is one node whose forward and backward are one or two
//! passes, parallel over independent rows or groups:
//!
//! - [`group_norm`]: GroupNorm with a frozen affine, optionally followed by SiLU;
//! - [`layer_norm`]: LayerNorm over the last dimension with a frozen affine;
//! - [`geglu`]: `a * gelu_erf(g)` of the two halves of the last dimension;
//! - [`softmax_last_dim`] and [`softmax_backward`]: the softmax over the last dimension and
//!   its gradient `y * (g - sum(g * y))`, with a vectorized [`exp_f32`];
//! - [`conv2d`]: a convolution as patches times the kernel, and [`flip_transpose_kernel`],
//!   the kernel of a convolution's input gradient.
//!
//! Statistics are accumulated in f64 and recomputed in backward rather than stored. The
//! kernels take contiguous f32 on the CPU; any other tensor goes through the composed candle
//! ops of `nn`, so GPU runs keep their own kernels. `tests` compares every op and its gradient
//! with the composed reference.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Work items smaller than this many elements are grouped so a task is worth scheduling.
const MIN_TASK_ELEMS: usize = 1 << 14;

fn is_half(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// Whether the fused CPU kernels apply to `x`.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => return Err(candle_core::Error::Msg(format!("{op}: expects f32"))),
    };
    match l.contiguous_offsets() {
        Some((a, b)) if b <= v.len() => Ok(&v[a..b]),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: expects a contiguous tensor"
        ))),
    }
}

/// Rows of `width` elements per parallel task.
fn rows_per_task(width: usize) -> usize {
    MIN_TASK_ELEMS.div_ceil(width.max(1)).max(1)
}

#[inline]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-z))
}

/// Mean and 1/sqrt(var + eps) of `x` (biased variance, as PyTorch's norms).
fn moments(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| {
            let d = v as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// `exp(x)` for f32 in a form the compiler vectorizes (no calls, no branches): `x = n·ln2 + r`
/// with `|r| ≤ ln2/2`, a degree-6 polynomial for `exp(r)` and `2^n` built in the exponent
/// bits. Relative error under 3e-7 over the f32 range; inputs are clamped to [-87.3, 88.7],
/// so the smallest result is about 1.2e-38 (the smallest normal f32) instead of 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_54, 88.722_84);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // The rounded integer sits in the low mantissa bits of `t` (a bit cast, unlike `as i32`,
    // whose saturating conversion does not vectorize).
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_66;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n ∈ [-126, 128]: 2^n as bits, split in two factors so n = 128 does not overflow early.
    let half = ni >> 1;
    let a = f32::from_bits(((half + 127) as u32) << 23);
    let b = f32::from_bits(((ni - half + 127) as u32) << 23);
    e * a * b
}

/// `y = exp(y - m)` in place over a slice, returning the sum of the results; vectorized with
/// AVX2 and FMA where the CPU has them.
pub(crate) fn exp_shifted(y: &mut [f32], m: f32) -> f32 {
    #[inline(always)]
    fn body(y: &mut [f32], m: f32) -> f32 {
        // Eight partial sums so the additions vectorize too.
        let mut acc = [0f32; 8];
        let split = y.len() / 8 * 8;
        let (yc, yr) = y.split_at_mut(split);
        for y in yc.chunks_exact_mut(8) {
            for i in 0..8 {
                y[i] = exp_f32(y[i] - m);
                acc[i] += y[i];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for y in yr {
            *y = exp_f32(*y - m);
            sum += *y;
        }
        sum
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(y: &mut [f32], m: f32) -> f32 {
            body(y, m)
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx2(y, m) };
        }
    }
    body(y, m)
}

/// Softmax over the last dimension (forward only; [`softmax_backward`] is its gradient).
struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "softmax")?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let task = rows_per_task(d) * d;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(task)
            .zip(x.par_chunks(task))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    y.copy_from_slice(x);
                    let inv = 1.0 / exp_shifted(y, m);
                    y.iter_mut().for_each(|v| *v *= inv);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Softmax over the last dimension without a graph: fused on CPU f32, candle's kernel
/// elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if is_half(x) {
        // Exponentials and the row sum in f32, as PyTorch's half-precision softmax does.
        return softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    if applies(x) {
        return x.contiguous()?.apply_op1_no_bwd(&SoftmaxOp);
    }
    candle_nn::ops::softmax_last_dim(x)
}

/// `w[o, i, kh, kw]` → `w[i, o, k-1-kh, k-1-kw]`: the kernel of a convolution's input
/// gradient, in one pass.
struct FlipTranspose;

impl CustomOp1 for FlipTranspose {
    fn name(&self) -> &'static str {
        "flip-transpose-kernel"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = slice(s, l, "kernel flip")?;
        let (o, i, kh, kw) = l.shape().dims4()?;
        let k2 = kh * kw;
        let mut out = vec![0f32; w.len()];
        out.par_chunks_mut(o * k2)
            .enumerate()
            .for_each(|(ii, dst)| {
                for oo in 0..o {
                    let src = &w[(oo * i + ii) * k2..(oo * i + ii + 1) * k2];
                    let dst = &mut dst[oo * k2..(oo + 1) * k2];
                    for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                        *d = *s;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((i, o, kh, kw))))
    }
}

/// The transposed, spatially flipped kernel `[in, out, kh, kw]` of `w` `[out, in, kh, kw]`
/// (no graph). One pass on CPU f32, candle's ops elsewhere.
pub fn flip_transpose_kernel(w: &Tensor) -> candle_core::Result<Tensor> {
    if applies(w) {
        return w.contiguous()?.apply_op1_no_bwd(&FlipTranspose);
    }
    let (_, _, kh, kw) = w.dims4()?;
    let dev = w.device();
    let w = w.transpose(0, 1)?.contiguous()?;
    let ih: Vec<u32> = (0..kh as u32).rev().collect();
    let iw: Vec<u32> = (0..kw as u32).rev().collect();
    let w = w.index_select(&Tensor::new(ih.as_slice(), dev)?, 2)?;
    w.index_select(&Tensor::new(iw.as_slice(), dev)?, 3)?
        .contiguous()
}

/// The patches of a square-kernel convolution: [B, C, H, W] → [B, C·k·k, OH·OW], row
/// `(c, kh, kw)` holding input pixel `(oy·stride + kh − pad, ox·stride + kw − pad)` of channel
/// `c` for every output pixel (zero outside the image).
struct Im2Col {
    k: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let span = |n: usize| (n + 2 * self.padding).saturating_sub(self.k) / self.stride + 1;
        (span(h), span(w))
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "im2col")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = self.out_hw(h, w);
        let (k, stride, pad) = (self.k, self.stride, self.padding);
        let plane = oh * ow;
        let mut out = vec![0f32; b * c * k * k * plane];
        out.par_chunks_mut(k * k * plane)
            .zip(x.par_chunks(h * w))
            .for_each(|(rows, src)| {
                for (r, row) in rows.chunks_mut(plane).enumerate() {
                    let (kh, kw) = (r / k, r % k);
                    for oy in 0..oh {
                        let iy = (oy * stride + kh) as isize - pad as isize;
                        let dst = &mut row[oy * ow..(oy + 1) * ow];
                        if iy < 0 || iy >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let line = &src[iy as usize * w..(iy as usize + 1) * w];
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let ix = (ox * stride + kw) as isize - pad as isize;
                            *d = if ix < 0 || ix >= w as isize {
                                0.0
                            } else {
                                line[ix as usize]
                            };
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c * k * k, plane))))
    }
}

/// A convolution with a square kernel `w` [O, C, k, k] (no groups or dilation) and no graph:
/// on CPU f32 the patches of `x` are laid out once and multiplied by the kernel as it is
/// stored, in one matrix product per sample; elsewhere candle's convolution.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::BF16 | DType::F16) {
        // candle has no half-precision convolution on the CPU: compute in f32.
        let y = conv2d(
            &x.to_dtype(DType::F32)?,
            &w.to_dtype(DType::F32)?,
            stride,
            padding,
        )?;
        return y.to_dtype(x.dtype());
    }
    if !applies(x) || w.dtype() != DType::F32 {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let (b, c, h, wd) = x.dims4()?;
    let (o, _, k, _) = w.dims4()?;
    let op = Im2Col { k, stride, padding };
    let (oh, ow) = op.out_hw(h, wd);
    let cols = if k == 1 && stride == 1 && padding == 0 {
        x.contiguous()?.reshape((b, c, h * wd))?
    } else {
        x.contiguous()?.apply_op1_no_bwd(&op)?
    };
    let w2 = w.contiguous()?.reshape((o, c * k * k))?;
    // One product per sample: a batched product would copy the kernel once per sample
    // (candle makes a broadcast left operand contiguous).
    let outs = (0..b)
        .map(|i| w2.matmul(&cols.get(i)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&outs, 0)?.reshape((b, o, oh, ow))
}

/// A fused op's backward kernel: `(x, d(y))` → `d(x)`, both contiguous f32 (for the softmax,
/// `x` is its output `y`).
trait Grad: Clone + Send + Sync + 'static {
    const NAME: &'static str;
    fn grad(&self, x: &[f32], lx: &Layout, g: &[f32]) -> candle_core::Result<Vec<f32>>;
}

/// Runs a [`Grad`] kernel as a candle op (no graph of its own).
struct GradOp<T>(T);

impl<T: Grad> CustomOp2 for GradOp<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, T::NAME)?;
        let g = slice(s2, l2, T::NAME)?;
        Ok((CpuStorage::F32(self.0.grad(x, l1, g)?), l1.shape().clone()))
    }
}

/// `d(x)` of `x` under the incoming gradient `g`.
fn grad_of<T: Grad>(kernel: &T, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &GradOp(kernel.clone()))
}

/// The frozen affine of a norm, read once when the op is built.
#[derive(Clone)]
struct Affine {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Affine {
    fn new(weight: &Tensor, bias: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            bias: bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        })
    }
}

/// GroupNorm over [B, C, ...] with a frozen affine and optional SiLU.
#[derive(Clone)]
struct GroupNormOp {
    affine: Affine,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    /// (channels, elements per channel) of a [B, C, ...] layout.
    fn geometry(&self, l: &Layout) -> candle_core::Result<(usize, usize)> {
        let dims = l.dims();
        if dims.len() < 2 || dims[1] != self.affine.weight.len() {
            return Err(candle_core::Error::Msg(format!(
                "group norm: input {dims:?} does not have {} channels",
                self.affine.weight.len()
            )));
        }
        Ok((dims[1], dims[2..].iter().product()))
    }
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "group norm")?;
        let (c, hw) = self.geometry(l)?;
        let per_group = c / self.groups;
        let group_len = per_group * hw;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(i, (y, x))| {
                let (mean, rstd) = moments(x, self.eps);
                let c0 = (i % self.groups) * per_group;
                for (j, (y, x)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
                    let scale = rstd * self.affine.weight[c0 + j];
                    let shift = self.affine.bias[c0 + j] - mean * scale;
                    for (y, &x) in y.iter_mut().zip(x) {
                        let z = x * scale + shift;
                        *y = if self.silu { z * sigmoid(z) } else { z };
                    }
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_of(self, arg, grad_res)?))
    }
}

impl Grad for GroupNormOp {
    const NAME: &'static str = "fused-group-norm-bwd";

    fn grad(&self, x: &[f32], l1: &Layout, g: &[f32]) -> candle_core::Result<Vec<f32>> {
        let op = self;
        let (c, hw) = op.geometry(l1)?;
        let per_group = c / op.groups;
        let group_len = per_group * hw;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len).zip(g.par_chunks(group_len)))
            .enumerate()
            .for_each(|(i, (dx, (x, g)))| {
                let (mean, rstd) = moments(x, op.eps);
                let c0 = (i % op.groups) * per_group;
                // dx = rstd * (dxn - mean(dxn) - xn * mean(dxn * xn)), dxn = dz * w.
                // dx holds dxn until the group's two sums are known.
                let (mut s1, mut s2) = (0f64, 0f64);
                for (j, ((dx, x), g)) in dx
                    .chunks_mut(hw)
                    .zip(x.chunks(hw))
                    .zip(g.chunks(hw))
                    .enumerate()
                {
                    let w = op.affine.weight[c0 + j];
                    let b = op.affine.bias[c0 + j];
                    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                        let xn = (x - mean) * rstd;
                        let dz = if op.silu {
                            let z = xn * w + b;
                            let s = sigmoid(z);
                            g * s * (1.0 + z * (1.0 - s))
                        } else {
                            g
                        };
                        let dxn = dz * w;
                        *dx = dxn;
                        s1 += dxn as f64;
                        s2 += (dxn * xn) as f64;
                    }
                }
                let n = group_len as f64;
                let (m1, m2) = ((s1 / n) as f32, (s2 / n) as f32);
                for (dx, &x) in dx.iter_mut().zip(x) {
                    let xn = (x - mean) * rstd;
                    *dx = rstd * (*dx - m1 - xn * m2);
                }
            });
        Ok(out)
    }
}

/// `silu?(group_norm(x) * weight + bias)` over [B, C, ...] in one fused op (CPU f32).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let op = GroupNormOp {
        affine: Affine::new(weight, bias)?,
        groups,
        eps,
        silu,
    };
    x.contiguous()?.apply_op1(op)
}

/// LayerNorm over the last dimension with a frozen affine.
#[derive(Clone)]
struct LayerNormOp {
    affine: Affine,
    eps: f64,
}

impl LayerNormOp {
    fn width(&self, l: &Layout) -> candle_core::Result<usize> {
        let d = self.affine.weight.len();
        match l.dims().last() {
            Some(&w) if w == d => Ok(d),
            _ => Err(candle_core::Error::Msg(format!(
                "layer norm: input {:?} does not end in {d}",
                l.dims()
            ))),
        }
    }
}

impl CustomOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "layer norm")?;
        let d = self.width(l)?;
        let task = rows_per_task(d) * d;
        let (w, b) = (&self.affine.weight, &self.affine.bias);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(task)
            .zip(x.par_chunks(task))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let (mean, rstd) = moments(x, self.eps);
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *y = (x - mean) * rstd * w + b;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_of(self, arg, grad_res)?))
    }
}

impl Grad for LayerNormOp {
    const NAME: &'static str = "fused-layer-norm-bwd";

    fn grad(&self, x: &[f32], l1: &Layout, g: &[f32]) -> candle_core::Result<Vec<f32>> {
        let op = self;
        let d = op.width(l1)?;
        let task = rows_per_task(d) * d;
        let w = &op.affine.weight;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(task)
            .zip(x.par_chunks(task).zip(g.par_chunks(task)))
            .for_each(|(dx, (x, g))| {
                for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                    let (mean, rstd) = moments(x, op.eps);
                    let (mut s1, mut s2) = (0f64, 0f64);
                    for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                        let xn = (x - mean) * rstd;
                        let dxn = g * w;
                        *dx = dxn;
                        s1 += dxn as f64;
                        s2 += (dxn * xn) as f64;
                    }
                    let (m1, m2) = ((s1 / d as f64) as f32, (s2 / d as f64) as f32);
                    for (dx, &x) in dx.iter_mut().zip(x) {
                        let xn = (x - mean) * rstd;
                        *dx = rstd * (*dx - m1 - xn * m2);
                    }
                }
            });
        Ok(out)
    }
}

/// `layer_norm(x) * weight + bias` over the last dimension in one fused op (CPU f32).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let op = LayerNormOp {
        affine: Affine::new(weight, bias)?,
        eps,
    };
    x.contiguous()?.apply_op1(op)
}

/// `a * gelu_erf(g)` where `[a, g]` are the halves of the last dimension.
#[derive(Clone)]
struct GegluOp;

#[inline]
fn gelu_erf(x: f32) -> (f32, f32) {
    // gelu(x) = x * Φ(x); gelu'(x) = Φ(x) + x * φ(x).
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = exp_f32(-0.5 * x * x) * 0.398_942_3;
    (x * cdf, cdf + x * pdf)
}

fn geglu_halves(l: &Layout) -> candle_core::Result<(usize, Shape)> {
    let dims = l.dims();
    match dims.last() {
        Some(&w) if w % 2 == 0 && w > 0 => {
            let mut out = dims.to_vec();
            let last = out.len() - 1;
            out[last] = w / 2;
            Ok((w / 2, Shape::from(out)))
        }
        _ => Err(candle_core::Error::Msg(format!(
            "geglu: last dimension of {dims:?} is not even"
        ))),
    }
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = slice(s, l, "geglu")?;
        let (half, shape) = geglu_halves(l)?;
        let rows = rows_per_task(half);
        let mut out = vec![0f32; h.len() / 2];
        out.par_chunks_mut(rows * half)
            .zip(h.par_chunks(rows * 2 * half))
            .for_each(|(y, h)| {
                for (y, h) in y.chunks_mut(half).zip(h.chunks(2 * half)) {
                    let (a, g) = h.split_at(half);
                    for ((y, &a), &g) in y.iter_mut().zip(a).zip(g) {
                        *y = a * gelu_erf(g).0;
                    }
                }
            });
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_of(self, arg, grad_res)?))
    }
}

impl Grad for GegluOp {
    const NAME: &'static str = "fused-geglu-bwd";

    fn grad(&self, h: &[f32], l1: &Layout, dy: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (half, _) = geglu_halves(l1)?;
        let rows = rows_per_task(half);
        let mut out = vec![0f32; h.len()];
        out.par_chunks_mut(rows * 2 * half)
            .zip(
                h.par_chunks(rows * 2 * half)
                    .zip(dy.par_chunks(rows * half)),
            )
            .for_each(|(dh, (h, dy))| {
                for ((dh, h), dy) in dh
                    .chunks_mut(2 * half)
                    .zip(h.chunks(2 * half))
                    .zip(dy.chunks(half))
                {
                    let (da, dg) = dh.split_at_mut(half);
                    let (a, g) = h.split_at(half);
                    for ((((da, dg), &a), &g), &dy) in
                        da.iter_mut().zip(dg.iter_mut()).zip(a).zip(g).zip(dy)
                    {
                        let (gelu, dgelu) = gelu_erf(g);
                        *da = dy * gelu;
                        *dg = dy * a * dgelu;
                    }
                }
            });
        Ok(out)
    }
}

/// `a * gelu_erf(g)` of `[a, g] = h` split along the last dimension, in one fused op (CPU f32).
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    h.contiguous()?.apply_op1(GegluOp)
}

/// The softmax gradient over the last dimension from (y, d(y)).
#[derive(Clone)]
struct SoftmaxBwd;

impl Grad for SoftmaxBwd {
    const NAME: &'static str = "fused-softmax-bwd";

    fn grad(&self, y: &[f32], l1: &Layout, g: &[f32]) -> candle_core::Result<Vec<f32>> {
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        let task = rows_per_task(d) * d;
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(task)
            .zip(y.par_chunks(task).zip(g.par_chunks(task)))
            .for_each(|(dx, (y, g))| {
                for ((dx, y), g) in dx.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                    let s: f32 = y.iter().zip(g).map(|(&y, &g)| y * g).sum();
                    for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                        *dx = y * (g - s);
                    }
                }
            });
        Ok(out)
    }
}

/// `y * (g - sum(g * y))` over the last dimension: the input gradient of a softmax whose
/// output is `y`. Fused on CPU f32, composed elsewhere.
pub fn softmax_backward(y: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    if is_half(y) || is_half(g) {
        // `g - sum(g * y)` cancels: in half precision the row sum alone carries an error as
        // large as the result.
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        return softmax_backward(&f(y)?, &f(g)?)?.to_dtype(y.dtype());
    }
    if applies(y) && g.dtype() == DType::F32 {
        return grad_of(&SoftmaxBwd, y, g);
    }
    let s = (g * y)?.sum_keepdim(candle_core::D::Minus1)?;
    y.mul(&g.broadcast_sub(&s)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// Forward values and input gradients (under a random upstream gradient) of `fused` and
    /// `reference` on `x`.
    fn compare(
        x: &Tensor,
        fused: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        reference: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        tol: f32,
    ) -> anyhow::Result<()> {
        let xv = Var::from_tensor(x)?;
        let (yf, yr) = (fused(xv.as_tensor())?, reference(xv.as_tensor())?);
        assert_eq!(yf.dims(), yr.dims());
        let d = max_diff(&yf, &yr)?;
        assert!(d <= tol, "forward differs by {d}");
        let g = Tensor::randn(0f32, 1., yr.shape(), x.device())?;
        let gf = (yf * &g)?.sum_all()?.backward()?;
        let gr = (yr * &g)?.sum_all()?.backward()?;
        let (gf, gr) = match (gf.get(xv.as_tensor()), gr.get(xv.as_tensor())) {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            _ => anyhow::bail!("no input gradient"),
        };
        let scale = gr.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(scale > 0.0, "reference gradient is zero");
        let d = max_diff(&gf, &gr)?;
        assert!(
            d <= tol * scale.max(1.0),
            "gradient differs by {d} (scale {scale})"
        );
        Ok(())
    }

    fn composed_group_norm(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        groups: usize,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let xg = x.reshape((dims[0], groups, ()))?;
        let mean = xg.mean_keepdim(D::Minus1)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims)?;
        xn.broadcast_mul(&w.reshape((1, (), 1, 1))?)?
            .broadcast_add(&b.reshape((1, (), 1, 1))?)
    }

    #[test]
    fn group_norm_and_silu_match_composed_ops() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // Offset and scaled input so the statistics matter.
        let x = (Tensor::randn(0f32, 2., (2, 12, 5, 7), &dev)? + 3.0)?;
        let w = Tensor::randn(1f32, 0.3, 12, &dev)?;
        let b = Tensor::randn(0f32, 0.3, 12, &dev)?;
        for silu in [false, true] {
            compare(
                &x,
                |x| group_norm(x, &w, &b, 4, 1e-5, silu),
                |x| {
                    let y = composed_group_norm(x, &w, &b, 4, 1e-5)?;
                    if silu {
                        y.silu()
                    } else {
                        Ok(y)
                    }
                },
                2e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn layer_norm_matches_composed_ops() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2., (3, 37, 24), &dev)? - 1.0)?;
        let w = Tensor::randn(1f32, 0.3, 24, &dev)?;
        let b = Tensor::randn(0f32, 0.3, 24, &dev)?;
        compare(
            &x,
            |x| layer_norm(x, &w, &b, 1e-5),
            |x| {
                let mean = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
                    .broadcast_mul(&w)?
                    .broadcast_add(&b)
            },
            2e-5,
        )
    }

    #[test]
    fn geglu_matches_composed_ops() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 2., (2, 50, 2 * 40), &dev)?;
        compare(
            &h,
            geglu,
            |h| {
                let a = h.narrow(D::Minus1, 0, 40)?;
                let g = h.narrow(D::Minus1, 40, 40)?;
                a * g.gelu_erf()?
            },
            2e-5,
        )
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_f32(-200.0) < 2e-38);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn softmax_and_kernel_flip_match_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 4., (2, 3, 17, 301), &dev)? + 50.0)?;
        let d = max_diff(
            &softmax_last_dim(&x)?,
            &candle_nn::ops::softmax_last_dim(&x)?,
        )?;
        assert!(d <= 1e-6, "softmax differs by {d}");
        let w = Tensor::randn(0f32, 1., (5, 3, 3, 2), &dev)?;
        let want = w
            .transpose(0, 1)?
            .contiguous()?
            .index_select(&Tensor::new(&[2u32, 1, 0], &dev)?, 2)?
            .index_select(&Tensor::new(&[1u32, 0], &dev)?, 3)?;
        assert_eq!(max_diff(&flip_transpose_kernel(&w)?, &want)?, 0.0);
        Ok(())
    }

    #[test]
    fn conv2d_matches_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for &(k, stride, pad, h, w) in &[
            (3, 1, 1, 9, 7),
            (3, 2, 1, 8, 8),
            (3, 2, 1, 7, 10),
            (1, 1, 0, 5, 6),
            (3, 1, 0, 6, 6),
        ] {
            let x = Tensor::randn(0f32, 1., (2, 5, h, w), &dev)?;
            let kernel = Tensor::randn(0f32, 1., (4, 5, k, k), &dev)?;
            let want = x.conv2d(&kernel, pad, stride, 1, 1)?;
            let got = conv2d(&x, &kernel, stride, pad)?;
            assert_eq!(got.dims(), want.dims());
            let d = max_diff(&got, &want)?;
            assert!(d <= 1e-4, "k{k} s{stride} p{pad} {h}x{w}: differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn softmax_backward_matches_composed_ops() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3., (2, 3, 40, 333), &dev)?;
        let y = candle_nn::ops::softmax_last_dim(&x)?;
        let g = Tensor::randn(0f32, 1., y.shape(), &dev)?;
        let fused = softmax_backward(&y, &g)?;
        let s = (&g * &y)?.sum_keepdim(D::Minus1)?;
        let composed = y.mul(&g.broadcast_sub(&s)?)?;
        let d = max_diff(&fused, &composed)?;
        assert!(d <= 1e-5, "softmax backward differs by {d}");
        Ok(())
    }
}
