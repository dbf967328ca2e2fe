//! The simulator's checks, shown on kernels with planted bugs (`kernels/sim/planted_bugs.cu`):
//! in process, through the same `Backend::launch` the ops use (red zones, traps, asserts,
//! warp-mask errors), and in child processes built with AddressSanitizer and
//! ThreadSanitizer (an out-of-bounds write, a shared-memory race from a missing barrier),
//! each next to its clean control; and the stricter execution model (`cp.async` that lands
//! only at its wait, warp-serial scheduling that makes a missing barrier wrong on every run,
//! a seeded random block order, misaligned 16-byte accesses, poisoned static shared memory,
//! the dynamic shared memory opt-in, the `ldmatrix` layouts of the PTX ISA).

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
    mode: i32,
    arg: i32,
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

// ---- The stricter execution model ---------------------------------------------------------

fn u32_buffer(len: usize) -> DeviceBuffer {
    Backend::Sim.alloc(len * 4).unwrap()
}

fn read_u32(b: &DeviceBuffer) -> Vec<u32> {
    let mut v = vec![0u32; b.len() / 4];
    Backend::Sim
        .read(b, bytemuck::cast_slice_mut(&mut v))
        .unwrap();
    v
}

/// Fills `b` with NaN bytes again, as a fresh buffer holds, so one launch cannot pass on
/// what an earlier one left.
fn poison(b: &mut DeviceBuffer) {
    Backend::Sim.memset(b, super::sim::POISON_BYTE).unwrap();
}

fn launch_err(kernel: &str, cfg: &LaunchConfig, p: &SimTestParams) -> String {
    let e = Backend::Sim.launch(kernel, cfg, p).unwrap_err();
    assert!(matches!(e, Error::Kernel { .. }), "{e}");
    e.to_string()
}

#[test]
fn cp_async_lands_only_at_the_wait_that_covers_it() {
    let input: Vec<f32> = (0..512).map(|i| i as f32 + 1.0).collect();
    let inb = f32_buffer(&input);
    let mut out = Backend::Sim.alloc(8 * 64 * 4).unwrap();
    let run = |out: &mut DeviceBuffer, mode: i32, arg: i32| {
        poison(out);
        let p = SimTestParams {
            out: out.device_ptr(),
            input: inb.device_ptr(),
            mode,
            arg,
            ..Default::default()
        };
        Backend::Sim
            .launch("sim_planted_cp_async_f32", &cfg(1, 64, 0), &p)
            .map(|()| read_f32(out))
    };
    // out[8t + k]: tile 0 (k < 4) and tile 1 (k >= 4) as copied by thread (t + 1) % 64.
    let want = |t: usize, k: usize, bytes: usize| -> f32 {
        let u = (t + 1) % 64;
        let (tile, kk) = (k / 4, k % 4);
        if 4 * kk < bytes {
            input[256 * tile + 4 * u + kk]
        } else {
            0.0
        }
    };
    for (mode, arg, bytes) in [(0, 0, 16), (3, 0, 16), (5, 8, 8), (5, 0, 0), (5, 12, 12)] {
        let got = run(&mut out, mode, arg).unwrap();
        for t in 0..64 {
            for k in 0..8 {
                assert_eq!(
                    got[8 * t + k],
                    want(t, k, bytes),
                    "control mode {mode} (src_bytes {bytes}): thread {t}, k {k}"
                );
            }
        }
    }
    // Read before any wait; wait<1> when the newest group is needed: the data read is the
    // destination's poison (NaN), so a kernel test would fail.
    for (mode, nan_from) in [(1, 0), (2, 4)] {
        let got = run(&mut out, mode, 0).unwrap();
        for t in 0..64 {
            for k in 0..8 {
                assert_eq!(
                    got[8 * t + k].is_nan(),
                    k >= nan_from,
                    "planted mode {mode}: thread {t}, k {k}: {}",
                    got[8 * t + k]
                );
            }
        }
    }
    // A copy never committed (no wait covers it), a copy no wait covered before the exit:
    // the thread ends with it in flight, which may land in the next block's shared memory.
    for (mode, needle) in [
        (4, "exits with 1 cp.async copy still in flight"),
        (8, "exits with 1 cp.async copy still in flight"),
        (6, "misaligned cp.async destination"),
        (7, "misaligned cp.async source"),
    ] {
        let msg = run(&mut out, mode, 0).unwrap_err().to_string();
        assert!(
            msg.contains("sim_planted_cp_async_f32") && msg.contains(needle),
            "mode {mode}: {msg}"
        );
    }
}

