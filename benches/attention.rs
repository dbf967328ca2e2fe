//! Causal attention (`kernels/attention.cu`) at GPT-2 124M's shape: B 8, H 12, T 1024,
//! hd 64 (C 768), bf16 — the FlashAttention-2 tensor-core kernels.
//!
//! - `fwd`: `causal_attention` forward alone; throughput in useful FLOPs
//!   4·B·H·T²·hd/2 (12.9 GFLOP; criterion's "elem/s" is FLOP/s).
//! - `fwd_bwd`: forward + backward through the tape, counted as FlashAttention-2 counts it
//!   (the backward 2.5× the forward, so 3.5× in all: 45.1 GFLOP), comparable with PyTorch
//!   SDPA's numbers; the kernels execute more (7 GEMMs in the backward, the header of
//!   `kernels/attention.cu`).
//!
//! On a compute-capability 9.0 GPU (H100/H200) the forward and the backward run the Hopper
//! kernels of `kernels/attention_wgmma.cu` (wgmma + TMA, FlashAttention-3 style);
//! `fwd_sm80` and `fwd_bwd_sm80` rerun them with `set_hopper_attention(false)` on the
//! FlashAttention-2 kernels, so one call shows both (PyTorch SDPA's numbers come from
//! `bench/pytorch`).
//!
//! Before criterion, a plain timing prints TFLOP/s and the fraction of the ~800 TFLOP/s
//! floor the header states. Every timed iteration ends with `Device::synchronize()`.
//! Without a GPU the group prints `skipped`. `cargo bench --bench attention`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lorafuse::ops::causal_attention;
use lorafuse::{DType, Device, Tape, Tensor};
use rand::SeedableRng;
use std::time::{Duration, Instant};

const B: usize = 8;
const H: usize = 12;
const T: usize = 1024;
const HD: usize = 64;
/// The floor's rate: dense mma.sync on an H100/H200 (DESIGN §9).
const FLOOR_TFLOPS: f64 = 800.0;

fn fwd_flops() -> u64 {
    (4 * B * H * T * T * HD / 2) as u64
}

fn fwd_bwd_flops() -> u64 {
    fwd_flops() * 7 / 2
}

/// Best of 20 synchronised runs of `f` (after one warm-up), printed as TFLOP/s of `flops`.
fn time(label: &str, flops: u64, f: &dyn Fn()) {
    f();
    let best = (0..20)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    let tflops = flops as f64 / best / 1e12;
    println!(
        "attention/cuda {label} B{B} H{H} T{T} hd{HD} bf16: {:.1} µs, {tflops:.0} TFLOP/s \
         ({:.2} of the {FLOOR_TFLOPS} TFLOP/s floor)",
        best * 1e6,
        tflops / FLOOR_TFLOPS
    );
}

fn benches(c: &mut Criterion) {
    let device = Device::Cuda(0);
    if let Some(reason) = device.unavailable_reason() {
        println!("attention/cuda: skipped ({reason})");
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let c3 = 3 * H * HD;
    let qkv =
        Tensor::rand_uniform(-1.0, 1.0, [B, T, c3], DType::BF16, &device, &mut rng).expect("qkv");
    let gy = Tensor::rand_uniform(-1.0, 1.0, [B, T, H * HD], DType::BF16, &device, &mut rng)
        .expect("gy");
    let sync = || device.synchronize().expect("synchronize");
    let fwd = || {
        let y = causal_attention(&qkv, H).expect("forward");
        sync();
        y
    };
    let fwd_bwd = || {
        let tape = Tape::new();
        let x = qkv.track(&tape);
        let y = causal_attention(&x, H).expect("forward");
        let g = tape.backward_with(&y, gy.clone()).expect("backward");
        sync();
        g
    };
    time("fwd", fwd_flops(), &|| {
        fwd();
    });
    time("fwd_bwd", fwd_bwd_flops(), &|| {
        fwd_bwd();
    });
    let hopper = lorafuse::ops::hopper_attention_available(&device).unwrap_or(false);
    if hopper {
        lorafuse::ops::set_hopper_attention(false);
        time("fwd_sm80", fwd_flops(), &|| {
            fwd();
        });
        time("fwd_bwd_sm80", fwd_bwd_flops(), &|| {
            fwd_bwd();
        });
        lorafuse::ops::set_hopper_attention(true);
    } else {
        println!(
            "attention/cuda fwd_sm80, fwd_bwd_sm80: skipped (not a compute-capability 9.0 GPU with the sm_90a cubin: fwd and fwd_bwd are the sm_80 kernels)"
        );
    }
    let mut g = c.benchmark_group("attention/cuda");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let id = format!("B{B}_H{H}_T{T}_hd{HD}_bf16");
    g.throughput(Throughput::Elements(fwd_flops()));
    g.bench_function(BenchmarkId::new("fwd", &id), |bch| bch.iter(fwd));
    if hopper {
        lorafuse::ops::set_hopper_attention(false);
        g.bench_function(BenchmarkId::new("fwd_sm80", &id), |bch| bch.iter(fwd));
        lorafuse::ops::set_hopper_attention(true);
    }
    g.throughput(Throughput::Elements(fwd_bwd_flops()));
    g.bench_function(BenchmarkId::new("fwd_bwd", &id), |bch| bch.iter(fwd_bwd));
    if hopper {
        lorafuse::ops::set_hopper_attention(false);
        g.bench_function(BenchmarkId::new("fwd_bwd_sm80", &id), |bch| {
            bch.iter(fwd_bwd)
        });
        lorafuse::ops::set_hopper_attention(true);
    }
    g.finish();
}

criterion_group!(attention, benches);
criterion_main!(attention);
