//! LoRA adapters with PEFT's conventions (DESIGN §2).
//!
//! A frozen weight `W0 [out, in]` is adapted by `s·B·A`, `A [r, in]`, `B [out, r]`, with
//! `s = α/r` (or `α/√r` for rsLoRA). `A` starts Kaiming-uniform (`a = √5`, as
//! `nn.Linear`: bound `1/√in`) or Gaussian (std `1/r`), `B` starts at zero, so training
//! starts exactly at the base model. Targets are GPT-2 module names; `c_attn.q`,
//! `c_attn.k`, `c_attn.v` adapt one third of the fused qkv projection each (loralib's
//! `MergedLinear`, the paper's q/v setting).
//!
//! Merging ([`merge_into`], the op [`crate::ops::lora_merge`]) folds the adapter into the
//! weight: `W ← W + c·s·B·A` (`c = +1` merge, `−1` unmerge), computed in f32 (f64 for f64
//! weights) and rounded once to the weight's dtype. In bf16 a merge→unmerge round trip is not exact: each of the two roundings is at
//! most ½ ulp of the stored value, so the round trip moves an element by at most
//! `2^-8·(|w| + |w + s·(BA)|)`, measured and bounded in this module's tests.

use crate::ops::LoraTerm;
use crate::optim::Rounding;
use crate::{DType, Device, Error, Result, Tensor};
use rand::Rng;
use std::ops::Range;

/// How `A` is initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// Kaiming-uniform with `a = √5` (PEFT's default): `U(−1/√in, 1/√in)`.
    #[default]
    KaimingUniform,
    /// Gaussian with std `1/r` (PEFT's `init_lora_weights="gaussian"`).
    Gaussian,
}

/// A module of a GPT-2 block that an adapter can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    /// The whole fused qkv projection `attn.c_attn` (PEFT's `c_attn`).
    CAttn,
    /// The query third of `c_attn`.
    CAttnQ,
    /// The key third of `c_attn`.
    CAttnK,
    /// The value third of `c_attn`.
    CAttnV,
    /// The attention output projection `attn.c_proj`.
    AttnCProj,
    /// The MLP up projection `mlp.c_fc`.
    MlpCFc,
    /// The MLP down projection `mlp.c_proj`.
    MlpCProj,
}

impl LoraTarget {
    /// Parses a module name: `c_attn`, `c_attn.q`/`q`, `c_attn.k`/`k`, `c_attn.v`/`v`,
    /// `attn.c_proj`, `mlp.c_fc`/`c_fc`, `mlp.c_proj`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "c_attn" | "attn.c_attn" => LoraTarget::CAttn,
            "c_attn.q" | "q" => LoraTarget::CAttnQ,
            "c_attn.k" | "k" => LoraTarget::CAttnK,
            "c_attn.v" | "v" => LoraTarget::CAttnV,
            "attn.c_proj" => LoraTarget::AttnCProj,
            "mlp.c_fc" | "c_fc" => LoraTarget::MlpCFc,
            "mlp.c_proj" => LoraTarget::MlpCProj,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown LoRA target {s:?} (expected c_attn, c_attn.q, c_attn.k, c_attn.v, attn.c_proj, mlp.c_fc or mlp.c_proj)"
                )));
            }
        })
    }

    /// The canonical name, as [`LoraTarget::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::CAttn => "c_attn",
            LoraTarget::CAttnQ => "c_attn.q",
            LoraTarget::CAttnK => "c_attn.k",
            LoraTarget::CAttnV => "c_attn.v",
            LoraTarget::AttnCProj => "attn.c_proj",
            LoraTarget::MlpCFc => "mlp.c_fc",
            LoraTarget::MlpCProj => "mlp.c_proj",
        }
    }

    /// The module path inside a block (`attn.c_attn`, ...), shared by the q/k/v thirds.
    pub fn module(self) -> &'static str {
        match self {
            LoraTarget::CAttn | LoraTarget::CAttnQ | LoraTarget::CAttnK | LoraTarget::CAttnV => {
                "attn.c_attn"
            }
            LoraTarget::AttnCProj => "attn.c_proj",
            LoraTarget::MlpCFc => "mlp.c_fc",
            LoraTarget::MlpCProj => "mlp.c_proj",
        }
    }

    /// The output columns adapted, for a module with `out` outputs, and the adapter's
    /// name suffix (`""` for a whole module, `"_q"`/`"_k"`/`"_v"` for a third of `c_attn`).
    pub fn columns(self, out: usize) -> (Range<usize>, &'static str) {
        let c = out / 3;
        match self {
            LoraTarget::CAttnQ => (0..c, "_q"),
            LoraTarget::CAttnK => (c..2 * c, "_k"),
            LoraTarget::CAttnV => (2 * c..3 * c, "_v"),
            _ => (0..out, ""),
        }
    }
}

