//! The LoRA linear on the CUDA backend and the simulator: every product is one launch of
//! the fused GEMM of `kernels/lora_matmul.cu` (see [`crate::ops::lora_matmul`]), but for
//! `gA`, `gB` (below).
//!
//! ```text
//! forward   suᵢ = sᵢ·x_lora·Aᵢᵀ                                    [M, r]  (saved)
//!           y   = [x | su₀]·[W0 | B₀]ᵀ + b       (first adapter fused into the base GEMM)
//!           y  += suᵢ·Bᵢᵀ over colsᵢ              (each further adapter, accumulated)
//! backward  svᵢ = sᵢ·gy[:, colsᵢ]·Bᵢ                                [M, r]
//!           gx  = [gy | sv₀]·[W0 ; A₀] (+= svᵢ·Aᵢ)    (the LoRA part to gx_lora when
//!                                                       the adapters have their own input)
//!           gBᵢ = gy[:, colsᵢ]ᵀ·suᵢ,  gAᵢ = svᵢᵀ·x_lora,  gW0 = gyᵀ·x (only if tracked)
//! ```
//!
//! `gA` and `gB` reduce over the M tokens into a small output: they run split-K
//! ([`crate::ops::lora_reduce`]: token chunks, a fixed-order second pass) for ranks ≤ 64,
//! and as the GEMM above beyond.
//!
//! The scale is folded into the saved `su` and into `sv`, so every fused product runs with
//! `alpha = 1` and the rank-`r` extension rides on the base GEMM's reduction.

use super::SavedTerm;
use crate::ops::lora_matmul::{Extension, Gemm, Operand};
use crate::ops::lora_reduce::TokenReduce;
use crate::{Result, Tensor};

/// Forward on a device: `y [.., N]` and each adapter's `s·u`.
pub(super) fn forward(
    x: &Tensor,
    x_lora: &Tensor,
    w0: &Tensor,
    bias: Option<&Tensor>,
    terms: &[SavedTerm],
    (m, k, n): (usize, usize, usize),
    out_dims: &[usize],
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut sus = Vec::with_capacity(terms.len());
    for t in terms {
        // su = s·x_lora·Aᵀ: B(p, j) = A[j, p].
        let su = Gemm::new(
            m,
            t.r,
            k,
            Operand::rows(x_lora, k),
            Operand::transposed(&t.a, k),
        )
        .alpha(t.scale)
        .run([m, t.r])?;
        sus.push(su);
    }
    let base = Gemm::new(m, n, k, Operand::rows(x, k), Operand::transposed(w0, k)).bias(bias);
    let ext = |i: usize| Extension {
        a2: Operand::rows(&sus[i], terms[i].r),
        // B2(q, j) = B[j − n0, q]
        b2: Operand::transposed(&terms[i].b, terms[i].r),
        k2: terms[i].r,
        cols: terms[i].cols.clone(),
    };
    let y = match terms.first() {
        Some(_) => base.ext(ext(0)).run(out_dims.to_vec())?,
        None => base.run(out_dims.to_vec())?,
    };
    for i in 1..terms.len() {
        Gemm::new(m, n, 0, Operand::rows(x, k), Operand::transposed(w0, k))
            .ext(ext(i))
            .accumulate_into(&y)?;
    }
    Ok((y, sus))
}

/// The gradients the backward produces on a device (`None` where not wanted).
pub(super) struct DeviceGrads {
    pub gx: Option<Tensor>,
    pub gx_lora: Option<Tensor>,
    pub gw0: Option<Tensor>,
    pub ga: Vec<Option<Tensor>>,
    pub gb: Vec<Option<Tensor>>,
}