#[test]
fn a_missing_barrier_between_warps_gives_a_wrong_result_on_every_run() {
    println!("simulator seed {:#x}", super::sim::seed());
    // The tiled loop whose loop-ending barrier is missing (the k-loop of a GEMM).
    let n = 4 * 128;
    let input: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
    let total: f32 = input.iter().sum();
    let inb = f32_buffer(&input);
    let out = Backend::Sim.alloc(128 * 4).unwrap();
    let p = |barrier| SimTestParams {
        out: out.device_ptr(),
        input: inb.device_ptr(),
        n: n as u64,
        barrier,
        ..Default::default()
    };
    for run in 0..5 {
        Backend::Sim
            .launch("sim_planted_tiled_sum_f32", &cfg(1, 128, 0), &p(1))
            .unwrap();
        assert!(
            read_f32(&out).iter().all(|&v| v == total),
            "control, run {run}"
        );
        Backend::Sim
            .launch("sim_planted_tiled_sum_f32", &cfg(1, 128, 0), &p(0))
            .unwrap();
        let wrong = read_f32(&out).iter().filter(|&&v| v != total).count();
        assert!(
            wrong > 0,
            "planted (no loop-ending barrier), run {run}: all right"
        );
    }
    // Thread 0 writes, every thread reads: warp 0 never runs first.
    let blocks = 3u32;
    let vals: Vec<f32> = (0..blocks).map(|b| b as f32 + 0.5).collect();
    let inb = f32_buffer(&vals);
    let mut out = Backend::Sim.alloc(blocks as usize * 64 * 4).unwrap();
    for run in 0..5 {
        for barrier in [1, 0] {
            poison(&mut out);
            let p = SimTestParams {
                out: out.device_ptr(),
                input: inb.device_ptr(),
                barrier,
                ..Default::default()
            };
            Backend::Sim
                .launch("sim_planted_broadcast_f32", &cfg(blocks, 64, 0), &p)
                .unwrap();
            let got = read_f32(&out);
            let right = (0..got.len()).all(|g| got[g] == vals[g / 64]);
            assert_eq!(
                right,
                barrier == 1,
                "broadcast, barrier {barrier}, run {run}"
            );
        }
    }
    // The block-wide reversal (the ThreadSanitizer victim) is wrong in-process too.
    let input: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let inb = f32_buffer(&input);
    let out = Backend::Sim.alloc(256 * 4).unwrap();
    for run in 0..3 {
        for barrier in [1, 0] {
            let p = SimTestParams {
                out: out.device_ptr(),
                input: inb.device_ptr(),
                n: 256,
                barrier,
                ..Default::default()
            };
            Backend::Sim
                .launch("sim_planted_missing_barrier_f32", &cfg(1, 256, 0), &p)
                .unwrap();
            let got = read_f32(&out);
            let right = (0..256).all(|i| got[i] == (255 - i) as f32);
            assert_eq!(
                right,
                barrier == 1,
                "reversal, barrier {barrier}, run {run}"
            );
        }
    }
}

