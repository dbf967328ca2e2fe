//! Kernel-level tests (DESIGN §6) of causal attention on every backend present: forward
//! and backward (through the tape) against the f64 CPU reference on the same rounded
//! inputs, over T = 1, 5, 37, 70, B = 1 and 2, head dims 1, 3, 4 and 16, and the three
//! storage dtypes. Device outputs start as NaN
//! (fresh buffers are poisoned), so an element a kernel forgets to write fails the
//! comparison; two runs must agree bit for bit (no atomics, fixed reduction order).

use super::*;
use crate::testing::{assert_close, rand_tensor, rng};
use crate::DType;

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// (B, T, C, H): hd = 3, 4, 16 and 1.
const SHAPES: [(usize, usize, usize, usize); 7] = [
    (1, 1, 6, 2),
    (2, 5, 12, 3),
    (1, 37, 6, 2),
    (2, 37, 12, 3),
    (1, 70, 64, 4),
    (2, 70, 6, 2),
    (2, 5, 3, 3),
];

/// Rel-L2 tolerance against the f64 reference on the same rounded inputs: only the f32
/// compute and the one output rounding differ.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        DType::F64 => 1e-12,
    }
}

/// `t`'s values as a tensor of `dtype` on `device`.
fn on(t: &Tensor, dtype: DType, device: &Device) -> Tensor {
    Tensor::from_vec_as(t.to_vec_f64().unwrap(), t.shape().clone(), dtype, device).unwrap()
}

/// The bit patterns of a tensor's values (widened exactly to f64).
fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Forward and backward of `x` on its device with the seed `gy`: `(y, dx)`.
fn run(x: &Tensor, gy: &Tensor, h: usize) -> (Tensor, Tensor) {
    let tape = Tape::new();
    let xt = x.track(&tape);
    let y = causal_attention(&xt, h).unwrap();
    let g = tape.backward_with(&y, gy.clone()).unwrap();
    let gx = g.get(&xt).unwrap().clone();
    (y, gx)
}

fn attention_matches_the_reference(device: &Device) {
    let mut r = rng("attention_kernel");
    for (b, t, c, h) in SHAPES {
        let x = rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0);
        let gy = rand_tensor(&mut r, [b, t, c], -1.0, 1.0);
        for dtype in DTYPES {
            let name = format!("{device} {dtype} B{b} T{t} C{c} H{h}");
            let (xd, gd) = (on(&x, dtype, device), on(&gy, dtype, device));
            let (x64, g64) = (
                on(&xd, DType::F64, &Device::Cpu),
                on(&gd, DType::F64, &Device::Cpu),
            );
            let (y, gx) = run(&xd, &gd, h);
            let (y64, gx64) = run(&x64, &g64, h);
            assert_eq!(y.dtype(), dtype, "{name}");
            assert_eq!(y.dims(), &[b, t, c], "{name}");
            assert_eq!(y.device(), *device, "{name}");
            assert_eq!(gx.dtype(), dtype, "{name}");
            assert_eq!(gx.dims(), &[b, t, 3 * c], "{name}");
            assert_close(
                &format!("{name}: y"),
                &y.to_vec_f64().unwrap(),
                &y64.to_vec_f64().unwrap(),
                tol(dtype),
            );
            assert_close(
                &format!("{name}: dqkv"),
                &gx.to_vec_f64().unwrap(),
                &gx64.to_vec_f64().unwrap(),
                tol(dtype),
            );
            // A second run gives the same bits (fixed reduction order, no atomics).
            let (y2, gx2) = run(&xd, &gd, h);
            assert_eq!(bits(&y), bits(&y2), "{name}: y differs between runs");
            assert_eq!(bits(&gx), bits(&gx2), "{name}: dqkv differs between runs");
        }
    }
}
crate::test_device!(matches_reference, attention_matches_the_reference);

fn attention_is_causal_and_handles_empty_inputs(device: &Device) {
    let mut r = rng("attention_kernel_causal");
    let (b, t, c, h, t0) = (2, 37, 12, 3, 20);
    let x = rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0);
    // A gradient only on rows < t0 gives exactly zero gradient to positions ≥ t0.
    let mut seed = rand_tensor(&mut r, [b, t, c], -1.0, 1.0)
        .to_vec_f64()
        .unwrap();
    for bi in 0..b {
        seed[(bi * t + t0) * c..(bi * t + t) * c].fill(0.0);
    }
    let seed = Tensor::from_vec(seed, [b, t, c], &Device::Cpu).unwrap();
    let (_, gx) = run(
        &on(&x, DType::F32, device),
        &on(&seed, DType::F32, device),
        h,
    );
    let gx = gx.to_vec_f64().unwrap();
    for bi in 0..b {
        let late = &gx[(bi * t + t0) * 3 * c..(bi * t + t) * 3 * c];
        assert!(
            late.iter().all(|&g| g == 0.0),
            "{device}: gradient reached future positions"
        );
    }
    for dims in [[0, 3, 12], [2, 0, 12]] {
        let z = Tensor::zeros(dims, DType::F32, device).unwrap();
        let (y, gx) = run(
            &z,
            &Tensor::zeros([dims[0], dims[1], 4], DType::F32, device).unwrap(),
            2,
        );
        assert_eq!(y.dims(), &[dims[0], dims[1], 4]);
        assert_eq!(gx.dims(), &dims);
    }
    if *device != Device::Cpu {
        // f64 cannot live on a device; bad shapes are errors there too.
        let z = Tensor::zeros([1, 4, 24], DType::F32, device).unwrap();
        assert!(causal_attention(&z, 5).is_err());
        assert!(causal_attention(&z, 0).is_err());
    }
}
crate::test_device!(
    causal_and_empty,
    attention_is_causal_and_handles_empty_inputs
);

#[test]
fn params_match_the_kernels() {
    for k in cuda::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::AttentionParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}
