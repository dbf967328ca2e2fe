//! Kernel-level tests (DESIGN §6) of causal attention on every backend present: forward
//! and backward (through the tape) against the f64 CPU reference on the same rounded
//! inputs, over T = 1, 5, 37, 40, 70, 130 (one to five 32-row tiles, ending mid-tile, and
//! several 8- and 16-row inner tiles), B = 1 and 2, head dims 1, 3, 4, 5, 16, 64 and 128 (the
//! inner tiles 32, 16 and 8), and the three storage dtypes. Device outputs start as NaN
//! (fresh buffers are poisoned), so an element a kernel forgets to write fails the
//! comparison; two runs must agree bit for bit (no atomics, fixed reduction order; on the
//! CPU and a GPU: see `testing::rerun_can_differ`). On a
//! device also: the forward keeps O(T) bytes for the backward (no `[B, H, T, T]` tensor),
//! and the launcher rejects bad inputs with an error. The tensor-core kernels (bf16/f16 at
//! hd 64 and 128) have their own sweep over T = 1, 7, 63, 65, 127, 130 and a small
//! multi-tile test for the planted-bug checks.

use super::*;
use crate::DType;
use crate::testing::{assert_close, rand_tensor, rerun_can_differ, rng};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// (B, T, C, H): hd = 3, 4, 16, 1, 5, 64 and 128.
const SHAPES: [(usize, usize, usize, usize); 10] = [
    (1, 1, 6, 2),
    (2, 5, 12, 3),
    (1, 37, 6, 2),
    (2, 37, 12, 3),
    (1, 70, 64, 4),
    (2, 70, 6, 2),
    (2, 5, 3, 3),
    (1, 130, 10, 2),
    (1, 130, 64, 1),
    (1, 40, 128, 1),
];

use crate::testing::rel_l2_tolerance as tol;

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
            // On the simulator (whose emulated mma.sync is slow) the tensor-core kernels are
            // left to their own sweep (`tensor_cores`), which covers these shapes' cases.
            if *device == Device::Sim && cuda::tc_path(dtype, c / h).is_some() {
                continue;
            }
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
            if rerun_can_differ(device) {
                let (y2, gx2) = run(&xd, &gd, h);
                assert_eq!(bits(&y), bits(&y2), "{name}: y differs between runs");
                assert_eq!(bits(&gx), bits(&gx2), "{name}: dqkv differs between runs");
            }
        }
    }
}
crate::test_device!(matches_reference, attention_matches_the_reference);

/// Forward and backward of `(b, t, c, h)` in bf16 and f16 against the f64 reference with
/// the usual tolerances, twice, bit for bit.
fn check_tc_shapes(device: &Device, seed: &str, shapes: &[(usize, usize, usize, usize)]) {
    let mut r = rng(seed);
    for &(b, t, c, h) in shapes {
        let x = rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0);
        let gy = rand_tensor(&mut r, [b, t, c], -1.0, 1.0);
        for dtype in [DType::BF16, DType::F16] {
            let path = cuda::tc_path(dtype, c / h).map_or("SIMT", |_| "tensor cores");
            let name = format!("{device} {dtype} B{b} T{t} C{c} H{h} ({path})");
            let (xd, gd) = (on(&x, dtype, device), on(&gy, dtype, device));
            let (x64, g64) = (
                on(&xd, DType::F64, &Device::Cpu),
                on(&gd, DType::F64, &Device::Cpu),
            );
            let (y, gx) = run(&xd, &gd, h);
            let (y64, gx64) = run(&x64, &g64, h);
            assert_eq!(y.dims(), &[b, t, c], "{name}");
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
            if rerun_can_differ(device) {
                let (y2, gx2) = run(&xd, &gd, h);
                assert_eq!(bits(&y), bits(&y2), "{name}: y differs between runs");
                assert_eq!(bits(&gx), bits(&gx2), "{name}: dqkv differs between runs");
            }
        }
    }
}

