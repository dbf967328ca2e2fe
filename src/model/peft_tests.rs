use super::*;
use crate::checkpoint;
use crate::model::tests::tiny;
use crate::model::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ForwardOptions};
use crate::{DType, Error};
use rand::{Rng, SeedableRng};

/// A model with `targets` at rank 2 and random (non-zero) B's.
fn adapted(targets: Vec<LoraTarget>, rslora: bool) -> Gpt2 {
    let mut m = Gpt2::new_random(&tiny(), DType::F32, &Device::Cpu, 3).unwrap();
    m.attach_lora(
        &LoraConfig {
            r: 2,
            alpha: 3.0,
            use_rslora: rslora,
            targets,
            ..Default::default()
        },
        4,
    )
    .unwrap();
    let mut g = rand::rngs::StdRng::seed_from_u64(9);
    for (name, t) in m.lora_params() {
        if name.contains("lora_B") {
            let v: Vec<f32> = (0..t.elem_count())
                .map(|_| g.random_range(-0.5..0.5))
                .collect();
            t.assign(&v).unwrap();
        }
    }
    m
}

/// `ΔW [out, in]` of one linear from the model's own adapters.
fn delta_own(lin: &crate::model::Linear) -> Vec<f64> {
    let (out, inp) = (lin.weight.dims()[0], lin.weight.dims()[1]);
    let mut d = vec![0.0; out * inp];
    for ad in &lin.adapters {
        let (a, b, r) = (
            ad.a.to_vec_f64().unwrap(),
            ad.b.to_vec_f64().unwrap(),
            ad.rank(),
        );
        for (row, o) in ad.cols.clone().enumerate() {
            for k in 0..inp {
                d[o * inp + k] +=
                    ad.scale * (0..r).map(|j| b[row * r + j] * a[j * inp + k]).sum::<f64>();
            }
        }
    }
    d
}

/// `ΔW` as PEFT computes it from the saved directory: `scale(key)·B·A` per module.
fn delta_peft(dir: &std::path::Path, key: &str) -> Vec<f64> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap())
            .unwrap();
    let s = module_scale(&v, key).unwrap();
    let t = checkpoint::load_tensors(&dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let get = |n: &str| t.iter().find(|(x, _)| x == n).unwrap().1.clone();
    let a = get(&format!("{PREFIX}{key}.lora_A.weight"));
    let b = get(&format!("{PREFIX}{key}.lora_B.weight"));
    let (r, inp, out) = (a.dims()[0], a.dims()[1], b.dims()[0]);
    let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    let mut d = vec![0.0; out * inp];
    for o in 0..out {
        for k in 0..inp {
            d[o * inp + k] = s * (0..r).map(|j| b[o * r + j] * a[j * inp + k]).sum::<f64>();
        }
    }
    d
}

