//! Checkpoint IO: GPT-2 `config.json` + `model.safetensors` in GPT-2's own layout, and
//! generic safetensors files (LoRA adapters).
//!
//! # GPT-2 layout
//!
//! [`gpt2_param_specs`] lists every parameter of a GPT-2 LM by its canonical name (no
//! prefix: `wte.weight`, `h.0.attn.c_attn.weight`, ..., `ln_f.bias`) with the shape this
//! crate keeps it in. GPT-2 stores its `Conv1D` weights (`attn.c_attn`, `attn.c_proj`,
//! `mlp.c_fc`, `mlp.c_proj`) as `[in, out]`; internally every linear weight is `[out, in]`
//! (`nn.Linear` layout), so those four are transposed on load and transposed back on save
//! ([`ParamSpec::conv1d`]).
//!
//! [`load_gpt2`] reads both the original checkpoints (keys without prefix, old ones with
//! `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` buffers, which are skipped) and files
//! written by HF transformers (every key prefixed with `transformer.`, no
//! `lm_head.weight`). The LM head must be tied to `wte`: an `lm_head.weight` that differs
//! from `wte.weight` is refused. [`save_gpt2`] writes the original layout (no prefix, no
//! `lm_head.weight`), which HF transformers also loads.
//!
//! Files are written atomically: into a temporary file in the destination directory,
//! synced, then renamed over the target, so a crash never leaves a half-written file.
//!
//! ```no_run
//! use lorafuse::{checkpoint, DType};
//! let (cfg, params) = checkpoint::load_gpt2("gpt2".as_ref(), DType::F32)?;
//! assert_eq!(params[0].0, "wte.weight");
//! checkpoint::save_gpt2("out".as_ref(), &cfg, &params, DType::BF16)?;
//! # Ok::<(), lorafuse::Error>(())
//! ```

use crate::storage::CpuStorage;
use crate::{DType, Device, Element, Error, Result, Tensor};
use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, SafeTensorError, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Named tensors, as loaded and saved by this module.
pub type NamedTensors = Vec<(String, Tensor)>;

/// File name of the weights inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the model configuration inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The key prefix HF transformers adds to every GPT-2 body parameter.
pub const HF_PREFIX: &str = "transformer.";

/// The hyperparameters of a GPT-2 model, as in HF's `config.json`.
///
/// Deserialising accepts (and ignores) any other keys of an HF config, takes `n_ctx` when
/// `n_positions` is absent, and defaults `layer_norm_epsilon` to `1e-5`. It does not
/// validate; [`Gpt2Config::load_json`] does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawGpt2Config")]
pub struct Gpt2Config {
    /// Vocabulary size `V` (rows of `wte`).
    pub vocab_size: usize,
    /// Maximum sequence length `P` (rows of `wpe`).
    pub n_positions: usize,
    /// Model width `C`.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads (divides `n_embd`).
    pub n_head: usize,
    /// The epsilon of every layer norm.
    pub layer_norm_epsilon: f64,
}

/// The config as written on disk, before `n_ctx` / `n_positions` are reconciled.
#[derive(Deserialize)]
struct RawGpt2Config {
    vocab_size: usize,
    n_positions: Option<usize>,
    n_ctx: Option<usize>,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
}

fn default_eps() -> f64 {
    1e-5
}

impl TryFrom<RawGpt2Config> for Gpt2Config {
    type Error = String;
    fn try_from(r: RawGpt2Config) -> std::result::Result<Self, String> {
        let n_positions = r
            .n_positions
            .or(r.n_ctx)
            .ok_or_else(|| "missing field `n_positions` (or `n_ctx`)".to_string())?;
        Ok(Gpt2Config {
            vocab_size: r.vocab_size,
            n_positions,
            n_embd: r.n_embd,
            n_layer: r.n_layer,
            n_head: r.n_head,
            layer_norm_epsilon: r.layer_norm_epsilon,
        })
    }
}

impl Gpt2Config {
    /// GPT-2 small (124M parameters): V 50257, P 1024, C 768, 12 layers, 12 heads, eps 1e-5.
    pub fn gpt2_small() -> Self {
        Gpt2Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            layer_norm_epsilon: 1e-5,
        }
    }

    /// The small GPT of DESIGN §10's CPU benchmark: V 256, P 128, C 256, 4 layers, 4 heads.
    pub fn small_bench() -> Self {
        Gpt2Config {
            vocab_size: 256,
            n_positions: 128,
            n_embd: 256,
            n_layer: 4,
            n_head: 4,
            layer_norm_epsilon: 1e-5,
        }
    }

    /// Checks that every size is positive, `n_head` divides `n_embd` and the epsilon is
    /// finite and positive ([`Error::InvalidArgument`] otherwise).
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (name, v) in sizes {
            if v == 0 {
                return Err(Error::invalid(format!("GPT-2 config: {name} must be > 0")));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::invalid(format!(
                "GPT-2 config: n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            )));
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(Error::invalid(format!(
                "GPT-2 config: layer_norm_epsilon {} must be finite and > 0",
                self.layer_norm_epsilon
            )));
        }
        Ok(())
    }

    /// The vocabulary rounded up to a multiple of 64 (llm.c's `padded_vocab_size`: GPT-2's
    /// 50257 becomes 50304): the rows of the model's `wte` ([`crate::model::Gpt2::wte`])
    /// and the columns of its internal logits. At a multiple of 64 every row of the
    /// `[tokens, Vp]` logits and their gradient is 16-byte aligned (for 2-byte dtypes; 64
    /// also keeps the 64- and 128-wide GEMM tiles whole where it can), so the LM head's
    /// three GEMMs take the tensor-core kernel's `cp.async` loads instead of its
    /// element-wise fallback. Rows `V..Vp` of `wte` are zero and no token id reaches them;
    /// the loss ignores the logits' padding columns
    /// ([`crate::ops::cross_entropy_padded`]); checkpoints keep exactly `V` rows.
    pub fn padded_vocab_size(&self) -> usize {
        const MULTIPLE: usize = 64;
        self.vocab_size.next_multiple_of(MULTIPLE)
    }

    /// The per-head width `n_embd / n_head`.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Reads and validates an HF `config.json` ([`Error::Io`] when it cannot be read,
    /// [`Error::Format`] when it does not parse or is invalid).
    pub fn load_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
        let cfg: Gpt2Config =
            serde_json::from_str(&text).map_err(|e| fmt_err(path, e.to_string()))?;
        cfg.validate().map_err(|e| fmt_err(path, e.to_string()))?;
        Ok(cfg)
    }

    /// Writes this config as an HF-loadable `config.json` (atomically). Besides the
    /// fields it writes `model_type`, `architectures`, `n_ctx`, `activation_function`
    /// (`gelu_new`, the tanh GELU of [`crate::ops::gelu`]) and `tie_word_embeddings`.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        self.validate()?;
        let v = serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "tie_word_embeddings": true,
        });
        let mut text =
            serde_json::to_string_pretty(&v).map_err(|e| fmt_err(path, e.to_string()))?;
        text.push('\n');
        write_atomic(path, |tmp| {
            std::fs::write(tmp, text.as_bytes()).map_err(|e| io_err(tmp, e))
        })
    }
}

