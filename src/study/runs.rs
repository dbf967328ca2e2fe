//! The study's training runs: what is trained on ([`Workload`]: the demo's task pair or a
//! real checkpoint's text), one LoRA or full fine-tuning run ([`run_one`]), and the
//! matrices the analyses read from a trained model ([`Taken`]).

use super::linalg::Matrix;
use crate::data::{Task, TaskGen};
use crate::lora::{LoraConfig, LoraTarget};
use crate::model::{ForwardOptions, Gpt2};
use crate::text::{BatchCursor, TextData};
use crate::train::{TrainConfig, Trainer};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One of the attention matrices of the paper's §7: `Wq`, `Wk`, `Wv` (the q/k/v thirds of
/// `c_attn`) and `Wo` (`attn.c_proj`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Wt {
    /// The query projection.
    Q,
    /// The key projection.
    K,
    /// The value projection.
    V,
    /// The attention output projection.
    O,
}

impl Wt {
    /// The paper's name (`Wq`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Wt::Q => "Wq",
            Wt::K => "Wk",
            Wt::V => "Wv",
            Wt::O => "Wo",
        }
    }

    /// The lorafuse target.
    pub fn target(self) -> LoraTarget {
        match self {
            Wt::Q => LoraTarget::CAttnQ,
            Wt::K => LoraTarget::CAttnK,
            Wt::V => LoraTarget::CAttnV,
            Wt::O => LoraTarget::AttnCProj,
        }
    }

    /// The matrix `[C, C]` in a block's weights (`[out, in]`): rows of `c_attn`'s third,
    /// or `attn.c_proj`.
    pub fn weight(self, model: &Gpt2, layer: usize) -> Result<Matrix> {
        let b = &model.blocks[layer];
        let c = model.config.n_embd;
        let (w, rows) = match self {
            Wt::O => (&b.attn_c_proj.weight, 0..c),
            _ => {
                let (cols, _) = self.target().columns(3 * c);
                (&b.c_attn.weight, cols)
            }
        };
        let all = w.to_vec_f64()?;
        Matrix::new(rows.len(), c, all[rows.start * c..rows.end * c].to_vec())
    }
}

/// A set of matrices' display name: `Wq+Wv`, or `all four`.
pub fn targets_name(t: &[Wt]) -> String {
    if t.len() == 4 {
        return "Wq,Wk,Wv,Wo".into();
    }
    t.iter().map(|w| w.name()).collect::<Vec<_>>().join("+")
}

/// What a study trains on.
pub enum Workload {
    /// The demo's pair: a model pretrained on task A, adapted on task B.
    Demo {
        /// Input symbols per sequence.
        k: usize,
        /// Held-out sequences for the loss and the exact match.
        heldout: usize,
    },
    /// A real checkpoint's text: training and held-out sequences.
    Text {
        /// The packed data.
        data: TextData,
    },
}

/// One training batch: `(tokens, targets, batch, seq)`.
pub type StudyBatch = (Vec<u32>, Vec<i32>, usize, usize);

/// A stream of training batches.
pub type BatchStream<'a> = Box<dyn FnMut() -> Result<StudyBatch> + 'a>;

impl Workload {
    /// A stream of training batches for the run of `seed` (the demo: task B's stream;
    /// text: a shuffled cursor), `(tokens, targets, batch, seq)`.
    pub fn batches(&self, batch: usize, seed: u64) -> Result<BatchStream<'_>> {
        Ok(match self {
            Workload::Demo { k, .. } => {
                let mut r#gen = TaskGen::new(Task::B, *k, 1000 + seed)?;
                Box::new(move || {
                    let b = r#gen.sample_batch(batch);
                    Ok((b.tokens, b.targets, b.batch, b.seq))
                })
            }
            Workload::Text { data } => {
                let mut cursor = BatchCursor::new(data.train.len(), batch, seed)?;
                Box::new(move || {
                    let b = cursor.next_batch(&data.train)?;
                    Ok((b.tokens, b.targets, b.batch, b.seq))
                })
            }
        })
    }

    /// Held-out loss (mean per target token) and the task metric: exact match on the demo,
    /// perplexity on text.
    pub fn evaluate(&self, model: &Gpt2) -> Result<(f64, f64)> {
        match self {
            Workload::Demo { k, heldout } => {
                let r#gen = TaskGen::new(Task::B, *k, 0)?;
                let held = r#gen.heldout(*heldout, 0x3E26);
                let loss = model
                    .loss(
                        &held.tokens,
                        &held.targets,
                        held.batch,
                        held.seq,
                        ForwardOptions::default(),
                    )?
                    .to_vec_f64()?[0];
                Ok((loss, crate::demo::accuracy(model, &r#gen, *heldout)?))
            }
            Workload::Text { data } => {
                let (loss, _) = crate::train::mean_loss(model, &data.val, 8)?;
                Ok((loss, loss.exp()))
            }
        }
    }

    /// The task metric's name.
    pub fn metric_name(&self) -> &'static str {
        match self {
            Workload::Demo { .. } => "exact match",
            Workload::Text { .. } => "perplexity",
        }
    }
}

/// One run: LoRA on `targets` at rank `r`, or full fine-tuning (`targets` empty).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunSpec {
    /// The adapted matrices (empty: full fine-tuning).
    pub targets: Vec<Wt>,
    /// The rank (0 for full fine-tuning).
    pub r: usize,
}

