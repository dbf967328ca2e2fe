//! CPU reference kernels for softmax cross-entropy, generic over the compute type.
//!
//! Rows are `[V]` slices of logits. Targets are validated by the caller: a target that
//! does not convert to `usize` (a negative one, i.e. the ignore index) marks an ignored row.

use crate::ops::elementwise::cpu::CHUNK;
use crate::Real;
use rayon::prelude::*;

/// Rows per rayon task for rows of `v` elements (about [`CHUNK`] elements per task).
fn rows_per_task(v: usize) -> usize {
    (CHUNK / v.max(1)).max(1)
}

/// The target class of a row, `None` for an ignored row.
fn class(t: i32) -> Option<usize> {
    usize::try_from(t).ok()
}

/// `logsumexp` of each row of `v` logits, with max subtraction:
/// `lse = max + ln Σ exp(x − max)`. Ignored rows get one too (it is not used).
pub(crate) fn row_lse<T: Real>(logits: &[T], v: usize) -> Vec<T> {
    let mut lse = crate::storage::pool::zeroed::<T>(logits.len() / v);
    let rpt = rows_per_task(v);
    lse.par_chunks_mut(rpt)
        .zip(logits.par_chunks(rpt * v))
        .for_each(|(lse, x)| {
            for (l, row) in lse.iter_mut().zip(x.chunks_exact(v)) {
                let mx = row.iter().copied().fold(T::neg_infinity(), T::max);
                let s = row.iter().map(|&x| (x - mx).exp_fast()).sum::<T>();
                *l = mx + s.ln();
            }
        });
    lse
}

/// The sum over the non-ignored rows of `lse[r] − logits[r, target[r]]`, in row order
/// (deterministic), and the number of those rows.
pub(crate) fn loss_sum<T: Real>(logits: &[T], lse: &[T], targets: &[i32], v: usize) -> (T, usize) {
    let (mut sum, mut n) = (T::zero(), 0usize);
    for (r, (&l, &t)) in lse.iter().zip(targets).enumerate() {
        if let Some(t) = class(t) {
            sum += l - logits[r * v + t];
            n += 1;
        }
    }
    (sum, n)
}

/// The logits gradient: `scale·(softmax(row) − onehot(target))` for the non-ignored
/// rows, with `softmax = exp(x − lse)` from the saved `lse`; zero for ignored rows.
pub(crate) fn backward<T: Real>(
    logits: &[T],
    lse: &[T],
    targets: &[i32],
    v: usize,
    scale: T,
) -> Vec<T> {
    let mut g = crate::storage::pool::zeroed::<T>(logits.len());
    let rpt = rows_per_task(v);
    g.par_chunks_mut(rpt * v)
        .zip(logits.par_chunks(rpt * v))
        .zip(lse.par_chunks(rpt).zip(targets.par_chunks(rpt)))
        .for_each(|((g, x), (lse, targets))| {
            for ((g, x), (&l, &t)) in g
                .chunks_exact_mut(v)
                .zip(x.chunks_exact(v))
                .zip(lse.iter().zip(targets))
            {
                let Some(t) = class(t) else { continue };
                for (g, &x) in g.iter_mut().zip(x) {
                    *g = (x - l).exp_fast() * scale;
                }
                g[t] = ((x[t] - l).exp_fast() - T::one()) * scale;
            }
        });
    g
}
