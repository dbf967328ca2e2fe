//! The training loop: one [`Trainer::step`] is forward, loss, backward, gradient
//! norm/clipping, loss scaling (f16) and an AdamW update of the trainable parameters.

use crate::model::{ForwardOptions, Gpt2};
use crate::optim::{
    AdamW, AdamWConfig, DeviceLossScaler, DynamicLossScaler, PendingStepReport, StepOptions,
    StepReport, WarmupCosine,
};
use crate::{DType, Device, Result, Tape, Tensor};

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
    /// Seed of the dropout masks (step `i` uses `seed + i`).
    pub seed: u64,
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
    max_grad_norm: Option<f64>,
    seed: u64,
    step: usize,
}

impl Trainer {
    /// A trainer over `model.trainable_params()`; f16 models get dynamic loss scaling
    /// (kept on the model's device when it has one: [`DeviceLossScaler`]).
    pub fn new(model: Gpt2, cfg: &TrainConfig) -> Result<Self> {
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
            max_grad_norm: cfg.max_grad_norm,
            seed: cfg.seed,
            step: 0,
        })
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
    pub fn step_deferred(
        &mut self,
        tokens: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
    ) -> Result<PendingStep> {
        let tape = Tape::new();
        let opts = ForwardOptions {
            tape: Some(&tape),
            dropout_seed: Some(self.seed.wrapping_add(self.step as u64)),
        };
        // The backward's seed is known before the forward (1, or the loss scale), so the
        // loss computes the logits' gradient in its own pass and frees the logits.
        let seed = match &self.scaler {
            None => self.one.clone(),
            Some(Scaler::Device(s)) => s.seed()?,
            Some(Scaler::Host(s)) => Tensor::full(s.scale(), [], DType::F32, &self.one.device())?,
        };
        let loss = self
            .model
            .loss_fused(tokens, targets, batch, seq, opts, &seed)?;
        let grads = tape.backward_with(&loss, seed)?;
        drop(tape);
        let lr = self.schedule.lr(self.step as u64);
        let report = match &mut self.scaler {
            None => {
                let opts = StepOptions {
                    grad_scale_inv: 1.0,
                    max_grad_norm: self.max_grad_norm,
                };
                Report::Pending(self.opt.step_deferred(&grads, lr, opts)?)
            }
            Some(Scaler::Device(s)) => {
                Report::Pending(
                    self.opt
                        .step_deferred_scaled(&grads, lr, self.max_grad_norm, s)?,
                )
            }
            Some(Scaler::Host(s)) => {
                // The CPU runs the step at once: nothing to defer.
                let opts = StepOptions {
                    grad_scale_inv: s.inv_scale(),
                    max_grad_norm: self.max_grad_norm,
                };
                let r = self.opt.step_deferred(&grads, lr, opts)?.wait()?;
                s.update(r.skipped);
                Report::Done(r)
            }
        };
        self.step += 1;
        Ok(PendingStep { loss, report, lr })
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