/// One GPT-2 parameter: its canonical name, its internal shape and whether the file
/// stores it transposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Canonical name without prefix, e.g. `h.0.attn.c_attn.weight`.
    pub name: String,
    /// The shape this crate keeps the tensor in (linear weights are `[out, in]`).
    pub shape: Vec<usize>,
    /// True for GPT-2 `Conv1D` weights, stored in the file as `[in, out]`: transposed on
    /// load and on save.
    pub conv1d: bool,
}

impl ParamSpec {
    fn new(name: String, shape: Vec<usize>, conv1d: bool) -> Self {
        ParamSpec {
            name,
            shape,
            conv1d,
        }
    }

    /// The shape of the tensor as stored in a GPT-2 safetensors file (the internal shape
    /// reversed for `Conv1D` weights).
    pub fn file_shape(&self) -> Vec<usize> {
        if self.conv1d {
            self.shape.iter().rev().copied().collect()
        } else {
            self.shape.clone()
        }
    }
}

/// Every parameter of a GPT-2 LM (tied head), in canonical order: `wte`, `wpe`, then per
/// block `ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj` (weight
/// before bias), then `ln_f`. `wte` is `[V, C]`, as checkpoints hold it; the model keeps
/// it padded to [`Gpt2Config::padded_vocab_size`] rows.
pub fn gpt2_param_specs(cfg: &Gpt2Config) -> Vec<ParamSpec> {
    let (v, p, c) = (cfg.vocab_size, cfg.n_positions, cfg.n_embd);
    let mut s = Vec::with_capacity(4 + 12 * cfg.n_layer);
    s.push(ParamSpec::new("wte.weight".into(), vec![v, c], false));
    s.push(ParamSpec::new("wpe.weight".into(), vec![p, c], false));
    for i in 0..cfg.n_layer {
        let n = |suffix: &str| format!("h.{i}.{suffix}");
        s.push(ParamSpec::new(n("ln_1.weight"), vec![c], false));
        s.push(ParamSpec::new(n("ln_1.bias"), vec![c], false));
        s.push(ParamSpec::new(
            n("attn.c_attn.weight"),
            vec![3 * c, c],
            true,
        ));
        s.push(ParamSpec::new(n("attn.c_attn.bias"), vec![3 * c], false));
        s.push(ParamSpec::new(n("attn.c_proj.weight"), vec![c, c], true));
        s.push(ParamSpec::new(n("attn.c_proj.bias"), vec![c], false));
        s.push(ParamSpec::new(n("ln_2.weight"), vec![c], false));
        s.push(ParamSpec::new(n("ln_2.bias"), vec![c], false));
        s.push(ParamSpec::new(n("mlp.c_fc.weight"), vec![4 * c, c], true));
        s.push(ParamSpec::new(n("mlp.c_fc.bias"), vec![4 * c], false));
        s.push(ParamSpec::new(n("mlp.c_proj.weight"), vec![c, 4 * c], true));
        s.push(ParamSpec::new(n("mlp.c_proj.bias"), vec![c], false));
    }
    s.push(ParamSpec::new("ln_f.weight".into(), vec![c], false));
    s.push(ParamSpec::new("ln_f.bias".into(), vec![c], false));
    s
}

/// The paths of `config.json` and `model.safetensors` for a checkpoint directory, or for
/// the safetensors file itself (config beside it).
fn checkpoint_paths(dir_or_file: &Path) -> (PathBuf, PathBuf) {
    if dir_or_file.is_dir() {
        (
            dir_or_file.join(CONFIG_FILE),
            dir_or_file.join(WEIGHTS_FILE),
        )
    } else {
        let dir = match dir_or_file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (dir.join(CONFIG_FILE), dir_or_file.to_path_buf())
    }
}

/// True for the attention-mask buffers old GPT-2 checkpoints carry (`h.{i}.attn.bias`,
/// `h.{i}.attn.masked_bias` with `i < n_layer`): not parameters, skipped on load.
fn is_mask_buffer(name: &str, n_layer: usize) -> bool {
    let Some(rest) = name.strip_prefix("h.") else {
        return false;
    };
    let Some((idx, tail)) = rest.split_once('.') else {
        return false;
    };
    matches!(tail, "attn.bias" | "attn.masked_bias")
        && idx
            .parse::<usize>()
            .is_ok_and(|i| i < n_layer && i.to_string() == idx)
}

/// Lists up to 10 items, then how many more.
fn list(items: &[String]) -> String {
    let mut s = items
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > 10 {
        s.push_str(&format!(", ... ({} more)", items.len() - 10));
    }
    s
}

