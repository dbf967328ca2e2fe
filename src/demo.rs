//! The demo's model and training loop, shared by the `lorafuse` demo and `lorafuse study`:
//! a tiny GPT ([`model_config`]) trained on the synthetic tasks of [`crate::data`], with a
//! warmup + cosine schedule, and its held-out exact match by greedy decoding.

use crate::Result;
use crate::checkpoint::Gpt2Config;
use crate::data::{Batch, MIN_VOCAB, TaskGen, is_exact};
use crate::model::Gpt2;
use crate::train::{TrainConfig, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

/// Input symbols per sequence (sequences are `2K + 1` tokens).
pub const K: usize = 8;

/// The demo's GPT: `d_model` 128, 2 layers, 4 heads, the tasks' vocabulary and context.
pub fn model_config() -> Gpt2Config {
    Gpt2Config {
        vocab_size: MIN_VOCAB,
        n_positions: 2 * K + 1,
        n_embd: 128,
        n_layer: 2,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
    }
}

/// How one training phase runs.
#[derive(Clone, Debug)]
pub struct PhaseConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Peak learning rate (the schedule ends at a tenth of it, after 5 % warmup).
    pub lr: f64,
    /// The trainer's seed (dropout masks).
    pub seed: u64,
    /// Held-out sequences for the exact match.
    pub heldout: usize,
    /// Show a progress bar named after the phase.
    pub progress: bool,
}

/// What a phase measured.
#[derive(Clone, Debug)]
pub struct Phase {
    /// Held-out exact match after training.
    pub accuracy: f64,
    /// Training throughput.
    pub tokens_per_s: f64,
    /// Trainable parameters.
    pub trainable: usize,
    /// AdamW state bytes.
    pub state_bytes: usize,
    /// The last step's loss.
    pub final_loss: f64,
}

/// Trains `model` on `gen`'s batches for `cfg.steps` steps and measures it.
pub fn train_phase(
    name: &str,
    model: Gpt2,
    r#gen: &mut TaskGen,
    cfg: &PhaseConfig,
) -> Result<(Gpt2, Phase)> {
    let trainable = model.trainable_param_count();
    let steps = cfg.steps;
    let tcfg = TrainConfig {
        lr: cfg.lr,
        min_lr: cfg.lr / 10.0,
        warmup_steps: steps / 20,
        total_steps: steps,
        seed: cfg.seed,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, &tcfg)?;
    let bar = if cfg.progress {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        bar
    } else {
        ProgressBar::hidden()
    };
    let (mut tokens, mut loss, start) = (0usize, f64::NAN, Instant::now());
    for i in 0..steps {
        let b = r#gen.sample_batch(cfg.batch);
        loss = trainer.step(&b.tokens, &b.targets, b.batch, b.seq)?.loss;
        tokens += b.batch * b.seq;
        if i % 10 == 0 || i + 1 == steps {
            bar.set_message(format!("loss {loss:.4}"));
        }
        bar.inc(1);
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish();
    let state_bytes = trainer.optimizer().state_bytes();
    let model = trainer.model;
    let accuracy = accuracy(&model, r#gen, cfg.heldout)?;
    Ok((
        model,
        Phase {
            accuracy,
            tokens_per_s: tokens as f64 / secs,
            trainable,
            state_bytes,
            final_loss: loss,
        },
    ))
}

/// Held-out exact-match accuracy of `n` held-out sequences (a fixed stream) with batched
/// greedy decoding.
pub fn accuracy(model: &Gpt2, r#gen: &TaskGen, n: usize) -> Result<f64> {
    let held: Batch = r#gen.heldout(n, 0xE7A1);
    let (p, k) = (r#gen.prompt_len(), r#gen.k());
    let prompts: Vec<u32> = (0..held.batch)
        .flat_map(|i| held.row(i)[..p].to_vec())
        .collect();
    let out = model.generate_greedy(&prompts, held.batch, k)?;
    let hits = (0..held.batch)
        .filter(|&i| is_exact(&out[i * k..(i + 1) * k], &held.row(i)[r#gen.answer_span()]))
        .count();
    Ok(hits as f64 / held.batch as f64)
}
