//! `lorafuse eval`: the loss and perplexity of a model (with an adapter or not) on text.

use super::{check_usize, load_model, load_tokenizer, pick_device, pick_dtype};
use crate::text::{TextData, TextDataOptions, load_records};
use crate::train::mean_loss;
use crate::{Error, Result};
use clap::Args;
use std::path::PathBuf;

/// `lorafuse eval --model DIR [--adapter A] --data FILE...`.
#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    /// A transformers GPT-2 directory (with its tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The text: .txt or .jsonl files, as for `train`.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Tokens per sequence (at most the model's n_positions).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Device: auto, cpu, cuda, cuda:N or sim.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Storage dtype: auto (bf16 on a GPU, f32 elsewhere), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// What `eval` measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean cross-entropy per predicted token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens the loss counts.
    pub tokens: usize,
}

/// Runs `lorafuse eval` (see [`EvalArgs`]) and prints the result.
pub fn run_eval(args: &EvalArgs) -> Result<EvalReport> {
    check_usize("seq-len", args.seq_len, 1, usize::MAX)?;
    check_usize("batch", args.batch, 1, 1 << 20)?;
    let (device, _) = pick_device(&args.device)?;
    let dtype = pick_dtype(&args.dtype, &device)?;
    let mut model = load_model(&args.model, dtype, &device)?;
    let tokenizer = load_tokenizer(&args.model, &model)?;
    if args.seq_len > model.config.n_positions {
        return Err(Error::invalid(format!(
            "--seq-len {} exceeds the model's context of {} positions",
            args.seq_len, model.config.n_positions
        )));
    }
    if let Some(a) = &args.adapter {
        model.load_adapters(a)?;
    }
    let mut records = Vec::new();
    for f in &args.data {
        records.extend(load_records(f)?);
    }
    let opts = TextDataOptions {
        seq_len: args.seq_len,
        val_fraction: 0.0,
        seed: 0,
    };
    let data = TextData::build(&tokenizer, &records, &opts)?;
    data.train.check_vocab(model.config.vocab_size)?;
    let (loss, tokens) = mean_loss(&model, &data.train, args.batch)?;
    let report = EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
    };
    println!(
        "loss {:.4}  perplexity {:.3}  over {} tokens ({} sequences of {})",
        report.loss,
        report.perplexity,
        report.tokens,
        data.train.len(),
        args.seq_len
    );
    Ok(report)
}
