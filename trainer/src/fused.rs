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
//! - [`frozen_conv2d`] and [`conv2d_input_grad`]: a frozen convolution as the kernel times
//!   the input's patches (taken a few channels at a time), and its input gradient as the
//!   transposed kernel times the output gradient, added back patch by patch.
//!
//! Statistics are accumulated in f64 and recomputed in backward rather than stored. The
//! kernels take contiguous f32 on the CPU; any other tensor goes through the composed candle
//! ops of `nn`, so GPU runs keep their own kernels. `tests` compares every op and its gradient
//! with the composed reference.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_matmul::{matmul, View};

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

/// Defines a function whose body is compiled twice, for AVX2 + FMA and for the baseline, and
/// runs the AVX2 build when the CPU has it: the loops inside then vectorize eight wide.
macro_rules! simd_fn {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

simd_fn! {
    /// `y = exp(y - m)` in place over a slice, returning the sum of the results.
    pub(crate) fn exp_shifted(y: &mut [f32], m: f32) -> f32 {
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
}

/// `erf(x)` for f32 without calls or branches (Abramowitz and Stegun 7.1.26:
/// `1 − t·P(t)·exp(−x²)` with `t = 1/(1 + 0.3275911·|x|)`, sign restored), so loops over it
/// vectorize. Absolute error under 7e-7 (f32 rounding on top of the formula's 1.5e-7), about
/// five ulps of 1.0: in GELU that is a relative error of 3e-7 on `Φ(x)`.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4_f32;
    let p = p * t - 1.453_152_1;
    let p = p * t + 1.421_413_7;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp_f32(-a * a);
    y.copysign(x)
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

/// Floats of patch matrix laid out at once: a convolution takes its input channels in groups
/// whose patches fit in this (16 MiB), so the buffer is reused from group to group and layer to
/// layer instead of being mapped and faulted in afresh for every large layer.
const PATCH_FLOATS: usize = 1 << 22;

/// Output pixels up to which a convolution's input gradient multiplies the transposed kernel
/// by `dy` (measured fastest for 4×4 outputs; 8×8 and up run faster the other way round).
const SMALL_PLANE: usize = 32;

/// The shapes of a square-kernel convolution (no groups or dilation): x [b, c, h, w],
/// kernel [o, c, k, k], output [b, o, oh, ow].
#[derive(Clone, Copy, Debug)]
struct ConvGeometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl ConvGeometry {
    fn new(x: &[usize], kernel: &[usize], stride: usize, pad: usize) -> candle_core::Result<Self> {
        let (&[b, c, h, w], &[o, kc, k, k2]) = (x, kernel) else {
            return Err(candle_core::Error::Msg(format!(
                "convolution: input {x:?} and kernel {kernel:?} are not 4-D"
            )));
        };
        if kc != c || k != k2 || stride == 0 || h + 2 * pad < k || w + 2 * pad < k {
            return Err(candle_core::Error::Msg(format!(
                "convolution: kernel {kernel:?} (stride {stride}, padding {pad}) does not fit \
                 input {x:?}"
            )));
        }
        let span = |n: usize| (n + 2 * pad - k) / stride + 1;
        let (oh, ow) = (span(h), span(w));
        Ok(Self {
            b,
            c,
            h,
            w,
            o,
            k,
            stride,
            pad,
            oh,
            ow,
        })
    }

    fn plane(&self) -> usize {
        self.oh * self.ow
    }

    /// A 1×1 stride-1 unpadded kernel: the input is its own patch matrix.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// Input channels per group of patches (see [`PATCH_FLOATS`]).
    fn group(&self) -> usize {
        (PATCH_FLOATS / (self.k * self.k * self.plane()).max(1)).clamp(1, self.c.max(1))
    }

    /// The kernel's columns for input channels [c0, c1): rows `o`, `(c1-c0)·k²` columns.
    fn kernel_cols(&self, c0: usize, c1: usize) -> View {
        let k2 = self.k * self.k;
        View::rows(c0 * k2, self.o, (c1 - c0) * k2, self.c * k2)
    }

    /// The output positions [lo, hi) along an axis of `out_len` whose input position
    /// `o·stride + tap − pad` lies inside [0, `in_len`) (not in the padding).
    fn taps(&self, out_len: usize, in_len: usize, tap: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.pad.saturating_sub(tap).div_ceil(s);
        let hi = match (in_len + self.pad).checked_sub(tap + 1) {
            Some(last) => (last / s + 1).min(out_len),
            None => 0,
        };
        (lo.min(hi), hi)
    }

    /// The patches of input channels [c0, c1) of one sample `x` [c, h, w] into `cols`
    /// [(c1-c0)·k², oh·ow]: row `(c, kh, kw)` holds the input pixel under each output pixel
    /// at that tap (zero in the padding).
    fn im2col(&self, x: &[f32], (c0, c1): (usize, usize), cols: &mut [f32]) {
        let (hw, plane, k, s) = (self.h * self.w, self.plane(), self.k, self.stride);
        cols.par_chunks_mut(k * k * plane)
            .zip(x[c0 * hw..c1 * hw].par_chunks(hw))
            .for_each(|(rows, src)| {
                for (r, row) in rows.chunks_mut(plane).enumerate() {
                    let (kh, kw) = (r / k, r % k);
                    let (ylo, yhi) = self.taps(self.oh, self.h, kh);
                    let (xlo, xhi) = self.taps(self.ow, self.w, kw);
                    for (oy, dst) in row.chunks_mut(self.ow).enumerate() {
                        if oy < ylo || oy >= yhi || xlo >= xhi {
                            dst.fill(0.0);
                            continue;
                        }
                        let line = &src[(oy * s + kh - self.pad) * self.w..][..self.w];
                        let x0 = xlo * s + kw - self.pad;
                        dst[..xlo].fill(0.0);
                        dst[xhi..].fill(0.0);
                        let dst = &mut dst[xlo..xhi];
                        if s == 1 {
                            dst.copy_from_slice(&line[x0..x0 + dst.len()]);
                        } else {
                            for (i, d) in dst.iter_mut().enumerate() {
                                *d = line[x0 + i * s];
                            }
                        }
                    }
                }
            });
    }

    /// The adjoint of [`Self::im2col`]: adds every element of the patch matrix `cols`
    /// [(c1-c0)·k², oh·ow] back onto the input pixel it came from, for channels [c0, c1) of
    /// one sample's gradient `dx`.
    fn col2im(&self, cols: &[f32], (c0, c1): (usize, usize), dx: &mut [f32]) {
        let (hw, plane, k, s) = (self.h * self.w, self.plane(), self.k, self.stride);
        dx[c0 * hw..c1 * hw]
            .par_chunks_mut(hw)
            .zip(cols.par_chunks(k * k * plane))
            .for_each(|(dst, rows)| {
                for (r, row) in rows.chunks(plane).enumerate() {
                    let (kh, kw) = (r / k, r % k);
                    let (ylo, yhi) = self.taps(self.oh, self.h, kh);
                    let (xlo, xhi) = self.taps(self.ow, self.w, kw);
                    if xlo >= xhi {
                        continue;
                    }
                    let x0 = xlo * s + kw - self.pad;
                    for oy in ylo..yhi {
                        let line = &mut dst[(oy * s + kh - self.pad) * self.w..][..self.w];
                        let src = &row[oy * self.ow + xlo..oy * self.ow + xhi];
                        for (i, v) in src.iter().enumerate() {
                            line[x0 + i * s] += v;
                        }
                    }
                }
            });
    }

    /// The adjoint of [`Self::im2col`] from the transposed patch matrix `cols_t`
    /// [oh·ow, (c1-c0)·k²]: adds every patch element back onto the input pixel it came from,
    /// for channels [c0, c1) of one sample's gradient `dx`.
    fn col2im_t(&self, cols_t: &[f32], (c0, c1): (usize, usize), dx: &mut [f32]) {
        let (hw, k, s) = (self.h * self.w, self.k, self.stride);
        let width = (c1 - c0) * k * k;
        dx[c0 * hw..c1 * hw]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(ci, dst)| {
                for kh in 0..k {
                    let (ylo, yhi) = self.taps(self.oh, self.h, kh);
                    for kw in 0..k {
                        let (xlo, xhi) = self.taps(self.ow, self.w, kw);
                        if xlo >= xhi {
                            continue;
                        }
                        let j = ci * k * k + kh * k + kw;
                        let x0 = xlo * s + kw - self.pad;
                        for oy in ylo..yhi {
                            let line = &mut dst[(oy * s + kh - self.pad) * self.w..][..self.w];
                            let from = &cols_t[(oy * self.ow) * width + j..];
                            for (i, ox) in (xlo..xhi).enumerate() {
                                line[x0 + i * s] += from[ox * width];
                            }
                        }
                    }
                }
            });
    }

    /// The input channel groups [c0, c1).
    fn groups(&self) -> impl Iterator<Item = (usize, usize)> {
        let (c, group) = (self.c, self.group());
        (0..c)
            .step_by(group)
            .map(move |c0| (c0, (c0 + group).min(c)))
    }

    /// `y = conv(x, kernel) + bias`: per sample, per channel group, the kernel's columns
    /// times the group's patches, accumulated straight into the output.
    fn forward(
        &self,
        x: &[f32],
        kernel: &[f32],
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        let plane = self.plane();
        let mut out = vec![0f32; self.b * self.o * plane];
        if let Some(bias) = bias {
            out.par_chunks_mut(plane)
                .enumerate()
                .for_each(|(i, row)| row.fill(bias[i % self.o]));
        }
        let out_view = View::rows(0, self.o, plane, plane);
        let mut cols = Vec::new();
        for (y, x) in out
            .chunks_mut(self.o * plane)
            .zip(x.chunks(self.c * self.h * self.w))
        {
            if self.pointwise() {
                let xv = View::rows(0, self.c, plane, plane);
                matmul(
                    y,
                    out_view,
                    kernel,
                    self.kernel_cols(0, self.c),
                    x,
                    xv,
                    1.0,
                    true,
                    true,
                )?;
                continue;
            }
            for (c0, c1) in self.groups() {
                let rows = (c1 - c0) * self.k * self.k;
                cols.resize(rows * plane, 0.0);
                self.im2col(x, (c0, c1), &mut cols);
                let cv = View::rows(0, rows, plane, plane);
                matmul(
                    y,
                    out_view,
                    kernel,
                    self.kernel_cols(c0, c1),
                    &cols,
                    cv,
                    1.0,
                    true,
                    true,
                )?;
            }
        }
        Ok(out)
    }

    /// `dx` of the convolution under `dy`: per sample, per channel group, the patch gradients
    /// (the kernel's columns transposed times `dy`, or its transpose for larger images) added
    /// back onto the input by [`Self::col2im`] or [`Self::col2im_t`].
    fn input_grad(&self, dy: &[f32], kernel: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (plane, hw) = (self.plane(), self.h * self.w);
        let mut dx = vec![0f32; self.b * self.c * hw];
        let dy_view = View::rows(0, self.o, plane, plane);
        let mut cols = Vec::new();
        for (dx, dy) in dx.chunks_mut(self.c * hw).zip(dy.chunks(self.o * plane)) {
            if self.pointwise() {
                let kt = self.kernel_cols(0, self.c).t();
                let dv = View::rows(0, self.c, hw, hw);
                matmul(dx, dv, kernel, kt, dy, dy_view, 1.0, false, true)?;
                continue;
            }
            for (c0, c1) in self.groups() {
                let width = (c1 - c0) * self.k * self.k;
                cols.resize(plane * width, 0.0);
                let kv = self.kernel_cols(c0, c1);
                if plane <= SMALL_PLANE {
                    // dcols = Wᵀ·dy
                    let cv = View::rows(0, width, plane, plane);
                    matmul(&mut cols, cv, kernel, kv.t(), dy, dy_view, 1.0, false, true)?;
                    self.col2im(&cols, (c0, c1), dx);
                } else {
                    // dcolsᵀ = dyᵀ·W: the kernel read as stored, which the matrix product
                    // runs faster than a transposed one once dy has enough pixels.
                    let cv = View::rows(0, plane, width, width);
                    matmul(&mut cols, cv, dy, dy_view.t(), kernel, kv, 1.0, false, true)?;
                    self.col2im_t(&cols, (c0, c1), dx);
                }
            }
        }
        Ok(dx)
    }
}

/// Runs `f` on the contiguous f32 elements of CPU tensors.
pub(crate) fn with_cpu_f32<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards = ts.map(|t| t.storage_and_layout());
    let mut slices: [&[f32]; N] = [&[]; N];
    for (out, (storage, layout)) in slices.iter_mut().zip(&guards) {
        *out = match &**storage {
            candle_core::Storage::Cpu(s) => slice(s, layout, "fused op")?,
            _ => {
                return Err(candle_core::Error::Msg(
                    "fused op: expects tensors on the CPU".into(),
                ))
            }
        };
    }
    f(slices)
}

