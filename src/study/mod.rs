//! `lorafuse study`: the LoRA paper's §7 analyses (Hu et al. 2021, arXiv 2106.09685) and
//! the intruder dimensions of Shuttleworth et al. 2024 (arXiv 2410.21228), run on lorafuse
//! itself.
//!
//! [`run_study`] trains every configuration of the paper's Tables 5 and 6 (plus full
//! fine-tuning) for several seeds from one base model, then computes:
//! - **which weights** (Table 5) and **which rank** (Table 6): held-out loss and the task
//!   metric, mean ± std over seeds;
//! - **subspace similarity** (§7.2, Eq. 4) `φ(A1, A2, i, j) = ‖U_{A1}^{i⊤}U_{A2}^{j}‖²_F /
//!   min(i, j)`, `U_A` the right singular vectors of the learned `A` (Figs. 3, 4 and 8, a
//!   random-Gaussian control, and the paper's claim that the top direction is shared);
//! - **ΔW vs W** (§7.3, Table 7): `‖UᵀWVᵀ‖_F` for `U, V` from `ΔW`, from `W` and from a
//!   random matrix, and the amplification factor `‖ΔW‖_F / ‖UᵀWVᵀ‖_F`;
//! - **intruder dimensions**: top-`k` left singular vectors of `W0 + ΔW` whose largest
//!   `|cos|` with every singular vector of `W0` is below `ε`, LoRA vs full fine-tuning;
//! - **headline claims**: trainable fractions of GPT-2/GPT-3 shapes, the peak bytes of a
//!   real training step (CPU and simulator), inference latency base/merged/unmerged.
//!
//! [`write_report`] writes `report.md`, one CSV per table, `report.json` (every number
//! but the timings, bit-identical for a seed), `timings.json`, the PNG heatmaps, the base
//! model and every trained adapter (PEFT format).

pub mod linalg;
mod plot;
mod report;
pub mod runs;

pub use report::{report_markdown, tables_markdown, write_report};
pub use runs::{RunSpec, Workload, Wt};

use crate::device::CountingAllocator;
use crate::lora::LoraConfig;
use crate::model::{ForwardOptions, Gpt2};
use crate::train::{TrainConfig, Trainer};
use crate::{Device, Result};
use indicatif::{ProgressBar, ProgressStyle};
use linalg::{Amplification, Matrix, amplification, intruder_count, phi_grid, phi_grid_of_bases};
use runs::{RunParams, Taken, run_one};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// How a study runs.
#[derive(Clone, Debug)]
pub struct StudyConfig {
    /// Seeds per configuration (the seeds are `seed .. seed + seeds`).
    pub seeds: usize,
    /// The first seed.
    pub seed: u64,
    /// Optimizer steps of each fine-tuning run.
    pub steps: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// LoRA's peak learning rate.
    pub lr_lora: f64,
    /// Full fine-tuning's peak learning rate.
    pub lr_full: f64,
    /// LoRA's α, fixed across ranks as in the paper (the scale is α/r).
    pub alpha: f64,
    /// Table 5's budget: the rank of a single adapted matrix (8; two matrices get r/2,
    /// four r/4).
    pub budget_rank: usize,
    /// Table 6's ranks (the paper's 1, 2, 4, 8, 64); the largest is Figs. 3–4's `r = 64`.
    pub ranks: Vec<usize>,
    /// The layer whose matrices the analyses read (`None`: the middle one, `n_layer / 2`).
    pub layer: Option<usize>,
    /// Intruder threshold ε.
    pub epsilon: f64,
    /// Intruder dimensions: how many top singular vectors are examined.
    pub top_k: usize,
    /// Measure the headline table's peak bytes and latency (not bit-reproducible across
    /// processes that share the device counters, so tests turn it off).
    pub measure: bool,
    /// Also measure a step's peak bytes on the simulator (batch 4).
    pub measure_sim: bool,
    /// Show a progress bar over the runs.
    pub progress: bool,
}

