//! Rounding the fp32 master weights into bf16/f16 parameters.
//!
//! [`Rounding::NearestEven`] is the ordinary IEEE rounding (`__float2bfloat16_rn`,
//! `__float2half_rn` on the GPU). [`Rounding::Stochastic`] rounds a value `x` that lies
//! between two neighbours `lo < |x| < hi` of the 16-bit type to `hi` with probability
//! `(|x| − lo)/(hi − lo)`, so the rounding is unbiased on average and updates smaller
//! than half an ulp are not lost systematically.
//!
//! # The stochastic formula (what a GPU kernel reproduces)
//!
//! Random bits are counter based: a pure function of `(seed, step, param_index,
//! element_index)`, with no state, so any thread can compute its own.
//!
//! ```text
//! mix64(z):  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9      (wrapping u64 arithmetic,
//!            z = (z ^ (z >> 27)) * 0x94D049BB133111EB       the splitmix64 finaliser)
//!            return z ^ (z >> 31)
//! key  = mix64(mix64(mix64(seed + G) ^ step) ^ param_index)        G = 0x9E3779B97F4A7C15
//! r(i) = mix64(key + (i + 1) * G)                                   i = element index
//! ```
//!
//! `key` ([`stream_key`]) is computed on the host once per tensor and step; `r(i)`
//! ([`stream_bits`]) is the `i`-th output of splitmix64 started at `key`. `step` is the
//! optimizer's 1-based step number (the `t` of the bias correction), `param_index` the
//! position of the parameter in [`AdamW::params`](crate::optim::AdamW::params) and `i`
//! the row-major element index inside it.
//!
//! The rounding adds the low bits of `r` to the bits that the 16-bit type drops, then
//! truncates (round toward zero on the magnitude):
//!
//! - **bf16** ([`round_bf16_stochastic`]): `bits(x) + (r & 0xFFFF)`, keep the high 16
//!   bits. bf16 is f32 with 16 mantissa bits dropped at every exponent (subnormals
//!   included), so with the 16 random bits uniform this is exactly unbiased.
//! - **f16** ([`round_f16_stochastic`]), on the magnitude `a = bits(x) & 0x7FFFFFFF`:
//!   - `|x| ≥ 2⁻¹⁴` (f16 normal range): `t = (a + (r & 0x1FFF)) & !0x1FFF`, then
//!     `f16(t)` (exact, or ±inf past 65504);
//!   - `|x| < 2⁻¹⁴` (f16 subnormal range, where the result is `k·2⁻²⁴`): with `e` the f32
//!     biased exponent, `sig` the significand with its implicit bit (`mant | 2²³`, or
//!     `mant` when `e = 0`) and `s = 126 − max(e, 1)` (so `|x|·2²⁴ = sig·2⁻ˢ`),
//!     `k = (sig + (r mod 2ˢ)) >> s` for `s < 64` and `k = 0` for `s ≥ 64`
//!     (`|x| < 2⁻⁶⁴`, a bias below `2⁻⁴⁰` ulp); the f16 bits are `sign | k`.
//!
//!   Both are exactly unbiased when the random bits are uniform.
//! - NaN and ±inf round to nearest (their bits are not perturbed).

use half::{bf16, f16};

/// How the fp32 master value of a bf16/f16 parameter is rounded into the parameter after
/// each step. f32 and f64 parameters are written without rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Round to nearest, ties to even (the deterministic default).
    #[default]
    NearestEven,
    /// Stochastic rounding with counter-based random bits from `seed` (see the
    /// [module documentation](self) for the exact formula).
    Stochastic {
        /// The seed of the random bits.
        seed: u64,
    },
}

/// The splitmix64 increment (the golden-ratio constant `⌊2⁶⁴/φ⌋`, odd).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finaliser, a bijective mix of 64 bits.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-tensor key of the random stream for one optimizer step:
/// `mix64(mix64(mix64(seed + GOLDEN) ^ step) ^ param_index)`.
#[inline]
pub fn stream_key(seed: u64, step: u64, param_index: u64) -> u64 {
    mix64(mix64(mix64(seed.wrapping_add(GOLDEN)) ^ step) ^ param_index)
}

