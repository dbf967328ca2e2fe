//! The split-K token reductions of the LoRA backward (`kernels/lora_reduce.cu`) against
//! the 64×64-tile GEMM that computed them before (`kernels/lora_matmul.cu`).
//!
//! - `gA_split_k`, `gA_gemm`: `gA = svᵀ·x` `[r, K]` over the M tokens;
//! - `gB_split_k`, `gB_gemm`: `gB = gyᵀ·su` `[N, r]`.
//!
//! Throughput is the floor's bytes per second: `x` (or `gy`) and `sv` (or `su`) read once,
//! the output written once (`s·M·(K + r) + s·r·K`); criterion's GB/s over the copy
//! bandwidth (~3.0–4.3 TB/s on an H100/H200, DESIGN §9) is the fraction of the floor the
//! kernel header predicts (60–75 %). Every timed iteration ends with
//! `Device::synchronize()`. GPU only: the GPT-2 124M `c_attn` shape (bf16, M = 8192,
//! K = 768, N = 2304, r = 16) and the headline (M = 8192, K = N = 4096, r = 16). Without a
//! GPU, `lora_reduce/cuda` prints `skipped`. `cargo bench --bench lora_reduce`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lorafuse::ops::bench_token_reduce;
use lorafuse::{DType, Device, Tensor};
use rand::SeedableRng;
use std::time::Duration;

const DTYPE: DType = DType::BF16;

fn group(c: &mut Criterion, device: Device, name: &str, m: usize, k: usize, n: usize, r: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut t = |dims: [usize; 2]| {
        Tensor::rand_uniform(-1.0, 1.0, dims, DTYPE, &device, &mut rng).expect("tensor")
    };
    let (x, gy, sv, su) = (t([m, k]), t([m, n]), t([m, r]), t([m, r]));
    let s = DTYPE.size_in_bytes();
    let sync = || device.synchronize().expect("synchronize");
    let mut g = c.benchmark_group(format!("lora_reduce/cuda/{name}"));
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    let id = format!("M{m}_K{k}_N{n}_r{r}_{DTYPE}");
    for (label, l, rr, big) in [("gA", &sv, &x, k), ("gB", &gy, &su, n)] {
        let bytes = (s * (m * (big + r) + r * big)) as u64;
        println!(
            "lora_reduce/cuda/{name}/{label}: {bytes} floor bytes, {:.1}-{:.1} µs at 4.3-3.0 TB/s",
            bytes as f64 / 4.3e6,
            bytes as f64 / 3.0e6
        );
        g.throughput(Throughput::Bytes(bytes));
        for (variant, split) in [("split_k", true), ("gemm", false)] {
            g.bench_function(BenchmarkId::new(format!("{label}_{variant}"), &id), |b| {
                b.iter(|| {
                    let out = bench_token_reduce(l, rr, 1.0, split).expect("reduce");
                    sync();
                    out
                })
            });
        }
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let gpu = Device::Cuda(0);
    match gpu.unavailable_reason() {
        None => {
            group(c, gpu, "gpt2_c_attn", 8192, 768, 2304, 16);
            group(c, gpu, "headline", 8192, 4096, 4096, 16);
        }
        Some(reason) => println!("lora_reduce/cuda: skipped ({reason})"),
    }
}

criterion_group!(lora_reduce, benches);
criterion_main!(lora_reduce);
