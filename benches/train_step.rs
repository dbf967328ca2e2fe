//! One training step of the small GPT of DESIGN §10 on the CPU: d_model 256, 4 layers,
//! 4 heads, context 128, batch 8, vocab 256; LoRA r = 8, α = 16 on `c_attn` versus full
//! fine-tuning of the same model. A step is forward + loss + backward + AdamW.
//!
//! `cargo bench --bench train_step`. The PyTorch + PEFT side of the comparison is
//! `bench/pytorch/train_step_cpu.py` (same config); BENCHMARKS.md has both.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
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

criterion_group!(benches, bench_train_step);
criterion_main!(benches);