/// The random bits of element `index` in the stream `key`: `mix64(key + (index + 1)·GOLDEN)`.
#[inline]
pub fn stream_bits(key: u64, index: u64) -> u64 {
    mix64(key.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// `stream_bits(stream_key(seed, step, param_index), element_index)`.
#[inline]
pub fn random_bits(seed: u64, step: u64, param_index: u64, element_index: u64) -> u64 {
    stream_bits(stream_key(seed, step, param_index), element_index)
}

/// Rounds `x` to bf16 stochastically with the random bits `r` (only `r & 0xFFFF` is
/// used): `bf16::from_bits(((bits(x) + (r & 0xFFFF)) >> 16) as u16)`. NaN and ±inf round
/// to nearest.
#[inline]
pub fn round_bf16_stochastic(x: f32, r: u64) -> bf16 {
    if !x.is_finite() {
        return bf16::from_f32(x);
    }
    // No overflow: a finite f32 has bits ≤ 0xFF7F_FFFF, and the carry into the exponent
    // of the largest finite values gives ±inf, the correct overflow.
    let b = x.to_bits() + (r as u32 & 0xFFFF);
    bf16::from_bits((b >> 16) as u16)
}

/// Rounds `x` to f16 stochastically with the random bits `r` (see the
/// [module documentation](self) for the formula). NaN and ±inf round to nearest.
#[inline]
pub fn round_f16_stochastic(x: f32, r: u64) -> f16 {
    if !x.is_finite() {
        return f16::from_f32(x);
    }
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits & 0x7FFF_FFFF;
    if a >= 0x3880_0000 {
        // |x| ≥ 2^-14: f16 keeps the top 10 of f32's 23 mantissa bits. The sum stays below
        // 0x7F80_2000, so truncation gives a finite f32 or exactly +inf (never a NaN).
        let t = (a + (r as u32 & 0x1FFF)) & !0x1FFF;
        f16::from_f32(f32::from_bits(sign | t))
    } else {
        // |x| < 2^-14: the result is k·2^-24 with k = floor(|x|·2^24 + u), u uniform.
        let e = a >> 23;
        let mant = a & 0x7F_FFFF;
        let sig = if e == 0 { mant } else { mant | 0x80_0000 } as u64;
        let s = 126 - e.max(1);
        let k = if s >= 64 {
            0
        } else {
            (sig + (r & ((1u64 << s) - 1))) >> s
        };
        // k ≤ 1024; k = 1024 carries into the exponent field: 2^-14, the smallest normal.
        f16::from_bits(((sign >> 16) as u16) | k as u16)
    }
}

/// A 16-bit parameter type with an fp32 master copy.
pub(crate) trait HalfFloat: crate::Element {
    /// Round to nearest even.
    fn round_ne(x: f32) -> Self;
    /// Stochastic rounding with random bits `r`.
    fn round_sr(x: f32, r: u64) -> Self;
}

impl HalfFloat for bf16 {
    #[inline]
    fn round_ne(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline]
    fn round_sr(x: f32, r: u64) -> Self {
        round_bf16_stochastic(x, r)
    }
}

impl HalfFloat for f16 {
    #[inline]
    fn round_ne(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline]
    fn round_sr(x: f32, r: u64) -> Self {
        round_f16_stochastic(x, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two neighbours of `x` in the 16-bit type (toward zero, away from zero).
    fn neighbours<H: HalfFloat + PartialEq + Copy + std::fmt::Debug>(
        x: f32,
        sr: impl Fn(f32, u64) -> H,
    ) -> (H, H) {
        (sr(x, 0), sr(x, u64::MAX))
    }

    /// Exhaustive over every value of the used random bits: the number of round-ups
    /// divided by the number of draws equals `(|x| − lo)/(hi − lo)` exactly.
    fn exhaustive_probability<H: HalfFloat>(
        x: f32,
        nbits: u32,
        sr: impl Fn(f32, u64) -> H,
    ) -> (f64, f64) {
        let lo = sr(x, 0).to_f64();
        let hi = sr(x, (1u64 << nbits) - 1).to_f64();
        let mut ups = 0u64;
        for r in 0..(1u64 << nbits) {
            let y = sr(x, r).to_f64();
            assert!(y == lo || y == hi, "{x}: rounded to {y}, not {lo} or {hi}");
            ups += (y == hi && hi != lo) as u64;
        }
        let p = ups as f64 / (1u64 << nbits) as f64;
        let want = if hi == lo {
            0.0
        } else {
            (x as f64 - lo) / (hi - lo)
        };
        (p, want)
    }

    #[test]
    fn bf16_stochastic_is_exactly_unbiased_over_all_random_bits() {
        for &x in &[
            1.0f32 + 0.3 * 2f32.powi(-7),
            -3.3,
            1e-30,
            -2.5e-39, /* subnormal */
            65504.7,
            1.0,
        ] {
            let (p, want) = exhaustive_probability(x, 16, round_bf16_stochastic);
            assert_eq!(p, want, "bf16 {x}: P(round up) {p} vs {want}");
            let (lo, hi) = neighbours(x, round_bf16_stochastic);
            let ne = bf16::from_f32(x);
            assert!(
                ne == lo || ne == hi,
                "{x}: nearest {ne} not among {lo}, {hi}"
            );
        }
        // The largest finite values carry into ±inf, like overflow under nearest rounding.
        assert_eq!(round_bf16_stochastic(f32::MAX, 0xFFFF), bf16::INFINITY);
        assert_eq!(round_bf16_stochastic(-f32::MAX, 0xFFFF), bf16::NEG_INFINITY);
        assert!(round_bf16_stochastic(f32::NAN, 0xFFFF).is_nan());
        assert_eq!(round_bf16_stochastic(f32::INFINITY, 0xFFFF), bf16::INFINITY);
        assert_eq!(round_bf16_stochastic(-0.0, 0xFFFF).to_bits(), 0x8000);
    }

    #[test]
    fn f16_stochastic_is_exactly_unbiased_over_all_random_bits() {
        // Normal range: 13 dropped bits.
        for &x in &[1.0f32 + 0.3 * 2f32.powi(-10), -3.3, 6.1e-5, 65500.3, 2.0] {
            let (p, want) = exhaustive_probability(x, 13, round_f16_stochastic);
            assert_eq!(p, want, "f16 {x}: P(round up) {p} vs {want}");
        }
        // Subnormal range: s = 126 − e dropped bits (14 ..= 20 here).
        for &x in &[3.0e-5f32, -1.0e-6, 2.0e-7, 6.0e-8, 3.0e-8] {
            let e = (x.to_bits() >> 23) & 0xFF;
            let s = 126 - e;
            let (p, want) = exhaustive_probability(x, s, round_f16_stochastic);
            assert_eq!(
                p, want,
                "f16 subnormal {x} (s = {s}): P(round up) {p} vs {want}"
            );
        }
        // Crossing into the normal range and out of the finite range.
        let just_below_min_normal = f32::from_bits(0x3880_0000 - 1);
        assert_eq!(
            round_f16_stochastic(just_below_min_normal, u64::MAX),
            f16::MIN_POSITIVE
        );
        assert_eq!(round_f16_stochastic(65519.0, 0x1FFF), f16::INFINITY);
        assert_eq!(round_f16_stochastic(1e6, 0), f16::INFINITY);
        assert_eq!(round_f16_stochastic(1e-30, u64::MAX >> 1), f16::ZERO);
        assert!(round_f16_stochastic(f32::NAN, 7).is_nan());
    }

    #[test]
    fn stochastic_rounding_with_hashed_bits_averages_to_the_value() {
        // A value between two bf16 neighbours, rounded with the bits of many different
        // element indices: the mean is the value (within 6 standard errors).
        let n = 200_000u64;
        for (name, x, ulp) in [
            ("bf16", 1.0f32 + 0.3 * 2f32.powi(-7), 2f64.powi(-7)),
            ("f16", -(1.0f32 + 0.7 * 2f32.powi(-10)), 2f64.powi(-10)),
        ] {
            let key = stream_key(42, 1, 3);
            let mut sum = 0.0f64;
            for i in 0..n {
                let r = stream_bits(key, i);
                sum += if name == "bf16" {
                    round_bf16_stochastic(x, r).to_f64()
                } else {
                    round_f16_stochastic(x, r).to_f64()
                };
            }
            let mean = sum / n as f64;
            let frac = ((x as f64).abs() % ulp) / ulp;
            let se = ulp * (frac * (1.0 - frac) / n as f64).sqrt();
            println!(
                "{name}: value {x}, mean of {n} stochastic roundings {mean} (err {:.3e}, 6σ = {:.3e})",
                (mean - x as f64).abs(),
                6.0 * se
            );
            assert!(
                (mean - x as f64).abs() < 6.0 * se,
                "{name}: mean {mean} vs {x}"
            );
        }
    }

    #[test]
    fn random_bits_are_a_pure_function_of_the_counters() {
        assert_eq!(random_bits(7, 3, 2, 1000), random_bits(7, 3, 2, 1000));
        assert_eq!(
            random_bits(7, 3, 2, 1000),
            stream_bits(stream_key(7, 3, 2), 1000)
        );
        let base = random_bits(7, 3, 2, 1000);
        for other in [
            random_bits(8, 3, 2, 1000),
            random_bits(7, 4, 2, 1000),
            random_bits(7, 3, 1, 1000),
            random_bits(7, 3, 2, 1001),
        ] {
            assert_ne!(base, other);
        }
        // `stream_bits(key, i)` is the i-th output of splitmix64 seeded with `key`: the
        // published first outputs for seed 0 pin the constants a GPU port must use.
        assert_eq!(stream_bits(0, 0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(stream_bits(0, 1), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(stream_bits(0, 2), 0x06C4_5D18_8009_454F);
        println!(
            "random_bits(0, 1, 0, 0) = {:#018x}",
            random_bits(0, 1, 0, 0)
        );
        // The low 16 bits are roughly uniform: each of 16 buckets gets 1/16 ± 5σ.
        let key = stream_key(1, 1, 0);
        let mut buckets = [0u32; 16];
        let n = 160_000u64;
        for i in 0..n {
            buckets[((stream_bits(key, i) & 0xFFFF) >> 12) as usize] += 1;
        }
        let (expect, sd) = (n as f64 / 16.0, (n as f64 / 16.0 * 15.0 / 16.0).sqrt());
        for (b, &c) in buckets.iter().enumerate() {
            assert!(
                (c as f64 - expect).abs() < 5.0 * sd,
                "bucket {b}: {c} vs {expect}"
            );
        }
    }
}
