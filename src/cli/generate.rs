//! `lorafuse generate`: text from a prompt, token by token on the KV cache, streamed.

use super::{check_f64, load_model, load_tokenizer, pick_device, pick_dtype};
use crate::model::SamplingConfig;
use crate::{Error, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

/// `lorafuse generate --model DIR [--adapter A] --prompt TEXT`.
#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    /// A transformers GPT-2 directory (with its tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// The most tokens to generate (it stops earlier at <|endoftext|>).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample from the k most likely tokens only; 0 turns it off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample from the most likely tokens up to this probability mass, in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f64,
    /// The sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: auto, cpu, cuda, cuda:N or sim.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Storage dtype: auto (bf16 on a GPU, f32 elsewhere), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// Runs `lorafuse generate` (see [`GenerateArgs`]): prints the prompt, then the new text
/// as it is produced, to `out`. Returns the new text.
pub fn run_generate(args: &GenerateArgs, out: &mut dyn Write) -> Result<String> {
    check_f64("temperature", args.temperature, 0.0, f64::INFINITY)?;
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    cfg.validate()?;
    let (device, _) = pick_device(&args.device)?;
    let dtype = pick_dtype(&args.dtype, &device)?;
    let mut model = load_model(&args.model, dtype, &device)?;
    let tokenizer = load_tokenizer(&args.model, &model)?;
    if let Some(a) = &args.adapter {
        model.load_adapters(a)?;
    }
    let prompt = tokenizer.encode(&args.prompt)?;
    if prompt.is_empty() {
        return Err(Error::invalid("--prompt is empty"));
    }
    let eos = tokenizer.eos_id().ok();
    let io = |e: std::io::Error| Error::invalid(format!("writing the output: {e}"));
    write!(out, "{}", args.prompt).map_err(io)?;
    out.flush().map_err(io)?;
    // Byte-level BPE: a token may end inside a UTF-8 character, so the text printed is
    // the decoded prefix up to its last complete character.
    let (mut ids, mut shown) = (Vec::new(), 0usize);
    model.generate(&prompt, &cfg, eos, |t| {
        if Some(t) == eos {
            return Ok(());
        }
        ids.push(t);
        let text = tokenizer.decode(&ids)?;
        let complete = text.trim_end_matches('\u{FFFD}');
        if complete.len() > shown && complete.is_char_boundary(shown) {
            write!(out, "{}", &complete[shown..]).map_err(io)?;
            out.flush().map_err(io)?;
            shown = complete.len();
        }
        Ok(())
    })?;
    let text = tokenizer.decode(&ids)?;
    if text.len() > shown && text.is_char_boundary(shown) {
        write!(out, "{}", &text[shown..]).map_err(io)?;
    }
    writeln!(out).map_err(io)?;
    Ok(text)
}