/// Backward on a device, given `gy [M, N]` and the saved `s·u` of each adapter.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    gy: &Tensor,
    x: &Tensor,
    x_lora: Option<&Tensor>,
    w0: &Tensor,
    terms: &[SavedTerm],
    sus: &[Tensor],
    (m, k, n): (usize, usize, usize),
) -> Result<DeviceGrads> {
    let shared = x_lora.is_none();
    let xl = x_lora.unwrap_or(x);
    let want_gx = x.requires_grad();
    let want_gx_lora = x_lora.is_some_and(|t| t.requires_grad());
    let lora_input_grad = if shared { want_gx } else { want_gx_lora };
    // sv = s·gy[:, cols]·B  [m, r]
    let mut svs = Vec::with_capacity(terms.len());
    for t in terms {
        let need = t.a.requires_grad() || lora_input_grad;
        svs.push(if need {
            let gy_cols = Operand::rows(gy, n).at(t.cols.start);
            Some(
                Gemm::new(m, t.r, t.cols.len(), gy_cols, Operand::rows(&t.b, t.r))
                    .alpha(t.scale)
                    .run([m, t.r])?,
            )
        } else {
            None
        });
    }
    // The LoRA part of the input gradient: Σ svᵢ·Aᵢ, as extensions of the reduction.
    let ext = |i: usize| -> Option<Extension<'_>> {
        svs[i].as_ref().map(|sv| Extension {
            a2: Operand::rows(sv, terms[i].r),
            b2: Operand::rows(&terms[i].a, k),
            k2: terms[i].r,
            cols: 0..k,
        })
    };
    let lora_only = |i: usize| {
        Gemm::new(m, k, 0, Operand::rows(gy, n), Operand::rows(w0, k))
            .ext(ext(i).expect("sv computed"))
    };
    let gx = if want_gx {
        let base = Gemm::new(m, k, n, Operand::rows(gy, n), Operand::rows(w0, k));
        let gx = match (shared, terms.first()) {
            (true, Some(_)) => base
                .ext(ext(0).expect("sv computed"))
                .run(x.dims().to_vec())?,
            _ => base.run(x.dims().to_vec())?,
        };
        if shared {
            for i in 1..terms.len() {
                lora_only(i).accumulate_into(&gx)?;
            }
        }
        Some(gx)
    } else {
        None
    };
    let gx_lora = if !shared && want_gx_lora {
        let g = match terms.first() {
            Some(_) => lora_only(0).run(xl.dims().to_vec())?,
            None => Tensor::zeros(xl.shape().clone(), xl.dtype(), &xl.device())?,
        };
        for i in 1..terms.len() {
            lora_only(i).accumulate_into(&g)?;
        }
        Some(g)
    } else {
        None
    };
    let mut ga = Vec::with_capacity(terms.len());
    let mut gb = Vec::with_capacity(terms.len());
    for (i, t) in terms.iter().enumerate() {
        // gB = gy[:, cols]ᵀ·su  [n_i, r]: A(i, p) = gy[p, n0 + i]
        // Split-K over the tokens (`lora_reduce`) when a side is ≤ 64, else the GEMM.
        gb.push(if t.b.requires_grad() {
            let w = t.cols.len();
            let split = TokenReduce::new(
                w,
                t.r,
                m,
                Operand::rows(gy, n).at(t.cols.start),
                Operand::rows(&sus[i], t.r),
            );
            Some(if split.plan().is_ok() {
                split.run([w, t.r])?
            } else {
                let gy_t = Operand::transposed(gy, n).at(t.cols.start);
                Gemm::new(w, t.r, m, gy_t, Operand::rows(&sus[i], t.r)).run([w, t.r])?
            })
        } else {
            None
        });
        // gA = svᵀ·x_lora  [r, k]
        ga.push(match (&svs[i], t.a.requires_grad()) {
            (Some(sv), true) => {
                let split =
                    TokenReduce::new(t.r, k, m, Operand::rows(sv, t.r), Operand::rows(xl, k));
                Some(if split.plan().is_ok() {
                    split.run([t.r, k])?
                } else {
                    Gemm::new(
                        t.r,
                        k,
                        m,
                        Operand::transposed(sv, t.r),
                        Operand::rows(xl, k),
                    )
                    .run([t.r, k])?
                })
            }
            _ => None,
        });
    }
    let gw0 = if w0.requires_grad() {
        // Only for a trainable W0 (full fine-tuning with an adapter attached).
        Some(Gemm::new(n, k, m, Operand::transposed(gy, n), Operand::rows(x, k)).run([n, k])?)
    } else {
        None
    };
    Ok(DeviceGrads {
        gx,
        gx_lora,
        gw0,
        ga,
        gb,
    })
}
