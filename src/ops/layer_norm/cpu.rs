//! CPU reference kernels for LayerNorm, generic over the compute type.
//!
//! Rows are `[.., C]` slices of `C` contiguous elements. Every kernel is deterministic:
//! each output element is produced by one thread in a fixed order.

use crate::Real;
use crate::ops::elementwise::cpu::CHUNK;
use rayon::prelude::*;

/// Rows per rayon task for rows of `c` elements (about [`CHUNK`] elements per task).
fn rows_per_task(c: usize) -> usize {
    (CHUNK / c.max(1)).max(1)
}

/// Columns per rayon task in the parameter-gradient reduction.
const COL_BLOCK: usize = 64;

/// Forward over rows of `c = gamma.len()` elements: returns `(y, mean, rstd)` where
/// `mean[r]` and `rstd[r] = 1/√(var[r] + eps)` (biased variance, two passes) are the
/// row statistics and `y = (x − mean)·rstd·gamma + beta`.
pub(crate) fn forward<T: Real>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let c = gamma.len();
    debug_assert!(c > 0 && x.len().is_multiple_of(c) && beta.len() == c);
    let m = x.len() / c;
    let n = T::c(c as f64);
    let mut y = crate::storage::pool::scratch::<T>(x.len());
    let mut mean = crate::storage::pool::zeroed::<T>(m);
    let mut rstd = crate::storage::pool::zeroed::<T>(m);
    let rpt = rows_per_task(c);
    y.par_chunks_mut(rpt * c)
        .zip(x.par_chunks(rpt * c))
        .zip(mean.par_chunks_mut(rpt).zip(rstd.par_chunks_mut(rpt)))
        .for_each(|((y, x), (mean, rstd))| {
            for (((y, x), mu), rs) in y
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(mean)
                .zip(rstd)
            {
                let m = x.iter().copied().sum::<T>() / n;
                let var = x.iter().map(|&v| (v - m) * (v - m)).sum::<T>() / n;
                let r = T::one() / (var + eps).sqrt();
                for ((y, &x), (&g, &b)) in y.iter_mut().zip(x).zip(gamma.iter().zip(beta)) {
                    *y = (x - m) * r * g + b;
                }
                *mu = m;
                *rs = r;
            }
        });
    (y, mean, rstd)
}

/// The input gradient (llm.c's `layernorm_backward`): with `n = (x − mean)·rstd` and
/// `d = gamma·gy`, `gx = (d − mean_C(d) − n·mean_C(d·n))·rstd`, row by row.
pub(crate) fn backward_x<T: Real>(
    x: &[T],
    gamma: &[T],
    gy: &[T],
    mean: &[T],
    rstd: &[T],
) -> Vec<T> {
    let c = gamma.len();
    let n = T::c(c as f64);
    let mut gx = crate::storage::pool::scratch::<T>(x.len());
    let rpt = rows_per_task(c);
    gx.par_chunks_mut(rpt * c)
        .zip(x.par_chunks(rpt * c).zip(gy.par_chunks(rpt * c)))
        .zip(mean.par_chunks(rpt).zip(rstd.par_chunks(rpt)))
        .for_each(|((gx, (x, gy)), (mean, rstd))| {
            for ((gx, (x, gy)), (&m, &r)) in gx
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c).zip(gy.chunks_exact(c)))
                .zip(mean.iter().zip(rstd))
            {
                let (mut sum_d, mut sum_dn) = (T::zero(), T::zero());
                for ((&x, &g), &gm) in x.iter().zip(gy).zip(gamma) {
                    let d = gm * g;
                    sum_d += d;
                    sum_dn += d * ((x - m) * r);
                }
                let (mean_d, mean_dn) = (sum_d / n, sum_dn / n);
                for ((gx, (&x, &g)), &gm) in gx.iter_mut().zip(x.iter().zip(gy)).zip(gamma) {
                    *gx = (gm * g - mean_d - (x - m) * r * mean_dn) * r;
                }
            }
        });
    gx
}