/// A frozen convolution on CPU f32 as one graph node whose backward is the input gradient
/// (the kernel and bias get none). The kernel and bias are kept as loaded: a half-precision
/// model's are widened to f32 only while the op runs, not for as long as the graph lives (an
/// f32 copy of every kernel held until backward made a bf16 sd15 step peak above f32's).
struct FrozenConv {
    kernel: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

/// `t` as contiguous f32 (itself when it already is).
pub(crate) fn f32_contiguous(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

impl FrozenConv {
    fn geometry(&self, x: &[usize]) -> candle_core::Result<ConvGeometry> {
        ConvGeometry::new(x, self.kernel.dims(), self.stride, self.padding)
    }
}

impl CustomOp1 for FrozenConv {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "convolution")?;
        let g = self.geometry(l.dims())?;
        let kernel = f32_contiguous(&self.kernel)?;
        let out = match &self.bias {
            Some(b) => {
                let b = f32_contiguous(b)?;
                with_cpu_f32([&kernel, &b], |[k, b]| g.forward(x, k, Some(b)))?
            }
            None => with_cpu_f32([&kernel], |[k]| g.forward(x, k, None))?,
        };
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.o, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        conv2d_input_grad(dy, &self.kernel, (h, w), self.stride, self.padding)
    }
}

