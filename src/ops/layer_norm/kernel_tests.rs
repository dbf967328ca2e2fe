//! Kernel-level tests (DESIGN §6) of LayerNorm on every backend present: forward and
//! backward through the tape against the CPU engine in the same dtype, over odd shapes
//! (rows 1–1100 around the 8-row blocks, the 32-row chunks of the parameter sums and their
//! 32 lanes,
//! channels 1–770 around the 32-lane warps and the 256-channel blocks) and the three
//! storage dtypes. The warp reductions sum in another order than the CPU's serial loops,
//! so y, gx and ggamma are compared by rel-L2 (f32 1e-5, bf16 1e-2, f16 2e-3: a few units
//! of the output rounding); gbeta (a column sum in the reference's chunked row order)
//! must be bit-identical, and two device runs must agree bit for bit.
//! Device outputs start as NaN (fresh buffers are poisoned), so an unwritten element fails.

use super::*;
use crate::DType;
use crate::testing::{assert_close, rand_tensor, rng};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// (rows, channels): rows past one and several 32-row chunks of the parameter sums (65,
/// 130, 257, 600: chunks ending mid-round of 8 rows), more chunks than the 32 lanes that
/// combine them (1100 on the register path, 1037 on the scalar one), channels past one
/// 256-thread group; then the register path's edges: C a multiple of the vector width (f32
/// 4, bf16/f16 8: 8, 64, 768, 1000 — 1000/8 leaves lanes with fewer vectors) or not (1, 7,
/// 63, and 772 = 768 + 4: vectors for f32 only, rows at 8-byte offsets for bf16/f16, so
/// those take the scalar path), and past the 1024 values a warp holds (1040: scalar for every
/// dtype). The register-path shapes with gx tracked run the one-pass `backward_fused`; with
/// x untracked, the chunk-sum blocks (their results must agree bit for bit).
const SHAPES: [(usize, usize); 18] = [
    (1100, 64),
    (1037, 7),
    (1, 1),
    (7, 3),
    (65, 31),
    (130, 1),
    (7, 770),
    (130, 257),
    (1, 768),
    (257, 5),
    (600, 300),
    (9, 8),
    (17, 64),
    (5, 7),
    (5, 63),
    (3, 772),
    (4, 1000),
    (2, 1040),
];

use crate::testing::rel_l2_tolerance as tol;

/// `t`'s values as a tensor of `dtype` on `device`.
fn on(t: &Tensor, dtype: DType, device: &Device) -> Tensor {
    Tensor::from_vec_as(t.to_vec_f64().unwrap(), t.shape().clone(), dtype, device).unwrap()
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|v| v.to_bits()).collect()
}

/// y, and the gradients of x (when tracked), gamma and beta, as f64 values.
type Run = (Vec<f64>, Option<Vec<f64>>, Vec<f64>, Vec<f64>);

fn run(ins: &[Tensor; 4], dtype: DType, device: &Device, track_x: bool) -> Run {
    let tape = Tape::new();
    let [x, gamma, beta, seed] = ins.clone().map(|t| on(&t, dtype, device));
    let x = if track_x { x.track(&tape) } else { x };
    let (gamma, beta) = (gamma.track(&tape), beta.track(&tape));
    let y = layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
    assert_eq!((y.device(), y.dtype()), (*device, dtype));
    let g = tape.backward_with(&y, seed).unwrap();
    let vals = |t: &Tensor| {
        let gt = g.get(t).unwrap();
        assert_eq!((gt.device(), gt.dtype()), (*device, dtype));
        gt.to_vec_f64().unwrap()
    };
    assert_eq!(g.get(&x).is_some(), track_x);
    (
        y.to_vec_f64().unwrap(),
        track_x.then(|| vals(&x)),
        vals(&gamma),
        vals(&beta),
    )
}

fn matches_the_cpu_engine(device: &Device) {
    let mut r = rng("layer_norm_kernel");
    for (rows, c) in SHAPES {
        let ins = [
            rand_tensor(&mut r, [rows, c], -3.0, 5.0),
            rand_tensor(&mut r, [c], -2.0, 2.0),
            rand_tensor(&mut r, [c], -1.0, 1.0),
            rand_tensor(&mut r, [rows, c], -1.0, 1.0),
        ];
        for dt in DTYPES {
            let name = format!("layer_norm {device} {dt} [{rows}, {c}]");
            let (y, gx, gg, gb) = run(&ins, dt, device, true);
            let (yc, gxc, ggc, gbc) = run(&ins, dt, &Device::Cpu, true);
            assert_close(&format!("{name} y"), &y, &yc, tol(dt));
            assert_close(
                &format!("{name} gx"),
                gx.as_ref().unwrap(),
                gxc.as_ref().unwrap(),
                tol(dt),
            );
            assert_close(&format!("{name} ggamma"), &gg, &ggc, tol(dt));
            assert_eq!(bits(&gb), bits(&gbc), "{name} gbeta: not bit-identical");
            // Deterministic; the parameter gradients do not depend on whether x is tracked.
            let again = run(&ins, dt, device, true);
            assert_eq!(bits(&again.0), bits(&y), "{name}: y differs between runs");
            assert_eq!(
                bits(again.1.as_ref().unwrap()),
                bits(gx.as_ref().unwrap()),
                "{name}: gx differs between runs"
            );
            let params_only = run(&ins, dt, device, false);
            assert_eq!(bits(&params_only.2), bits(&gg), "{name}: ggamma");
            assert_eq!(bits(&params_only.3), bits(&gb), "{name}: gbeta");
        }
    }
}
crate::test_device!(layer_norm_kernel, matches_the_cpu_engine);

