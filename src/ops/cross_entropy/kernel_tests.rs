//! Kernel-level tests (DESIGN §6) of the fused softmax cross-entropy on every backend
//! present: odd row counts and vocabularies (1 class, 3, 257, over 4096 and GPT-2's 50257,
//! so the strided loops run several passes), ignored rows (some, and all of them), large
//! logit offsets, three dtypes, the loss gradient's scale. The device loss and gradient are
//! compared with the CPU reference within the dtype's rounding (the kernels sum in another
//! order, with another `exp`); ignored rows' gradients must be exactly 0; outputs start
//! poisoned (NaN), so an unwritten element fails; a second run must give the same bits (on
//! the CPU and a GPU: see `testing::rerun_can_differ`).

use super::*;
use crate::DType;
use crate::testing::{assert_close, rerun_can_differ, rng};
use rand::Rng;

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// Relative tolerance of a device result against the CPU reference: f32 math in another
/// order, then (bf16, f16) one rounding of each output that may land one ulp apart.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        DType::F64 => 0.0,
    }
}

/// `(rows, classes, logit offset)`.
/// V = 8, 64: every row 16-byte aligned for bf16/f16 (vectors only); 7, 63, 1000, 5003,
/// 50257: rows at varying offsets (scalar heads and tails around the aligned vectors).
const CASES: [(usize, usize, f64); 12] = [
    (1, 1, 0.0),
    (7, 3, 0.0),
    (9, 7, 0.0),
    (5, 8, 2.0),
    (9, 63, 0.0),
    (3, 1000, -3.0),
    (65, 257, 0.0),
    (7, 5003, 0.0),
    (3, 4099, 40.0),
    (2, 50257, 0.0),
    (5, 64, -30.0),
    (1, 257, 0.0),
];

/// Random targets, each row ignored with probability `p_ignore`; class 0 and V − 1 appear.
fn targets(g: &mut impl Rng, m: usize, v: usize, p_ignore: f64) -> Vec<i32> {
    (0..m)
        .map(|i| {
            if g.random_bool(p_ignore) {
                IGNORE_INDEX
            } else if i == 0 {
                0
            } else if i == 1 {
                v as i32 - 1
            } else {
                g.random_range(0..v as i32)
            }
        })
        .collect()
}

