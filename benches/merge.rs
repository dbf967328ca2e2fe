//! The merged-weight update (`kernels/lora_merge.cu`) against DESIGN §10's baseline, a
//! device copy of the same bytes.
//!
//! - `merge`: [`lora_merge`] of one rank-16 adapter into every row of `W` (nearest even);
//! - `merge_stochastic`: the same with stochastic rounding;
//! - `weighted_merge_2`: two adapters in one pass (a weighted merge);
//! - `copy`: [`Tensor::copy_from`] of a tensor of `W`'s size.
//!
//! Throughput is bytes moved per second: `W` read and written (`2·s·N·K`; the adapters'
//! bytes are under 1 % of it). The target is merge bandwidth ≥ 85 % of `copy`'s. Every
//! timed iteration ends with `Device::synchronize()`. On a GPU: `W` bf16 4096 × 4096,
//! `r = 16`. Without one, `merge/cuda` prints `skipped` and a small f32 CPU group
//! (512 × 512, `r = 16`) runs instead. `cargo bench --bench merge`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lorafuse::ops::{LoraTerm, lora_merge, lora_merge_with};
use lorafuse::optim::Rounding;
use lorafuse::{DType, Device, Tensor};
use rand::SeedableRng;

const RANK: usize = 16;
const SCALE: f64 = 2.0;

fn bench_group(c: &mut Criterion, group: &str, device: Device, n: usize, k: usize, dtype: DType) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut rand = |dims: [usize; 2], bound: f64| {
        Tensor::rand_uniform(-bound, bound, dims, dtype, &device, &mut rng).expect("tensor")
    };
    let w = rand([n, k], 1.0);
    let (a, b) = (rand([RANK, k], 0.01), rand([n, RANK], 0.01));
    let (a2, b2) = (rand([RANK, k], 0.01), rand([n, RANK], 0.01));
    let term = |a, b, scale| LoraTerm {
        a,
        b,
        scale,
        out_range: 0..n,
    };
    let bytes = (2 * n * k * dtype.size_in_bytes()) as u64;
    println!("{group}: W [{n}, {k}] {dtype}, r = {RANK}, {bytes} bytes per merge");
    let mut g = c.benchmark_group(group);
    g.sample_size(20);
    g.throughput(Throughput::Bytes(bytes));
    // Merge and unmerge alternate, so W stays bounded however many iterations run.
    let mut sign = 1.0;
    g.bench_function("merge", |bch| {
        bch.iter(|| {
            sign = -sign;
            lora_merge(&w, &[term(&a, &b, sign * SCALE)]).expect("merge");
            device.synchronize().expect("sync");
        })
    });
    g.bench_function("merge_stochastic", |bch| {
        bch.iter(|| {
            sign = -sign;
            let t = [term(&a, &b, sign * SCALE)];
            lora_merge_with(&w, &t, Rounding::Stochastic { seed: 3 }).expect("merge");
            device.synchronize().expect("sync");
        })
    });
    g.bench_function("weighted_merge_2", |bch| {
        bch.iter(|| {
            sign = -sign;
            let t = [
                term(&a, &b, sign * 0.7 * SCALE),
                term(&a2, &b2, sign * 0.3 * SCALE),
            ];
            lora_merge(&w, &t).expect("merge");
            device.synchronize().expect("sync");
        })
    });
    let dst = Tensor::zeros([n, k], dtype, &device).expect("dst");
    g.bench_function("copy", |bch| {
        bch.iter(|| {
            dst.copy_from(&w).expect("copy");
            device.synchronize().expect("sync");
        })
    });
    g.finish();
}

fn bench_merge(c: &mut Criterion) {
    let device = Device::Cuda(0);
    match device.unavailable_reason() {
        Some(reason) => {
            println!("merge/cuda: skipped ({reason})");
            bench_group(c, "merge/cpu", Device::Cpu, 512, 512, DType::F32);
        }
        None => bench_group(c, "merge/cuda", device, 4096, 4096, DType::BF16),
    }
}

criterion_group!(benches, bench_merge);
criterion_main!(benches);
