//! CPU reference kernels for seeded dropout: the counter-based mask hash and the masked
//! scale, generic over the compute type. The mask is a pure function of `(seed, index, p)`
//! (see [`crate::ops::dropout_mask_value`] for the formula), so a GPU kernel regenerates it
//! exactly and the backward never stores it.

use crate::Real;
use crate::ops::elementwise::cpu::CHUNK;
use rayon::prelude::*;

/// The golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Stafford's mix13 finalizer).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 24 random bits of element `index`: the top 24 bits of
/// `mix64(mix64(seed) + (index + 1)·0x9E3779B97F4A7C15)` (wrapping), an integer in `0..2^24`.
pub(crate) fn bits24(seed: u64, index: u64) -> u32 {
    let z = mix64(seed).wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN));
    (mix64(z) >> 40) as u32
}

/// The integer keep threshold for `p ∈ [0, 1)`: `ceil(p·2^24)` (exact in f64), so that
/// `bits24 ≥ threshold ⇔ bits24·2^-24 ≥ p`.
pub(crate) fn threshold(p: f64) -> u32 {
    debug_assert!((0.0..1.0).contains(&p));
    (p * (1u64 << 24) as f64).ceil() as u32
}

/// `y[i] = x[i]·scale` where element `i` is kept, `0` where it is dropped, with
/// `scale = 1/(1 − p)` computed in f64 and rounded to the compute type. The same kernel is
/// the backward (applied to the output gradient). `p` must be in `[0, 1)`.
pub(crate) fn apply<T: Real>(x: &[T], p: f64, seed: u64) -> Vec<T> {
    let mut out = crate::storage::pool::zeroed::<T>(x.len());
    if p == 0.0 {
        // Every element is kept (bits24 ≥ 0) and the scale is exactly 1: skip the hash.
        out.copy_from_slice(x);
        return out;
    }
    let (th, scale) = (threshold(p), T::c(1.0 / (1.0 - p)));
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(k, (o, x))| {
            let base = (k * CHUNK) as u64;
            for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                if bits24(seed, base + j as u64) >= th {
                    *o = x * scale;
                }
            }
        });
    out
}
