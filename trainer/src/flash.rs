//! Multi-head attention on the CPU as one op, computed block by block like FlashAttention.
//!
//! Queries, keys and values stay as the projections wrote them, [B, L, heads·d] with the
//! heads side by side, so no head is ever transposed or copied out. Each parallel task takes
//! one batch item, one head and a block of query rows, multiplies them against all keys into
//! a small per-thread score buffer (about [`BLOCK_SCORES`] floats), takes the softmax there and
//! multiplies by the values straight into the output's columns for that head. Only the
//! softmax's log-sum-exp per query row is kept for backward, which recomputes each block's
//! probabilities from it (FlashAttention-2's backward):
//!
//! `P = exp(s·q·kᵀ − lse)`, `dv = Pᵀ·dO`, `dP = dO·vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`,
//! `dq = s·dS·k`, `dk = s·dSᵀ·q`, with `s = 1/√d`.
//!
//! Backward tasks own one (batch, head) and a run of query blocks; their `dk`/`dv` are
//! partial sums over those blocks, added up per head at the end. `nn::multi_head_attention`
//! routes CPU tensors here; `tests` compares values and gradients with the composed ops.

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_matmul::{matmul, SharedOut, View};
use crate::fused::{exp_shifted, with_cpu_f32};

/// Target size of one task's score block (query rows × keys), in floats: 256 KiB, which
/// stays in a core's L2 cache next to the key and value rows it is multiplied with.
pub const BLOCK_SCORES: usize = 1 << 16;

thread_local! {
    /// Each thread's score (and score-gradient) block, reused from task to task.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer, grown to at least `len` floats.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// The shapes of one attention call: q [b, lq, c], k and v [b, lk, c], c = heads·d.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    d: usize,
    /// Query rows per block.
    rows: usize,
}

impl Geometry {
    fn c(&self) -> usize {
        self.heads * self.d
    }
    fn blocks(&self) -> usize {
        self.lq.div_ceil(self.rows)
    }
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
    /// Rows `n` of head `h` of batch item `bi` from row `r0`: a view into a [b, l, c] buffer.
    fn head_rows(&self, l: usize, bi: usize, h: usize, r0: usize, n: usize) -> View {
        let c = self.c();
        View::rows(bi * l * c + r0 * c + h * self.d, n, self.d, c)
    }
    fn q_rows(&self, bi: usize, h: usize, r0: usize, n: usize) -> View {
        self.head_rows(self.lq, bi, h, r0, n)
    }
    fn keys(&self, bi: usize, h: usize) -> View {
        self.head_rows(self.lk, bi, h, 0, self.lk)
    }
    /// Query rows (start, count) of block `blk`.
    fn block(&self, blk: usize) -> (usize, usize) {
        let r0 = blk * self.rows;
        (r0, self.rows.min(self.lq - r0))
    }
}

/// `scores = s·q·kᵀ` for query rows [r0, r0+n) of one head, as an n × lk block.
fn scores(
    g: &Geometry,
    q: &[f32],
    k: &[f32],
    (bi, h, r0, n): (usize, usize, usize, usize),
    out: &mut [f32],
) -> Result<()> {
    let lk = g.lk;
    matmul(
        out,
        View::rows(0, n, lk, lk),
        q,
        g.q_rows(bi, h, r0, n),
        k,
        g.keys(bi, h).t(),
        g.scale(),
        false,
        false,
    )
}