/// Adapter hyper-parameters, as PEFT's `LoraConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// The rank `r` (≥ 1).
    pub r: usize,
    /// `α`; the scale is `α/r` (`α/√r` with rsLoRA).
    pub alpha: f64,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// Initialisation of `A`.
    pub init: LoraInit,
    /// Dropout probability on the adapter's input (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// The modules to adapt.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    /// `r = 8, α = 16` on `c_attn`, no dropout.
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            use_rslora: false,
            init: LoraInit::KaimingUniform,
            dropout: 0.0,
            targets: vec![LoraTarget::CAttn],
        }
    }
}

impl LoraConfig {
    /// The scale `s`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::invalid("LoRA rank r must be at least 1"));
        }
        if !self.alpha.is_finite() {
            return Err(Error::invalid(format!(
                "LoRA alpha must be finite, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::invalid("LoRA needs at least one target module"));
        }
        let whole = self.targets.contains(&LoraTarget::CAttn);
        let thirds = self.targets.iter().any(|t| {
            matches!(
                t,
                LoraTarget::CAttnQ | LoraTarget::CAttnK | LoraTarget::CAttnV
            )
        });
        if whole && thirds {
            return Err(Error::invalid(
                "target either c_attn or its q/k/v thirds, not both",
            ));
        }
        Ok(())
    }
}

/// One adapter on one linear: `A [r, in]`, `B [cols.len(), r]`, added to output `cols`.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `A [r, in]`.
    pub a: Tensor,
    /// `B [n, r]`.
    pub b: Tensor,
    /// The scale `s`.
    pub scale: f64,
    /// The output columns it adds to.
    pub cols: Range<usize>,
    /// Name suffix inside the module (`""`, `"_q"`, `"_k"`, `"_v"`).
    pub suffix: &'static str,
}

