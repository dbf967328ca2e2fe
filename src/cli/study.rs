//! `lorafuse study`: the LoRA paper's §7 analyses on lorafuse (see [`crate::study`]).
//! Without `--model` it pretrains the demo's tiny GPT on task A and adapts it on task B;
//! with `--model DIR --data FILE...` it adapts a transformers GPT-2 on your text. Every
//! output is written into a temporary directory beside `--out`, renamed into place at the
//! end, so a failed study leaves nothing half-written.

use super::{check_f64, check_usize, load_model, load_tokenizer, pick_device, pick_dtype};
use crate::data::{Task, TaskGen};
use crate::demo::{K, PhaseConfig, model_config, train_phase};
use crate::model::Gpt2;
use crate::study::{
    RunSpec, StudyConfig, StudyReport, Workload, run_study as study, tables_markdown, write_report,
};
use crate::text::{TextData, TextDataOptions, load_records};
use crate::{DType, Error, Result, checkpoint};
use clap::Args;
use std::path::{Path, PathBuf};

/// `lorafuse study [--model DIR --data FILE...] --out REPORT`.
#[derive(Args, Clone, Debug)]
pub struct StudyArgs {
    /// The report directory (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// A transformers GPT-2 directory (with its tokenizer); without it, the demo's task pair.
    #[arg(long, requires = "data")]
    pub model: Option<PathBuf>,
    /// The text (.txt or .jsonl, as for `train`); needs --model.
    #[arg(long, num_args = 1.., requires = "model")]
    pub data: Vec<PathBuf>,
    /// Seeds per configuration (mean ± std over them).
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fine-tuning steps per run.
    #[arg(long, default_value_t = 120)]
    pub steps: usize,
    /// Pretraining steps on task A (the demo pair only).
    #[arg(long, default_value_t = 500)]
    pub pretrain_steps: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// LoRA's peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Full fine-tuning's peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub full_lr: f64,
    /// LoRA's alpha, the same for every rank (scale alpha/r).
    #[arg(long, default_value_t = 8.0)]
    pub alpha: f64,
    /// Table 6's ranks, comma separated (the largest is the figures' r = 64).
    #[arg(long, default_value = "1,2,4,8,64")]
    pub ranks: String,
    /// The layer the analyses read [default: the middle one, n_layer / 2].
    #[arg(long)]
    pub layer: Option<usize>,
    /// Intruder-dimension threshold ε on |cos|.
    #[arg(long, default_value_t = 0.5)]
    pub epsilon: f64,
    /// Intruder dimensions: top singular vectors examined.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Tokens per sequence (with --model).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Fraction of the text held out for the loss (with --model).
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// Device: auto, cpu, cuda, cuda:N or sim.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Skip the simulator's peak-bytes measurement.
    #[arg(long)]
    pub no_sim: bool,
}

fn parse_ranks(s: &str) -> Result<Vec<usize>> {
    let ranks: Vec<usize> = s
        .split(',')
        .map(|t| {
            t.trim()
                .parse::<usize>()
                .ok()
                .filter(|&r| (1..=4096).contains(&r))
                .ok_or_else(|| Error::invalid(format!("--ranks: {t:?} is not a rank in 1..=4096")))
        })
        .collect::<Result<_>>()?;
    Ok(ranks)
}

fn check_out(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .map_err(|e| checkpoint::io_err(out, e))?
                .next()
                .is_none();
        if !empty {
            return Err(Error::invalid(format!(
                "--out {}: exists and is not an empty directory",
                out.display()
            )));
        }
    }
    Ok(())
}

/// The options as a [`StudyConfig`], every number range-checked.
pub fn study_config(args: &StudyArgs) -> Result<StudyConfig> {
    check_usize("seeds", args.seeds, 2, 100)?;
    check_usize("steps", args.steps, 1, 1 << 24)?;
    check_usize("pretrain-steps", args.pretrain_steps, 0, 1 << 24)?;
    check_usize("batch", args.batch, 1, 1 << 16)?;
    check_usize("top-k", args.top_k, 1, 1 << 16)?;
    check_usize("seq-len", args.seq_len, 2, 1 << 20)?;
    check_f64("lr", args.lr, 1e-12, 10.0)?;
    check_f64("full-lr", args.full_lr, 1e-12, 10.0)?;
    check_f64("alpha", args.alpha, 1e-9, 1e9)?;
    check_f64("epsilon", args.epsilon, 0.0, 1.0)?;
    check_f64("val-fraction", args.val_fraction, 1e-6, 0.5)?;
    Ok(StudyConfig {
        seeds: args.seeds,
        seed: args.seed,
        steps: args.steps,
        batch: args.batch,
        lr_lora: args.lr,
        lr_full: args.full_lr,
        alpha: args.alpha,
        ranks: parse_ranks(&args.ranks)?,
        layer: args.layer,
        epsilon: args.epsilon,
        top_k: args.top_k,
        measure_sim: !args.no_sim,
        ..Default::default()
    })
}

