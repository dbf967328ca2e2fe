//! The multi-tensor AdamW step (`kernels/adamw.cu`) on a GPU, against DESIGN §10's
//! baseline, the measured device copy bandwidth.
//!
//! The list is GPT-2 124M's parameter tensors (148 tensors, 124.5 M elements with wte's
//! padding; full fine-tuning, the optimizer's worst case), bf16 parameters with f32
//! gradients. Per element a step moves 34 bytes: the norm pass reads the f32 gradient (4),
//! the update reads the gradient (4), reads and writes the f32 master, m and v (24) and
//! writes the bf16 parameter (2).
//!
//! - `adamw/cuda/multi_tensor`: one [`AdamW::step`]: three launches for the whole list,
//!   the step state read back at the end (80 bytes; that read is the synchronisation);
//! - `adamw/cuda/per_tensor`: the same kernels launched once per tensor (one optimizer per
//!   tensor, [`AdamW::step_deferred`], then `Device::synchronize`): 3 × 148 launches and a
//!   small report copy per tensor;
//! - `adamw/cuda/device_copy`: [`Tensor::copy_from`] of a buffer of 17 bytes per element,
//!   i.e. the same 34 bytes of traffic (read + write).
//!
//! Throughput is bytes moved per second; the target is ≥ 85 % of `device_copy`.
//! Without a GPU it prints `adamw/cuda: skipped (<reason>)` and runs a short CPU group
//! over a small list. `cargo bench --bench adamw`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lorafuse::optim::{AdamW, AdamWConfig, StepOptions};
use lorafuse::{DType, Device, Gradients, Tensor};

/// GPT-2 124M's tensors: token (its 50257 rows padded to 50304, as the model keeps them)
/// and position embeddings, 12 blocks, the final LayerNorm.
fn gpt2_124m_shapes() -> Vec<Vec<usize>> {
    let (d, vocab, ctx, layers) = (768, 50304, 1024, 12);
    let mut s = vec![vec![vocab, d], vec![ctx, d]];
    for _ in 0..layers {
        s.extend([
            vec![d],
            vec![d],
            vec![3 * d, d],
            vec![3 * d],
            vec![d, d],
            vec![d],
            vec![d],
            vec![d],
            vec![4 * d, d],
            vec![4 * d],
            vec![d, 4 * d],
            vec![d],
        ]);
    }
    s.extend([vec![d], vec![d]]);
    s
}

/// Parameters (bf16) and their gradients (f32) on `device`.
fn tensors(shapes: &[Vec<usize>], device: &Device) -> (Vec<Tensor>, Gradients) {
    let mut grads = Gradients::default();
    let params: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::full(0.5, s.clone(), DType::BF16, device).expect("param"))
        .collect();
    for p in &params {
        let g = Tensor::full(1e-3, p.shape().clone(), DType::F32, device).expect("grad");
        grads.insert(p, g).expect("grad");
    }
    (params, grads)
}

const BYTES_PER_ELEMENT: u64 = 34;

fn bench_cuda(c: &mut Criterion, device: Device) {
    let shapes = gpt2_124m_shapes();
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    println!(
        "adamw/cuda: {} tensors, {n} elements, {} bytes per step",
        shapes.len(),
        n as u64 * BYTES_PER_ELEMENT
    );
    let mut group = c.benchmark_group("adamw/cuda");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(n as u64 * BYTES_PER_ELEMENT));
    let opts = StepOptions::default();
    {
        let (params, grads) = tensors(&shapes, &device);
        let mut opt = AdamW::new(params, AdamWConfig::default()).expect("adamw");
        group.bench_function("multi_tensor", |b| {
            b.iter(|| {
                let r = opt.step(&grads, 1e-6, opts).expect("step");
                device.synchronize().expect("sync");
                r
            })
        });
    }
    {
        let (params, grads) = tensors(&shapes, &device);
        let mut opts_per: Vec<AdamW> = params
            .into_iter()
            .map(|p| AdamW::new(vec![p], AdamWConfig::default()).expect("adamw"))
            .collect();
        group.bench_function("per_tensor", |b| {
            b.iter(|| {
                for o in &mut opts_per {
                    drop(o.step_deferred(&grads, 1e-6, opts).expect("step"));
                }
                device.synchronize().expect("sync");
            })
        });
    }
    {
        // 17 bytes per element as f32 words, rounded up: read + write = 34 bytes.
        let words = (n * 17).div_ceil(4);
        let src = Tensor::full(1.0, [words], DType::F32, &device).expect("src");
        let dst = Tensor::zeros([words], DType::F32, &device).expect("dst");
        group.throughput(Throughput::Bytes(2 * 4 * words as u64));
        group.bench_function("device_copy", |b| {
            b.iter(|| {
                dst.copy_from(&src).expect("copy");
                device.synchronize().expect("sync");
            })
        });
    }
    group.finish();
}

fn bench_cpu(c: &mut Criterion) {
    // A small mixed list: LoRA-like adapters and a few larger tensors.
    let shapes: Vec<Vec<usize>> = (0..16)
        .map(|i| match i % 4 {
            0 => vec![8, 768],
            1 => vec![768, 8],
            2 => vec![768],
            _ => vec![64, 257],
        })
        .collect();
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let (params, grads) = tensors(&shapes, &Device::Cpu);
    let mut opt = AdamW::new(params, AdamWConfig::default()).expect("adamw");
    let mut group = c.benchmark_group("adamw/cpu");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(n as u64 * BYTES_PER_ELEMENT));
    group.bench_function("multi_tensor_small", |b| {
        b.iter(|| {
            opt.step(&grads, 1e-6, StepOptions::default())
                .expect("step")
        })
    });
    group.finish();
}

fn bench_adamw(c: &mut Criterion) {
    let device = Device::Cuda(0);
    match device.unavailable_reason() {
        Some(reason) => {
            println!("adamw/cuda: skipped ({reason})");
            bench_cpu(c);
        }
        None => bench_cuda(c, device),
    }
}

criterion_group!(benches, bench_adamw);
criterion_main!(benches);