/// The tensor-core (FlashAttention-2) kernels over several tiles of every kind: hd 64 at
/// T = 130 (three 64-row blocks and K/V tiles, Q/gy tiles of 64, the last cut by T) and
/// hd 128 at T = 65 (K/V tiles of 32, dkv query tiles of 16, two blocks): the cp.async
/// pipelines turn over more than once, the softmax rescales. Small enough for the
/// planted-bug checks (the header of `kernels/attention.cu`).
fn attention_tensor_core_pipelines(device: &Device) {
    check_tc_shapes(
        device,
        "attention_tc_pipeline",
        &[(1, 130, 64, 1), (1, 65, 128, 1)],
    );
}
crate::test_device!(tc_pipelines, attention_tensor_core_pipelines);

/// The tensor-core kernels at every edge: bf16 and f16 at head dims 64 and 128 over T = 1,
/// 7, 63, 65, 127, 130 (one to three 64-row blocks, partial K/V tiles of 64, 32 and 16
/// rows, the diagonal tile cut by T), and B = H = 2 at one T. hd 64 at T = 130 and hd 128
/// at T = 65 are `tc_pipelines`' shapes, not run twice.
fn attention_tensor_cores_match_the_reference(device: &Device) {
    let mut shapes = Vec::new();
    for t in [1, 7, 63, 65, 127, 130] {
        if t != 130 {
            shapes.push((1, t, 64, 1));
        }
        if t != 65 {
            shapes.push((1, t, 128, 1));
        }
    }
    shapes.extend([(2, 65, 128, 2), (1, 65, 64, 2)]);
    check_tc_shapes(device, "attention_tc", &shapes);
}
crate::test_device!(tensor_cores, attention_tensor_cores_match_the_reference);

/// Head dims 64 and 128 of bf16 and f16 take the tensor cores, everything else the SIMT
/// kernels; every tensor-core kernel fits 48 KiB of dynamic shared memory (no opt-in).
#[test]
fn tensor_core_path_and_shared_memory() {
    for dtype in [DType::BF16, DType::F16] {
        for hd in [64, 128] {
            let tc = cuda::tc_path(dtype, hd).unwrap();
            for bytes in [tc.fwd_bytes(), tc.dq_bytes(), tc.dkv_bytes()] {
                assert!(bytes <= cuda::SMEM_BUDGET, "{dtype} hd {hd}: {bytes} bytes");
            }
        }
        for hd in [1, 16, 32, 63, 80, 96, 127] {
            assert_eq!(cuda::tc_path(dtype, hd), None, "{dtype} hd {hd}");
        }
    }
    assert_eq!(cuda::tc_path(DType::F32, 64), None);
}

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

/// At hd = 64 (GPT-2) every kernel takes the 32-row inner tile; at 128 the smaller ones;
/// every head dim the kernels take fits the 48 KiB budget; larger ones are errors.
#[test]
fn tiles_fit_the_shared_memory_budget() {
    use cuda::{Kernel, MAX_HEAD_DIM, SMEM_BUDGET, shared_bytes, tile};
    let kernels = [Kernel::Fwd, Kernel::Dq, Kernel::Dkv];
    for k in kernels {
        assert_eq!(tile(k, 64).unwrap().0, 32, "{k:?}");
        for hd in 1..=MAX_HEAD_DIM {
            let (bc, bytes) = tile(k, hd).unwrap();
            assert!(bytes <= SMEM_BUDGET, "{k:?} hd {hd}: {bytes} bytes");
            assert_eq!(bytes, shared_bytes(k, hd, bc));
            assert!(bc == 32 || shared_bytes(k, hd, 2 * bc) > SMEM_BUDGET);
        }
        assert!(matches!(
            tile(k, MAX_HEAD_DIM + 1),
            Err(Error::Unsupported { .. })
        ));
    }
    let at128: Vec<usize> = kernels.iter().map(|&k| tile(k, 128).unwrap().0).collect();
    assert_eq!(at128, [16, 8, 8]);
}

