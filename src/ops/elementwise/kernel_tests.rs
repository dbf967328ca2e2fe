//! Kernel-level tests (DESIGN §6) of the elementwise ops on every backend present: each
//! op against the f64 CPU reference over odd sizes and the three storage dtypes, the
//! kernels against the CPU engine bit for bit where the math is the same, and the
//! backward through the tape. Device outputs start as NaN (fresh buffers are poisoned),
//! so an element a kernel forgets to write fails the comparison.

use super::*;
use crate::Tape;
use crate::testing::{assert_close, rand_tensor, rng};

/// Sizes around the block (256) and the simulator's grid cap (8 × 256), plus 0 and 1.
const SIZES: [usize; 9] = [0, 1, 7, 63, 65, 127, 1000, 2049, 4099];
const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

use crate::testing::rel_l2_tolerance as tol;

/// `t`'s values as a tensor of `dtype` on `device`.
fn on(t: &Tensor, dtype: DType, device: &Device) -> Tensor {
    Tensor::from_vec_as(t.to_vec_f64().unwrap(), t.shape().clone(), dtype, device).unwrap()
}

/// Panics at the first element whose bits differ (NaN included), naming it.
#[track_caller]
fn assert_same_bits(name: &str, got: &Tensor, want: &Tensor) {
    let (g, w) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    assert_eq!(g.len(), w.len(), "{name}: lengths");
    if let Some(i) = (0..g.len()).find(|&i| g[i].to_bits() != w[i].to_bits()) {
        panic!(
            "{name}: element {i} is {:e}, the reference {:e}",
            g[i], w[i]
        );
    }
}

fn forward_ops_match_the_reference(device: &Device) {
    let mut g = rng("elementwise_forward");
    for &n in &SIZES {
        let cols = [100, 64, 7, 1]
            .into_iter()
            .find(|c| n % c == 0 && *c <= n.max(1))
            .unwrap_or(1);
        let x = rand_tensor(&mut g, [n / cols, cols], -4.0, 4.0);
        let y = rand_tensor(&mut g, [n / cols, cols], -4.0, 4.0);
        let b = rand_tensor(&mut g, [cols], -1.0, 1.0);
        for dt in DTYPES {
            let (xd, yd, bd) = (on(&x, dt, device), on(&y, dt, device), on(&b, dt, device));
            // The reference: f64 on the CPU, from the same (already rounded) inputs.
            let (x64, y64, b64) = (
                on(&xd, DType::F64, &Device::Cpu),
                on(&yd, DType::F64, &Device::Cpu),
                on(&bd, DType::F64, &Device::Cpu),
            );
            let cases: [(&str, Tensor, Tensor); 5] = [
                ("add", add(&xd, &yd).unwrap(), add(&x64, &y64).unwrap()),
                (
                    "bias_add",
                    bias_add(&xd, &bd).unwrap(),
                    bias_add(&x64, &b64).unwrap(),
                ),
                ("gelu", gelu(&xd).unwrap(), gelu(&x64).unwrap()),
                (
                    "scale",
                    scale(&xd, -0.75).unwrap(),
                    scale(&x64, -0.75).unwrap(),
                ),
                (
                    "bias_grad",
                    bias_grad(&xd, cols).unwrap(),
                    bias_grad(&x64, cols).unwrap(),
                ),
            ];
            for (op, got, want) in cases {
                assert_eq!(
                    (got.device(), got.dtype(), got.dims()),
                    (*device, dt, want.dims()),
                    "{op}"
                );
                let name = format!("{op} {dt} n={n} on {device}");
                // DESIGN §6's rel-L2 bound, relative to the size of what the result is
                // computed from where that is larger than the result: GELU cancels
                // (0.5·x·(1 + tanh) for x ≪ 0) and a column sum of `rows` terms cancels
                // and accumulates √rows roundings.
                let l2 = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
                let want_v = want.to_vec_f64().unwrap();
                let x_v = x64.to_vec_f64().unwrap();
                let scale = match op {
                    "gelu" => l2(&x_v),
                    "bias_grad" => {
                        let rows = (n / cols) as f64;
                        let mut abs_sums = vec![0.0; cols];
                        for (i, v) in x_v.iter().enumerate() {
                            abs_sums[i % cols] += v.abs();
                        }
                        l2(&abs_sums) * rows.sqrt()
                    }
                    _ => 0.0,
                };
                let tol = tol(dt) * (scale / l2(&want_v)).max(1.0);
                assert_close(
                    &name,
                    &got.to_vec_f64().unwrap(),
                    &want.to_vec_f64().unwrap(),
                    tol,
                );
            }
        }
    }
}
crate::test_device!(elementwise_forward, forward_ops_match_the_reference);