/// Rows per chunk of the parameter-gradient sums (the kernel's `kChunkRows`).
pub(crate) const ROW_CHUNK: usize = 32;

/// Lanes of the chunk sums' final combination (a warp's).
pub(crate) const LANES: usize = 32;

/// The fixed combination of a channel's lane sums, as a warp's xor-shuffle tree computes it
/// (`layer_norm_params_bwd`): at each distance 16, 8, 4, 2, 1 every lane adds its partner's
/// value, all at once (a + b = b + a exactly, so all lanes end equal); the result is lane 0's.
pub(crate) fn combine_lanes<T: Real>(s: &mut [T; LANES]) -> T {
    for off in [16, 8, 4, 2, 1] {
        let old = *s;
        for (l, v) in s.iter_mut().enumerate() {
            *v = old[l] + old[l ^ off];
        }
    }
    s[0]
}

/// The parameter gradients `(ggamma, gbeta)` over rows of `c` elements:
/// `ggamma[j] = Σ_r gy[r, j]·n[r, j]`, `gbeta[j] = Σ_r gy[r, j]`.
///
/// The order of the sums is part of the contract (the kernels reproduce it bit for bit):
/// the rows in chunks of [`ROW_CHUNK`], each chunk summed in row order from 0; chunk k's sum
/// added, in chunk order, into lane k mod [`LANES`] (from 0); the lanes combined by
/// [`combine_lanes`]. Parallel over blocks of columns, so the result does not depend on the
/// thread count.
pub(crate) fn backward_params<T: Real>(
    x: &[T],
    gy: &[T],
    mean: &[T],
    rstd: &[T],
    c: usize,
) -> (Vec<T>, Vec<T>) {
    let mut ggamma = crate::storage::pool::zeroed::<T>(c);
    let mut gbeta = crate::storage::pool::zeroed::<T>(c);
    ggamma
        .par_chunks_mut(COL_BLOCK)
        .zip(gbeta.par_chunks_mut(COL_BLOCK))
        .enumerate()
        .for_each(|(blk, (gg, gb))| {
            let j0 = blk * COL_BLOCK;
            let w = gg.len();
            let (mut pg, mut pb) = (vec![T::zero(); w], vec![T::zero(); w]);
            let (mut lg, mut lb) = (vec![[T::zero(); LANES]; w], vec![[T::zero(); LANES]; w]);
            for (k, (((x, gy), m), r)) in x
                .chunks(ROW_CHUNK * c)
                .zip(gy.chunks(ROW_CHUNK * c))
                .zip(mean.chunks(ROW_CHUNK))
                .zip(rstd.chunks(ROW_CHUNK))
                .enumerate()
            {
                pg.fill(T::zero());
                pb.fill(T::zero());
                for ((x, gy), (&m, &r)) in x
                    .chunks_exact(c)
                    .zip(gy.chunks_exact(c))
                    .zip(m.iter().zip(r))
                {
                    let (x, gy) = (&x[j0..j0 + w], &gy[j0..j0 + w]);
                    for ((pg, pb), (&x, &g)) in
                        pg.iter_mut().zip(pb.iter_mut()).zip(x.iter().zip(gy))
                    {
                        *pg += g * ((x - m) * r);
                        *pb += g;
                    }
                }
                for (lanes, p) in lg.iter_mut().zip(&pg) {
                    lanes[k % LANES] += *p;
                }
                for (lanes, p) in lb.iter_mut().zip(&pb) {
                    lanes[k % LANES] += *p;
                }
            }
            for ((g, lanes), (b, lanes_b)) in
                gg.iter_mut().zip(&mut lg).zip(gb.iter_mut().zip(&mut lb))
            {
                *g = combine_lanes(lanes);
                *b = combine_lanes(lanes_b);
            }
        });
    (ggamma, gbeta)
}