fn assert_same(x: &[f64], y: &[f64], what: &str) {
    assert_eq!(x.len(), y.len(), "{what}");
    for (i, (a, b)) in x.iter().zip(y).enumerate() {
        assert!(
            (a - b).abs() <= 1e-12 * (1.0 + a.abs()),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

#[test]
fn qkv_thirds_save_as_a_block_structured_c_attn_that_peft_reads_exactly() {
    for rslora in [false, true] {
        for targets in [
            vec![LoraTarget::CAttnQ, LoraTarget::CAttnV, LoraTarget::MlpCProj],
            vec![LoraTarget::CAttnK],
            vec![
                LoraTarget::CAttnV,
                LoraTarget::CAttnQ,
                LoraTarget::CAttnK,
                LoraTarget::AttnCProj,
            ],
        ] {
            let m = adapted(targets.clone(), rslora);
            let dir = tempfile::tempdir().unwrap();
            m.save_adapters(dir.path()).unwrap();
            let what = format!("{targets:?} rslora {rslora}");
            // PEFT's ΔW of every adapted module (its config, its scale rule, its tensors)
            // is the model's own.
            for (i, blk) in m.blocks.iter().enumerate() {
                for (module, lin) in blk.linears() {
                    if !lin.adapters.is_empty() {
                        let key = format!("transformer.h.{i}.{module}");
                        assert_same(
                            &delta_peft(dir.path(), &key),
                            &delta_own(lin),
                            &format!("{what} {key}"),
                        );
                    }
                }
            }
            let v: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG_FILE)).unwrap(),
            )
            .unwrap();
            assert!(
                v["target_modules"].as_array().unwrap().iter().all(|t| {
                    ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"].contains(&t.as_str().unwrap())
                }),
                "{what}: {}",
                v["target_modules"]
            );
            // And lorafuse reads its own layout back, bit for bit.
            let mut back = Gpt2::new_random(&tiny(), DType::F32, &Device::Cpu, 3).unwrap();
            back.load_adapters(dir.path()).unwrap();
            assert_eq!(back.lora_config(), m.lora_config(), "{what}");
            for ((n1, t1), (n2, t2)) in m.lora_params().iter().zip(back.lora_params()) {
                assert_eq!(n1, &n2);
                assert_eq!(
                    t1.to_vec_f32().unwrap(),
                    t2.to_vec_f32().unwrap(),
                    "{what} {n1}"
                );
            }
        }
    }
}

#[test]
fn a_block_structured_c_attn_with_a_non_zero_off_block_is_refused() {
    let m = adapted(vec![LoraTarget::CAttnQ, LoraTarget::CAttnV], false);
    let dir = tempfile::tempdir().unwrap();
    m.save_adapters(dir.path()).unwrap();
    let path = dir.path().join(ADAPTER_WEIGHTS_FILE);
    let mut t = checkpoint::load_tensors(&path).unwrap();
    let key = format!("{PREFIX}transformer.h.1.attn.c_attn.lora_B.weight");
    let b = &t.iter().find(|(n, _)| *n == key).unwrap().1;
    let mut v = b.to_vec_f64().unwrap();
    // Row 0 is the q third; columns 2..4 belong to v: plant one non-zero there.
    v[2] = 0.25;
    let planted = Tensor::from_vec_as(v, b.dims().to_vec(), DType::F32, &Device::Cpu).unwrap();
    t.iter_mut().find(|(n, _)| *n == key).unwrap().1 = planted;
    checkpoint::save_tensors(&path, &t, None).unwrap();
    let mut back = Gpt2::new_random(&tiny(), DType::F32, &Device::Cpu, 3).unwrap();
    let err = back.load_adapters(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("block-structured") && err.contains("[0, 2]"),
        "{err}"
    );
    assert!(
        back.lora_config().is_none(),
        "a refused adapter leaves the model as it was"
    );
}

/// Writes a PEFT-style directory (no `lorafuse_targets`) for `model`'s adapters with the
/// given config fields over PEFT's defaults, and loads it into a fresh base.
fn load_peft_style(model: &Gpt2, fields: Value) -> Result<Gpt2> {
    let dir = tempfile::tempdir().unwrap();
    model.save_adapters(dir.path()).unwrap();
    let mut v = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 3.0,
        "lora_dropout": 0.0, "fan_in_fan_out": true, "bias": "none", "use_rslora": false,
        "use_dora": false, "modules_to_save": null, "layers_to_transform": null,
        "layers_pattern": null, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": true, "target_modules": ["c_attn"],
    });
    for (k, x) in fields.as_object().unwrap() {
        v[k] = x.clone();
    }
    std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), v.to_string()).unwrap();
    let mut back = Gpt2::new_random(&tiny(), DType::F32, &Device::Cpu, 3).unwrap();
    back.load_adapters(dir.path()).map(|_| back)
}