#[test]
fn blocks_run_in_a_seeded_random_order_so_an_inter_block_dependency_fails() {
    println!("simulator seed {:#x}", super::sim::seed());
    for blocks in [2u32, 3, 7, 64] {
        let mut out = Backend::Sim.alloc(blocks as usize * 4).unwrap();
        let want: Vec<f32> = (0..blocks).map(|b| b as f32).collect();
        for run in 0..4 {
            for mode in [0, 1] {
                poison(&mut out);
                let p = SimTestParams {
                    out: out.device_ptr(),
                    mode,
                    ..Default::default()
                };
                Backend::Sim
                    .launch("sim_planted_block_chain_f32", &cfg(blocks, 32, 0), &p)
                    .unwrap();
                let right = read_f32(&out) == want;
                assert_eq!(
                    right,
                    mode == 0,
                    "{blocks} blocks, mode {mode} (1: block b reads block b-1), run {run}"
                );
            }
        }
    }
    // One block: nothing to reorder; the chain is right.
    let out = Backend::Sim.alloc(4).unwrap();
    let p = SimTestParams {
        out: out.device_ptr(),
        mode: 1,
        ..Default::default()
    };
    Backend::Sim
        .launch("sim_planted_block_chain_f32", &cfg(1, 32, 0), &p)
        .unwrap();
    assert_eq!(read_f32(&out), vec![0.0]);
}

#[test]
fn misaligned_or_non_shared_copy16_cp_async_and_ldmatrix_fail_the_launch() {
    let input: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let inb = f32_buffer(&input);
    let out = u32_buffer(32 * 4);
    let p = |mode| SimTestParams {
        out: out.device_ptr(),
        input: inb.device_ptr(),
        mode,
        ..Default::default()
    };
    Backend::Sim
        .launch("sim_planted_misaligned", &cfg(1, 32, 0), &p(0))
        .unwrap();
    for (mode, needle) in [
        (1, "misaligned copy16 source"),
        (2, "misaligned copy16 destination"),
        (3, "misaligned ldmatrix row address"),
        (4, "misaligned ldmatrix row address"),
    ] {
        let msg = launch_err("sim_planted_misaligned", &cfg(1, 32, 0), &p(mode));
        assert!(
            msg.contains(needle) && msg.contains("16-byte aligned"),
            "mode {mode}: {msg}"
        );
    }
    // ldmatrix and cp.async reach shared memory only (a static array, or the dynamic one).
    for (mode, needle) in [(5, "ldmatrix row address"), (6, "cp.async destination")] {
        let msg = launch_err("sim_planted_misaligned", &cfg(1, 32, 0), &p(mode));
        assert!(
            msg.contains(needle) && msg.contains("is not in shared memory"),
            "mode {mode}: {msg}"
        );
    }
    let msg = launch_err("sim_planted_misaligned", &cfg(1, 32, 0), &p(5));
    assert!(msg.contains("thread (7,0,0)"), "{msg}");
    // The lanes named: lane 5 for the x4 load, lane 3 for the x2 load.
    let msg = launch_err("sim_planted_misaligned", &cfg(1, 32, 0), &p(3));
    assert!(msg.contains("thread (5,0,0)"), "{msg}");
    let msg = launch_err("sim_planted_misaligned", &cfg(1, 32, 0), &p(4));
    assert!(msg.contains("thread (3,0,0)"), "{msg}");
}

#[test]
fn static_shared_memory_is_poisoned_before_every_block() {
    let blocks = 3u32;
    let mut out = Backend::Sim.alloc(blocks as usize * 64 * 4).unwrap();
    poison(&mut out);
    let p = |mode| SimTestParams {
        out: out.device_ptr(),
        mode,
        ..Default::default()
    };
    // Modes 0/1 declare the array in the kernel, 2/3 in a function template (whose statics
    // g++ places outside lf_sim_shared, until build.rs moves them in).
    for (control, read_first) in [(0, 1), (2, 3)] {
        Backend::Sim
            .launch(
                "sim_planted_stale_static_smem_f32",
                &cfg(blocks, 64, 0),
                &p(control),
            )
            .unwrap();
        for (g, &v) in read_f32(&out).iter().enumerate() {
            let (b, t) = (g / 64, g % 64);
            assert_eq!(v, (b + (t + 1) % 64) as f32, "mode {control}, thread {g}");
        }
        // Read before written: every block sees 0xFF bytes, not zeros, not the previous
        // block's values (or the previous launch's).
        for _ in 0..2 {
            Backend::Sim
                .launch(
                    "sim_planted_stale_static_smem_f32",
                    &cfg(blocks, 64, 0),
                    &p(read_first),
                )
                .unwrap();
            let bits: Vec<u32> = read_f32(&out).iter().map(|v| v.to_bits()).collect();
            assert!(
                bits.iter().all(|&b| b == u32::MAX),
                "mode {read_first}: {bits:x?}"
            );
        }
    }
}

