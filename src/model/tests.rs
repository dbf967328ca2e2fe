use super::*;
use crate::lora::LoraTarget;
use crate::ops::profile;
use crate::testing::{assert_close, check_grads, rng};
use rand::Rng;

/// 2 layers of width 8, vocabulary 11 (also the PEFT-format tests' model).
pub(super) fn tiny() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 11,
        n_positions: 8,
        n_embd: 8,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
    }
}

fn tokens(g: &mut impl Rng, n: usize, v: usize) -> Vec<u32> {
    (0..n).map(|_| g.random_range(0..v as u32)).collect()
}

#[test]
fn forward_shapes_and_inference_records_nothing() {
    let m = Gpt2::new_random(&tiny(), DType::F32, &Device::Cpu, 1).unwrap();
    let toks: Vec<u32> = (0..2 * 5).map(|i| (i % 11) as u32).collect();
    let y = m.forward(&toks, 2, 5, ForwardOptions::default()).unwrap();
    assert_eq!(y.dims(), &[10, 11]);
    assert!(!y.requires_grad(), "inference must run with no tape");
    assert!(
        m.forward(&toks, 2, 9, ForwardOptions::default()).is_err(),
        "a sequence past the context is an error"
    );
    assert!(
        m.forward(&[11; 10], 2, 5, ForwardOptions::default())
            .is_err(),
        "a token past the vocabulary is an error"
    );
}

#[test]
fn whole_model_backward_matches_finite_differences() {
    let mut g = rng("gpt2_fd");
    let cfg = tiny();
    let m = Gpt2::new_random(&cfg, DType::F64, &Device::Cpu, g.random()).unwrap();
    let toks = tokens(&mut g, 2 * 5, cfg.vocab_size);
    let targets: Vec<i32> = tokens(&mut g, 10, cfg.vocab_size)
        .into_iter()
        .map(|t| t as i32)
        .collect();
    let names = m.named_params();
    // Larger weights than the 0.02 init so every path carries signal.
    let params: Vec<Tensor> = names
        .iter()
        .map(|(_, t)| crate::ops::scale(t, 3.0).unwrap())
        .collect();
    let check = [
        "wte.weight",
        "wpe.weight",
        "h.0.attn.c_attn.weight",
        "h.1.mlp.c_fc.bias",
        "h.0.ln_1.weight",
        "ln_f.bias",
    ];
    let idx: Vec<usize> = check
        .iter()
        .map(|c| names.iter().position(|(n, _)| n == c).unwrap())
        .collect();
    let inputs: Vec<Tensor> = idx.iter().map(|&i| params[i].clone()).collect();
    check_grads(
        "gpt2 loss",
        &inputs,
        |t| {
            let mut ps: Vec<(String, Tensor)> = names
                .iter()
                .map(|(n, _)| n.clone())
                .zip(params.iter().cloned())
                .collect();
            for (k, &i) in idx.iter().enumerate() {
                ps[i].1 = t[k].clone();
            }
            let model = Gpt2::from_params(&cfg, ps)?;
            model.loss(&toks, &targets, 2, 5, ForwardOptions::default())
        },
        // Whole-model central differences carry O(h²) truncation error from the deep
        // composition (seen up to 2.1e-6 over 15 seeds); a wrong backward is off by O(1).
        1e-5,
    );
}

/// One training step's GEMM work: LoRA on every linear vs full fine-tuning.
fn step_flops(m: &Gpt2, toks: &[u32], targets: &[i32]) -> (profile::Counts, usize) {
    profile::reset();
    let tape = Tape::new();
    let loss = m
        .loss(
            toks,
            targets,
            2,
            6,
            ForwardOptions {
                tape: Some(&tape),
                dropout_seed: None,
            },
        )
        .unwrap();
    let grads = tape.backward(&loss).unwrap();
    let n_grads = m
        .trainable_params()
        .iter()
        .filter(|(_, t)| grads.get(t).is_some())
        .count();
    (profile::counts(), n_grads)
}

