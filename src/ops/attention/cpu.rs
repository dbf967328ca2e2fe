//! CPU reference kernels for causal multi-head attention, generic over the compute type.
//!
//! Work is split over the `B·H` (batch, head) pairs with rayon; inside a pair every GEMM
//! runs on the calling thread (`Par::Seq`) on strided views straight into the fused
//! `qkv [B, T, 3C]` buffer (row stride `3C`), so q, k and v are never copied. Each pair
//! writes its own head-major scratch, which a second parallel pass scatters into the
//! `[B, T, C]` (or `[B, T, 3C]`) layout: every output element is written by one task, in a
//! fixed order, so results are bit-identical run to run.
//!
//! Causality is exploited by blocking the rows in blocks of [`BLOCK`]: the rows `r0..r1`
//! of a block only need the key/value positions `0..r1`, so the score GEMMs cover the
//! lower block-triangle (≈ `(nb+1)/2nb` of the full products for `nb` blocks) and the
//! exponentials run only on the unmasked entries `j ≤ i`.

use crate::device::cpu::{MatMut, MatRef, Par, gemm, vectorized};
use crate::ops::profile::count_gemm;
use crate::{Error, Real, Result};
use rayon::prelude::*;

/// Rows per causal block (measured on 2 cores for `T = 128, hd = 64`: see the ignored
/// timing test `attention_timing`).
pub(crate) const BLOCK: usize = 32;

/// The shape of one attention call: `qkv [b, t, 3c]` with `h` heads of `c / h` columns.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    /// Batch.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
    /// Model width `C` (the output's last dimension).
    pub c: usize,
    /// Heads.
    pub h: usize,
}

impl Dims {
    fn hd(&self) -> usize {
        self.c / self.h
    }
}

/// The row blocks `(r0, r1)` covering `0..t`.
fn blocks(t: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(block)
        .map(move |r0| (r0, (r0 + block).min(t)))
}

/// `rows × cols` view into `buf` starting at `off`, row stride `rs`.
fn view<T>(buf: &[T], off: usize, rows: usize, cols: usize, rs: usize) -> Result<MatRef<'_, T>> {
    let data = buf
        .get(off..)
        .ok_or_else(|| Error::shape("causal_attention", "view offset past the buffer"))?;
    MatRef::strided(data, rows, cols, rs, 1)
}

/// Writable `rows × cols` view into `buf` starting at `off`, row stride `rs`.
fn view_mut<T>(
    buf: &mut [T],
    off: usize,
    rows: usize,
    cols: usize,
    rs: usize,
) -> Result<MatMut<'_, T>> {
    let data = buf
        .get_mut(off..)
        .ok_or_else(|| Error::shape("causal_attention", "view offset past the buffer"))?;
    MatMut::strided(data, rows, cols, rs, 1)
}

/// Strided views of head `hi` of batch `bi` in `qkv` (`which`: 0 = q, 1 = k, 2 = v), rows
/// `r0..r0+rows`.
fn qkv_view<T>(
    qkv: &[T],
    d: Dims,
    bi: usize,
    hi: usize,
    which: usize,
    r0: usize,
    rows: usize,
) -> Result<MatRef<'_, T>> {
    let ld = 3 * d.c;
    view(
        qkv,
        bi * d.t * ld + r0 * ld + which * d.c + hi * d.hd(),
        rows,
        d.hd(),
        ld,
    )
}

/// Counts the GEMMs of [`forward`] (2 per row block per head) on the calling thread.
fn count_forward(d: Dims, block: usize) {
    let hd = d.hd();
    for _ in 0..d.b * d.h {
        for (r0, r1) in blocks(d.t, block) {
            count_gemm(r1 - r0, r1, hd); // S = q·kᵀ
            count_gemm(r1 - r0, hd, r1); // y = P·v
        }
    }
}

/// Counts the GEMMs of [`backward`] (4 per row block per head) on the calling thread.
fn count_backward(d: Dims, block: usize) {
    let hd = d.hd();
    for _ in 0..d.b * d.h {
        for (r0, r1) in blocks(d.t, block) {
            count_gemm(r1 - r0, r1, hd); // dP = gy·vᵀ
            count_gemm(r1 - r0, hd, r1); // dq = dS·k
            count_gemm(r1 - r0, hd, d.t - r0); // dv = Pᵀ·gy
            count_gemm(r1 - r0, hd, d.t - r0); // dk = dSᵀ·q
        }
    }
}

