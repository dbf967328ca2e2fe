//! CPU reference kernel of cached (decoding) attention, generic over the caches' storage
//! type `S` and the compute type `T` (f32 for f32/bf16/f16, f64 for f64).
//!
//! First the new positions' keys and values are copied into the caches (exactly: a value
//! widened from `S` goes back to `S` unchanged); then each (batch, head) pair, one rayon
//! task each, widens its `L + N` cached rows to `T` and runs two GEMMs on the calling
//! thread: the scores `S = scale·q·Kᵀ [N, L + N]`, a causal softmax per row (row `i` keeps
//! the keys `0..=L + i`, with max-subtraction), and `y = P·V`. Every output element is
//! written by one task in a fixed order: results are bit-identical run to run.

use crate::device::cpu::{MatMut, MatRef, Par, gemm, vectorized};
use crate::ops::profile::count_gemm;
use crate::storage::{convert, pool};
use crate::{Element, Error, Real, Result};
use rayon::prelude::*;

/// The shape of one call: `qkv [b, n, 3c]` with `h` heads of `c / h` columns, appended at
/// position `pos` of caches `[b, h, max_len, c / h]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    /// Batch.
    pub b: usize,
    /// New positions per sequence.
    pub n: usize,
    /// Model width `C`.
    pub c: usize,
    /// Heads.
    pub h: usize,
    /// The caches' length before the call (`L`): the new rows land at `pos..pos + n`.
    pub pos: usize,
    /// The caches' capacity (`Lmax`).
    pub max_len: usize,
}

impl Dims {
    /// The head dim `C / H`.
    pub(crate) fn hd(&self) -> usize {
        self.c / self.h
    }
}

/// Writes the new keys and values of `qkv` into rows `pos..pos + n` of the caches, then
/// returns `y [b, n, c]`: row `i` attends to the cached keys `0..=pos + i`.
pub(crate) fn forward<S: Element, T: Real>(
    qkv: &[T],
    k_cache: &mut [S],
    v_cache: &mut [S],
    d: Dims,
) -> Result<Vec<T>> {
    let (hd, keys, ld) = (d.hd(), d.pos + d.n, 3 * d.c);
    let need = d.b * d.h * d.max_len * hd;
    if qkv.len() != d.b * d.n * ld || k_cache.len() != need || v_cache.len() != need {
        return Err(Error::shape(
            "decode_attention",
            format!(
                "buffers of {}, {} and {} elements for {d:?}",
                qkv.len(),
                k_cache.len(),
                v_cache.len()
            ),
        ));
    }
    if d.b == 0 || d.n == 0 {
        return Ok(Vec::new());
    }
    // Append: cache row pos + i of (b, h) ← row i of head h's keys / values.
    let to_s = |x: T| S::from_f64(x.to_f64());
    for (cache, which) in [(&mut *k_cache, 1), (&mut *v_cache, 2)] {
        for (bh, rows) in cache.chunks_exact_mut(d.max_len * hd).enumerate() {
            let (bi, hi) = (bh / d.h, bh % d.h);
            for i in 0..d.n {
                let src = (bi * d.n + i) * ld + which * d.c + hi * hd;
                let dst = &mut rows[(d.pos + i) * hd..(d.pos + i + 1) * hd];
                for (o, &x) in dst.iter_mut().zip(&qkv[src..src + hd]) {
                    *o = to_s(x);
                }
            }
        }
    }
    for _ in 0..d.b * d.h {
        count_gemm(d.n, keys, hd); // S = q·Kᵀ
        count_gemm(d.n, hd, keys); // y = P·V
    }
    let (k_cache, v_cache) = (&*k_cache, &*v_cache);
    let mut yh = pool::zeroed::<T>(d.b * d.h * d.n * hd);
    yh.par_chunks_mut(d.n * hd)
        .enumerate()
        .try_for_each(|(bh, yh)| {
            let rows = bh * d.max_len * hd..(bh * d.max_len + keys) * hd;
            let k: Vec<T> = convert(&k_cache[rows.clone()]);
            let v: Vec<T> = convert(&v_cache[rows]);
            vectorized(
                #[inline(always)]
                || head_forward(qkv, &k, &v, d, bh, yh),
            )
        })?;
    let mut y = pool::scratch::<T>(d.b * d.n * d.c);
    y.par_chunks_mut(d.c).enumerate().for_each(|(bn, row)| {
        let (bi, i) = (bn / d.n, bn % d.n);
        for (hi, dst) in row.chunks_exact_mut(hd).enumerate() {
            let src = ((bi * d.h + hi) * d.n + i) * hd;
            dst.copy_from_slice(&yh[src..src + hd]);
        }
    });
    pool::recycle(yh);
    Ok(y)
}

/// One (batch, head) pair: `y_h [n, hd] = softmax_causal(scale·q·kᵀ)·v` with `k`, `v`
/// its `pos + n` cached rows.
#[inline(always)]
fn head_forward<T: Real>(
    qkv: &[T],
    k: &[T],
    v: &[T],
    d: Dims,
    bh: usize,
    yh: &mut [T],
) -> Result<()> {
    let (hd, keys, ld) = (d.hd(), d.pos + d.n, 3 * d.c);
    let (bi, hi) = (bh / d.h, bh % d.h);
    let scale = T::c(1.0 / (hd as f64).sqrt());
    let q = MatRef::strided(&qkv[bi * d.n * ld + hi * hd..], d.n, hd, ld, 1)?;
    let mut p = pool::scratch::<T>(d.n * keys);
    gemm(
        MatMut::row_major(&mut p, d.n, keys)?,
        false,
        q,
        MatRef::row_major(k, keys, hd)?.t(),
        scale,
        Par::Seq,
    )?;
    for (i, row) in p.chunks_exact_mut(keys).enumerate() {
        let (live, masked) = row.split_at_mut(d.pos + i + 1);
        masked.fill(T::zero());
        let m = crate::math::max(live);
        live.iter_mut().for_each(|s| *s = (*s - m).exp_fast());
        let inv = T::one() / crate::math::sum(live);
        live.iter_mut().for_each(|s| *s *= inv);
    }
    gemm(
        MatMut::row_major(yh, d.n, hd)?,
        false,
        MatRef::row_major(&p, d.n, keys)?,
        MatRef::row_major(v, keys, hd)?,
        T::one(),
        Par::Seq,
    )?;
    pool::recycle(p);
    Ok(())
}