/// Loads a GPT-2 checkpoint: `config.json` and `model.safetensors` from a directory, or a
/// safetensors file with `config.json` beside it.
///
/// Keys may carry HF's `transformer.` prefix or not; attention-mask buffers are skipped;
/// an `lm_head.weight` must equal `wte.weight` (tied head) and is then ignored. Every
/// parameter of [`gpt2_param_specs`] must be present with its exact file shape, and no
/// other key may be present ([`Error::Format`] naming the keys otherwise). File dtypes
/// F32, F64, BF16 and F16 are converted to `dtype`, rounding once. `Conv1D` weights are
/// transposed to `[out, in]`. Returns untracked CPU tensors in canonical order.
pub fn load_gpt2(dir_or_file: &Path, dtype: DType) -> Result<(Gpt2Config, Vec<(String, Tensor)>)> {
    if let Err(e) = std::fs::metadata(dir_or_file) {
        return Err(io_err(dir_or_file, e));
    }
    let (cfg_path, st_path) = checkpoint_paths(dir_or_file);
    let cfg = Gpt2Config::load_json(&cfg_path)?;
    let bytes = std::fs::read(&st_path).map_err(|e| io_err(&st_path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| st_err(&st_path, e))?;
    let specs = gpt2_param_specs(&cfg);

    // Canonical name -> (file key, view).
    let mut by_name: HashMap<String, (String, TensorView<'_>)> = HashMap::new();
    let mut lm_head: Option<(String, TensorView<'_>)> = None;
    let mut unknown = Vec::new();
    let mut file_keys: Vec<(String, TensorView<'_>)> = st.tensors();
    file_keys.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, view) in file_keys {
        let canon = key.strip_prefix(HF_PREFIX).unwrap_or(&key).to_string();
        if canon == "lm_head.weight" {
            if let Some((prev, _)) = &lm_head {
                return Err(fmt_err(
                    &st_path,
                    format!("both {prev:?} and {key:?} present"),
                ));
            }
            lm_head = Some((key, view));
            continue;
        }
        if is_mask_buffer(&canon, cfg.n_layer) {
            continue;
        }
        if let Some((prev, _)) = by_name.get(&canon) {
            return Err(fmt_err(
                &st_path,
                format!("{prev:?} and {key:?} both name parameter {canon}"),
            ));
        }
        by_name.insert(canon, (key, view));
    }

    let mut problems = Vec::new();
    let missing: Vec<String> = specs
        .iter()
        .filter(|s| !by_name.contains_key(&s.name))
        .map(|s| s.name.clone())
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "missing {} key(s): {}",
            missing.len(),
            list(&missing)
        ));
    }
    let expected: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    for (canon, (key, _)) in &by_name {
        if !expected.contains(canon.as_str()) {
            unknown.push(key.clone());
        }
    }
    unknown.sort();
    if !unknown.is_empty() {
        problems.push(format!(
            "{} unexpected key(s) (not a GPT-2 parameter for {} layers): {}",
            unknown.len(),
            cfg.n_layer,
            list(&unknown)
        ));
    }
    let mut bad_shapes = Vec::new();
    for s in &specs {
        if let Some((key, view)) = by_name.get(&s.name) {
            let want = s.file_shape();
            if view.shape() != want.as_slice() {
                bad_shapes.push(format!(
                    "{key}: expected file shape {want:?}{}, found {:?}",
                    if s.conv1d { " (Conv1D [in, out])" } else { "" },
                    view.shape()
                ));
            }
        }
    }
    if !bad_shapes.is_empty() {
        problems.push(format!(
            "{} shape mismatch(es) for config {}: {}",
            bad_shapes.len(),
            cfg_path.display(),
            list(&bad_shapes)
        ));
    }
    if !problems.is_empty() {
        return Err(fmt_err(&st_path, problems.join("; ")));
    }

    if let Some((key, head)) = &lm_head {
        let (_, wte) = &by_name["wte.weight"];
        if head.shape() != wte.shape() {
            return Err(fmt_err(
                &st_path,
                format!(
                    "{key}: shape {:?} differs from wte.weight {:?}; only tied LM heads are supported",
                    head.shape(),
                    wte.shape()
                ),
            ));
        }
        let h = decode(&st_path, key, head)?.to_vec::<f64>();
        let w = decode(&st_path, "wte.weight", wte)?.to_vec::<f64>();
        let tied = h
            .iter()
            .zip(&w)
            .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()));
        if !tied {
            return Err(fmt_err(
                &st_path,
                format!("{key} differs from wte.weight; only tied LM heads are supported"),
            ));
        }
    }

    let mut out = Vec::with_capacity(specs.len());
    for s in &specs {
        let (key, view) = &by_name[&s.name];
        let mut data = decode(&st_path, key, view)?;
        if s.conv1d {
            // File [in, out] -> internal [out, in].
            data = transpose_storage(&data, s.shape[1], s.shape[0]);
        }
        out.push((
            s.name.clone(),
            storage_to_tensor(data, s.shape.clone(), dtype)?,
        ));
    }
    Ok((cfg, out))
}