impl Default for StudyConfig {
    fn default() -> Self {
        StudyConfig {
            seeds: 3,
            seed: 0,
            steps: 120,
            batch: 32,
            lr_lora: 3e-3,
            lr_full: 1e-3,
            alpha: 8.0,
            budget_rank: 8,
            ranks: vec![1, 2, 4, 8, 64],
            layer: None,
            epsilon: 0.5,
            top_k: 10,
            measure: true,
            measure_sim: true,
            progress: true,
        }
    }
}

/// Mean ± sample standard deviation over seeds, and the values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// The mean.
    pub mean: f64,
    /// The sample standard deviation (0 for one value).
    pub std: f64,
    /// One value per seed, in seed order.
    pub values: Vec<f64>,
}

impl Stat {
    /// The statistics of `values`.
    pub fn of(values: Vec<f64>) -> Stat {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = if values.len() > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Stat { mean, std, values }
    }
}

/// One configuration of Tables 5/6.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigRow {
    /// The adapted matrices (`Wq+Wv`).
    pub weights: String,
    /// The rank.
    pub r: usize,
    /// Trainable parameters.
    pub trainable: usize,
    /// Held-out loss.
    pub loss: Stat,
    /// The task metric.
    pub metric: Stat,
    /// Where its adapters are saved (relative to the report), per seed.
    pub adapters: Vec<String>,
}

/// A φ grid: `values[i-1][j-1]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heat {
    /// File stem of the PNG and CSV.
    pub name: String,
    /// What it shows.
    pub title: String,
    /// Row axis label (`i`).
    pub row_label: String,
    /// Column axis label (`j`).
    pub col_label: String,
    /// The grid.
    pub values: Vec<Vec<f64>>,
}

/// One checked claim.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// The matrix (`Wq`, `Wv`).
    pub matrix: String,
    /// `φ(A_small, A_large, 1, 1)` per seed.
    pub top: Stat,
    /// Mean over `i = 2..=r_small` of `|⟨u_i, u'_i⟩|²` (the i-th directions of the two runs).
    pub rest: Stat,
    /// The random expectation of both at this width, `1/d`.
    pub random: f64,
    /// True when the top direction is shared (`top.mean > 0.5`) and the rest are not
    /// (`rest.mean < 0.5`).
    pub holds: bool,
}

/// One cell of the random-Gaussian control.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandomCell {
    /// `i`.
    pub i: usize,
    /// `j`.
    pub j: usize,
    /// φ of two random Gaussian `A`s.
    pub phi: f64,
    /// Its expectation `max(i, j)/d`.
    pub expected: f64,
}

/// Table 7 for one matrix at one rank, mean ± std over seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Table7Col {
    /// The matrix.
    pub matrix: String,
    /// The rank.
    pub r: usize,
    /// `‖UᵀWVᵀ‖_F`, U, V of ΔW.
    pub proj_delta: Stat,
    /// ... of W.
    pub proj_w: Stat,
    /// ... of a random matrix.
    pub proj_random: Stat,
    /// `‖W‖_F`.
    pub w_norm: f64,
    /// `‖ΔW‖_F`.
    pub delta_norm: Stat,
    /// `‖ΔW‖_F / ‖UᵀWVᵀ‖_F`.
    pub factor: Stat,
    /// The sanity identity's right side: `√(Σ_{i≤r} σᵢ²(W))`.
    pub identity_w: f64,
    /// `‖W‖_F·r/√(d·k)`, the random row's expectation.
    pub identity_random: f64,
}

/// Intruder dimensions of one method on one matrix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntruderRow {
    /// `LoRA r=8` or `full FT`.
    pub method: String,
    /// The matrix.
    pub matrix: String,
    /// The count per seed.
    pub count: Stat,
}

