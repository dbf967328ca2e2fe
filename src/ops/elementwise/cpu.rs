//! CPU reference kernels for the elementwise ops, generic over the compute type.

use crate::Real;
use crate::device::cpu::vectorized;
use rayon::prelude::*;

/// Elements per rayon task: below ~32K elements a pass is faster on one thread.
pub(crate) const CHUNK: usize = 1 << 15;

/// `out[i] = f(a[i], b[i])`.
pub(crate) fn zip_map<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = crate::storage::pool::scratch::<T>(a.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            vectorized(
                #[inline(always)]
                || {
                    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                        *o = f(a, b);
                    }
                },
            )
        });
    out
}

/// `out[i] = f(a[i])`.
pub(crate) fn map<T: Real>(a: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = crate::storage::pool::scratch::<T>(a.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .for_each(|(o, a)| {
            vectorized(
                #[inline(always)]
                || o.iter_mut().zip(a).for_each(|(o, &a)| *o = f(a)),
            )
        });
    out
}

/// `y[r, c] = x[r, c] + b[c]`.
pub(crate) fn bias_add<T: Real>(x: &[T], b: &[T]) -> Vec<T> {
    let n = b.len();
    let mut out = crate::storage::pool::scratch::<T>(x.len());
    out.par_chunks_mut(n * (CHUNK / n).max(1))
        .zip(x.par_chunks(n * (CHUNK / n).max(1)))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                for ((o, &x), &b) in o.iter_mut().zip(x).zip(b) {
                    *o = x + b;
                }
            }
        });
    out
}

/// Column sums of a `[rows, n]` matrix, in a fixed order (deterministic).
pub(crate) fn column_sums<T: Real>(g: &[T], n: usize) -> Vec<T> {
    let mut s = crate::storage::pool::zeroed::<T>(n);
    for row in g.chunks_exact(n) {
        for (s, &v) in s.iter_mut().zip(row) {
            *s += v;
        }
    }
    s
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_COEF: f64 = 0.044_715;

/// tanh-GELU: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (GPT-2's `gelu_new`).
pub(crate) fn gelu<T: Real>(x: T) -> T {
    let inner = T::c(SQRT_2_OVER_PI) * (x + T::c(GELU_COEF) * x * x * x);
    T::c(0.5) * x * (T::one() + inner.tanh_fast())
}

/// d gelu / dx.
pub(crate) fn gelu_grad<T: Real>(x: T) -> T {
    let x2 = x * x;
    let inner = T::c(SQRT_2_OVER_PI) * (x + T::c(GELU_COEF) * x2 * x);
    let t = inner.tanh_fast();
    let dinner = T::c(SQRT_2_OVER_PI) * (T::one() + T::c(3.0 * GELU_COEF) * x2);
    T::c(0.5) * (T::one() + t) + T::c(0.5) * x * (T::one() - t * t) * dinner
}