#[test]
fn a_lora_step_skips_the_weight_gradient_gemms_of_full_fine_tuning() {
    let mut g = rng("gpt2_gemm_count");
    let cfg = Gpt2Config {
        vocab_size: 32,
        n_positions: 8,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
    };
    let toks = tokens(&mut g, 12, 32);
    let targets: Vec<i32> = toks.iter().map(|&t| t as i32).collect();
    let full = Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
    let (full_counts, full_grads) = step_flops(&full, &toks, &targets);
    assert_eq!(full_grads, full.named_params().len());

    let mut lora = full.deep_clone().unwrap();
    let targets_all = ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        .iter()
        .map(|t| LoraTarget::parse(t).unwrap())
        .collect();
    lora.attach_lora(
        &LoraConfig {
            r: 2,
            targets: targets_all,
            ..Default::default()
        },
        4,
    )
    .unwrap();
    let (lora_counts, lora_grads) = step_flops(&lora, &toks, &targets);
    assert_eq!(
        lora_grads,
        lora.lora_params().len(),
        "only adapters get gradients"
    );

    // Per linear [out, in] over M = 12 tokens, full FT does fwd + gx + gW = 3·2·M·out·in;
    // LoRA drops every gW, including the tied LM head's. Its first c_attn also skips gx:
    // the embeddings are frozen, so nothing upstream needs a gradient. Each adapter adds
    // u = x·Aᵀ, y += u·Bᵀ, v = gy·B, gx += v·A (when gx is needed), gB, gA.
    let (m, c, r, layers) = (12u64, cfg.n_embd as u64, 2u64, cfg.n_layer as u64);
    let linear_macs = layers * (3 * c * c + c * c + 4 * c * c + 4 * c * c);
    let head_macs = cfg.padded_vocab_size() as u64 * c; // the loss runs on the padded logits
    let saved_gw = 2 * m * (linear_macs + head_macs);
    let saved_first_gx = 2 * m * (3 * c * c) + 2 * m * c * r;
    let per_adapter = |out: u64, inp: u64| 2 * m * r * (3 * inp + 3 * out);
    let added = layers
        * (per_adapter(3 * c, c)
            + per_adapter(c, c)
            + per_adapter(4 * c, c)
            + per_adapter(c, 4 * c));
    assert_eq!(
        full_counts.gemm_flops - saved_gw - saved_first_gx + added,
        lora_counts.gemm_flops,
        "full {full_counts:?} lora {lora_counts:?}"
    );
    println!(
        "GEMM FLOPs per step: full {} vs LoRA {} ({} GEMM calls vs {})",
        full_counts.gemm_flops, lora_counts.gemm_flops, full_counts.gemms, lora_counts.gemms
    );
}

#[test]
fn attached_adapters_start_at_the_base_model_and_merge_exactly_in_f64() {
    let mut g = rng("gpt2_merge");
    let cfg = tiny();
    let base = Gpt2::new_random(&cfg, DType::F64, &Device::Cpu, g.random()).unwrap();
    let toks = tokens(&mut g, 10, cfg.vocab_size);
    let y0 = base
        .forward(&toks, 2, 5, ForwardOptions::default())
        .unwrap();
    let mut m = base.deep_clone().unwrap();
    let targets = vec![LoraTarget::CAttnQ, LoraTarget::CAttnV, LoraTarget::MlpCFc];
    m.attach_lora(
        &LoraConfig {
            r: 4,
            alpha: 8.0,
            targets,
            ..Default::default()
        },
        9,
    )
    .unwrap();
    assert_eq!(
        m.forward(&toks, 2, 5, ForwardOptions::default())
            .unwrap()
            .to_vec_f64()
            .unwrap(),
        y0.to_vec_f64().unwrap()
    );
    // Give B values so the adapters matter.
    for (name, t) in m.lora_params() {
        if name.contains("lora_B") {
            let v: Vec<f64> = (0..t.elem_count())
                .map(|_| g.random_range(-0.5..0.5))
                .collect();
            t.assign(&v).unwrap();
        }
    }
    let unmerged = m
        .forward(&toks, 2, 5, ForwardOptions::default())
        .unwrap()
        .to_vec_f64()
        .unwrap();
    m.merge_lora().unwrap();
    assert!(
        m.trainable_params().is_empty(),
        "merged adapters do not train"
    );
    let merged = m
        .forward(&toks, 2, 5, ForwardOptions::default())
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert_close("merged vs unmerged", &merged, &unmerged, 1e-12);
    m.unmerge_lora().unwrap();
    let back = m.named_params();
    for ((n, a), (_, b)) in back.iter().zip(base.named_params()) {
        assert_close(n, &a.to_vec_f64().unwrap(), &b.to_vec_f64().unwrap(), 1e-14);
    }
    assert!(
        m.attach_lora(&LoraConfig::default(), 1).is_err(),
        "attaching twice is an error"
    );
}