impl LoraAdapter {
    /// A fresh adapter: `A` drawn per `cfg.init`, `B = 0`.
    pub fn init(
        cfg: &LoraConfig,
        in_features: usize,
        cols: Range<usize>,
        suffix: &'static str,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        cfg.validate()?;
        let a = match cfg.init {
            LoraInit::KaimingUniform => {
                let bound = 1.0 / (in_features as f64).sqrt();
                Tensor::rand_uniform(-bound, bound, [cfg.r, in_features], dtype, device, rng)?
            }
            LoraInit::Gaussian => {
                Tensor::randn(1.0 / cfg.r as f64, [cfg.r, in_features], dtype, device, rng)?
            }
        };
        let b = Tensor::zeros([cols.len(), cfg.r], dtype, device)?;
        Ok(LoraAdapter {
            a,
            b,
            scale: cfg.scale(),
            cols,
            suffix,
        })
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

/// `W ← W + Σ cᵢ·sᵢ·Bᵢ·Aᵢ` in place over each adapter's rows of `W [out, in]`: merge is
/// `cᵢ = 1`, unmerge `cᵢ = −1`, and several adapters with weights make a weighted merge in
/// one pass over `W` (see [`crate::ops::lora_merge`] for the arithmetic and rounding).
pub fn merge_into(w: &Tensor, adapters: &[(&LoraAdapter, f64)]) -> Result<()> {
    merge_into_with(w, adapters, Rounding::NearestEven)
}

/// [`merge_into`] with a choice of rounding for bf16/f16 weights (stochastic rounding keeps
/// updates smaller than half an ulp on average; see [`crate::ops::lora_merge_with`]).
pub fn merge_into_with(
    w: &Tensor,
    adapters: &[(&LoraAdapter, f64)],
    rounding: Rounding,
) -> Result<()> {
    let terms: Vec<LoraTerm<'_>> = adapters
        .iter()
        .map(|(ad, c)| LoraTerm {
            a: &ad.a,
            b: &ad.b,
            scale: ad.scale * c,
            out_range: ad.cols.clone(),
        })
        .collect();
    crate::ops::lora_merge_with(w, &terms, rounding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{linear, lora_linear};
    use crate::testing::{assert_close, rng};

    #[test]
    fn scale_init_and_targets_follow_peft() {
        let cfg = LoraConfig {
            r: 16,
            alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(cfg.scale(), 2.0);
        assert_eq!(
            LoraConfig {
                use_rslora: true,
                ..cfg.clone()
            }
            .scale(),
            8.0
        );
        let mut g = rng("lora_init");
        let ad = LoraAdapter::init(&cfg, 100, 0..30, "", DType::F32, &Device::Cpu, &mut g).unwrap();
        let a = ad.a.to_vec_f64().unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.1) && a.iter().any(|v| v.abs() > 0.09));
        assert!(ad.b.to_vec_f64().unwrap().iter().all(|&v| v == 0.0));
        let gauss = LoraAdapter::init(
            &LoraConfig {
                init: LoraInit::Gaussian,
                ..cfg.clone()
            },
            400,
            0..4,
            "",
            DType::F64,
            &Device::Cpu,
            &mut g,
        )
        .unwrap();
        let v = gauss.a.to_vec_f64().unwrap();
        let std = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
        assert!((std - 1.0 / 16.0).abs() < 0.005, "std {std}");
        assert_eq!(
            LoraTarget::parse("c_attn.v").unwrap().columns(30),
            (20..30, "_v")
        );
        assert!(LoraTarget::parse("wq").is_err());
        assert!(
            LoraConfig {
                r: 0,
                ..cfg.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            LoraConfig {
                dropout: 1.0,
                ..cfg.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            LoraConfig {
                targets: vec![LoraTarget::CAttn, LoraTarget::CAttnQ],
                ..cfg
            }
            .validate()
            .is_err()
        );
    }

    fn random_adapter(
        g: &mut impl Rng,
        r: usize,
        inf: usize,
        cols: Range<usize>,
        dtype: DType,
    ) -> LoraAdapter {
        let d = Device::Cpu;
        LoraAdapter {
            a: Tensor::randn(0.5, [r, inf], dtype, &d, g).unwrap(),
            b: Tensor::randn(0.5, [cols.len(), r], dtype, &d, g).unwrap(),
            scale: 1.5,
            cols,
            suffix: "",
        }
    }

    #[test]
    fn merged_forward_equals_unmerged_forward() {
        let mut g = rng("lora_merge_forward");
        let d = Device::Cpu;
        for (dtype, tol) in [
            (DType::F64, 1e-13),
            (DType::F32, 1e-6),
            (DType::BF16, 1e-2),
            (DType::F16, 2e-3),
        ] {
            let (m, inf, out, r) = (9, 64, 48, 4);
            let x = Tensor::randn(1.0, [m, inf], dtype, &d, &mut g).unwrap();
            let w = Tensor::randn(0.2, [out, inf], dtype, &d, &mut g).unwrap();
            let q = random_adapter(&mut g, r, inf, 0..16, dtype);
            let v = random_adapter(&mut g, r, inf, 32..48, dtype);
            let terms: Vec<LoraTerm> = [&q, &v]
                .iter()
                .map(|a| LoraTerm {
                    a: &a.a,
                    b: &a.b,
                    scale: a.scale,
                    out_range: a.cols.clone(),
                })
                .collect();
            let unmerged = lora_linear(&x, None, &w, None, &terms).unwrap();
            let wm = w.deep_clone().unwrap();
            merge_into(&wm, &[(&q, 1.0), (&v, 1.0)]).unwrap();
            let merged = linear(&x, &wm, None).unwrap();
            assert_close(
                &format!("merged vs unmerged {dtype}"),
                &merged.to_vec_f64().unwrap(),
                &unmerged.to_vec_f64().unwrap(),
                tol,
            );
        }
    }

    #[test]
    fn weighted_merge_is_the_weighted_sum_and_unmerge_restores_f32_f64() {
        let mut g = rng("lora_weighted_merge");
        let d = Device::Cpu;
        let w = Tensor::randn(1.0, [12, 10], DType::F64, &d, &mut g).unwrap();
        let a1 = random_adapter(&mut g, 2, 10, 0..12, DType::F64);
        let a2 = random_adapter(&mut g, 3, 10, 4..8, DType::F64);
        let wm = w.deep_clone().unwrap();
        merge_into(&wm, &[(&a1, 0.25), (&a2, -2.0)]).unwrap();
        let seq = w.deep_clone().unwrap();
        merge_into(&seq, &[(&a1, 0.25)]).unwrap();
        merge_into(&seq, &[(&a2, -2.0)]).unwrap();
        assert_close(
            "weighted",
            &wm.to_vec_f64().unwrap(),
            &seq.to_vec_f64().unwrap(),
            1e-15,
        );
        merge_into(&wm, &[(&a1, -0.25), (&a2, 2.0)]).unwrap();
        assert_close(
            "unmerge f64",
            &wm.to_vec_f64().unwrap(),
            &w.to_vec_f64().unwrap(),
            1e-15,
        );
        let bad = random_adapter(&mut g, 2, 9, 0..12, DType::F64);
        assert!(merge_into(&wm, &[(&bad, 1.0)]).is_err());
    }

    /// The bf16 merge→unmerge round trip: each rounding is ≤ ½ ulp of the value it
    /// stores, so `|w' − w| ≤ 2^-8·|w + Δ| + 2^-8·|w'|` elementwise (Δ = s·B·A). Measured
    /// and printed; the bound is asserted for every element.
    #[test]
    fn bf16_merge_unmerge_round_trip_error_is_bounded() {
        let mut g = rng("lora_bf16_round_trip");
        let d = Device::Cpu;
        let (out, inf, r) = (256, 256, 16);
        let w = Tensor::randn(0.02, [out, inf], DType::BF16, &d, &mut g).unwrap();
        let ad = random_adapter(&mut g, r, inf, 0..out, DType::BF16);
        let w0 = w.to_vec_f64().unwrap();
        let wm = w.deep_clone().unwrap();
        merge_into(&wm, &[(&ad, 1.0)]).unwrap();
        let mid = wm.to_vec_f64().unwrap();
        merge_into(&wm, &[(&ad, -1.0)]).unwrap();
        let back = wm.to_vec_f64().unwrap();
        let u = DType::BF16.unit_roundoff();
        let (mut max_err, mut max_rel_to_bound, mut changed) = (0.0f64, 0.0f64, 0usize);
        for i in 0..w0.len() {
            let err = (back[i] - w0[i]).abs();
            // f32 math error is ~2^-24 relative, far below bf16's; the slack covers it.
            let bound = u * (mid[i].abs() + back[i].abs()) * (1.0 + 1e-5) + 1e-30;
            assert!(
                err <= bound,
                "element {i}: {} -> {} -> {}: err {err:e} > bound {bound:e}",
                w0[i],
                mid[i],
                back[i]
            );
            max_err = max_err.max(err);
            max_rel_to_bound = max_rel_to_bound.max(err / bound);
            changed += (err > 0.0) as usize;
        }
        println!(
            "bf16 merge→unmerge: {changed}/{} elements changed, max abs err {max_err:.3e}, max err/bound {max_rel_to_bound:.3}",
            w0.len()
        );
    }
}