/// Saves a GPT-2 checkpoint into `dir` (created if needed): `config.json` and
/// `model.safetensors` in the original GPT-2 layout (no prefix, no `lm_head.weight`,
/// `Conv1D` weights as `[in, out]`), elements converted to `dtype`. `params` must hold
/// exactly the names of [`gpt2_param_specs`] (any order), each with its internal shape;
/// `wte.weight` may also come padded, `[`[`Gpt2Config::padded_vocab_size`]`, C]` as the
/// model keeps it: its first `V` rows are written, so the file has transformers' `[V, C]`.
/// Both files are written atomically.
pub fn save_gpt2(
    dir: &Path,
    cfg: &Gpt2Config,
    params: &[(String, Tensor)],
    dtype: DType,
) -> Result<()> {
    cfg.validate()?;
    let specs = gpt2_param_specs(cfg);
    let mut given: HashMap<&str, &Tensor> = HashMap::new();
    for (name, t) in params {
        if given.insert(name.as_str(), t).is_some() {
            return Err(Error::invalid(format!(
                "save_gpt2: parameter {name} given twice"
            )));
        }
    }
    let missing: Vec<String> = specs
        .iter()
        .filter(|s| !given.contains_key(s.name.as_str()))
        .map(|s| s.name.clone())
        .collect();
    if !missing.is_empty() {
        return Err(Error::invalid(format!(
            "save_gpt2: missing {} parameter(s): {}",
            missing.len(),
            list(&missing)
        )));
    }
    let expected: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut extra: Vec<String> = given
        .keys()
        .filter(|n| !expected.contains(*n))
        .map(|n| n.to_string())
        .collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(Error::invalid(format!(
            "save_gpt2: {} unexpected parameter(s) (not GPT-2 parameters for {} layers): {}",
            extra.len(),
            cfg.n_layer,
            list(&extra)
        )));
    }
    let padded_wte = [cfg.padded_vocab_size(), cfg.n_embd];
    for s in &specs {
        let t = given[s.name.as_str()];
        let padded = s.name == "wte.weight" && t.dims() == padded_wte;
        if t.dims() != s.shape.as_slice() && !padded {
            return Err(Error::shape(
                "save_gpt2",
                format!(
                    "{}: expected internal shape {:?}{}, got {}",
                    s.name,
                    s.shape,
                    if s.name == "wte.weight" {
                        format!(" (or the padded {padded_wte:?})")
                    } else {
                        String::new()
                    },
                    t.shape()
                ),
            ));
        }
    }

    let mut entries = Vec::with_capacity(specs.len());
    for s in &specs {
        let t = given[s.name.as_str()];
        let mut data = tensor_to_storage(t, dtype)?;
        // A padded wte: its first V rows.
        truncate_storage(&mut data, s.shape.iter().product());
        if s.conv1d {
            // Internal [out, in] -> file [in, out].
            data = transpose_storage(&data, s.shape[0], s.shape[1]);
        }
        entries.push(Entry {
            name: s.name.clone(),
            shape: s.file_shape(),
            data,
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    write_safetensors(&dir.join(WEIGHTS_FILE), entries, None)?;
    cfg.save_json(&dir.join(CONFIG_FILE))
}

/// Saves named tensors to a safetensors file (atomically), each in its own dtype and
/// shape, with optional string metadata in the header (`__metadata__`). Names must be
/// unique. Used for LoRA adapter files (PEFT naming, e.g.
/// `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`).
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut seen = BTreeSet::new();
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(Error::invalid(format!(
                "save_tensors: tensor {name} given twice"
            )));
        }
        entries.push(Entry {
            name: name.clone(),
            shape: t.dims().to_vec(),
            data: tensor_to_storage(t, t.dtype())?,
        });
    }
    write_safetensors(path, entries, metadata)
}

/// Loads every tensor of a safetensors file, sorted by name, each in its file dtype
/// (F32, F64, BF16 or F16; other dtypes are an [`Error::Format`]), as untracked CPU
/// tensors.
pub fn load_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Ok(load_tensors_with_metadata(path)?.0)
}

/// [`load_tensors`], plus the header's `__metadata__` map (empty when absent).
pub fn load_tensors_with_metadata(path: &Path) -> Result<(NamedTensors, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| st_err(path, e))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(|e| st_err(path, e))?;
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(views.len());
    for (name, view) in views {
        let data = decode(path, &name, &view)?;
        let dtype = data.dtype();
        let t = storage_to_tensor(data, view.shape().to_vec(), dtype)?;
        out.push((name, t));
    }
    Ok((out, metadata))
}

// ---------------------------------------------------------------------------------------
// Helpers.

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::format(path.display().to_string(), msg)
}

fn st_err(path: &Path, e: SafeTensorError) -> Error {
    match e {
        SafeTensorError::IoError(source) => io_err(path, source),
        e => fmt_err(path, format!("not a valid safetensors file: {e}")),
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
    }
}

/// Little-endian bytes to elements (any alignment of `bytes`).
fn from_le<T: Element>(bytes: &[u8]) -> Vec<T> {
    if cfg!(target_endian = "big") {
        let mut b = bytes.to_vec();
        b.chunks_exact_mut(std::mem::size_of::<T>())
            .for_each(|c| c.reverse());
        bytemuck::pod_collect_to_vec(&b)
    } else {
        bytemuck::pod_collect_to_vec(bytes)
    }
}

/// Elements to little-endian bytes.
fn to_le<T: Element>(v: &[T]) -> Vec<u8> {
    let mut b: Vec<u8> = bytemuck::cast_slice(v).to_vec();
    if cfg!(target_endian = "big") {
        b.chunks_exact_mut(std::mem::size_of::<T>())
            .for_each(|c| c.reverse());
    }
    b
}

/// Decodes one tensor of a file into host storage of its own dtype.
fn decode(path: &Path, key: &str, view: &TensorView<'_>) -> Result<CpuStorage> {
    let n = view
        .shape()
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| fmt_err(path, format!("{key}: shape {:?} overflows", view.shape())))?;
    let (size, make): (usize, fn(&[u8]) -> CpuStorage) = match view.dtype() {
        StDtype::F32 => (4, |b| CpuStorage::F32(from_le::<f32>(b))),
        StDtype::F64 => (8, |b| CpuStorage::F64(from_le::<f64>(b))),
        StDtype::BF16 => (2, |b| CpuStorage::BF16(from_le::<bf16>(b))),
        StDtype::F16 => (2, |b| CpuStorage::F16(from_le::<f16>(b))),
        d => {
            return Err(fmt_err(
                path,
                format!("{key}: dtype {d:?} is not supported (expected F32, F64, BF16 or F16)"),
            ));
        }
    };
    if n.checked_mul(size) != Some(view.data().len()) {
        return Err(fmt_err(
            path,
            format!(
                "{key}: {} data bytes for shape {:?} of {:?}",
                view.data().len(),
                view.shape(),
                view.dtype()
            ),
        ));
    }
    Ok(make(view.data()))
}

/// Transposes a row-major `[rows, cols]` matrix into `[cols, rows]`.
/// Works in 32×32 tiles so that both sides stay in cache on GPT-2-sized weights.
fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    debug_assert_eq!(v.len(), rows * cols);
    const TILE: usize = 32;
    let mut out = vec![T::default(); v.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = v[r * cols + c];
                }
            }
        }
    }
    out
}

fn transpose_storage(s: &CpuStorage, rows: usize, cols: usize) -> CpuStorage {
    match s {
        CpuStorage::F32(v) => CpuStorage::F32(transpose(v, rows, cols)),
        CpuStorage::F64(v) => CpuStorage::F64(transpose(v, rows, cols)),
        CpuStorage::BF16(v) => CpuStorage::BF16(transpose(v, rows, cols)),
        CpuStorage::F16(v) => CpuStorage::F16(transpose(v, rows, cols)),
    }
}

