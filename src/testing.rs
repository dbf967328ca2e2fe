//! Test helpers shared by the crate's tests, its integration tests and downstream kernel
//! tests: seeded randomness that prints its seed, one comparison helper
//! ([`assert_close`]), central finite-difference gradient checks ([`check_grads`]) and
//! [`test_device!`](crate::test_device), which instantiates one test body per backend.

use crate::{DType, Device, Result, Shape, Tape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seeded RNG for test `name`. The seed is fresh each run unless `LORAFUSE_SEED` is set;
/// it is printed so a failure can be replayed.
pub fn rng(name: &str) -> StdRng {
    let seed = std::env::var("LORAFUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    println!("{name}: seed {seed} (replay with LORAFUSE_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// An untracked f64 CPU tensor of uniform samples in `[lo, hi)`.
pub fn rand_tensor(rng: &mut impl Rng, shape: impl Into<Shape>, lo: f64, hi: f64) -> Tensor {
    Tensor::rand_uniform(lo, hi, shape, DType::F64, &Device::Cpu, rng).expect("valid range")
}

/// How far `got` is from `want`.
#[derive(Clone, Copy, Debug)]
pub struct Closeness {
    /// `‖got − want‖₂ / ‖want‖₂` (absolute L2 when `want` is all zeros).
    pub rel_l2: f64,
    /// The largest `|got − want|`.
    pub max_abs: f64,
    /// Where the largest error is.
    pub max_abs_index: usize,
    /// The first index holding a NaN/inf in `got` where `want` is finite, if any.
    pub first_non_finite: Option<usize>,
}

/// Compares two buffers (see [`Closeness`]). Lengths must match.
pub fn closeness(got: &[f64], want: &[f64]) -> Closeness {
    assert_eq!(got.len(), want.len(), "closeness: lengths differ");
    let (mut num, mut den, mut max_abs, mut idx, mut bad) = (0.0, 0.0, 0.0f64, 0, None);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !g.is_finite() && w.is_finite() && bad.is_none() {
            bad = Some(i);
        }
        let e = (g - w).abs();
        num += e * e;
        den += w * w;
        if e > max_abs || e.is_nan() {
            max_abs = e;
            idx = i;
        }
    }
    let rel_l2 = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    Closeness {
        rel_l2,
        max_abs,
        max_abs_index: idx,
        first_non_finite: bad,
    }
}

/// DESIGN §6's rel-L2 tolerance for a kernel's `dtype` outputs against the f64 reference:
/// f32 SIMT 1e-5, bf16 operands 1e-2, f16 2e-3 (f64: 1e-12).
pub fn rel_l2_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        DType::F64 => 1e-12,
    }
}

/// Panics unless `‖got − want‖ / ‖want‖ ≤ tol` and `got` holds no NaN/inf where `want`
/// is finite. The message names the rel-L2, the max abs error and its index, and the
/// first non-finite index.
#[track_caller]
pub fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    let c = closeness(got, want);
    if c.first_non_finite.is_some() || c.rel_l2.is_nan() || c.rel_l2 > tol {
        panic!(
            "{name}: rel-L2 {:.3e} > {tol:.1e}; max abs err {:.3e} at index {} (got {}, want {}); first non-finite: {:?}",
            c.rel_l2,
            c.max_abs,
            c.max_abs_index,
            got[c.max_abs_index],
            want[c.max_abs_index],
            c.first_non_finite
        );
    }
}

/// [`assert_close`] on two tensors (compared in f64).
#[track_caller]
pub fn assert_close_t(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{name}: shapes differ");
    assert_close(
        name,
        &got.to_vec_f64().unwrap(),
        &want.to_vec_f64().unwrap(),
        tol,
    );
}

