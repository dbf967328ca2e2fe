//! CPU twin of `kernels/lora_reduce.cu`: the same chunks, the same f32 operations in the
//! same order. [`partials`] is bit-identical to the SIMT (f32) kernel's workspace, and
//! [`finish`] to the second pass given any workspace (the tensor-core kernels' included),
//! which the kernel tests check bit for bit.

use super::{Plan, TokenReduce};
use crate::ops::lora_matmul::Operand;
use crate::{Result, Tensor};

/// The big and the small operand of the canonical orientation, with their values as f32.
struct Sides<'a> {
    big: (&'a Operand<'a>, Vec<f32>),
    small: (&'a Operand<'a>, Vec<f32>),
}

fn sides<'a>(red: &'a TokenReduce<'a>, plan: &Plan) -> Result<Sides<'a>> {
    let (b, s) = if plan.swapped {
        (&red.r, &red.l)
    } else {
        (&red.l, &red.r)
    };
    Ok(Sides {
        big: (b, b.t.to_vec::<f32>()?),
        small: (s, s.t.to_vec::<f32>()?),
    })
}

/// Element `(t, i)` of an operand.
fn at(o: &Operand<'_>, v: &[f32], t: usize, i: usize) -> f32 {
    v[o.offset + t * o.row_stride + i * o.col_stride]
}

/// The workspace `[chunks, big, small]`: `P[c, i, j] = Σ_{t in chunk c} Big[t, i]·Small[t, j]`,
/// each an fma chain over the chunk's tokens in order, from `+0`.
pub(crate) fn partials(red: &TokenReduce<'_>, plan: &Plan) -> Result<Vec<f32>> {
    let s = sides(red, plan)?;
    let (bo, bv) = (s.big.0, &s.big.1);
    let (so, sv) = (s.small.0, &s.small.1);
    let plane = plan.big * plan.small;
    let mut ws = vec![0.0f32; plan.chunks * plane];
    for c in 0..plan.chunks {
        let t0 = c * plan.chunk;
        let t1 = (t0 + plan.chunk).min(red.t);
        for i in 0..plan.big {
            for j in 0..plan.small {
                let mut acc = 0.0f32;
                for t in t0..t1 {
                    acc = at(bo, bv, t, i).mul_add(at(so, sv, t, j), acc);
                }
                ws[c * plane + i * plan.small + j] = acc;
            }
        }
    }
    Ok(ws)
}

/// The second pass in f32, before rounding: `alpha·Σ_c P[c, i, j]` (chunks added in index
/// order from `+0`), or `fma(alpha, Σ, old)` with the old output `old` (`[m, n]`
/// row-major, as f32). Returns `[m, n]` row-major.
pub(crate) fn finish(ws: &[f32], plan: &Plan, alpha: f32, old: Option<&[f32]>) -> Vec<f32> {
    let plane = plan.big * plan.small;
    let mut out = vec![0.0f32; plane];
    for i in 0..plan.big {
        for j in 0..plan.small {
            let e = i * plan.small + j;
            let mut s = 0.0f32;
            for c in 0..plan.chunks {
                s += ws[c * plane + e];
            }
            let o = if plan.swapped { j * plan.big + i } else { e };
            out[o] = match old {
                Some(old) => alpha.mul_add(s, old[o]),
                None => alpha * s,
            };
        }
    }
    out
}

/// The whole reduction as the device computes it with the SIMT kernel: `[m, n]` f32 values
/// (the caller rounds them once into the output dtype).
pub(crate) fn reduce(
    red: &TokenReduce<'_>,
    plan: &Plan,
    accumulate: Option<&Tensor>,
) -> Result<Vec<f32>> {
    let ws = partials(red, plan)?;
    let old = accumulate.map(|c| c.to_vec::<f32>()).transpose()?;
    Ok(finish(&ws, plan, red.alpha as f32, old.as_deref()))
}