/// On a kernel device, the ops whose math is the CPU engine's (one f32 operation, one
/// rounding) agree with it bit for bit; GELU's tanh differs by a few f32 ulps at most.
fn kernels_equal_the_cpu_engine(device: &Device) {
    if *device == Device::Cpu {
        println!(
            "kernels_equal_the_cpu_engine on cpu: nothing to compare (the CPU is the reference)"
        );
        return;
    }
    let mut g = rng("elementwise_bitwise");
    // 129 columns: the scalar bias path; 64 and 1000: 16-byte vectors of x and the bias
    // (1000: for f32 only, 1000 mod 8 = 0 too, so every dtype) with a grid-stride wrap.
    for (rows, cols) in [(37, 129), (9, 64), (5, 1000)] {
        bitwise_at(device, &mut g, rows, cols);
    }
}

fn bitwise_at(device: &Device, g: &mut impl rand::Rng, rows: usize, cols: usize) {
    let x = rand_tensor(g, [rows, cols], -6.0, 6.0);
    let y = rand_tensor(g, [rows, cols], -6.0, 6.0);
    let b = rand_tensor(g, [cols], -1.0, 1.0);
    for dt in DTYPES {
        let (xd, yd, bd) = (on(&x, dt, device), on(&y, dt, device), on(&b, dt, device));
        let cpu = Device::Cpu;
        let (xc, yc, bc) = (on(&x, dt, &cpu), on(&y, dt, &cpu), on(&b, dt, &cpu));
        let exact: [(&str, Tensor, Tensor); 4] = [
            ("add", add(&xd, &yd).unwrap(), add(&xc, &yc).unwrap()),
            (
                "bias_add",
                bias_add(&xd, &bd).unwrap(),
                bias_add(&xc, &bc).unwrap(),
            ),
            ("scale", scale(&xd, 0.3).unwrap(), scale(&xc, 0.3).unwrap()),
            (
                "bias_grad",
                bias_grad(&xd, cols).unwrap(),
                bias_grad(&xc, cols).unwrap(),
            ),
        ];
        for (op, got, want) in exact {
            assert_same_bits(&format!("{op} {dt} on {device}"), &got, &want);
        }
        for to in DTYPES {
            let got = xd.to_dtype(to).unwrap();
            assert_eq!((got.device(), got.dtype()), (*device, to));
            let want = xc.to_dtype(to).unwrap();
            assert_same_bits(&format!("cast {dt} -> {to} on {device}"), &got, &want);
        }
        let (gd, gc) = (gelu(&xd).unwrap(), gelu(&xc).unwrap());
        assert_close(
            &format!("gelu {dt} vs CPU engine"),
            &gd.to_vec_f64().unwrap(),
            &gc.to_vec_f64().unwrap(),
            if dt == DType::F32 { 1e-6 } else { tol(dt) },
        );
    }
}
crate::test_device!(elementwise_bitwise, kernels_equal_the_cpu_engine);

/// The vectorised kernels on buffers that are not 16-byte aligned (one element past an
/// allocation's start, as a view would be): they take the scalar path and give the same
/// bits as the aligned launch; the element before the view stays poisoned (NaN).
fn misaligned_buffers(device: &Device) {
    use crate::device::{Backend, LaunchConfig};
    use crate::storage::{DeviceStorage, Storage};
    if *device == Device::Cpu {
        println!("misaligned_buffers on cpu: no kernels");
        return;
    }
    let mut g = rng("elementwise_misaligned");
    let backend = Backend::of(*device).unwrap();
    let n = 1001;
    for dt in DTYPES {
        let es = dt.size_in_bytes() as u64;
        let x = on(&rand_tensor(&mut g, [n + 1], -4.0, 4.0), dt, device);
        let y = on(&rand_tensor(&mut g, [n + 1], -4.0, 4.0), dt, device);
        // The aligned reference: the same values, from element 1 on, in fresh tensors.
        let host = |t: &Tensor| t.to_vec_f64().unwrap()[1..].to_vec();
        let xa = Tensor::from_vec_as(host(&x), [n], dt, device).unwrap();
        let ya = Tensor::from_vec_as(host(&y), [n], dt, device).unwrap();
        let cases = [
            ("add_fwd", add(&xa, &ya).unwrap()),
            ("gelu_fwd", gelu(&xa).unwrap()),
            ("gelu_bwd", cuda::gelu_bwd(&ya, &xa).unwrap()),
            ("scale_fwd", scale(&xa, 0.5).unwrap()),
        ];
        for (k, want) in cases {
            let out = DeviceStorage::alloc(dt, n + 1, *device).unwrap();
            let ptr = |t: &Tensor| match &*t.storage() {
                Storage::Device(d) => d.device_ptr(),
                Storage::Cpu(_) => unreachable!("a device tensor"),
            };
            let params = cuda::ElementwiseParams {
                x: ptr(&x) + es,
                y: if k == "gelu_fwd" || k == "scale_fwd" {
                    0
                } else {
                    ptr(&y) + es
                },
                out: out.device_ptr() + es,
                n: n as u64,
                alpha: 0.5,
                ..Default::default()
            };
            let cfg = LaunchConfig::grid_stride(n, 256, backend.max_blocks());
            let name = format!("{k}_{}", cuda::suffix(dt).unwrap());
            backend.launch(&name, &cfg, &params).unwrap();
            let got = Tensor::from_storage(Storage::Device(out), Shape::from([n + 1]))
                .unwrap()
                .to_vec_f64()
                .unwrap();
            assert!(got[0].is_nan(), "{name}: wrote before its output");
            let want = want.to_vec_f64().unwrap();
            if let Some(i) = (0..n).find(|&i| got[i + 1].to_bits() != want[i].to_bits()) {
                panic!(
                    "{name} misaligned: element {i} is {:e}, aligned {:e}",
                    got[i + 1],
                    want[i]
                );
            }
        }
    }
}
crate::test_device!(elementwise_misaligned, misaligned_buffers);

