//! Training checkpoints: [`Trainer::save_checkpoint`], [`latest_checkpoint`],
//! [`read_checkpoint_state`] and [`Trainer::resume`]. The layout and the atomicity rules
//! are in the [`train`](super#checkpoints) module's documentation.

use super::{Scaler, TrainConfig, Trainer};
use crate::checkpoint::{self as ckpt, io_err, write_atomic};
use crate::model::ADAPTER_WEIGHTS_FILE;
use crate::optim::{DeviceLossScaler, DynamicLossScaler, ParamStateOwned};
use crate::{DType, Device, Error, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The name of a checkpoint directory is this prefix and the step count.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// The optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer state inside a checkpoint (written last).
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// The `format` field of `trainer_state.json`.
pub const TRAINER_STATE_FORMAT: &str = "lorafuse-trainer-state";
/// The `format_version` this build writes and reads.
pub const TRAINER_STATE_VERSION: u32 = 1;
/// **Test hook.** With this environment variable set to `n`,
/// [`Trainer::save_checkpoint`] calls [`std::process::abort`] as soon as at least `n` of
/// the checkpoint's files are complete in its temporary directory: `0` right after the
/// directory is created, `4` (LoRA) after the last file and before the rename; a larger
/// `n` never aborts. The files are written in this order: the adapters
/// (`adapter_config.json` and `adapter_model.safetensors`, together, counting 2) and/or
/// the base weights (`config.json` and `model.safetensors`, 2), `optimizer.safetensors`,
/// `trainer_state.json`. `n@k` aborts only the save of step `k` (so that an earlier
/// checkpoint exists). It exists to test crash safety (a process killed in the middle of
/// a save); a value that is not of these forms is an error of the save.
pub const ABORT_IN_SAVE_ENV: &str = "LORAFUSE_TEST_ABORT_IN_SAVE";

/// The `format` metadata of `optimizer.safetensors`.
const OPTIMIZER_FORMAT: &str = "lorafuse-adamw";
/// The `format_version` metadata of `optimizer.safetensors`.
const OPTIMIZER_VERSION: &str = "1";
/// The adapter config inside a checkpoint (PEFT's name).
const ADAPTER_CONFIG_FILE: &str = crate::model::ADAPTER_CONFIG_FILE;

/// A trainable parameter as a checkpoint records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedParam {
    /// Its name (PEFT's for an adapter, GPT-2's for a base weight).
    pub name: String,
    /// Its shape (internal layout).
    pub shape: Vec<usize>,
    /// Its dtype (`"f32"`, `"bf16"`, ...).
    pub dtype: String,
}

/// The loss scaler as `trainer_state.json` records it; `scale_bits` (the f64's bits) is
/// what is read back, `scale` is there for people.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedLossScaler {
    /// The scale (informative).
    pub scale: f64,
    /// `scale.to_bits()`.
    pub scale_bits: u64,
    /// Clean steps before the scale doubles.
    pub growth_interval: u32,
    /// Clean steps since the last change.
    pub clean_steps: u32,
    /// Overflows so far.
    pub overflows: u64,
    /// Whether it lived on a device.
    pub on_device: bool,
}

impl SavedLossScaler {
    fn of(s: &DynamicLossScaler, on_device: bool) -> Self {
        SavedLossScaler {
            scale: s.scale(),
            scale_bits: s.scale().to_bits(),
            growth_interval: s.growth_interval(),
            clean_steps: s.clean_steps(),
            overflows: s.overflows(),
            on_device,
        }
    }