/// The loss and the logits gradient (backward seeded with `seed`) on `device`.
fn run(
    x: &[f64],
    dims: [usize; 2],
    t: &[i32],
    dtype: DType,
    seed: f64,
    device: &Device,
) -> (Tensor, Tensor) {
    let tape = Tape::new();
    let xt = Tensor::from_vec_as(x.to_vec(), dims, dtype, device)
        .unwrap()
        .track(&tape);
    let y = cross_entropy(&xt, t).unwrap();
    let g = tape.backward_scaled(&y, seed).unwrap();
    let gx = g.get(&xt).unwrap().clone();
    (y, gx)
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn matches_the_cpu_reference(device: &Device) {
    let mut g = rng("cross_entropy_kernel");
    for dtype in DTYPES {
        for (ci, &(m, v, offset)) in CASES.iter().enumerate() {
            // The last case ignores every row; the others about a quarter of them.
            let p_ignore = if ci == CASES.len() - 1 { 1.0 } else { 0.25 };
            let t = targets(&mut g, m, v, p_ignore);
            let x: Vec<f64> = (0..m * v)
                .map(|_| offset + g.random_range(-4.0..4.0))
                .collect();
            let seed = g.random_range(0.5..3.0);
            let name = format!("{device} {dtype} [{m}, {v}] +{offset}");
            let (y, gx) = run(&x, [m, v], &t, dtype, seed, device);
            assert_eq!(
                (y.dims(), y.dtype()),
                (&[] as &[usize], DType::F32),
                "{name}"
            );
            assert_eq!((gx.dims(), gx.dtype()), (&[m, v][..], dtype), "{name}");
            let (y_cpu, gx_cpu) = run(&x, [m, v], &t, dtype, seed, &Device::Cpu);
            let (loss, loss_cpu) = (y.to_scalar().unwrap(), y_cpu.to_scalar().unwrap());
            let grad = gx.to_vec_f64().unwrap();
            if t.iter().all(|&t| t == IGNORE_INDEX) {
                assert_eq!(loss.to_bits(), 0f64.to_bits(), "{name}: loss");
                assert!(grad.iter().all(|&g| g == 0.0), "{name}: gradient");
                continue;
            }
            assert_close(&format!("{name} loss"), &[loss], &[loss_cpu], tol(dtype));
            assert_close(
                &format!("{name} gradient"),
                &grad,
                &gx_cpu.to_vec_f64().unwrap(),
                tol(dtype),
            );
            for (r, &tr) in t.iter().enumerate() {
                let row = &grad[r * v..(r + 1) * v];
                if tr == IGNORE_INDEX {
                    assert!(
                        row.iter().all(|&g| g.to_bits() == 0),
                        "{name}: ignored row {r}"
                    );
                } else {
                    // Every element written and finite; only the target's is negative.
                    assert!(row.iter().all(|g| g.is_finite()), "{name}: row {r}");
                    let n_neg = row.iter().filter(|&&g| g < 0.0).count();
                    assert!(n_neg <= 1, "{name}: row {r} has {n_neg} negative gradients");
                }
            }
            // Deterministic: the same bits again, tracked or not.
            if rerun_can_differ(device) {
                let (y2, gx2) = run(&x, [m, v], &t, dtype, seed, device);
                assert_eq!(bits(&y), bits(&y2), "{name}: the loss changed between runs");
                assert_eq!(
                    bits(&gx),
                    bits(&gx2),
                    "{name}: the gradient changed between runs"
                );
            }
            let xu = Tensor::from_vec_as(x.clone(), [m, v], dtype, device).unwrap();
            assert_eq!(
                bits(&cross_entropy(&xu, &t).unwrap()),
                bits(&y),
                "{name}: untracked"
            );
        }
    }
}
crate::test_device!(matches_reference, matches_the_cpu_reference);

/// Known values: uniform logits give ln V at any offset, and the gradient of a row is
/// `(1/V − [j = t])·seed/n`.
fn uniform_logits(device: &Device) {
    for dtype in DTYPES {
        for (v, c) in [(50usize, 0.0), (4100, 1000.0), (3, -500.0)] {
            let t = [0, v as i32 - 1, IGNORE_INDEX, 1];
            let x = vec![c; 4 * v];
            let (y, gx) = run(&x, [4, v], &t, dtype, 1.5, device);
            let l = y.to_scalar().unwrap();
            let want = (v as f64).ln();
            assert!(
                (l - want).abs() <= tol(dtype) * want,
                "{device} {dtype} V {v} +{c}: {l}, want {want}"
            );
            let grad = gx.to_vec_f64().unwrap();
            for (r, &tr) in t.iter().enumerate() {
                for j in [0, 1, v - 1] {
                    let want = if tr == IGNORE_INDEX {
                        0.0
                    } else {
                        let onehot = if j == tr as usize { 1.0 } else { 0.0 };
                        (1.0 / v as f64 - onehot) * 1.5 / 3.0
                    };
                    let got = grad[r * v + j];
                    assert!(
                        (got - want).abs() <= 4.0 * tol(dtype) * want.abs(),
                        "{device} {dtype} V {v}: g[{r}, {j}] = {got}, want {want}"
                    );
                }
            }
        }
    }
}
crate::test_device!(uniform, uniform_logits);

/// Bad targets and shapes are errors on every device, checked on the host before upload.
fn bad_input_is_an_error(device: &Device) {
    let x = Tensor::zeros([4, 8], DType::F32, device).unwrap();
    assert!(matches!(
        cross_entropy(&x, &[0, 1, 2]),
        Err(Error::Shape { .. })
    ));
    for bad in [8, -1, i32::MIN] {
        assert!(
            matches!(
                cross_entropy(&x, &[0, IGNORE_INDEX, bad, 3]),
                Err(Error::InvalidArgument(_))
            ),
            "{device}: target {bad}"
        );
    }
    // No rows at all: a loss of 0.
    let empty = Tensor::zeros([0, 8], DType::BF16, device).unwrap();
    assert_eq!(
        cross_entropy(&empty, &[]).unwrap().to_scalar().unwrap(),
        0.0
    );
}
crate::test_device!(bad_input, bad_input_is_an_error);

#[test]
fn params_match_the_kernels() {
    for k in cuda::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::CrossEntropyParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}

/// The device address of a tensor's storage (0 on the CPU).
fn device_ptr(t: &Tensor) -> u64 {
    match &*t.storage() {
        crate::storage::Storage::Device(d) => d.device_ptr(),
        crate::storage::Storage::Cpu(_) => 0,
    }
}

/// `cross_entropy_fused` (loss and gradient in one pass) equals `cross_entropy` then its
/// backward bit for bit, on every backend, for seeds 1, 1024 (a loss scale) and others,
/// ignored rows included, in place (the logits consumed) and not (a clone kept).
fn fused_equals_forward_then_backward(device: &Device) {
    let mut g = rng("cross_entropy_fused");
    // f16 and bf16 share the 2-byte path: the simulator (slow launches) runs bf16 only;
    // `matches_reference` covers f16 there.
    let dtypes: &[DType] = if *device == Device::Sim {
        &[DType::F32, DType::BF16]
    } else {
        &DTYPES
    };
    for &dtype in dtypes {
        for (ci, &(m, v, offset)) in CASES.iter().enumerate() {
            let p_ignore = if ci == CASES.len() - 1 { 1.0 } else { 0.25 };
            let t = targets(&mut g, m, v, p_ignore);
            let x: Vec<f64> = (0..m * v)
                .map(|_| offset + g.random_range(-4.0..4.0))
                .collect();
            let seed = [1.0, 1024.0, g.random_range(0.5..3.0)][ci % 3];
            let name = format!("{device} {dtype} [{m}, {v}] +{offset} seed {seed}");
            let (y, gx) = run(&x, [m, v], &t, dtype, seed, device);
            let tape = Tape::new();
            let xt = Tensor::from_vec_as(x.clone(), [m, v], dtype, device)
                .unwrap()
                .track(&tape);
            let s = Tensor::full(seed, [], DType::F32, device).unwrap();
            let xid = xt.id();
            // Consumed: on a device the gradient is written over the logits (the only
            // handle); a kept clone must stay intact and get its own gradient buffer.
            let kept = (ci % 2 == 1).then(|| xt.clone());
            let x_ptr = device_ptr(&xt);
            let yf = cross_entropy_fused(xt, &t, &s).unwrap();
            let grads = tape.backward_with(&yf, s).unwrap();
            let gf = grads.get_id(xid).unwrap();
            assert_eq!(bits(&yf), bits(&y), "{name}: loss");
            assert_eq!((gf.dims(), gf.dtype()), (gx.dims(), gx.dtype()), "{name}");
            assert_eq!(bits(gf), bits(&gx), "{name}: gradient");
            if *device != Device::Cpu {
                let in_place = device_ptr(gf) == x_ptr;
                assert_eq!(in_place, kept.is_none(), "{name}: in place");
            }
            if let Some(k) = kept {
                let want = Tensor::from_vec_as(x.clone(), [m, v], dtype, &Device::Cpu).unwrap();
                assert_eq!(
                    bits(&k),
                    bits(&want),
                    "{name}: a shared logits tensor changed"
                );
            }
        }
    }
}
crate::test_device!(fused, fused_equals_forward_then_backward);

/// The fused op's errors: a seed that is not one f32 element on the logits' device, and a
/// backward seeded with another tensor than the forward's seed.
fn fused_rejects_bad_seeds(device: &Device) {
    let tape = Tape::new();
    let x = Tensor::from_vec(vec![0.5f32, -1.0, 2.0, 0.0], [2, 2], device)
        .unwrap()
        .track(&tape);
    let t = [1, 0];
    let two = Tensor::from_vec(vec![1.0f32, 1.0], [2], device).unwrap();
    let half = Tensor::full(1.0, [], DType::F16, device).unwrap();
    for bad in [&two, &half] {
        assert!(
            cross_entropy_fused(x.clone(), &t, bad).is_err(),
            "{device}: {bad:?}"
        );
    }
    if *device != Device::Cpu {
        let cpu_seed = Tensor::full(1.0, [], DType::F32, &Device::Cpu).unwrap();
        assert!(
            cross_entropy_fused(x.clone(), &t, &cpu_seed).is_err(),
            "{device}"
        );
    }
    assert!(
        cross_entropy_fused(
            x.clone(),
            &[1, 5],
            &Tensor::full(1.0, [], DType::F32, device).unwrap()
        )
        .is_err()
    );
    let seed = Tensor::full(1.0, [], DType::F32, device).unwrap();
    let y = cross_entropy_fused(x, &t, &seed).unwrap();
    let other = Tensor::full(1.0, [], DType::F32, device).unwrap();
    let err = tape.backward_with(&y, other).unwrap_err();
    assert!(err.to_string().contains("seed"), "{device}: {err}");
    // Without a tape it is plain cross_entropy.
    let plain = Tensor::from_vec(vec![0.5f32, -1.0, 2.0, 0.0], [2, 2], device).unwrap();
    assert_eq!(
        bits(&cross_entropy_fused(plain.clone(), &t, &seed).unwrap()),
        bits(&cross_entropy(&plain, &t).unwrap())
    );
}
crate::test_device!(fused_errors, fused_rejects_bad_seeds);

/// `(rows, classes, row width)` of the padded cases: GPT-2's 50257 → 50304, an odd
/// vocabulary padded to 64 (61 → 64, 3 → 64), widths not a multiple of 8 (7 → 13), a
/// padding of one column (63 → 64) and of none (64).
const PADDED: [(usize, usize, usize); 8] = [
    (1, 1, 8),
    (7, 3, 64),
    (9, 61, 64),
    (5, 63, 64),
    (3, 7, 13),
    (4, 64, 64),
    (3, 1000, 1024),
    (2, 50257, 50304),
];

/// Garbage for the padding columns of row `r`: NaN, or a large finite value of either sign
/// (larger than every real logit, so a padding column that entered the max or the sum
/// would change the loss).
fn garbage(dtype: DType, r: usize, j: usize) -> f64 {
    let big = match dtype {
        DType::F16 => 6e4,
        _ => 1e30,
    };
    match (r + j) % 3 {
        0 => f64::NAN,
        1 => big,
        _ => -big,
    }
}

/// `cross_entropy_padded` over the first V columns of `[M, Vp]` logits with garbage (NaN,
/// ±huge) in the padding: the loss is the unpadded `[M, V]` loss (bit for bit on the CPU,
/// within rounding on a device, whose rows sit at other alignments) and the gradient's
/// first V columns the unpadded gradient, its padding columns exactly +0; the fused op
/// equals it bit for bit, in place or not; a second run gives the same bits.
fn padded_ignores_the_padding_columns(device: &Device) {
    let mut g = rng("cross_entropy_padded");
    for dtype in DTYPES {
        for (ci, &(m, v, ld)) in PADDED.iter().enumerate() {
            let name = format!("{device} {dtype} [{m}, {v} of {ld}]");
            let t = targets(&mut g, m, v, 0.25);
            let real: Vec<f64> = (0..m * v).map(|_| g.random_range(-4.0..4.0)).collect();
            let padded: Vec<f64> = (0..m * ld)
                .map(|i| {
                    let (r, j) = (i / ld, i % ld);
                    if j < v {
                        real[r * v + j]
                    } else {
                        garbage(dtype, r, j)
                    }
                })
                .collect();
            let seed = [1.0, 1024.0, g.random_range(0.5..3.0)][ci % 3];
            let (y0, gx0) = run(&real, [m, v], &t, dtype, seed, device);

            let tape = Tape::new();
            let xt = Tensor::from_vec_as(padded.clone(), [m, ld], dtype, device)
                .unwrap()
                .track(&tape);
            let y = cross_entropy_padded(&xt, &t, v).unwrap();
            let gx = tape
                .backward_scaled(&y, seed)
                .unwrap()
                .get(&xt)
                .unwrap()
                .clone();
            assert_eq!(
                (y.dims(), y.dtype()),
                (&[] as &[usize], DType::F32),
                "{name}"
            );
            assert_eq!((gx.dims(), gx.dtype()), (&[m, ld][..], dtype), "{name}");
            let grad = gx.to_vec_f64().unwrap();
            let (valid, pad): (Vec<f64>, Vec<f64>) = {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                for (i, &x) in grad.iter().enumerate() {
                    if i % ld < v { a.push(x) } else { b.push(x) }
                }
                (a, b)
            };
            assert!(
                pad.iter().all(|&x| x.to_bits() == 0),
                "{name}: a padding column's gradient is not +0"
            );
            if *device == Device::Cpu {
                assert_eq!(bits(&y), bits(&y0), "{name}: loss");
                assert_eq!(
                    valid.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    bits(&gx0),
                    "{name}: gradient"
                );
            } else {
                let (l, l0) = (y.to_scalar().unwrap(), y0.to_scalar().unwrap());
                assert_close(&format!("{name} loss"), &[l], &[l0], tol(dtype));
                assert_close(
                    &format!("{name} gradient"),
                    &valid,
                    &gx0.to_vec_f64().unwrap(),
                    tol(dtype),
                );
            }

            // Fused: the same bits, in place (the only handle) or not (a clone kept).
            let tape = Tape::new();
            let xf = Tensor::from_vec_as(padded.clone(), [m, ld], dtype, device)
                .unwrap()
                .track(&tape);
            let (xid, x_ptr) = (xf.id(), device_ptr(&xf));
            let kept = (ci % 2 == 1).then(|| xf.clone());
            let s = Tensor::full(seed, [], DType::F32, device).unwrap();
            let yf = cross_entropy_fused_padded(xf, &t, v, &s).unwrap();
            let grads = tape.backward_with(&yf, s).unwrap();
            let gf = grads.get_id(xid).unwrap();
            assert_eq!(bits(&yf), bits(&y), "{name}: fused loss");
            assert_eq!(bits(gf), bits(&gx), "{name}: fused gradient");
            if *device != Device::Cpu {
                assert_eq!(device_ptr(gf) == x_ptr, kept.is_none(), "{name}: in place");
            }
            if let Some(k) = kept {
                let want =
                    Tensor::from_vec_as(padded.clone(), [m, ld], dtype, &Device::Cpu).unwrap();
                assert_eq!(
                    bits(&k),
                    bits(&want),
                    "{name}: a shared logits tensor changed"
                );
            }
            // Deterministic.
            let x2 = Tensor::from_vec_as(padded, [m, ld], dtype, device).unwrap();
            assert_eq!(
                bits(&cross_entropy_padded(&x2, &t, v).unwrap()),
                bits(&y),
                "{name}: untracked"
            );
        }
    }
}
crate::test_device!(padded, padded_ignores_the_padding_columns);

/// The padded ops' errors: no classes, more classes than columns, a target in the
/// padding.
fn padded_rejects_bad_classes(device: &Device) {
    let x = Tensor::zeros([2, 8], DType::F32, device).unwrap();
    let seed = Tensor::full(1.0, [], DType::F32, device).unwrap();
    for bad in [0, 9] {
        assert!(
            matches!(
                cross_entropy_padded(&x, &[0, 1], bad),
                Err(Error::Shape { .. })
            ),
            "{device}: {bad} classes"
        );
        let tape = Tape::new();
        assert!(
            matches!(
                cross_entropy_fused_padded(x.track(&tape), &[0, 1], bad, &seed),
                Err(Error::Shape { .. })
            ),
            "{device}: fused, {bad} classes"
        );
    }
    match cross_entropy_padded(&x, &[0, 5], 5) {
        Err(Error::InvalidArgument(msg)) => {
            assert!(
                msg.contains("target 5 at row 1") && msg.contains("0..5"),
                "{msg}"
            )
        }
        other => panic!("{device}: a target in the padding: {other:?}"),
    }
    let tape = Tape::new();
    assert!(matches!(
        cross_entropy_fused_padded(x.track(&tape), &[6, 0], 5, &seed),
        Err(Error::InvalidArgument(_))
    ));
    // All 8 columns as classes is plain cross_entropy.
    assert_eq!(
        bits(&cross_entropy_padded(&x, &[0, 7], 8).unwrap()),
        bits(&cross_entropy(&x, &[0, 7]).unwrap())
    );
}
crate::test_device!(padded_errors, padded_rejects_bad_classes);
