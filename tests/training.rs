//! End-to-end training on the CPU: losses go down, runs are bitwise reproducible, and the
//! mixed-precision paths (bf16 with master weights, f16 with loss scaling) track f32.

use lorafuse::checkpoint::Gpt2Config;
use lorafuse::data::{MIN_VOCAB, Task, TaskGen};
use lorafuse::lora::{LoraConfig, LoraTarget};
use lorafuse::model::Gpt2;
use lorafuse::train::{TrainConfig, Trainer};
use lorafuse::{DType, Device};

fn cfg() -> Gpt2Config {
    Gpt2Config {
        vocab_size: MIN_VOCAB,
        n_positions: 9,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
    }
}

/// Trains `steps` steps of task A from seed 0 and returns the losses.
fn run(dtype: DType, lora: Option<LoraConfig>, steps: usize) -> Vec<f64> {
    let mut model = Gpt2::new_random(&cfg(), dtype, &Device::Cpu, 0).unwrap();
    if let Some(l) = lora {
        model.attach_lora(&l, 1).unwrap();
    }
    let tc = TrainConfig {
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 5,
        total_steps: steps,
        seed: 7,
        ..Default::default()
    };
    let mut t = Trainer::new(model, &tc).unwrap();
    let mut r#gen = TaskGen::new(Task::A, 4, 3).unwrap();
    (0..steps)
        .map(|_| {
            let b = r#gen.sample_batch(16);
            t.step(&b.tokens, &b.targets, b.batch, b.seq).unwrap().loss
        })
        .collect()
}

#[test]
fn the_same_seed_gives_bitwise_identical_losses() {
    let lora = LoraConfig {
        r: 4,
        dropout: 0.1,
        targets: vec![LoraTarget::CAttn, LoraTarget::MlpCFc],
        ..Default::default()
    };
    for (dtype, l) in [
        (DType::F32, None),
        (DType::F32, Some(lora.clone())),
        (DType::BF16, Some(lora)),
    ] {
        let a = run(dtype, l.clone(), 12);
        let b = run(dtype, l, 12);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{dtype}: two runs with one seed differ");
    }
}

#[test]
fn full_training_learns_and_mixed_precision_tracks_f32() {
    let steps = 250;
    let f32_losses = run(DType::F32, None, steps);
    let first = f32_losses[..5].iter().sum::<f64>() / 5.0;
    let last = f32_losses[steps - 5..].iter().sum::<f64>() / 5.0;
    println!("f32 loss {first:.3} -> {last:.3}");
    assert!(
        last < 0.25 * first,
        "f32 training did not learn: {first} -> {last}"
    );
    for dtype in [DType::BF16, DType::F16] {
        let l = run(dtype, None, steps);
        let last_l = l[steps - 5..].iter().sum::<f64>() / 5.0;
        println!("{dtype} loss {:.3} -> {last_l:.3}", l[0]);
        assert!(l.iter().all(|x| x.is_finite()), "{dtype}: non-finite loss");
        // Rounding changes the trajectory, not where it goes.
        assert!(
            (last_l - last).abs() < 0.1,
            "{dtype} ends at {last_l}, f32 at {last}"
        );
    }
}