#[test]
fn more_than_48_kib_of_dynamic_shared_memory_needs_the_opt_in() {
    let kernel = "sim_selftest_big_smem_f32";
    let bytes = 64 * 1024u32;
    let floats = (bytes / 4) as u64;
    let out = Backend::Sim.alloc(128 * 4).unwrap();
    let p = |n| SimTestParams {
        out: out.device_ptr(),
        n,
        ..Default::default()
    };
    // 48 KiB needs nothing.
    Backend::Sim
        .launch(kernel, &cfg(1, 128, 48 * 1024), &p(12 * 1024))
        .unwrap();
    let msg = launch_err(kernel, &cfg(1, 128, bytes), &p(floats));
    assert!(
        msg.contains("65536 bytes of dynamic shared memory") && msg.contains("opt-in"),
        "{msg}"
    );
    Backend::Sim.opt_in_dynamic_shared(kernel, bytes).unwrap();
    Backend::Sim
        .launch(kernel, &cfg(1, 128, bytes), &p(floats))
        .unwrap();
    let got = read_f32(&out);
    assert!((0..128).all(|t| got[t] == (floats - 1 - t as u64) as f32));
    // Beyond the opt-in, and beyond what any GPU has, still fail.
    let msg = launch_err(kernel, &cfg(1, 128, bytes + 16), &p(floats));
    assert!(msg.contains("opt-in"), "{msg}");
    let e = Backend::Sim
        .opt_in_dynamic_shared(kernel, 228 * 1024)
        .unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    assert!(
        Backend::Sim
            .opt_in_dynamic_shared("no_such_kernel", 1)
            .is_err()
    );
}

#[test]
fn ldmatrix_forms_follow_the_ptx_isa_layouts() {
    let out = u32_buffer(384);
    let p = SimTestParams {
        out: out.device_ptr(),
        ..Default::default()
    };
    Backend::Sim
        .launch("sim_selftest_ldmatrix", &cfg(1, 32, 0), &p)
        .unwrap();
    let got = read_u32(&out);
    // M_j[r][c] as the kernel stored it; a register packs the lower column (or row) low.
    let m = |j: usize, r: usize, c: usize| (1 + 64 * j + 8 * r + c) as u32;
    let pack = |lo: u32, hi: u32| lo | hi << 16;
    for l in 0..32 {
        let (row, col) = (l / 4, 2 * (l % 4));
        for j in 0..4 {
            // Non-transposed: (row l/4, columns 2(l%4), 2(l%4)+1) of matrix j.
            let plain = pack(m(j, row, col), m(j, row, col + 1));
            // .trans: (rows 2(l%4), 2(l%4)+1, column l/4) of matrix j.
            let trans = pack(m(j, col, row), m(j, col + 1, row));
            assert_eq!(got[4 * l + j], plain, "x4, lane {l}, r[{j}]");
            assert_eq!(got[128 + 4 * l + j], trans, "x4.trans, lane {l}, r[{j}]");
            if j < 2 {
                assert_eq!(got[256 + 2 * l + j], plain, "x2, lane {l}, r[{j}]");
                assert_eq!(got[320 + 2 * l + j], trans, "x2.trans, lane {l}, r[{j}]");
            }
        }
    }
}