/// Trainable fraction of one model shape, LoRA r = 4 on q, v.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FractionRow {
    /// The model.
    pub model: String,
    /// All parameters.
    pub total: u64,
    /// LoRA's (r = 4 on Wq, Wv).
    pub lora: u64,
    /// `lora / total`.
    pub fraction: f64,
    /// How it was obtained: `shapes` (the formula) or `lorafuse` (counted on a model).
    pub source: String,
}

/// The peak bytes of one training step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryRow {
    /// The device.
    pub device: String,
    /// Sequences in the step's batch.
    pub batch: usize,
    /// LoRA (r = 4 on Wq, Wv): peak bytes (model, optimizer state and activations).
    pub lora_peak: u64,
    /// Full fine-tuning's.
    pub full_peak: u64,
}

/// Inference latency (not in `report.json`: timings differ run to run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Sequences × tokens of the forward pass.
    pub shape: String,
    /// Median milliseconds: base model.
    pub base_ms: f64,
    /// Adapters merged into the weights.
    pub merged_ms: f64,
    /// Adapters beside the weights (unmerged).
    pub unmerged_ms: f64,
    /// Repetitions of each.
    pub reps: usize,
}

/// What was trained on, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// `demo` or the model directory.
    pub workload: String,
    /// `d_model`, layers, heads, vocabulary.
    pub model: String,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// Fine-tuning steps per run.
    pub steps: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// LoRA and full fine-tuning learning rates.
    pub lr_lora: f64,
    /// Full fine-tuning's learning rate.
    pub lr_full: f64,
    /// LoRA's α.
    pub alpha: f64,
    /// The analysis layer.
    pub layer: usize,
    /// `d` (the attention matrices are `d × d`).
    pub d: usize,
    /// The task metric's name.
    pub metric: String,
    /// The base model's held-out loss and metric on the fine-tuning task.
    pub base_loss: f64,
    /// ... and metric.
    pub base_metric: f64,
    /// ε.
    pub epsilon: f64,
    /// k.
    pub top_k: usize,
    /// Runs trained.
    pub runs: usize,
}

/// Everything [`run_study`] found (`report.json`, without [`StudyReport::latency`] and
/// [`StudyReport::wall_s`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StudyReport {
    /// The setup.
    pub setup: Setup,
    /// Table 5.
    pub table5: Vec<ConfigRow>,
    /// Table 6.
    pub table6: Vec<ConfigRow>,
    /// Full fine-tuning, for reference.
    pub full_ft: ConfigRow,
    /// Fig. 3: r_small vs r_large, ΔWq and ΔWv.
    pub fig3: Vec<Heat>,
    /// Fig. 4: two r_large seeds.
    pub fig4: Vec<Heat>,
    /// The random control.
    pub random: Heat,
    /// Some of its cells beside `max(i, j)/d`.
    pub random_cells: Vec<RandomCell>,
    /// Fig. 8: W's singular directions vs ΔW's.
    pub fig8: Vec<Heat>,
    /// The top-direction claim.
    pub claims: Vec<Claim>,
    /// Table 7.
    pub table7: Vec<Table7Col>,
    /// Intruder dimensions.
    pub intruders: Vec<IntruderRow>,
    /// Trainable fractions.
    pub fractions: Vec<FractionRow>,
    /// Peak bytes of a step (when measured).
    pub memory: Vec<MemoryRow>,
    /// Inference latency (when measured; kept out of `report.json`).
    #[serde(skip)]
    pub latency: Option<Latency>,
    /// Wall time (kept out of `report.json`).
    #[serde(skip)]
    pub wall_s: f64,
}

/// GPT-2's parameter count from its shapes (tied LM head):
/// `V·d + P·d + L·(12d² + 13d) + 2d`.
pub fn gpt2_params(vocab: u64, positions: u64, d: u64, layers: u64) -> u64 {
    vocab * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d
}

