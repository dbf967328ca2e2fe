//! GPT-2 (DESIGN §5): token + learned position embeddings, pre-LN blocks (LayerNorm →
//! causal multi-head attention with a fused qkv projection → residual, LayerNorm → MLP 4×
//! with tanh-GELU → residual), a final LayerNorm and an LM head tied to the token
//! embedding. Parameter names and checkpoint layout are GPT-2's (see [`crate::checkpoint`]);
//! inside the model every linear weight is `[out, in]` (the `nn.Linear` layout the LoRA
//! kernels take), transposed from GPT-2's Conv1D `[in, out]` at load and save.
//!
//! The token embedding is kept padded: `wte [Vp, C]` with `Vp` =
//! [`Gpt2Config::padded_vocab_size`] (50304 for GPT-2's 50257) and rows `V..Vp` zero, so
//! the training step's LM head runs on `[tokens, Vp]` logits whose 16-byte-aligned rows the
//! tensor-core GEMMs load at full speed; the loss ignores the padding columns and
//! [`Gpt2::forward`] returns the `[tokens, V]` logits of the real vocabulary
//! (`vocab.rs`).
//!
//! The model never touches device code: it is written in terms of [`crate::ops`] only.

use crate::checkpoint::{self, Gpt2Config, gpt2_param_specs};
use crate::lora::{LoraAdapter, LoraConfig, merge_into};
use crate::ops::{self, LoraTerm};
use crate::{DType, Device, Error, Result, Tape, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::path::Path;

mod generate;
mod kv_cache;
pub(crate) mod peft;
pub use generate::{Sampler, SamplingConfig};
pub use kv_cache::KvCache;

/// The adapter weights file written by [`Gpt2::save_adapters`] (PEFT's name).
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The adapter config file written by [`Gpt2::save_adapters`] (PEFT's name).
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// LayerNorm parameters.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// `γ [C]`.
    pub weight: Tensor,
    /// `β [C]`.
    pub bias: Tensor,
}

/// A linear layer `y = x·Wᵀ + b` with optional LoRA adapters.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `W [out, in]`.
    pub weight: Tensor,
    /// `b [out]`.
    pub bias: Tensor,
    /// Attached adapters (empty without LoRA).
    pub adapters: Vec<LoraAdapter>,
    /// True while the adapters are folded into `weight`.
    pub merged: bool,
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    /// Pre-attention LayerNorm.
    pub ln_1: LayerNorm,
    /// Fused qkv projection `[3C, C]`.
    pub c_attn: Linear,
    /// Attention output projection `[C, C]`.
    pub attn_c_proj: Linear,
    /// Pre-MLP LayerNorm.
    pub ln_2: LayerNorm,
    /// MLP up projection `[4C, C]`.
    pub c_fc: Linear,
    /// MLP down projection `[C, 4C]`.
    pub mlp_c_proj: Linear,
}

impl Block {
    fn linears(&self) -> [(&'static str, &Linear); 4] {
        [
            ("attn.c_attn", &self.c_attn),
            ("attn.c_proj", &self.attn_c_proj),
            ("mlp.c_fc", &self.c_fc),
            ("mlp.c_proj", &self.mlp_c_proj),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("attn.c_attn", &mut self.c_attn),
            ("attn.c_proj", &mut self.attn_c_proj),
            ("mlp.c_fc", &mut self.c_fc),
            ("mlp.c_proj", &mut self.mlp_c_proj),
        ]
    }
}

/// What a forward pass records and randomises.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardOptions<'a> {
    /// Record on this tape (training); `None` runs with no tape at all (inference).
    pub tape: Option<&'a Tape>,
    /// Seed for LoRA dropout; `None` disables dropout (evaluation).
    pub dropout_seed: Option<u64>,
}