#[test]
fn peft_target_modules_as_a_list_a_regex_all_linear_or_null_load() {
    use LoraTarget::*;
    let toks: Vec<u32> = (0..10).map(|i| (i * 7 % 11) as u32).collect();
    for (targets, tm) in [
        (vec![AttnCProj, MlpCProj], json!(["c_proj"])),
        (vec![MlpCFc], json!(["c_fc"])),
        (vec![MlpCFc], json!("c_fc")), // a string is a regex: no module is called just c_fc
        (vec![CAttn, MlpCFc], json!(r".*\.(c_attn|c_fc)")),
        (vec![AttnCProj], json!(r"transformer\.h\.\d+\.attn\.c_proj")),
        (
            vec![CAttn, AttnCProj, MlpCFc, MlpCProj],
            json!("all-linear"),
        ),
        (vec![CAttn], json!(null)),
        (
            vec![CAttn, MlpCProj],
            json!(["h.0.attn.c_attn", "h.1.attn.c_attn", "mlp.c_proj"]),
        ),
    ] {
        let m = adapted(targets.clone(), false);
        let got = load_peft_style(&m, json!({ "target_modules": tm.clone() }));
        if tm == json!("c_fc") {
            let err = got.unwrap_err().to_string();
            assert!(err.contains("selects none"), "{tm}: {err}");
            continue;
        }
        let back = got.unwrap_or_else(|e| panic!("{tm}: {e}"));
        assert_eq!(back.lora_config().unwrap().targets, targets, "{tm}");
        let f = |g: &Gpt2| {
            g.forward(&toks, 2, 5, ForwardOptions::default())
                .unwrap()
                .to_vec_f32()
                .unwrap()
        };
        assert_eq!(f(&back), f(&m), "{tm}");
    }
}

#[test]
fn peft_targets_lorafuse_cannot_adapt_exactly_are_errors() {
    let m = adapted(vec![LoraTarget::CAttn], false);
    for (tm, says) in [
        (json!(["lm_head"]), "lm_head"),
        (json!(["wte"]), "transformer.wte"),
        (json!(["ln_1"]), "ln_1"),
        (json!(["attn"]), "transformer.h.0.attn,"),
        (json!(r"transformer\.h\.0\.attn\.c_attn"), "blocks [0] only"),
        (json!(["h.1.attn.c_attn"]), "blocks [1] only"),
        (json!(["nothing"]), "selects none"),
        (json!("(?=x)c_attn"), "regular expression"),
        (json!([3]), "not a string"),
        (json!(7), "list of names or a regular expression"),
    ] {
        let err = load_peft_style(&m, json!({ "target_modules": tm.clone() }))
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{tm}: {err}");
        assert!(
            err.contains(ADAPTER_CONFIG_FILE),
            "{tm}: the error names the file: {err}"
        );
    }
}

#[test]
fn unsupported_peft_features_are_errors_never_ignored() {
    let m = adapted(vec![LoraTarget::CAttn], false);
    for (field, says) in [
        (json!({ "rank_pattern": { "c_attn": 4 } }), "rank_pattern"),
        (json!({ "alpha_pattern": { "c_attn": 8 } }), "alpha_pattern"),
        (json!({ "use_dora": true }), "DoRA"),
        (json!({ "modules_to_save": ["lm_head"] }), "modules_to_save"),
        (json!({ "layers_to_transform": [0] }), "layers_to_transform"),
        (
            json!({ "layer_replication": [[0, 1]] }),
            "layer_replication",
        ),
        (json!({ "lora_bias": true }), "lora_bias"),
        (json!({ "use_qalora": true }), "QA-LoRA"),
        (json!({ "bias": "all" }), "bias"),
        (json!({ "bias": "lora_only" }), "bias"),
        (json!({ "exclude_modules": ["c_proj"] }), "exclude_modules"),
        (
            json!({ "target_parameters": ["c_attn.weight"] }),
            "target_parameters",
        ),
        (
            json!({ "trainable_token_indices": [1, 2] }),
            "trainable_token_indices",
        ),
        (json!({ "alora_invocation_tokens": [5] }), "alora"),
        (
            json!({ "init_lora_weights": "pissa" }),
            "changes the base weights",
        ),
        (
            json!({ "init_lora_weights": "olora" }),
            "changes the base weights",
        ),
        (json!({ "peft_type": "IA3" }), "IA3"),
        (json!({ "r": 0 }), "`r`"),
        (json!({ "lora_alpha": "big" }), "lora_alpha"),
        (json!({ "lora_dropout": 1.5 }), "dropout"),
    ] {
        let err = load_peft_style(&m, field.clone()).unwrap_err().to_string();
        assert!(err.contains(says), "{field}: {err}");
    }
    // Their defaults, and init-only options, load.
    for field in [
        json!({ "use_dora": false, "lora_bias": false, "modules_to_save": [] }),
        json!({ "init_lora_weights": "gaussian", "layers_pattern": "h" }),
        json!({ "exclude_modules": null, "megatron_config": null }),
    ] {
        load_peft_style(&m, field.clone()).unwrap_or_else(|e| panic!("{field}: {e}"));
    }
}