    /// The scaler it describes. Errors: values [`DynamicLossScaler::from_parts`] refuses.
    pub fn to_scaler(&self) -> Result<DynamicLossScaler> {
        DynamicLossScaler::from_parts(
            f64::from_bits(self.scale_bits),
            self.growth_interval,
            self.clean_steps,
            self.overflows,
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    kind: String,
    /// The 0-based step the next update takes its learning rate from.
    position: u64,
    next_lr: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RngFile {
    /// The run's dropout seed; step `i`, micro-batch `j` uses `dropout_seed(seed, i, j)`.
    dropout_seed: u64,
    /// The step the next dropout masks are drawn for.
    dropout_step: u64,
    /// The stochastic-rounding seed (`None`: round to nearest); its stream position is
    /// the optimizer's step count.
    stochastic_rounding_seed: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainableFile {
    /// The adapters are in PEFT's files.
    adapters: bool,
    /// The base weights are in `model.safetensors` (full fine-tuning).
    base_weights: bool,
    /// In the optimizer's order.
    params: Vec<SavedParam>,
}

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: String,
    format_version: u32,
    step: u64,
    optimizer_step: u64,
    schedule: ScheduleFile,
    loss_scaler: Option<SavedLossScaler>,
    rng: RngFile,
    trainable: TrainableFile,
    hyper_params: Value,
    extra: Value,
}

/// What a checkpoint's `trainer_state.json` says ([`read_checkpoint_state`]), read and
/// validated without touching the other files.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointState {
    /// The checkpoint directory.
    pub path: PathBuf,
    /// Steps taken ([`Trainer::steps`]): the next step is this 0-based one.
    pub step: u64,
    /// The optimizer's applied steps ([`AdamW::step_count`](crate::optim::AdamW::step_count)).
    pub optimizer_step: u64,
    /// The f16 loss scaler's state.
    pub loss_scaler: Option<SavedLossScaler>,
    /// The trainable parameters, in the optimizer's order.
    pub params: Vec<SavedParam>,
    /// Whether the checkpoint holds adapters (LoRA).
    pub adapters: bool,
    /// Whether it holds base weights (full fine-tuning).
    pub base_weights: bool,
    /// The run's hyper-parameters ([`hyper_params`](super::hyper_params)), a JSON object.
    pub hyper_params: Value,
    /// The `extra` given to [`Trainer::save_checkpoint`], verbatim.
    pub extra: Value,
}

/// Reads and validates `ckpt/trainer_state.json`. Errors name the file: missing,
/// unreadable, not JSON, another `format`, a `format_version` other than
/// [`TRAINER_STATE_VERSION`], a missing or mistyped field, an unknown dtype, or a loss
/// scaler in an impossible state.
pub fn read_checkpoint_state(ckpt: &Path) -> Result<CheckpointState> {
    let f = read_state_file(ckpt)?;
    Ok(CheckpointState {
        path: ckpt.to_path_buf(),
        step: f.step,
        optimizer_step: f.optimizer_step,
        loss_scaler: f.loss_scaler,
        params: f.trainable.params,
        adapters: f.trainable.adapters,
        base_weights: f.trainable.base_weights,
        hyper_params: f.hyper_params,
        extra: f.extra,
    })
}

fn read_state_file(ckpt: &Path) -> Result<StateFile> {
    let path = ckpt.join(TRAINER_STATE_FILE);
    let bad = |msg: String| Error::format(path.display().to_string(), msg);
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    match v.get("format").and_then(Value::as_str) {
        Some(TRAINER_STATE_FORMAT) => {}
        other => {
            return Err(bad(format!(
                "format {}, expected {TRAINER_STATE_FORMAT:?} (not a lorafuse trainer state)",
                other.map_or("missing".to_string(), |f| format!("{f:?}"))
            )));
        }
    }
    match v.get("format_version").and_then(Value::as_u64) {
        Some(n) if n == TRAINER_STATE_VERSION as u64 => {}
        other => {
            return Err(bad(format!(
                "format_version {}, this build reads version {TRAINER_STATE_VERSION}",
                other.map_or("missing".to_string(), |n| n.to_string())
            )));
        }
    }
    let f: StateFile = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
    if usize::try_from(f.step).is_err() {
        return Err(bad(format!("step {} does not fit this machine", f.step)));
    }
    if f.optimizer_step > f.step {
        return Err(bad(format!(
            "optimizer_step {} exceeds step {}",
            f.optimizer_step, f.step
        )));
    }
    if f.schedule.position != f.step || f.rng.dropout_step != f.step {
        return Err(bad(format!(
            "schedule.position {} and rng.dropout_step {} disagree with step {}",
            f.schedule.position, f.rng.dropout_step, f.step
        )));
    }
    if !f.hyper_params.is_object() {
        return Err(bad("hyper_params is not a JSON object".into()));
    }
    if !(f.trainable.adapters || f.trainable.base_weights) || f.trainable.params.is_empty() {
        return Err(bad("no trainable parameters recorded".into()));
    }
    for p in &f.trainable.params {
        DType::parse(&p.dtype).map_err(|e| bad(format!("parameter {}: {e}", p.name)))?;
    }
    if let Some(s) = &f.loss_scaler {
        s.to_scaler().map_err(|e| bad(e.to_string()))?;
    }
    Ok(f)
}

/// The newest complete checkpoint in `run_dir`: the `checkpoint-<step>` directory with
/// the highest step that holds a `trainer_state.json`; `None` when there is none.
/// Leftovers of an interrupted save (`.checkpoint-*.tmp`) and other entries are ignored.
/// Errors: `run_dir` missing or unreadable.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(complete_checkpoints(run_dir)?
        .into_iter()
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p))
}

