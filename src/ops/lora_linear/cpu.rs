//! CPU reference of the fused LoRA linear (DESIGN §2), on slices.
//!
//! Shapes: `x [M, K]`, `W0 [N, K]`, per adapter `A [r, K]`, `B [n, r]` over output
//! columns `n0..n0+n`; `y [M, N]`. The LoRA term rides on the base product's output
//! buffer: each adapter adds `s·u·Bᵀ` into its column block with an accumulating GEMM, so
//! `y` is written by one GEMM and touched by one rank-`r` update per adapter, never by a
//! separate add pass.

use crate::device::cpu::{MatMut, MatRef, Par, gemm};
use crate::ops::profile::count_gemm;
use crate::{Real, Result};
use std::ops::Range;

/// One adapter's operands as slices.
pub(crate) struct Term<'a, T> {
    pub a: &'a [T],
    pub b: &'a [T],
    pub r: usize,
    pub scale: T,
    pub cols: Range<usize>,
}

/// Forward: `y = x·W0ᵀ (+ bias) + Σ s·u·Bᵀ` with `u = x_lora·Aᵀ`. Returns `y` and each `u`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<T: Real>(
    x: &[T],
    x_lora: &[T],
    w0: &[T],
    bias: Option<&[T]>,
    terms: &[Term<'_, T>],
    (m, k, n): (usize, usize, usize),
) -> Result<(Vec<T>, Vec<Vec<T>>)> {
    let mut y = crate::storage::pool::zeroed::<T>(m * n);
    if let Some(b) = bias {
        y.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(b));
    }
    count_gemm(m, n, k);
    gemm(
        MatMut::row_major(&mut y, m, n)?,
        bias.is_some(),
        MatRef::row_major(x, m, k)?,
        MatRef::row_major(w0, n, k)?.t(),
        T::one(),
        Par::Auto,
    )?;
    let mut us = Vec::with_capacity(terms.len());
    for t in terms {
        // u = x_lora·Aᵀ  [m, r]
        let mut u = crate::storage::pool::scratch::<T>(m * t.r);
        count_gemm(m, t.r, k);
        gemm(
            MatMut::row_major(&mut u, m, t.r)?,
            false,
            MatRef::row_major(x_lora, m, k)?,
            MatRef::row_major(t.a, t.r, k)?.t(),
            T::one(),
            Par::Auto,
        )?;
        // y[:, cols] += s·u·Bᵀ
        count_gemm(m, t.cols.len(), t.r);
        gemm(
            MatMut::columns(&mut y, m, n, t.cols.start, t.cols.end)?,
            true,
            MatRef::row_major(&u, m, t.r)?,
            MatRef::row_major(t.b, t.cols.len(), t.r)?.t(),
            t.scale,
            Par::Auto,
        )?;
        us.push(u);
    }
    Ok((y, us))
}

/// What the backward must produce.
pub(crate) struct Wants {
    pub gx: bool,
    pub gx_lora: bool,
    pub gw0: bool,
    pub ga: Vec<bool>,
    pub gb: Vec<bool>,
}

/// The backward's outputs; `None` where not wanted.
pub(crate) struct Grads<T> {
    pub gx: Option<Vec<T>>,
    pub gx_lora: Option<Vec<T>>,
    pub gw0: Option<Vec<T>>,
    pub ga: Vec<Option<Vec<T>>>,
    pub gb: Vec<Option<Vec<T>>>,
}

