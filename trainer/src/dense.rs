//! A frozen linear layer with its LoRA adapter as one CPU op.
//!
//! Written as candle ops, `x·Wᵀ + b + s·(x·Dᵀ)·Uᵀ` makes five output-sized buffers in forward
//! (the zero-filled product, the bias sum, the LoRA product, their sum and the graph's copy)
//! and as many in backward. Here forward writes one buffer: the bias rows, `x·Wᵀ` accumulated
//! onto them and `s·(x·Dᵀ)·Uᵀ` onto that, by [`crate::cpu_matmul`] with the weights read
//! transposed in place. Backward recomputes the rank-sized `x·Dᵀ` instead of keeping it:
//!
//! `dx = g·W + s·(g·U)·D`, `dD = s·(g·U)ᵀ·x`, `dU = s·gᵀ·(x·Dᵀ)`,
//!
//! and skips `dx` (the one full-size product) when `x` needs no gradient. `nn::Linear` routes
//! CPU f32 layers with at most one adapter here; `tests` compares with the composed ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Error, Layout, Result, Shape, Tensor};

use crate::cpu_matmul::{matmul, View};
use crate::fused::with_cpu_f32;

/// dx (when the input wants it) and the adapter's (dD, dU) (with an adapter).
type Grads = (Option<Vec<f32>>, Option<(Vec<f32>, Vec<f32>)>);

/// The frozen part of the layer and whether its input wants a gradient.
struct Dense {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The adapter's `alpha / rank · multiplier`, with an adapter.
    scale: Option<f64>,
    input_grad: bool,
}

/// The sizes: `rows` inputs of `inp` features to `out` features through rank `rank`.
#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    inp: usize,
    out: usize,
    rank: usize,
}

impl Dims {
    fn x(&self) -> View {
        View::rows(0, self.rows, self.inp, self.inp)
    }
    fn y(&self) -> View {
        View::rows(0, self.rows, self.out, self.out)
    }
    fn w(&self) -> View {
        View::rows(0, self.out, self.inp, self.inp)
    }
    fn down(&self) -> View {
        View::rows(0, self.rank, self.inp, self.inp)
    }
    fn up(&self) -> View {
        View::rows(0, self.out, self.rank, self.rank)
    }
    fn t(&self) -> View {
        View::rows(0, self.rows, self.rank, self.rank)
    }
}

fn flat(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.dims() {
        &[a, b] => Ok((a, b)),
        d => Err(Error::Msg(format!("linear: {what} {d:?} is not 2-D"))),
    }
}

impl Dense {
    fn dims(&self, x: &Layout, down: Option<&Layout>) -> Result<Dims> {
        let (rows, inp) = flat(x, "input")?;
        let (out, win) = self.weight.dims2()?;
        let rank = match down {
            Some(d) => flat(d, "LoRA down")?.0,
            None => 0,
        };
        if win != inp {
            return Err(Error::Msg(format!(
                "linear: input of {inp} features into a [{out}, {win}] weight"
            )));
        }
        Ok(Dims {
            rows,
            inp,
            out,
            rank,
        })
    }

    /// `x·Wᵀ + b`, plus `s·(x·Dᵀ)·Uᵀ` with `lora = (D, U, s)`.
    fn forward(&self, n: Dims, x: &[f32], lora: Option<(&[f32], &[f32], f32)>) -> Result<Vec<f32>> {
        let mut y = vec![0f32; n.rows * n.out];
        let run = |[w, b]: [&[f32]; 2], y: &mut [f32]| -> Result<()> {
            let biased = !b.is_empty();
            if biased {
                y.chunks_mut(n.out.max(1))
                    .for_each(|r| r.copy_from_slice(b));
            }
            matmul(y, n.y(), x, n.x(), w, n.w().t(), 1.0, biased, true)?;
            if let Some((down, up, s)) = lora {
                let mut t = vec![0f32; n.rows * n.rank];
                project_down(n, x, down, &mut t)?;
                matmul(y, n.y(), &t, n.t(), up, n.up().t(), s, true, true)?;
            }
            Ok(())
        };
        match &self.bias {
            Some(b) => with_cpu_f32([&self.weight, b], |wb| run(wb, &mut y))?,
            None => with_cpu_f32([&self.weight], |[w]| run([w, &[]], &mut y))?,
        }
        Ok(y)
    }

