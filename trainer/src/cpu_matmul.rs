//! Matrix products on strided f32 views, written straight into the caller's buffer.
//!
//! candle's CPU matmul wants contiguous operands (or makes them so) and zero-fills a fresh
//! output before every product. The fused kernels that multiply many small blocks (attention
//! over heads laid out side by side in one [B, L, heads·d] tensor) call the same `gemm`
//! kernels directly instead: any row and column strides, output into a reused or shared
//! buffer, accumulation into it, and no threads of their own when they already run inside a
//! parallel task.

use candle_core::{Error, Result};
use rayon::prelude::*;

/// A strided matrix inside a slice: element (i, j) is at `offset + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// Rows of `cols` consecutive elements, `rs` apart.
    pub fn rows(offset: usize, rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            offset,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The same elements read as the transposed matrix.
    pub fn t(self) -> Self {
        Self {
            offset: self.offset,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// One past the last element the view reaches (its offset when it is empty).
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
    }

    fn check(&self, len: usize, what: &str) -> Result<()> {
        if self.end() > len {
            return Err(Error::Msg(format!(
                "matmul: {what} view {self:?} reaches past its buffer of {len} elements"
            )));
        }
        Ok(())
    }
}

/// An output buffer that parallel tasks write at the same time, each to its own elements
/// (for example the columns of one attention head in a [B, L, heads·d] tensor).
pub struct SharedOut<'a> {
    ptr: *mut f32,
    len: usize,
    _buffer: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the buffer is borrowed mutably for 'a and the writers promise disjoint elements
// (see `SharedOut::matmul`).
unsafe impl Send for SharedOut<'_> {}
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub fn new(buffer: &'a mut [f32]) -> Self {
        Self {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
            _buffer: std::marker::PhantomData,
        }
    }

    /// [`matmul`] into the view `d` of the shared buffer.
    ///
    /// # Safety
    /// No other task may read or write the elements of `d` while this runs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        d: View,
        a: &[f32],
        av: View,
        b: &[f32],
        bv: View,
        beta: f32,
        accumulate: bool,
    ) -> Result<()> {
        check(self.len, d, a, av, b, bv)?;
        gemm_raw(self.ptr, d, a, av, b, bv, beta, accumulate, false);
        Ok(())
    }
}

fn check(dst_len: usize, d: View, a: &[f32], av: View, b: &[f32], bv: View) -> Result<()> {
    if av.rows != d.rows || bv.cols != d.cols || av.cols != bv.rows {
        return Err(Error::Msg(format!(
            "matmul: shapes do not chain: ({}x{})·({}x{}) into {}x{}",
            av.rows, av.cols, bv.rows, bv.cols, d.rows, d.cols
        )));
    }
    d.check(dst_len, "output")?;
    av.check(a.len(), "left")?;
    bv.check(b.len(), "right")
}

/// `dst[d] = beta·a[av]·b[bv]`, or `dst[d] += beta·a[av]·b[bv]` when `accumulate`; split over
/// the rayon pool when `parallel`, else on the calling thread.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    d: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    beta: f32,
    accumulate: bool,
    parallel: bool,
) -> Result<()> {
    check(dst.len(), d, a, av, b, bv)?;
    gemm_raw(
        dst.as_mut_ptr(),
        d,
        a,
        av,
        b,
        bv,
        beta,
        accumulate,
        parallel,
    );
    Ok(())
}