/// The mutation harness (`sim_mutation`) finds a kernel's sites and proves them
/// load-bearing: the tiled sum's loop barrier and the cp.async kernel's wait fail their
/// probes when deleted; a probe that checks nothing leaves its sites alive, and the
/// harness says so, naming them.
#[test]
fn the_mutation_harness_deletes_each_site_and_names_the_survivors() {
    use super::sim_mutation::{SiteKind, assert_every_site_is_load_bearing};
    let n = 4 * 128;
    let input: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
    let total: f32 = input.iter().sum();
    let inb = f32_buffer(&input);
    let out = Backend::Sim.alloc(128 * 4).unwrap();
    let p = SimTestParams {
        out: out.device_ptr(),
        input: inb.device_ptr(),
        n: n as u64,
        barrier: 1,
        ..Default::default()
    };
    let launch = || {
        Backend::Sim
            .launch("sim_planted_tiled_sum_f32", &cfg(1, 128, 0), &p)
            .unwrap()
    };
    let checked = || {
        launch();
        assert!(read_f32(&out).iter().all(|&v| v == total));
    };
    let sites =
        assert_every_site_is_load_bearing("tiled sum", &["sim_planted_tiled_sum"], &[&checked]);
    assert!(
        sites.iter().all(|s| s.kind == SiteKind::Barrier),
        "{sites:?}"
    );

    // The cp.async control (mode 0: copy, commit, wait<0>, barrier, read).
    let cp_out = Backend::Sim.alloc(8 * 64 * 4).unwrap();
    let cp_in = f32_buffer(&(0..512).map(|i| i as f32 + 1.0).collect::<Vec<_>>());
    let cp = SimTestParams {
        out: cp_out.device_ptr(),
        input: cp_in.device_ptr(),
        mode: 0,
        arg: 16,
        ..Default::default()
    };
    let cp_checked = || {
        Backend::Sim
            .launch("sim_planted_cp_async_f32", &cfg(1, 64, 0), &cp)
            .unwrap();
        assert!(read_f32(&cp_out).iter().all(|v| v.is_finite()));
    };
    let sites =
        assert_every_site_is_load_bearing("cp.async", &["sim_planted_cp_async"], &[&cp_checked]);
    assert!(
        sites.iter().any(|s| s.kind == SiteKind::CpAsyncWait),
        "{sites:?}"
    );

    // A probe that checks nothing: every site survives, and the failure names them.
    let err = std::panic::catch_unwind(|| {
        assert_every_site_is_load_bearing("unchecked", &["sim_planted_tiled_sum"], &[&launch])
    })
    .expect_err("a probe that checks nothing must leave its sites alive");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("__syncthreads() at planted_bugs.cu:")
            && msg.contains("sim_planted_tiled_sum_f32"),
        "{msg}"
    );
}

// ---- Hopper: wgmma, shared-memory descriptors, TMA, mbarrier, named barriers, warpgroups ----

fn u16_buffer(values: &[u16]) -> DeviceBuffer {
    let mut b = Backend::Sim.alloc(values.len() * 2).unwrap();
    Backend::Sim
        .write(bytemuck::cast_slice(values), &mut b)
        .unwrap();
    b
}

/// A device buffer holding `map` at a 64-byte aligned address, and that address.
fn tensor_map_buffer(map: &[u8; 128]) -> (DeviceBuffer, u64) {
    let mut b = Backend::Sim.alloc(192).unwrap();
    let offset = (64 - b.device_ptr() % 64) % 64;
    let mut bytes = vec![0u8; 192];
    bytes[offset as usize..offset as usize + 128].copy_from_slice(map);
    Backend::Sim.write(&bytes, &mut b).unwrap();
    let at = b.device_ptr() + offset;
    (b, at)
}

/// sim_selftest_wgmma_{bf16,f16}: D (64×n) = A·Bᵀ through shared memory laid out for the
/// descriptor swizzle `mode` (0 none, 1 128 B, 2 64 B, 3 32 B), with the kernel's planted bugs
/// `flags`. Small integers: every product is exact. Ok(D == A·Bᵀ) or the launch error.
fn run_wgmma(f16: bool, n: usize, mode: i32, flags: i32, seed: u64) -> Result<bool, String> {
    run_wgmma_layout(f16, n, mode, 0, flags, seed)
}