    /// (dx, dD, dU) under `g`; dx only when the input wants it.
    fn backward(
        &self,
        n: Dims,
        x: &[f32],
        g: &[f32],
        lora: Option<(&[f32], &[f32], f32)>,
    ) -> Result<Grads> {
        let dx = match self.input_grad {
            true => {
                let mut dx = vec![0f32; n.rows * n.inp];
                with_cpu_f32([&self.weight], |[w]| {
                    matmul(&mut dx, n.x(), g, n.y(), w, n.w(), 1.0, false, true)
                })?;
                Some(dx)
            }
            false => None,
        };
        let Some((down, up, s)) = lora else {
            return Ok((dx, None));
        };
        let mut dx = dx;
        let mut gu = vec![0f32; n.rows * n.rank];
        matmul(&mut gu, n.t(), g, n.y(), up, n.up(), 1.0, false, true)?;
        if let Some(dx) = dx.as_mut() {
            matmul(dx, n.x(), &gu, n.t(), down, n.down(), s, true, true)?;
        }
        let mut dd = vec![0f32; n.rank * n.inp];
        matmul(&mut dd, n.down(), &gu, n.t().t(), x, n.x(), s, false, true)?;
        let mut t = gu;
        project_down(n, x, down, &mut t)?;
        let mut du = vec![0f32; n.out * n.rank];
        matmul(&mut du, n.up(), g, n.y().t(), &t, n.t(), s, false, true)?;
        Ok((dx, Some((dd, du))))
    }
}

/// `t = x·Dᵀ` [rows, rank]: the adapter's rank-sized projection, in forward and again in
/// backward (recomputed, not kept).
fn project_down(n: Dims, x: &[f32], down: &[f32], t: &mut [f32]) -> Result<()> {
    matmul(t, n.t(), x, n.x(), down, n.down().t(), 1.0, false, true)
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) if b <= v.len() => Ok(&v[a..b]),
        _ => Err(Error::Msg(
            "linear: expects contiguous f32 tensors on the CPU".into(),
        )),
    }
}

impl CustomOp1 for Dense {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.dims(l, None)?;
        let y = self.forward(n, f32_slice(s, l)?, None)?;
        Ok((CpuStorage::F32(y), Shape::from((n.rows, n.out))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let n = self.dims(x.layout(), None)?;
        let g = g.contiguous()?;
        let (dx, _) = with_cpu_f32([x, &g], |[xs, gs]| self.backward(n, xs, gs, None))?;
        dx.map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
            .transpose()
    }
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.dims(lx, Some(ld))?;
        if lu.dims() != [n.out, n.rank] {
            return Err(Error::Msg(format!(
                "linear: LoRA up {:?} is not [{}, {}]",
                lu.dims(),
                n.out,
                n.rank
            )));
        }
        let s = self.scale.unwrap_or(1.0) as f32;
        let lora = (f32_slice(sd, ld)?, f32_slice(su, lu)?, s);
        let y = self.forward(n, f32_slice(sx, lx)?, Some(lora))?;
        Ok((CpuStorage::F32(y), Shape::from((n.rows, n.out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.dims(x.layout(), Some(down.layout()))?;
        let g = g.contiguous()?;
        let s = self.scale.unwrap_or(1.0) as f32;
        let (dx, lora) = with_cpu_f32([x, &g, down, up], |[xs, gs, ds, us]| {
            self.backward(n, xs, gs, Some((ds, us, s)))
        })?;
        let dev = x.device();
        let dx = dx
            .map(|dx| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        let (dd, du) = match lora {
            Some((dd, du)) => (
                Some(Tensor::from_vec(dd, down.shape(), dev)?),
                Some(Tensor::from_vec(du, up.shape(), dev)?),
            ),
            None => (None, None),
        };
        Ok((dx, dd, du))
    }
}

/// `x·Wᵀ + b (+ s·(x·Dᵀ)·Uᵀ)` for CPU f32 `x` [rows, in] with frozen `weight` [out, in] and
/// `bias` [out] and an optional adapter (down [r, in], up [out, r], scale), as one graph node:
/// the gradient reaches `x` and the adapter, never the frozen weights.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    adapter: Option<(&Tensor, &Tensor, f64)>,
) -> Result<Tensor> {
    let c = |t: &Tensor| t.detach().contiguous();
    let op = |scale| -> Result<Dense> {
        Ok(Dense {
            weight: c(weight)?,
            bias: bias.map(c).transpose()?,
            scale,
            input_grad: x.track_op(),
        })
    };
    let x = x.contiguous()?;
    match adapter {
        None => x.apply_op1(op(None)?),
        Some((down, up, s)) => x.apply_op3(&down.contiguous()?, &up.contiguous()?, op(Some(s))?),
    }
}
