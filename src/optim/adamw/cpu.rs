//! The CPU reference of the AdamW update: the gradient norm and the per-tensor updates on
//! host slices (rayon over chunks of [`CHUNK`] elements).

use super::{StepConstants, adamw_element};
use crate::optim::rounding::{HalfFloat, stream_bits};
use crate::{Element, Real};
use rayon::prelude::*;

/// Elements per rayon task (the same granularity as the elementwise ops). It also fixes
/// the summation order of the gradient norm, so the norm does not depend on the number
/// of threads.
pub(crate) const CHUNK: usize = 1 << 15;

/// Widens a gradient element to the compute type. Exact for the accepted pairs (a
/// 16-bit or f32 gradient into f32, an f64 gradient into f64).
#[inline]
fn widen<G: Element, T: Real>(g: G) -> T {
    T::c(g.to_f64())
}

/// Sum of squares of `g · scale_inv` in f64, in [`CHUNK`]s summed left to right and
/// added in chunk order, and whether every element of `g` is finite.
pub(crate) fn sum_squares<G: Element>(g: &[G], scale_inv: f64) -> (f64, bool) {
    let parts: Vec<(f64, bool)> = g
        .par_chunks(CHUNK)
        .map(|c| {
            let (mut s, mut finite) = (0.0f64, true);
            for &x in c {
                let x = x.to_f64();
                finite &= x.is_finite();
                let y = x * scale_inv;
                s += y * y;
            }
            (s, finite)
        })
        .collect();
    parts
        .iter()
        .fold((0.0, true), |(s, f), &(ps, pf)| (s + ps, f && pf))
}

/// f32/f64 parameters: the update is written straight into the parameter.
pub(crate) fn update_plain<T: Real, G: Element>(
    p: &mut [T],
    m: &mut [T],
    v: &mut [T],
    g: &[G],
    k: &StepConstants<T>,
) {
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                *p = adamw_element(*p, m, v, widen(g), k);
            }
        });
}

/// bf16/f16 parameters: the update goes into the f32 master, which is then rounded into
/// the parameter (stochastically with the stream `key` when given).
pub(crate) fn update_half<H: HalfFloat, G: Element>(
    p: &mut [H],
    master: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[G],
    k: &StepConstants<f32>,
    key: Option<u64>,
) {
    p.par_chunks_mut(CHUNK)
        .zip(master.par_chunks_mut(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, ((((p, w), m), v), g))| {
            let base = c * CHUNK;
            for (j, ((((p, w), m), v), &g)) in p.iter_mut().zip(w).zip(m).zip(v).zip(g).enumerate()
            {
                *w = adamw_element(*w, m, v, widen(g), k);
                *p = match key {
                    None => H::round_ne(*w),
                    Some(key) => H::round_sr(*w, stream_bits(key, (base + j) as u64)),
                };
            }
        });
}
