//! The padded vocabulary: `wte` is kept `[Vp, C]` ([`Gpt2Config::padded_vocab_size`],
//! rows `V..Vp` zero), checkpoints and [`Gpt2::forward`] see the real `V`.
//!
//! Why: the LM head's GEMMs run on `[tokens, V]` logits and their gradient; at GPT-2's
//! odd `V = 50257` their rows are not 16-byte aligned, so the tensor-core kernel loads the
//! backward's `gx = glogits·wte` (and, under full fine-tuning, `gwte = glogitsᵀ·x`)
//! element by element (`kernels/lora_matmul.cu`). Padded to 50304 every row is aligned.
//! The training loss ([`Gpt2::loss`], [`Gpt2::loss_fused`]) runs on the `[tokens, Vp]`
//! logits and ignores their padding columns (their gradient is exactly 0, so the padding
//! rows of `wte` get a zero gradient and AdamW — weight decay included — keeps them 0);
//! [`Gpt2::forward`] computes the `[tokens, V]` logits from the first `V` rows directly.

use super::Gpt2;
use crate::checkpoint::Gpt2Config;
use crate::{DType, Element, Error, Result, Tensor};

/// Which logits the LM head makes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Head {
    /// `[tokens, V]`: the public logits, from `wte`'s first `V` rows.
    Vocab,
    /// `[tokens, Vp]`: the loss's, whose columns `V..Vp` are padding.
    Padded,
}

impl Head {
    /// The logits of the final hidden states `x [tokens, C]` against `wte [Vp, C]`.
    pub(super) fn apply(self, cfg: &Gpt2Config, x: &Tensor, wte: &Tensor) -> Result<Tensor> {
        match self {
            Head::Vocab => crate::ops::linear_rows(x, wte, cfg.vocab_size),
            Head::Padded => crate::ops::linear(x, wte, None),
        }
    }
}

/// `wte` as the model keeps it: `[V, C]` padded with zero rows to `[Vp, C]` (a copy on the
/// tensor's device), `[Vp, C]` as it is; any other shape is an error.
pub(super) fn padded_wte(cfg: &Gpt2Config, wte: Tensor) -> Result<Tensor> {
    let (v, vp, c) = (cfg.vocab_size, cfg.padded_vocab_size(), cfg.n_embd);
    if wte.dims() == [vp, c] {
        return Ok(wte);
    }
    if wte.dims() != [v, c] {
        return Err(Error::shape(
            "gpt2",
            format!(
                "wte.weight: expected [{v}, {c}] (or the padded [{vp}, {c}]), got {}",
                wte.shape()
            ),
        ));
    }
    fn pad<T: Element>(t: &Tensor, n: usize, rows: usize, c: usize) -> Result<Tensor> {
        let mut v = t.to_vec::<T>()?;
        v.resize(n, <T as bytemuck::Zeroable>::zeroed());
        Tensor::from_vec(v, [rows, c], &t.device())
    }
    let n = vp * c;
    match wte.dtype() {
        DType::F32 => pad::<f32>(&wte, n, vp, c),
        DType::F64 => pad::<f64>(&wte, n, vp, c),
        DType::BF16 => pad::<half::bf16>(&wte, n, vp, c),
        DType::F16 => pad::<half::f16>(&wte, n, vp, c),
    }
}

/// Every token id must be below `V`: the padding rows are not tokens (the embedding
/// itself only checks against `wte`'s `Vp` rows).
pub(super) fn check_tokens(cfg: &Gpt2Config, tokens: &[u32]) -> Result<()> {
    let v = cfg.vocab_size;
    match tokens.iter().enumerate().find(|&(_, &t)| t as usize >= v) {
        Some((i, &tok)) => Err(Error::invalid(format!(
            "gpt2: token {tok} at position {i} is outside the vocabulary of {v}"
        ))),
        None => Ok(()),
    }
}