/// The device forward keeps O(T) bytes for the backward: after it, with the tape (and so
/// the saved state) alive, the device holds far less than one `[B, H, T, T]` f32 tensor
/// more than before, and the backward's peak stays below that too. Other tests allocate on
/// the same device concurrently (the counters are per device), which can only be ruled out
/// by retrying: the check passes when one of a few attempts is clean.
fn attention_saves_o_t_bytes(device: &Device) {
    if *device == Device::Cpu {
        return; // the CPU path saves P by design (see the module docs)
    }
    let (b, t, c, h) = (1, 512, 8, 2);
    let p_bytes = (4 * b * h * t * t) as i64; // 2 MiB
    let bound = p_bytes / 4;
    let mut r = rng("attention_memory");
    let x = on(
        &rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0),
        DType::F32,
        device,
    );
    let gy = on(
        &rand_tensor(&mut r, [b, t, c], -1.0, 1.0),
        DType::F32,
        device,
    );
    let mut attempts = Vec::new();
    for _ in 0..4 {
        let before = device.memory_stats().in_use_bytes as i64;
        device.reset_peak_memory();
        let tape = Tape::new();
        let xt = x.track(&tape);
        let y = causal_attention(&xt, h).unwrap();
        let stats = device.memory_stats();
        let (held, fwd_peak) = (
            stats.in_use_bytes as i64 - before,
            stats.peak_bytes as i64 - before,
        );
        device.reset_peak_memory();
        let g = tape.backward_with(&y, gy.clone()).unwrap();
        let bwd_peak = device.memory_stats().peak_bytes as i64 - before;
        assert_eq!(g.get(&xt).unwrap().dims(), &[b, t, 3 * c]);
        attempts.push((held, fwd_peak, bwd_peak));
        if held < bound && fwd_peak < bound && bwd_peak < bound {
            println!(
                "{device}: held after the forward {held} B, forward peak {fwd_peak} B, \
                 backward peak {bwd_peak} B ([B, H, T, T] f32: {p_bytes} B)"
            );
            return;
        }
    }
    panic!(
        "{device}: the attention holds O(T²) bytes: (after the forward, forward peak, \
         backward peak) over the bytes before, per attempt: {attempts:?}; a [B, H, T, T] \
         f32 tensor is {p_bytes} bytes, the bound {bound}"
    );
}
crate::test_device!(saves_o_t_bytes, attention_saves_o_t_bytes);

/// The launcher refuses inputs of the wrong dtype, shape or device with an error (no
/// launch), and a head dim past the kernels' bound.
fn attention_launcher_rejects_bad_inputs(device: &Device) {
    if *device == Device::Cpu {
        return; // no launcher on the CPU
    }
    let d = Dims {
        b: 2,
        t: 5,
        c: 12,
        h: 3,
    };
    let z = |dims: &[usize], dtype: DType| Tensor::zeros(dims, dtype, device).unwrap();
    let qkv = z(&[2, 5, 36], DType::BF16);
    let (y, lse) = cuda::forward(&qkv, d).unwrap();
    assert_eq!(lse.dims(), &[2, 3, 5]);
    assert_eq!(lse.dtype(), DType::F32);
    let gy = z(&[2, 5, 12], DType::BF16);
    assert!(cuda::backward(&qkv, &y, &lse, &gy, d).is_ok());
    let cpu_lse = Tensor::zeros([2, 3, 5], DType::F32, &Device::Cpu).unwrap();
    let bad: [(&str, Tensor, Tensor, Tensor); 7] = [
        ("lse f16", y.clone(), z(&[2, 3, 5], DType::F16), gy.clone()),
        (
            "lse [2, 5, 3]",
            y.clone(),
            z(&[2, 5, 3], DType::F32),
            gy.clone(),
        ),
        (
            "lse [2, 3, 5, 5]",
            y.clone(),
            z(&[2, 3, 5, 5], DType::F32),
            gy.clone(),
        ),
        ("lse on the CPU", y.clone(), cpu_lse, gy.clone()),
        ("y f32", z(&[2, 5, 12], DType::F32), lse.clone(), gy.clone()),
        (
            "y [2, 5, 36]",
            z(&[2, 5, 36], DType::BF16),
            lse.clone(),
            gy.clone(),
        ),
        (
            "gy [2, 4, 12]",
            y.clone(),
            lse.clone(),
            z(&[2, 4, 12], DType::BF16),
        ),
    ];
    for (what, y, lse, gy) in bad {
        assert!(
            cuda::backward(&qkv, &y, &lse, &gy, d).is_err(),
            "{device}: backward with {what} was accepted"
        );
    }
    // qkv that does not match the dims, and a head dim past 128.
    assert!(cuda::forward(&z(&[2, 5, 33], DType::BF16), d).is_err());
    let wide = z(&[1, 3, 3 * 258], DType::F32);
    assert!(matches!(
        causal_attention(&wide, 2),
        Err(Error::Unsupported { .. })
    ));
    assert!(causal_attention(&z(&[1, 3, 3 * 256], DType::F32), 2).is_ok());
}
crate::test_device!(rejects_bad_inputs, attention_launcher_rejects_bad_inputs);