/// As [`run_wgmma`], with the operand layouts and form `layout` (the kernel's bits: 1 A
/// MN-major, 2 B MN-major, 4 A from registers).
fn run_wgmma_layout(
    f16: bool,
    n: usize,
    mode: i32,
    layout: u64,
    flags: i32,
    seed: u64,
) -> Result<bool, String> {
    let span = [0usize, 128, 64, 32][mode as usize];
    let k = if span == 0 { 32 } else { span / 2 };
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % 9) as f32 - 4.0
    };
    let a: Vec<f32> = (0..64 * k).map(|_| next()).collect();
    let b: Vec<f32> = (0..n * k).map(|_| next()).collect();
    let bits = |v: &[f32]| -> Vec<u16> {
        v.iter()
            .map(|&x| {
                if f16 {
                    half::f16::from_f32(x).to_bits()
                } else {
                    half::bf16::from_f32(x).to_bits()
                }
            })
            .collect()
    };
    let (ab, bb) = (u16_buffer(&bits(&a)), u16_buffer(&bits(&b)));
    let out = Backend::Sim.alloc(64 * n * 4).unwrap();
    let p = SimTestParams {
        out: out.device_ptr(),
        input: ab.device_ptr(),
        aux: bb.device_ptr(),
        n: layout,
        mode,
        arg: n as i32,
        barrier: flags,
        ..Default::default()
    };
    let kernel = if f16 {
        "sim_selftest_wgmma_f16"
    } else {
        "sim_selftest_wgmma_bf16"
    };
    Backend::Sim
        .launch(kernel, &cfg(1, 128, 40960), &p)
        .map_err(|e| e.to_string())?;
    let got = read_f32(&out);
    Ok((0..64).all(|r| {
        (0..n).all(|c| {
            let want: f32 = (0..k).map(|q| a[r * k + q] * b[c * k + q]).sum();
            got[r * n + c] == want
        })
    }))
}

#[test]
fn wgmma_reads_descriptors_as_the_ptx_isa_defines_and_its_planted_bugs_fail() {
    for mode in 0..4 {
        for (f16, n) in [(false, 8), (false, 64), (false, 256), (true, 16)] {
            assert_eq!(
                run_wgmma(f16, n, mode, 0, 7 + n as u64),
                Ok(true),
                "control: m64n{n}k16 f16={f16}, swizzle mode {mode}"
            );
        }
        // A descriptor that names the wrong swizzle reads the operands scrambled.
        assert_eq!(
            run_wgmma(false, 64, mode, 2, 11),
            Ok(false),
            "planted: wrong swizzle, mode {mode}"
        );
    }
    // Reading the accumulators before the wait that covers the wgmma: NaN.
    assert_eq!(run_wgmma(false, 64, 1, 4, 3), Ok(false));
    // Shared memory written by ordinary stores, read by wgmma without fence.proxy.async.
    let e = run_wgmma(false, 64, 1, 1, 5).unwrap_err();
    assert!(e.contains("fence.proxy.async"), "{e}");
}

#[test]
fn wgmma_mn_major_operands_and_register_a_follow_the_ptx_isa_and_their_planted_bugs_fail() {
    // (layout bits, N): B MN-major (TMA's K rows × N columns), A MN-major, both, A from
    // registers, A from registers with B MN-major; N of whole MN-major atoms in every mode.
    for mode in 0..4 {
        for (layout, n, f16) in [
            (2u64, 64usize, false),
            (2, 256, true),
            (1, 16, false),
            (3, 128, false),
            (4, 64, true),
            (6, 256, false),
        ] {
            assert_eq!(
                run_wgmma_layout(f16, n, mode, layout, 0, 13 + n as u64),
                Ok(true),
                "control: layout {layout}, m64n{n}k16 f16={f16}, swizzle mode {mode}"
            );
        }
        // B stored K-major but read with imm-trans-b, in both forms; an MN-major B descriptor
        // with LBO and SBO in each other's place (the K-major convention).
        for (layout, flags) in [(2u64, 8), (6, 8), (2, 16)] {
            assert_eq!(
                run_wgmma_layout(false, 256, mode, layout, flags, 17),
                Ok(false),
                "planted: layout {layout}, bug {flags}, swizzle mode {mode}"
            );
        }
    }
    // An A register changed between the register-form wgmma's issue and its wait.
    let e = run_wgmma_layout(false, 64, 1, 4, 32, 19).unwrap_err();
    assert!(
        e.contains("register operand A changed between the wgmma's issue and the wait"),
        "{e}"
    );
    // The transpose flag differs across the warpgroup.
    let e = run_wgmma_layout(false, 64, 1, 2, 64, 23).unwrap_err();
    assert!(
        e.contains("not warpgroup-uniform") && e.contains("imm-trans-b"),
        "{e}"
    );
    assert_eq!(
        run_wgmma_layout(false, 64, 1, 4, 0, 19),
        Ok(true),
        "control after the errors"
    );
}

