//! `lorafuse`: the command-line front end. Today it runs the demo (the default command):
//! pretrain a tiny GPT on synthetic task A, then fine-tune it on the shifted task B with
//! LoRA and, as the baseline, with full fine-tuning, and print what LoRA saves and what
//! it reaches.

use clap::{Args, Parser, Subcommand};
use lorafuse::cli;
use lorafuse::data::{Task, TaskGen};
use lorafuse::demo::{K, PhaseConfig, accuracy, model_config, train_phase};
use lorafuse::lora::{LoraConfig, LoraTarget};
use lorafuse::model::{ForwardOptions, Gpt2};
use lorafuse::testing::closeness;
use lorafuse::{DType, Result};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "lorafuse",
    version,
    about = "LoRA fine-tuning engine: demo and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    demo: DemoArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain on task A, then LoRA vs full fine-tuning on task B (the default).
    Demo(DemoArgs),
    /// Fine-tune a GPT-2 directory on your text with LoRA: crash-safe checkpoints,
    /// `--resume`, held-out evaluation, a PEFT adapter at the end.
    Train(Box<cli::TrainArgs>),
    /// Loss and perplexity of a model (with an adapter or not) on text.
    Eval(cli::EvalArgs),
    /// Generate text from a prompt (KV cache, streamed; greedy at temperature 0).
    Generate(cli::GenerateArgs),
    /// Merge an adapter into a GPT-2 directory, written as transformers loads it.
    Merge(cli::MergeArgs),
    /// An adapter's config, targets, ranks, parameter count and per-module norms.
    Inspect(cli::InspectArgs),
    /// Why LoRA works: the LoRA paper's §7 analyses (which weights, which rank, subspace
    /// similarity, ΔW vs W, intruder dimensions) run on lorafuse, written as a report.
    Study(Box<cli::StudyArgs>),
}

#[derive(Args, Clone)]
struct DemoArgs {
    /// Device: auto (the first GPU when one is present, else the CPU), cpu, cuda, cuda:N,
    /// or sim (the CUDA kernels run on the CPU by the simulator: slow, for checking).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Seed of the model init, the data and the adapters.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Pretraining steps on task A.
    #[arg(long, default_value_t = 500)]
    pretrain_steps: usize,
    /// Fine-tuning steps on task B (each of LoRA and full fine-tuning).
    #[arg(long, default_value_t = 250)]
    finetune_steps: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// LoRA targets, comma separated (c_attn, c_attn.q, c_attn.k, c_attn.v, attn.c_proj, mlp.c_fc, mlp.c_proj).
    #[arg(long, default_value = "c_attn")]
    targets: String,
    /// Held-out sequences for the accuracy.
    #[arg(long, default_value_t = 256)]
    heldout: usize,
}

/// The host heap counted, so `Device::Cpu.memory_stats()` reports real peak bytes (the
/// study's memory table).
#[global_allocator]
static HEAP: lorafuse::device::CountingAllocator = lorafuse::device::CountingAllocator;

