//! `lorafuse train`: LoRA fine-tuning of a transformers GPT-2 directory on the user's
//! text, with crash-safe checkpoints, bit-identical `--resume`, held-out evaluation and a
//! PEFT adapter at the end.

use super::{check_f64, check_usize, load_model, load_tokenizer, pick_device, pick_dtype};
use crate::lora::{LoraConfig, LoraInit, LoraTarget};
use crate::optim::AdamWConfig;
use crate::text::{BatchCursor, TextData, TextDataOptions, load_records};
use crate::train::mean_loss;
use crate::train::{TrainConfig, Trainer, diff_hyper_params, latest_checkpoint};
use crate::{Error, Result, checkpoint};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The run's resolved options, saved as `RUN/run.json`: `--resume` reads them back.
pub const RUN_CONFIG_FILE: &str = "run.json";
/// One JSON object per optimizer step (and per evaluation), in `RUN/`.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The final adapter, in PEFT's format, in `RUN/`.
pub const ADAPTER_DIR: &str = "adapter";

/// `lorafuse train`: options left out take their defaults (a new run) or the run's saved
/// values (`--resume`); an option given with `--resume` that differs from the run's is
/// refused unless `--force`.
#[derive(Args, Clone, Debug, Default)]
pub struct TrainArgs {
    /// A transformers GPT-2 directory: config.json, model.safetensors, and tokenizer.json
    /// or vocab.json + merges.txt.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: .txt (documents separated by blank lines) or .jsonl with "text", or
    /// with "prompt" and "completion" (loss on the completion only). One or more files.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// The run directory (new or empty): run.json, metrics.jsonl, checkpoint-N/ and, at
    /// the end, adapter/.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory from its newest complete checkpoint (from step 0
    /// with its saved options when it stopped before its first checkpoint).
    #[arg(long, value_name = "RUN")]
    pub resume: Option<PathBuf>,
    /// With --resume: accept options that differ from the run's.
    #[arg(long)]
    pub force: bool,
    /// Plain progress lines instead of a progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub opts: TrainOptions,
}

/// The options of a run that `--resume` compares with the saved ones. `None`: not given.
#[derive(Args, Clone, Debug, Default, Serialize)]
pub struct TrainOptions {
    /// Device: auto (the first GPU, else the CPU), cpu, cuda, cuda:N or sim. [default: auto]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Storage dtype: auto (bf16 on a GPU, f32 elsewhere), f32, bf16 or f16. [default: auto]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Tokens per sequence (at most the model's n_positions). [default: 128]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch. [default: 8]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step (gradients accumulated). [default: 1]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<usize>,
    /// Optimizer steps. [default: --epochs over the training sequences]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Passes over the training sequences, when --steps is not given. [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    /// Peak learning rate (linear warmup, then cosine to a tenth of it). [default: 2e-4]
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Warmup steps. [default: 5 % of the steps]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<usize>,
    /// AdamW's decoupled weight decay. [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clipping; 0 turns it off. [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// LoRA rank. [default: 8]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// LoRA alpha (the scale is alpha/rank, alpha/√rank with --rslora). [default: 16]
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// LoRA targets, comma separated: c_attn, c_attn.q, c_attn.k, c_attn.v, attn.c_proj,
    /// mlp.c_fc, mlp.c_proj. [default: c_attn]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<String>,
    /// Dropout on the adapters' input, in [0, 1). [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// rsLoRA scaling (alpha/√rank).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rslora: Option<bool>,
    /// Initialisation of A: kaiming (PEFT's default) or gaussian. [default: kaiming]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// Seed of the adapters' initialisation, the data order, the split and the dropout.
    /// [default: 0]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Fraction of the sequences held out for evaluation, in [0, 1). [default: 0.05]
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_fraction: Option<f64>,
    /// Evaluate the held-out loss every N steps (and at the end); 0: only at the end.
    /// [default: 100]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<usize>,
    /// Save a checkpoint every N steps (and at the end); 0: only at the end. [default: 100]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every: Option<usize>,
    /// Checkpoints kept (the newest). [default: 2]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
}

impl TrainOptions {
    /// Non-finite numbers are refused here, before they reach JSON (which has no NaN).
    fn check_finite(&self) -> Result<()> {
        let floats = [
            ("epochs", self.epochs),
            ("lr", self.lr),
            ("weight-decay", self.weight_decay),
            ("max-grad-norm", self.max_grad_norm),
            ("alpha", self.alpha),
            ("dropout", self.dropout),
            ("val-fraction", self.val_fraction),
        ];
        for (name, v) in floats {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                return Err(Error::invalid(format!("--{name} must be finite, got {v}")));
            }
        }
        Ok(())
    }
}