/// LoRA's parameters at rank `r` on Wq and Wv of every layer: `L · 2 · 2rd`.
pub fn lora_qv_params(d: u64, layers: u64, r: u64) -> u64 {
    layers * 2 * 2 * r * d
}

fn fractions(base: &Gpt2, alpha: f64) -> Result<Vec<FractionRow>> {
    let mut rows: Vec<FractionRow> = [
        ("GPT-2 small", 768u64, 12u64, 1024u64),
        ("GPT-2 medium", 1024, 24, 1024),
        ("GPT-2 large", 1280, 36, 1024),
        ("GPT-2 XL", 1600, 48, 1024),
        ("GPT-3 175B", 12288, 96, 2048),
    ]
    .into_iter()
    .map(|(name, d, l, p)| {
        let (total, lora) = (gpt2_params(50257, p, d, l), lora_qv_params(d, l, 4));
        FractionRow {
            model: name.into(),
            total,
            lora,
            fraction: lora as f64 / total as f64,
            source: "shapes".into(),
        }
    })
    .collect();
    // The study's own model, counted by lorafuse.
    let mut m = base.deep_clone()?;
    let total = m.param_count() as u64;
    m.attach_lora(&qv_config(4, alpha), 0)?;
    let lora = m.trainable_param_count() as u64;
    let c = &base.config;
    rows.push(FractionRow {
        model: format!("this study's model (d {}, {} layers)", c.n_embd, c.n_layer),
        total,
        lora,
        fraction: lora as f64 / total as f64,
        source: "lorafuse".into(),
    });
    Ok(rows)
}

fn qv_config(r: usize, alpha: f64) -> LoraConfig {
    LoraConfig {
        r,
        alpha,
        targets: vec![Wt::Q.target(), Wt::V.target()],
        ..Default::default()
    }
}

