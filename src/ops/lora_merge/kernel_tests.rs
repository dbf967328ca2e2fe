//! Kernel-level tests (DESIGN §6) of the merged-weight update on every backend present:
//! odd shapes (not multiples of the kernel's 256 columns or 32 rows), ranks 1–64 (across
//! the 16-wide rank chunks), overlapping and partial row ranges, merge, unmerge and
//! weighted merges, three dtypes and both roundings. A device result must equal the CPU
//! reference bit for bit (the kernel does the reference's operations in its order), lie
//! within the dtype's rounding of an f64 merge, and leave the rows no adapter covers
//! untouched.

use super::*;
use crate::testing::rng;
use rand::Rng;
use std::ops::Range;

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
const ROUNDINGS: [Rounding; 2] = [Rounding::NearestEven, Rounding::Stochastic { seed: 77 }];

/// The unit roundoff of `dtype` and the spacing of its smallest subnormals (the absolute
/// error of a rounding near zero).
fn unit_roundoff(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (2f64.powi(-24), 2f64.powi(-149)),
        DType::BF16 => (2f64.powi(-8), 2f64.powi(-133)),
        DType::F16 => (2f64.powi(-11), 2f64.powi(-24)),
        DType::F64 => (2f64.powi(-53), 0.0),
    }
}

/// `W [n, k]` and adapters `(rank, rows, scale)`.
struct Case {
    n: usize,
    k: usize,
    terms: Vec<(usize, Range<usize>, f64)>,
}

fn cases() -> Vec<Case> {
    let c = |n, k, terms| Case { n, k, terms };
    vec![
        c(1, 1, vec![(1, 0..1, 1.0)]),
        c(37, 300, vec![(7, 0..37, 0.5)]),
        // q and v style: overlapping rows, ranks on both sides of a 16-wide chunk, unmerge.
        c(65, 257, vec![(16, 3..40, 2.0), (17, 30..65, -1.5)]),
        c(33, 64, vec![(64, 0..33, 0.125), (1, 5..6, 3.0)]),
        // Rows 0..10, 20..50 and 90..100 belong to no adapter.
        c(100, 33, vec![(8, 10..20, 1.0), (2, 50..90, -0.25)]),
        c(5, 513, vec![]),
    ]
}

fn random(g: &mut impl Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| g.random_range(-1.0..1.0)).collect()
}

/// The bit patterns of a tensor's values (widened exactly to f64, signs of zero kept).
fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn assert_same_bits(name: &str, got: &[u64], want: &[u64]) {
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{name}: first differing element {i}: got {}, want {}",
            f64::from_bits(got[i]),
            f64::from_bits(want[i])
        );
    }
    assert_eq!(got.len(), want.len(), "{name}: lengths differ");
}

fn merge_matches_the_reference(device: &Device) {
    let mut g = rng("lora_merge_kernel");
    for dtype in DTYPES {
        for rounding in ROUNDINGS {
            for c in cases() {
                let name = format!("{device} {dtype} {rounding:?} W[{}, {}]", c.n, c.k);
                let w0 = random(&mut g, c.n * c.k);
                let adapters: Vec<(Vec<f64>, Vec<f64>)> = c
                    .terms
                    .iter()
                    .map(|(r, rows, _)| (random(&mut g, r * c.k), random(&mut g, rows.len() * r)))
                    .collect();
                let on = |d: &Device| {
                    let w = Tensor::from_vec_as(w0.clone(), [c.n, c.k], dtype, d).unwrap();
                    let ab: Vec<(Tensor, Tensor)> = c
                        .terms
                        .iter()
                        .zip(&adapters)
                        .map(|((r, rows, _), (a, b))| {
                            (
                                Tensor::from_vec_as(a.clone(), [*r, c.k], dtype, d).unwrap(),
                                Tensor::from_vec_as(b.clone(), [rows.len(), *r], dtype, d).unwrap(),
                            )
                        })
                        .collect();
                    (w, ab)
                };
                let (w, ab) = on(device);
                let before = bits(&w);
                let stored = w.to_vec_f64().unwrap();
                let terms: Vec<LoraTerm<'_>> = c
                    .terms
                    .iter()
                    .zip(&ab)
                    .map(|((_, rows, s), (a, b))| LoraTerm {
                        a,
                        b,
                        scale: *s,
                        out_range: rows.clone(),
                    })
                    .collect();
                lora_merge_with(&w, &terms, rounding).unwrap();
                let got = bits(&w);

                // Bit for bit against the CPU reference.
                let (w_cpu, ab_cpu) = on(&Device::Cpu);
                let terms_cpu: Vec<LoraTerm<'_>> = c
                    .terms
                    .iter()
                    .zip(&ab_cpu)
                    .map(|((_, rows, s), (a, b))| LoraTerm {
                        a,
                        b,
                        scale: *s,
                        out_range: rows.clone(),
                    })
                    .collect();
                lora_merge_with(&w_cpu, &terms_cpu, rounding).unwrap();
                assert_same_bits(&format!("{name} vs CPU"), &got, &bits(&w_cpu));

                // Within the error bound of an f64 merge of the stored values: one rounding
                // into the dtype (up to an ulp when stochastic) plus f32 sums of the terms.
                let mut want = stored.clone();
                let mut mag: Vec<f64> = stored.iter().map(|v| v.abs()).collect();
                let mut rank = vec![0usize; c.n];
                for ((r, rows, s), (a, b)) in c.terms.iter().zip(&ab) {
                    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
                    for (bi, row) in rows.clone().enumerate() {
                        rank[row] += r;
                        for p in 0..*r {
                            for j in 0..c.k {
                                let term = s * b[bi * r + p] * a[p * c.k + j];
                                want[row * c.k + j] += term;
                                mag[row * c.k + j] += term.abs();
                            }
                        }
                    }
                }
                let (unit, tiny) = unit_roundoff(dtype);
                for (e, &b) in got.iter().enumerate() {
                    let got = f64::from_bits(b);
                    let f32_sums = 2.0 * (rank[e / c.k] + 1) as f64 * 2f64.powi(-24) * mag[e];
                    let bound = 2.0 * unit * want[e].abs() + f32_sums + tiny;
                    assert!(
                        (got - want[e]).abs() <= bound,
                        "{name}: element {e}: got {got}, want {} (bound {bound:.3e})",
                        want[e]
                    );
                }

                // Rows no adapter covers keep their bits.
                for row in 0..c.n {
                    if c.terms.iter().all(|(_, rows, _)| !rows.contains(&row)) {
                        let span = row * c.k..(row + 1) * c.k;
                        assert_same_bits(
                            &format!("{name} untouched row {row}"),
                            &got[span.clone()],
                            &before[span],
                        );
                    }
                }
            }
        }
    }
}
crate::test_device!(matches_reference, merge_matches_the_reference);