/// The base model and the workload: the demo's pretrained tiny GPT and task B, or the
/// checkpoint and its text.
fn prepare(args: &StudyArgs, cfg: &StudyConfig) -> Result<(Gpt2, Workload, String)> {
    let (device, why) = pick_device(&args.device)?;
    match &args.model {
        None => {
            let mcfg = model_config();
            eprintln!(
                "lorafuse study on {device} ({why}): the demo pair, GPT d_model {} × {} layers; pretraining on task A",
                mcfg.n_embd, mcfg.n_layer
            );
            let base = Gpt2::new_random(&mcfg, DType::F32, &device, args.seed)?;
            let mut gen_a = TaskGen::new(Task::A, K, args.seed)?;
            let phase = PhaseConfig {
                steps: args.pretrain_steps,
                batch: args.batch,
                lr: 3e-3,
                seed: args.seed,
                heldout: 256,
                progress: cfg.progress,
            };
            let (base, pre) = train_phase("pretrain on task A", base, &mut gen_a, &phase)?;
            eprintln!(
                "base model: task A held-out exact match {:.1} %",
                100.0 * pre.accuracy
            );
            let work = Workload::Demo { k: K, heldout: 256 };
            Ok((
                base,
                work,
                format!(
                    "demo pair (pretrained {} steps on task A, adapted on task B)",
                    args.pretrain_steps
                ),
            ))
        }
        Some(dir) => {
            let dtype = pick_dtype("auto", &device)?;
            let model = load_model(dir, dtype, &device)?;
            let tok = load_tokenizer(dir, &model)?;
            if args.seq_len > model.config.n_positions {
                return Err(Error::invalid(format!(
                    "--seq-len {} exceeds the model's context of {} positions",
                    args.seq_len, model.config.n_positions
                )));
            }
            let mut records = Vec::new();
            for f in &args.data {
                records.extend(load_records(f)?);
            }
            let opts = TextDataOptions {
                seq_len: args.seq_len,
                val_fraction: args.val_fraction,
                seed: args.seed,
            };
            let data = TextData::build(&tok, &records, &opts)?;
            data.train.check_vocab(model.config.vocab_size)?;
            if data.val.is_empty() {
                return Err(Error::invalid(
                    "--data: too little text to hold out --val-fraction of it for evaluation",
                ));
            }
            Ok((
                model,
                Workload::Text { data },
                format!(
                    "{} on {}",
                    dir.display(),
                    args.data
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    }
}

/// Runs the study into `tmp` (created here).
fn run_into(args: &StudyArgs, cfg: &StudyConfig, tmp: &Path) -> Result<StudyReport> {
    let (base, work, name) = prepare(args, cfg)?;
    if let Some(l) = cfg.layer {
        check_usize("layer", l, 0, base.config.n_layer - 1)?;
    }
    let rmax = cfg.ranks.iter().copied().max().unwrap_or(1);
    check_usize("ranks", rmax, 1, base.config.n_embd)?;
    check_usize("top-k", cfg.top_k, 1, base.config.n_embd)?;
    std::fs::create_dir_all(tmp).map_err(|e| checkpoint::io_err(tmp, e))?;
    base.save(&tmp.join("base"))?;
    let report = study(&base, &work, cfg, &name, |spec: &RunSpec, seed, model| {
        let rel = if spec.targets.is_empty() {
            format!("full-ft/s{seed}")
        } else {
            format!("adapters/{}-s{seed}", spec.slug())
        };
        let dir = tmp.join(&rel);
        if spec.targets.is_empty() {
            model.save(&dir)?;
        } else {
            model.save_adapters(&dir)?;
        }
        Ok(rel)
    })?;
    write_report(&report, tmp)?;
    Ok(report)
}

/// Runs `lorafuse study` (see [`StudyArgs`]): prints a progress bar over the runs, then
/// every table, and writes the report directory.
pub fn run_study(args: &StudyArgs) -> Result<StudyReport> {
    let cfg = study_config(args)?;
    check_out(&args.out)?;
    run_study_with(args, &cfg)
}

/// [`run_study`] with a given configuration (tests run tiny ones).
pub fn run_study_with(args: &StudyArgs, cfg: &StudyConfig) -> Result<StudyReport> {
    check_out(&args.out)?;
    let name = args
        .out
        .file_name()
        .ok_or_else(|| Error::invalid(format!("--out {}: no directory name", args.out.display())))?
        .to_string_lossy()
        .to_string();
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| checkpoint::io_err(&parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = run_into(args, cfg, &tmp);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if args.out.exists() {
        std::fs::remove_dir(&args.out).map_err(|e| checkpoint::io_err(&args.out, e))?;
    }
    std::fs::rename(&tmp, &args.out).map_err(|e| checkpoint::io_err(&args.out, e))?;
    if cfg.progress {
        println!("{}", tables_markdown(&report));
        println!(
            "wrote {} (report.md, report.json, CSVs, heatmaps, adapters) in {:.1} s",
            args.out.display(),
            report.wall_s
        );
    }
    Ok(report)
}
