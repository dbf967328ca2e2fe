//! PEFT's adapter format, both ways: `adapter_config.json` and the tensors of
//! `adapter_model.safetensors` as PEFT writes and reads them for GPT-2.
//!
//! - **Targets.** PEFT matches `target_modules` against the base model's module names
//!   (`transformer.h.3.attn.c_attn`): a list entry matches a name equal to it or ending in
//!   `.entry`, a string is a regular expression that must match the whole name, `null` is
//!   GPT-2's default (`c_attn`) and `"all-linear"` is every linear layer but the LM head.
//!   lorafuse adapts a module in every block or in none, so a match on only some blocks, or
//!   on a module it cannot adapt (`lm_head`, `wte`, a LayerNorm), is an error.
//! - **q/k/v thirds** (loralib's `MergedLinear`) have no PEFT name. They are saved as one
//!   block-structured `c_attn` adapter that PEFT loads exactly: for `m` adapted thirds of
//!   rank `r`, `lora_A [m·r, C]` stacks their `A`s, `lora_B [3C, m·r]` holds each `B` in its
//!   third's rows and its own `r` columns (zero elsewhere), so `B·A` is the thirds' `B·A`s
//!   stacked. PEFT's scale for it is `α'/(m·r)` (`α'/√(m·r)` with rsLoRA), so
//!   `rank_pattern` gives `c_attn` rank `m·r` and `alpha_pattern` gives it `α' = m·α`
//!   (`√m·α`): the same scale `α/r` (`α/√r`). `lorafuse_targets` keeps the exact layout,
//!   and loading checks that the zero blocks are zero.
//! - **Anything PEFT can express that lorafuse does not do** (DoRA, patterns on other
//!   modules, `modules_to_save`, bias training, ...) is refused by name, never ignored.

use super::Gpt2;
use crate::lora::{LoraConfig, LoraTarget};
use crate::{Device, Result, Tensor};
use serde_json::{Value, json};

/// The PEFT prefix of every adapter tensor name.
const PREFIX: &str = "base_model.model.";

/// The four block modules lorafuse can adapt, as named inside a block.
const ADAPTABLE: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

/// The name `target_modules` gets for a target (PEFT's suffix match: `c_attn`,
/// `attn.c_proj`, `c_fc`, `mlp.c_proj`; `c_proj` alone would match both projections).
fn peft_module_name(t: LoraTarget) -> &'static str {
    match t {
        LoraTarget::CAttn | LoraTarget::CAttnQ | LoraTarget::CAttnK | LoraTarget::CAttnV => {
            "c_attn"
        }
        LoraTarget::AttnCProj => "attn.c_proj",
        LoraTarget::MlpCFc => "c_fc",
        LoraTarget::MlpCProj => "mlp.c_proj",
    }
}

fn is_third(t: &LoraTarget) -> bool {
    matches!(
        t,
        LoraTarget::CAttnQ | LoraTarget::CAttnK | LoraTarget::CAttnV
    )
}

/// The number of adapted q/k/v thirds.
fn thirds(cfg: &LoraConfig) -> usize {
    cfg.targets.iter().filter(|t| is_third(t)).count()
}

/// `adapter_config.json` for `cfg`, as PEFT reads it (see the module docs for thirds).
pub(crate) fn config_json(cfg: &LoraConfig) -> Value {
    let mut modules: Vec<&str> = cfg.targets.iter().map(|&t| peft_module_name(t)).collect();
    modules.sort_unstable();
    modules.dedup();
    let m = thirds(cfg);
    let (rank_pattern, alpha_pattern) = if m == 0 {
        (json!({}), json!({}))
    } else {
        let widen = if cfg.use_rslora {
            (m as f64).sqrt()
        } else {
            m as f64
        };
        (
            json!({ "c_attn": m * cfg.r }),
            json!({ "c_attn": cfg.alpha * widen }),
        )
    };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": true,
        "bias": "none",
        "target_modules": modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lorafuse_targets": cfg.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
    })
}