/// A tensor of `dtype` from host storage of any dtype (rounded once, no copy when equal).
fn storage_to_tensor(s: CpuStorage, shape: Vec<usize>, dtype: DType) -> Result<Tensor> {
    let d = Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_vec_as(v, shape, dtype, &d),
        CpuStorage::F64(v) => Tensor::from_vec_as(v, shape, dtype, &d),
        CpuStorage::BF16(v) => Tensor::from_vec_as(v, shape, dtype, &d),
        CpuStorage::F16(v) => Tensor::from_vec_as(v, shape, dtype, &d),
    }
}

/// A tensor's elements as host storage of `dtype` (rounded once).
fn tensor_to_storage(t: &Tensor, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(t.to_vec()?),
        DType::F64 => CpuStorage::F64(t.to_vec()?),
        DType::BF16 => CpuStorage::BF16(t.to_vec()?),
        DType::F16 => CpuStorage::F16(t.to_vec()?),
    })
}

/// Keeps the first `n` elements (no-op when there are no more).
fn truncate_storage(s: &mut CpuStorage, n: usize) {
    match s {
        CpuStorage::F32(v) => v.truncate(n),
        CpuStorage::F64(v) => v.truncate(n),
        CpuStorage::BF16(v) => v.truncate(n),
        CpuStorage::F16(v) => v.truncate(n),
    }
}

/// One tensor ready to be written.
struct Entry {
    name: String,
    shape: Vec<usize>,
    data: CpuStorage,
}

fn storage_bytes(s: &CpuStorage) -> Vec<u8> {
    match s {
        CpuStorage::F32(v) => to_le(v),
        CpuStorage::F64(v) => to_le(v),
        CpuStorage::BF16(v) => to_le(v),
        CpuStorage::F16(v) => to_le(v),
    }
}

/// Writes entries as a safetensors file, atomically.
fn write_safetensors(
    path: &Path,
    entries: Vec<Entry>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let encoded: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = entries
        .into_iter()
        .map(|e| {
            let bytes = storage_bytes(&e.data);
            (e.name, st_dtype(e.data.dtype()), e.shape, bytes)
        })
        .collect();
    let mut views = Vec::with_capacity(encoded.len());
    for (name, dt, shape, bytes) in &encoded {
        let view = TensorView::new(*dt, shape.clone(), bytes)
            .map_err(|e| fmt_err(path, format!("{name}: {e}")))?;
        views.push((name.as_str(), view));
    }
    write_atomic(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp).map_err(|e| st_err(tmp, e))
    })
}