/// The product itself, on views already checked against their buffers.
#[allow(clippy::too_many_arguments)]
fn gemm_raw(
    dst: *mut f32,
    d: View,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    beta: f32,
    accumulate: bool,
    parallel: bool,
) {
    if d.rows == 0 || d.cols == 0 {
        return;
    }
    if av.cols == 0 {
        // An empty sum: the product is zero.
        if !accumulate {
            for i in 0..d.rows {
                for j in 0..d.cols {
                    // SAFETY: (i, j) is inside the checked view.
                    unsafe { *dst.add(d.offset + i * d.rs + j * d.cs) = 0.0 };
                }
            }
        }
        return;
    }
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let parts = split_count(d, av.cols, threads);
    if parts <= 1 {
        // SAFETY: every view was checked to lie inside its buffer, and the caller holds `dst`
        // exclusively for the elements of `d`.
        unsafe {
            gemm::gemm(
                d.rows,
                d.cols,
                av.cols,
                dst.add(d.offset),
                d.cs as isize,
                d.rs as isize,
                accumulate,
                a.as_ptr().add(av.offset),
                av.cs as isize,
                av.rs as isize,
                b.as_ptr().add(bv.offset),
                bv.cs as isize,
                bv.rs as isize,
                1.0,
                beta,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        return;
    }
    // Split the output along its longer side into `parts` bands, each a product of its own
    // on one thread. The `gemm` crate's own threading packs a row-major left operand on the
    // calling thread before it forks and meets again after every depth block; one band per
    // task keeps both cores on the product and re-packs only the shared operand's band
    // count times (small beside the product once a band has 16 or more rows).
    let by_rows = d.rows >= d.cols;
    let long = if by_rows { d.rows } else { d.cols };
    let out = SendPtr(dst);
    (0..parts).into_par_iter().for_each(|p| {
        let (lo, hi) = (long * p / parts, long * (p + 1) / parts);
        let (mut dp, mut ap, mut bp) = (d, av, bv);
        if by_rows {
            dp.offset += lo * d.rs;
            dp.rows = hi - lo;
            ap.offset += lo * av.rs;
            ap.rows = hi - lo;
        } else {
            dp.offset += lo * d.cs;
            dp.cols = hi - lo;
            bp.offset += lo * bv.cs;
            bp.cols = hi - lo;
        }
        // The bands are disjoint parts of the checked output view, and each operand band
        // lies inside its checked view.
        gemm_raw(out.get(), dp, a, ap, b, bp, beta, accumulate, false);
    });
}

/// Fewer multiply-adds than this run on one thread: the fork would cost more than it saves.
const SPLIT_MIN_WORK: usize = 64 * 64 * 64;

/// Rows (or columns) a band keeps at least, so that re-packing the shared operand stays cheap.
const SPLIT_MIN_BAND: usize = 16;

/// How many bands to cut the product `d` (with inner size `k`) into over `threads` threads:
/// two per thread, so that a thread that falls behind is caught up by stealing, and none
/// when the product is too small to be worth a fork.
fn split_count(d: View, k: usize, threads: usize) -> usize {
    if threads <= 1 || d.rows.saturating_mul(d.cols).saturating_mul(k) < SPLIT_MIN_WORK {
        return 1;
    }
    let long = d.rows.max(d.cols);
    (2 * threads).min(long / SPLIT_MIN_BAND).max(1)
}

/// The output pointer, handed to the bands of a split product.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: each task writes its own band of the output only (see `gemm_raw`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product of two strided views, one element at a time.
    fn naive(a: &[f32], av: View, b: &[f32], bv: View) -> Vec<f32> {
        let mut out = vec![0f32; av.rows * bv.cols];
        for i in 0..av.rows {
            for j in 0..bv.cols {
                out[i * bv.cols + j] = (0..av.cols)
                    .map(|p| {
                        a[av.offset + i * av.rs + p * av.cs] * b[bv.offset + p * bv.rs + j * bv.cs]
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_products_match_the_definition() -> Result<()> {
        let a: Vec<f32> = (0..200).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..300).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        // a: 4x6 rows 10 apart from offset 3; b: the transpose of a 5x6 block (b·ᵀ).
        let av = View::rows(3, 4, 6, 10);
        let bv = View::rows(7, 5, 6, 8).t();
        let want = naive(&a, av, &b, bv);
        // Into columns 2.. of a 4x9 buffer, then accumulated a second time at half weight.
        let mut dst = vec![-1f32; 36];
        let d = View::rows(2, 4, 5, 9);
        matmul(&mut dst, d, &a, av, &b, bv, 1.0, false, false)?;
        matmul(&mut dst, d, &a, av, &b, bv, 0.5, true, true)?;
        for i in 0..4 {
            assert_eq!(
                &dst[i * 9..i * 9 + 2],
                &[-1.0, -1.0],
                "row {i} left of the view"
            );
            for j in 0..5 {
                assert_eq!(dst[2 + i * 9 + j], 1.5 * want[i * 5 + j], "({i}, {j})");
            }
        }
        Ok(())
    }

    /// Products big enough to be cut into bands, along rows and along columns, on a pool of
    /// three threads (six bands of uneven sizes), accumulated into strided outputs.
    #[test]
    fn split_products_match_the_definition() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .map_err(|e| Error::Msg(e.to_string()))?;
        for (m, k, n) in [(101, 64, 90), (70, 64, 203)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            // a row-major [m, k]; b read transposed from a row-major [n, k].
            let (av, bv) = (View::rows(0, m, k, k), View::rows(0, n, k, k).t());
            let d = View::rows(1, m, n, n + 3);
            assert!(split_count(d, k, 3) > 1, "{m}x{k}x{n} should split");
            let want = naive(&a, av, &b, bv);
            let mut dst = vec![2f32; 1 + m * (n + 3)];
            pool.install(|| matmul(&mut dst, d, &a, av, &b, bv, 0.5, true, true))?;
            for i in 0..m {
                for j in 0..n + 3 {
                    let got = dst[1 + i * (n + 3) + j];
                    let expect = if j < n {
                        2.0 + 0.5 * want[i * n + j]
                    } else {
                        2.0
                    };
                    assert_eq!(got, expect, "{m}x{k}x{n} at ({i}, {j})");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn small_products_and_single_threads_are_not_split() {
        let d = View::rows(0, 1024, 320, 320);
        assert_eq!(split_count(d, 320, 1), 1);
        assert_eq!(split_count(d, 320, 2), 4);
        assert_eq!(split_count(View::rows(0, 16, 16, 16), 16, 2), 1);
        // A band keeps at least 16 rows: 40 rows make two bands, not four.
        assert_eq!(split_count(View::rows(0, 40, 8, 8), 1024, 2), 2);
    }

    #[test]
    fn views_past_their_buffer_are_refused() {
        let a = vec![0f32; 10];
        let mut dst = vec![0f32; 4];
        let err = matmul(
            &mut dst,
            View::rows(0, 2, 2, 2),
            &a,
            View::rows(0, 2, 6, 6),
            &a,
            View::rows(0, 6, 2, 2),
            1.0,
            false,
            false,
        )
        .expect_err("the left view needs 12 elements");
        assert!(err.to_string().contains("left view"), "{err}");
    }
}