/// Casts of special values: ±0, ±inf, NaN, subnormals, overflow and halfway cases round
/// as the `half` crate does (nearest even).
fn casts_round_to_nearest_even(device: &Device) {
    let specials: Vec<f32> = vec![
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0,
        -1.0,
        65504.0,
        65520.0,
        1e6,
        -1e6,
        6.0e-8,
        3.0e-8,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        3.389_531_4e38,
        f32::MAX,
    ];
    let x = Tensor::from_vec(specials.clone(), [specials.len()], device).unwrap();
    for to in [DType::BF16, DType::F16] {
        let got = x.to_dtype(to).unwrap().to_vec_f64().unwrap();
        let want = Tensor::from_vec(specials.clone(), [specials.len()], &Device::Cpu)
            .unwrap()
            .to_dtype(to)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        for ((g, w), s) in got.iter().zip(&want).zip(&specials) {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{s:e} -> {to} on {device}: {g:e} vs {w:e}"
            );
        }
    }
    let nan = Tensor::from_vec(vec![f32::NAN], [1], device).unwrap();
    for to in [DType::BF16, DType::F16] {
        assert!(
            nan.to_dtype(to).unwrap().to_vec_f64().unwrap()[0].is_nan(),
            "NaN -> {to} on {device}"
        );
    }
}
crate::test_device!(elementwise_cast_specials, casts_round_to_nearest_even);

/// The backward of `z = gelu(bias_add(x, b)) + scale(x, 2)` through the tape on `device`
/// equals the CPU engine's in the same dtype (f32) within f32 rounding.
fn backward_through_the_tape(device: &Device) {
    let mut g = rng("elementwise_backward");
    let (rows, cols) = (9, 65);
    let x0 = rand_tensor(&mut g, [rows, cols], -3.0, 3.0);
    let b0 = rand_tensor(&mut g, [cols], -1.0, 1.0);
    let seed0 = rand_tensor(&mut g, [rows, cols], -1.0, 1.0);
    let run = |dev: &Device| {
        let tape = Tape::new();
        let x = on(&x0, DType::F32, dev).track(&tape);
        let b = on(&b0, DType::F32, dev).track(&tape);
        let z = add(
            &gelu(&bias_add(&x, &b).unwrap()).unwrap(),
            &scale(&x, 2.0).unwrap(),
        )
        .unwrap();
        let grads = tape.backward_with(&z, on(&seed0, DType::F32, dev)).unwrap();
        let gx = grads.get(&x).unwrap().clone();
        let gb = grads.get(&b).unwrap().clone();
        assert_eq!((gx.device(), gb.device()), (*dev, *dev));
        (
            z.to_vec_f64().unwrap(),
            gx.to_vec_f64().unwrap(),
            gb.to_vec_f64().unwrap(),
        )
    };
    let (z, gx, gb) = run(device);
    let (zc, gxc, gbc) = run(&Device::Cpu);
    assert_close(&format!("z on {device}"), &z, &zc, 1e-6);
    assert_close(&format!("dz/dx on {device}"), &gx, &gxc, 1e-6);
    assert_close(&format!("dz/db on {device}"), &gb, &gbc, 1e-6);
}
crate::test_device!(elementwise_backward, backward_through_the_tape);

#[test]
fn params_match_the_kernels() {
    for k in crate::device::kernels::module_of("add_fwd_f32")
        .unwrap()
        .kernels
    {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::ElementwiseParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}
