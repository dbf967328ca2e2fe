//! CPU reference kernels for the token + position embedding, generic over the compute type.
//!
//! Tokens are validated by the caller (`< V`, `batch·seq` of them, `seq ≤ P`). Both
//! gradients are deterministic: each output element is summed in token order by one thread.

use crate::Real;
use crate::ops::elementwise::cpu::CHUNK;
use rayon::prelude::*;

/// Rows per rayon task for rows of `c` elements (about [`CHUNK`] elements per task).
fn rows_per_task(c: usize) -> usize {
    (CHUNK / c.max(1)).max(1)
}

/// `out[i] = wte[tokens[i]] + wpe[i mod seq]`, rows of `c` elements.
pub(crate) fn forward<T: Real>(
    tokens: &[u32],
    seq: usize,
    wte: &[T],
    wpe: &[T],
    c: usize,
) -> Vec<T> {
    let mut out = crate::storage::pool::zeroed::<T>(tokens.len() * c);
    let rpt = rows_per_task(c);
    out.par_chunks_mut(rpt * c)
        .enumerate()
        .for_each(|(k, out)| {
            for (r, o) in out.chunks_exact_mut(c).enumerate() {
                let i = k * rpt + r;
                let (tok, t) = (tokens[i] as usize, i % seq);
                let (e, p) = (&wte[tok * c..(tok + 1) * c], &wpe[t * c..(t + 1) * c]);
                for ((o, &e), &p) in o.iter_mut().zip(e).zip(p) {
                    *o = e + p;
                }
            }
        });
    out
}

/// The token-table gradient `gwte [v, c]`: `gwte[tok] = Σ_{i: tokens[i] = tok} gy[i]`,
/// each row summed in token order.
///
/// The token positions are stably sorted by token id, so a task owning a range of vocabulary
/// rows finds its tokens by binary search and adds them in their original order: the result
/// is bit-identical to a serial scatter-add over the tokens.
pub(crate) fn grad_wte<T: Real>(tokens: &[u32], gy: &[T], v: usize, c: usize) -> Vec<T> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| tokens[i]); // stable: equal tokens stay in token order
    let mut g = crate::storage::pool::zeroed::<T>(v * c);
    let rpt = rows_per_task(c);
    g.par_chunks_mut(rpt * c).enumerate().for_each(|(k, g)| {
        let v0 = k * rpt;
        let v1 = v0 + g.len() / c;
        let lo = order.partition_point(|&i| (tokens[i] as usize) < v0);
        let hi = order.partition_point(|&i| (tokens[i] as usize) < v1);
        for &i in &order[lo..hi] {
            let row = tokens[i] as usize - v0;
            for (g, &d) in g[row * c..(row + 1) * c]
                .iter_mut()
                .zip(&gy[i * c..(i + 1) * c])
            {
                *g += d;
            }
        }
    });
    g
}

/// The position-table gradient `gwpe [p, c]`: `gwpe[t] = Σ_b gy[b, t]` for `t < seq`
/// (summed over the batch in order), zero for the positions past `seq`.
pub(crate) fn grad_wpe<T: Real>(gy: &[T], batch: usize, seq: usize, p: usize, c: usize) -> Vec<T> {
    let mut g = crate::storage::pool::zeroed::<T>(p * c);
    let rpt = rows_per_task(c);
    g[..seq * c]
        .par_chunks_mut(rpt * c)
        .enumerate()
        .for_each(|(k, g)| {
            for (r, g) in g.chunks_exact_mut(c).enumerate() {
                let t = k * rpt + r;
                for b in 0..batch {
                    let i = b * seq + t;
                    for (g, &d) in g.iter_mut().zip(&gy[i * c..(i + 1) * c]) {
                        *g += d;
                    }
                }
            }
        });
    g
}