/// Every `__syncthreads()` and `cp_async_wait` the attention kernels reach is load-bearing:
/// with any one deleted (the simulator's mutation sites), this small probe fails. It runs
/// forward and backward of the tensor-core kernels at hd 64 (T = 130: three query blocks,
/// K/V pipelines that turn over) and hd 128 (T = 65), and of the SIMT kernels (f32, hd 16).
#[test]
fn every_barrier_and_wait_is_load_bearing() {
    let probe = |(b, t, c, h): (usize, usize, usize, usize), dtype: DType| {
        move || {
            let mut r = rng("attention_mutants");
            let x = rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0);
            let gy = rand_tensor(&mut r, [b, t, c], -1.0, 1.0);
            let (xd, gd) = (on(&x, dtype, &Device::Sim), on(&gy, dtype, &Device::Sim));
            let (x64, g64) = (
                on(&xd, DType::F64, &Device::Cpu),
                on(&gd, DType::F64, &Device::Cpu),
            );
            let (y, gx) = run(&xd, &gd, h);
            let (y64, gx64) = run(&x64, &g64, h);
            let name = format!("{dtype} B{b} T{t} C{c} H{h}");
            let v = |t: &Tensor| t.to_vec_f64().unwrap();
            assert_close(&format!("{name}: y"), &v(&y), &v(&y64), tol(dtype));
            assert_close(&format!("{name}: dqkv"), &v(&gx), &v(&gx64), tol(dtype));
        }
    };
    // A mutant reruns the probes that reached its site in this order and stops at the first
    // failure: the cheapest tensor-core probe (T²·hd half of the other's) goes first.
    let probes = [
        probe((1, 65, 128, 1), DType::F16),
        probe((1, 130, 64, 1), DType::BF16),
        probe((1, 70, 64, 4), DType::F32),
    ];
    let probes: Vec<&dyn Fn()> = probes.iter().map(|p| p as &dyn Fn()).collect();
    crate::device::sim_mutation::assert_every_site_is_load_bearing(
        "attention",
        &["attention_"],
        &probes,
    );
}

// ---- The Hopper forward (kernels/attention_wgmma.cu) ----

/// Where a test of the wgmma kernel can run (`testing::hopper_kernel_runs_on`).
fn wgmma_runs_on(device: &Device) -> bool {
    crate::testing::hopper_kernel_runs_on(device, wgmma::KERNELS[0])
}

/// (B, T, C, H) of the wgmma checks: head dims 64 (forward and backward) and 128 (the
/// forward); one to three 128-row blocks (three: every kernel's stages turn over, their
/// barriers reach a second phase); B = 2 and H = 2 (the tensor maps span every batch's rows
/// and every head's columns: a block must read its own).
const WGMMA_SHAPES: [(usize, usize, usize, usize); 3] =
    [(2, 128, 128, 2), (1, 384, 64, 1), (1, 256, 256, 2)];

/// The f64 logsumexp `lse [B, H, T]` of each row's scaled, causally masked scores (what the
/// device forwards save for the backward), from an f64 `qkv` on the CPU.
fn reference_lse(x64: &Tensor, d: cpu::Dims) -> Vec<f64> {
    let q = x64.to_vec_f64().unwrap();
    let hd = d.c / d.h;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = Vec::with_capacity(d.b * d.h * d.t);
    for b in 0..d.b {
        for h in 0..d.h {
            for i in 0..d.t {
                let row = |t: usize, block: usize| (b * d.t + t) * 3 * d.c + block * d.c + h * hd;
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|e| q[row(i, 0) + e] * q[row(j, 1) + e])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                out.push(m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln());
            }
        }
    }
    out
}