/// Checks the backward of `f` against central finite differences (Richardson-extrapolated
/// from steps h and h/2), in f64.
///
/// `inputs` are untracked f64 tensors. The check projects the output on a fixed random
/// direction `R` (`L = Σ f(x) ⊙ R`), runs backward seeded with `R`, and compares each
/// input's gradient with `(L(x + h·e_j) − L(x − h·e_j)) / 2h` at up to 48 positions per
/// input. The error of each position is `|analytic − numeric| / max(|analytic|,
/// |numeric|, 1e-2 · scale)`, where `scale` is the input's largest numeric gradient (so a
/// near-zero gradient is judged against the input's typical size); the largest error is
/// printed and must be `≤ tol`. With f64 and `h = 1e-5·max(1, |x|)`, truncation (`O(h²)`)
/// and rounding (`ε·|L|/h`) errors are ~1e-10 relative, so a tolerance of 1e-7 is tight: a
/// wrong backward is off by O(1), an f32 backward by ~1e-4.
#[track_caller]
pub fn check_grads(
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f64,
) {
    for t in inputs {
        assert_eq!(
            t.dtype(),
            DType::F64,
            "{name}: check_grads takes f64 inputs"
        );
    }
    let tape = Tape::new();
    let tracked: Vec<Tensor> = inputs.iter().map(|t| t.track(&tape)).collect();
    let out = f(&tracked).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let mut prng = StdRng::seed_from_u64(0x5eed);
    let r: Vec<f64> = (0..out.elem_count())
        .map(|_| prng.random_range(-1.0..1.0))
        .collect();
    let seed = Tensor::from_vec(r.clone(), out.shape().clone(), &Device::Cpu).unwrap();
    let grads = tape
        .backward_with(&out, seed)
        .unwrap_or_else(|e| panic!("{name}: backward failed: {e}"));
    let loss = |xs: &[Tensor]| -> f64 {
        let y = f(xs).unwrap().to_vec_f64().unwrap();
        y.iter().zip(&r).map(|(a, b)| a * b).sum()
    };
    let mut worst = 0.0f64;
    for (i, x) in inputs.iter().enumerate() {
        let n = x.elem_count();
        let analytic = match grads.get(x) {
            Some(g) => g.to_vec_f64().unwrap(),
            None => vec![0.0; n],
        };
        let positions: Vec<usize> = if n <= 48 {
            (0..n).collect()
        } else {
            (0..48).map(|_| prng.random_range(0..n)).collect()
        };
        let base = x.to_vec_f64().unwrap();
        let mut numeric = Vec::with_capacity(positions.len());
        for &j in &positions {
            let h = 1e-3 * base[j].abs().max(1.0);
            let probe = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut xs: Vec<Tensor> = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, x.shape().clone(), &Device::Cpu).unwrap();
                loss(&xs)
            };
            // Central differences at h and h/2, Richardson-extrapolated: the O(h²)
            // truncation error cancels, leaving O(h⁴), so h can be large enough that the
            // loss's rounding (divided by h) stays small too. (A plain difference at
            // h = 1e-5 erred by ~1e-7 relative for some random inputs of the attention
            // test, from rounding.)
            let d = |h: f64| (probe(h) - probe(-h)) / (2.0 * h);
            numeric.push((4.0 * d(h / 2.0) - d(h)) / 3.0);
        }
        let scale = numeric.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (k, &j) in positions.iter().enumerate() {
            let (a, num) = (analytic[j], numeric[k]);
            let err = (a - num).abs() / a.abs().max(num.abs()).max(1e-2 * scale).max(1e-12);
            if err.is_nan() || err > tol {
                panic!(
                    "{name}: input {i} element {j}: analytic {a:.10e} vs numeric {num:.10e} (rel err {err:.3e} > {tol:.1e})"
                );
            }
            worst = worst.max(err);
        }
    }
    println!("{name}: finite-difference check, max rel err {worst:.3e} (tol {tol:.1e})");
}

/// Whether a test on `device` can run in this build and on this machine. Reports it
/// [`skip`]ped when it cannot, and panics instead when `LORAFUSE_REQUIRE_GPU=1` asks for
/// a GPU that is missing.
pub fn device_available(test: &str, device: &Device) -> bool {
    match device.unavailable_reason() {
        None => true,
        Some(why) => {
            let require = matches!(device, Device::Cuda(_)).then_some("LORAFUSE_REQUIRE_GPU");
            skip(&format!("{test} on {device}"), &why, require);
            false
        }
    }
}

/// The running test's name (libtest runs each test on a thread named after it), or
/// `"(unnamed thread)"`.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("(unnamed thread)")
        .to_string()
}

/// Whether running an atomics-free kernel twice on `device` can give other bits: on the
/// CPU and a GPU (thread scheduling) it can, so a bitwise second run checks the fixed
/// reduction order. The simulator's schedule (block order, warp order after each barrier)
/// is a function of its seed, the kernel and the launch geometry only, so within one
/// process a second run repeats the first exactly and comparing them checks nothing —
/// tests skip it there, which also halves their simulator time.
pub fn rerun_can_differ(device: &Device) -> bool {
    !matches!(device, Device::Sim)
}