/// A run's options, resolved and saved in `RUN/run.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The model directory.
    pub model: PathBuf,
    /// The data files.
    pub data: Vec<PathBuf>,
    /// `--device` as given.
    pub device: String,
    /// `--dtype` as given.
    pub dtype: String,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Optimizer steps (`None` until the data is read: from `epochs`).
    pub steps: Option<usize>,
    /// Passes over the data when `steps` is not given.
    pub epochs: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps (`None`: 5 % of the steps).
    pub warmup: Option<usize>,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Clipping norm; 0 is off.
    pub max_grad_norm: f64,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// LoRA targets, comma separated.
    pub targets: String,
    /// LoRA dropout.
    pub dropout: f64,
    /// rsLoRA.
    pub rslora: bool,
    /// `kaiming` or `gaussian`.
    pub init: String,
    /// The run's seed.
    pub seed: u64,
    /// Held-out fraction.
    pub val_fraction: f64,
    /// Evaluation interval (0: at the end only).
    pub eval_every: usize,
    /// Checkpoint interval (0: at the end only).
    pub save_every: usize,
    /// Checkpoints kept.
    pub keep: usize,
}

impl RunConfig {
    fn defaults(model: PathBuf, data: Vec<PathBuf>) -> Value {
        json!({
            "model": model, "data": data, "device": "auto", "dtype": "auto", "seq_len": 128,
            "batch": 8, "grad_accum": 1, "steps": null, "epochs": 1.0, "lr": 2e-4,
            "warmup": null, "weight_decay": 0.0, "max_grad_norm": 1.0, "rank": 8,
            "alpha": 16.0, "targets": "c_attn", "dropout": 0.0, "rslora": false,
            "init": "kaiming", "seed": 0, "val_fraction": 0.05, "eval_every": 100,
            "save_every": 100, "keep": 2,
        })
    }

    /// Checks every numeric option's range and parses the LoRA settings.
    pub fn validate(&self) -> Result<LoraConfig> {
        check_usize("seq-len", self.seq_len, 1, usize::MAX)?;
        check_usize("batch", self.batch, 1, 1 << 20)?;
        check_usize("grad-accum", self.grad_accum, 1, 1 << 16)?;
        if let Some(s) = self.steps {
            check_usize("steps", s, 1, usize::MAX)?;
        }
        check_f64("epochs", self.epochs, 0.0, f64::INFINITY)?;
        if self.epochs == 0.0 {
            return Err(Error::invalid("--epochs must be > 0, got 0"));
        }
        check_f64("lr", self.lr, 0.0, f64::INFINITY)?;
        if self.lr == 0.0 {
            return Err(Error::invalid("--lr must be > 0, got 0"));
        }
        check_f64("weight-decay", self.weight_decay, 0.0, f64::INFINITY)?;
        check_f64("max-grad-norm", self.max_grad_norm, 0.0, f64::INFINITY)?;
        check_usize("rank", self.rank, 1, 1 << 16)?;
        check_f64("alpha", self.alpha, 0.0, f64::INFINITY)?;
        check_f64("dropout", self.dropout, 0.0, 1.0)?;
        if self.dropout >= 1.0 {
            return Err(Error::invalid("--dropout must be < 1, got 1"));
        }
        check_f64("val-fraction", self.val_fraction, 0.0, 1.0)?;
        if self.val_fraction >= 1.0 {
            return Err(Error::invalid(format!(
                "--val-fraction must be < 1, got {}",
                self.val_fraction
            )));
        }
        check_usize("keep", self.keep, 1, usize::MAX)?;
        let init = match self.init.as_str() {
            "kaiming" => LoraInit::KaimingUniform,
            "gaussian" => LoraInit::Gaussian,
            other => {
                return Err(Error::invalid(format!(
                    "--init must be kaiming or gaussian, got {other:?}"
                )));
            }
        };
        let targets = self
            .targets
            .split(',')
            .map(|t| LoraTarget::parse(t.trim()))
            .collect::<Result<Vec<_>>>()?;
        let lora = LoraConfig {
            r: self.rank,
            alpha: self.alpha,
            use_rslora: self.rslora,
            init,
            dropout: self.dropout,
            targets,
        };
        lora.validate()?;
        Ok(lora)
    }

