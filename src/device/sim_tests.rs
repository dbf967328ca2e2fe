//! The simulator's checks, shown on kernels with planted bugs (`kernels/sim/planted_bugs.cu`):
//! in process, through the same `Backend::launch` the ops use (red zones, traps, asserts,
//! warp-mask errors), and in child processes built with AddressSanitizer and
//! ThreadSanitizer (an out-of-bounds write, a shared-memory race from a missing barrier),
//! each next to its clean control.

use super::{Backend, DeviceBuffer, LaunchConfig};
use crate::Error;

/// Twin of `SimTestParams` in `kernels/sim/planted_bugs.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct SimTestParams {
    out: u64,
    input: u64,
    aux: u64,
    n: u64,
    oob: i32,
    barrier: i32,
}

/// Twin of `SimAtomicsOut` in `kernels/sim/planted_bugs.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct SimAtomicsOut {
    count: u64,
    max_id: i32,
    min_id: u32,
    cas_sum: i32,
    or_bits: u32,
    sub: i32,
    block_sum: u32,
    half_sum: f64,
    fsum: f32,
    exch: f32,
}

fn cfg(blocks: u32, threads: u32, shared_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid: [blocks, 1, 1],
        block: [threads, 1, 1],
        shared_bytes,
    }
}

fn f32_buffer(values: &[f32]) -> DeviceBuffer {
    let mut b = Backend::Sim.alloc(values.len() * 4).unwrap();
    Backend::Sim
        .write(bytemuck::cast_slice(values), &mut b)
        .unwrap();
    b
}

fn read_f32(b: &DeviceBuffer) -> Vec<f32> {
    let mut v = vec![0f32; b.len() / 4];
    Backend::Sim
        .read(b, bytemuck::cast_slice_mut(&mut v))
        .unwrap();
    v
}

#[test]
fn parameter_structs_match_the_simulator() {
    assert_eq!(
        super::sim::param_bytes("sim_planted_oob_write_f32"),
        Some(std::mem::size_of::<SimTestParams>())
    );
    assert_eq!(std::mem::size_of::<SimAtomicsOut>(), 48);
}

#[test]
fn an_out_of_bounds_write_fails_the_launch_and_its_control_passes() {
    for n in [1usize, 255, 1000] {
        let out = Backend::Sim.alloc(n * 4).unwrap();
        let p = |oob| SimTestParams {
            out: out.device_ptr(),
            n: n as u64,
            oob,
            ..Default::default()
        };
        let c = LaunchConfig::grid_stride(n, 128, 4);
        Backend::Sim
            .launch("sim_planted_oob_write_f32", &c, &p(0))
            .unwrap();
        let want: Vec<f32> = (0..n).map(|i| i as f32).collect();
        assert_eq!(read_f32(&out), want, "control, n = {n}");
        let e = Backend::Sim
            .launch("sim_planted_oob_write_f32", &c, &p(1))
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Kernel { .. }), "{msg}");
        assert!(
            msg.contains("out-of-bounds write") && msg.contains("1 bytes past its end"),
            "{msg}"
        );
        // The report restores the red zone: the next clean launch passes.
        Backend::Sim
            .launch("sim_planted_oob_write_f32", &c, &p(0))
            .unwrap();
    }
}

#[test]
fn traps_asserts_exceptions_and_warp_misuse_are_launch_errors_not_hangs() {
    let out = Backend::Sim.alloc(4 * 256).unwrap();
    let input = f32_buffer(&[1.0; 256]);
    let p = SimTestParams {
        out: out.device_ptr(),
        n: 100,
        ..Default::default()
    };
    for (kernel, threads, expect) in [
        ("sim_planted_trap", 256, "trap"),
        ("sim_planted_assert", 64, "assert"),
        ("sim_planted_cpp_exception", 256, "exception"),
        ("sim_planted_exited_lane_shfl", 64, ""),
        ("sim_planted_shfl_vs_syncthreads", 64, ""),
        ("sim_planted_full_mask_sum_f32", 48, ""),
    ] {
        let p = SimTestParams {
            input: input.device_ptr(),
            ..p
        };
        // sim_planted_assert fails only when `in` is null.
        let p = if kernel == "sim_planted_assert" {
            SimTestParams { input: 0, ..p }
        } else {
            p
        };
        let e = Backend::Sim
            .launch(kernel, &cfg(1, threads, 0), &p)
            .unwrap_err();
        let msg = e.to_string();
        println!("{kernel}: {msg}");
        assert!(
            matches!(e, Error::Kernel { .. }) && msg.contains(kernel),
            "{msg}"
        );
        assert!(msg.to_lowercase().contains(expect), "{kernel}: {msg}");
    }
    // The full-mask sum is right for whole warps.
    let p = SimTestParams {
        out: out.device_ptr(),
        input: input.device_ptr(),
        ..Default::default()
    };
    Backend::Sim
        .launch("sim_planted_full_mask_sum_f32", &cfg(1, 64, 0), &p)
        .unwrap();
    assert!(read_f32(&out)[..64].iter().all(|&v| v == 32.0));
}