/// The wgmma forward against the f64 reference (y and lse, which the backward reads), and
/// the backward a Hopper GPU runs from them against the reference too: at hd 64 the wgmma
/// backward, at hd 128 the sm_80 one. Both against themselves (two runs, bit for bit).
fn check_wgmma(device: &Device, shapes: &[(usize, usize, usize, usize)]) {
    let mut r = rng("attention_wgmma");
    for &(b, t, c, h) in shapes {
        let d = cpu::Dims { b, t, c, h };
        let x = rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0);
        let gy = rand_tensor(&mut r, [b, t, c], -1.0, 1.0);
        let hopper_backward = c / h == 64;
        for dtype in [DType::BF16, DType::F16] {
            let name = format!("{device} {dtype} B{b} T{t} C{c} H{h} (wgmma)");
            let (xd, gd) = (on(&x, dtype, device), on(&gy, dtype, device));
            let (x64, g64) = (
                on(&xd, DType::F64, &Device::Cpu),
                on(&gd, DType::F64, &Device::Cpu),
            );
            let (y, lse) = cuda::forward_on(&xd, d, true).unwrap();
            let (y64, gx64) = run(&x64, &g64, h);
            assert_eq!(y.dims(), &[b, t, c], "{name}");
            let v = |t: &Tensor| t.to_vec_f64().unwrap();
            assert_close(&format!("{name}: y"), &v(&y), &v(&y64), tol(dtype));
            assert_close(
                &format!("{name}: lse"),
                &v(&lse),
                &reference_lse(&x64, d),
                tol(DType::F32),
            );
            if !hopper_backward {
                let gx = cuda::backward_on(&xd, &y, &lse, &gd, d, false).unwrap();
                assert_close(
                    &format!("{name}: sm_80 dqkv from the wgmma forward's y and lse"),
                    &v(&gx),
                    &v(&gx64),
                    tol(dtype),
                );
            }
            let backward = || cuda::backward_on(&xd, &y, &lse, &gd, d, true).unwrap();
            let gx = hopper_backward.then(backward);
            if let Some(gx) = &gx {
                assert_eq!(gx.dims(), &[b, t, 3 * c], "{name}");
                assert_close(
                    &format!("{name}: wgmma dqkv"),
                    &v(gx),
                    &v(&gx64),
                    tol(dtype),
                );
            }
            if rerun_can_differ(device) {
                let (y2, lse2) = cuda::forward_on(&xd, d, true).unwrap();
                assert_eq!(bits(&y), bits(&y2), "{name}: y differs between runs");
                assert_eq!(bits(&lse), bits(&lse2), "{name}: lse differs between runs");
                if let Some(gx) = &gx {
                    assert_eq!(
                        bits(gx),
                        bits(&backward()),
                        "{name}: dqkv differs between runs"
                    );
                }
            }
        }
    }
}

fn wgmma_matches_the_reference(device: &Device) {
    if wgmma_runs_on(device) {
        check_wgmma(device, &WGMMA_SHAPES);
    }
}
crate::test_device!(
    wgmma_matches_reference,
    wgmma_matches_the_reference,
    devices_only
);

/// The forced wgmma forward and backward refuse, with an error naming why, what they cannot
/// take (and launch nothing): f32, head dims other than 64 and 128 (the backward: 64 only),
/// T not a multiple of 128.
fn wgmma_refusals_name_the_reason(device: &Device) {
    if !wgmma_runs_on(device) {
        return;
    }
    let mut r = rng("attention_wgmma_refusals");
    for ((b, t, c, h), dtype, backward, why) in [
        ((1, 128, 64, 1), DType::F32, false, "bf16 and f16 only"),
        ((1, 128, 96, 3), DType::BF16, false, "head dim 32"),
        (
            (1, 130, 64, 1),
            DType::F16,
            false,
            "T = 130 is not a positive multiple of 128",
        ),
        ((1, 0, 64, 1), DType::BF16, false, "T = 0"),
        ((1, 128, 64, 1), DType::F32, true, "bf16 and f16 only"),
        (
            (1, 128, 128, 1),
            DType::BF16,
            true,
            "the backward takes 64 only",
        ),
        (
            (1, 130, 64, 1),
            DType::F16,
            true,
            "T = 130 is not a positive multiple of 128",
        ),
        ((1, 0, 64, 1), DType::BF16, true, "T = 0"),
    ] {
        let d = cpu::Dims { b, t, c, h };
        let x = on(
            &rand_tensor(&mut r, [b, t, 3 * c], -1.0, 1.0),
            dtype,
            device,
        );
        let e = if backward {
            let gy = on(&rand_tensor(&mut r, [b, t, c], -1.0, 1.0), dtype, device);
            let (y, lse) = cuda::forward(&x, d).unwrap();
            cuda::backward_on(&x, &y, &lse, &gy, d, true).map(|_| ())
        } else {
            cuda::forward_on(&x, d, true).map(|_| ())
        };
        let e = e.unwrap_err().to_string();
        let pass = if backward { "backward" } else { "forward" };
        assert!(e.contains(why), "{pass} {dtype} B{b} T{t} C{c} H{h}: {e}");
    }
}
crate::test_device!(wgmma_refusals, wgmma_refusals_name_the_reason, devices_only);

