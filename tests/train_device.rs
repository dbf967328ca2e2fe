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
use lorafuse::data::{MIN_VOCAB, Task, TaskGen};
use lorafuse::lora::{LoraConfig, LoraTarget};
use lorafuse::model::ForwardOptions;
use lorafuse::model::Gpt2;
use lorafuse::optim::DynamicLossScaler;
use lorafuse::train::{TrainConfig, Trainer};
use lorafuse::{DType, Device, Tape, Tensor};

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
/// end, and the peak device bytes (model and optimizer state included). On the CPU in
/// f16, also whether each step's skip decision sat at the overflow threshold
/// ([`near_overflow`]).
struct Run {
    losses: Vec<f64>,
    skipped: Vec<bool>,
    scale: Option<f64>,
    peak: u64,
    near_threshold: Vec<bool>,
}

/// How far (relatively) the gradients may be from the CPU's before a skip decision may
/// differ: `2^-6`, 1.6 %. A GPU may contract `a·b + c` into an FMA where the CPU rounds
/// twice, so its f16 gradients differ from the CPU's by an ulp here and there; a value
/// close enough to f16's largest finite value (65504) can then overflow on one side only.
const NEAR: f64 = 1.0 / 64.0;

/// Whether the CPU's overflow decision for the next step of `t` (loss scale `scale`) is
/// at the threshold: it changes when the backward runs with the seed `scale·(1 ± NEAR)`.
/// The backward is linear in its seed, so that is every gradient (and every intermediate
/// f16 value of the backward) moved by ±NEAR: a decision that holds on both sides stands
/// against any rounding difference smaller than that.
fn near_overflow(t: &Trainer, b: &lorafuse::data::Batch, dropout_seed: u64, scale: f64) -> bool {
    let overflows = |s: f64| {
        let tape = Tape::new();
        let opts = ForwardOptions {
            tape: Some(&tape),
            dropout_seed: Some(dropout_seed),
        };
        let seed = Tensor::full(s, [], DType::F32, &Device::Cpu).unwrap();
        let loss = t
            .model
            .loss_fused(&b.tokens, &b.targets, b.batch, b.seq, opts, &seed)
            .unwrap();
        let grads = tape.backward_with(&loss, seed).unwrap();
        t.model.trainable_params().iter().any(|(_, p)| {
            grads
                .get(p)
                .is_some_and(|g| g.to_vec_f64().unwrap().iter().any(|v| !v.is_finite()))
        })
    };
    overflows(scale * (1.0 - NEAR)) != overflows(scale * (1.0 + NEAR))
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
    let mut r#gen = TaskGen::new(Task::A, size.k, 3).unwrap();
    // Queue every step first: nothing is read back until the losses are asked for — not
    // even under f16 loss scaling, whose scale and skip decisions stay on the device.
    let reads = device.memory_stats().reads_to_host;
    let mut near_threshold = Vec::new();
    let pending: Vec<_> = (0..STEPS)
        .map(|i| {
            let b = r#gen.sample_batch(8);
            if *device == Device::Cpu && dtype == DType::F16 {
                // The CPU runs each step at once, so its scaler is current here.
                let scale = t.loss_scaler().unwrap().unwrap().scale();
                near_threshold.push(near_overflow(&t, &b, tc.seed + i as u64, scale));
            }
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
        near_threshold,
    }
}

fn follows_the_cpu(device: &Device, size: Size) {
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut peaks = Vec::new();
    // f32 full fine-tuning and LoRA, each run twice on the device (determinism; not on
    // the simulator, whose rerun repeats its schedule: `rerun_can_differ`), bf16 LoRA once
    // (not on the simulator: its half-precision path is f16's, templated on the dtype, and
    // bf16 trains there in `resume.rs` and `lora_step_device.rs`), and f16 LoRA (dynamic
    // loss scaling on the device) once. The simulator runs each launch on the CPU, and
    // CI's time is the limit.
    for (dtype, tol, l, runs) in [
        (DType::F32, 1e-4, None, 2),
        (DType::F32, 1e-4, Some(lora()), 2),
        (DType::BF16, 3e-2, Some(lora()), 1),
        (DType::F16, 1e-2, Some(lora()), 1),
    ] {
        if dtype == DType::BF16 && *device == Device::Sim {
            continue;
        }
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
        // The loss scaler follows the host's policy step for step, except that a skip
        // decision at the overflow threshold (`near_overflow`) may go the other way; the
        // runs then train different weights, so they are compared up to that step only.
        let first_difference = (0..STEPS).find(|&i| a.skipped[i] != cpu.skipped[i]);
        if let Some(i) = first_difference {
            assert!(
                cpu.near_threshold.get(i).copied().unwrap_or(false),
                "{what}: step {i} skipped {} on the device, {} on the CPU, away from the overflow threshold",
                a.skipped[i],
                cpu.skipped[i]
            );
            println!(
                "{what}: step {i}'s skip decision sits at the overflow threshold and differs; compared up to it"
            );
        }
        let compared = first_difference.map_or(STEPS, |i| i + 1);
        for (i, (x, y)) in a.losses.iter().zip(&cpu.losses).take(compared).enumerate() {
            assert!(
                ((x - y) / y).abs() <= tol,
                "{what}: step {i} loss {x} vs the CPU's {y} (tol {tol})"
            );
        }
        if first_difference.is_none() {
            assert_eq!(a.scale, cpu.scale, "{what}: the final loss scale");
        }
        // Either way each scaler followed the policy: within the growth interval, every
        // skip halves the initial 2^16.
        for (who, r) in [("device", &a), ("cpu", &cpu)] {
            if let Some(scale) = r.scale {
                let skips = r.skipped.iter().filter(|&&s| s).count() as i32;
                assert_eq!(
                    scale,
                    DynamicLossScaler::DEFAULT_INIT_SCALE * 0.5f64.powi(skips),
                    "{what}: {who}'s final scale"
                );
            }
        }
        assert_eq!(a.scale.is_some(), dtype == DType::F16, "{what}");
        if runs == 2 && lorafuse::testing::rerun_can_differ(device) {
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
    if lorafuse::testing::device_available("train_device::cuda", &d) {
        follows_the_cpu(&d, SMALL);
    }
}