/// The complete checkpoints of `run_dir`, by step, unordered.
fn complete_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(run_dir).map_err(|e| io_err(run_dir, e))? {
        let entry = entry.map_err(|e| io_err(run_dir, e))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(CHECKPOINT_PREFIX))
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if path.is_dir() && path.join(TRAINER_STATE_FILE).is_file() {
            out.push((step, path));
        }
    }
    Ok(out)
}

/// Whether `name` is a leftover of an interrupted save or prune.
fn is_leftover(name: &str) -> bool {
    name.starts_with(&format!(".{CHECKPOINT_PREFIX}")) && name.ends_with(".tmp")
}

/// Removes a directory or file, naming it in the error.
fn remove_any(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    r.map_err(|e| io_err(path, e))
}

/// Syncs a directory's entries to disk (the renames and creations inside it).
fn sync_dir(dir: &Path) -> Result<()> {
    if cfg!(unix) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Test-only failure injection: a save on this thread returns an error as soon as at
    /// least this many files are complete (as [`ABORT_IN_SAVE_ENV`], without the abort).
    pub(crate) static FAIL_IN_SAVE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The value of [`ABORT_IN_SAVE_ENV`] (`None`: unset): the number of files after which
/// a save aborts, and the only step whose save does (`None`: every save).
pub(super) fn parse_abort_hook(v: Option<&str>) -> Result<Option<(usize, Option<usize>)>> {
    v.map(|v| {
        let bad = || {
            Error::invalid(format!(
                "{ABORT_IN_SAVE_ENV}={v:?}: expected a number of files, or files@step (a test hook)"
            ))
        };
        let (files, step) = match v.trim().split_once('@') {
            Some((f, s)) => (f, Some(s.trim().parse::<usize>().map_err(|_| bad())?)),
            None => (v.trim(), None),
        };
        Ok((files.trim().parse::<usize>().map_err(|_| bad())?, step))
    })
    .transpose()
}

/// The save's test hooks ([`ABORT_IN_SAVE_ENV`]).
struct SaveHook {
    abort_after: Option<usize>,
    tmp: PathBuf,
}

impl SaveHook {
    fn new(tmp: &Path, step: usize) -> Result<Self> {
        let v = std::env::var_os(ABORT_IN_SAVE_ENV);
        let hook = parse_abort_hook(v.as_deref().map(|v| v.to_string_lossy()).as_deref())?;
        Ok(SaveHook {
            abort_after: hook
                .filter(|&(_, at)| at.is_none_or(|k| k == step))
                .map(|(files, _)| files),
            tmp: tmp.to_path_buf(),
        })
    }

    /// Called with the number of files complete so far.
    fn files_written(&self, n: usize) -> Result<()> {
        if self.abort_after.is_some_and(|k| n >= k) {
            eprintln!(
                "lorafuse: {ABORT_IN_SAVE_ENV}: aborting with {n} file(s) written in {}",
                self.tmp.display()
            );
            std::process::abort();
        }
        #[cfg(test)]
        if FAIL_IN_SAVE.with(|f| f.get()).is_some_and(|k| n >= k) {
            return Err(io_err(
                &self.tmp,
                std::io::Error::other(format!("injected failure after {n} file(s)")),
            ));
        }
        Ok(())
    }
}

impl Trainer {
    /// Writes `run_dir/checkpoint-<step>/` (`<step>` = [`Trainer::steps`]) with everything
    /// the next step depends on, and returns its path; see the
    /// [module docs](super#checkpoints) for its files and the atomic write. `extra` (any
    /// JSON; e.g. the data cursor) is stored verbatim and comes back from
    /// [`Trainer::resume`]. With `keep = Some(k)`, only the `k` newest checkpoints of
    /// `run_dir` (by step, this one always among them) are kept.
    ///
    /// On a device this waits for the queued steps and reads the adapters, the optimizer
    /// state and the loss scaler back. A checkpoint of the same step that already exists
    /// is replaced. Leftovers of an interrupted save are removed first.
    ///
    /// Errors (the previous checkpoints stay as they were, and no partial
    /// `checkpoint-<step>` appears): `keep = Some(0)`; an I/O error (naming the path); the
    /// model's trainable parameters changed since the trainer was built; adapters still
    /// merged. An error while removing old checkpoints comes after this one was saved.
    ///
    /// Test hook: [`ABORT_IN_SAVE_ENV`].
    pub fn save_checkpoint(
        &self,
        run_dir: &Path,
        extra: &Value,
        keep: Option<usize>,
    ) -> Result<PathBuf> {
        if keep == Some(0) {
            return Err(Error::invalid(
                "save_checkpoint: keep must be at least 1 (the checkpoint being written)",
            ));
        }
        let names = self.trainable_names()?;
        let name = format!("{CHECKPOINT_PREFIX}{}", self.step);
        std::fs::create_dir_all(run_dir).map_err(|e| io_err(run_dir, e))?;
        for entry in std::fs::read_dir(run_dir).map_err(|e| io_err(run_dir, e))? {
            let entry = entry.map_err(|e| io_err(run_dir, e))?;
            if entry.file_name().to_str().is_some_and(is_leftover) {
                remove_any(&entry.path())?;
            }
        }
        let tmp = run_dir.join(format!(".{name}.tmp"));
        std::fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
        let written = self.write_files(&tmp, &names, extra);
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dir = run_dir.join(&name);
        if dir.exists() {
            // Move the old one aside first: a directory cannot be renamed over a
            // non-empty one. A crash in between leaves the older checkpoints.
            let old = run_dir.join(format!(".{name}.old.tmp"));
            std::fs::rename(&dir, &old).map_err(|e| io_err(&dir, e))?;
            std::fs::rename(&tmp, &dir).map_err(|e| io_err(&dir, e))?;
            sync_dir(run_dir)?;
            remove_any(&old)?;
        } else {
            std::fs::rename(&tmp, &dir).map_err(|e| io_err(&dir, e))?;
            sync_dir(run_dir)?;
        }
        if let Some(k) = keep {
            prune(run_dir, &dir, k)?;
        }
        Ok(dir)
    }

    /// The names of the optimizer's parameters (the model's trainable parameters, in the
    /// order the trainer was built with).
    fn trainable_names(&self) -> Result<Vec<String>> {
        let now = self.model.trainable_params();
        let params = self.opt.params();
        if now.len() != params.len() || now.iter().zip(params).any(|((_, t), p)| t.id() != p.id()) {
            return Err(Error::invalid(
                "save_checkpoint: the model's trainable parameters changed since the trainer was built",
            ));
        }
        Ok(now.into_iter().map(|(n, _)| n).collect())
    }

    /// Every file of a checkpoint, into the (empty) directory `tmp`, each synced, then
    /// `tmp` itself.
    fn write_files(&self, tmp: &Path, names: &[String], extra: &Value) -> Result<()> {
        let hook = SaveHook::new(tmp, self.steps())?;
        let mut n = 0;
        hook.files_written(n)?;
        let adapters = self.model.lora_config().is_some();
        let base_weights = self.model.is_full_finetune();
        if adapters {
            self.model.save_adapters(tmp)?;
            n += 2;
            hook.files_written(n)?;
        }
        if base_weights {
            self.model.save(tmp)?;
            n += 2;
            hook.files_written(n)?;
        }
        let optimizer_step = self.opt.try_step_count()?;
        let mut tensors = Vec::with_capacity(3 * names.len());
        for (i, (name, p)) in names.iter().zip(self.opt.params()).enumerate() {
            let state = self
                .opt
                .state_to_host(i)?
                .ok_or_else(|| Error::invalid(format!("adamw: no state for {name}")))?;
            let shape = p.shape().clone();
            let cpu = Device::Cpu;
            match state {
                ParamStateOwned::F32 { m, v, master } => {
                    tensors.push((
                        format!("{name}.m"),
                        Tensor::from_vec(m, shape.clone(), &cpu)?,
                    ));
                    tensors.push((
                        format!("{name}.v"),
                        Tensor::from_vec(v, shape.clone(), &cpu)?,
                    ));
                    if let Some(w) = master {
                        tensors.push((format!("{name}.master"), Tensor::from_vec(w, shape, &cpu)?));
                    }
                }
                ParamStateOwned::F64 { m, v } => {
                    tensors.push((
                        format!("{name}.m"),
                        Tensor::from_vec(m, shape.clone(), &cpu)?,
                    ));
                    tensors.push((format!("{name}.v"), Tensor::from_vec(v, shape, &cpu)?));
                }
            }
        }
        let metadata = HashMap::from([
            ("format".to_string(), OPTIMIZER_FORMAT.to_string()),
            ("format_version".to_string(), OPTIMIZER_VERSION.to_string()),
            ("step".to_string(), optimizer_step.to_string()),
        ]);
        ckpt::save_tensors(&tmp.join(OPTIMIZER_FILE), &tensors, Some(metadata))?;
        drop(tensors);
        n += 1;
        hook.files_written(n)?;

        let scaler = match &self.scaler {
            None => None,
            Some(Scaler::Host(s)) => Some(SavedLossScaler::of(s, false)),
            Some(Scaler::Device(s)) => Some(SavedLossScaler::of(&s.to_host()?, true)),
        };
        let state = StateFile {
            format: TRAINER_STATE_FORMAT.to_string(),
            format_version: TRAINER_STATE_VERSION,
            step: self.step as u64,
            optimizer_step,
            schedule: ScheduleFile {
                kind: "warmup_cosine".to_string(),
                position: self.step as u64,
                next_lr: self.schedule.lr(self.step as u64),
            },
            loss_scaler: scaler,
            rng: RngFile {
                dropout_seed: self.cfg.seed,
                dropout_step: self.step as u64,
                stochastic_rounding_seed: match self.cfg.adamw.rounding {
                    crate::optim::Rounding::NearestEven => None,
                    crate::optim::Rounding::Stochastic { seed } => Some(seed),
                },
            },
            trainable: TrainableFile {
                adapters,
                base_weights,
                params: names
                    .iter()
                    .zip(self.opt.params())
                    .map(|(name, p)| SavedParam {
                        name: name.clone(),
                        shape: p.dims().to_vec(),
                        dtype: p.dtype().as_str().to_string(),
                    })
                    .collect(),
            },
            hyper_params: self.hyper_params(),
            extra: extra.clone(),
        };
        let path = tmp.join(TRAINER_STATE_FILE);
        let text = serde_json::to_string_pretty(&state)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        write_atomic(&path, |p| {
            std::fs::write(p, text.as_bytes()).map_err(|e| io_err(p, e))
        })?;
        n += 1;
        hook.files_written(n)?;
        sync_dir(tmp)
    }

    /// Continues a run from the checkpoint directory `ckpt` (e.g. [`latest_checkpoint`]):
    /// the trainable parameters, the optimizer's moments, master weights and step count,
    /// the loss scaler, the step count (schedule and dropout positions) are restored, so
    /// that with the same `cfg` and data the next step is bit-identical to the one the
    /// saved run would have taken. Returns the trainer and the `extra` that was saved.
    ///
    /// `model` is the base model, as the run started from it, on the device and in the
    /// dtype to train in: with adapters attached as the checkpoint's
    /// `adapter_config.json` says (their values are replaced), or without adapters, which
    /// are then attached from the checkpoint ([`Gpt2::load_adapters`](crate::model::Gpt2::load_adapters)).
    /// Under full fine-tuning ([`Gpt2::set_full_finetune`](crate::model::Gpt2::set_full_finetune))
    /// the base weights are replaced by the checkpoint's.
    ///
    /// The hyper-parameters come from `cfg`; this does not compare them with the saved
    /// ones (see [`diff_hyper_params`](super::diff_hyper_params) and
    /// [`CheckpointState::hyper_params`]).
    ///
    /// Errors name the file: anything [`read_checkpoint_state`] refuses; a missing or
    /// corrupt adapter, weights or optimizer file; a tensor missing, unexpected, or of
    /// another shape or dtype than the model's; trainable parameters (names, order,
    /// shapes, dtypes) other than the model's; an optimizer file of another format or
    /// step.
    pub fn resume(
        mut model: crate::model::Gpt2,
        cfg: &TrainConfig,
        ckpt: &Path,
    ) -> Result<(Trainer, Value)> {
        let f = read_state_file(ckpt)?;
        let state_path = ckpt.join(TRAINER_STATE_FILE).display().to_string();
        if f.trainable.adapters && model.lora_config().is_none() {
            model.load_adapters(ckpt)?;
        }
        let here = |has: bool| if has { "holds" } else { "does not hold" };
        if f.trainable.adapters != model.lora_config().is_some() {
            return Err(Error::format(
                state_path,
                format!(
                    "the checkpoint {} adapters; the model {} adapters attached",
                    here(f.trainable.adapters),
                    if model.lora_config().is_some() {
                        "has"
                    } else {
                        "has no"
                    }
                ),
            ));
        }
        if f.trainable.base_weights != model.is_full_finetune() {
            return Err(Error::format(
                state_path,
                format!(
                    "the checkpoint {} base weights (full fine-tuning); the model is {}",
                    here(f.trainable.base_weights),
                    if model.is_full_finetune() {
                        "set to full fine-tuning"
                    } else {
                        "not set to full fine-tuning"
                    }
                ),
            ));
        }
        let trainable = model.trainable_params();
        check_params(&state_path, &f.trainable.params, &trainable)?;
        if f.trainable.adapters {
            let path = ckpt.join(ADAPTER_WEIGHTS_FILE);
            let loaded = ckpt::load_tensors(&path)?;
            let lora = model.lora_params();
            copy_by_name(&path, loaded, &lora)?;
            // The config file must be there too (PEFT needs it); load_adapters read it
            // when it attached the adapters.
            let cfg_path = ckpt.join(ADAPTER_CONFIG_FILE);
            if !cfg_path.is_file() {
                return Err(Error::format(
                    cfg_path.display().to_string(),
                    "missing (the checkpoint's adapter config)",
                ));
            }
        }
        if f.trainable.base_weights {
            let (saved_cfg, loaded) = ckpt::load_gpt2(ckpt, model.dtype())?;
            let path = ckpt.join(ckpt::WEIGHTS_FILE);
            if saved_cfg != model.config {
                return Err(Error::format(
                    ckpt.join(ckpt::CONFIG_FILE).display().to_string(),
                    format!(
                        "model config {saved_cfg:?} differs from the model's {:?}",
                        model.config
                    ),
                ));
            }
            // The file holds GPT-2's V rows of `wte`; the model keeps them padded to Vp
            // (`from_params` pads), so compare and copy in the model's layout.
            let padded = crate::model::Gpt2::from_params(&saved_cfg, loaded)?.named_params();
            copy_by_name(&path, padded, &model.named_params())?;
        }
        drop(trainable);
        let device = model.device();
        let dtype = model.dtype();
        let mut t = Trainer::new(model, cfg)?;
        // The optimizer.
        let opt_path = ckpt.join(OPTIMIZER_FILE);
        let states = read_optimizer(&opt_path, &f)?;
        t.opt
            .load_state(f.optimizer_step, &states)
            .map_err(|e| Error::format(opt_path.display().to_string(), e.to_string()))?;
        // The loss scaler.
        match (&mut t.scaler, &f.loss_scaler) {
            (None, None) => {}
            (Some(s), Some(saved)) => {
                let host = saved.to_scaler()?;
                *s = if device == Device::Cpu {
                    Scaler::Host(host)
                } else {
                    Scaler::Device(Box::new(DeviceLossScaler::new(&host, &device)?))
                };
            }
            (mine, saved) => {
                return Err(Error::format(
                    ckpt.join(TRAINER_STATE_FILE).display().to_string(),
                    format!(
                        "the checkpoint {} a loss scaler; a {dtype} model {} one",
                        here(saved.is_some()),
                        if mine.is_some() { "needs" } else { "has no" }
                    ),
                ));
            }
        }
        t.step = f.step as usize;
        Ok((t, f.extra))
    }
}

/// Checks the recorded trainable parameters against the model's, in order.
fn check_params(path: &str, saved: &[SavedParam], now: &[(String, Tensor)]) -> Result<()> {
    let bad = |msg: String| Err(Error::format(path.to_string(), msg));
    if saved.len() != now.len() {
        return bad(format!(
            "{} trainable parameters saved, the model has {}",
            saved.len(),
            now.len()
        ));
    }
    for (i, (s, (name, t))) in saved.iter().zip(now).enumerate() {
        if s.name != *name {
            return bad(format!(
                "trainable parameter {i} is {} in the checkpoint, {name} in the model",
                s.name
            ));
        }
        if s.shape != t.dims() || s.dtype != t.dtype().as_str() {
            return bad(format!(
                "{name}: {} {:?} in the checkpoint, {} {} in the model",
                s.dtype,
                s.shape,
                t.dtype(),
                t.shape()
            ));
        }
    }
    Ok(())
}

/// Copies every tensor of `want` from `loaded` (read from `path`) by name, exactly: the
/// names must be the same sets and each tensor of the same shape and dtype.
fn copy_by_name(
    path: &Path,
    loaded: Vec<(String, Tensor)>,
    want: &[(String, Tensor)],
) -> Result<()> {
    let p = path.display().to_string();
    let mut map: HashMap<String, Tensor> = loaded.into_iter().collect();
    let mut pairs = Vec::with_capacity(want.len());
    for (name, t) in want {
        let src = map
            .remove(name)
            .ok_or_else(|| Error::format(p.clone(), format!("missing tensor {name}")))?;
        if src.dims() != t.dims() || src.dtype() != t.dtype() {
            return Err(Error::format(
                p,
                format!(
                    "{name}: {} {} in the file, {} {} expected",
                    src.dtype(),
                    src.shape(),
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        pairs.push((src, t));
    }
    if let Some(extra) = map.keys().min() {
        return Err(Error::format(
            p,
            format!("unexpected tensor {extra} ({} in all)", map.len()),
        ));
    }
    // Only now, with every tensor checked, overwrite.
    for (src, t) in pairs {
        t.copy_from(&src.to_device(&t.device())?)?;
    }
    Ok(())
}

/// Reads and validates `optimizer.safetensors` against the recorded parameters.
fn read_optimizer(path: &Path, f: &StateFile) -> Result<Vec<ParamStateOwned>> {
    let p = path.display().to_string();
    let bad = |msg: String| Error::format(p.clone(), msg);
    let (tensors, meta) = ckpt::load_tensors_with_metadata(path)?;
    let field = |k: &str| meta.get(k).map(String::as_str);
    let shown = |k: &str| field(k).map_or("missing".to_string(), |v| format!("{v:?}"));
    if field("format") != Some(OPTIMIZER_FORMAT) {
        return Err(bad(format!(
            "format {} in the metadata, expected {OPTIMIZER_FORMAT:?}",
            shown("format")
        )));
    }
    if field("format_version") != Some(OPTIMIZER_VERSION) {
        return Err(bad(format!(
            "format_version {} in the metadata, this build reads {OPTIMIZER_VERSION}",
            shown("format_version")
        )));
    }
    let step = f.optimizer_step.to_string();
    if field("step") != Some(step.as_str()) {
        return Err(bad(format!(
            "step {} in the metadata, but {TRAINER_STATE_FILE} says {step}",
            shown("step")
        )));
    }
    let mut map: HashMap<String, Tensor> = tensors.into_iter().collect();
    let mut states = Vec::with_capacity(f.trainable.params.len());
    for sp in &f.trainable.params {
        let dtype = DType::parse(&sp.dtype)?;
        let state_dtype = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut take = |what: &str| -> Result<Tensor> {
            let key = format!("{}.{what}", sp.name);
            let t = map
                .remove(&key)
                .ok_or_else(|| bad(format!("missing tensor {key}")))?;
            if t.dims() != sp.shape.as_slice() || t.dtype() != state_dtype {
                return Err(bad(format!(
                    "{key}: {} {}, expected {state_dtype} {:?}",
                    t.dtype(),
                    t.shape(),
                    sp.shape
                )));
            }
            Ok(t)
        };
        let (m, v) = (take("m")?, take("v")?);
        states.push(if dtype == DType::F64 {
            ParamStateOwned::F64 {
                m: m.to_vec()?,
                v: v.to_vec()?,
            }
        } else {
            let master = if dtype.is_half() {
                Some(take("master")?.to_vec()?)
            } else {
                None
            };
            ParamStateOwned::F32 {
                m: m.to_vec()?,
                v: v.to_vec()?,
                master,
            }
        });
    }
    if let Some(extra) = map.keys().min() {
        return Err(bad(format!(
            "unexpected tensor {extra} ({} in all)",
            map.len()
        )));
    }
    Ok(states)
}

/// Keeps the `keep` newest complete checkpoints of `run_dir` (`current` always among
/// them); each other one is renamed to a leftover name first, so that a crash while it
/// is deleted never leaves a half-deleted checkpoint that looks complete.
fn prune(run_dir: &Path, current: &Path, keep: usize) -> Result<()> {
    let mut others: Vec<(u64, PathBuf)> = complete_checkpoints(run_dir)?
        .into_iter()
        .filter(|(_, p)| p != current)
        .collect();
    others.sort_by_key(|o| std::cmp::Reverse(o.0));
    for (step, path) in others.into_iter().skip(keep - 1) {
        let doomed = run_dir.join(format!(".{CHECKPOINT_PREFIX}{step}.del.tmp"));
        let fail = |e: Error| {
            Error::invalid(format!(
                "{} saved, but removing the old {} failed: {e}",
                current.display(),
                path.display()
            ))
        };
        std::fs::rename(&path, &doomed).map_err(|e| fail(io_err(&path, e)))?;
        remove_any(&doomed).map_err(fail)?;
    }
    sync_dir(run_dir)
}