/// Forward: returns `y [B, T, C]` and the softmax probabilities `P [B, H, T, T]` (zero
/// above the diagonal), which the backward reuses.
pub(crate) fn forward<T: Real>(qkv: &[T], d: Dims, block: usize) -> Result<(Vec<T>, Vec<T>)> {
    let (t, hd) = (d.t, d.hd());
    if d.b == 0 || t == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    count_forward(d, block);
    let mut p = crate::storage::pool::zeroed::<T>(d.b * d.h * t * t);
    let mut yh = crate::storage::pool::zeroed::<T>(d.b * d.h * t * hd);
    p.par_chunks_mut(t * t)
        .zip(yh.par_chunks_mut(t * hd))
        .enumerate()
        .try_for_each(|(bh, (p, yh))| {
            vectorized(
                #[inline(always)]
                || head_forward(qkv, d, bh, p, yh, block),
            )
        })?;
    let mut y = crate::storage::pool::scratch::<T>(d.b * t * d.c);
    y.par_chunks_mut(d.c)
        .enumerate()
        .with_min_len(16)
        .for_each(|(bt, row)| {
            let (bi, ti) = (bt / t, bt % t);
            for (hi, dst) in row.chunks_exact_mut(hd).enumerate() {
                let src = ((bi * d.h + hi) * t + ti) * hd;
                dst.copy_from_slice(&yh[src..src + hd]);
            }
        });
    crate::storage::pool::recycle(yh);
    Ok((y, p))
}

/// One (batch, head) pair: `P = softmax_causal(q·kᵀ/√hd)` into `p [T, T]`, `P·v` into `yh [T, hd]`.
#[inline(always)]
fn head_forward<T: Real>(
    qkv: &[T],
    d: Dims,
    bh: usize,
    p: &mut [T],
    yh: &mut [T],
    block: usize,
) -> Result<()> {
    let (t, hd) = (d.t, d.hd());
    let (bi, hi) = (bh / d.h, bh % d.h);
    let scale = T::c(1.0 / (hd as f64).sqrt());
    for (r0, r1) in blocks(t, block) {
        let rows = r1 - r0;
        // S[r0..r1, 0..r1] = scale · q[r0..r1] · k[0..r1]ᵀ
        let q = qkv_view(qkv, d, bi, hi, 0, r0, rows)?;
        let k = qkv_view(qkv, d, bi, hi, 1, 0, r1)?;
        gemm(
            view_mut(p, r0 * t, rows, r1, t)?,
            false,
            q,
            k.t(),
            scale,
            Par::Seq,
        )?;
        for i in r0..r1 {
            let row = &mut p[i * t..i * t + r1];
            let (live, masked) = row.split_at_mut(i + 1);
            masked.fill(T::zero());
            // Max, exp, sum and scale as separate passes: each one vectorises (the sum
            // and max keep 16 fixed partials, so the order, and the result, is fixed).
            let m = crate::math::max(live);
            live.iter_mut().for_each(|s| *s = (*s - m).exp_fast());
            let inv = T::one() / crate::math::sum(live);
            live.iter_mut().for_each(|s| *s *= inv);
        }
        // y[r0..r1] = P[r0..r1, 0..r1] · v[0..r1]
        let v = qkv_view(qkv, d, bi, hi, 2, 0, r1)?;
        gemm(
            view_mut(yh, r0 * hd, rows, hd, hd)?,
            false,
            view(p, r0 * t, rows, r1, t)?,
            v,
            T::one(),
            Par::Seq,
        )?;
    }
    Ok(())
}