    fn train_config(&self, steps: usize) -> TrainConfig {
        TrainConfig {
            lr: self.lr,
            min_lr: self.lr / 10.0,
            warmup_steps: self.warmup.unwrap_or(steps / 20).min(steps),
            total_steps: steps,
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            seed: self.seed,
            grad_accum: self.grad_accum,
        }
    }
}

/// What a `train` call did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Optimizer steps done, in all (the resumed ones included).
    pub steps: usize,
    /// The step the run started at (0, or the checkpoint's).
    pub resumed_from: usize,
    /// The last step's training loss.
    pub final_loss: f64,
    /// The held-out loss at the end (`None` without held-out data).
    pub val_loss: Option<f64>,
    /// Training tokens per second in this call.
    pub tokens_per_s: f64,
    /// True when SIGINT stopped the run (after saving a checkpoint).
    pub interrupted: bool,
    /// The newest checkpoint.
    pub checkpoint: PathBuf,
    /// The final adapter (`None` when interrupted).
    pub adapter: Option<PathBuf>,
}

/// `given` over `base`: the run's options as JSON.
fn overlay(mut base: Value, given: &TrainOptions) -> Result<Value> {
    let given = serde_json::to_value(given).map_err(|e| Error::invalid(e.to_string()))?;
    if let (Some(b), Some(g)) = (base.as_object_mut(), given.as_object()) {
        for (k, v) in g {
            b.insert(k.clone(), v.clone());
        }
    }
    Ok(base)
}

fn parse_run_config(v: Value, path: &Path) -> Result<RunConfig> {
    serde_json::from_value(v).map_err(|e| Error::format(path.display().to_string(), e.to_string()))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| checkpoint::io_err(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::format(path.display().to_string(), e.to_string()))
}

/// The new run's directory: created if missing; an error if it holds anything.
fn prepare_run_dir(out: &Path) -> Result<()> {
    if out.join(RUN_CONFIG_FILE).exists() {
        return Err(Error::invalid(format!(
            "--out {}: already holds a run; continue it with `lorafuse train --resume {}`",
            out.display(),
            out.display()
        )));
    }
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| checkpoint::io_err(out, e))?;
        if entries.next().is_some() {
            return Err(Error::invalid(format!(
                "--out {}: not empty (give a new or empty directory)",
                out.display()
            )));
        }
    } else {
        std::fs::create_dir_all(out).map_err(|e| checkpoint::io_err(out, e))?;
    }
    Ok(())
}

/// Keeps the lines of `RUN/metrics.jsonl` up to `step` (a resumed run rewrites the rest).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(checkpoint::io_err(path, e)),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    super::write_file_atomic(path, kept.as_bytes())
}