/// Backward of [`forward`], given `gy [M, N]`:
/// `v = gy[:, cols]·B`, `gx = gy·W0 + Σ s·v·A` (the LoRA part goes to `gx_lora` when the
/// LoRA path has its own input), `gB = s·gy[:, cols]ᵀ·u`, `gA = s·vᵀ·x_lora`, and
/// `gW0 = gyᵀ·x` only when `W0` trains.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Real>(
    gy: &[T],
    x: &[T],
    x_lora: &[T],
    shared_input: bool,
    w0: &[T],
    terms: &[Term<'_, T>],
    us: &[Vec<T>],
    want: &Wants,
    (m, k, n): (usize, usize, usize),
) -> Result<Grads<T>> {
    let gyv = MatRef::row_major(gy, m, n)?;
    let mut gx = if want.gx {
        let mut gx = crate::storage::pool::scratch::<T>(m * k);
        count_gemm(m, k, n);
        gemm(
            MatMut::row_major(&mut gx, m, k)?,
            false,
            gyv,
            MatRef::row_major(w0, n, k)?,
            T::one(),
            Par::Auto,
        )?;
        Some(gx)
    } else {
        None
    };
    let mut gx_lora = if want.gx_lora && !shared_input {
        Some(crate::storage::pool::zeroed::<T>(m * k))
    } else {
        None
    };
    let mut out = Grads {
        gx: None,
        gx_lora: None,
        gw0: None,
        ga: Vec::with_capacity(terms.len()),
        gb: Vec::with_capacity(terms.len()),
    };
    for (i, t) in terms.iter().enumerate() {
        let gy_cols = MatRef::strided(&gy[t.cols.start..], m, t.cols.len(), n, 1)?;
        let lora_input_grad = if shared_input {
            gx.as_mut()
        } else {
            gx_lora.as_mut()
        };
        let need_v = want.ga[i] || lora_input_grad.is_some();
        let v = if need_v {
            // v = gy[:, cols]·B  [m, r]
            let mut v = crate::storage::pool::scratch::<T>(m * t.r);
            count_gemm(m, t.r, t.cols.len());
            gemm(
                MatMut::row_major(&mut v, m, t.r)?,
                false,
                gy_cols,
                MatRef::row_major(t.b, t.cols.len(), t.r)?,
                T::one(),
                Par::Auto,
            )?;
            Some(v)
        } else {
            None
        };
        if let (Some(g), Some(v)) = (lora_input_grad, &v) {
            // g += s·v·A  [m, k]
            count_gemm(m, k, t.r);
            gemm(
                MatMut::row_major(g, m, k)?,
                true,
                MatRef::row_major(v, m, t.r)?,
                MatRef::row_major(t.a, t.r, k)?,
                t.scale,
                Par::Auto,
            )?;
        }
        out.gb.push(if want.gb[i] {
            // gB = s·gy[:, cols]ᵀ·u  [n_i, r]
            let mut gb = crate::storage::pool::scratch::<T>(t.cols.len() * t.r);
            count_gemm(t.cols.len(), t.r, m);
            gemm(
                MatMut::row_major(&mut gb, t.cols.len(), t.r)?,
                false,
                gy_cols.t(),
                MatRef::row_major(&us[i], m, t.r)?,
                t.scale,
                Par::Auto,
            )?;
            Some(gb)
        } else {
            None
        });
        out.ga.push(match (&v, want.ga[i]) {
            (Some(v), true) => {
                // gA = s·vᵀ·x_lora  [r, k]
                let mut ga = crate::storage::pool::scratch::<T>(t.r * k);
                count_gemm(t.r, k, m);
                gemm(
                    MatMut::row_major(&mut ga, t.r, k)?,
                    false,
                    MatRef::row_major(v, m, t.r)?.t(),
                    MatRef::row_major(x_lora, m, k)?,
                    t.scale,
                    Par::Auto,
                )?;
                Some(ga)
            }
            _ => None,
        });
        if let Some(v) = v {
            crate::storage::pool::recycle(v);
        }
    }
    if want.gw0 {
        // Only for a trainable W0 (full fine-tuning with an adapter attached).
        let mut gw0 = crate::storage::pool::scratch::<T>(n * k);
        count_gemm(n, k, m);
        gemm(
            MatMut::row_major(&mut gw0, n, k)?,
            false,
            gyv.t(),
            MatRef::row_major(x, m, k)?,
            T::one(),
            Par::Auto,
        )?;
        out.gw0 = Some(gw0);
    }
    out.gx = gx;
    out.gx_lora = gx_lora;
    Ok(out)
}
