//! The training loop: one [`Trainer::step`] is forward, loss, backward, gradient
//! norm/clipping, loss scaling (f16) and an AdamW update of the trainable parameters;
//! with gradient accumulation ([`TrainConfig::grad_accum`], [`Trainer::step_accum`]) the
//! forward and backward run over several micro-batches before the one update.
//!
//! A run can be saved and continued bit for bit: [`Trainer::save_checkpoint`] writes
//! `checkpoint-<step>/` (adapters, optimizer state, trainer state) atomically,
//! [`latest_checkpoint`] finds the newest complete one and [`Trainer::resume`] restores
//! it so that the next step is the one the uninterrupted run would have taken. See
//! [`checkpoint`](self#checkpoints) below.
//!
//! # Gradient accumulation
//!
//! A step over micro-batches `1..=n` computes, for each, the mean cross-entropy `L_j`
//! over its non-ignored targets and backpropagates `L_j / n` (the seed of its backward is
//! `1/n`, or `S/n` under loss scaling); the gradients are summed (in f32 for bf16/f16
//! parameters), then clipped and applied once. This is PyTorch's and the HF `Trainer`'s
//! classic recipe (each micro-batch's loss divided by the accumulation count): the loss
//! is **a mean per micro-batch, then over the micro-batches**, not per token. When every
//! micro-batch has the same number of non-ignored targets (packed sequences without
//! masks) it equals the per-token mean of the whole batch, and the step equals one step
//! on the concatenated batch up to the order of the f32 sums. The reported loss is the
//! mean of the `L_j`.
//!
//! Micro-batch `j` (0-based) of step `i` draws its LoRA dropout masks from
//! [`dropout_seed`]`(seed, i, j)`; micro-batch 0 uses `seed + i`, the seed of a step
//! without accumulation.
//!
//! # Checkpoints
//!
//! `run_dir/checkpoint-<step>/` holds:
//!
//! | file | what |
//! |---|---|
//! | `adapter_config.json`, `adapter_model.safetensors` | the adapters in PEFT's format ([`Gpt2::save_adapters`]), under LoRA |
//! | `config.json`, `model.safetensors` | the base weights ([`Gpt2::save`]), under full fine-tuning |
//! | `optimizer.safetensors` | AdamW's `m`, `v` and f32 master weights per trainable parameter, by name (`<param>.m`, `<param>.v`, `<param>.master`), exact bits |
//! | `trainer_state.json` | the format and its version, the step count, the optimizer's step count, the schedule position, the loss scaler (scale, growth interval, clean steps, overflows), the RNG positions, the trainable parameters' names, shapes and dtypes, the hyper-parameters ([`hyper_params`]) and the caller's `extra` verbatim |
//!
//! Atomicity: everything is written into `run_dir/.checkpoint-<step>.tmp/` (each file
//! synced), the directory is synced and renamed to `checkpoint-<step>`, then `run_dir`
//! is synced. The rename defines completeness: a crash at any point leaves either no
//! `checkpoint-<step>` or a complete one. Names starting with `.checkpoint-` and ending
//! in `.tmp` are leftovers of an interrupted save: [`latest_checkpoint`] ignores them
//! and the next save removes them. One process saves into a run directory at a time.
//!
//! ```
//! use lorafuse::checkpoint::Gpt2Config;
//! use lorafuse::lora::LoraConfig;
//! use lorafuse::model::Gpt2;
//! use lorafuse::train::{diff_hyper_params, latest_checkpoint, read_checkpoint_state, TrainConfig, Trainer};
//! use lorafuse::{DType, Device};
//! let cfg = Gpt2Config { vocab_size: 16, n_positions: 8, n_embd: 16, n_layer: 1, n_head: 2, layer_norm_epsilon: 1e-5 };
//! let base = || -> lorafuse::Result<Gpt2> { Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, 0) };
//! let tc = TrainConfig { warmup_steps: 2, total_steps: 10, ..Default::default() };
//! let (tokens, targets) = (vec![1u32, 2, 3, 4], vec![2i32, 3, 4, 5]);
//!
//! let mut model = base()?;
//! model.attach_lora(&LoraConfig { r: 2, ..Default::default() }, 1)?;
//! let mut t = Trainer::new(model, &tc)?;
//! t.step(&tokens, &targets, 1, 4)?;
//! let run = tempfile::tempdir()?;
//! let saved = t.save_checkpoint(run.path(), &serde_json::json!({"cursor": 4}), Some(3))?;
//! let next = t.step(&tokens, &targets, 1, 4)?;
//!
//! // Later, in another process: the newest checkpoint, its hyper-parameters, the resume.
//! let ckpt = latest_checkpoint(run.path())?.expect("one checkpoint");
//! assert_eq!(ckpt, saved);
//! let state = read_checkpoint_state(&ckpt)?;
//! assert!(diff_hyper_params(&state.hyper_params, &t.hyper_params()).is_empty());
//! let (mut again, extra) = Trainer::resume(base()?, &tc, &ckpt)?; // adapters from the checkpoint
//! assert_eq!((again.steps(), extra["cursor"].as_u64()), (1, Some(4)));
//! assert_eq!(again.step(&tokens, &targets, 1, 4)?.loss.to_bits(), next.loss.to_bits());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod checkpoint;
mod state;
#[cfg(test)]
mod tests;

