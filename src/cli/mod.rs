//! The command-line front end's commands, callable from Rust as well: `train` (with
//! `--resume`), `eval`, `generate`, `merge`, `inspect` and `study`. Each takes its [clap] argument
//! struct and returns a [`Result`]; the `lorafuse` binary prints the error and exits 1.
//!
//! Every numeric option is range-checked before anything is read or written, and every
//! file the commands write is written atomically (a temporary file, fsync, rename), so a
//! failed command leaves no half-written output behind.

mod eval;
mod generate;
mod inspect;
mod merge;
mod study;
mod train;

pub use eval::{EvalArgs, EvalReport, run_eval};
pub use generate::{GenerateArgs, run_generate};
pub use inspect::{AdapterModule, AdapterReport, InspectArgs, inspect_adapter, run_inspect};
pub use merge::{MergeArgs, run_merge};
pub use study::{StudyArgs, run_study, run_study_with, study_config};
pub use train::{RUN_CONFIG_FILE, RunConfig, TrainArgs, TrainSummary, run_train};

use crate::checkpoint;
use crate::model::Gpt2;
use crate::text::Tokenizer;
use crate::{DType, Device, Error, Result};
use std::path::Path;

/// The device to run on, and why: `auto` takes the first GPU when the driver and a GPU are
/// present and the CPU otherwise; a named device (`cpu`, `cuda`, `cuda:N`, `sim`) must be
/// usable.
pub fn pick_device(name: &str) -> Result<(Device, String)> {
    if name == "auto" {
        let gpu = Device::Cuda(0);
        return Ok(match gpu.unavailable_reason() {
            None => (gpu, "auto: a GPU is present".into()),
            Some(why) => (Device::Cpu, format!("auto: no GPU, {why}")),
        });
    }
    let device = Device::parse(name)?;
    if let Some(reason) = device.unavailable_reason() {
        return Err(Error::DeviceUnavailable { device, reason });
    }
    Ok((device, "--device".into()))
}

/// The storage dtype: `auto` is bf16 on a GPU and f32 elsewhere (the CPU and the simulator).
pub fn pick_dtype(name: &str, device: &Device) -> Result<DType> {
    if name == "auto" {
        return Ok(match device {
            Device::Cuda(_) => DType::BF16,
            _ => DType::F32,
        });
    }
    DType::parse(name)
}

/// Loads a transformers GPT-2 directory (`config.json` + `model.safetensors`) in `dtype` on
/// `device`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Gpt2> {
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "--model {}: not a directory (expected a transformers GPT-2 directory with config.json and model.safetensors)",
            dir.display()
        )));
    }
    let (cfg, params) = checkpoint::load_gpt2(dir, dtype)?;
    let params = params
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(device)?)))
        .collect::<Result<Vec<_>>>()?;
    Gpt2::from_params(&cfg, params)
}

/// The model directory's tokenizer, checked against the model's vocabulary.
pub fn load_tokenizer(dir: &Path, model: &Gpt2) -> Result<Tokenizer> {
    let tok = Tokenizer::from_dir(dir)?;
    tok.check_model_vocab(model.config.vocab_size)?;
    Ok(tok)
}

/// `Err` naming `--{name}` unless `lo ≤ v ≤ hi`.
pub(crate) fn check_usize(name: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
    if v < lo || v > hi {
        let range = if hi == usize::MAX {
            format!("≥ {lo}")
        } else {
            format!("in {lo}..={hi}")
        };
        return Err(Error::invalid(format!("--{name} must be {range}, got {v}")));
    }
    Ok(())
}

/// `Err` naming `--{name}` unless `v` is finite and in `[lo, hi]` (`hi` may be infinite).
pub(crate) fn check_f64(name: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if !v.is_finite() || v < lo || v > hi {
        let range = if hi.is_infinite() {
            format!("finite and ≥ {lo}")
        } else {
            format!("finite and in [{lo}, {hi}]")
        };
        return Err(Error::invalid(format!("--{name} must be {range}, got {v}")));
    }
    Ok(())
}

/// Copies `from` to `to` atomically (a temporary file beside `to`, fsync, rename).
pub(crate) fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| checkpoint::io_err(from, e))?;
    write_file_atomic(to, &bytes)
}

/// Writes `bytes` to `path` atomically (a temporary file beside it, fsync, rename).
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    checkpoint::write_atomic(path, |tmp| {
        use std::io::Write;
        let mut f = std::fs::File::create(tmp).map_err(|e| checkpoint::io_err(tmp, e))?;
        f.write_all(bytes).map_err(|e| checkpoint::io_err(tmp, e))?;
        f.sync_all().map_err(|e| checkpoint::io_err(tmp, e))
    })
}