/// An update below half a bf16 ulp: nearest even drops it everywhere, stochastic rounding
/// keeps it on average (the mean moves by the update, within sampling noise).
fn stochastic_rounding_keeps_small_updates(device: &Device) {
    let k = 4096;
    let delta = 2f64.powi(-10); // a quarter of the bf16 ulp at 1.0 (2⁻⁸)
    for (rounding, want_mean) in [
        (Rounding::NearestEven, 1.0),
        (Rounding::Stochastic { seed: 5 }, 1.0 + delta),
    ] {
        let w = Tensor::from_vec_as(vec![1.0f64; k], [1, k], DType::BF16, device).unwrap();
        let a = Tensor::from_vec_as(vec![1.0f64; k], [1, k], DType::BF16, device).unwrap();
        let b = Tensor::from_vec_as(vec![1.0f64], [1, 1], DType::BF16, device).unwrap();
        let term = LoraTerm {
            a: &a,
            b: &b,
            scale: delta,
            out_range: 0..1,
        };
        lora_merge_with(&w, &[term], rounding).unwrap();
        let v = w.to_vec_f64().unwrap();
        let mean = v.iter().sum::<f64>() / k as f64;
        // One sample is 1 or 1 + 2⁻⁷ with p = 1/8: the mean's standard deviation is
        // 2⁻⁷·√(p(1−p)/k) ≈ 4e-5, a tenth of delta.
        assert!(
            (mean - want_mean).abs() < 0.3 * delta,
            "{device} {rounding:?}: mean {mean}, want {want_mean}"
        );
    }
}
crate::test_device!(
    stochastic_small_updates,
    stochastic_rounding_keeps_small_updates
);

/// Shapes that do not fit, a non-finite scale, W aliasing an adapter, mixed devices or
/// dtypes: errors, with W untouched. (f64 tensors cannot reach a device at all.)
fn bad_input_is_an_error(device: &Device) {
    let w = Tensor::from_vec_as(vec![0.5f64; 12], [4, 3], DType::F32, device).unwrap();
    let a = Tensor::zeros([2, 3], DType::F32, device).unwrap();
    let b = Tensor::zeros([2, 2], DType::F32, device).unwrap();
    let term = |a, b, scale, out_range| LoraTerm {
        a,
        b,
        scale,
        out_range,
    };
    assert!(lora_merge(&w, &[term(&a, &b, 1.0, 1..3)]).is_ok());
    for (what, r) in [
        ("rows past W", lora_merge(&w, &[term(&a, &b, 1.0, 3..5)])),
        ("B rows ≠ range", lora_merge(&w, &[term(&a, &b, 1.0, 0..3)])),
        ("A cols ≠ K", lora_merge(&w, &[term(&b, &b, 1.0, 0..2)])),
        ("NaN scale", lora_merge(&w, &[term(&a, &b, f64::NAN, 0..2)])),
    ] {
        assert!(r.is_err(), "{device}: {what} was accepted");
    }
    let bf = Tensor::zeros([2, 2], DType::BF16, device).unwrap();
    assert!(matches!(
        lora_merge(&w, &[term(&a, &bf, 1.0, 0..2)]),
        Err(Error::DType { .. })
    ));
    // W aliasing its own adapter (a square W used as B): the update would race.
    let sq = Tensor::zeros([2, 2], DType::F32, device).unwrap();
    let a2 = Tensor::zeros([2, 2], DType::F32, device).unwrap();
    assert!(lora_merge(&sq, &[term(&a2, &sq, 1.0, 0..2)]).is_err());
    if *device != Device::Cpu {
        let a_cpu = Tensor::zeros([2, 3], DType::F32, &Device::Cpu).unwrap();
        assert!(lora_merge(&w, &[term(&a_cpu, &b, 1.0, 0..2)]).is_err());
    }
    assert_eq!(
        w.to_vec_f64().unwrap(),
        vec![0.5; 12],
        "{device}: W changed"
    );
}
crate::test_device!(bad_input, bad_input_is_an_error);

#[test]
fn params_match_the_kernels() {
    for k in cuda::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::LoraMergeParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}