fn main() {
    let parsed = Cli::parse();
    let result = match parsed.command {
        Some(Command::Demo(a)) => demo(&a),
        None => demo(&parsed.demo),
        Some(Command::Train(a)) => cli::run_train(&a).map(drop),
        Some(Command::Eval(a)) => cli::run_eval(&a).map(drop),
        Some(Command::Generate(a)) => cli::run_generate(&a, &mut std::io::stdout()).map(drop),
        Some(Command::Merge(a)) => cli::run_merge(&a).map(drop),
        Some(Command::Inspect(a)) => cli::run_inspect(&a).map(drop),
        Some(Command::Study(a)) => cli::run_study(&a).map(drop),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn phase(args: &DemoArgs, steps: usize, lr: f64) -> PhaseConfig {
    PhaseConfig {
        steps,
        batch: args.batch,
        lr,
        seed: args.seed,
        heldout: args.heldout,
        progress: true,
    }
}

/// Range checks of the demo's numeric options.
fn check_demo_args(args: &DemoArgs) -> Result<()> {
    let positive = [
        ("batch", args.batch),
        ("rank", args.rank),
        ("heldout", args.heldout),
        ("finetune-steps", args.finetune_steps),
    ];
    for (name, v) in positive {
        if v == 0 {
            return Err(lorafuse::Error::InvalidArgument(format!(
                "--{name} must be ≥ 1, got 0"
            )));
        }
    }
    if !(args.alpha.is_finite() && args.alpha > 0.0) {
        return Err(lorafuse::Error::InvalidArgument(format!(
            "--alpha must be finite and > 0, got {}",
            args.alpha
        )));
    }
    Ok(())
}

fn demo(args: &DemoArgs) -> Result<()> {
    check_demo_args(args)?;
    let (device, why) = cli::pick_device(&args.device)?;
    let cfg = model_config();
    let targets = args
        .targets
        .split(',')
        .map(|t| LoraTarget::parse(t.trim()))
        .collect::<Result<Vec<_>>>()?;
    let lora_cfg = LoraConfig {
        r: args.rank,
        alpha: args.alpha,
        targets,
        ..Default::default()
    };
    lora_cfg.validate()?;
    println!(
        "lorafuse demo on {device} ({why}): GPT d_model {} × {} layers × {} heads, vocab {}, context {}; batch {} × {} tokens",
        cfg.n_embd,
        cfg.n_layer,
        cfg.n_head,
        cfg.vocab_size,
        cfg.n_positions,
        args.batch,
        cfg.n_positions
    );
    let t0 = Instant::now();
    let base = Gpt2::new_random(&cfg, DType::F32, &device, args.seed)?;
    let mut gen_a = TaskGen::new(Task::A, K, args.seed)?;
    let (pretrained, pre) = train_phase(
        "pretrain on task A",
        base,
        &mut gen_a,
        &phase(args, args.pretrain_steps, 3e-3),
    )?;

    let mut gen_b = TaskGen::new(Task::B, K, args.seed + 1)?;
    let base_acc_b = accuracy(&pretrained, &gen_b, args.heldout)?;

    let mut lora_model = pretrained.deep_clone()?;
    lora_model.attach_lora(&lora_cfg, args.seed + 2)?;
    let total = lora_model.param_count();
    let (mut lora_model, lora) = train_phase(
        "LoRA on task B",
        lora_model,
        &mut gen_b,
        &phase(args, args.finetune_steps, 3e-3),
    )?;

    let mut gen_b_full = TaskGen::new(Task::B, K, args.seed + 1)?;
    let full_model = pretrained.deep_clone()?;
    let (_, full) = train_phase(
        "full fine-tune on B",
        full_model,
        &mut gen_b_full,
        &phase(args, args.finetune_steps, 1e-3),
    )?;

    // Merged equals unmerged: logits on held-out prompts, then the accuracy once merged.
    let held = gen_b.heldout(64, 0x3E26);
    let opts = ForwardOptions::default();
    let unmerged = lora_model
        .forward(&held.tokens, held.batch, held.seq, opts)?
        .to_vec_f64()?;
    lora_model.merge_lora()?;
    let merged = lora_model
        .forward(&held.tokens, held.batch, held.seq, opts)?
        .to_vec_f64()?;
    let merged_acc = accuracy(&lora_model, &gen_b, args.heldout)?;
    let c = closeness(&merged, &unmerged);

    let pct = |a: usize, b: usize| 100.0 * a as f64 / b as f64;
    println!();
    println!("{:<44} {:>14} {:>14}", "", "LoRA", "full FT");
    println!(
        "{:<44} {:>14} {:>14}",
        "trainable parameters", lora.trainable, full.trainable
    );
    println!(
        "{:<44} {:>13.2}% {:>13.2}%",
        "  of all parameters",
        pct(lora.trainable, total),
        pct(full.trainable, total)
    );
    println!(
        "{:<44} {:>14} {:>14}",
        "optimizer state bytes (AdamW m, v)", lora.state_bytes, full.state_bytes
    );
    println!(
        "{:<44} {:>13.1}% {:>13.1}%",
        "held-out exact match, task B",
        100.0 * lora.accuracy,
        100.0 * full.accuracy
    );
    println!(
        "{:<44} {:>14.4} {:>14.4}",
        "final training loss, task B", lora.final_loss, full.final_loss
    );
    println!(
        "{:<44} {:>14.0} {:>14.0}",
        "training tokens/s", lora.tokens_per_s, full.tokens_per_s
    );
    println!();
    println!(
        "base model (pretrained on A): task A {:.1}%, task B {:.1}% held-out exact match; pretraining {:.0} tokens/s",
        100.0 * pre.accuracy,
        100.0 * base_acc_b,
        pre.tokens_per_s
    );
    println!(
        "LoRA reaches {:.1}% of full fine-tuning's accuracy with {:.2}% of its trainable parameters",
        pct_f(lora.accuracy, full.accuracy),
        pct(lora.trainable, full.trainable)
    );
    println!(
        "merged == unmerged: logits rel-L2 {:.2e}, max abs {:.2e}; accuracy merged {:.1}% vs unmerged {:.1}% [{}]",
        c.rel_l2,
        c.max_abs,
        100.0 * merged_acc,
        100.0 * lora.accuracy,
        if c.rel_l2 < 1e-5 && merged_acc == lora.accuracy {
            "ok"
        } else {
            "MISMATCH"
        }
    );
    println!("total time {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn pct_f(a: f64, b: f64) -> f64 {
    if b > 0.0 { 100.0 * a / b } else { 0.0 }
}