pub use checkpoint::{
    ABORT_IN_SAVE_ENV, CHECKPOINT_PREFIX, CheckpointState, OPTIMIZER_FILE, SavedLossScaler,
    SavedParam, TRAINER_STATE_FILE, TRAINER_STATE_FORMAT, TRAINER_STATE_VERSION, latest_checkpoint,
    read_checkpoint_state,
};
pub use state::{HyperParamChange, diff_hyper_params, hyper_params};

use crate::model::{ForwardOptions, Gpt2};
use crate::optim::{
    AdamW, AdamWConfig, DeviceLossScaler, DynamicLossScaler, PendingStepReport, StepOptions,
    StepReport, WarmupCosine,
};
use crate::text::Sequences;
use crate::{DType, Device, Error, Gradients, Result, Tape, Tensor, ops};

/// Hyper-parameters of a training run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine schedule.
    pub min_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Total steps (the schedule's length).
    pub total_steps: usize,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Global-norm gradient clipping.
    pub max_grad_norm: Option<f64>,
    /// Seed of the dropout masks (step `i` uses `seed + i`; see [`dropout_seed`]).
    pub seed: u64,
    /// Micro-batches per optimizer step (`≥ 1`, default 1): [`Trainer::step`] and
    /// [`Trainer::step_deferred`] split their batch into this many equal micro-batches
    /// (by rows) and accumulate their gradients (see the [module docs](self)).
    /// [`Trainer::step_accum`] takes its micro-batches explicitly instead.
    pub grad_accum: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 20,
            total_steps: 1000,
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            seed: 0,
            grad_accum: 1,
        }
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// The loss (unscaled).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
    /// True when the step was skipped (non-finite gradients under loss scaling).
    pub skipped: bool,
}

/// One micro-batch of a step: `batch·seq` token ids and their targets, row-major.
#[derive(Clone, Copy, Debug)]
pub struct MicroBatch<'a> {
    /// `batch·seq` token ids.
    pub tokens: &'a [u32],
    /// `batch·seq` targets ([`ops::IGNORE_INDEX`] skips a position).
    pub targets: &'a [i32],
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
}