/// Writes through `write` into a temporary file beside `path`, syncs it and renames it
/// over `path`. The temporary file is removed on failure.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(file_name) = path.file_name() else {
        return Err(Error::invalid(format!(
            "{}: not a file path",
            path.display()
        )));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write(&tmp).and_then(|()| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Persist the rename itself (best effort: not every platform can open a directory).
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use rand::Rng;

    fn tiny_cfg() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 11,
            n_positions: 7,
            n_embd: 8,
            n_layer: 2,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
        }
    }

    /// Random internal-layout parameters for `cfg`, f32 values.
    fn random_params(cfg: &Gpt2Config, rng: &mut impl Rng, dtype: DType) -> Vec<(String, Tensor)> {
        gpt2_param_specs(cfg)
            .into_iter()
            .map(|s| {
                let t = Tensor::randn(1.0, s.shape.clone(), dtype, &Device::Cpu, rng).unwrap();
                (s.name, t)
            })
            .collect()
    }

    /// A file tensor: name, file shape, f32 values (row-major in the file layout).
    type FileT = (String, Vec<usize>, Vec<f32>);

    /// Random file-layout tensors for `cfg` (Conv1D weights as [in, out]).
    fn file_tensors(cfg: &Gpt2Config, rng: &mut impl Rng) -> Vec<FileT> {
        gpt2_param_specs(cfg)
            .into_iter()
            .map(|s| {
                let shape = s.file_shape();
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                (s.name, shape, v)
            })
            .collect()
    }

    /// Writes a checkpoint dir directly with the safetensors crate (f32 in the file).
    fn write_dir(dir: &Path, cfg_json: &str, tensors: &[FileT]) {
        std::fs::write(dir.join(CONFIG_FILE), cfg_json).unwrap();
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, s, v)| {
                (
                    n.clone(),
                    s.clone(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    TensorView::new(StDtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(WEIGHTS_FILE)).unwrap();
    }

    fn cfg_json(cfg: &Gpt2Config) -> String {
        format!(
            r#"{{"model_type": "gpt2", "activation_function": "gelu_new", "vocab_size": {}, "n_ctx": {},
               "n_embd": {}, "n_layer": {}, "n_head": {}, "layer_norm_epsilon": {}, "resid_pdrop": 0.1,
               "task_specific_params": {{"text-generation": {{"do_sample": true}}}}}}"#,
            cfg.vocab_size,
            cfg.n_positions,
            cfg.n_embd,
            cfg.n_layer,
            cfg.n_head,
            cfg.layer_norm_epsilon
        )
    }

    fn bits(t: &Tensor) -> Vec<u64> {
        t.to_vec_f64()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    fn expect_format(r: Result<impl std::fmt::Debug>, needles: &[&str]) {
        match r {
            Err(e @ Error::Format { .. }) => {
                let msg = e.to_string();
                println!("{msg}");
                for n in needles {
                    assert!(msg.contains(n), "{msg:?} should mention {n:?}");
                }
            }
            other => panic!("expected Error::Format, got {other:?}"),
        }
    }

    #[test]
    fn tiled_transpose_matches_naive() {
        for (rows, cols) in [(1, 1), (3, 70), (70, 45), (64, 32), (33, 1)] {
            let v: Vec<u32> = (0..(rows * cols) as u32).collect();
            let t = transpose(&v, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], v[r * cols + c]);
                }
            }
            assert_eq!(transpose(&t, cols, rows), v);
        }
    }

    #[test]
    fn specs_shapes_and_count() {
        let cfg = Gpt2Config::gpt2_small();
        let specs = gpt2_param_specs(&cfg);
        assert_eq!(specs.len(), 4 + 12 * 12);
        let n: usize = specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(
            n, 124_439_808,
            "GPT-2 small has 124,439,808 parameters (tied head)"
        );
        let get = |name: &str| specs.iter().find(|s| s.name == name).unwrap().clone();
        assert_eq!(get("h.3.attn.c_attn.weight").shape, vec![2304, 768]);
        assert_eq!(get("h.3.attn.c_attn.weight").file_shape(), vec![768, 2304]);
        assert_eq!(get("h.3.mlp.c_proj.weight").shape, vec![768, 3072]);
        assert_eq!(get("h.3.mlp.c_proj.weight").file_shape(), vec![3072, 768]);
        assert!(!get("wte.weight").conv1d && get("h.0.mlp.c_fc.weight").conv1d);
        assert_eq!(specs[0].name, "wte.weight");
        assert_eq!(specs.last().unwrap().name, "ln_f.bias");
    }

    #[test]
    fn config_json_parsing_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        // n_ctx fallback, extra keys ignored, missing epsilon defaults.
        std::fs::write(
            &p,
            r#"{"vocab_size": 5, "n_ctx": 9, "n_embd": 4, "n_layer": 1, "n_head": 2, "foo": [1]}"#,
        )
        .unwrap();
        let c = Gpt2Config::load_json(&p).unwrap();
        assert_eq!((c.n_positions, c.layer_norm_epsilon), (9, 1e-5));
        // n_positions wins over n_ctx.
        std::fs::write(&p, r#"{"vocab_size": 5, "n_positions": 3, "n_ctx": 9, "n_embd": 4, "n_layer": 1, "n_head": 2}"#).unwrap();
        assert_eq!(Gpt2Config::load_json(&p).unwrap().n_positions, 3);
        // Round trip through save_json.
        let small = Gpt2Config::gpt2_small();
        small.save_json(&p).unwrap();
        assert_eq!(Gpt2Config::load_json(&p).unwrap(), small);
        // Invalid: n_embd % n_head != 0.
        std::fs::write(
            &p,
            r#"{"vocab_size": 5, "n_positions": 3, "n_embd": 10, "n_layer": 1, "n_head": 4}"#,
        )
        .unwrap();
        expect_format(Gpt2Config::load_json(&p), &["n_embd 10", "n_head 4"]);
        let mut bad = small.clone();
        bad.n_head = 5;
        assert!(matches!(bad.validate(), Err(Error::InvalidArgument(_))));
        bad.n_head = 0;
        assert!(matches!(bad.validate(), Err(Error::InvalidArgument(_))));
        assert!(matches!(bad.save_json(&p), Err(Error::InvalidArgument(_))));
        // Missing field, not JSON.
        std::fs::write(
            &p,
            r#"{"vocab_size": 5, "n_embd": 4, "n_layer": 1, "n_head": 2}"#,
        )
        .unwrap();
        expect_format(Gpt2Config::load_json(&p), &["n_positions"]);
        std::fs::write(&p, "not json").unwrap();
        expect_format(Gpt2Config::load_json(&p), &["config.json"]);
        assert!(matches!(
            Gpt2Config::load_json(&dir.path().join("nope.json")),
            Err(Error::Io { .. })
        ));
    }

    fn round_trip(dtype: DType, name: &str) {
        let mut rng = testing::rng(name);
        let cfg = tiny_cfg();
        let params = random_params(&cfg, &mut rng, dtype);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ckpt");
        save_gpt2(&out, &cfg, &params, dtype).unwrap();
        // No temporary files left behind.
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![CONFIG_FILE, WEIGHTS_FILE]);
        for path in [out.clone(), out.join(WEIGHTS_FILE)] {
            let (cfg2, loaded) = load_gpt2(&path, dtype).unwrap();
            assert_eq!(cfg2, cfg);
            assert_eq!(loaded.len(), params.len());
            for ((n0, t0), (n1, t1)) in params.iter().zip(&loaded) {
                assert_eq!(n0, n1);
                assert_eq!(t1.dtype(), dtype);
                assert_eq!(t0.dims(), t1.dims(), "{n0}");
                assert_eq!(bits(t0), bits(t1), "{n0} not bitwise equal");
            }
        }
        // The file itself holds Conv1D weights as [in, out], no prefix, no lm_head.
        let bytes = std::fs::read(out.join(WEIGHTS_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let v = st.tensor("h.1.mlp.c_fc.weight").unwrap();
        assert_eq!(v.shape(), &[8, 32]);
        assert_eq!(v.dtype(), st_dtype(dtype));
        assert!(
            st.names()
                .iter()
                .all(|n| !n.starts_with(HF_PREFIX) && *n != "lm_head.weight")
        );
    }

    #[test]
    fn round_trip_f32_bitwise() {
        round_trip(DType::F32, "round_trip_f32_bitwise");
    }

    #[test]
    fn round_trip_bf16_bitwise() {
        round_trip(DType::BF16, "round_trip_bf16_bitwise");
    }

    #[test]
    fn save_converts_dtype_once() {
        let mut rng = testing::rng("save_converts_dtype_once");
        let cfg = tiny_cfg();
        let params = random_params(&cfg, &mut rng, DType::F32);
        let dir = tempfile::tempdir().unwrap();
        save_gpt2(dir.path(), &cfg, &params, DType::BF16).unwrap();
        let (_, loaded) = load_gpt2(dir.path(), DType::F32).unwrap();
        for ((n, t0), (_, t1)) in params.iter().zip(&loaded) {
            let want: Vec<f32> = t0
                .to_vec::<bf16>()
                .unwrap()
                .iter()
                .map(|x| x.to_f32())
                .collect();
            assert_eq!(t1.to_vec_f32().unwrap(), want, "{n}");
        }
    }

    #[test]
    fn hf_prefix_without_lm_head_loads_and_conv1d_is_transposed() {
        let mut rng = testing::rng("hf_prefix_without_lm_head_loads");
        let cfg = tiny_cfg();
        let file = file_tensors(&cfg, &mut rng);
        let mut prefixed: Vec<FileT> = file
            .iter()
            .map(|(n, s, v)| (format!("{HF_PREFIX}{n}"), s.clone(), v.clone()))
            .collect();
        // Old HF files also carry the attention-mask buffers.
        prefixed.push((
            format!("{HF_PREFIX}h.0.attn.bias"),
            vec![1, 1, 7, 7],
            vec![1.0; 49],
        ));
        prefixed.push((
            format!("{HF_PREFIX}h.1.attn.masked_bias"),
            vec![],
            vec![-1e4],
        ));
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), &cfg_json(&cfg), &prefixed);
        let (cfg2, loaded) = load_gpt2(dir.path(), DType::F32).unwrap();
        assert_eq!(cfg2, cfg);
        let specs = gpt2_param_specs(&cfg);
        for ((spec, (name, t)), (_, fshape, fv)) in specs.iter().zip(&loaded).zip(&file) {
            assert_eq!(&spec.name, name);
            assert_eq!(t.dims(), spec.shape.as_slice());
            let got = t.to_vec_f32().unwrap();
            if spec.conv1d {
                let (rows_in, cols_out) = (fshape[0], fshape[1]);
                for i in 0..rows_in {
                    for j in 0..cols_out {
                        // file [i, j] == internal [j, i]
                        assert_eq!(
                            fv[i * cols_out + j],
                            got[j * rows_in + i],
                            "{name}[{i},{j}]"
                        );
                    }
                }
            } else {
                assert_eq!(&got, fv, "{name}");
            }
        }
    }

    #[test]
    fn tied_lm_head_loads_untied_errs() {
        let mut rng = testing::rng("tied_lm_head_loads_untied_errs");
        let cfg = tiny_cfg();
        let mut file = file_tensors(&cfg, &mut rng);
        let wte = file[0].clone();
        assert_eq!(wte.0, "wte.weight");
        file.push(("lm_head.weight".into(), wte.1.clone(), wte.2.clone()));
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), &cfg_json(&cfg), &file);
        let (_, loaded) = load_gpt2(dir.path(), DType::F64).unwrap();
        assert_eq!(loaded.len(), gpt2_param_specs(&cfg).len());
        assert!(
            loaded
                .iter()
                .all(|(n, t)| n != "lm_head.weight" && t.dtype() == DType::F64)
        );

        let last = file.len() - 1;
        file[last].2[5] += 0.25;
        write_dir(dir.path(), &cfg_json(&cfg), &file);
        expect_format(
            load_gpt2(dir.path(), DType::F32),
            &["lm_head.weight", "tied"],
        );
    }

    #[test]
    fn missing_wrong_shape_and_unknown_keys_err() {
        let mut rng = testing::rng("missing_wrong_shape_and_unknown_keys_err");
        let cfg = tiny_cfg();
        let file = file_tensors(&cfg, &mut rng);
        let dir = tempfile::tempdir().unwrap();
        let json = cfg_json(&cfg);

        let missing: Vec<FileT> = file
            .iter()
            .filter(|t| t.0 != "h.1.ln_2.bias")
            .cloned()
            .collect();
        write_dir(dir.path(), &json, &missing);
        expect_format(
            load_gpt2(dir.path(), DType::F32),
            &["missing 1 key", "h.1.ln_2.bias"],
        );

        // c_attn written in the internal layout [3C, C] instead of [C, 3C].
        let mut wrong = file.clone();
        let i = wrong
            .iter()
            .position(|t| t.0 == "h.0.attn.c_attn.weight")
            .unwrap();
        wrong[i].1 = vec![24, 8];
        write_dir(dir.path(), &json, &wrong);
        expect_format(
            load_gpt2(dir.path(), DType::F32),
            &[
                "h.0.attn.c_attn.weight",
                "expected file shape [8, 24]",
                "found [24, 8]",
            ],
        );

        let mut unknown = file.clone();
        unknown.push(("h.2.ln_1.weight".into(), vec![8], vec![0.0; 8]));
        unknown.push(("h.0.attn.bias".into(), vec![1, 1, 7, 7], vec![1.0; 49]));
        unknown.push(("h.5.attn.bias".into(), vec![1], vec![1.0]));
        write_dir(dir.path(), &json, &unknown);
        expect_format(
            load_gpt2(dir.path(), DType::F32),
            &["2 unexpected key", "h.2.ln_1.weight", "h.5.attn.bias"],
        );

        // The same parameter with and without prefix.
        let mut dup = file.clone();
        dup.push((format!("{HF_PREFIX}wpe.weight"), vec![7, 8], vec![0.0; 56]));
        write_dir(dir.path(), &json, &dup);
        expect_format(load_gpt2(dir.path(), DType::F32), &["wpe.weight"]);

        // A config that disagrees with the file: every shape is named.
        let mut other = cfg.clone();
        other.vocab_size = 12;
        write_dir(dir.path(), &cfg_json(&other), &file);
        expect_format(
            load_gpt2(dir.path(), DType::F32),
            &["wte.weight", "[12, 8]", "[11, 8]"],
        );
    }

    #[test]
    fn bad_files_err_without_panicking() {
        let mut rng = testing::rng("bad_files_err_without_panicking");
        let cfg = tiny_cfg();
        let file = file_tensors(&cfg, &mut rng);
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), &cfg_json(&cfg), &file);
        let st = dir.path().join(WEIGHTS_FILE);
        let full = std::fs::read(&st).unwrap();

        // Truncated at several points, header included.
        for cut in [0, 3, 8, 20, full.len() / 2, full.len() - 1] {
            std::fs::write(&st, &full[..cut]).unwrap();
            expect_format(load_gpt2(dir.path(), DType::F32), &["safetensors"]);
            expect_format(load_tensors(&st), &["safetensors"]);
        }
        // Garbage.
        let garbage: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
        std::fs::write(&st, &garbage).unwrap();
        expect_format(load_gpt2(dir.path(), DType::F32), &["safetensors"]);
        let mut header_len_ok = 16u64.to_le_bytes().to_vec();
        header_len_ok.extend_from_slice(b"{\"a\": 1, \"b\": 2}");
        std::fs::write(&st, &header_len_ok).unwrap();
        expect_format(load_gpt2(dir.path(), DType::F32), &["safetensors"]);

        // An integer tensor is refused with its dtype named.
        let ints = [1u8, 0, 0, 0, 2, 0, 0, 0];
        let view = TensorView::new(StDtype::I32, vec![2], &ints).unwrap();
        safetensors::serialize_to_file(vec![("ids", view)], None, &st).unwrap();
        expect_format(load_tensors(&st), &["ids", "I32"]);

        // Missing files.
        std::fs::write(&st, &full).unwrap();
        std::fs::remove_file(dir.path().join(CONFIG_FILE)).unwrap();
        assert!(
            matches!(load_gpt2(dir.path(), DType::F32), Err(Error::Io { path, .. }) if path.ends_with(CONFIG_FILE))
        );
        assert!(matches!(load_gpt2(&st, DType::F32), Err(Error::Io { .. })));
        std::fs::write(dir.path().join(CONFIG_FILE), cfg_json(&cfg)).unwrap();
        std::fs::remove_file(&st).unwrap();
        assert!(
            matches!(load_gpt2(dir.path(), DType::F32), Err(Error::Io { path, .. }) if path.ends_with(WEIGHTS_FILE))
        );
        assert!(matches!(load_tensors(&st), Err(Error::Io { .. })));
        let nowhere = dir.path().join("no_such_checkpoint");
        assert!(
            matches!(load_gpt2(&nowhere, DType::F32), Err(Error::Io { path, .. }) if path.ends_with("no_such_checkpoint"))
        );

        // Invalid config.
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            r#"{"vocab_size": 11, "n_positions": 7, "n_embd": 8, "n_layer": 2, "n_head": 3}"#,
        )
        .unwrap();
        expect_format(load_gpt2(dir.path(), DType::F32), &["n_head 3"]);
    }

    #[test]
    fn save_gpt2_checks_its_inputs() {
        let mut rng = testing::rng("save_gpt2_checks_its_inputs");
        let cfg = tiny_cfg();
        let params = random_params(&cfg, &mut rng, DType::F32);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();

        let missing: Vec<_> = params
            .iter()
            .filter(|p| p.0 != "ln_f.bias")
            .cloned()
            .collect();
        let e = save_gpt2(out, &cfg, &missing, DType::F32).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("ln_f.bias")),
            "{e}"
        );

        let mut extra = params.clone();
        extra.push((
            "h.0.attn.c_attn.lora_A.weight".into(),
            Tensor::zeros([2, 8], DType::F32, &Device::Cpu).unwrap(),
        ));
        let e = save_gpt2(out, &cfg, &extra, DType::F32).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("lora_A")),
            "{e}"
        );

        let mut dup = params.clone();
        dup.push(params[3].clone());
        assert!(matches!(
            save_gpt2(out, &cfg, &dup, DType::F32),
            Err(Error::InvalidArgument(_))
        ));

        // A Conv1D weight handed over in the file layout [in, out] is a shape error.
        let mut wrong = params.clone();
        let i = wrong
            .iter()
            .position(|p| p.0 == "h.1.mlp.c_fc.weight")
            .unwrap();
        wrong[i].1 = Tensor::zeros([8, 32], DType::F32, &Device::Cpu).unwrap();
        let e = save_gpt2(out, &cfg, &wrong, DType::F32).unwrap_err();
        assert!(
            matches!(&e, Error::Shape { msg, .. } if msg.contains("h.1.mlp.c_fc.weight")),
            "{e}"
        );

        let mut bad_cfg = cfg.clone();
        bad_cfg.n_head = 3;
        assert!(matches!(
            save_gpt2(out, &bad_cfg, &params, DType::F32),
            Err(Error::InvalidArgument(_))
        ));
        // Nothing was written by the failed calls.
        assert_eq!(std::fs::read_dir(out).unwrap().count(), 0);
    }

    #[test]
    fn generic_tensors_round_trip_with_metadata() {
        let mut rng = testing::rng("generic_tensors_round_trip_with_metadata");
        let d = Device::Cpu;
        let tensors = vec![
            (
                "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight".to_string(),
                Tensor::randn(1.0, [24, 4], DType::BF16, &d, &mut rng).unwrap(),
            ),
            (
                "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight".to_string(),
                Tensor::randn(1.0, [4, 8], DType::F32, &d, &mut rng).unwrap(),
            ),
            (
                "x.f16".to_string(),
                Tensor::randn(1.0, [3], DType::F16, &d, &mut rng).unwrap(),
            ),
            (
                "x.f64".to_string(),
                Tensor::randn(1.0, [2, 1, 2], DType::F64, &d, &mut rng).unwrap(),
            ),
            (
                "scalar".to_string(),
                Tensor::full(2.5, Vec::<usize>::new(), DType::F32, &d).unwrap(),
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_model.safetensors");
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        save_tensors(&path, &tensors, Some(meta.clone())).unwrap();
        let (loaded, meta2) = load_tensors_with_metadata(&path).unwrap();
        assert_eq!(meta2, meta);
        let mut want = tensors.clone();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(loaded.len(), want.len());
        for ((n0, t0), (n1, t1)) in want.iter().zip(&loaded) {
            assert_eq!(n0, n1);
            assert_eq!((t0.dtype(), t0.dims()), (t1.dtype(), t1.dims()), "{n0}");
            assert_eq!(bits(t0), bits(t1), "{n0}");
        }
        // Overwriting an existing file works; no metadata gives an empty map.
        save_tensors(&path, &tensors[..1], None).unwrap();
        let (loaded, meta3) = load_tensors_with_metadata(&path).unwrap();
        assert_eq!(loaded.len(), 1);
        assert!(meta3.is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left behind"
        );

        let dup = vec![tensors[0].clone(), tensors[0].clone()];
        assert!(matches!(
            save_tensors(&path, &dup, None),
            Err(Error::InvalidArgument(_))
        ));
        // A missing directory is an i/o error, not a panic.
        assert!(matches!(
            save_tensors(
                &dir.path().join("no/such/dir/x.safetensors"),
                &tensors,
                None
            ),
            Err(Error::Io { .. })
        ));
    }
}
