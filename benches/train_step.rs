//! One training step of the small GPT of DESIGN §10 on the CPU: d_model 256, 4 layers,
//! 4 heads, context 128, batch 8, vocab 256; LoRA r = 8, α = 16 on `c_attn` versus full
//! fine-tuning of the same model. A step is forward + loss + backward + AdamW.
//!
//! `cargo bench --bench train_step`. The PyTorch + PEFT side of the comparison is
//! `bench/pytorch/train_step_cpu.py` (same config); BENCHMARKS.md has both.
//!
//! On a GPU, group `train_step/cuda`: one LoRA step (r = 16, α = 32 on `c_attn`) of GPT-2
//! 124M's shape (12 layers, d_model 768, 12 heads, vocab 50257, context 1024) in bf16, batch
//! 8 × 1024 tokens, through [`Trainer::step_deferred`] with the device synchronised at the
//! end of each iteration; throughput in tokens/s, and the peak device bytes of a step
//! printed beside it (`bench/pytorch/train_step_gpu.py` is PyTorch + PEFT's side). Without
//! a GPU it prints `train_step/cuda: skipped (<reason>)`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lorafuse::checkpoint::Gpt2Config;
use lorafuse::lora::LoraConfig;
use lorafuse::model::Gpt2;
use lorafuse::train::{TrainConfig, Trainer};
use lorafuse::{DType, Device};
use rand::{Rng, SeedableRng};

const BATCH: usize = 8;
const SEQ: usize = 128;

fn trainer(lora: bool) -> Trainer {
    let mut model =
        Gpt2::new_random(&Gpt2Config::small_bench(), DType::F32, &Device::Cpu, 0).expect("model");
    if lora {
        model
            .attach_lora(
                &LoraConfig {
                    r: 8,
                    alpha: 16.0,
                    ..Default::default()
                },
                1,
            )
            .expect("lora");
    }
    let cfg = TrainConfig {
        max_grad_norm: None,
        total_steps: 1_000_000,
        warmup_steps: 0,
        ..Default::default()
    };
    Trainer::new(model, &cfg).expect("trainer")
}

fn bench_train_step(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let tokens: Vec<u32> = (0..BATCH * SEQ).map(|_| rng.random_range(0..256)).collect();
    let targets: Vec<i32> = tokens[1..]
        .iter()
        .map(|&t| t as i32)
        .chain([lorafuse::ops::IGNORE_INDEX])
        .collect();
    let mut group = c.benchmark_group("cpu_train_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    for (name, lora) in [("lora_r8_c_attn", true), ("full_finetune", false)] {
        let mut t = trainer(lora);
        group.bench_function(name, |b| {
            b.iter(|| t.step(&tokens, &targets, BATCH, SEQ).expect("step"))
        });
    }
    group.finish();
}

const GPU_BATCH: usize = 8;
const GPU_SEQ: usize = 1024;

fn bench_train_step_cuda(c: &mut Criterion) {
    let device = Device::Cuda(0);
    if let Some(reason) = device.unavailable_reason() {
        println!("train_step/cuda: skipped ({reason})");
        return;
    }
    let cfg = Gpt2Config::gpt2_small();
    let mut model = Gpt2::new_random(&cfg, DType::BF16, &device, 0).expect("model");
    model
        .attach_lora(
            &LoraConfig {
                r: 16,
                alpha: 32.0,
                ..Default::default()
            },
            1,
        )
        .expect("lora");
    let tc = TrainConfig {
        total_steps: 1_000_000,
        warmup_steps: 0,
        ..Default::default()
    };
    let mut t = Trainer::new(model, &tc).expect("trainer");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let n = GPU_BATCH * GPU_SEQ;
    let vocab = cfg.vocab_size as u32;
    let tokens: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab)).collect();
    let targets: Vec<i32> = tokens[1..]
        .iter()
        .map(|&t| t as i32)
        .chain([lorafuse::ops::IGNORE_INDEX])
        .collect();
    // One step outside the timing: kernels load, the memory pool fills.
    device.reset_peak_memory();
    t.step(&tokens, &targets, GPU_BATCH, GPU_SEQ).expect("step");
    let mem = device.memory_stats();
    println!(
        "train_step/cuda: GPT-2 124M bf16, LoRA r16 c_attn, {GPU_BATCH}x{GPU_SEQ} tokens: peak {} MiB on the device ({} MiB held between steps)",
        mem.peak_bytes >> 20,
        mem.in_use_bytes >> 20
    );
    let mut group = c.benchmark_group("train_step/cuda");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("gpt2_124m_lora_r16_bf16", |b| {
        b.iter(|| {
            let p = t
                .step_deferred(&tokens, &targets, GPU_BATCH, GPU_SEQ)
                .expect("step");
            device.synchronize().expect("sync");
            p
        })
    });
    group.finish();
}

criterion_group!(benches, bench_train_step, bench_train_step_cuda);
criterion_main!(benches);