/// Why a config is refused: the PEFT features lorafuse does not implement, by name.
fn unsupported_feature(v: &Value) -> Option<String> {
    let set = |k: &str| match v.get(k) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    if let Some(t) = v.get("peft_type").and_then(Value::as_str)
        && t != "LORA"
    {
        return Some(format!("peft_type {t:?} (only LORA adapters load)"));
    }
    for (key, what) in [
        ("use_dora", "DoRA (`use_dora`)"),
        (
            "modules_to_save",
            "`modules_to_save` (fully trained extra modules)",
        ),
        (
            "layers_to_transform",
            "`layers_to_transform` (adapters on some layers only)",
        ),
        ("layer_replication", "`layer_replication`"),
        ("lora_bias", "`lora_bias` (a trained bias on lora_B)"),
        ("use_qalora", "QA-LoRA (`use_qalora`)"),
        ("exclude_modules", "`exclude_modules`"),
        ("target_parameters", "`target_parameters`"),
        ("trainable_token_indices", "`trainable_token_indices`"),
        (
            "alora_invocation_tokens",
            "activated LoRA (`alora_invocation_tokens`)",
        ),
        ("megatron_config", "`megatron_config`"),
        ("arrow_config", "`arrow_config`"),
    ] {
        if set(key) {
            return Some(format!("{what} is not supported"));
        }
    }
    match v.get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(b) => return Some(format!("bias {b:?} is not supported (only \"none\")")),
    }
    // These initialisations also rewrite the base weights, so the adapter is only valid on
    // a base that was changed the same way.
    if let Some(init) = v.get("init_lora_weights").and_then(Value::as_str)
        && !matches!(init, "gaussian" | "eva" | "orthogonal")
    {
        return Some(format!(
            "init_lora_weights {init:?} is not supported (it changes the base weights)"
        ));
    }
    None
}