/// The dispatch: the Hopper forward on a GPU with the sm_90a cubin for shapes it takes,
/// unless switched off; never on other GPUs or the simulator's automatic path; forced, an
/// error where it cannot run. The eligibility rules, one by one.
#[test]
fn wgmma_dispatch_picks_hopper_only_where_it_runs() {
    use wgmma::{Target, choose, eligible};
    let hopper = Target::Gpu { sm90a: true };
    let other = Target::Gpu { sm90a: false };
    assert!(choose(false, hopper, None, false).unwrap());
    assert!(!choose(false, hopper, None, true).unwrap(), "disabled");
    assert!(!choose(false, hopper, Some("T = 130"), false).unwrap());
    assert!(!choose(false, other, None, false).unwrap());
    assert!(!choose(false, Target::Simulator, None, false).unwrap());
    assert!(choose(true, Target::Simulator, None, false).unwrap());
    assert!(choose(true, hopper, None, true).unwrap());
    assert!(matches!(
        choose(true, other, None, false),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        choose(true, hopper, Some("T = 130"), false),
        Err(Error::Unsupported { .. })
    ));
    let dims = |b, t, c, h| cpu::Dims { b, t, c, h };
    assert_eq!(
        eligible(DType::BF16, dims(8, 1024, 768, 12), 256),
        None,
        "GPT-2"
    );
    assert_eq!(
        eligible(DType::F16, dims(1, 128, 256, 2), 0),
        None,
        "hd 128"
    );
    for (dtype, d, ptr, why) in [
        (DType::F32, dims(1, 128, 64, 1), 0, "f32"),
        (DType::BF16, dims(1, 128, 96, 1), 0, "head dim 96"),
        (DType::BF16, dims(1, 1000, 768, 12), 0, "T = 1000"),
        (DType::BF16, dims(1 << 21, 1024, 64, 1), 0, "32-bit"),
        (DType::BF16, dims(1, 128, 64, 1), 8, "16-byte aligned"),
    ] {
        let e = eligible(dtype, d, ptr).unwrap_or_default();
        assert!(e.contains(why), "{d:?}: {e}");
    }
    assert!(!crate::ops::hopper_attention_available(&Device::Sim).unwrap());
    assert!(!crate::ops::hopper_attention_available(&Device::Cpu).unwrap());
}

#[test]
fn wgmma_params_match_the_kernels() {
    assert_eq!(std::mem::size_of::<wgmma::WgmmaAttentionParams>(), 192);
    assert_eq!(std::mem::size_of::<wgmma::WgmmaAttentionBwdParams>(), 320);
    for k in wgmma::KERNELS {
        let rust = if k.contains("_bwd_") {
            std::mem::size_of::<wgmma::WgmmaAttentionBwdParams>()
        } else {
            std::mem::size_of::<wgmma::WgmmaAttentionParams>()
        };
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(rust),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
    assert_eq!(wgmma::smem_bytes(64), 83_016);
    assert_eq!(wgmma::smem_bytes(128), 164_936);
    assert_eq!(wgmma::BWD_SMEM_BYTES, 83_000);
}

/// Every barrier and wait of the wgmma forward — the block barrier after the mbarriers'
/// initialisation, the producer's waits for free K and V stages, the consumers' waits for
/// Q, K and V, their wgmma waits — is load-bearing: with any one deleted (a simulator
/// mutation site), this probe fails. Three query blocks: the stages' second round.
#[test]
fn every_wgmma_wait_is_load_bearing() {
    let probe = || {
        let (b, t, c, h) = (1, 384, 64, 1);
        let d = cpu::Dims { b, t, c, h };
        let mut r = rng("attention_wgmma_mutants");
        let x = on(
            &rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0),
            DType::BF16,
            &Device::Sim,
        );
        let (y, lse) = cuda::forward_on(&x, d, true).unwrap();
        let x64 = on(&x, DType::F64, &Device::Cpu);
        let y64 = causal_attention(&x64, h).unwrap();
        assert_close(
            "mutant: y",
            &y.to_vec_f64().unwrap(),
            &y64.to_vec_f64().unwrap(),
            tol(DType::BF16),
        );
        assert_close(
            "mutant: lse",
            &lse.to_vec_f64().unwrap(),
            &reference_lse(&x64, d),
            tol(DType::F32),
        );
    };
    let probes: [&dyn Fn(); 1] = [&probe];
    crate::device::sim_mutation::assert_every_hopper_site_is_load_bearing(
        "attention_wgmma",
        &["attention_wgmma64"],
        &probes,
    );
}