/// A GPT-2 model. Not `Clone`: tensors share storage, so a copy would alias the weights;
/// [`Gpt2::deep_clone`] makes an independent copy.
#[derive(Debug)]
pub struct Gpt2 {
    /// Sizes.
    pub config: Gpt2Config,
    /// Token embedding `[Vp, C]`, also the LM head: `Vp` =
    /// [`Gpt2Config::padded_vocab_size`] rows, of which the last `Vp − V` are zero (no
    /// token id reaches them, the loss ignores their logits, and under full fine-tuning
    /// their gradient is exactly 0, so AdamW keeps them 0). Checkpoints hold the first `V`.
    pub wte: Tensor,
    /// Position embedding `[P, C]`.
    pub wpe: Tensor,
    /// The blocks.
    pub blocks: Vec<Block>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm,
    lora: Option<LoraConfig>,
    full_finetune: bool,
}

impl Gpt2 {
    /// A freshly initialised model (GPT-2's init: weights `N(0, 0.02)`, residual
    /// projections `N(0, 0.02/√(2·n_layer))`, biases 0, LayerNorm `γ = 1, β = 0`).
    /// Every base parameter trains until [`Gpt2::attach_lora`] freezes them.
    pub fn new_random(
        config: &Gpt2Config,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let resid_std = 0.02 / (2.0 * config.n_layer as f64).sqrt();
        let params = gpt2_param_specs(config)
            .into_iter()
            .map(|spec| {
                let t = if spec.name.ends_with("ln_1.weight")
                    || spec.name.ends_with("ln_2.weight")
                    || spec.name == "ln_f.weight"
                {
                    Tensor::full(1.0, spec.shape.clone(), dtype, device)?
                } else if spec.name.ends_with(".bias") {
                    Tensor::zeros(spec.shape.clone(), dtype, device)?
                } else {
                    let std = if spec.name.ends_with("c_proj.weight") {
                        resid_std
                    } else {
                        0.02
                    };
                    Tensor::randn(std, spec.shape.clone(), dtype, device, &mut rng)?
                };
                Ok((spec.name, t))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_params(config, params)
    }

    /// Builds a model from named parameters in internal layout (names and shapes as
    /// [`checkpoint::gpt2_param_specs`]), e.g. from [`checkpoint::load_gpt2`]. `wte.weight`
    /// `[V, C]` is padded with zero rows to [`Gpt2Config::padded_vocab_size`] (a copy); one
    /// already `[Vp, C]` (a model's own [`Gpt2::named_params`]) is taken as it is.
    pub fn from_params(config: &Gpt2Config, params: Vec<(String, Tensor)>) -> Result<Self> {
        config.validate()?;
        let specs = gpt2_param_specs(config);
        if specs.len() != params.len() {
            return Err(Error::invalid(format!(
                "expected {} parameters, got {}",
                specs.len(),
                params.len()
            )));
        }
        let mut map = std::collections::HashMap::new();
        for (name, t) in params {
            map.insert(name, t);
        }
        let mut take = |name: &str| -> Result<Tensor> {
            let spec = specs
                .iter()
                .find(|s| s.name == name)
                .expect("a spec'd name");
            let t = map
                .remove(name)
                .ok_or_else(|| Error::invalid(format!("missing parameter {name}")))?;
            if name == "wte.weight" {
                return vocab::padded_wte(config, t);
            }
            if t.dims() != spec.shape.as_slice() {
                return Err(Error::shape(
                    "gpt2",
                    format!("{name}: expected {:?}, got {}", spec.shape, t.shape()),
                ));
            }
            Ok(t)
        };
        let ln = |take: &mut dyn FnMut(&str) -> Result<Tensor>, p: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: take(&format!("{p}.weight"))?,
                bias: take(&format!("{p}.bias"))?,
            })
        };
        let lin = |take: &mut dyn FnMut(&str) -> Result<Tensor>, p: &str| -> Result<Linear> {
            Ok(Linear {
                weight: take(&format!("{p}.weight"))?,
                bias: take(&format!("{p}.bias"))?,
                adapters: vec![],
                merged: false,
            })
        };
        let wte = take("wte.weight")?;
        let wpe = take("wpe.weight")?;
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            blocks.push(Block {
                ln_1: ln(&mut take, &format!("h.{i}.ln_1"))?,
                c_attn: lin(&mut take, &format!("h.{i}.attn.c_attn"))?,
                attn_c_proj: lin(&mut take, &format!("h.{i}.attn.c_proj"))?,
                ln_2: ln(&mut take, &format!("h.{i}.ln_2"))?,
                c_fc: lin(&mut take, &format!("h.{i}.mlp.c_fc"))?,
                mlp_c_proj: lin(&mut take, &format!("h.{i}.mlp.c_proj"))?,
            });
        }
        let ln_f = ln(&mut take, "ln_f")?;
        let dtype = wte.dtype();
        let device = wte.device();
        let model = Gpt2 {
            config: config.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            lora: None,
            full_finetune: true,
        };
        for (name, t) in model.named_params() {
            if t.dtype() != dtype || t.device() != device {
                return Err(Error::invalid(format!(
                    "{name}: {} on {}, the model is {dtype} on {device}",
                    t.dtype(),
                    t.device()
                )));
            }
        }
        Ok(model)
    }

    /// Loads a GPT-2 checkpoint (`model.safetensors` + `config.json`) in `dtype`.
    pub fn load(path: &Path, dtype: DType) -> Result<Self> {
        let (cfg, params) = checkpoint::load_gpt2(path, dtype)?;
        Self::from_params(&cfg, params)
    }

    /// Saves the base weights as a GPT-2 checkpoint in `dir` (adapters merged or not, as
    /// they are now; see [`Gpt2::save_adapters`] for the adapters alone).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let params: Vec<(String, Tensor)> = self.named_params();
        checkpoint::save_gpt2(dir, &self.config, &params, self.dtype())
    }

    /// An independent copy: every weight and adapter in its own storage.
    pub fn deep_clone(&self) -> Result<Self> {
        let ln = |l: &LayerNorm| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: l.weight.deep_clone()?,
                bias: l.bias.deep_clone()?,
            })
        };
        let lin = |l: &Linear| -> Result<Linear> {
            Ok(Linear {
                weight: l.weight.deep_clone()?,
                bias: l.bias.deep_clone()?,
                adapters: l
                    .adapters
                    .iter()
                    .map(|a| {
                        Ok(LoraAdapter {
                            a: a.a.deep_clone()?,
                            b: a.b.deep_clone()?,
                            ..a.clone()
                        })
                    })
                    .collect::<Result<_>>()?,
                merged: l.merged,
            })
        };
        Ok(Gpt2 {
            config: self.config.clone(),
            wte: self.wte.deep_clone()?,
            wpe: self.wpe.deep_clone()?,
            blocks: self
                .blocks
                .iter()
                .map(|b| {
                    Ok(Block {
                        ln_1: ln(&b.ln_1)?,
                        c_attn: lin(&b.c_attn)?,
                        attn_c_proj: lin(&b.attn_c_proj)?,
                        ln_2: ln(&b.ln_2)?,
                        c_fc: lin(&b.c_fc)?,
                        mlp_c_proj: lin(&b.mlp_c_proj)?,
                    })
                })
                .collect::<Result<_>>()?,
            ln_f: ln(&self.ln_f)?,
            lora: self.lora.clone(),
            full_finetune: self.full_finetune,
        })
    }

    /// Saves the adapters as PEFT does: `adapter_model.safetensors` (PEFT's key names,
    /// `lora_A [r, in]`, `lora_B [out, r]`) and `adapter_config.json` (`r`, `lora_alpha`,
    /// `target_modules`, `use_rslora`, `lora_dropout`, `fan_in_fan_out: true` for GPT-2's
    /// Conv1D). q/k/v-third targets, which PEFT has no name for, are saved as one
    /// block-structured `c_attn` adapter that PEFT loads exactly (`rank_pattern` and
    /// `alpha_pattern` keep the scale), and `lorafuse_targets` keeps the exact layout (see
    /// `model/peft.rs`). Both files are written atomically.
    pub fn save_adapters(&self, dir: &Path) -> Result<()> {
        let cfg = self
            .lora
            .as_ref()
            .ok_or_else(|| Error::invalid("no adapters attached"))?;
        if self
            .blocks
            .iter()
            .any(|b| b.linears().iter().any(|(_, l)| l.merged))
        {
            return Err(Error::invalid("unmerge the adapters before saving them"));
        }
        let tensors = peft::to_peft_tensors(self)?;
        std::fs::create_dir_all(dir).map_err(|e| checkpoint::io_err(dir, e))?;
        let text = serde_json::to_string_pretty(&peft::config_json(cfg))
            .map_err(|e| Error::invalid(format!("adapter config: {e}")))?;
        let path = dir.join(ADAPTER_CONFIG_FILE);
        checkpoint::write_atomic(&path, |tmp| {
            std::fs::write(tmp, &text).map_err(|e| checkpoint::io_err(tmp, e))
        })?;
        checkpoint::save_tensors(&dir.join(ADAPTER_WEIGHTS_FILE), &tensors, None)
    }

    /// Attaches the adapters of a PEFT adapter directory `dir` (as [`Gpt2::save_adapters`]
    /// writes, or PEFT for GPT-2; this model must have none yet). `target_modules` may be a
    /// list or a regular expression; every tensor must be present with its exact shape;
    /// PEFT features lorafuse does not implement (`rank_pattern`, DoRA, `modules_to_save`,
    /// ...) are errors, never ignored. On error the model is unchanged.
    pub fn load_adapters(&mut self, dir: &Path) -> Result<()> {
        let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| checkpoint::io_err(&cfg_path, e))?;
        let bad = |msg: String| Error::format(cfg_path.display().to_string(), msg);
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let cfg = peft::parse_config(&v, self.config.n_layer).map_err(bad)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let loaded = checkpoint::load_tensors(&weights_path)?;
        let mut staged = self.deep_clone()?;
        staged.attach_lora(&cfg, 0)?;
        peft::load_peft_tensors(&staged, &loaded)
            .map_err(|m| Error::format(weights_path.display().to_string(), m))?;
        // Only now, with every tensor checked, take the adapters over.
        for (mine, theirs) in self.blocks.iter_mut().zip(staged.blocks) {
            mine.c_attn.adapters = theirs.c_attn.adapters;
            mine.attn_c_proj.adapters = theirs.attn_c_proj.adapters;
            mine.c_fc.adapters = theirs.c_fc.adapters;
            mine.mlp_c_proj.adapters = theirs.mlp_c_proj.adapters;
        }
        self.lora = Some(cfg);
        self.full_finetune = false;
        Ok(())
    }

    /// The element type of the weights.
    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.wte.device()
    }

    /// The base parameters with GPT-2's names, in checkpoint order (`wte.weight` padded,
    /// `[Vp, C]`: see [`Gpt2::wte`]; [`checkpoint::save_gpt2`] and [`Gpt2::from_params`]
    /// take it so).
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("wte.weight".to_string(), self.wte.clone()),
            ("wpe.weight".to_string(), self.wpe.clone()),
        ];
        for (i, b) in self.blocks.iter().enumerate() {
            let ln = |v: &mut Vec<(String, Tensor)>, name: &str, l: &LayerNorm| {
                v.push((format!("h.{i}.{name}.weight"), l.weight.clone()));
                v.push((format!("h.{i}.{name}.bias"), l.bias.clone()));
            };
            ln(&mut v, "ln_1", &b.ln_1);
            v.push((format!("h.{i}.attn.c_attn.weight"), b.c_attn.weight.clone()));
            v.push((format!("h.{i}.attn.c_attn.bias"), b.c_attn.bias.clone()));
            v.push((
                format!("h.{i}.attn.c_proj.weight"),
                b.attn_c_proj.weight.clone(),
            ));
            v.push((
                format!("h.{i}.attn.c_proj.bias"),
                b.attn_c_proj.bias.clone(),
            ));
            ln(&mut v, "ln_2", &b.ln_2);
            v.push((format!("h.{i}.mlp.c_fc.weight"), b.c_fc.weight.clone()));
            v.push((format!("h.{i}.mlp.c_fc.bias"), b.c_fc.bias.clone()));
            v.push((
                format!("h.{i}.mlp.c_proj.weight"),
                b.mlp_c_proj.weight.clone(),
            ));
            v.push((format!("h.{i}.mlp.c_proj.bias"), b.mlp_c_proj.bias.clone()));
        }
        v.push(("ln_f.weight".to_string(), self.ln_f.weight.clone()));
        v.push(("ln_f.bias".to_string(), self.ln_f.bias.clone()));
        v
    }

    /// The adapters' tensors with PEFT's names
    /// (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`; a q/k/v third adds
    /// `_q`/`_k`/`_v` after `lora_A`/`lora_B`).
    pub fn lora_params(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            for (module, lin) in b.linears() {
                for ad in &lin.adapters {
                    let p = format!("base_model.model.transformer.h.{i}.{module}");
                    v.push((format!("{p}.lora_A{}.weight", ad.suffix), ad.a.clone()));
                    v.push((format!("{p}.lora_B{}.weight", ad.suffix), ad.b.clone()));
                }
            }
        }
        v
    }

    /// The LoRA configuration, when adapters are attached.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Attaches fresh adapters (`B = 0`: the model's function is unchanged) to the
    /// targeted modules of every block and freezes every base parameter.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        if self.lora.is_some() {
            return Err(Error::invalid("adapters are already attached"));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let (dtype, device) = (self.dtype(), self.device());
        for b in &mut self.blocks {
            for target in &cfg.targets {
                let (module, lin) = b
                    .linears_mut()
                    .into_iter()
                    .find(|(m, _)| *m == target.module())
                    .expect("every target names a block module");
                let _ = module;
                let (out, inf) = lin.weight.shape().dims2("attach_lora")?;
                let (cols, suffix) = target.columns(out);
                lin.adapters.push(LoraAdapter::init(
                    cfg, inf, cols, suffix, dtype, &device, &mut rng,
                )?);
            }
        }
        self.lora = Some(cfg.clone());
        self.full_finetune = false;
        Ok(())
    }

    /// Makes every base parameter trainable (`true`, full fine-tuning) or frozen (`false`).
    pub fn set_full_finetune(&mut self, on: bool) {
        self.full_finetune = on;
    }

    /// True when the base parameters train.
    pub fn is_full_finetune(&self) -> bool {
        self.full_finetune
    }

    /// Folds every adapter into its weight (`W ← W + s·B·A`, rounded once): the model is
    /// then a plain GPT-2 with no adapter cost at inference.
    pub fn merge_lora(&mut self) -> Result<()> {
        self.set_merged(true)
    }

    /// Takes the adapters back out of the weights (`W ← W − s·B·A`).
    pub fn unmerge_lora(&mut self) -> Result<()> {
        self.set_merged(false)
    }

    fn set_merged(&mut self, merge: bool) -> Result<()> {
        if self.lora.is_none() {
            return Err(Error::invalid("no adapters attached"));
        }
        for b in &mut self.blocks {
            for (_, lin) in b.linears_mut() {
                if lin.adapters.is_empty() || lin.merged == merge {
                    continue;
                }
                let sign = if merge { 1.0 } else { -1.0 };
                let terms: Vec<(&LoraAdapter, f64)> =
                    lin.adapters.iter().map(|a| (a, sign)).collect();
                merge_into(&lin.weight, &terms)?;
                lin.merged = merge;
            }
        }
        Ok(())
    }

    /// The parameters that train now, with their names: the adapters (unmerged) under
    /// LoRA, every base parameter under full fine-tuning.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        if self.full_finetune {
            v.extend(self.named_params());
        }
        let merged = self
            .blocks
            .iter()
            .any(|b| b.linears().iter().any(|(_, l)| l.merged));
        if self.lora.is_some() && !merged {
            v.extend(self.lora_params());
        }
        v
    }

    /// Number of base parameters plus adapter parameters (the checkpoint's: `wte`'s
    /// `V·C`, not its padding).
    pub fn param_count(&self) -> usize {
        self.named_params()
            .iter()
            .chain(self.lora_params().iter())
            .map(|(_, t)| t.elem_count())
            .sum::<usize>()
            - self.vocab_padding_elems()
    }

    /// Number of elements of [`Gpt2::trainable_params`], less `wte`'s padding rows under
    /// full fine-tuning (they hold no parameter: their gradient is always 0).
    pub fn trainable_param_count(&self) -> usize {
        let n: usize = self
            .trainable_params()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        if self.full_finetune {
            n - self.vocab_padding_elems()
        } else {
            n
        }
    }

    /// Logits `[batch·seq, V]` for `tokens` (`batch·seq` ids, row-major, each below `V`):
    /// the real vocabulary's, computed from `wte`'s first `V` rows (no `[batch·seq, Vp]`
    /// buffer). [`Gpt2::loss`] and [`Gpt2::loss_fused`] run on the padded logits instead.
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        opts: ForwardOptions<'_>,
    ) -> Result<Tensor> {
        self.logits(tokens, batch, seq, opts, vocab::Head::Vocab)
    }

    /// The transformer and the LM head: the logits `[batch·seq, V]` or, for the loss,
    /// `[batch·seq, Vp]` (`head`).
    fn logits(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        opts: ForwardOptions<'_>,
        head: vocab::Head,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        vocab::check_tokens(cfg, tokens)?;
        let tape = opts.tape;
        let base = |t: &Tensor| match tape {
            Some(tape) if self.full_finetune => t.track(tape),
            _ => t.clone(),
        };
        let wte = base(&self.wte);
        let mut x = ops::embedding(tokens, batch, seq, &wte, &base(&self.wpe))?;
        let eps = cfg.layer_norm_epsilon;
        for (i, b) in self.blocks.iter().enumerate() {
            let h = ops::layer_norm(&x, &base(&b.ln_1.weight), &base(&b.ln_1.bias), eps)?;
            let qkv = self.apply_linear(&b.c_attn, &h, opts, (i, 0))?;
            let a = ops::causal_attention(&qkv, cfg.n_head)?;
            let a = self.apply_linear(&b.attn_c_proj, &a, opts, (i, 1))?;
            x = ops::add(&x, &a)?;
            let h = ops::layer_norm(&x, &base(&b.ln_2.weight), &base(&b.ln_2.bias), eps)?;
            let h = self.apply_linear(&b.c_fc, &h, opts, (i, 2))?;
            let h = ops::gelu(&h)?;
            let h = self.apply_linear(&b.mlp_c_proj, &h, opts, (i, 3))?;
            x = ops::add(&x, &h)?;
        }
        let x = ops::layer_norm(&x, &base(&self.ln_f.weight), &base(&self.ln_f.bias), eps)?;
        let x = ops::reshape(&x, [batch * seq, cfg.n_embd])?;
        head.apply(cfg, &x, &wte)
    }

    fn apply_linear(
        &self,
        lin: &Linear,
        x: &Tensor,
        opts: ForwardOptions<'_>,
        (layer, slot): (usize, u64),
    ) -> Result<Tensor> {
        let track = |t: &Tensor, on: bool| match opts.tape {
            Some(tape) if on => t.track(tape),
            _ => t.clone(),
        };
        let (w, b) = (
            track(&lin.weight, self.full_finetune),
            track(&lin.bias, self.full_finetune),
        );
        if lin.adapters.is_empty() || lin.merged {
            return ops::linear(x, &w, Some(&b));
        }
        let ads: Vec<(Tensor, Tensor)> = lin
            .adapters
            .iter()
            .map(|a| (track(&a.a, true), track(&a.b, true)))
            .collect();
        let terms: Vec<LoraTerm<'_>> = lin
            .adapters
            .iter()
            .zip(&ads)
            .map(|(ad, (a, b))| LoraTerm {
                a,
                b,
                scale: ad.scale,
                out_range: ad.cols.clone(),
            })
            .collect();
        let p = self.lora.as_ref().map_or(0.0, |c| c.dropout);
        let x_lora = match opts.dropout_seed {
            Some(seed) if p > 0.0 => Some(ops::dropout(
                x,
                p,
                seed ^ ((layer as u64) << 8 | slot).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )?),
            _ => None,
        };
        ops::lora_linear(x, x_lora.as_ref(), &w, Some(&b), &terms)
    }

    /// Mean cross-entropy of the next-token predictions against `targets` (one per
    /// token; [`ops::IGNORE_INDEX`] skips a position). Runs on the padded logits
    /// `[batch·seq, Vp]` ([`ops::cross_entropy_padded`] over their first `V` columns): the
    /// loss of [`Gpt2::forward`]'s logits, with no narrowing copy.
    pub fn loss(
        &self,
        tokens: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
        opts: ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let logits = self.logits(tokens, batch, seq, opts, vocab::Head::Padded)?;
        ops::cross_entropy_padded(&logits, targets, self.config.vocab_size)
    }

    /// [`Gpt2::loss`] for training: the logits' gradient is computed with the loss
    /// ([`ops::cross_entropy_fused_padded`]) for a backward seeded with `seed` (one f32
    /// element on the model's device: 1, or the loss scale), over the padded logits' own
    /// buffer on a device (its padding columns' gradient 0). Seed the backward with that
    /// tensor: `tape.backward_with(&loss, seed)`.
    pub fn loss_fused(
        &self,
        tokens: &[u32],
        targets: &[i32],
        batch: usize,
        seq: usize,
        opts: ForwardOptions<'_>,
        seed: &Tensor,
    ) -> Result<Tensor> {
        let logits = self.logits(tokens, batch, seq, opts, vocab::Head::Padded)?;
        ops::cross_entropy_fused_padded(logits, targets, self.config.vocab_size, seed)
    }

    /// Greedy decoding: extends each of `batch` prompts (`batch·len` ids) by `n_new`
    /// tokens (the argmax, ties to the lowest id), running with no tape on the key/value
    /// cache ([`Gpt2::forward_cached`]): one prefill, then one position per token. Returns
    /// the new tokens, `batch·n_new` ids. `len + n_new ≤ n_positions + 1` (the last token
    /// is never fed back).
    pub fn generate_greedy(&self, prompts: &[u32], batch: usize, n_new: usize) -> Result<Vec<u32>> {
        if batch == 0 || prompts.is_empty() || !prompts.len().is_multiple_of(batch) {
            return Err(Error::invalid(format!(
                "{} prompt ids for a batch of {batch}",
                prompts.len()
            )));
        }
        let prompt_len = prompts.len() / batch;
        if prompt_len + n_new > self.config.n_positions + 1 {
            return Err(Error::invalid(format!(
                "prompt {prompt_len} + {n_new} new tokens exceeds the context of {}",
                self.config.n_positions
            )));
        }
        self.greedy_cached(prompts, batch, n_new)
    }
}

#[cfg(test)]
mod tests;
mod vocab;