impl Gpt2 {
    /// The elements of `wte`'s padding rows, `(Vp − V)·C`.
    pub(super) fn vocab_padding_elems(&self) -> usize {
        (self.config.padded_vocab_size() - self.config.vocab_size) * self.config.n_embd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraConfig;
    use crate::model::ForwardOptions;
    use crate::ops::{self, IGNORE_INDEX};
    use crate::testing::{assert_close, rng};
    use crate::train::{TrainConfig, Trainer};
    use crate::{Device, Tape};
    use rand::Rng;

    /// A tiny GPT with an odd vocabulary: 61 ids padded to 64.
    fn odd() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 61,
            n_positions: 8,
            n_embd: 16,
            n_layer: 2,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
        }
    }

    fn ids(g: &mut impl Rng, n: usize, v: usize) -> Vec<u32> {
        (0..n).map(|_| g.random_range(0..v as u32)).collect()
    }

    /// `wte`'s rows `V..Vp`, widened.
    fn pad_rows(m: &Gpt2, t: &Tensor) -> Vec<f64> {
        t.to_vec_f64().unwrap()[m.config.vocab_size * m.config.n_embd..].to_vec()
    }

    fn opts(tape: &Tape) -> ForwardOptions<'_> {
        ForwardOptions {
            tape: Some(tape),
            dropout_seed: None,
        }
    }

    fn all_zero(v: &[f64]) -> bool {
        v.iter().all(|&x| x == 0.0)
    }

    #[test]
    fn padded_vocab_size_rounds_up_to_64() {
        let cfg = |v| Gpt2Config {
            vocab_size: v,
            ..odd()
        };
        for (v, vp) in [
            (1, 64),
            (11, 64),
            (61, 64),
            (64, 64),
            (65, 128),
            (66, 128),
            (50257, 50304),
        ] {
            assert_eq!(cfg(v).padded_vocab_size(), vp, "V {v}");
        }
        assert_eq!(Gpt2Config::gpt2_small().padded_vocab_size(), 50304);
    }

    #[test]
    fn wte_is_padded_with_zero_rows_and_tokens_stay_below_v() {
        let mut g = rng("vocab_layout");
        let cfg = odd();
        let m = Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, g.random()).unwrap();
        assert_eq!(m.wte.dims(), &[64, 16]);
        assert!(all_zero(&pad_rows(&m, &m.wte)));
        assert!(!all_zero(&m.wte.to_vec_f64().unwrap()[..61 * 16]));
        // Counts are the checkpoint's: V·C for wte.
        let specs: usize = crate::checkpoint::gpt2_param_specs(&cfg)
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(m.param_count(), specs);
        assert_eq!(m.trainable_param_count(), specs);

        let toks = ids(&mut g, 2 * 5, 61);
        let y = m.forward(&toks, 2, 5, ForwardOptions::default()).unwrap();
        assert_eq!(y.dims(), &[10, 61]);
        // Ids in the padding are not tokens.
        for bad in [61, 63, 64] {
            let mut t = toks.clone();
            t[7] = bad;
            let e = m.forward(&t, 2, 5, ForwardOptions::default()).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("token {bad} at position 7")),
                "{e}"
            );
            let targets = vec![0i32; 10];
            assert!(
                m.loss(&t, &targets, 2, 5, ForwardOptions::default())
                    .is_err()
            );
        }

        // from_params pads a [V, C] wte (a copy) and takes a [Vp, C] one as it is.
        let mut params = m.named_params();
        let real: Vec<f32> = m.wte.to_vec_f32().unwrap()[..61 * 16].to_vec();
        params[0].1 = Tensor::from_vec(real, [61, 16], &Device::Cpu).unwrap();
        let back = Gpt2::from_params(&cfg, params.clone()).unwrap();
        assert_eq!(back.wte.to_vec_f32().unwrap(), m.wte.to_vec_f32().unwrap());
        let same = Gpt2::from_params(&cfg, m.named_params()).unwrap();
        assert!(same.wte.same_storage(&m.wte));
        params[0].1 = Tensor::zeros([62, 16], DType::F32, &Device::Cpu).unwrap();
        match Gpt2::from_params(&cfg, params) {
            Err(Error::Shape { msg, .. }) => {
                assert!(
                    msg.contains("[61, 16]") && msg.contains("[64, 16]"),
                    "{msg}"
                )
            }
            other => panic!("a [62, 16] wte: {other:?}"),
        }
    }

    /// The checkpoint holds `[V, C]` (transformers' layout), a load pads it back, a second
    /// save writes the same bytes, and a padded or unpadded wte saves alike.
    #[test]
    fn checkpoints_hold_v_rows_and_round_trip() {
        let mut g = rng("vocab_checkpoint");
        let cfg = odd();
        let dir = tempfile::tempdir().unwrap();
        let m = Gpt2::new_random(&cfg, DType::BF16, &Device::Cpu, g.random()).unwrap();
        m.save(&dir.path().join("a")).unwrap();
        let file = dir.path().join("a").join(crate::checkpoint::WEIGHTS_FILE);
        let tensors = crate::checkpoint::load_tensors(&file).unwrap();
        let wte = &tensors.iter().find(|(n, _)| n == "wte.weight").unwrap().1;
        assert_eq!(wte.dims(), &[61, 16]);
        let back = Gpt2::load(&dir.path().join("a"), DType::BF16).unwrap();
        assert_eq!(back.wte.dims(), &[64, 16]);
        for ((n, a), (_, b)) in back.named_params().iter().zip(m.named_params()) {
            assert_eq!(a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap(), "{n}");
        }
        back.save(&dir.path().join("b")).unwrap();
        let bytes = |d: &str| {
            std::fs::read(dir.path().join(d).join(crate::checkpoint::WEIGHTS_FILE)).unwrap()
        };
        assert_eq!(bytes("a"), bytes("b"), "a re-save changed the file");
        // save_gpt2 takes the unpadded [V, C] too (the same file), and no other shape.
        let mut params = m.named_params();
        params[0].1 = Tensor::from_vec_as(
            m.wte.to_vec_f64().unwrap()[..61 * 16].to_vec(),
            [61, 16],
            DType::BF16,
            &Device::Cpu,
        )
        .unwrap();
        crate::checkpoint::save_gpt2(&dir.path().join("c"), &cfg, &params, DType::BF16).unwrap();
        assert_eq!(bytes("a"), bytes("c"));
        params[0].1 = Tensor::zeros([65, 16], DType::BF16, &Device::Cpu).unwrap();
        match crate::checkpoint::save_gpt2(&dir.path().join("d"), &cfg, &params, DType::BF16) {
            Err(Error::Shape { msg, .. }) => assert!(msg.contains("padded [64, 16]"), "{msg}"),
            other => panic!("a [65, 16] wte: {other:?}"),
        }
    }

    /// The training losses run on the padded `[N, Vp]` logits; they and every gradient
    /// match the unpadded math: [`Gpt2::forward`]'s `[N, V]` logits (from `wte`'s first V
    /// rows) under the plain [`ops::cross_entropy`]. `wte`'s padding rows get a gradient of
    /// exactly 0.
    fn padded_loss_matches_the_unpadded_math(device: &Device) {
        let mut g = rng("vocab_loss");
        let cfg = odd();
        for dtype in [DType::F32, DType::BF16] {
            let tol = crate::testing::rel_l2_tolerance(dtype);
            let m = Gpt2::new_random(&cfg, dtype, device, g.random()).unwrap();
            let (b, t) = (2, 7);
            let toks = ids(&mut g, b * t, 61);
            let targets: Vec<i32> = (0..b * t)
                .map(|i| {
                    if i % 5 == 3 {
                        IGNORE_INDEX
                    } else {
                        g.random_range(0..61)
                    }
                })
                .collect();
            let name = format!("{device} {dtype}");
            let run = |f: &dyn Fn(&Tape) -> Tensor, seed: Option<Tensor>| {
                let tape = Tape::new();
                let loss = f(&tape);
                let grads = match seed {
                    Some(s) => tape.backward_with(&loss, s).unwrap(),
                    None => tape.backward(&loss).unwrap(),
                };
                let gs: Vec<Vec<f64>> = m
                    .trainable_params()
                    .iter()
                    .map(|(n, p)| {
                        grads
                            .get(p)
                            .unwrap_or_else(|| panic!("{name}: no gradient for {n}"))
                            .to_vec_f64()
                            .unwrap()
                    })
                    .collect();
                (loss.to_scalar().unwrap(), gs)
            };
            let (l_ref, g_ref) = run(
                &|tape| {
                    let logits = m.forward(&toks, b, t, opts(tape)).unwrap();
                    assert_eq!(logits.dims(), &[b * t, 61]);
                    ops::cross_entropy(&logits, &targets).unwrap()
                },
                None,
            );
            let (l_pad, g_pad) = run(
                &|tape| m.loss(&toks, &targets, b, t, opts(tape)).unwrap(),
                None,
            );
            let seed = Tensor::full(1.0, [], DType::F32, device).unwrap();
            let (l_fused, g_fused) = run(
                &|tape| {
                    m.loss_fused(&toks, &targets, b, t, opts(tape), &seed)
                        .unwrap()
                },
                Some(seed.clone()),
            );
            assert_close(&format!("{name} loss"), &[l_pad], &[l_ref], tol);
            assert_eq!(l_fused.to_bits(), l_pad.to_bits(), "{name}: fused loss");
            let names = m.trainable_params();
            for (i, (n, p)) in names.iter().enumerate() {
                assert_close(&format!("{name} {n}"), &g_pad[i], &g_ref[i], tol);
                assert_eq!(g_fused[i], g_pad[i], "{name} {n}: fused gradient");
                if n == "wte.weight" {
                    assert_eq!(p.dims(), &[64, 16]);
                    let pad = 61 * 16;
                    assert!(all_zero(&g_pad[i][pad..]), "{name}: padding rows' gradient");
                    assert!(all_zero(&g_ref[i][pad..]), "{name}: unpadded reference");
                }
            }
        }
    }
    crate::test_device!(loss_matches_unpadded, padded_loss_matches_the_unpadded_math);

    /// Full fine-tuning with weight decay (and, in bf16, stochastic rounding) leaves `wte`'s
    /// padding rows exactly 0 while its real rows train; greedy decoding picks real ids.
    fn adamw_keeps_the_padding_rows_zero(device: &Device) {
        let mut g = rng("vocab_adamw");
        let cfg = odd();
        for (dtype, rounding) in [
            (DType::F32, crate::optim::Rounding::NearestEven),
            (DType::BF16, crate::optim::Rounding::Stochastic { seed: 7 }),
        ] {
            let m = Gpt2::new_random(&cfg, dtype, device, g.random()).unwrap();
            let before = m.wte.to_vec_f64().unwrap();
            let mut tc = TrainConfig {
                lr: 1e-2,
                warmup_steps: 0,
                total_steps: 2,
                ..Default::default()
            };
            tc.adamw.weight_decay = 0.1;
            tc.adamw.rounding = rounding;
            let mut trainer = Trainer::new(m, &tc).unwrap();
            let (b, t) = (2, 6);
            for _ in 0..2 {
                let toks = ids(&mut g, b * t, 61);
                let targets: Vec<i32> = ids(&mut g, b * t, 61).iter().map(|&x| x as i32).collect();
                let stats = trainer.step(&toks, &targets, b, t).unwrap();
                assert!(
                    stats.loss.is_finite() && !stats.skipped,
                    "{device} {dtype}: {stats:?}"
                );
            }
            let m = &trainer.model;
            let after = m.wte.to_vec_f64().unwrap();
            assert!(
                all_zero(&pad_rows(m, &m.wte)),
                "{device} {dtype}: the padding moved"
            );
            assert_ne!(
                &after[..61 * 16],
                &before[..61 * 16],
                "{device} {dtype}: wte did not train"
            );
            let new = m.generate_greedy(&ids(&mut g, 2 * 3, 61), 2, 3).unwrap();
            assert!(new.iter().all(|&t| t < 61), "{device} {dtype}: {new:?}");
        }
    }
    crate::test_device!(adamw_padding, adamw_keeps_the_padding_rows_zero);

    /// Under LoRA the frozen `wte` (padding included) gets no gradient at all, and the
    /// counts leave the padding out.
    #[test]
    fn lora_counts_and_frozen_wte() {
        let cfg = odd();
        let mut m = Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
        let full = m.trainable_param_count();
        m.attach_lora(&LoraConfig::default(), 1).unwrap();
        let adapters: usize = m.lora_params().iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(m.trainable_param_count(), adapters);
        assert_eq!(m.param_count(), full + adapters);
        let tape = Tape::new();
        let toks = vec![60u32; 8];
        let targets = vec![60i32; 8];
        let loss = m
            .loss(
                &toks,
                &targets,
                2,
                4,
                ForwardOptions {
                    tape: Some(&tape),
                    dropout_seed: None,
                },
            )
            .unwrap();
        let grads = tape.backward(&loss).unwrap();
        assert!(grads.get(&m.wte).is_none());
    }
}