#[test]
fn wgmma_accumulators_are_nan_until_the_covering_wait() {
    // The planted early read gives NaN specifically (not merely a wrong value).
    let out = Backend::Sim.alloc(64 * 64 * 4).unwrap();
    let ones = u16_buffer(&vec![half::bf16::from_f32(1.0).to_bits(); 64 * 64]);
    let p = SimTestParams {
        out: out.device_ptr(),
        input: ones.device_ptr(),
        aux: ones.device_ptr(),
        mode: 1,
        arg: 64,
        barrier: 4,
        ..Default::default()
    };
    Backend::Sim
        .launch("sim_selftest_wgmma_bf16", &cfg(1, 128, 40960), &p)
        .unwrap();
    assert!(read_f32(&out).iter().all(|x| x.is_nan()));
    let p = SimTestParams { barrier: 0, ..p };
    Backend::Sim
        .launch("sim_selftest_wgmma_bf16", &cfg(1, 128, 40960), &p)
        .unwrap();
    assert!(read_f32(&out).iter().all(|&x| x == 64.0), "control");
}

#[test]
fn tma_boxes_land_swizzled_and_zero_filled_when_their_mbarrier_phase_completes() {
    let (rows, cols) = (40usize, 72usize);
    let g: Vec<u16> = (0..rows * cols).map(|i| (i + 1) as u16).collect();
    let global = u16_buffer(&g);
    // (swizzle bytes, box, coordinates, planted wrong parity)
    for (sw, bx, c, wrong_parity) in [
        (0u32, [24u32, 5u32], [3i32, 2i32], false),
        (0, [16, 8], [64, 36], false),
        (128, [64, 16], [0, 0], false),
        (128, [64, 8], [40, -3], false),
        (64, [32, 16], [8, 4], false),
        (32, [16, 16], [-8, 30], false),
        (128, [64, 8], [0, 0], true),
    ] {
        let map = super::sim::tensor_map_2d(
            global.device_ptr(),
            2,
            [cols as u64, rows as u64],
            (cols * 2) as u64,
            bx,
            sw,
        )
        .unwrap();
        let (_map_buf, map_at) = tensor_map_buffer(&map);
        let bytes = (2 * bx[0] * bx[1]) as usize;
        let out = Backend::Sim.alloc(bytes).unwrap();
        let p = SimTestParams {
            out: out.device_ptr(),
            aux: map_at,
            n: bytes as u64,
            oob: c[0],
            arg: c[1],
            mode: wrong_parity as i32,
            ..Default::default()
        };
        let r = Backend::Sim.launch("sim_selftest_tma", &cfg(1, 128, 1024 + bytes as u32), &p);
        let mut got = vec![0u16; bytes / 2];
        Backend::Sim
            .read(&out, bytemuck::cast_slice_mut(&mut got))
            .unwrap();
        if wrong_parity {
            // Threads that wait before the copy's phase completes pass at once and read the
            // poisoned destination; those after wait for a phase that never comes: deadlock.
            let caught = match &r {
                Ok(()) => got[0] == 0xFFFF,
                Err(e) => e.to_string().contains("deadlock"),
            };
            assert!(caught, "planted wrong parity not caught: {r:?}");
            continue;
        }
        r.unwrap();
        // The image from the TMA's side: box element (x, y) in row y, its 16-byte chunk
        // index XORed with the row's phase in the swizzle pattern.
        let row_bytes = 2 * bx[0] as usize;
        for y in 0..bx[1] as usize {
            for x in 0..bx[0] as usize {
                let (gx, gy) = (c[0] + x as i32, c[1] + y as i32);
                let inside = gx >= 0 && gy >= 0 && (gx as usize) < cols && (gy as usize) < rows;
                let want = if inside {
                    g[gy as usize * cols + gx as usize]
                } else {
                    0
                };
                let mut chunk = 2 * x / 16;
                if sw != 0 {
                    chunk ^= (y % 8) / (128 / sw as usize);
                }
                let at = (y * row_bytes + 16 * chunk + (2 * x) % 16) / 2;
                assert_eq!(
                    got[at], want,
                    "swizzle {sw}, box {bx:?} at {c:?}: ({x},{y})"
                );
            }
        }
    }
    let e =
        super::sim::tensor_map_2d(global.device_ptr(), 2, [72, 40], 144, [32, 8], 128).unwrap_err();
    assert!(e.to_string().contains("swizzle"), "{e}");
}

