//! The CPU device layer: a safe, bounds-checked GEMM over strided matrix views, on top of
//! the `gemm` crate (chosen over `matrixmultiply` by measurement, see BENCHMARKS.md).
//!
//! This is the only place the CPU backend uses `unsafe`.

use crate::{Error, Real, Result};

/// A read-only strided matrix view: element `(i, j)` is `data[i*rs + j*cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A writable strided matrix view whose elements are distinct (see [`MatMut::strided`]).
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

fn max_offset(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)
}

fn check_fits(
    op: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<()> {
    match max_offset(rows, cols, rs, cs) {
        Some(m) if rows == 0 || cols == 0 || m < len => Ok(()),
        _ => Err(Error::shape(
            op,
            format!(
                "a {rows}x{cols} view with strides ({rs}, {cs}) does not fit in {len} elements"
            ),
        )),
    }
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows × cols` matrix at the start of `data`.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit row and column strides.
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Result<Self> {
        check_fits("gemm", data.len(), rows, cols, rs, cs)?;
        Ok(MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl<'a, T> MatMut<'a, T> {
    /// A row-major `rows × cols` matrix at the start of `data`.
    pub fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Result<Self> {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A view with explicit strides. The strides must make every element distinct:
    /// `cs == 1, rs >= cols` (row-major, possibly a column slice of a wider matrix) or
    /// `rs == 1, cs >= rows` (column-major).
    pub fn strided(
        data: &'a mut [T],
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Result<Self> {
        check_fits("gemm", data.len(), rows, cols, rs, cs)?;
        let distinct =
            (cs == 1 && (rs >= cols || rows <= 1)) || (rs == 1 && (cs >= rows || cols <= 1));
        if !distinct {
            return Err(Error::shape(
                "gemm",
                format!("output strides ({rs}, {cs}) alias elements of a {rows}x{cols} view"),
            ));
        }
        Ok(MatMut {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// The columns `c0..c1` of a row-major `rows × ld` buffer, as a view.
    pub fn columns(
        data: &'a mut [T],
        rows: usize,
        ld: usize,
        c0: usize,
        c1: usize,
    ) -> Result<Self> {
        if c0 > c1 || c1 > ld {
            return Err(Error::shape("gemm", format!("columns {c0}..{c1} of {ld}")));
        }
        let data = data
            .get_mut(c0..)
            .ok_or_else(|| Error::shape("gemm", "column offset past the buffer"))?;
        Self::strided(data, rows, c1 - c0, ld, 1)
    }
}

/// Runs `f` compiled for the best instruction set this CPU has (AVX-512, AVX2+FMA, or the
/// x86-64 baseline), so the plain loops inside it vectorise at the machine's full width.
/// `f` must be simple straight-line loops; it is inlined into each specialised copy.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// How many threads a GEMM may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// The calling thread only (use inside an already-parallel loop).
    Seq,
    /// rayon's global pool, when the product is big enough to pay for it.
    Auto,
}

/// Below this many multiply-adds a GEMM runs on one thread. Measured on the 2-core build
/// machines (BENCHMARKS.md): a second thread gains at most ~1.3x on 256³-class products
/// and halves throughput on 128-class ones.
const PAR_THRESHOLD: usize = 1 << 24;

/// `dst = (accumulate ? dst : 0) + alpha · a · b`, accumulating in `T`.
///
/// Shapes: `a` is `m × k`, `b` is `k × n`, `dst` is `m × n`; a `k` of 0 leaves `alpha·a·b = 0`.
pub fn gemm<T: Real>(
    dst: MatMut<'_, T>,
    accumulate: bool,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
    par: Par,
) -> Result<()> {
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    if a.rows != m || b.rows != k || b.cols != n {
        return Err(Error::shape(
            "gemm",
            format!(
                "{}x{} · {}x{} into {}x{}",
                a.rows, a.cols, b.rows, b.cols, dst.rows, dst.cols
            ),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst.data[i * dst.rs + j * dst.cs] = T::zero();
                }
            }
        }
        return Ok(());
    }
    let parallelism =
        if par == Par::Auto && m * n * k >= PAR_THRESHOLD && rayon::current_num_threads() > 1 {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
    // SAFETY: every view was checked at construction to address only elements inside its
    // slice (`check_fits`), the shapes were checked to agree above, `dst` is a unique
    // borrow whose strides address distinct elements (`MatMut::strided`), and `a`/`b` are
    // shared borrows that cannot alias the unique `dst`. Strides fit in isize because
    // they index inside a Rust slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_with_transposes_accumulate_and_column_slices() {
        let (m, n, k) = (37, 29, 65);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 13) as f64) - 6.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 % 11) as f64) - 5.0).collect();
        let want = naive(m, n, k, &a, &b);
        // plain
        let mut c = vec![f64::NAN; m * n];
        gemm(
            MatMut::row_major(&mut c, m, n).unwrap(),
            false,
            MatRef::row_major(&a, m, k).unwrap(),
            MatRef::row_major(&b, k, n).unwrap(),
            1.0,
            Par::Auto,
        )
        .unwrap();
        assert_eq!(c, want);
        // b given transposed ([n, k] storage), accumulate with alpha 2 into a column slice
        let bt: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let ld = n + 5;
        let mut wide = vec![1.0; m * ld];
        gemm(
            MatMut::columns(&mut wide, m, ld, 3, 3 + n).unwrap(),
            true,
            MatRef::row_major(&a, m, k).unwrap(),
            MatRef::row_major(&bt, n, k).unwrap().t(),
            2.0,
            Par::Seq,
        )
        .unwrap();
        for i in 0..m {
            for j in 0..ld {
                let expect = if (3..3 + n).contains(&j) {
                    1.0 + 2.0 * want[i * n + j - 3]
                } else {
                    1.0
                };
                assert_eq!(wide[i * ld + j], expect, "({i},{j})");
            }
        }
    }

    #[test]
    fn gemm_rejects_views_that_do_not_fit_or_alias() {
        let mut d = vec![0.0f32; 10];
        assert!(MatMut::row_major(&mut d, 3, 4).is_err());
        assert!(MatMut::strided(&mut d, 2, 2, 1, 1).is_err());
        let a = vec![0.0f32; 6];
        assert!(MatRef::row_major(&a, 2, 4).is_err());
        let a = MatRef::row_major(&a, 2, 3).unwrap();
        let mut d = vec![0.0f32; 4];
        let r = gemm(
            MatMut::row_major(&mut d, 2, 2).unwrap(),
            false,
            a,
            a,
            1.0,
            Par::Seq,
        );
        assert!(matches!(r, Err(Error::Shape { .. })));
    }
}
