//! Kernel-level tests (DESIGN §6) of `kernels/adamw.cu` on every backend present: the
//! multi-tensor step over dozens of odd-sized tensors of mixed dtypes against the CPU
//! AdamW bit for bit, the device-side skip of non-finite steps, clipping, the deferred
//! report, the parameter-struct sizes and bad input.

use super::cuda::{ApplyParams, FinishParams, KERNELS, NormParams};
use super::*;
use crate::testing::{assert_close, rng};
use rand::Rng;
use rand::rngs::StdRng;

/// Lengths around the simulator's chunk (1024) and the GPU's (16384), odd sizes, and one
/// tensor spanning several chunks on both: 32 tensors.
const LENS: [usize; 32] = [
    1, 7, 63, 65, 127, 1000, 4099, 1, 7, 63, 65, 127, 1000, 33, 255, 257, 513, 1023, 1024, 1025,
    2047, 5, 3, 17, 31, 129, 300, 511, 700, 2, 5000, 40000,
];

/// (param dtype, grad dtype) of tensor `i`: every accepted pair, cycled.
fn dtypes(i: usize) -> (DType, DType) {
    [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F16, DType::F16),
        (DType::F16, DType::F32),
    ][i % 5]
}

/// Whether `device` runs kernels (the CPU is the reference: nothing to compare).
fn kernel_device(test: &str, device: &Device) -> bool {
    if *device == Device::Cpu {
        println!("{test} on cpu: nothing to compare (the CPU AdamW is the reference)");
        return false;
    }
    true
}

/// The same parameters on `device` and on the CPU.
fn params_on(vals: &[Vec<f64>], device: &Device) -> Vec<Tensor> {
    vals.iter()
        .enumerate()
        .map(|(i, v)| Tensor::from_vec_as(v.clone(), [v.len()], dtypes(i).0, device).unwrap())
        .collect()
}

fn random_vals(r: &mut StdRng, lo: f64, hi: f64) -> Vec<Vec<f64>> {
    LENS.iter()
        .map(|&n| (0..n).map(|_| r.random_range(lo..hi)).collect())
        .collect()
}

/// Gradients of `params` from `vals` (tensor `skip` gets none).
fn grads_for(params: &[Tensor], vals: &[Vec<f64>], skip: Option<usize>) -> Gradients {
    let mut g = Gradients::default();
    for (i, (p, v)) in params.iter().zip(vals).enumerate() {
        if Some(i) == skip {
            continue;
        }
        let t = Tensor::from_vec_as(v.clone(), [v.len()], dtypes(i).1, &p.device()).unwrap();
        g.insert(p, t).unwrap();
    }
    g
}

/// Every bit of an optimizer: params (as f64 bits), m, v, master, and the step count.
type Snapshot = (Vec<Vec<u64>>, Vec<Vec<u32>>, u64);

