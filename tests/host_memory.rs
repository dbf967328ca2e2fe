//! The host heap, counted by `CountingAllocator` (installed here as the `lorafuse` binary
//! installs it), is what `Device::Cpu.memory_stats()` reports: a tensor's bytes show while
//! it lives, and a LoRA step peaks below a full fine-tuning step of the same model.

use lorafuse::checkpoint::Gpt2Config;
use lorafuse::data::{MIN_VOCAB, Task, TaskGen};
use lorafuse::device::CountingAllocator;
use lorafuse::lora::LoraConfig;
use lorafuse::model::Gpt2;
use lorafuse::storage::pool;
use lorafuse::train::{TrainConfig, Trainer};
use lorafuse::{DType, Device, Tensor};

#[global_allocator]
static HEAP: CountingAllocator = CountingAllocator;

/// The heap's peak over building a model and running one step, LoRA or full fine-tuning.
fn step_peak(lora: bool) -> u64 {
    let cfg = Gpt2Config {
        vocab_size: MIN_VOCAB,
        n_positions: 17,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
    };
    pool::release();
    Device::Cpu.reset_peak_memory();
    let before = Device::Cpu.memory_stats().in_use_bytes;
    let mut model = Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
    if lora {
        model.attach_lora(&LoraConfig::default(), 1).unwrap();
    } else {
        model.set_full_finetune(true);
    }
    let mut t = Trainer::new(model, &TrainConfig::default()).unwrap();
    let b = TaskGen::new(Task::A, 8, 0).unwrap().sample_batch(16);
    t.step(&b.tokens, &b.targets, b.batch, b.seq).unwrap();
    Device::Cpu.memory_stats().peak_bytes - before
}

#[test]
fn the_counted_heap_is_the_cpus_memory() {
    assert!(CountingAllocator::installed());
    let n = 1 << 20;
    let before = Device::Cpu.memory_stats();
    let t = Tensor::zeros([n], DType::F32, &Device::Cpu).unwrap();
    let with = Device::Cpu.memory_stats();
    assert!(
        with.in_use_bytes >= before.in_use_bytes + 4 * n as u64,
        "{before:?} → {with:?}"
    );
    assert!(with.peak_bytes >= with.in_use_bytes);
    assert!(with.allocations > before.allocations);
    drop(t);
    pool::release(); // the tensor's buffer went to the pool; now it goes back to the heap
    let after = Device::Cpu.memory_stats();
    assert!(
        after.in_use_bytes + 4 * n as u64 <= with.in_use_bytes,
        "{with:?} → {after:?}"
    );

    // The first step also allocates what lives for the process (the thread pool, the GEMM
    // crate's per-thread workspace): warm up once, then measure.
    step_peak(false);
    let (adapted, full) = (step_peak(true), step_peak(false));
    println!("cpu heap peak of a step: LoRA {adapted} bytes, full fine-tuning {full} bytes");
    // Full fine-tuning adds a gradient and two AdamW moments per weight: ≥ 3× the weights.
    assert!(
        adapted < full,
        "LoRA peaked at {adapted} bytes, full fine-tuning at {full}"
    );
}