impl RunSpec {
    /// A short file-safe name: `wq-wv-r8`, `full-ft`.
    pub fn slug(&self) -> String {
        if self.targets.is_empty() {
            return "full-ft".into();
        }
        let t: Vec<String> = self
            .targets
            .iter()
            .map(|w| w.name().to_lowercase())
            .collect();
        format!("{}-r{}", t.join("-"), self.r)
    }
}

/// What the analyses keep of a trained model: at the analysis layer, each adapted
/// matrix's `A [r, C]`, `B [C, r]` and scale (LoRA), or each attention matrix as trained
/// (full fine-tuning).
#[derive(Clone, Debug, Default)]
pub struct Taken {
    /// LoRA factors by matrix: `(A, B, α/r)`.
    pub lora: BTreeMap<Wt, (Matrix, Matrix, f64)>,
    /// Fine-tuned weights by matrix (full fine-tuning).
    pub full: BTreeMap<Wt, Matrix>,
}

impl Taken {
    /// `ΔW = (α/r)·B·A` of `w`.
    pub fn delta(&self, w: Wt) -> Result<Matrix> {
        let (a, b, s) = self
            .lora
            .get(&w)
            .ok_or_else(|| Error::invalid(format!("{} was not adapted", w.name())))?;
        Ok(b.matmul(a)?.scaled(*s))
    }
}

/// What one run measured, and the model it trained.
pub struct RunOutcome {
    /// Held-out loss.
    pub loss: f64,
    /// The task metric.
    pub metric: f64,
    /// Trainable parameters.
    pub trainable: usize,
    /// The analysis layer's matrices.
    pub taken: Taken,
    /// The trained model (adapters attached and unmerged, or fully fine-tuned).
    pub model: Gpt2,
}

/// Hyper-parameters shared by every run.
#[derive(Clone, Debug)]
pub struct RunParams {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// LoRA's peak learning rate.
    pub lr_lora: f64,
    /// Full fine-tuning's.
    pub lr_full: f64,
    /// LoRA's α (the scale is α/r).
    pub alpha: f64,
    /// The layer the analyses read.
    pub layer: usize,
}

/// Trains `spec` from `base` with `seed` (A's initialisation and the batch order).
pub fn run_one(
    base: &Gpt2,
    work: &Workload,
    spec: &RunSpec,
    p: &RunParams,
    seed: u64,
) -> Result<RunOutcome> {
    let mut model = base.deep_clone()?;
    let full = spec.targets.is_empty();
    if full {
        model.set_full_finetune(true);
    } else {
        let cfg = LoraConfig {
            r: spec.r,
            alpha: p.alpha,
            targets: spec.targets.iter().map(|w| w.target()).collect(),
            ..Default::default()
        };
        model.attach_lora(&cfg, 2000 + seed)?;
    }
    let trainable = model.trainable_param_count();
    let lr = if full { p.lr_full } else { p.lr_lora };
    let tcfg = TrainConfig {
        lr,
        min_lr: lr / 10.0,
        warmup_steps: p.steps / 20,
        total_steps: p.steps,
        seed,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, &tcfg)?;
    let mut next = work.batches(p.batch, seed)?;
    for _ in 0..p.steps {
        let (tokens, targets, b, s) = next()?;
        trainer.step(&tokens, &targets, b, s)?;
    }
    drop(next);
    let model = trainer.model;
    let (loss, metric) = work.evaluate(&model)?;
    let mut taken = Taken::default();
    if full {
        for w in [Wt::Q, Wt::K, Wt::V, Wt::O] {
            taken.full.insert(w, w.weight(&model, p.layer)?);
        }
    } else {
        let blk = &model.blocks[p.layer];
        for w in &spec.targets {
            let lin = if *w == Wt::O {
                &blk.attn_c_proj
            } else {
                &blk.c_attn
            };
            let (_, suffix) = w.target().columns(3);
            let ad = lin
                .adapters
                .iter()
                .find(|a| a.suffix == suffix)
                .ok_or_else(|| Error::invalid(format!("no adapter on {}", w.name())))?;
            let (r, inp) = (ad.a.dims()[0], ad.a.dims()[1]);
            let a = Matrix::new(r, inp, ad.a.to_vec_f64()?)?;
            let b = Matrix::new(ad.b.dims()[0], r, ad.b.to_vec_f64()?)?;
            taken.lora.insert(*w, (a, b, ad.scale));
        }
    }
    Ok(RunOutcome {
        loss,
        metric,
        trainable,
        taken,
        model,
    })
}