/// Backward: the gradient `gqkv [B, T, 3C]` from `gy [B, T, C]`, the forward's `qkv` and
/// its probabilities `p [B, H, T, T]`.
pub(crate) fn backward<T: Real>(
    qkv: &[T],
    p: &[T],
    gy: &[T],
    d: Dims,
    block: usize,
) -> Result<Vec<T>> {
    let (t, hd) = (d.t, d.hd());
    if d.b == 0 || t == 0 {
        return Ok(Vec::new());
    }
    count_backward(d, block);
    // Per (b, h): [dq | dk | dv], each [T, hd] row-major.
    let mut gh = crate::storage::pool::zeroed::<T>(d.b * d.h * 3 * t * hd);
    // One [T, T] scratch per (b, h), from the pool (not per rayon split), so a
    // steady-state step allocates nothing.
    let mut ds_all = crate::storage::pool::zeroed::<T>(d.b * d.h * t * t);
    gh.par_chunks_mut(3 * t * hd)
        .zip(p.par_chunks(t * t))
        .zip(ds_all.par_chunks_mut(t * t))
        .enumerate()
        .try_for_each(|(bh, ((g, p), ds))| {
            vectorized(
                #[inline(always)]
                || head_backward(qkv, p, gy, d, bh, g, ds, block),
            )
        })?;
    crate::storage::pool::recycle(ds_all);
    let ld = 3 * d.c;
    let mut gqkv = crate::storage::pool::scratch::<T>(d.b * t * ld);
    gqkv.par_chunks_mut(ld)
        .enumerate()
        .with_min_len(16)
        .for_each(|(bt, row)| {
            let (bi, ti) = (bt / t, bt % t);
            for (sh, dst) in row.chunks_exact_mut(hd).enumerate() {
                let (s, hi) = (sh / d.h, sh % d.h);
                let src = (((bi * d.h + hi) * 3 + s) * t + ti) * hd;
                dst.copy_from_slice(&gh[src..src + hd]);
            }
        });
    crate::storage::pool::recycle(gh);
    Ok(gqkv)
}

/// One (batch, head) pair. `g` receives `[dq | dk | dv]`; `ds` is a `[T, T]` scratch that
/// holds dP, then dS (only its lower block-triangle is written and read).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn head_backward<T: Real>(
    qkv: &[T],
    p: &[T],
    gy: &[T],
    d: Dims,
    bh: usize,
    g: &mut [T],
    ds: &mut [T],
    block: usize,
) -> Result<()> {
    let (t, hd, c) = (d.t, d.hd(), d.c);
    let (bi, hi) = (bh / d.h, bh % d.h);
    let scale = T::c(1.0 / (hd as f64).sqrt());
    let gy_view = |r0: usize, rows: usize| view(gy, bi * t * c + r0 * c + hi * hd, rows, hd, c);
    let (dq, rest) = g.split_at_mut(t * hd);
    let (dk, dv) = rest.split_at_mut(t * hd);
    for (r0, r1) in blocks(t, block) {
        let rows = r1 - r0;
        // dP[r0..r1, 0..r1] = gy[r0..r1] · v[0..r1]ᵀ
        let v = qkv_view(qkv, d, bi, hi, 2, 0, r1)?;
        gemm(
            view_mut(ds, r0 * t, rows, r1, t)?,
            false,
            gy_view(r0, rows)?,
            v.t(),
            T::one(),
            Par::Seq,
        )?;
        // dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)), zero above the diagonal
        for i in r0..r1 {
            let row = &mut ds[i * t..i * t + r1];
            let prow = &p[i * t..i * t + i + 1];
            let (live, masked) = row.split_at_mut(i + 1);
            masked.fill(T::zero());
            let dot = crate::math::dot(live, prow);
            for (s, &pp) in live.iter_mut().zip(prow) {
                *s = scale * pp * (*s - dot);
            }
        }
        // dq[r0..r1] = dS[r0..r1, 0..r1] · k[0..r1]
        let k = qkv_view(qkv, d, bi, hi, 1, 0, r1)?;
        gemm(
            view_mut(dq, r0 * hd, rows, hd, hd)?,
            false,
            view(ds, r0 * t, rows, r1, t)?,
            k,
            T::one(),
            Par::Seq,
        )?;
    }
    // Column blocks c0..c1 (the same partition): only rows c0..T have entries there.
    for (c0, c1) in blocks(t, block) {
        let cols = c1 - c0;
        // dv[c0..c1] = P[c0..T, c0..c1]ᵀ · gy[c0..T]
        let pt = view(p, c0 * t + c0, t - c0, cols, t)?.t();
        gemm(
            view_mut(dv, c0 * hd, cols, hd, hd)?,
            false,
            pt,
            gy_view(c0, t - c0)?,
            T::one(),
            Par::Seq,
        )?;
        // dk[c0..c1] = dS[c0..T, c0..c1]ᵀ · q[c0..T]
        let dst = view(ds, c0 * t + c0, t - c0, cols, t)?.t();
        let q = qkv_view(qkv, d, bi, hi, 0, c0, t - c0)?;
        gemm(
            view_mut(dk, c0 * hd, cols, hd, hd)?,
            false,
            dst,
            q,
            T::one(),
            Par::Seq,
        )?;
    }
    Ok(())
}
