//! CPU twin of `kernels/lora_matmul.cu`: the same strided contract, computed in f64 with
//! plain loops. It is the reference the kernel tests compare against, not a fast path
//! (the LoRA linear's CPU path uses the GEMM engine in `device::cpu`).

use super::{Gemm, Operand};
use crate::{Result, Tensor};

/// The values of an operand's tensor, widened to f64.
fn values(o: &Operand<'_>) -> Result<Vec<f64>> {
    o.t.to_vec_f64()
}

/// `alpha·(A·B + A2·B2) (+ bias) (+ c)` as f64 values, row-major `[m, n]`.
pub(crate) fn gemm(g: &Gemm<'_>, accumulate: Option<&Tensor>) -> Result<Vec<f64>> {
    let (a, b) = (values(&g.a)?, values(&g.b)?);
    let ext = match &g.ext {
        Some(e) => Some((e, values(&e.a2)?, values(&e.b2)?)),
        None => None,
    };
    let bias = g.bias.map(|t| t.to_vec_f64()).transpose()?;
    let mut c = match accumulate {
        Some(t) => t.to_vec_f64()?,
        None => vec![0.0; g.m * g.n],
    };
    for i in 0..g.m {
        for j in 0..g.n {
            let mut acc = 0.0f64;
            for p in 0..g.k {
                acc += a[g.a.offset + i * g.a.row_stride + p * g.a.col_stride]
                    * b[g.b.offset + p * g.b.row_stride + j * g.b.col_stride];
            }
            if let Some((e, a2, b2)) = &ext
                && e.cols.contains(&j)
            {
                let jj = j - e.cols.start;
                for q in 0..e.k2 {
                    acc += a2[e.a2.offset + i * e.a2.row_stride + q * e.a2.col_stride]
                        * b2[e.b2.offset + q * e.b2.row_stride + jj * e.b2.col_stride];
                }
            }
            let mut v = g.alpha * acc;
            if let Some(bias) = &bias {
                v += bias[j];
            }
            c[i * g.n + j] += v;
        }
    }
    Ok(c)
}