#[test]
fn atomics_and_shared_memory_across_blocks() {
    let (blocks, threads) = (3u32, 96u32);
    let n = (blocks * threads) as u64;
    let init = SimAtomicsOut {
        min_id: u32::MAX,
        ..Default::default()
    };
    let mut aux = Backend::Sim.alloc(48).unwrap();
    Backend::Sim
        .write(bytemuck::bytes_of(&init), &mut aux)
        .unwrap();
    let p = SimTestParams {
        aux: aux.device_ptr(),
        n,
        ..Default::default()
    };
    Backend::Sim
        .launch("sim_selftest_atomics", &cfg(blocks, threads, 0), &p)
        .unwrap();
    let mut o = SimAtomicsOut::default();
    Backend::Sim
        .read(&aux, bytemuck::bytes_of_mut(&mut o))
        .unwrap();
    assert_eq!(o.count, n);
    assert_eq!(o.max_id, n as i32 - 1);
    assert_eq!(o.min_id, 5);
    assert_eq!(o.cas_sum, 2 * n as i32);
    assert_eq!(o.or_bits, u32::MAX);
    assert_eq!(o.sub, -(n as i32));
    assert_eq!(o.block_sum, n as u32);
    assert_eq!(o.half_sum, n as f64 / 2.0);
    assert_eq!(o.fsum, n as f32);
    assert!((0.0..n as f32).contains(&o.exch));
}

#[test]
fn warp_shuffles_follow_cuda_semantics() {
    let n = 64usize;
    let input: Vec<f32> = (0..n).map(|i| (i * 7 % 13) as f32 - 6.0).collect();
    let inb = f32_buffer(&input);
    let out = Backend::Sim.alloc(8 * n * 4).unwrap();
    let p = SimTestParams {
        out: out.device_ptr(),
        input: inb.device_ptr(),
        n: n as u64,
        ..Default::default()
    };
    Backend::Sim
        .launch("sim_selftest_shfl_f32", &cfg(2, 32, 0), &p)
        .unwrap();
    let got = read_f32(&out);
    for g in 0..n {
        let (w, lane) = (g / 32 * 32, g % 32);
        let warp = &input[w..w + 32];
        let o = &got[8 * g..8 * g + 8];
        assert_eq!(o[0], warp.iter().sum::<f32>(), "xor sum, thread {g}");
        assert_eq!(o[1], warp[..=lane].iter().sum::<f32>(), "scan, thread {g}");
        assert_eq!(
            o[2],
            if lane + 3 < 32 {
                warp[lane + 3]
            } else {
                warp[lane]
            },
            "down 3, thread {g}"
        );
        assert_eq!(o[3], warp[(lane & !7) | 3], "width 8, thread {g}");
        assert_eq!(
            o[7],
            if lane >= 1 {
                warp[lane - 1]
            } else {
                warp[lane]
            },
            "up 33, thread {g}"
        );
    }
}

/// Runs a sanitizer build of the victim driver on `scenario`: (exit success, stderr + stdout).
fn victim(build: &str, path: &str, scenario: &str) -> (bool, String) {
    if let Some(e) = path.strip_prefix("error: ") {
        panic!("the {build} build of the simulator failed at build time: {e}");
    }
    let out = std::process::Command::new(path)
        .arg(scenario)
        // Sanitizer reports end the process; keep them plain and deterministic.
        .env("ASAN_OPTIONS", "detect_leaks=0:color=never")
        .env("TSAN_OPTIONS", "halt_on_error=1:color=never")
        .output()
        .unwrap_or_else(|e| panic!("running {path}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    (out.status.success(), text)
}

#[test]
fn address_sanitizer_reports_the_planted_out_of_bounds_write() {
    let asan = env!("LORAFUSE_SIM_VICTIM_ASAN");
    let (ok, text) = victim("AddressSanitizer", asan, "oob_write");
    assert!(
        !ok && text.contains("ERROR: AddressSanitizer: heap-buffer-overflow"),
        "{text}"
    );
    assert!(
        text.contains("sim_planted_oob_write_f32"),
        "the report names the kernel: {text}"
    );
    let (ok, text) = victim("AddressSanitizer", asan, "oob_write_control");
    assert!(
        ok && !text.contains("AddressSanitizer"),
        "the control must be clean: {text}"
    );
    // Shared memory too: the static array and the dynamic buffer, one past the end.
    for (scenario, report) in [
        ("shared_oob", "global-buffer-overflow"),
        ("dynamic_smem_oob", "heap-buffer-overflow"),
    ] {
        let (ok, text) = victim("AddressSanitizer", asan, scenario);
        assert!(
            !ok && text.contains(&format!("ERROR: AddressSanitizer: {report}")),
            "{scenario}: {text}"
        );
    }
    let (ok, text) = victim("AddressSanitizer", asan, "smem_oob_control");
    assert!(
        ok && !text.contains("AddressSanitizer"),
        "the control must be clean: {text}"
    );
}

#[test]
fn thread_sanitizer_reports_the_race_of_a_missing_barrier() {
    let tsan = env!("LORAFUSE_SIM_VICTIM_TSAN");
    let (ok, text) = victim("ThreadSanitizer", tsan, "missing_barrier");
    assert!(
        !ok && text.contains("WARNING: ThreadSanitizer: data race"),
        "{text}"
    );
    assert!(
        text.contains("sim_planted_missing_barrier_f32"),
        "the report names the kernel: {text}"
    );
    let (ok, text) = victim("ThreadSanitizer", tsan, "missing_barrier_control");
    assert!(
        ok && !text.contains("ThreadSanitizer"),
        "the control must be clean: {text}"
    );
}
