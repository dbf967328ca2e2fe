//! Seeded inverted dropout with a counter-based mask that the backward (and a CUDA kernel)
//! regenerates from `(seed, index)` instead of storing it.

pub(crate) mod cpu;
pub(crate) mod cuda;
#[cfg(test)]
mod kernel_tests;

use super::{output, with_real};
use crate::tape::Tape;
use crate::{Device, Error, Real, Result, Tensor};

/// Inverted dropout with probability `p`, mask from a counter-based hash of `(seed, index)`.
///
/// Element `i` (flat row-major index) is kept iff [`dropout_mask_value`]`(seed, i, p)`; kept
/// elements are multiplied by `1/(1 − p)` (computed in f64, rounded to the compute type:
/// f32, or f64 for f64 tensors), dropped ones are `0` (even when `x` is NaN). The output
/// has the shape and dtype of `x`. With a fixed seed the op is linear in `x`; its backward
/// applies the same mask and scale to the output gradient, regenerating the mask. On a
/// kernel device (`kernels/dropout.cu`) the mask and the outputs are the CPU's bit for bit.
///
/// `p = 0` returns a tensor with the values of `x`, still recorded on the tape so that
/// gradients flow. Use a fresh `seed` per call site and step.
///
/// Errors: `p` outside `[0, 1)` or NaN (invalid argument).
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    const OP: &str = "dropout";
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(format!(
            "{OP}: p must be in [0, 1), got {p}"
        )));
    }
    let tape = Tape::of(OP, &[x])?;
    fn go<T: Real>(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
        let xv = x.cpu_read::<T>(OP)?;
        output(cpu::apply(&xv, p, seed), x.shape().clone(), x.dtype())
    }
    // The forward (or, with `backward`, the backward on the output gradient) on any device.
    fn run(x: &Tensor, p: f64, seed: u64, backward: bool) -> Result<Tensor> {
        if x.device() == Device::Cpu {
            with_real(
                x.dtype(),
                || go::<f32>(x, p, seed),
                || go::<f64>(x, p, seed),
            )
        } else {
            cuda::apply(x, p, seed, backward)
        }
    }
    let y = run(x, p, seed, false)?;
    if let Some(tape) = &tape {
        let (x, yid) = (x.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            let gx = run(&gy, p, seed, true)?;
            g.accumulate(&x, gx)
        });
    }
    Ok(y.with_tape(tape))
}