/// The LoRA dropout seed of micro-batch `micro` of step `step` (both 0-based) under the
/// run's `seed`: `seed + step` for micro-batch 0 (a step without accumulation), that
/// value mixed with `micro` (SplitMix64's finaliser) for the others, so that no two
/// micro-batches of a step share masks.
pub fn dropout_seed(seed: u64, step: u64, micro: usize) -> u64 {
    let base = seed.wrapping_add(step);
    if micro == 0 {
        return base;
    }
    let mut z = (micro as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    base ^ z ^ (z >> 31)
}

/// Dynamic loss scaling (f16): on the host for a CPU model, on the device otherwise (so
/// that a step never waits for the device).
enum Scaler {
    Host(DynamicLossScaler),
    Device(Box<DeviceLossScaler>),
}

/// Trains a model's trainable parameters (adapters under LoRA, everything under full
/// fine-tuning).
pub struct Trainer {
    /// The model being trained.
    pub model: Gpt2,
    opt: AdamW,
    schedule: WarmupCosine,
    scaler: Option<Scaler>,
    /// The backward's seed without loss scaling: 1 on the model's device.
    one: Tensor,
    /// The configuration the trainer was built with (its hyper-parameters).
    cfg: TrainConfig,
    step: usize,
}

impl Trainer {
    /// A trainer over `model.trainable_params()`; f16 models get dynamic loss scaling
    /// (kept on the model's device when it has one: [`DeviceLossScaler`]).
    ///
    /// Errors: `grad_accum` of 0, an invalid schedule or AdamW setting, or no trainable
    /// parameter.
    pub fn new(model: Gpt2, cfg: &TrainConfig) -> Result<Self> {
        if cfg.grad_accum == 0 {
            return Err(Error::invalid("train: grad_accum must be >= 1"));
        }
        let params: Vec<Tensor> = model
            .trainable_params()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let opt = AdamW::new(params, cfg.adamw)?;
        let schedule = WarmupCosine::new(
            cfg.lr,
            cfg.min_lr,
            cfg.warmup_steps as u64,
            cfg.total_steps as u64,
        )?;
        let scaler = match (model.dtype(), model.device()) {
            (DType::F16, Device::Cpu) => Some(Scaler::Host(DynamicLossScaler::new())),
            (DType::F16, d) => Some(Scaler::Device(Box::new(DeviceLossScaler::new(
                &DynamicLossScaler::new(),
                &d,
            )?))),
            _ => None,
        };
        let one = Tensor::full(1.0, [], DType::F32, &model.device())?;
        Ok(Trainer {
            one,
            model,
            opt,
            schedule,
            scaler,
            cfg: cfg.clone(),
            step: 0,
        })
    }

    /// The configuration the trainer runs with.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The hyper-parameters of this run as a JSON object ([`hyper_params`]): what
    /// [`Trainer::save_checkpoint`] records and [`diff_hyper_params`] compares.
    pub fn hyper_params(&self) -> serde_json::Value {
        hyper_params(&self.model, &self.cfg)
    }

    /// The optimizer (its state size is what LoRA saves).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The dynamic loss scaler's state (f16 models; `None` otherwise). On a device this
    /// waits for the queued steps and reads it back.
    pub fn loss_scaler(&self) -> Result<Option<DynamicLossScaler>> {
        match &self.scaler {
            None => Ok(None),
            Some(Scaler::Host(s)) => Ok(Some(s.clone())),
            Some(Scaler::Device(s)) => s.to_host().map(Some),
        }
    }

    /// One step on a batch of `batch·seq` tokens with per-token targets, waiting for it
    /// and reading back the loss and the optimizer's report ([`Trainer::step_deferred`]
    /// then [`PendingStep::wait`]).
    pub fn step(
        &mut self,
        tokens: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<StepStats> {
        self.step_deferred(tokens, targets, batch, seq)?.wait()
    }

    /// One step, queued: forward, loss, backward, gradient norm and clipping, loss scaling
    /// (f16) and the AdamW update are issued to the model's device and nothing is read
    /// back (the tokens and targets are uploaded). The loss stays a device scalar until
    /// [`PendingStep::wait`] (or [`PendingStep::loss`]) asks for it; on a device the loss
    /// scale, the skip decision and the next scale stay there too ([`DeviceLossScaler`]).
    ///
    /// With [`TrainConfig::grad_accum`] `= n > 1` the batch is split into `n` micro-batches
    /// of `batch / n` rows ([`Trainer::step_accum_deferred`]); `batch` must be a multiple
    /// of `n`.
    pub fn step_deferred(
        &mut self,
        tokens: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<PendingStep> {
        let n = self.cfg.grad_accum;
        if n == 1 {
            return self.step_accum_deferred(&[MicroBatch {
                tokens,
                targets,
                batch,
                seq,
            }]);
        }
        if batch == 0 || !batch.is_multiple_of(n) {
            return Err(Error::invalid(format!(
                "train: a batch of {batch} sequences does not split into grad_accum = {n} equal micro-batches"
            )));
        }
        if tokens.len() != batch * seq || targets.len() != batch * seq {
            return Err(Error::invalid(format!(
                "train: {} tokens and {} targets for a batch of {batch} x {seq}",
                tokens.len(),
                targets.len()
            )));
        }
        let rows = batch / n;
        let micro: Vec<MicroBatch<'_>> = (0..n)
            .map(|j| {
                let r = j * rows * seq..(j + 1) * rows * seq;
                MicroBatch {
                    tokens: &tokens[r.clone()],
                    targets: &targets[r],
                    batch: rows,
                    seq,
                }
            })
            .collect();
        self.step_accum_deferred(&micro)
    }

    /// One optimizer step over explicit micro-batches (any number `≥ 1`, each of its own
    /// shape; [`TrainConfig::grad_accum`] is not consulted), waiting for it:
    /// [`Trainer::step_accum_deferred`] then [`PendingStep::wait`].
    pub fn step_accum(&mut self, micro: &[MicroBatch<'_>]) -> Result<StepStats> {
        self.step_accum_deferred(micro)?.wait()
    }

    /// One optimizer step over the micro-batches `micro`, queued like
    /// [`Trainer::step_deferred`]: each micro-batch's forward and backward (its loss
    /// divided by `micro.len()`), the gradients summed, then one clip and AdamW update
    /// (see the [module docs](self) for the exact semantics). One micro-batch is exactly
    /// [`Trainer::step_deferred`] without accumulation.
    ///
    /// Errors (nothing is updated): no micro-batch, or one whose tokens or targets do not
    /// fit its shape or the model.
    pub fn step_accum_deferred(&mut self, micro: &[MicroBatch<'_>]) -> Result<PendingStep> {
        let n = micro.len();
        if n == 0 {
            return Err(Error::invalid(
                "train: a step needs at least one micro-batch",
            ));
        }
        let mut losses = Vec::with_capacity(n);
        let mut acc: Option<Gradients> = None;
        for (j, mb) in micro.iter().enumerate() {
            let tape = Tape::new();
            let opts = ForwardOptions {
                tape: Some(&tape),
                dropout_seed: Some(dropout_seed(self.cfg.seed, self.step as u64, j)),
            };
            // The backward's seed is known before the forward (1, or the loss scale,
            // over n), so the loss computes the logits' gradient in its own pass and
            // frees the logits.
            let seed = self.backward_seed(n)?;
            let loss = self
                .model
                .loss_fused(mb.tokens, mb.targets, mb.batch, mb.seq, opts, &seed)?;
            let grads = tape.backward_with(&loss, seed)?;
            drop(tape);
            losses.push(loss.detach());
            acc = Some(match acc {
                None if n == 1 => grads,
                None => self.widened(grads)?,
                Some(sum) => self.accumulate(sum, grads)?,
            });
        }
        let grads = acc.expect("at least one micro-batch");
        let loss = if n == 1 {
            losses.pop().expect("one loss")
        } else {
            let mut sum = losses[0].clone();
            for l in &losses[1..] {
                sum = ops::add(&sum, l)?;
            }
            ops::scale(&sum, 1.0 / n as f64)?
        };
        let lr = self.schedule.lr(self.step as u64);
        let max_grad_norm = self.cfg.max_grad_norm;
        let report = match &mut self.scaler {
            None => {
                let opts = StepOptions {
                    grad_scale_inv: 1.0,
                    max_grad_norm,
                };
                Report::Pending(self.opt.step_deferred(&grads, lr, opts)?)
            }
            Some(Scaler::Device(s)) => {
                Report::Pending(
                    self.opt
                        .step_deferred_scaled(&grads, lr, max_grad_norm, s)?,
                )
            }
            Some(Scaler::Host(s)) => {
                // The CPU runs the step at once: nothing to defer.
                let opts = StepOptions {
                    grad_scale_inv: s.inv_scale(),
                    max_grad_norm,
                };
                let r = self.opt.step_deferred(&grads, lr, opts)?.wait()?;
                s.update(r.skipped);
                Report::Done(r)
            }
        };
        self.step += 1;
        Ok(PendingStep { loss, report, lr })
    }

    /// The seed of one micro-batch's backward out of `n`: 1 (or the loss scale `S`)
    /// over `n`, one f32 scalar on the model's device.
    fn backward_seed(&self, n: usize) -> Result<Tensor> {
        let device = self.one.device();
        let inv_n = 1.0 / n as f64;
        Ok(match &self.scaler {
            None if n == 1 => self.one.clone(),
            None => Tensor::full(inv_n, [], DType::F32, &device)?,
            Some(Scaler::Device(s)) if n == 1 => s.seed()?,
            Some(Scaler::Device(s)) => ops::scale(&s.seed()?, inv_n)?,
            Some(Scaler::Host(s)) => Tensor::full(s.scale() * inv_n, [], DType::F32, &device)?,
        })
    }

    /// The first micro-batch's gradients, bf16/f16 ones widened to f32 (the sum of
    /// several micro-batches is kept in f32; AdamW takes f32 gradients for bf16/f16
    /// parameters).
    fn widened(&self, mut grads: Gradients) -> Result<Gradients> {
        let mut out = Gradients::default();
        for p in self.opt.params() {
            if let Some(g) = grads.remove(p) {
                let g = if g.dtype().is_half() {
                    g.to_dtype(DType::F32)?
                } else {
                    g
                };
                out.insert(p, g)?;
            }
        }
        Ok(out)
    }

    /// `sum + grads`, parameter by parameter (in f32 for bf16/f16 parameters).
    fn accumulate(&self, mut sum: Gradients, grads: Gradients) -> Result<Gradients> {
        let mut grads = self.widened(grads)?;
        for p in self.opt.params() {
            match (sum.remove(p), grads.remove(p)) {
                (Some(a), Some(b)) => sum.insert(p, ops::add(&a, &b)?)?,
                (Some(a), None) | (None, Some(a)) => sum.insert(p, a)?,
                (None, None) => {}
            }
        }
        Ok(sum)
    }
}

/// A step issued by [`Trainer::step_deferred`] whose results have not been read back.
#[derive(Debug)]
pub struct PendingStep {
    loss: Tensor,
    report: Report,
    lr: f64,
}

#[derive(Debug)]
enum Report {
    Pending(PendingStepReport),
    Done(StepReport),
}

impl PendingStep {
    /// The loss, a scalar tensor on the model's device (unscaled).
    pub fn loss(&self) -> &Tensor {
        &self.loss
    }

    /// Waits for the step and reads back the loss and the optimizer's report.
    pub fn wait(self) -> Result<StepStats> {
        let report = match self.report {
            Report::Pending(p) => p.wait()?,
            Report::Done(r) => r,
        };
        Ok(StepStats {
            loss: self.loss.to_scalar()?,
            grad_norm: report.grad_norm,
            lr: self.lr,
            skipped: report.skipped,
        })
    }
}

/// The mean loss over every counted token of `seqs` (targets other than
/// [`ops::IGNORE_INDEX`]), in batches of `batch`, with no tape: `(loss, tokens)`. What
/// `lorafuse eval`, `train`'s held-out evaluation and the study report.
pub fn mean_loss(model: &Gpt2, seqs: &Sequences, batch: usize) -> Result<(f64, usize)> {
    let (mut sum, mut n) = (0.0, 0usize);
    for b in seqs.eval_batches(batch)? {
        let count = b
            .targets
            .iter()
            .filter(|&&t| t != ops::IGNORE_INDEX)
            .count();
        if count == 0 {
            continue;
        }
        let loss = model.loss(
            &b.tokens,
            &b.targets,
            b.batch,
            b.seq,
            ForwardOptions::default(),
        )?;
        sum += loss.to_vec_f64()?[0] * count as f64;
        n += count;
    }
    if n == 0 {
        return Err(Error::invalid("no token to evaluate the loss on"));
    }
    Ok((sum / n as f64, n))
}
