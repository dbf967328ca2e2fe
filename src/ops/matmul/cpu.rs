//! CPU reference GEMMs for `matmul` and `linear`, through the device layer's `gemm`.

use crate::device::cpu::{MatMut, MatRef, Par, gemm};
use crate::ops::profile::count_gemm;
use crate::{Real, Result};

/// `c = a·b` with `a [m, k]`, `b [k, n]`, row-major; `tb`: `b` is stored `[n, k]` (use `bᵀ`);
/// `ta`: `a` is stored `[k, m]` (use `aᵀ`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: Real>(
    c: &mut [T],
    accumulate: bool,
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    (m, k, n): (usize, usize, usize),
    alpha: T,
) -> Result<()> {
    count_gemm(m, n, k);
    let a = if ta {
        MatRef::row_major(a, k, m)?.t()
    } else {
        MatRef::row_major(a, m, k)?
    };
    let b = if tb {
        MatRef::row_major(b, n, k)?.t()
    } else {
        MatRef::row_major(b, k, n)?
    };
    gemm(
        MatMut::row_major(c, m, n)?,
        accumulate,
        a,
        b,
        alpha,
        Par::Auto,
    )
}