/// sim_selftest_pipeline_f32 (planted_bugs.cu) in `mode` over `tiles` tiles: its output, or
/// the launch error.
fn run_pipeline(mode: i32, tiles: usize) -> Result<Vec<f32>, String> {
    let g: Vec<f32> = (0..tiles * 128).map(|i| (i % 97) as f32 - 40.0).collect();
    let global = f32_buffer(&g);
    let map = super::sim::tensor_map_2d(
        global.device_ptr(),
        4,
        [16, (tiles * 8) as u64],
        64,
        [16, 8],
        0,
    )
    .unwrap();
    let (_map_buf, map_at) = tensor_map_buffer(&map);
    let out = Backend::Sim.alloc(128 * 4).unwrap();
    let p = SimTestParams {
        out: out.device_ptr(),
        aux: map_at,
        n: tiles as u64,
        mode,
        ..Default::default()
    };
    Backend::Sim
        .launch("sim_selftest_pipeline_f32", &cfg(1, 256, 2048), &p)
        .map_err(|e| e.to_string())?;
    let got = read_f32(&out);
    let want: Vec<f32> = (0..128)
        .map(|t| (0..tiles).map(|i| g[i * 128 + t]).sum())
        .collect();
    if mode == 0 {
        assert_eq!(got, want, "control: the pipeline's sums");
    }
    Ok(got)
}

#[test]
fn warp_specialised_producer_consumer_runs_and_its_planted_bugs_fail() {
    // A producer warpgroup feeding consumers through TMA and full/empty mbarriers, with no
    // block barrier in the loop: runs (warps hand the baton on at each wait).
    run_pipeline(0, 7).unwrap();
    for (mode, needle) in [
        (1, "deadlock"),          // producer's `empty` parity wrong
        (3, "deadlock"),          // consumers never release a stage
        (4, "warpgroup-uniform"), // setmaxnreg counts differ within the warpgroup
        (5, "bar.sync"),          // a named barrier counting 256 where 128 arrive: deadlock
    ] {
        let e = run_pipeline(mode, 7).unwrap_err();
        assert!(e.contains(needle), "mode {mode}: {e}");
    }
    // The consumers' `full` parity wrong: poison read, or a deadlock once the phase passed.
    match run_pipeline(2, 7) {
        Ok(v) => assert!(v[0].is_nan(), "{v:?}"),
        Err(e) => assert!(e.contains("deadlock"), "{e}"),
    }
}

#[test]
fn warpgroup_collectives_need_whole_warpgroups() {
    let out = Backend::Sim.alloc(256 * 4).unwrap();
    let p = SimTestParams {
        out: out.device_ptr(),
        ..Default::default()
    };
    Backend::Sim
        .launch("sim_planted_warpgroup", &cfg(2, 256, 0), &p)
        .unwrap();
    let e = launch_err("sim_planted_warpgroup", &cfg(1, 96, 0), &p);
    assert!(e.contains("4 whole warps"), "{e}");
    let p = SimTestParams { mode: 1, ..p };
    let e = launch_err("sim_planted_warpgroup", &cfg(1, 128, 0), &p);
    assert!(e.contains("warpgroup"), "{e}");
}
