//! CPU reference of the merged-weight update, on slices.

use crate::Real;
use std::ops::Range;

/// One adapter: `A [r, K]`, `B [n, r]` over rows `rows` of `W`, with its signed scale.
pub(crate) struct Term<'a, T> {
    pub a: &'a [T],
    pub b: &'a [T],
    pub r: usize,
    pub scale: T,
    pub rows: Range<usize>,
}

/// `acc[row, :] += Σ_terms scale·Σ_p B[row−r0, p]·A[p, :]`, in a fixed order (terms, then
/// p), so the result is deterministic.
pub(crate) fn merge<T: Real>(acc: &mut [T], k: usize, terms: &[Term<'_, T>]) {
    for t in terms {
        for (bi, row) in t.rows.clone().enumerate() {
            let dst = &mut acc[row * k..(row + 1) * k];
            for p in 0..t.r {
                let coef = t.scale * t.b[bi * t.r + p];
                for (d, &av) in dst.iter_mut().zip(&t.a[p * k..(p + 1) * k]) {
                    *d += coef * av;
                }
            }
        }
    }
}
