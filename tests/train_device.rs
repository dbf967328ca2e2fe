//! End-to-end training on a device (DESIGN §6, level 4): a tiny GPT trained for a few
//! steps on the simulator (and DESIGN §10's small GPT on a GPU when one is present)
//! follows the CPU reference's
//! losses, the same seed gives bitwise-identical losses twice, a queued step
//! (`Trainer::step_deferred`) issues no device-to-host copy — f16 dynamic loss scaling
//! included, whose skips and scale follow the CPU's — and LoRA holds less device memory
//! than full fine-tuning.
//!
//! One test per device, so that the device's memory counters see only this test's
//! allocations (the counters are per device and process-wide).

use lorafuse::checkpoint::Gpt2Config;
use lorafuse::data::{Task, TaskGen, MIN_VOCAB};
use lorafuse::lora::{LoraConfig, LoraTarget};
use lorafuse::model::Gpt2;
use lorafuse::train::{TrainConfig, Trainer};
use lorafuse::{DType, Device};

/// The tiny config the simulator trains (it runs every launch on the CPU).
fn tiny() -> Gpt2Config {
    Gpt2Config {
        vocab_size: MIN_VOCAB,
        n_positions: 9,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
    }
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        targets: vec![LoraTarget::CAttn, LoraTarget::MlpCFc],
        ..Default::default()
    }
}

const STEPS: usize = 3;

/// A model size and the task's key length (its sequences are at most `2k + 1` tokens).
#[derive(Clone, Copy)]
struct Size {
    cfg: fn() -> Gpt2Config,
    k: usize,
}

/// The simulator's size: the tiny config, sequences of 9.
const TINY: Size = Size { cfg: tiny, k: 4 };
/// A GPU's size: DESIGN §10's small GPT (d_model 256, 4 layers, 4 heads, context 128,
/// vocabulary 256), sequences of 65.
const SMALL: Size = Size {
    cfg: Gpt2Config::small_bench,
    k: 32,
};

/// What one training run gives: the losses, the skipped flags, the f16 loss scale at the
/// end, and the peak device bytes (model and optimizer state included).
struct Run {
    losses: Vec<f64>,
    skipped: Vec<bool>,
    scale: Option<f64>,
    peak: u64,
}

/// Trains `STEPS` steps of task A from seed 0 on `device`.
fn run(device: &Device, size: Size, dtype: DType, lora: Option<LoraConfig>) -> Run {
    device.reset_peak_memory();
    let mut model = Gpt2::new_random(&(size.cfg)(), dtype, device, 0).unwrap();
    if let Some(l) = lora {
        model.attach_lora(&l, 1).unwrap();
    }
    let tc = TrainConfig {
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        total_steps: STEPS,
        seed: 7,
        ..Default::default()
    };
    let mut t = Trainer::new(model, &tc).unwrap();
    let held = device.memory_stats().in_use_bytes; // the model and the optimizer state
    let mut gen = TaskGen::new(Task::A, size.k, 3).unwrap();
    // Queue every step first: nothing is read back until the losses are asked for — not
    // even under f16 loss scaling, whose scale and skip decisions stay on the device.
    let reads = device.memory_stats().reads_to_host;
    let pending: Vec<_> = (0..STEPS)
        .map(|_| {
            let b = gen.sample_batch(8);
            t.step_deferred(&b.tokens, &b.targets, b.batch, b.seq)
                .unwrap()
        })
        .collect();
    assert_eq!(
        device.memory_stats().reads_to_host,
        reads,
        "{device} {dtype}: a queued step read the device back"
    );
    let stats: Vec<_> = pending.into_iter().map(|p| p.wait().unwrap()).collect();
    // Every step gave back what it took: nothing grows from step to step.
    assert_eq!(
        device.memory_stats().in_use_bytes,
        held,
        "{device} {dtype}: device memory held after the steps"
    );
    if *device != Device::Cpu {
        // The loss and the optimizer's report, per step.
        let read = device.memory_stats().reads_to_host - reads;
        assert_eq!(read, 2 * STEPS as u64, "{device} {dtype}: reads per step");
    }
    let peak = device.memory_stats().peak_bytes;
    let scale = t.loss_scaler().unwrap().map(|s| s.scale());
    drop(t);
    Run {
        losses: stats.iter().map(|s| s.loss).collect(),
        skipped: stats.iter().map(|s| s.skipped).collect(),
        scale,
        peak,
    }
}

fn follows_the_cpu(device: &Device, size: Size) {
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut peaks = Vec::new();
    // f32 full fine-tuning and LoRA, each run twice on the device (determinism), bf16
    // LoRA once, and f16 LoRA (dynamic loss scaling on the device) once: the simulator
    // runs each launch on the CPU, and CI's time is the limit.
    for (dtype, tol, l, runs) in [
        (DType::F32, 1e-4, None, 2),
        (DType::F32, 1e-4, Some(lora()), 2),
        (DType::BF16, 3e-2, Some(lora()), 1),
        (DType::F16, 1e-2, Some(lora()), 1),
    ] {
        let what = format!(
            "{device} {dtype} {}",
            if l.is_some() { "LoRA" } else { "full" }
        );
        let cpu = run(&Device::Cpu, size, dtype, l.clone());
        let a = run(device, size, dtype, l.clone());
        println!(
            "{what}: cpu {:?} skipped {:?} scale {:?}\n{what}: dev {:?} skipped {:?} scale {:?}, peak {} bytes",
            cpu.losses, cpu.skipped, cpu.scale, a.losses, a.skipped, a.scale, a.peak
        );
        for (i, (x, y)) in a.losses.iter().zip(&cpu.losses).enumerate() {
            assert!(
                ((x - y) / y).abs() <= tol,
                "{what}: step {i} loss {x} vs the CPU's {y} (tol {tol})"
            );
        }
        // The loss scaler follows the host's policy step for step.
        assert_eq!(a.skipped, cpu.skipped, "{what}: skipped steps");
        assert_eq!(a.scale, cpu.scale, "{what}: the final loss scale");
        assert_eq!(a.scale.is_some(), dtype == DType::F16, "{what}");
        if runs == 2 {
            let b = run(device, size, dtype, l.clone());
            assert_eq!(bits(&a.losses), bits(&b.losses), "{what}: two runs differ");
        }
        peaks.push(a.peak);
    }
    let (full, adapted) = (peaks[0], peaks[1]);
    println!("{device}: peak device bytes (f32), full fine-tuning {full}, LoRA {adapted}");
    assert!(
        adapted < full,
        "{device}: LoRA peaked at {adapted} bytes, full fine-tuning at {full}"
    );
}

#[test]
fn sim() {
    follows_the_cpu(&Device::Sim, TINY);
}

#[test]
fn cuda() {
    let d = Device::Cuda(0);
    match d.unavailable_reason() {
        None => follows_the_cpu(&d, SMALL),
        Some(why) if std::env::var("LORAFUSE_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("cuda: LORAFUSE_REQUIRE_GPU=1 but {why}")
        }
        Some(why) => println!("train_device cuda: skipped ({why})"),
    }
}
