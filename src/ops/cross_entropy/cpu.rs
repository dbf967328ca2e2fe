//! CPU reference kernels for softmax cross-entropy, generic over the compute type.
//!
//! Rows are `ld`-element slices of logits whose first `v` elements are the classes; the
//! columns `v..ld` are padding (a vocabulary padded for the GEMMs' alignment): never read,
//! their gradient is 0. Targets are validated by the caller: a target that does not
//! convert to `usize` (a negative one, i.e. the ignore index) marks an ignored row.

use crate::Real;
use crate::ops::elementwise::cpu::CHUNK;
use rayon::prelude::*;

/// Rows per rayon task for rows of `ld` elements (about [`CHUNK`] elements per task).
fn rows_per_task(ld: usize) -> usize {
    (CHUNK / ld.max(1)).max(1)
}

/// The target class of a row, `None` for an ignored row.
fn class(t: i32) -> Option<usize> {
    usize::try_from(t).ok()
}

/// `logsumexp` of the first `v` logits of each row of `ld`, with max subtraction:
/// `lse = max + ln Σ exp(x − max)`. Ignored rows get one too (it is not used).
pub(crate) fn row_lse<T: Real>(logits: &[T], ld: usize, v: usize) -> Vec<T> {
    let mut lse = crate::storage::pool::zeroed::<T>(logits.len() / ld);
    let rpt = rows_per_task(ld);
    lse.par_chunks_mut(rpt)
        .zip(logits.par_chunks(rpt * ld))
        .for_each(|(lse, x)| {
            for (l, row) in lse.iter_mut().zip(x.chunks_exact(ld)) {
                let row = &row[..v];
                let mx = row.iter().copied().fold(T::neg_infinity(), T::max);
                let s = row.iter().map(|&x| (x - mx).exp_fast()).sum::<T>();
                *l = mx + s.ln();
            }
        });
    lse
}

/// The sum over the non-ignored rows of `lse[r] − logits[r, target[r]]`, in row order
/// (deterministic), and the number of those rows (rows of `ld` elements).
pub(crate) fn loss_sum<T: Real>(logits: &[T], lse: &[T], targets: &[i32], ld: usize) -> (T, usize) {
    let (mut sum, mut n) = (T::zero(), 0usize);
    for (r, (&l, &t)) in lse.iter().zip(targets).enumerate() {
        if let Some(t) = class(t) {
            sum += l - logits[r * ld + t];
            n += 1;
        }
    }
    (sum, n)
}

/// The logits gradient: `scale·(softmax(row) − onehot(target))` over the first `v`
/// columns of the non-ignored rows, with `softmax = exp(x − lse)` from the saved `lse`;
/// zero for ignored rows and for the padding columns `v..ld`.
pub(crate) fn backward<T: Real>(
    logits: &[T],
    lse: &[T],
    targets: &[i32],
    (ld, v): (usize, usize),
    scale: T,
) -> Vec<T> {
    let mut g = crate::storage::pool::zeroed::<T>(logits.len());
    let rpt = rows_per_task(ld);
    g.par_chunks_mut(rpt * ld)
        .zip(logits.par_chunks(rpt * ld))
        .zip(lse.par_chunks(rpt).zip(targets.par_chunks(rpt)))
        .for_each(|((g, x), (lse, targets))| {
            for ((g, x), (&l, &t)) in g
                .chunks_exact_mut(ld)
                .zip(x.chunks_exact(ld))
                .zip(lse.iter().zip(targets))
            {
                let Some(t) = class(t) else { continue };
                for (g, &x) in g[..v].iter_mut().zip(&x[..v]) {
                    *g = (x - l).exp_fast() * scale;
                }
                g[t] = ((x[t] - l).exp_fast() - T::one()) * scale;
            }
        });
    g
}
