//! A run's hyper-parameters as JSON, and the comparison of two sets of them (a resumed
//! run refuses changed hyper-parameters unless told otherwise; this says which changed).

use super::TrainConfig;
use crate::lora::LoraInit;
use crate::model::Gpt2;
use crate::optim::Rounding;
use serde_json::{Value, json};
use std::fmt;

/// The hyper-parameters of training `model` with `cfg`, as a JSON object:
///
/// ```text
/// { "lr", "min_lr", "warmup_steps", "total_steps", "max_grad_norm" (null: no clipping),
///   "seed", "grad_accum",
///   "adamw": { "beta1", "beta2", "eps", "weight_decay",
///              "rounding": "nearest_even" | { "stochastic": seed } },
///   "dtype": "f32" | "bf16" | ...,
///   "model": { "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon" },
///   "full_finetune": bool,
///   "lora": null | { "r", "alpha", "use_rslora", "init", "dropout", "targets": [..] } }
/// ```
///
/// [`Trainer::save_checkpoint`](super::Trainer::save_checkpoint) records it in
/// `trainer_state.json`; [`diff_hyper_params`] compares two of them.
pub fn hyper_params(model: &Gpt2, cfg: &TrainConfig) -> Value {
    let a = &cfg.adamw;
    let rounding = match a.rounding {
        Rounding::NearestEven => json!("nearest_even"),
        Rounding::Stochastic { seed } => json!({ "stochastic": seed }),
    };
    let lora = model.lora_config().map(|l| {
        json!({
            "r": l.r,
            "alpha": l.alpha,
            "use_rslora": l.use_rslora,
            "init": match l.init {
                LoraInit::KaimingUniform => "kaiming_uniform",
                LoraInit::Gaussian => "gaussian",
            },
            "dropout": l.dropout,
            "targets": l.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        })
    });
    let m = &model.config;
    json!({
        "lr": cfg.lr,
        "min_lr": cfg.min_lr,
        "warmup_steps": cfg.warmup_steps,
        "total_steps": cfg.total_steps,
        "max_grad_norm": cfg.max_grad_norm,
        "seed": cfg.seed,
        "grad_accum": cfg.grad_accum,
        "adamw": {
            "beta1": a.beta1,
            "beta2": a.beta2,
            "eps": a.eps,
            "weight_decay": a.weight_decay,
            "rounding": rounding,
        },
        "dtype": model.dtype().as_str(),
        "model": {
            "vocab_size": m.vocab_size,
            "n_positions": m.n_positions,
            "n_embd": m.n_embd,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "layer_norm_epsilon": m.layer_norm_epsilon,
        },
        "full_finetune": model.is_full_finetune(),
        "lora": lora,
    })
}

/// One hyper-parameter that differs between a saved run and a new one.
#[derive(Clone, Debug, PartialEq)]
pub struct HyperParamChange {
    /// The key, nested objects joined with dots (`adamw.beta1`).
    pub key: String,
    /// The saved value (`None`: the key is new).
    pub old: Option<Value>,
    /// The new value (`None`: the key is gone).
    pub new: Option<Value>,
}

impl fmt::Display for HyperParamChange {
    /// `key: old → new`, with `(absent)` for a missing side.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |v: &Option<Value>| v.as_ref().map_or("(absent)".to_string(), Value::to_string);
        write!(f, "{}: {} → {}", self.key, side(&self.old), side(&self.new))
    }
}

/// The hyper-parameters that differ between `old` (e.g. a checkpoint's
/// [`CheckpointState::hyper_params`](super::CheckpointState::hyper_params)) and `new`
/// (e.g. [`hyper_params`] of the new run, or any JSON object: the CLI may add its own
/// options), sorted by key; empty when they agree.
///
/// Objects on both sides are compared key by key, recursively (a key inside `adamw` is
/// reported as `adamw.beta1`); anything else, arrays included, is compared whole (an
/// object on one side only, e.g. `lora: null → {..}`, is one change). Both sides are
/// first put through JSON text and back, so a value read from a file and the same value
/// computed now compare equal.
///
/// ```
/// use lorafuse::train::diff_hyper_params;
/// use serde_json::json;
/// let old = json!({"lr": 1e-3, "adamw": {"beta1": 0.9, "eps": 1e-8}, "seed": 0});
/// let new = json!({"lr": 3e-4, "adamw": {"beta1": 0.9, "eps": 1e-8}, "batch": 8});
/// let d: Vec<String> = diff_hyper_params(&old, &new).iter().map(|c| c.to_string()).collect();
/// assert_eq!(d, ["batch: (absent) → 8", "lr: 0.001 → 0.0003", "seed: 0 → (absent)"]);
/// ```
pub fn diff_hyper_params(old: &Value, new: &Value) -> Vec<HyperParamChange> {
    let mut out = Vec::new();
    diff("", Some(&normalized(old)), Some(&normalized(new)), &mut out);
    out
}

/// Appends the changes between `a` and `b` under `key`: objects on both sides key by key
/// (sorted), anything else whole.
fn diff(key: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<HyperParamChange>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                diff(&sub, x.get(k), y.get(k), out);
            }
        }
        _ if a == b => {}
        _ => out.push(HyperParamChange {
            key: key.to_string(),
            old: a.cloned(),
            new: b.cloned(),
        }),
    }
}

/// `v` through JSON text and back (serde_json parses some floats to a neighbour of the
/// value it printed; both sides of a comparison take the same path).
fn normalized(v: &Value) -> Value {
    serde_json::from_str(&v.to_string()).unwrap_or_else(|_| v.clone())
}
