//! Writes the small GPT of DESIGN §10 as a transformers GPT-2 directory, for timing
//! `lorafuse train` against `bench/pytorch/train_step_cpu.py` (BENCHMARKS.md):
//!
//! `cargo run --release --example small_gpt2_dir -- DIR` writes `DIR/gpt2/` (d_model 256,
//! 4 layers, 4 heads, 128 positions, GPT-2's random init, f32, and a byte-level BPE of 257
//! ids — the 256 bytes and `<|endoftext|>`, the smallest GPT-2 tokenizer, where the PyTorch
//! script's vocabulary is 256) and `DIR/corpus.txt` (`TINY_CORPUS` repeated, ~60 k tokens).

use lorafuse::checkpoint::Gpt2Config;
use lorafuse::model::Gpt2;
use lorafuse::text::fixtures;
use lorafuse::{DType, Device};
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: small_gpt2_dir DIR")?;
    let dir = Path::new(&dir);
    let model = dir.join("gpt2");
    let cfg = Gpt2Config {
        vocab_size: 257,
        n_positions: 128,
        n_embd: 256,
        n_layer: 4,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
    };
    fixtures::write_tiny_tokenizer(&model, fixtures::TINY_CORPUS, cfg.vocab_size)?;
    Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, 0)?.save(&model)?;
    std::fs::write(
        dir.join("corpus.txt"),
        [fixtures::TINY_CORPUS; 60].join("\n\n"),
    )?;
    println!(
        "{} and {}",
        model.display(),
        dir.join("corpus.txt").display()
    );
    Ok(())
}