/// Forward: the output [b, lq, c] and the log-sum-exp of every score row [b, heads, lq].
fn forward(g: &Geometry, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    let (lq, lk) = (g.lq, g.lk);
    let mut out = vec![0f32; g.b * lq * g.c()];
    let mut lse = vec![0f32; g.b * g.heads * lq];
    let shared = SharedOut::new(&mut out);
    lse.par_chunks_mut(lq.max(1))
        .enumerate()
        .flat_map(|(bh, l)| {
            l.par_chunks_mut(g.rows)
                .enumerate()
                .map(move |(blk, l)| (bh, blk, l))
        })
        .try_for_each(|(bh, blk, lse)| {
            let (bi, h) = (bh / g.heads, bh % g.heads);
            let (r0, n) = g.block(blk);
            with_scratch(n * lk, |p| {
                scores(g, q, k, (bi, h, r0, n), p)?;
                for (row, lse) in p.chunks_mut(lk).zip(lse.iter_mut()) {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum = exp_shifted(row, m);
                    *lse = m + sum.ln();
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                }
                // SAFETY: this task alone writes the rows of this block in this head's columns.
                unsafe {
                    shared.matmul(
                        g.q_rows(bi, h, r0, n),
                        p,
                        View::rows(0, n, lk, lk),
                        v,
                        g.keys(bi, h),
                        1.0,
                        false,
                    )
                }
            })
        })?;
    Ok((out, lse))
}

/// The inputs of backward: the forward's inputs, its output and log-sum-exp, and d(out).
struct Saved<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    lse: &'a [f32],
    go: &'a [f32],
}

/// Backward: (dq, dk, dv) in the layouts of q, k and v.
fn backward(g: &Geometry, s: &Saved) -> Result<[Vec<f32>; 3]> {
    let (lq, lk, d, c) = (g.lq, g.lk, g.d, g.c());
    let (blocks, pairs) = (g.blocks(), g.b * g.heads);
    // Enough tasks for every thread even with few heads: split a head's query blocks into
    // groups, each with its own partial dk and dv.
    let groups = (2 * rayon::current_num_threads())
        .div_ceil(pairs.max(1))
        .clamp(1, blocks.max(1));
    let mut dq = vec![0f32; g.b * lq * c];
    let part = lk * d;
    let mut dk_parts = vec![0f32; pairs * groups * part];
    let mut dv_parts = vec![0f32; pairs * groups * part];
    let shared_dq = SharedOut::new(&mut dq);
    dk_parts
        .par_chunks_mut(part.max(1))
        .zip(dv_parts.par_chunks_mut(part.max(1)))
        .enumerate()
        .try_for_each(|(task, (dk, dv))| {
            let (bh, group) = (task / groups, task % groups);
            let (bi, h) = (bh / g.heads, bh % g.heads);
            let first = group * blocks / groups;
            let last = (group + 1) * blocks / groups;
            with_scratch(2 * g.rows * lk, |scratch| -> Result<()> {
                let (p, dp) = scratch.split_at_mut(g.rows * lk);
                for blk in first..last {
                    let (r0, n) = g.block(blk);
                    let (p, dp) = (&mut p[..n * lk], &mut dp[..n * lk]);
                    let block = View::rows(0, n, lk, lk);
                    let rows = g.q_rows(bi, h, r0, n);
                    scores(g, s.q, s.k, (bi, h, r0, n), p)?;
                    let lse = &s.lse[bh * lq + r0..bh * lq + r0 + n];
                    for (row, &l) in p.chunks_mut(lk).zip(lse) {
                        exp_shifted(row, l);
                    }
                    let dv_view = View::rows(0, lk, d, d);
                    matmul(dv, dv_view, p, block.t(), s.go, rows, 1.0, true, false)?;
                    matmul(
                        dp,
                        block,
                        s.go,
                        rows,
                        s.v,
                        g.keys(bi, h).t(),
                        1.0,
                        false,
                        false,
                    )?;
                    for (r, (dp, p)) in dp.chunks_mut(lk).zip(p.chunks(lk)).enumerate() {
                        let at = rows.offset + r * c;
                        let di: f32 = s.go[at..at + d]
                            .iter()
                            .zip(&s.o[at..at + d])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (x, &p) in dp.iter_mut().zip(p) {
                            *x = p * (*x - di);
                        }
                    }
                    // SAFETY: this task alone writes the rows of this block in this head.
                    unsafe {
                        shared_dq.matmul(rows, dp, block, s.k, g.keys(bi, h), g.scale(), false)?;
                    }
                    matmul(
                        dk,
                        dv_view,
                        dp,
                        block.t(),
                        s.q,
                        rows,
                        g.scale(),
                        true,
                        false,
                    )?;
                }
                Ok(())
            })
        })?;
    let gather = |parts: &[f32]| {
        let mut out = vec![0f32; g.b * lk * c];
        out.par_chunks_mut((lk * c).max(1))
            .enumerate()
            .for_each(|(bi, out)| {
                for h in 0..g.heads {
                    let bh = bi * g.heads + h;
                    for part in parts[bh * groups * part..(bh + 1) * groups * part].chunks(part) {
                        for (j, src) in part.chunks(d).enumerate() {
                            let dst = &mut out[j * c + h * d..j * c + h * d + d];
                            dst.iter_mut().zip(src).for_each(|(o, s)| *o += s);
                        }
                    }
                }
            });
        out
    };
    Ok([dq, gather(&dk_parts), gather(&dv_parts)])
}