#[test]
fn trainable_fraction_is_small_under_lora() {
    let cfg = Gpt2Config::small_bench();
    let mut m = Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
    let total_base: usize = m.named_params().iter().map(|(_, t)| t.elem_count()).sum();
    m.attach_lora(&LoraConfig::default(), 0).unwrap();
    let trainable: usize = m
        .trainable_params()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    // r = 8 on c_attn: per layer A [8, 256] + B [768, 8].
    assert_eq!(trainable, 4 * (8 * 256 + 768 * 8));
    assert!((trainable as f64) < 0.05 * total_base as f64);
}

#[test]
fn checkpoints_and_adapters_round_trip_and_bad_files_are_errors() {
    let mut g = rng("gpt2_save_load");
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let mut m = Gpt2::new_random(&cfg, DType::F32, &Device::Cpu, g.random()).unwrap();
    m.attach_lora(
        &LoraConfig {
            r: 2,
            targets: vec![LoraTarget::CAttnQ, LoraTarget::CAttnV, LoraTarget::MlpCProj],
            ..Default::default()
        },
        5,
    )
    .unwrap();
    for (name, t) in m.lora_params() {
        if name.contains("lora_B") {
            let v: Vec<f32> = (0..t.elem_count())
                .map(|_| g.random_range(-0.5..0.5))
                .collect();
            t.assign(&v).unwrap();
        }
    }
    let toks = tokens(&mut g, 10, cfg.vocab_size);
    let want = m
        .forward(&toks, 2, 5, ForwardOptions::default())
        .unwrap()
        .to_vec_f32()
        .unwrap();
    m.save(&dir.path().join("base")).unwrap();
    m.save_adapters(&dir.path().join("adapter")).unwrap();

    let mut back = Gpt2::load(&dir.path().join("base"), DType::F32).unwrap();
    back.load_adapters(&dir.path().join("adapter")).unwrap();
    assert_eq!(
        back.forward(&toks, 2, 5, ForwardOptions::default())
            .unwrap()
            .to_vec_f32()
            .unwrap(),
        want
    );
    assert!(
        back.load_adapters(&dir.path().join("adapter")).is_err(),
        "adapters are already attached"
    );

    // A corrupt adapter file leaves the model untouched and says what is wrong.
    let mut fresh = Gpt2::load(&dir.path().join("base"), DType::F32).unwrap();
    std::fs::write(
        dir.path().join("adapter").join(ADAPTER_WEIGHTS_FILE),
        b"not safetensors",
    )
    .unwrap();
    assert!(fresh.load_adapters(&dir.path().join("adapter")).is_err());
    assert!(fresh.lora_config().is_none() && fresh.lora_params().is_empty());
    assert!(matches!(
        fresh.load_adapters(&dir.path().join("missing")),
        Err(Error::Io { .. })
    ));
}