/// Tests of this process that did not run ([`skip`]).
static SKIPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many tests of this process have been [`skip`]ped so far.
pub fn skipped_tests() -> usize {
    SKIPPED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The line [`skip`] writes for the `n`-th skip of a process (1-based): the first carries
/// the reason and how to make it a failure, later ones only the test.
pub fn skip_line(n: usize, test: &str, why: &str, require: Option<&str>) -> String {
    if n == 1 {
        let hint = require.map_or(String::new(), |var| format!("; {var}=1 makes it fail"));
        format!("lorafuse: SKIPPED {test}: {why}{hint}\n")
    } else {
        format!("lorafuse: SKIPPED {test}\n")
    }
}

/// The line printed when a process that skipped `n` tests exits.
pub fn skip_summary(n: usize) -> String {
    let (tests, them) = if n == 1 {
        ("test", "it")
    } else {
        ("tests", "them")
    };
    format!(
        "lorafuse: {n} {tests} of this binary did not run (SKIPPED above); the harness counts {them} as passed\n"
    )
}

extern "C" fn print_skip_summary() {
    use std::io::Write;
    let _ = std::io::stderr().write_all(skip_summary(skipped_tests()).as_bytes());
}

/// Records that `test` did not run because of `why` (no GPU, no cuBLAS, no NVRTC), so the
/// harness's `... ok` does not hide it: the line goes to the process's real stderr, which
/// libtest does not capture (it captures `print!`/`eprint!` only), so plain `cargo test`
/// shows it; the first skip of a process also prints the count of skipped tests when the
/// process exits, after libtest's `test result:` line. The line is printed (captured)
/// too, for `--nocapture`. Panics instead when the environment variable `require` is `1`.
#[track_caller]
pub fn skip(test: &str, why: &str, require: Option<&str>) {
    use std::io::Write;
    if let Some(var) = require
        && std::env::var(var).as_deref() == Ok("1")
    {
        panic!("{test}: {var}=1 but {why}");
    }
    println!("{test}: skipped ({why})");
    let n = SKIPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    if n == 1 {
        crate::device::at_exit(print_skip_summary);
    }
    let _ = std::io::stderr().write_all(skip_line(n, test, why, require).as_bytes());
}

/// Whether a test of the Hopper kernel `kernel` (an sm_90a module) can run on `device`: the
/// CPU (the reference contract) and the simulator always, a GPU when its module loaded from
/// the sm_90a cubin (compute capability 9.0); on another GPU it prints `skipped`.
#[cfg(test)]
pub(crate) fn hopper_kernel_runs_on(device: &Device, kernel: &str) -> bool {
    let Device::Cuda(_) = device else {
        return true;
    };
    let sm90a = crate::device::Backend::of(*device)
        .and_then(|b| b.runs_arch_specific_cubin(kernel))
        .unwrap_or(false);
    if !sm90a {
        skip(
            &format!("{} on {device}", current_test()),
            "not a compute-capability 9.0 GPU with the sm_90a cubin",
            None,
        );
    }
    sm90a
}

/// Instantiates one test body per backend: `test_device!(name, body)` makes a module
/// `name` with tests `cpu`, `sim` and `cuda`, each calling `body(&Device)`. A backend
/// that is not present prints `skipped` (and a missing GPU fails under
/// `LORAFUSE_REQUIRE_GPU=1`). `test_device!(name, body, devices_only)` makes only `sim`
/// and `cuda`, for kernels that have no CPU twin.
#[macro_export]
macro_rules! test_device {
    // The simulator's and the GPU's tests of a body.
    (@devices $body:path) => {
        #[test]
        fn sim() {
            let d = $crate::Device::Sim;
            if $crate::testing::device_available(module_path!(), &d) {
                $body(&d);
            }
        }
        #[test]
        fn cuda() {
            let d = $crate::Device::Cuda(0);
            if $crate::testing::device_available(module_path!(), &d) {
                $body(&d);
            }
        }
    };
    // Device kernels with no CPU twin (e.g. the Hopper ones): the simulator and the GPU.
    ($name:ident, $body:path, devices_only) => {
        mod $name {
            use super::*;
            $crate::test_device!(@devices $body);
        }
    };
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;
            #[test]
            fn cpu() {
                $body(&$crate::Device::Cpu);
            }
            $crate::test_device!(@devices $body);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_lines_name_the_test_and_the_first_says_why() {
        let first = skip_line(
            1,
            "x::cuda on cuda:0",
            "no GPU",
            Some("LORAFUSE_REQUIRE_GPU"),
        );
        assert_eq!(
            first,
            "lorafuse: SKIPPED x::cuda on cuda:0: no GPU; LORAFUSE_REQUIRE_GPU=1 makes it fail\n"
        );
        assert_eq!(skip_line(2, "y", "no GPU", None), "lorafuse: SKIPPED y\n");
        assert_eq!(
            skip_line(1, "y", "no cuBLAS", None),
            "lorafuse: SKIPPED y: no cuBLAS\n"
        );
        assert!(skip_summary(1).contains("1 test of this binary did not run"));
        assert!(skip_summary(3).contains("3 tests of this binary did not run"));
    }
}