/// The attention op: q, k and v contiguous f32 [B, L, heads·d] on the CPU.
struct FlashAttention {
    heads: usize,
    block_scores: usize,
    /// Log-sum-exp of every score row, written by forward for backward.
    lse: Mutex<Option<Vec<f32>>>,
}

impl FlashAttention {
    fn geometry(&self, lq_: &Layout, lk_: &Layout, lv_: &Layout) -> Result<Geometry> {
        let (b, lq, c) = lq_.shape().dims3()?;
        let (bk, lk, ck) = lk_.shape().dims3()?;
        if lv_.shape().dims() != lk_.shape().dims() || bk != b || ck != c {
            return Err(Error::Msg(format!(
                "attention: q {:?}, k {:?} and v {:?} do not match",
                lq_.dims(),
                lk_.dims(),
                lv_.dims()
            )));
        }
        if self.heads == 0 || !c.is_multiple_of(self.heads) {
            return Err(Error::Msg(format!(
                "attention: {c} channels do not split into {} heads",
                self.heads
            )));
        }
        Ok(Geometry {
            b,
            lq,
            lk,
            heads: self.heads,
            d: c / self.heads,
            rows: (self.block_scores / lk.max(1)).clamp(1, lq.max(1)),
        })
    }
}

/// The contiguous f32 elements of a CPU tensor.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) if b <= v.len() => Ok(&v[a..b]),
        _ => Err(Error::Msg(
            "attention: expects contiguous f32 tensors on the CPU".into(),
        )),
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(lq, lk, lv)?;
        let (out, lse) = forward(&g, cpu_f32(sq, lq)?, cpu_f32(sk, lk)?, cpu_f32(sv, lv)?)?;
        *self
            .lse
            .lock()
            .map_err(|_| Error::Msg("attention: poisoned".into()))? = Some(lse);
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(q.layout(), k.layout(), v.layout())?;
        let lse = self
            .lse
            .lock()
            .map_err(|_| Error::Msg("attention: poisoned".into()))?;
        let lse = lse
            .as_deref()
            .ok_or_else(|| Error::Msg("attention: backward before forward".into()))?;
        let grad = crate::fused::f32_contiguous(grad)?;
        let [dq, dk, dv] = with_cpu_f32([q, k, v, out, &grad], |[q, k, v, o, go]| {
            backward(
                &g,
                &Saved {
                    q,
                    k,
                    v,
                    o,
                    lse,
                    go,
                },
            )
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Attention of f32 CPU tensors q [B, Lq, heads·d], k and v [B, Lk, heads·d], as one graph
/// node; `block_scores` sizes the query blocks (see [`BLOCK_SCORES`]).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    block_scores: usize,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        FlashAttention {
            heads,
            block_scores: block_scores.max(1),
            lse: Mutex::new(None),
        },
    )
}
