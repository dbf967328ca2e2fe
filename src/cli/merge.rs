//! `lorafuse merge`: a transformers-loadable GPT-2 directory with an adapter merged into
//! its weights.

use super::{copy_atomic, load_model};
use crate::{DType, Device, Error, Result, checkpoint};
use clap::Args;
use std::path::{Path, PathBuf};

/// The tokenizer and generation files copied beside the merged weights, when present.
pub const COPIED_FILES: [&str; 6] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// `lorafuse merge --model DIR --adapter A --out DIR2`.
#[derive(Args, Clone, Debug)]
pub struct MergeArgs {
    /// A transformers GPT-2 directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT adapter directory to merge.
    #[arg(long)]
    pub adapter: PathBuf,
    /// The new directory (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `lorafuse merge` (see [`MergeArgs`]): the merge runs in f32 on the CPU and the
/// weights are written in f32, as transformers' GPT-2 checkpoints are. The directory is
/// built beside `out` and renamed into place, so a failure leaves nothing at `out`.
pub fn run_merge(args: &MergeArgs) -> Result<PathBuf> {
    let out = &args.out;
    if out.exists() {
        let mut it = std::fs::read_dir(out).map_err(|e| checkpoint::io_err(out, e))?;
        if it.next().is_some() {
            return Err(Error::invalid(format!(
                "--out {}: exists and is not empty",
                out.display()
            )));
        }
    }
    let mut model = load_model(&args.model, DType::F32, &Device::Cpu)?;
    model.load_adapters(&args.adapter)?;
    model.merge_lora()?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::invalid(format!("--out {}: not a directory path", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let build = |tmp: &Path| -> Result<()> {
        std::fs::create_dir_all(tmp).map_err(|e| checkpoint::io_err(tmp, e))?;
        model.save(tmp)?;
        for f in COPIED_FILES {
            let src = args.model.join(f);
            if src.exists() {
                copy_atomic(&src, &tmp.join(f))?;
            }
        }
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| checkpoint::io_err(out, e))?;
        }
        std::fs::rename(tmp, out).map_err(|e| checkpoint::io_err(out, e))
    };
    if let Err(e) = build(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        // The temporary directory is gone: name the output the user asked for.
        return Err(match e {
            Error::Io { path, source } => Error::Io {
                path: format!("{path} (building --out {})", out.display()),
                source,
            },
            e => e,
        });
    }
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    println!(
        "merged {} into {}: {}",
        args.adapter.display(),
        args.model.display(),
        out.display()
    );
    Ok(out.clone())
}