/// Peak bytes of one training step on `device` (the model, AdamW's state and the step's
/// activations), LoRA r = 4 on q, v and full fine-tuning.
fn step_peaks(
    base: &Gpt2,
    work: &Workload,
    device: &Device,
    batch: usize,
    alpha: f64,
) -> Result<(u64, u64)> {
    let mut peaks = [0u64; 2];
    for (i, lora) in [true, false].into_iter().enumerate() {
        // Buffers pooled by earlier work would serve the step without raising the peak.
        crate::Tensor::release_host_pool();
        device.reset_peak_memory();
        let before = device.memory_stats().in_use_bytes;
        let params = base
            .named_params()
            .into_iter()
            // A copy on every device (`to_device` to the same device would share the
            // storage): the step's peak counts its weights, and full fine-tuning leaves
            // `base` as it was.
            .map(|(n, t)| {
                let copy = if t.device() == *device {
                    t.deep_clone()?
                } else {
                    t.to_device(device)?
                };
                Ok((n, copy))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut model = Gpt2::from_params(&base.config, params)?;
        if lora {
            model.attach_lora(&qv_config(4, alpha), 0)?;
        } else {
            model.set_full_finetune(true);
        }
        let mut t = Trainer::new(
            model,
            &TrainConfig {
                total_steps: 2,
                warmup_steps: 0,
                ..Default::default()
            },
        )?;
        let mut next = work.batches(batch, 0)?;
        let (tokens, targets, b, s) = next()?;
        t.step(&tokens, &targets, b, s)?;
        peaks[i] = if *device != Device::Cpu || CountingAllocator::installed() {
            device.memory_stats().peak_bytes.saturating_sub(before)
        } else {
            // No counted heap (a program that did not install the allocator): the weights
            // and AdamW's state, without the activations.
            let weights: usize = t
                .model
                .named_params()
                .iter()
                .chain(t.model.lora_params().iter())
                .map(|(_, p)| p.elem_count() * 4)
                .sum();
            (weights + t.optimizer().state_bytes()) as u64
        };
    }
    Ok((peaks[0], peaks[1]))
}

fn latency(base: &Gpt2, lora: &Gpt2, work: &Workload) -> Result<Latency> {
    let mut next = work.batches(64, 0)?;
    let (tokens, _, b, s) = next()?;
    let reps = 15;
    let time = |m: &Gpt2| -> Result<f64> {
        let mut ts = Vec::with_capacity(reps);
        m.forward(&tokens, b, s, ForwardOptions::default())?; // warm the pool
        for _ in 0..reps {
            let t0 = Instant::now();
            m.forward(&tokens, b, s, ForwardOptions::default())?;
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        ts.sort_by(f64::total_cmp);
        Ok(ts[reps / 2])
    };
    let base_ms = time(base)?;
    let unmerged_ms = time(lora)?;
    let mut merged = lora.deep_clone()?;
    merged.merge_lora()?;
    let merged_ms = time(&merged)?;
    Ok(Latency {
        shape: format!("{b} × {s} tokens"),
        base_ms,
        merged_ms,
        unmerged_ms,
        reps,
    })
}

/// The Table 5 and 6 configurations and the extra runs the figures need, in run order.
pub fn study_specs(cfg: &StudyConfig) -> (Vec<RunSpec>, Vec<RunSpec>, Vec<RunSpec>) {
    use Wt::*;
    let b = cfg.budget_rank;
    let spec = |t: &[Wt], r: usize| RunSpec {
        targets: t.to_vec(),
        r: r.max(1),
    };
    let t5: Vec<RunSpec> = vec![
        spec(&[Q], b),
        spec(&[K], b),
        spec(&[V], b),
        spec(&[O], b),
        spec(&[Q, K], b / 2),
        spec(&[Q, V], b / 2),
        spec(&[Q, K, V, O], b / 4),
    ];
    let mut t6 = Vec::new();
    for t in [&[Q][..], &[Q, V], &[Q, K, V, O]] {
        for &r in &cfg.ranks {
            t6.push(spec(t, r));
        }
    }
    let mut all: Vec<RunSpec> = Vec::new();
    for s in t5.iter().chain(&t6) {
        if !all.contains(s) {
            all.push(s.clone());
        }
    }
    // The figures' and Table 7's runs, should the ranks leave them out.
    for r in [4, b, large_rank(cfg)] {
        let s = spec(&[Q, V], r);
        if !all.contains(&s) {
            all.push(s);
        }
    }
    all.push(RunSpec {
        targets: vec![],
        r: 0,
    });
    (t5, t6, all)
}

fn large_rank(cfg: &StudyConfig) -> usize {
    cfg.ranks.iter().copied().max().unwrap_or(cfg.budget_rank)
}

/// A trained run, as the analyses keep it.
struct Done {
    spec: RunSpec,
    seed: u64,
    loss: f64,
    metric: f64,
    trainable: usize,
    taken: Taken,
}

/// Runs the study on `work` from `base` (the model that is adapted: pretrained on task A
/// for the demo, the checkpoint otherwise). `save(spec, seed, model)` is called with each
/// trained model and returns where it was saved (relative to the report directory).
pub fn run_study(
    base: &Gpt2,
    work: &Workload,
    cfg: &StudyConfig,
    workload_name: &str,
    mut save: impl FnMut(&RunSpec, u64, &Gpt2) -> Result<String>,
) -> Result<StudyReport> {
    let t0 = Instant::now();
    let c = &base.config;
    let d = c.n_embd;
    let layer = cfg.layer.unwrap_or(c.n_layer / 2);
    let rl = large_rank(cfg);
    let rs = cfg.budget_rank;
    if layer >= c.n_layer || rl > d || cfg.top_k > d || cfg.seeds == 0 {
        return Err(crate::Error::invalid(format!(
            "study: layer {layer} of {}, rank {rl} and top-k {} of d {d}, {} seeds",
            c.n_layer, cfg.top_k, cfg.seeds
        )));
    }
    let params = RunParams {
        steps: cfg.steps,
        batch: cfg.batch,
        lr_lora: cfg.lr_lora,
        lr_full: cfg.lr_full,
        alpha: cfg.alpha,
        layer,
    };
    let (t5, t6, all) = study_specs(cfg);
    let seeds: Vec<u64> = (0..cfg.seeds as u64).map(|s| cfg.seed + s).collect();
    let bar = if cfg.progress {
        let bar = ProgressBar::new((all.len() * seeds.len()) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "study [{bar:30}] {pos}/{len} runs, {elapsed} elapsed, ETA {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let (base_loss, base_metric) = work.evaluate(base)?;
    let mut done: Vec<Done> = Vec::new();
    let mut saved: Vec<((RunSpec, u64), String)> = Vec::new();
    let mut lora_for_latency = None;
    for spec in &all {
        for &seed in &seeds {
            bar.set_message(format!("{} seed {seed}", spec.slug()));
            let out = run_one(base, work, spec, &params, seed)?;
            saved.push(((spec.clone(), seed), save(spec, seed, &out.model)?));
            if lora_for_latency.is_none() && spec.targets == [Wt::Q, Wt::V] {
                lora_for_latency = Some(out.model.deep_clone()?);
            }
            done.push(Done {
                spec: spec.clone(),
                seed,
                loss: out.loss,
                metric: out.metric,
                trainable: out.trainable,
                taken: out.taken,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let find = |spec: &RunSpec, seed: u64| -> &Done {
        done.iter()
            .find(|x| &x.spec == spec && x.seed == seed)
            .expect("every spec ran with every seed")
    };
    let row = |spec: &RunSpec| -> ConfigRow {
        let runs: Vec<&Done> = seeds.iter().map(|&s| find(spec, s)).collect();
        ConfigRow {
            weights: if spec.targets.is_empty() {
                "full fine-tuning".into()
            } else {
                runs::targets_name(&spec.targets)
            },
            r: spec.r,
            trainable: runs[0].trainable,
            loss: Stat::of(runs.iter().map(|x| x.loss).collect()),
            metric: Stat::of(runs.iter().map(|x| x.metric).collect()),
            adapters: seeds
                .iter()
                .map(|&s| {
                    saved
                        .iter()
                        .find(|(k, _)| k.0 == *spec && k.1 == s)
                        .map(|(_, p)| p.clone())
                        .unwrap_or_default()
                })
                .collect(),
        }
    };
    let table5: Vec<ConfigRow> = t5.iter().map(&row).collect();
    let table6: Vec<ConfigRow> = t6.iter().map(&row).collect();
    let full_spec = RunSpec {
        targets: vec![],
        r: 0,
    };
    let full_ft = row(&full_spec);
    let qv = |r: usize| RunSpec {
        targets: vec![Wt::Q, Wt::V],
        r,
    };
    let a_of =
        |spec: &RunSpec, seed: u64, w: Wt| -> Matrix { find(spec, seed).taken.lora[&w].0.clone() };

    // §7.2: subspace similarity.
    let mut fig3 = Vec::new();
    let mut fig4 = Vec::new();
    let mut fig8 = Vec::new();
    let mut claims = Vec::new();
    for w in [Wt::Q, Wt::V] {
        let n = w.name();
        fig3.push(Heat {
            name: format!("fig3_{}", n.to_lowercase()),
            title: format!(
                "φ(A_r={rs}, A_r={rl}, i, j), Δ{n}, layer {layer}, seed {}",
                seeds[0]
            ),
            row_label: format!("i (r = {rs})"),
            col_label: format!("j (r = {rl})"),
            values: phi_grid(
                &a_of(&qv(rs), seeds[0], w),
                &a_of(&qv(rl), seeds[0], w),
                rs,
                rl,
            )?,
        });
        if seeds.len() >= 2 {
            fig4.push(Heat {
                name: format!("fig4_{}", n.to_lowercase()),
                title: format!(
                    "φ(A_r={rl} seed {}, A'_r={rl} seed {}, i, j), Δ{n}, layer {layer}",
                    seeds[0], seeds[1]
                ),
                row_label: format!("i (seed {})", seeds[0]),
                col_label: format!("j (seed {})", seeds[1]),
                values: phi_grid(
                    &a_of(&qv(rl), seeds[0], w),
                    &a_of(&qv(rl), seeds[1], w),
                    rl,
                    rl,
                )?,
            });
        }
        let mut top = Vec::new();
        let mut rest = Vec::new();
        for &s in &seeds {
            let u1 = linalg::right_singular_rows(&a_of(&qv(rs), s, w), rs)?;
            let u2 = linalg::right_singular_rows(&a_of(&qv(rl), s, w), rl)?;
            let g = phi_grid_of_bases(&u1, &u2)?;
            top.push(g[0][0]);
            let overlap = |i: usize| -> f64 {
                u1.row(i)
                    .iter()
                    .zip(u2.row(i))
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    .powi(2)
            };
            rest.push(if rs > 1 {
                (1..rs).map(overlap).sum::<f64>() / (rs - 1) as f64
            } else {
                0.0
            });
        }
        let (top, rest) = (Stat::of(top), Stat::of(rest));
        claims.push(Claim {
            matrix: n.into(),
            holds: top.mean > 0.5 && rest.mean < 0.5,
            top,
            rest,
            random: 1.0 / d as f64,
        });
        if w == Wt::Q {
            let wq = w.weight(base, layer)?;
            for r in [rs, rl] {
                let dw = find(&qv(r), seeds[0]).taken.delta(w)?;
                let uw = linalg::right_singular_rows(&wq, d)?;
                let ud = linalg::right_singular_rows(&dw, r)?;
                // Rows: ΔWq's top-j directions; columns: Wq's top-i.
                fig8.push(Heat {
                    name: format!("fig8_wq_r{r}"),
                    title: format!(
                        "φ(ΔWq r={r}, Wq, j, i): right singular directions, layer {layer}"
                    ),
                    row_label: format!("j (ΔWq, r = {r})"),
                    col_label: "i (Wq)".into(),
                    values: phi_grid_of_bases(&ud, &uw)?,
                });
            }
        }
    }
    let g1 = Matrix::gaussian(rl, d, 0xA11CE + cfg.seed);
    let g2 = Matrix::gaussian(rl, d, 0xB0B + cfg.seed);
    let rv = phi_grid(&g1, &g2, rl, rl)?;
    let mut random_cells = Vec::new();
    for (i, j) in [(1, 1), (1, rs), (rs, rs), (rs, rl), (rl, rl)] {
        if i <= rl
            && j <= rl
            && !random_cells
                .iter()
                .any(|c: &RandomCell| c.i == i && c.j == j)
        {
            random_cells.push(RandomCell {
                i,
                j,
                phi: rv[i - 1][j - 1],
                expected: i.max(j) as f64 / d as f64,
            });
        }
    }
    let random = Heat {
        name: "fig4_random".into(),
        title: format!("φ of two random Gaussian {rl}×{d} A's (expected max(i, j)/{d})"),
        row_label: "i".into(),
        col_label: "j".into(),
        values: rv,
    };

    // §7.3: ΔW vs W.
    let mut table7 = Vec::new();
    for w in [Wt::Q, Wt::V] {
        let wm = w.weight(base, layer)?;
        let sv = linalg::svd(&wm)?.s;
        for r in [4.min(d), rl] {
            let amps: Vec<Amplification> = seeds
                .iter()
                .map(|&s| amplification(&wm, &find(&qv(r), s).taken.delta(w)?, r, 0x7AB7 + s))
                .collect::<Result<_>>()?;
            let st = |f: fn(&Amplification) -> f64| Stat::of(amps.iter().map(f).collect());
            table7.push(Table7Col {
                matrix: w.name().into(),
                r,
                proj_delta: st(|a| a.proj_delta),
                proj_w: st(|a| a.proj_w),
                proj_random: st(|a| a.proj_random),
                w_norm: amps[0].w_norm,
                delta_norm: st(|a| a.delta_norm),
                factor: st(|a| a.factor),
                identity_w: sv[..r].iter().map(|x| x * x).sum::<f64>().sqrt(),
                identity_random: amps[0].w_norm * r as f64 / ((wm.rows * wm.cols) as f64).sqrt(),
            });
        }
    }

    // Intruder dimensions.
    let mut intruders = Vec::new();
    let mut lora_ranks: Vec<usize> = cfg.ranks.clone();
    for r in [4, rs, rl] {
        if !lora_ranks.contains(&r) {
            lora_ranks.push(r);
        }
    }
    lora_ranks.sort();
    for w in [Wt::Q, Wt::V] {
        let w0 = w.weight(base, layer)?;
        for &r in &lora_ranks {
            let counts = seeds
                .iter()
                .map(|&s| {
                    let wt = w0.add(&find(&qv(r), s).taken.delta(w)?)?;
                    Ok(intruder_count(&w0, &wt, cfg.top_k, cfg.epsilon)? as f64)
                })
                .collect::<Result<Vec<_>>>()?;
            intruders.push(IntruderRow {
                method: format!("LoRA r={r}"),
                matrix: w.name().into(),
                count: Stat::of(counts),
            });
        }
        let counts = seeds
            .iter()
            .map(|&s| {
                Ok(intruder_count(
                    &w0,
                    &find(&full_spec, s).taken.full[&w],
                    cfg.top_k,
                    cfg.epsilon,
                )? as f64)
            })
            .collect::<Result<Vec<_>>>()?;
        intruders.push(IntruderRow {
            method: "full FT".into(),
            matrix: w.name().into(),
            count: Stat::of(counts),
        });
    }

    // Headline claims.
    let fractions = fractions(base, cfg.alpha)?;
    let mut memory = Vec::new();
    let mut lat = None;
    if cfg.measure {
        let (l, f) = step_peaks(base, work, &Device::Cpu, cfg.batch, cfg.alpha)?;
        memory.push(MemoryRow {
            device: if CountingAllocator::installed() {
                "cpu (the heap's peak, by the counting allocator)".into()
            } else {
                "cpu (weights + AdamW state only: the heap is not counted in this program)".into()
            },
            batch: cfg.batch,
            lora_peak: l,
            full_peak: f,
        });
        if cfg.measure_sim && Device::Sim.unavailable_reason().is_none() {
            let (l, f) = step_peaks(base, work, &Device::Sim, 4, cfg.alpha)?;
            memory.push(MemoryRow {
                device: "sim".into(),
                batch: 4,
                lora_peak: l,
                full_peak: f,
            });
        }
        if let Some(m) = &lora_for_latency {
            lat = Some(latency(base, m, work)?);
        }
    }
    Ok(StudyReport {
        setup: Setup {
            workload: workload_name.into(),
            model: format!(
                "d_model {d}, {} layers, {} heads, vocab {}, context {}",
                c.n_layer, c.n_head, c.vocab_size, c.n_positions
            ),
            seeds,
            steps: cfg.steps,
            batch: cfg.batch,
            lr_lora: cfg.lr_lora,
            lr_full: cfg.lr_full,
            alpha: cfg.alpha,
            layer,
            d,
            metric: work.metric_name().into(),
            base_loss,
            base_metric,
            epsilon: cfg.epsilon,
            top_k: cfg.top_k,
            runs: done.len(),
        },
        table5,
        table6,
        full_ft,
        fig3,
        fig4,
        random,
        random_cells,
        fig8,
        claims,
        table7,
        intruders,
        fractions,
        memory,
        latency: lat,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests;