#[test]
fn lorafuse_targets_that_disagree_with_what_peft_reads_are_refused() {
    let m = adapted(vec![LoraTarget::CAttnQ, LoraTarget::CAttnV], false);
    let dir = tempfile::tempdir().unwrap();
    m.save_adapters(dir.path()).unwrap();
    let path = dir.path().join(ADAPTER_CONFIG_FILE);
    let good: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (key, x) in [
        ("alpha_pattern", json!({ "c_attn": 3.0 })),
        ("rank_pattern", json!({})),
        ("target_modules", json!(["c_attn", "c_fc"])),
        ("lorafuse_targets", json!(["c_attn.q", "c_attn.k"])),
        ("lorafuse_targets", json!("c_attn.q")),
        ("lorafuse_targets", json!(["c_attn.x"])),
    ] {
        let mut v = good.clone();
        v[key] = x.clone();
        std::fs::write(&path, v.to_string()).unwrap();
        let mut back = Gpt2::new_random(&tiny(), DType::F32, &Device::Cpu, 3).unwrap();
        let err = back.load_adapters(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{key} = {x}: {err}");
        assert!(back.lora_config().is_none());
    }
}

#[test]
fn an_adapter_with_a_missing_extra_or_misshapen_tensor_is_refused() {
    let m = adapted(vec![LoraTarget::CAttnQ, LoraTarget::MlpCFc], false);
    let dir = tempfile::tempdir().unwrap();
    m.save_adapters(dir.path()).unwrap();
    let path = dir.path().join(ADAPTER_WEIGHTS_FILE);
    let good = checkpoint::load_tensors(&path).unwrap();
    let key = format!("{PREFIX}transformer.h.0.mlp.c_fc.lora_A.weight");
    let cases: Vec<(Vec<(String, Tensor)>, &str)> = vec![
        (
            good.iter().filter(|(n, _)| *n != key).cloned().collect(),
            "missing",
        ),
        (
            good.iter()
                .cloned()
                .chain([(
                    format!("{PREFIX}transformer.h.0.attn.c_proj.lora_A.weight"),
                    Tensor::zeros([2, 8], DType::F32, &Device::Cpu).unwrap(),
                )])
                .collect(),
            "attn.c_proj.lora_A",
        ),
        (
            good.iter()
                .map(|(n, t)| {
                    let t = if *n == key {
                        Tensor::zeros([3, 8], DType::F32, &Device::Cpu).unwrap()
                    } else {
                        t.clone()
                    };
                    (n.clone(), t)
                })
                .collect(),
            "expected [2, 8], found [3, 8]",
        ),
    ];
    for (tensors, says) in cases {
        checkpoint::save_tensors(&path, &tensors, None).unwrap();
        let mut back = Gpt2::new_random(&tiny(), DType::F32, &Device::Cpu, 3).unwrap();
        let err = back.load_adapters(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(says) && err.contains(ADAPTER_WEIGHTS_FILE),
            "{says}: {err}"
        );
        assert!(back.lora_config().is_none());
    }
}