/// Runs `lorafuse train` (see [`TrainArgs`]).
pub fn run_train(args: &TrainArgs) -> Result<TrainSummary> {
    let start = Instant::now();
    args.opts.check_finite()?;
    // The run's options, the directory and the checkpoint to start from.
    let (cfg, run_dir, ckpt) = match &args.resume {
        Some(run_dir) => {
            if args.out.as_ref().is_some_and(|o| o != run_dir) {
                return Err(Error::invalid(
                    "--resume RUN continues RUN: leave --out out or give the same directory",
                ));
            }
            let path = run_dir.join(RUN_CONFIG_FILE);
            if !path.exists() {
                return Err(Error::invalid(format!(
                    "--resume {}: not a lorafuse run directory (no {RUN_CONFIG_FILE})",
                    run_dir.display()
                )));
            }
            let saved = read_json(&path)?;
            // The data and model may be given again; they count as options too.
            let mut new = overlay(saved.clone(), &args.opts)?;
            if let Some(m) = &args.model {
                new["model"] = json!(m);
            }
            if !args.data.is_empty() {
                new["data"] = json!(args.data);
            }
            let changes = diff_hyper_params(&saved, &new);
            if !changes.is_empty() && !args.force {
                let list: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
                return Err(Error::invalid(format!(
                    "--resume {}: options differ from the run's ({}); pass --force to resume with them anyway",
                    run_dir.display(),
                    list.join("; ")
                )));
            }
            let cfg = parse_run_config(new, &path)?;
            // No complete checkpoint (the run stopped before its first save): start over
            // in the same directory with the same options.
            let ckpt = latest_checkpoint(run_dir)?;
            if ckpt.is_none() {
                eprintln!(
                    "--resume {}: no complete checkpoint yet; training from step 0",
                    run_dir.display()
                );
            }
            (cfg, run_dir.clone(), ckpt)
        }
        None => {
            let model = args
                .model
                .clone()
                .ok_or_else(|| Error::invalid("--model DIR is required (or --resume RUN)"))?;
            if args.data.is_empty() {
                return Err(Error::invalid(
                    "--data FILE... is required (or --resume RUN)",
                ));
            }
            let out = args
                .out
                .clone()
                .ok_or_else(|| Error::invalid("--out RUN is required (or --resume RUN)"))?;
            let v = overlay(RunConfig::defaults(model, args.data.clone()), &args.opts)?;
            let cfg = parse_run_config(v, Path::new("the options"))?;
            (cfg, out, None)
        }
    };
    let lora_cfg = cfg.validate()?;
    let (device, why) = pick_device(&cfg.device)?;
    let dtype = pick_dtype(&cfg.dtype, &device)?;

    // The model, its tokenizer and the data, every check before anything is written.
    let model = load_model(&cfg.model, dtype, &device)?;
    let tokenizer = load_tokenizer(&cfg.model, &model)?;
    let n_positions = model.config.n_positions;
    if cfg.seq_len > n_positions {
        return Err(Error::invalid(format!(
            "--seq-len {} exceeds the model's context of {n_positions} positions",
            cfg.seq_len
        )));
    }
    let mut records = Vec::new();
    for f in &cfg.data {
        records.extend(load_records(f)?);
    }
    let opts = TextDataOptions {
        seq_len: cfg.seq_len,
        val_fraction: cfg.val_fraction,
        seed: cfg.seed,
    };
    let data = TextData::build(&tokenizer, &records, &opts)?;
    data.train.check_vocab(model.config.vocab_size)?;
    let per_step = cfg.batch * cfg.grad_accum;
    let steps = match cfg.steps {
        Some(s) => s,
        None => ((cfg.epochs * data.train.len() as f64 / per_step as f64).ceil() as usize).max(1),
    };
    let mut cfg = cfg;
    cfg.steps = Some(steps);
    let tcfg = cfg.train_config(steps);

    // The trainer and the data cursor, new or from the checkpoint.
    let (mut trainer, mut cursor, resumed_from) = match &ckpt {
        Some(ckpt) => {
            let (trainer, extra) = Trainer::resume(model, &tcfg, ckpt)?;
            let cursor: BatchCursor =
                serde_json::from_value(extra["cursor"].clone()).map_err(|e| {
                    Error::format(ckpt.display().to_string(), format!("data cursor: {e}"))
                })?;
            let at = trainer.steps();
            (trainer, cursor, at)
        }
        None => {
            if args.resume.is_none() {
                prepare_run_dir(&run_dir)?;
            }
            let mut model = model;
            model.attach_lora(&lora_cfg, cfg.seed)?;
            let trainer = Trainer::new(model, &tcfg)?;
            let cursor = BatchCursor::new(data.train.len(), per_step, cfg.seed)?;
            (trainer, cursor, 0)
        }
    };
    let cfg_json = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::invalid(e.to_string()))?;
    super::write_file_atomic(&run_dir.join(RUN_CONFIG_FILE), &cfg_json)?;
    let metrics_path = run_dir.join(METRICS_FILE);
    truncate_metrics(&metrics_path, resumed_from)?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&metrics_path)
        .map_err(|e| checkpoint::io_err(&metrics_path, e))?;

    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupted))
        .map_err(|e| Error::invalid(format!("cannot handle SIGINT: {e}")))?;

    let trainable: usize = trainer
        .model
        .trainable_params()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    println!(
        "lorafuse train on {device} ({why}), {dtype}: {} records, {} tokens → {} training / {} held-out sequences of {}; {} trainable parameters; steps {}..{steps} of {} sequences",
        data.n_records,
        data.n_tokens,
        data.train.len(),
        data.val.len(),
        cfg.seq_len,
        trainable,
        resumed_from,
        per_step
    );

    let bar = if args.quiet {
        ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_position(resumed_from as u64);

    let extra = |cursor: &BatchCursor| json!({ "cursor": cursor });
    let save = |trainer: &Trainer, cursor: &BatchCursor| {
        trainer.save_checkpoint(&run_dir, &extra(cursor), Some(cfg.keep))
    };
    let eval = |trainer: &Trainer| -> Result<Option<f64>> {
        if data.val.is_empty() {
            return Ok(None);
        }
        Ok(Some(mean_loss(&trainer.model, &data.val, cfg.batch)?.0))
    };
    let write_line = |metrics: &mut std::fs::File, v: Value| -> Result<()> {
        writeln!(metrics, "{v}")
            .and_then(|()| metrics.flush())
            .map_err(|e| checkpoint::io_err(&metrics_path, e))
    };

    let t_train = Instant::now();
    let (mut tokens, mut loss) = (0usize, f64::NAN);
    let mut last_ckpt = None;
    let mut was_interrupted = false;
    while trainer.steps() < steps {
        if interrupted.load(Ordering::SeqCst) {
            was_interrupted = true;
            break;
        }
        let b = cursor.next_batch(&data.train)?;
        let st = trainer.step(&b.tokens, &b.targets, b.batch, b.seq)?;
        loss = st.loss;
        tokens += b.batch * b.seq;
        let step = trainer.steps();
        let tps = tokens as f64 / t_train.elapsed().as_secs_f64().max(1e-9);
        write_line(
            &mut metrics,
            json!({"step": step, "loss": st.loss, "lr": st.lr, "grad_norm": st.grad_norm,
                   "skipped": st.skipped, "tokens_per_s": tps, "epoch": cursor.epochs()}),
        )?;
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.4} · {tps:.0} tok/s"));
        if args.quiet && (step % 10 == 0 || step == steps) {
            println!("step {step}/{steps} loss {loss:.4} {tps:.0} tok/s");
        }
        if cfg.eval_every > 0
            && step % cfg.eval_every == 0
            && step < steps
            && let Some(v) = eval(&trainer)?
        {
            write_line(
                &mut metrics,
                json!({"step": step, "val_loss": v, "val_ppl": v.exp()}),
            )?;
            bar.println(format!(
                "step {step}: held-out loss {v:.4}, perplexity {:.2}",
                v.exp()
            ));
        }
        if cfg.save_every > 0 && step % cfg.save_every == 0 && step < steps {
            last_ckpt = Some(save(&trainer, &cursor)?);
        }
    }
    bar.finish_and_clear();
    let secs = t_train.elapsed().as_secs_f64();
    let step = trainer.steps();
    let checkpoint = match last_ckpt {
        Some(p) if p.ends_with(format!("{}{step}", crate::train::CHECKPOINT_PREFIX)) => p,
        _ => save(&trainer, &cursor)?,
    };
    let summary = |val_loss, adapter| TrainSummary {
        run_dir: run_dir.clone(),
        steps: step,
        resumed_from,
        final_loss: loss,
        val_loss,
        tokens_per_s: tokens as f64 / secs.max(1e-9),
        interrupted: was_interrupted,
        checkpoint: checkpoint.clone(),
        adapter,
    };
    if was_interrupted {
        println!(
            "interrupted at step {step}: saved {}; continue with `lorafuse train --resume {}`",
            checkpoint.display(),
            run_dir.display()
        );
        return Ok(summary(None, None));
    }
    let val_loss = eval(&trainer)?;
    if let Some(v) = val_loss {
        write_line(
            &mut metrics,
            json!({"step": step, "val_loss": v, "val_ppl": v.exp()}),
        )?;
    }
    let adapter = save_adapter_dir(&trainer, &run_dir)?;
    let s = summary(val_loss, Some(adapter.clone()));
    println!();
    println!(
        "{:<28} {}",
        "steps",
        format_args!("{step} ({} this call)", step - resumed_from)
    );
    println!("{:<28} {:.4}", "final training loss", loss);
    match val_loss {
        Some(v) => println!("{:<28} {v:.4} (perplexity {:.2})", "held-out loss", v.exp()),
        None => println!("{:<28} (no held-out data)", "held-out loss"),
    }
    println!("{:<28} {:.0}", "training tokens/s", s.tokens_per_s);
    println!("{:<28} {trainable}", "trainable parameters");
    println!("{:<28} {}", "adapter (PEFT format)", adapter.display());
    println!("{:<28} {}", "checkpoint", checkpoint.display());
    println!(
        "{:<28} {:.1} s",
        "total time",
        start.elapsed().as_secs_f64()
    );
    Ok(s)
}

/// Writes the final adapter as `RUN/adapter/`: into a temporary directory first, then
/// renamed over any older one.
fn save_adapter_dir(trainer: &Trainer, run_dir: &Path) -> Result<PathBuf> {
    let dir = run_dir.join(ADAPTER_DIR);
    let tmp = run_dir.join(format!(".{ADAPTER_DIR}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| checkpoint::io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| checkpoint::io_err(&tmp, e))?;
    trainer.model.save_adapters(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| checkpoint::io_err(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| checkpoint::io_err(&dir, e))?;
    if let Ok(d) = std::fs::File::open(run_dir) {
        let _ = d.sync_all();
    }
    Ok(dir)
}