/// A frozen convolution on the CPU with a square kernel `w` [O, C, k, k] (no groups or
/// dilation) and an optional bias [O], whose graph carries the input gradient only. f32
/// throughout; half-precision inputs are computed in f32 (candle has no half convolution on
/// the CPU). `None` off the CPU.
pub fn frozen_conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !x.device().is_cpu() {
        return Ok(None);
    }
    let op = FrozenConv {
        kernel: w.detach(),
        bias: bias.map(Tensor::detach),
        stride,
        padding,
    };
    let y = f32_contiguous(x)?.apply_op1(op)?;
    Ok(Some(y.to_dtype(x.dtype())?))
}

/// The input gradient [B, C, H, W] of a convolution with kernel `w` [O, C, k, k] under `dy`
/// [B, O, OH, OW] on the CPU (the adjoint, patch by patch; the input size is given because
/// a strided convolution loses it). `None` off the CPU.
pub fn conv2d_input_grad(
    dy: &Tensor,
    w: &Tensor,
    (h, wd): (usize, usize),
    stride: usize,
    padding: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !dy.device().is_cpu() {
        return Ok(None);
    }
    let (b, _, _, _) = dy.dims4()?;
    let (_, c, _, _) = w.dims4()?;
    let g = ConvGeometry::new(&[b, c, h, wd], w.dims(), stride, padding)?;
    if dy.dims() != [b, g.o, g.oh, g.ow] {
        return Err(candle_core::Error::Msg(format!(
            "convolution gradient: {:?} is not the output of {:?} over a {h}x{wd} input",
            dy.dims(),
            w.dims()
        )));
    }
    let (dy32, w32) = (f32_contiguous(dy)?, f32_contiguous(w)?);
    let dx = with_cpu_f32([&dy32, &w32], |[dy, k]| g.input_grad(dy, k))?;
    Ok(Some(
        Tensor::from_vec(dx, (b, c, h, wd), dy.device())?.to_dtype(dy.dtype())?,
    ))
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
    let cdf = 0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = exp_f32(-0.5 * x * x) * 0.398_942_3;
    (x * cdf, cdf + x * pdf)
}