/// Whether element `index` is kept under `(seed, p)`.
///
/// A pure function of its arguments (SplitMix64 used as a counter-based hash), so any
/// backend regenerates the identical mask. With wrapping 64-bit arithmetic:
///
/// ```text
/// mix64(z) = { z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
///              z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
///              z ^ (z >> 31) }
/// h    = mix64(mix64(seed) + (index + 1) * 0x9E3779B97F4A7C15)
/// u    = (h >> 40) * 2^-24                 // 24 bits: uniform on [0, 1), exact in f32/f64
/// kept = u >= p                            // ⇔ (h >> 40) >= ceil(p * 2^24) for p in [0, 1)
/// ```
///
/// (`h` is the `index + 1`-th output of a SplitMix64 generator seeded with `mix64(seed)`.)
/// So `p ≤ 0` keeps everything, `p ≥ 1` or NaN keeps nothing, and each element is kept
/// with probability `1 − ceil(p·2^24)/2^24`.
///
/// ```
/// use lorafuse::ops::dropout_mask_value;
/// let kept = (0..10_000u64).filter(|&i| dropout_mask_value(7, i, 0.25)).count();
/// assert!((kept as f64 / 10_000.0 - 0.75).abs() < 0.02);
/// assert!(dropout_mask_value(7, 3, 0.0) && !dropout_mask_value(7, 3, 1.0));
/// ```
pub fn dropout_mask_value(seed: u64, index: u64, p: f64) -> bool {
    cpu::bits24(seed, index) as f64 * (1.0 / (1u64 << 24) as f64) >= p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor, rng};
    use crate::{DType, Device};
    use rand::Rng;

    #[test]
    fn mask_hash_matches_pinned_values() {
        // From an independent Python implementation of the formula in the rustdoc.
        for (seed, index, bits) in [
            (0u64, 0u64, 14_819_496u32),
            (0, 1, 7_239_838),
            (42, 0, 10_001_215),
            (42, 12_345, 4_675_151),
            (u64::MAX, u64::MAX, 4_980_696),
            (7, 1 << 40, 9_147_394),
        ] {
            assert_eq!(cpu::bits24(seed, index), bits, "seed {seed} index {index}");
            let u = bits as f64 / (1u64 << 24) as f64;
            assert!(
                dropout_mask_value(seed, index, u) && !dropout_mask_value(seed, index, u + 1e-9)
            );
        }
        // mix64 is SplitMix64's finalizer: the generator seeded with 1234567 starts here.
        assert_eq!(
            cpu::mix64(1_234_567u64.wrapping_add(0x9E37_79B9_7F4A_7C15)),
            6_457_827_717_110_365_317
        );
    }

    #[test]
    fn kept_fraction_is_one_minus_p_and_masks_follow_the_seed() {
        let n = 100_000u64;
        for (seed, p) in [(1u64, 0.1), (2, 0.3), (3, 0.5), (4, 0.2)] {
            let kept = (0..n).filter(|&i| dropout_mask_value(seed, i, p)).count() as f64 / n as f64;
            println!("p {p}: kept fraction {kept}");
            assert!(
                (kept - (1.0 - p)).abs() <= 0.01 * (1.0 - p),
                "p {p}: kept {kept}"
            );
        }
        let mask = |seed| {
            (0..n)
                .map(|i| dropout_mask_value(seed, i, 0.5))
                .collect::<Vec<_>>()
        };
        assert_eq!(mask(11), mask(11));
        let (a, b) = (mask(11), mask(12));
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count() as f64 / n as f64;
        assert!(
            (differ - 0.5).abs() < 0.02,
            "seeds 11 and 12 differ at {differ} of the positions"
        );
        // The kernel's integer threshold agrees with the definition, at the edges too.
        for p in [0.0, 1e-9, 0.25, 0.5, 0.3, 1.0 - 1e-9, 1.0 - 2f64.powi(-24)] {
            let th = cpu::threshold(p);
            assert!(
                (0..5000u64).all(|i| (cpu::bits24(9, i) >= th) == dropout_mask_value(9, i, p)),
                "p {p}"
            );
        }
        assert!(!dropout_mask_value(9, 0, f64::NAN) && dropout_mask_value(9, 0, -0.5));
    }

    #[test]
    fn dropout_zeroes_and_scales_by_the_mask() {
        let mut r = rng("dropout_values");
        let (p, seed) = (0.3, 1234);
        // Several rayon chunks, so the per-chunk index offsets are exercised.
        let x = rand_tensor(&mut r, [3, 40_000], -2.0, 2.0);
        let y = dropout(&x, p, seed).unwrap().to_vec_f64().unwrap();
        let xv = x.to_vec_f64().unwrap();
        for (i, (&y, &x)) in y.iter().zip(&xv).enumerate() {
            let want = if dropout_mask_value(seed, i as u64, p) {
                x * (1.0 / (1.0 - p))
            } else {
                0.0
            };
            assert_eq!(y, want, "element {i}");
        }
        // p = 0: identical values, still recorded.
        let tape = Tape::new();
        let xt = x.track(&tape);
        let y0 = dropout(&xt, 0.0, seed).unwrap();
        assert_eq!(y0.to_vec_f64().unwrap(), xv);
        assert_eq!(tape.op_names(), vec!["dropout"]);
        let g = tape.backward_with(&y0, x.clone()).unwrap();
        assert_eq!(g.get(&xt).unwrap().to_vec_f64().unwrap(), xv);
        // NaN inputs are dropped to 0, not NaN.
        let nan = Tensor::full(f64::NAN, [1000], DType::F32, &Device::Cpu).unwrap();
        let yn = dropout(&nan, 0.5, 5).unwrap().to_vec_f64().unwrap();
        assert!(
            yn.iter()
                .enumerate()
                .all(|(i, y)| (*y == 0.0) != dropout_mask_value(5, i as u64, 0.5))
        );
    }

    #[test]
    fn dropout_backward_matches_finite_differences() {
        let mut r = rng("dropout_fd");
        let x = rand_tensor(&mut r, [4, 9], -2.0, 2.0);
        let seed: u64 = r.random();
        check_grads(
            "dropout",
            std::slice::from_ref(&x),
            |t| dropout(&t[0], 0.4, seed),
            1e-7,
        );
        check_grads(
            "dropout∘gelu",
            &[x],
            |t| crate::ops::gelu(&dropout(&crate::ops::gelu(&t[0])?, 0.25, seed)?),
            1e-7,
        );
    }

    #[test]
    fn dropout_f32_and_bf16_inputs() {
        let mut r = rng("dropout_lowp");
        let x = rand_tensor(&mut r, [64, 33], -2.0, 2.0);
        let want = dropout(&x, 0.2, 77).unwrap().to_vec_f64().unwrap();
        for (dt, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
            let tape = Tape::new();
            let xt = x.to_dtype(dt).unwrap().track(&tape);
            let y = dropout(&xt, 0.2, 77).unwrap();
            assert_eq!(y.dtype(), dt);
            let yv = y.to_vec_f64().unwrap();
            assert_close(&format!("dropout {dt}"), &yv, &want, tol);
            // Same mask in every dtype.
            assert!(
                yv.iter()
                    .zip(&want)
                    .all(|(a, b)| (*a == 0.0) == (*b == 0.0))
            );
            let g = tape
                .backward_with(&y, Tensor::ones_like(&y).unwrap())
                .unwrap();
            let gx = g.get(&xt).unwrap();
            assert_eq!(gx.dtype(), dt);
            let scale = 1.0 / 0.8;
            let want_g: Vec<f64> = want
                .iter()
                .map(|&w| if w == 0.0 { 0.0 } else { scale })
                .collect();
            assert_close(
                &format!("dropout grad {dt}"),
                &gx.to_vec_f64().unwrap(),
                &want_g,
                tol,
            );
        }
    }

    #[test]
    fn dropout_rejects_bad_p() {
        let x = Tensor::zeros([4], DType::F32, &Device::Cpu).unwrap();
        for p in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            assert!(
                matches!(dropout(&x, p, 0), Err(Error::InvalidArgument(_))),
                "p {p}"
            );
        }
    }
}