/// Does PEFT's `target_modules` select the module called `key`?
fn selects(target_modules: &Value, key: &str) -> std::result::Result<bool, String> {
    match target_modules {
        Value::Array(list) => {
            for t in list {
                let t = t
                    .as_str()
                    .ok_or_else(|| "a `target_modules` entry is not a string".to_string())?;
                if key == t || key.ends_with(&format!(".{t}")) {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Value::String(re) => {
            let anchored = regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| {
                format!("`target_modules` {re:?} is not a regular expression lorafuse reads: {e}")
            })?;
            Ok(anchored.is_match(key))
        }
        _ => Err("`target_modules` must be a list of names or a regular expression".into()),
    }
}

/// The lorafuse targets that PEFT's `target_modules` selects in a GPT-2 of `n_layer`
/// blocks, or why they cannot be loaded.
fn peft_targets(
    target_modules: Option<&Value>,
    n_layer: usize,
) -> std::result::Result<Vec<LoraTarget>, String> {
    let tm = match target_modules {
        None | Some(Value::Null) => return Ok(vec![LoraTarget::CAttn]),
        Some(Value::String(s)) if s == "all-linear" => {
            return Ok(vec![
                LoraTarget::CAttn,
                LoraTarget::AttnCProj,
                LoraTarget::MlpCFc,
                LoraTarget::MlpCProj,
            ]);
        }
        Some(v) => v,
    };
    // Every other module of GPT2LMHeadModel that a pattern could reach.
    let mut others: Vec<String> = [
        "transformer.wte",
        "transformer.wpe",
        "transformer.ln_f",
        "lm_head",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..n_layer {
        for m in ["ln_1", "ln_2", "attn", "mlp"] {
            others.push(format!("transformer.h.{i}.{m}"));
        }
    }
    for key in &others {
        if selects(tm, key)? {
            return Err(format!(
                "`target_modules` selects {key}, which lorafuse cannot adapt (it adapts {})",
                ADAPTABLE.join(", ")
            ));
        }
    }
    let mut targets = Vec::new();
    for (module, target) in ADAPTABLE.iter().zip([
        LoraTarget::CAttn,
        LoraTarget::AttnCProj,
        LoraTarget::MlpCFc,
        LoraTarget::MlpCProj,
    ]) {
        let mut hit = Vec::new();
        for i in 0..n_layer {
            if selects(tm, &format!("transformer.h.{i}.{module}"))? {
                hit.push(i);
            }
        }
        if hit.len() == n_layer {
            targets.push(target);
        } else if !hit.is_empty() {
            return Err(format!(
                "`target_modules` selects {module} in blocks {hit:?} only; lorafuse adapts a module in every block"
            ));
        }
    }
    if targets.is_empty() {
        return Err(format!(
            "`target_modules` {tm} selects none of {}",
            ADAPTABLE.join(", ")
        ));
    }
    Ok(targets)
}

/// Reads `adapter_config.json` (parsed) for a GPT-2 of `n_layer` blocks: the adapters'
/// configuration, or why it cannot be loaded exactly.
pub(crate) fn parse_config(v: &Value, n_layer: usize) -> std::result::Result<LoraConfig, String> {
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    if let Some(why) = unsupported_feature(v) {
        return Err(why);
    }
    let r = v["r"]
        .as_u64()
        .filter(|&r| r > 0)
        .ok_or("`r` must be a positive integer")? as usize;
    let alpha = v["lora_alpha"]
        .as_f64()
        .ok_or("`lora_alpha` must be a number")?;
    let mut cfg = LoraConfig {
        r,
        alpha,
        use_rslora: v["use_rslora"].as_bool().unwrap_or(false),
        dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
        targets: vec![],
        ..Default::default()
    };
    let empty = |k: &str| match v.get(k) {
        None | Some(Value::Null) => true,
        Some(Value::Object(o)) => o.is_empty(),
        _ => false,
    };
    match v.get("lorafuse_targets") {
        Some(Value::Array(names)) => {
            cfg.targets = names
                .iter()
                .map(|n| {
                    n.as_str()
                        .ok_or_else(|| "a `lorafuse_targets` entry is not a string".to_string())
                        .and_then(|n| LoraTarget::parse(n).map_err(|e| e.to_string()))
                })
                .collect::<std::result::Result<_, _>>()?;
            cfg.validate().map_err(|e| e.to_string())?;
            // What PEFT reads must describe the same adapters, or the two would disagree.
            let want = config_json(&cfg);
            for key in ["target_modules", "rank_pattern", "alpha_pattern"] {
                let same = v.get(key) == want.get(key) || (empty(key) && thirds(&cfg) == 0);
                if !same {
                    return Err(format!(
                        "`{key}` is {} but `lorafuse_targets` {} needs {}",
                        v.get(key).unwrap_or(&Value::Null),
                        v["lorafuse_targets"],
                        want[key]
                    ));
                }
            }
        }
        Some(_) => return Err("`lorafuse_targets` must be a list of names".into()),
        None => {
            for key in ["rank_pattern", "alpha_pattern"] {
                if !empty(key) {
                    return Err(format!(
                        "`{key}` (per-module ranks or alphas) is not supported: {}",
                        v[key]
                    ));
                }
            }
            cfg.targets = peft_targets(v.get("target_modules"), n_layer)?;
        }
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// PEFT's scale of the module called `key` (`transformer.h.0.attn.c_attn`): `lora_alpha`
/// over `r`, each overridden by the first `alpha_pattern`/`rank_pattern` entry equal to
/// `key` or matching a suffix of it, as PEFT does.
pub(crate) fn module_scale(v: &Value, key: &str) -> std::result::Result<f64, String> {
    let pick = |pattern: &str, default: Option<f64>| -> std::result::Result<Option<f64>, String> {
        if let Some(Value::Object(p)) = v.get(pattern) {
            for (k, val) in p {
                let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
                    .map_err(|e| format!("`{pattern}` key {k:?}: {e}"))?;
                if k == key || re.is_match(key) {
                    return Ok(val.as_f64());
                }
            }
        }
        Ok(default)
    };
    let r = pick("rank_pattern", v["r"].as_f64())?
        .filter(|&r| r > 0.0)
        .ok_or("`r` must be a positive integer")?;
    let alpha =
        pick("alpha_pattern", v["lora_alpha"].as_f64())?.ok_or("`lora_alpha` must be a number")?;
    Ok(if v["use_rslora"].as_bool().unwrap_or(false) {
        alpha / r.sqrt()
    } else {
        alpha / r
    })
}

/// The adapter tensors of `model` under PEFT's names: each block's q/k/v thirds of
/// `c_attn` become one block-structured pair. Host tensors, exact in every dtype.
pub(crate) fn to_peft_tensors(model: &Gpt2) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (i, blk) in model.blocks.iter().enumerate() {
        for (module, lin) in blk.linears() {
            let p = format!("{PREFIX}transformer.h.{i}.{module}");
            match lin.adapters.as_slice() {
                [] => {}
                [ad] if ad.suffix.is_empty() => {
                    out.push((format!("{p}.lora_A.weight"), ad.a.clone()));
                    out.push((format!("{p}.lora_B.weight"), ad.b.clone()));
                }
                thirds => {
                    let (mr, c_out) = (thirds.len() * thirds[0].rank(), lin.weight.dims()[0]);
                    let mut a = Vec::new();
                    let mut b = vec![0.0f64; c_out * mr];
                    let mut col = 0;
                    for ad in thirds {
                        a.extend(ad.a.to_vec_f64()?);
                        let (r, tb) = (ad.rank(), ad.b.to_vec_f64()?);
                        for (row, out_row) in ad.cols.clone().enumerate() {
                            b[out_row * mr + col..out_row * mr + col + r]
                                .copy_from_slice(&tb[row * r..(row + 1) * r]);
                        }
                        col += r;
                    }
                    let (dtype, inp) = (thirds[0].a.dtype(), thirds[0].a.dims()[1]);
                    out.push((
                        format!("{p}.lora_A.weight"),
                        Tensor::from_vec_as(a, [mr, inp], dtype, &Device::Cpu)?,
                    ));
                    out.push((
                        format!("{p}.lora_B.weight"),
                        Tensor::from_vec_as(b, [c_out, mr], dtype, &Device::Cpu)?,
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Fills the adapters attached to `staged` (by `attach_lora` with the config read from the
/// same directory) from a PEFT file's tensors, splitting block-structured `c_attn` pairs
/// back into thirds and checking that their zero blocks are zero. Every tensor must be
/// used, with its exact shape.
pub(crate) fn load_peft_tensors(
    staged: &Gpt2,
    loaded: &[(String, Tensor)],
) -> std::result::Result<(), String> {
    let mut used = 0;
    let mut find = |name: &str, dims: [usize; 2]| -> std::result::Result<Vec<f64>, String> {
        let t = loaded
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| format!("missing {name}"))?;
        if t.dims() != dims {
            return Err(format!(
                "{name}: expected {}, found {}",
                crate::Shape::from(dims),
                t.shape()
            ));
        }
        used += 1;
        t.to_vec_f64().map_err(|e| e.to_string())
    };
    let assign = |t: &Tensor, v: &[f64]| t.assign(v).map_err(|e| e.to_string());
    for (i, blk) in staged.blocks.iter().enumerate() {
        for (module, lin) in blk.linears() {
            let p = format!("{PREFIX}transformer.h.{i}.{module}");
            let (a_name, b_name) = (format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight"));
            match lin.adapters.as_slice() {
                [] => {}
                [ad] if ad.suffix.is_empty() => {
                    let (ad_dims, bd_dims) = (ad.a.dims(), ad.b.dims());
                    assign(&ad.a, &find(&a_name, [ad_dims[0], ad_dims[1]])?)?;
                    assign(&ad.b, &find(&b_name, [bd_dims[0], bd_dims[1]])?)?;
                }
                thirds => {
                    let (r, inp) = (thirds[0].rank(), thirds[0].a.dims()[1]);
                    let (mr, c_out) = (thirds.len() * r, lin.weight.dims()[0]);
                    let a = find(&a_name, [mr, inp])?;
                    let b = find(&b_name, [c_out, mr])?;
                    // Column block j belongs to thirds[j]: only its own rows may be non-zero.
                    for (row, brow) in b.chunks(mr).enumerate() {
                        for (col, &x) in brow.iter().enumerate() {
                            if x != 0.0 && !thirds[col / r].cols.contains(&row) {
                                return Err(format!(
                                    "{b_name} is not the block-structured q/k/v adapter that `lorafuse_targets` says: element [{row}, {col}] is {x}, not 0"
                                ));
                            }
                        }
                    }
                    for (j, ad) in thirds.iter().enumerate() {
                        assign(&ad.a, &a[j * r * inp..(j + 1) * r * inp])?;
                        let mine: Vec<f64> = ad
                            .cols
                            .clone()
                            .flat_map(|row| b[row * mr + j * r..row * mr + (j + 1) * r].to_vec())
                            .collect();
                        assign(&ad.b, &mine)?;
                    }
                }
            }
        }
    }
    if used != loaded.len() {
        let extra: Vec<&str> = loaded
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| {
                !staged.blocks.iter().enumerate().any(|(i, blk)| {
                    blk.linears().iter().any(|(m, l)| {
                        !l.adapters.is_empty()
                            && n.starts_with(&format!("{PREFIX}transformer.h.{i}.{m}.lora_"))
                    })
                })
            })
            .collect();
        return Err(format!(
            "{} tensors, expected {used}; not adapters of this configuration: {extra:?}",
            loaded.len()
        ));
    }
    Ok(())
}

/// The PEFT module key (`transformer.h.0.attn.c_attn`) of a PEFT tensor name.
pub(crate) fn module_key(tensor_name: &str) -> Option<&str> {
    let (module, _) = tensor_name.split_once(".lora_")?;
    Some(module.strip_prefix(PREFIX).unwrap_or(module))
}

#[cfg(test)]
#[path = "peft_tests.rs"]
mod tests;
