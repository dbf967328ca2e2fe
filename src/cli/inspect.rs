//! `lorafuse inspect`: what an adapter directory holds, read without a model.

use crate::checkpoint;
use crate::model::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, peft};
use crate::{Error, Result};
use clap::Args;
use std::path::{Path, PathBuf};

/// `lorafuse inspect ADAPTER`.
#[derive(Args, Clone, Debug)]
pub struct InspectArgs {
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    pub adapter: PathBuf,
}

/// One adapted module: `ΔW = scale·B·A`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterModule {
    /// The module's name as saved (PEFT's; q/k/v thirds of `c_attn` are one
    /// block-structured `c_attn` module).
    pub name: String,
    /// The rank (rows of A).
    pub rank: usize,
    /// `A`'s input width.
    pub in_features: usize,
    /// `B`'s output height.
    pub out_features: usize,
    /// `‖B·A‖_F`.
    pub ba_norm: f64,
    /// PEFT's scale for this module (`alpha_pattern`/`rank_pattern` applied).
    pub scale: f64,
    /// `‖ΔW‖_F = scale·‖B·A‖_F`.
    pub delta_norm: f64,
}

/// What `inspect` found.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterReport {
    /// `adapter_config.json` as saved.
    pub config: serde_json::Value,
    /// `lora_alpha/r`, or `lora_alpha/√r` with rsLoRA (a module's own may differ: see
    /// [`AdapterModule::scale`]).
    pub scale: f64,
    /// The adapted modules, by name.
    pub modules: Vec<AdapterModule>,
    /// Every adapter parameter.
    pub parameters: usize,
}

/// `‖B·A‖_F` from the `r×r` Gram matrices: `Σ_ij (BᵀB)_ij (A·Aᵀ)_ij`, so no `out×in`
/// product is formed. `a` is `[r, in]`, `b` is `[out, r]`, row-major.
fn ba_frobenius(a: &[f64], b: &[f64], r: usize, inp: usize, out: usize) -> f64 {
    let mut sum = 0.0;
    for i in 0..r {
        for j in 0..r {
            let aa: f64 = (0..inp).map(|k| a[i * inp + k] * a[j * inp + k]).sum();
            let bb: f64 = (0..out).map(|k| b[k * r + i] * b[k * r + j]).sum();
            sum += aa * bb;
        }
    }
    sum.max(0.0).sqrt()
}

/// Reads and summarises an adapter directory.
pub fn inspect_adapter(dir: &Path) -> Result<AdapterReport> {
    let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| checkpoint::io_err(&cfg_path, e))?;
    let bad = |m: String| Error::format(cfg_path.display().to_string(), m);
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    // The scale of a module no pattern names.
    let scale = peft::module_scale(&config, "").map_err(bad)?;
    let w_path = dir.join(ADAPTER_WEIGHTS_FILE);
    let tensors = checkpoint::load_tensors(&w_path)?;
    let wbad = |m: String| Error::format(w_path.display().to_string(), m);
    let mut modules = Vec::new();
    let mut parameters = 0;
    for (name, a) in &tensors {
        parameters += a.elem_count();
        let Some((module, rest)) = name.split_once(".lora_A") else {
            continue;
        };
        let b_name = format!("{module}.lora_B{rest}");
        let b = tensors
            .iter()
            .find(|(n, _)| *n == b_name)
            .map(|(_, t)| t)
            .ok_or_else(|| wbad(format!("{name} has no {b_name}")))?;
        let (ad, bd) = (a.dims(), b.dims());
        if ad.len() != 2 || bd.len() != 2 || bd[1] != ad[0] {
            return Err(wbad(format!(
                "{name} {ad:?} and {b_name} {bd:?} are not [r, in] and [out, r]"
            )));
        }
        let (rank, inp, out) = (ad[0], ad[1], bd[0]);
        let ba = ba_frobenius(&a.to_vec_f64()?, &b.to_vec_f64()?, rank, inp, out);
        let suffix = rest.trim_end_matches(".weight");
        let key = peft::module_key(name).unwrap_or(module);
        let s = peft::module_scale(&config, key).map_err(bad)?;
        modules.push(AdapterModule {
            name: format!("{key}{suffix}"),
            rank,
            in_features: inp,
            out_features: out,
            ba_norm: ba,
            scale: s,
            delta_norm: s * ba,
        });
    }
    if modules.is_empty() {
        return Err(wbad("no lora_A/lora_B pair".into()));
    }
    modules.sort_by(|x, y| x.name.cmp(&y.name));
    Ok(AdapterReport {
        config,
        scale,
        modules,
        parameters,
    })
}

/// Runs `lorafuse inspect` (see [`InspectArgs`]) and prints the report.
pub fn run_inspect(args: &InspectArgs) -> Result<AdapterReport> {
    let rep = inspect_adapter(&args.adapter)?;
    let c = &rep.config;
    println!("adapter {}", args.adapter.display());
    println!(
        "  r {}  lora_alpha {}  scale {:.4}  rslora {}  dropout {}",
        c["r"], c["lora_alpha"], rep.scale, c["use_rslora"], c["lora_dropout"]
    );
    println!("  target_modules {}", c["target_modules"]);
    if !c["lorafuse_targets"].is_null() {
        println!("  lorafuse_targets {}", c["lorafuse_targets"]);
    }
    println!(
        "  {} parameters in {} modules",
        rep.parameters,
        rep.modules.len()
    );
    println!(
        "  {:<40} {:>5} {:>12} {:>8} {:>12} {:>12}",
        "module", "rank", "in × out", "scale", "‖B·A‖_F", "‖ΔW‖_F"
    );
    for m in &rep.modules {
        println!(
            "  {:<40} {:>5} {:>12} {:>8.4} {:>12.4e} {:>12.4e}",
            m.name,
            m.rank,
            format!("{}×{}", m.in_features, m.out_features),
            m.scale,
            m.ba_norm,
            m.delta_norm
        );
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gram_form_is_the_frobenius_norm_of_the_product() {
        let (r, inp, out) = (3, 5, 4);
        let a: Vec<f64> = (0..r * inp).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..out * r).map(|i| (i as f64 * 0.91).cos()).collect();
        let mut direct = 0.0;
        for o in 0..out {
            for k in 0..inp {
                let v: f64 = (0..r).map(|j| b[o * r + j] * a[j * inp + k]).sum();
                direct += v * v;
            }
        }
        let got = ba_frobenius(&a, &b, r, inp, out);
        assert!(
            (got - direct.sqrt()).abs() < 1e-12,
            "{got} vs {}",
            direct.sqrt()
        );
    }
}