simd_fn! {
    /// `y = a * gelu(g)` over one row.
    fn geglu_row(a: &[f32], g: &[f32], y: &mut [f32]) {
        for ((y, &a), &g) in y.iter_mut().zip(a).zip(g) {
            *y = a * gelu_erf(g).0;
        }
    }
}

simd_fn! {
    /// `da = dy * gelu(g)`, `dg = dy * a * gelu'(g)` over one row.
    fn geglu_grad_row(a: &[f32], g: &[f32], dy: &[f32], da: &mut [f32], dg: &mut [f32]) {
        for ((((da, dg), &a), &g), &dy) in da.iter_mut().zip(dg.iter_mut()).zip(a).zip(g).zip(dy) {
            let (gelu, dgelu) = gelu_erf(g);
            *da = dy * gelu;
            *dg = dy * a * dgelu;
        }
    }
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
                    geglu_row(a, g, y);
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
                    geglu_grad_row(a, g, dy, da, dg);
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
    fn fast_erf_is_within_7e7_of_erf() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf_f32(x) as f64 - want).abs());
            x += 0.000_7;
        }
        assert!(worst < 7e-7, "absolute error {worst}");
        assert_eq!(erf_f32(-9.0), -1.0);
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
    fn softmax_matches_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 4., (2, 3, 17, 301), &dev)? + 50.0)?;
        let d = max_diff(
            &softmax_last_dim(&x)?,
            &candle_nn::ops::softmax_last_dim(&x)?,
        )?;
        assert!(d <= 1e-6, "softmax differs by {d}");
        Ok(())
    }

    #[test]
    fn frozen_conv2d_and_its_input_grad_match_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // (kernel, stride, padding, channels, h, w); the last one has 40 channels of 64×64
        // patches, more than one group of PATCH_FLOATS.
        for &(k, stride, pad, c, h, w) in &[
            (3, 1, 1, 5, 9, 7),
            (3, 2, 1, 5, 8, 8),
            (3, 2, 1, 5, 7, 10),
            (1, 1, 0, 5, 5, 6),
            (3, 1, 0, 5, 6, 6),
            (3, 1, 1, 40, 64, 64),
        ] {
            let case = format!("k{k} s{stride} p{pad} c{c} {h}x{w}");
            let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (2, c, h, w), &dev)?)?;
            let kernel = Tensor::randn(0f32, 1., (4, c, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., 4, &dev)?;
            let want = x
                .as_tensor()
                .conv2d(&kernel, pad, stride, 1, 1)?
                .broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
            let got = frozen_conv2d(x.as_tensor(), &kernel, Some(&bias), stride, pad)?
                .expect("a CPU tensor");
            assert_eq!(got.dims(), want.dims(), "{case}");
            let d = max_diff(&got, &want)?;
            assert!(d <= 1e-3, "{case}: differs by {d}");
            // The input gradient is the adjoint of the convolution: <conv(x), g> = <x, dx(g)>.
            let g = Tensor::randn(0f32, 1., want.shape(), &dev)?;
            let grads = (&got * &g)?.sum_all()?.backward()?;
            let dx = grads.get(x.as_tensor()).expect("an input gradient");
            let direct = conv2d_input_grad(&g, &kernel, (h, w), stride, pad)?.expect("CPU");
            assert_eq!(max_diff(dx, &direct)?, 0.0, "{case}");
            let conv = x.as_tensor().conv2d(&kernel, pad, stride, 1, 1)?;
            let lhs = (conv * &g)?.sum_all()?.to_scalar::<f32>()?;
            let rhs = (x.as_tensor() * dx)?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
                "{case}: {lhs} vs {rhs}"
            );
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