fn snapshot(opt: &AdamW) -> Snapshot {
    let params = opt
        .params()
        .iter()
        .map(|p| {
            p.to_vec_f64()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect();
    let mut state = Vec::new();
    for i in 0..opt.params().len() {
        match opt.state_to_host(i).unwrap().unwrap() {
            ParamStateOwned::F32 { m, v, master } => {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                state.push(bits(&m));
                state.push(bits(&v));
                state.push(master.as_deref().map(bits).unwrap_or_default());
            }
            ParamStateOwned::F64 { .. } => panic!("f64 state"),
        }
    }
    (params, state, opt.step_count())
}

/// Names the first differing buffer and element.
#[track_caller]
fn assert_same(what: &str, got: &Snapshot, want: &Snapshot) {
    assert_eq!(got.2, want.2, "{what}: step counts");
    for (i, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
        if let Some(j) = (0..g.len()).find(|&j| g[j] != w[j]) {
            panic!(
                "{what}: param {i} ({:?}, n={}) element {j}: {:e} vs the CPU's {:e}",
                dtypes(i),
                LENS[i],
                f64::from_bits(g[j]),
                f64::from_bits(w[j])
            );
        }
    }
    for (k, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
        if let Some(j) = (0..g.len().max(w.len())).find(|&j| g.get(j) != w.get(j)) {
            panic!(
                "{what}: param {} {} element {j}: {:?} vs the CPU's {:?}",
                k / 3,
                ["m", "v", "master"][k % 3],
                g.get(j).map(|b| f32::from_bits(*b)),
                w.get(j).map(|b| f32::from_bits(*b))
            );
        }
    }
}

/// (i) Several steps over 32 tensors of mixed dtypes, both rounding modes: params, m, v
/// and master bit-identical to the CPU AdamW; a loss scale, a varying lr, a tensor
/// without a gradient in one step (untouched), the step count.
fn steps_match_the_cpu_bit_for_bit(device: &Device) {
    if !kernel_device("adamw_bitwise", device) {
        return;
    }
    let mut r = rng("adamw_bitwise");
    for rounding in [
        Rounding::NearestEven,
        Rounding::Stochastic {
            seed: r.random::<u64>(),
        },
    ] {
        let init = random_vals(&mut r, -1.0, 1.0);
        let (pd, pc) = (params_on(&init, device), params_on(&init, &Device::Cpu));
        let cfg = AdamWConfig {
            weight_decay: 0.05,
            rounding,
            ..Default::default()
        };
        let mut od = AdamW::new(pd.clone(), cfg).unwrap();
        let mut oc = AdamW::new(pc.clone(), cfg).unwrap();
        assert_eq!(od.device(), *device);
        assert_eq!(od.state_bytes(), oc.state_bytes());
        assert_same("initial state", &snapshot(&od), &snapshot(&oc));
        let scale = 1024.0;
        for step in 1..=3u64 {
            let g = random_vals(&mut r, -scale, scale);
            let skip = (step == 2).then_some(3);
            let before = snapshot(&od);
            let opts = StepOptions {
                grad_scale_inv: 1.0 / scale,
                max_grad_norm: None,
            };
            let lr = 1e-2 / step as f64;
            let rd = od.step(&grads_for(&pd, &g, skip), lr, opts).unwrap();
            let rc = oc.step(&grads_for(&pc, &g, skip), lr, opts).unwrap();
            assert!(!rd.skipped && rd.clip_coef == 1.0);
            assert!(
                ((rd.grad_norm - rc.grad_norm) / rc.grad_norm).abs() < 1e-12,
                "norm {} vs the CPU's {}",
                rd.grad_norm,
                rc.grad_norm
            );
            let now = snapshot(&od);
            assert_same(
                &format!("{rounding:?} step {step} on {device}"),
                &now,
                &snapshot(&oc),
            );
            if let Some(s) = skip {
                assert_eq!(now.0[s], before.0[s], "param {s} had no gradient");
                assert_eq!(now.1[3 * s], before.1[3 * s], "param {s}'s m changed");
            }
        }
        assert_eq!(od.step_count(), 3);
        // `state()` works on device state too (a cached host copy).
        match (od.state(6).unwrap(), oc.state(6).unwrap()) {
            (ParamStateRef::F32 { m: a, .. }, ParamStateRef::F32 { m: b, .. }) => {
                assert_eq!(a, b)
            }
            _ => panic!("f32 state expected"),
        }
        assert!(od.state(LENS.len()).is_none());
        println!(
            "adamw_bitwise on {device}: {:?}, {} tensors, 3 steps bit-identical to the CPU",
            rounding,
            LENS.len()
        );
    }
}
crate::test_device!(adamw_bitwise, steps_match_the_cpu_bit_for_bit);

/// (ii) An inf, a -inf or a NaN in one gradient: the report says skipped (decided on the
/// device) and every buffer, the step count included, stays bit-identical; `step` and
/// `step_deferred` alike. A clean step afterwards matches the CPU again.
fn non_finite_gradients_skip_on_the_device(device: &Device) {
    if !kernel_device("adamw_skip", device) {
        return;
    }
    let mut r = rng("adamw_skip");
    let init = random_vals(&mut r, -1.0, 1.0);
    let (pd, pc) = (params_on(&init, device), params_on(&init, &Device::Cpu));
    let cfg = AdamWConfig::default();
    let mut od = AdamW::new(pd.clone(), cfg).unwrap();
    let mut oc = AdamW::new(pc.clone(), cfg).unwrap();
    let opts = StepOptions {
        grad_scale_inv: 1.0 / 256.0,
        max_grad_norm: Some(1.0),
    };
    let g = random_vals(&mut r, -256.0, 256.0);
    od.step(&grads_for(&pd, &g, None), 1e-3, opts).unwrap();
    oc.step(&grads_for(&pc, &g, None), 1e-3, opts).unwrap();
    for (k, (bad, tensor)) in [
        (f64::INFINITY, 31usize),
        (f64::NAN, 2),
        (f64::NEG_INFINITY, 3),
        (f64::NAN, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let before = snapshot(&od);
        let mut g = random_vals(&mut r, -256.0, 256.0);
        let at = g[tensor].len() - 1;
        g[tensor][at] = bad;
        let grads = grads_for(&pd, &g, None);
        let rep = if k % 2 == 0 {
            od.step(&grads, 1e-3, opts).unwrap()
        } else {
            od.step_deferred(&grads, 1e-3, opts)
                .unwrap()
                .wait()
                .unwrap()
        };
        assert!(rep.skipped, "{bad} in tensor {tensor}: not skipped");
        assert!(!rep.grad_norm.is_finite() && rep.clip_coef == 1.0);
        assert_same(
            &format!("{bad} in tensor {tensor} on {device}"),
            &snapshot(&od),
            &before,
        );
        let rc = oc.step(&grads_for(&pc, &g, None), 1e-3, opts).unwrap();
        assert!(rc.skipped);
        println!(
            "{bad} in tensor {tensor} ({:?}): skipped on {device}, nothing written",
            dtypes(tensor)
        );
    }
    assert_eq!(od.step_count(), 1);
    let g = random_vals(&mut r, -1e-3, 1e-3); // a small norm: no clipping
    let rd = od.step(&grads_for(&pd, &g, None), 1e-3, opts).unwrap();
    oc.step(&grads_for(&pc, &g, None), 1e-3, opts).unwrap();
    assert!(!rd.skipped && rd.clip_coef == 1.0);
    assert_eq!(od.step_count(), 2);
    assert_same("clean step after the skips", &snapshot(&od), &snapshot(&oc));
}
crate::test_device!(adamw_skip, non_finite_gradients_skip_on_the_device);

/// (ii-b) Dynamic loss scaling on the device (`DeviceLossScaler` +
/// `step_deferred_scaled`) against the host's `DynamicLossScaler` + `step`: a sequence of
/// clean and overflowing steps (growth interval 2, so the scale both halves and doubles);
/// after each step the scale, counts, skip flags, every parameter and state bit and the
/// next backward's seed agree.
fn device_loss_scaling_follows_the_host(device: &Device) {
    use crate::optim::{DeviceLossScaler, DynamicLossScaler};
    if !kernel_device("adamw_loss_scale", device) {
        return;
    }
    let mut r = rng("adamw_loss_scale");
    let init = random_vals(&mut r, -1.0, 1.0);
    let (pd, pc) = (params_on(&init, device), params_on(&init, &Device::Cpu));
    let cfg = AdamWConfig::default();
    let mut od = AdamW::new(pd.clone(), cfg).unwrap();
    let mut oc = AdamW::new(pc.clone(), cfg).unwrap();
    let mut host = DynamicLossScaler::with_settings(1024.0, 2).unwrap();
    let mut dev = DeviceLossScaler::new(&host, device).unwrap();
    let loss = Tensor::from_vec(vec![0.5f32], [1], device).unwrap();
    // true: a NaN or inf in some gradient this step.
    let overflow = [false, true, false, false, false, true, true, false, false];
    for (k, &bad) in overflow.iter().enumerate() {
        let seed = dev.seed_for(&loss).unwrap();
        assert_eq!(seed.to_vec_f64().unwrap(), [host.scale()], "step {k}: seed");
        // Gradients as a backward seeded with S gives them: S × the true gradient.
        let mut g: Vec<Vec<f64>> = random_vals(&mut r, -1e-2, 1e-2)
            .into_iter()
            .map(|v| v.into_iter().map(|x| x * host.scale()).collect())
            .collect();
        if bad {
            let t = k % LENS.len();
            g[t][0] = if k % 2 == 0 { f64::NAN } else { f64::INFINITY };
        }
        // (That queuing reads nothing back is checked by tests/train_device.rs, where no
        // other test shares the device's counters.)
        let pending = od
            .step_deferred_scaled(&grads_for(&pd, &g, None), 1e-3, Some(1.0), &mut dev)
            .unwrap();
        let opts = StepOptions {
            grad_scale_inv: host.inv_scale(),
            max_grad_norm: Some(1.0),
        };
        let rc = oc.step(&grads_for(&pc, &g, None), 1e-3, opts).unwrap();
        host.update(rc.skipped);
        let rd = pending.wait().unwrap();
        assert_eq!(rd.skipped, bad, "step {k}: skipped");
        assert_eq!(rc.skipped, bad, "step {k}: the CPU skipped");
        if !bad {
            assert_close(
                &format!("step {k}: norm"),
                &[rd.grad_norm],
                &[rc.grad_norm],
                1e-12,
            );
        }
        assert_eq!(dev.to_host().unwrap(), host, "step {k}: the scaler");
        assert_same(
            &format!("loss-scaled step {k} on {device}"),
            &snapshot(&od),
            &snapshot(&oc),
        );
    }
    assert_eq!(
        (host.scale(), host.overflows()),
        (512.0, 3),
        "the sequence exercised both ways"
    );
}
crate::test_device!(adamw_loss_scale, device_loss_scaling_follows_the_host);

/// Bad input to the device loss scaler is an error, never a panic.
#[test]
fn device_loss_scaler_rejects_bad_input() {
    use crate::optim::{DeviceLossScaler, DynamicLossScaler};
    let s = DynamicLossScaler::new();
    assert!(DeviceLossScaler::new(&s, &Device::Cpu).is_err());
    let d = Device::Sim;
    let mut dev = DeviceLossScaler::new(&s, &d).unwrap();
    let f16_loss = Tensor::from_vec_as(vec![1.0f32], [1], DType::F16, &d).unwrap();
    let two = Tensor::from_vec(vec![1.0f32, 2.0], [2], &d).unwrap();
    let cpu_loss = Tensor::from_vec(vec![1.0f32], [1], &Device::Cpu).unwrap();
    for bad in [&f16_loss, &two, &cpu_loss] {
        assert!(dev.seed_for(bad).is_err(), "{bad:?}");
    }
    // An optimizer whose state is on the CPU has no device loss scale to read.
    let p = Tensor::from_vec(vec![1.0f32], [1], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
    let mut g = Gradients::default();
    g.insert(
        &p,
        Tensor::from_vec(vec![1.0f32], [1], &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert!(opt.step_deferred_scaled(&g, 1e-3, None, &mut dev).is_err());
    assert_eq!(dev.to_host().unwrap(), s, "errors left the scaler alone");
}

/// (iii) Clipping: the norm within 1e-6 relative of the CPU's (it is summed in another
/// order), the coefficient likewise, the parameters close; `grad_scale_inv` honoured.
fn clipping_follows_the_cpu(device: &Device) {
    if !kernel_device("adamw_clip", device) {
        return;
    }
    let mut r = rng("adamw_clip");
    let init = random_vals(&mut r, -1.0, 1.0);
    let (pd, pc) = (params_on(&init, device), params_on(&init, &Device::Cpu));
    let cfg = AdamWConfig::default();
    let mut od = AdamW::new(pd.clone(), cfg).unwrap();
    let mut oc = AdamW::new(pc.clone(), cfg).unwrap();
    for (step, (scale_inv, max)) in [(0.5, 1.0), (1.0 / 4096.0, 0.5), (1.0, 1e6)]
        .into_iter()
        .enumerate()
    {
        let g = random_vals(&mut r, -1.0 / scale_inv, 1.0 / scale_inv);
        let opts = StepOptions {
            grad_scale_inv: scale_inv,
            max_grad_norm: Some(max),
        };
        let rd = od.step(&grads_for(&pd, &g, None), 1e-2, opts).unwrap();
        let rc = oc.step(&grads_for(&pc, &g, None), 1e-2, opts).unwrap();
        let rel = |a: f64, b: f64| ((a - b) / b).abs();
        assert!(
            rel(rd.grad_norm, rc.grad_norm) < 1e-6,
            "{} vs {}",
            rd.grad_norm,
            rc.grad_norm
        );
        assert!(rel(rd.clip_coef, rc.clip_coef) < 1e-6);
        // The norm is of the unscaled gradients: about √(Σn/3) for uniform [-1, 1).
        let expect = (LENS.iter().sum::<usize>() as f64 / 3.0).sqrt();
        assert!(
            rel(rd.grad_norm, expect) < 0.05,
            "{} vs ~{expect}",
            rd.grad_norm
        );
        assert_eq!(rd.clip_coef < 1.0, max < rd.grad_norm);
        println!(
            "step {step} on {device}: norm {} (cpu {}), clip {} (cpu {})",
            rd.grad_norm, rc.grad_norm, rd.clip_coef, rc.clip_coef
        );
        for (i, (a, b)) in pd.iter().zip(&pc).enumerate() {
            let tol = match dtypes(i).0 {
                DType::F32 => 1e-6,
                _ => 1e-2,
            };
            assert_close(
                &format!("param {i} after clipped step {step}"),
                &a.to_vec_f64().unwrap(),
                &b.to_vec_f64().unwrap(),
                tol,
            );
        }
    }
}
crate::test_device!(adamw_clip, clipping_follows_the_cpu);

/// (iv) Deferred steps: several queued before any wait give the reports and the state of
/// as many `step` calls; an empty set of gradients is a counted no-op step.
fn deferred_steps_equal_synchronous_ones(device: &Device) {
    if !kernel_device("adamw_deferred", device) {
        return;
    }
    let mut r = rng("adamw_deferred");
    let init = random_vals(&mut r, -1.0, 1.0);
    let (pd, pc) = (params_on(&init, device), params_on(&init, &Device::Cpu));
    let cfg = AdamWConfig::default();
    let mut od = AdamW::new(pd.clone(), cfg).unwrap();
    let mut oc = AdamW::new(pc.clone(), cfg).unwrap();
    let gs: Vec<Vec<Vec<f64>>> = (0..3).map(|_| random_vals(&mut r, -1.0, 1.0)).collect();
    let pending: Vec<PendingStepReport> = gs
        .iter()
        .map(|g| {
            od.step_deferred(&grads_for(&pd, g, None), 1e-3, StepOptions::default())
                .unwrap()
        })
        .collect();
    let reports: Vec<StepReport> = pending
        .into_iter()
        .rev()
        .map(|p| p.wait().unwrap())
        .collect();
    for (g, rd) in gs.iter().zip(reports.iter().rev()) {
        let rc = oc
            .step(&grads_for(&pc, g, None), 1e-3, StepOptions::default())
            .unwrap();
        assert!(((rd.grad_norm - rc.grad_norm) / rc.grad_norm).abs() < 1e-12);
        assert!(!rd.skipped);
    }
    assert_eq!(od.try_step_count().unwrap(), 3);
    assert_same("3 deferred steps", &snapshot(&od), &snapshot(&oc));
    let rep = od
        .step(&Gradients::default(), 1e-3, StepOptions::default())
        .unwrap();
    assert_eq!(
        (rep.grad_norm, rep.skipped, od.step_count()),
        (0.0, false, 4)
    );
}
crate::test_device!(adamw_deferred, deferred_steps_equal_synchronous_ones);

/// (v) Bad input is an error and changes nothing: mixed devices, a gradient on another
/// device, a wrong gradient dtype or shape, a bad lr or option.
fn bad_input_is_an_error(device: &Device) {
    if !kernel_device("adamw_errors", device) {
        return;
    }
    let a = Tensor::from_vec(vec![1.0f32, 2.0], [2], device).unwrap();
    let b = Tensor::from_vec(vec![1.0f32], [1], &Device::Cpu).unwrap();
    assert!(matches!(
        AdamW::new(vec![a.clone(), b], AdamWConfig::default()),
        Err(Error::Device { .. })
    ));
    let h = Tensor::from_vec_as(vec![1.0f64; 3], [3], DType::BF16, device).unwrap();
    let mut opt = AdamW::new(vec![a.clone(), h.clone()], AdamWConfig::default()).unwrap();
    let before = snapshot_small(&opt);
    let cpu_grad = Tensor::from_vec(vec![1.0f32, 1.0], [2], &Device::Cpu).unwrap();
    let mut g = Gradients::default();
    g.insert(&a, cpu_grad).unwrap();
    assert!(matches!(
        opt.step(&g, 0.1, StepOptions::default()),
        Err(Error::Device { .. })
    ));
    let mut g = Gradients::default();
    g.insert(
        &h,
        Tensor::from_vec_as(vec![1.0f64; 3], [3], DType::F16, device).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        opt.step(&g, 0.1, StepOptions::default()),
        Err(Error::DType { .. })
    ));
    // A wrong shape is refused by `Gradients::insert` already.
    let mut g = Gradients::default();
    assert!(
        g.insert(&a, Tensor::from_vec(vec![1.0f32; 3], [3], device).unwrap())
            .is_err()
    );
    let mut g = Gradients::default();
    g.insert(&a, Tensor::from_vec(vec![1.0f32; 2], [2], device).unwrap())
        .unwrap();
    assert!(opt.step(&g, f64::NAN, StepOptions::default()).is_err());
    assert!(
        opt.step_deferred(
            &g,
            0.1,
            StepOptions {
                grad_scale_inv: 0.0,
                max_grad_norm: None
            }
        )
        .is_err()
    );
    assert_eq!(snapshot_small(&opt), before, "an error changed the state");
    assert_eq!(opt.step_count(), 0);
    // A gradient that is a parameter's own storage is read before it is written.
    let mut g = Gradients::default();
    g.insert(&a, a.clone()).unwrap();
    assert!(!opt.step(&g, 0.1, StepOptions::default()).unwrap().skipped);
    assert_eq!(opt.state_bytes(), 2 * 8 + 3 * 12);
}
crate::test_device!(adamw_errors, bad_input_is_an_error);

fn snapshot_small(opt: &AdamW) -> (Vec<Vec<f64>>, Vec<ParamStateOwned>) {
    (
        opt.params()
            .iter()
            .map(|p| p.to_vec_f64().unwrap())
            .collect(),
        (0..opt.params().len())
            .map(|i| opt.state_to_host(i).unwrap().unwrap())
            .collect(),
    )
}

/// The `#[repr(C)]` parameter structs have the size of their C++ twins.
#[test]
fn params_match_the_kernels() {
    let sizes = [
        std::mem::size_of::<NormParams>(),
        std::mem::size_of::<FinishParams>(),
        std::mem::size_of::<ApplyParams>(),
    ];
    for (k, size) in KERNELS.iter().zip(sizes) {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(size),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
    assert_eq!(std::mem::size_of::<super::cuda::StepState>(), 80);
    assert_eq!(std::mem::size_of::<super::cuda::TensorDesc>(), 48);
    assert_eq!(std::mem::size_of::<super::cuda::LossScaleState>(), 24);
}