// ---- The Hopper backward (attention_wgmma64_dkv_bwd, attention_wgmma64_dq_bwd) ----

/// The backward's eligibility rules beyond the forward's, one by one.
#[test]
fn wgmma_backward_eligibility() {
    use wgmma::backward_eligible;
    let dims = |b, t, c, h| cpu::Dims { b, t, c, h };
    assert_eq!(
        backward_eligible(DType::BF16, dims(8, 1024, 768, 12), 256, 512),
        None,
        "GPT-2"
    );
    for (dtype, d, qkv, gy, why) in [
        (
            DType::BF16,
            dims(1, 128, 128, 1),
            0,
            0,
            "the backward takes 64 only",
        ),
        (
            DType::F16,
            dims(1, 128, 64, 1),
            0,
            8,
            "gy is not 16-byte aligned",
        ),
        (
            DType::F16,
            dims(1, 128, 64, 1),
            8,
            0,
            "qkv is not 16-byte aligned",
        ),
        (DType::F32, dims(1, 128, 64, 1), 0, 0, "f32"),
        (DType::BF16, dims(1, 192, 64, 1), 0, 0, "T = 192"),
    ] {
        let e = backward_eligible(dtype, d, qkv, gy).unwrap_or_default();
        assert!(e.contains(why), "{d:?}: {e}");
    }
}

/// Every barrier and wait of the two wgmma backward kernels — the block barrier after the
/// mbarriers' initialisation, the producer's waits for free stages, the consumers' waits
/// for the resident operands and each streamed tile, their wgmma waits — is load-bearing:
/// with any one deleted (a simulator mutation site), this probe fails. Three blocks per head:
/// the stages' second round in both kernels.
#[test]
fn every_wgmma_backward_wait_is_load_bearing() {
    let (b, t, c, h) = (1, 384, 64, 1);
    let d = cpu::Dims { b, t, c, h };
    let mut r = rng("attention_wgmma_bwd_mutants");
    let x = on(
        &rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0),
        DType::BF16,
        &Device::Sim,
    );
    let gy = on(
        &rand_tensor(&mut r, [b, t, c], -1.0, 1.0),
        DType::BF16,
        &Device::Sim,
    );
    // The forward and the reference once, outside the mutants (the forward's sites are not
    // this test's: the kernel prefixes below leave them out).
    let (y, lse) = cuda::forward_on(&x, d, true).unwrap();
    let (x64, g64) = (
        on(&x, DType::F64, &Device::Cpu),
        on(&gy, DType::F64, &Device::Cpu),
    );
    let want = run(&x64, &g64, h).1.to_vec_f64().unwrap();
    let probe = || {
        let gx = cuda::backward_on(&x, &y, &lse, &gy, d, true).unwrap();
        assert_close(
            "mutant: dqkv",
            &gx.to_vec_f64().unwrap(),
            &want,
            tol(DType::BF16),
        );
    };
    let probes: [&dyn Fn(); 1] = [&probe];
    crate::device::sim_mutation::assert_every_hopper_site_is_load_bearing(
        "attention_wgmma_bwd",
        &["attention_wgmma64_dkv", "attention_wgmma64_dq"],
        &probes,
    );
}