/// An f32 device LayerNorm is close to the f64 CPU engine on the same (f32) inputs.
fn close_to_f64(device: &Device) {
    let mut r = rng("layer_norm_kernel_f64");
    let ins = [
        rand_tensor(&mut r, [9, 100], -3.0, 3.0),
        rand_tensor(&mut r, [100], -1.5, 1.5),
        rand_tensor(&mut r, [100], -1.0, 1.0),
        rand_tensor(&mut r, [9, 100], -1.0, 1.0),
    ];
    let rounded = ins.clone().map(|t| on(&t, DType::F32, &Device::Cpu));
    let (y, gx, gg, gb) = run(&rounded, DType::F32, device, true);
    let (y64, gx64, gg64, gb64) = run(&rounded, DType::F64, &Device::Cpu, true);
    assert_close("y vs f64", &y, &y64, 1e-6);
    assert_close("gx vs f64", &gx.unwrap(), &gx64.unwrap(), 1e-5);
    assert_close("ggamma vs f64", &gg, &gg64, 1e-5);
    assert_close("gbeta vs f64", &gb, &gb64, 1e-6);
}
crate::test_device!(layer_norm_kernel_f64, close_to_f64);

/// A GPT-2 input block on the device: `layer_norm(embedding(tokens))`, backward through the
/// tape into both tables and the LayerNorm parameters; every gradient stays on the device
/// and is close to the CPU engine's (f32).
fn embedding_then_layer_norm(device: &Device) {
    use rand::Rng;
    let mut r = rng("layer_norm_kernel_chain");
    let (b, t, v, p, c) = (3, 11, 40, 16, 65);
    let toks: Vec<u32> = (0..b * t).map(|_| r.random_range(0..v as u32)).collect();
    let ins = [
        rand_tensor(&mut r, [v, c], -1.0, 1.0),
        rand_tensor(&mut r, [p, c], -1.0, 1.0),
        rand_tensor(&mut r, [c], -1.5, 1.5),
        rand_tensor(&mut r, [c], -1.0, 1.0),
        rand_tensor(&mut r, [b, t, c], -1.0, 1.0),
    ];
    let go = |dev: &Device| {
        let tape = Tape::new();
        let [wte, wpe, gamma, beta, seed] = ins.clone().map(|x| on(&x, DType::F32, dev));
        let ts = [&wte, &wpe, &gamma, &beta].map(|x| x.track(&tape));
        let e = crate::ops::embedding(&toks, b, t, &ts[0], &ts[1]).unwrap();
        let y = layer_norm(&e, &ts[2], &ts[3], 1e-5).unwrap();
        let g = tape.backward_with(&y, seed).unwrap();
        let mut out = vec![y.to_vec_f64().unwrap()];
        for x in &ts {
            let gx = g.get(x).unwrap();
            assert_eq!(gx.device(), *dev);
            out.push(gx.to_vec_f64().unwrap());
        }
        out
    };
    let (got, want) = (go(device), go(&Device::Cpu));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("chain output {i} on {device}"), g, w, 1e-5);
    }
}
crate::test_device!(layer_norm_kernel_chain, embedding_then_layer_norm);

#[test]
fn params_match_the_kernels() {
    for k in cuda::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::LayerNormParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}

/// The host twin of the kernels' register-path test, which decides the one-pass backward:
/// the vector width per dtype, the 1024-value limit, every pointer's alignment.
#[test]
fn the_fused_backward_takes_rows_the_registers_hold() {
    use cuda::{fused_shared_bytes, row_in_registers};
    assert!(row_in_registers(DType::BF16, 768, &[0, 256, 4096]));
    assert!(row_in_registers(DType::F32, 772, &[16]));
    assert!(!row_in_registers(DType::F16, 772, &[16]), "772 % 8");
    assert!(row_in_registers(DType::F16, 1024, &[16]));
    assert!(
        !row_in_registers(DType::BF16, 1032, &[16]),
        "past 1024 values"
    );
    assert!(
        !row_in_registers(DType::BF16, 768, &[16, 8]),
        "a pointer 8 bytes off"
    );
    assert_eq!(
        fused_shared_bytes(768),
        48 * 1024,
        "GPT-2: the default limit, no opt-in"
    );
    assert_eq!(fused_shared_bytes(1024), 64 * 1024);
}

/// Both barriers of the one-pass backward (the staged rows are complete before they are
/// summed; the sums are done before the next rows overwrite them) are load-bearing: with
/// either deleted (a simulator mutation site), this probe fails. Reaching a site of a
/// `layer_norm_bwd` kernel at all shows the probe ran `backward_fused` (the only part with a
/// barrier).
#[test]
fn every_fused_backward_barrier_is_load_bearing() {
    let mut r = rng("layer_norm_mutants");
    let (rows, c) = (100, 64);
    let ins = [
        rand_tensor(&mut r, [rows, c], -3.0, 5.0),
        rand_tensor(&mut r, [c], -2.0, 2.0),
        rand_tensor(&mut r, [c], -1.0, 1.0),
        rand_tensor(&mut r, [rows, c], -1.0, 1.0),
    ];
    let want = run(&ins, DType::BF16, &Device::Cpu, true);
    let probe = || {
        let (_, gx, gg, gb) = run(&ins, DType::BF16, &Device::Sim, true);
        assert_close(
            "mutant gx",
            gx.as_ref().unwrap(),
            want.1.as_ref().unwrap(),
            tol(DType::BF16),
        );
        assert_close("mutant ggamma", &gg, &want.2, tol(DType::BF16));
        assert_eq!(bits(&gb), bits(&want.3), "mutant gbeta");
    };
    let probes: [&dyn Fn(); 1] = [&probe];
    crate::device::sim_mutation::assert_every_site_is_load_bearing(
        "layer_norm",
        &["layer_norm_bwd"],
        &probes,
    );
}
