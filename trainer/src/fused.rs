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
//! - [`softmax_backward`]: `y * (g - sum(g * y))` over the last dimension.
//!
//! Statistics are accumulated in f64 and recomputed in backward rather than stored. The
//! kernels take contiguous f32 on the CPU; any other tensor goes through the composed candle
//! ops of `nn`, so GPU runs keep their own kernels. `tests` compares every op and its gradient
//! with the composed reference.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Work items smaller than this many elements are grouped so a task is worth scheduling.
const MIN_TASK_ELEMS: usize = 1 << 14;

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
    1.0 / (1.0 + (-z).exp())
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
        let g = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&g, &GroupNormBwd(self.clone()))?))
    }
}

/// d(x) of [`GroupNormOp`] from (x, d(y)).
struct GroupNormBwd(GroupNormOp);

impl CustomOp2 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "fused-group-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let x = slice(s1, l1, "group norm backward")?;
        let g = slice(s2, l2, "group norm backward")?;
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
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
        let g = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&g, &LayerNormBwd(self.clone()))?))
    }
}

/// d(x) of [`LayerNormOp`] from (x, d(y)).
struct LayerNormBwd(LayerNormOp);

impl CustomOp2 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let x = slice(s1, l1, "layer norm backward")?;
        let g = slice(s2, l2, "layer norm backward")?;
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
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
struct GegluOp;

#[inline]
fn gelu_erf(x: f32) -> (f32, f32) {
    // gelu(x) = x * Φ(x); gelu'(x) = Φ(x) + x * φ(x).
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
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
        let g = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&g, &GegluBwd)?))
    }
}

/// d(h) of [`GegluOp`] from (h, d(y)).
struct GegluBwd;

impl CustomOp2 for GegluBwd {
    fn name(&self) -> &'static str {
        "fused-geglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = slice(s1, l1, "geglu backward")?;
        let dy = slice(s2, l2, "geglu backward")?;
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
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `a * gelu_erf(g)` of `[a, g] = h` split along the last dimension, in one fused op (CPU f32).
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    h.contiguous()?.apply_op1(GegluOp)
}

/// The softmax gradient over the last dimension from (y, d(y)).
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, "softmax backward")?;
        let g = slice(s2, l2, "softmax backward")?;
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
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `y * (g - sum(g * y))` over the last dimension: the input gradient of a softmax whose
/// output is `y`. Fused on CPU f32, composed elsewhere.
pub fn softmax_backward(y: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    if applies(y) && g.dtype() == DType::F32 {
        return y
            .contiguous()?
            .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd);
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
    fn softmax_backward_matches_composed_ops() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3., (2, 3, 40, 333), &dev)?;
        let y = candle_nn::ops::softmax_last_dim(&x)?;
        let g = Tensor::randn(0f32, 1., y.shape(), &dev)?;
        let fused = softmax_backward(&y, &g)?;
        let s = (&g * &y)?.sum_keepdim(D::Minus1)?;
        let composed = y.mul(&g.broadcast_sub(&s)?)?;
        let d = max_diff(&fused, &composed)?;
        assert!(d <= 1e-6, "softmax backward differs by {d}");
        Ok(())
    }
}
