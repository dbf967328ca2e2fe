//! Gradient accumulation, hyper-parameter diffs, and the failure cases of checkpoints
//! (a save that fails midway, leftovers, pruning, missing and corrupt files). The
//! bitwise resume on every backend is `tests/resume.rs`.

use super::checkpoint::FAIL_IN_SAVE;
use super::*;
use crate::checkpoint::{self as ckpt, Gpt2Config};
use crate::data::{Batch, MIN_VOCAB, Task, TaskGen};
use crate::lora::{LoraConfig, LoraTarget};
use crate::ops::IGNORE_INDEX;
use crate::optim::ParamStateOwned;
use serde_json::json;
use std::path::Path;

fn tiny() -> Gpt2Config {
    Gpt2Config {
        vocab_size: MIN_VOCAB,
        n_positions: 9,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
    }
}

fn lora(dropout: f64) -> LoraConfig {
    LoraConfig {
        r: 4,
        dropout,
        targets: vec![LoraTarget::CAttn, LoraTarget::MlpCFc],
        ..Default::default()
    }
}

fn model(dtype: DType, lora_seed: Option<u64>, dropout: f64) -> Gpt2 {
    let mut m = Gpt2::new_random(&tiny(), dtype, &Device::Cpu, 0).unwrap();
    if let Some(s) = lora_seed {
        m.attach_lora(&lora(dropout), s).unwrap();
    }
    m
}

fn tc(grad_accum: usize) -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 1,
        total_steps: 10,
        seed: 7,
        grad_accum,
        ..Default::default()
    }
}

fn batches(n: usize, rows: usize) -> Vec<Batch> {
    let mut r#gen = TaskGen::new(Task::A, 4, 3).unwrap();
    (0..n).map(|_| r#gen.sample_batch(rows)).collect()
}

fn trainer(dtype: DType, grad_accum: usize) -> Trainer {
    Trainer::new(model(dtype, Some(1), 0.1), &tc(grad_accum)).unwrap()
}

fn train(t: &mut Trainer, bs: &[Batch]) -> Vec<f64> {
    bs.iter()
        .map(|b| t.step(&b.tokens, &b.targets, b.batch, b.seq).unwrap().loss)
        .collect()
}

/// The trainable parameters' values and the optimizer state, as f64 (exact).
fn values(t: &Trainer) -> Vec<Vec<f64>> {
    let mut out: Vec<Vec<f64>> = t
        .model
        .trainable_params()
        .iter()
        .map(|(_, p)| p.to_vec_f64().unwrap())
        .collect();
    for i in 0..t.optimizer().params().len() {
        if let ParamStateOwned::F32 { m, v, master } =
            t.optimizer().state_to_host(i).unwrap().unwrap()
        {
            out.push(m.iter().map(|x| *x as f64).collect());
            out.push(v.iter().map(|x| *x as f64).collect());
            if let Some(w) = master {
                out.push(w.iter().map(|x| *x as f64).collect());
            }
        }
    }
    out
}

fn bits(v: &[Vec<f64>]) -> Vec<Vec<u64>> {
    v.iter()
        .map(|x| x.iter().map(|y| y.to_bits()).collect())
        .collect()
}

/// Two half batches accumulated = one step on the whole batch (to f32 rounding: the
/// sums run in another order), with the same loss-mask counts in each half; the split
/// by `grad_accum` is the same as explicit micro-batches, bit for bit, and deterministic.
#[test]
fn two_half_batches_equal_one_full_batch() {
    let bs = batches(3, 8);
    for b in &bs {
        let count = |t: &[i32]| t.iter().filter(|&&x| x != IGNORE_INDEX).count();
        let half = b.targets.len() / 2;
        assert_eq!(count(&b.targets[..half]), count(&b.targets[half..]));
        assert!(count(&b.targets[..half]) > 0);
    }
    // No dropout: the masks of a half batch are not those of the rows in the whole one.
    let mk = |grad_accum| Trainer::new(model(DType::F32, Some(1), 0.0), &tc(grad_accum)).unwrap();
    let mut full = mk(1);
    let mut accum = mk(2);
    let mut explicit = mk(1);
    let mut again = mk(2);
    let lf = train(&mut full, &bs);
    let la = train(&mut accum, &bs);
    let la2 = train(&mut again, &bs);
    let le: Vec<f64> = bs
        .iter()
        .map(|b| {
            let h = b.tokens.len() / 2;
            let mb = |r: std::ops::Range<usize>| MicroBatch {
                tokens: &b.tokens[r.clone()],
                targets: &b.targets[r],
                batch: b.batch / 2,
                seq: b.seq,
            };
            explicit.step_accum(&[mb(0..h), mb(h..2 * h)]).unwrap().loss
        })
        .collect();
    let lb = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(lb(&la), lb(&le), "grad_accum = 2 vs explicit halves");
    assert_eq!(lb(&la), lb(&la2), "grad_accum = 2 twice");
    assert_eq!(bits(&values(&accum)), bits(&values(&explicit)));
    assert_eq!(bits(&values(&accum)), bits(&values(&again)));
    for (a, f) in la.iter().zip(&lf) {
        assert!((a - f).abs() <= 1e-5 * f.abs(), "loss {a} vs {f}");
    }
    let (va, vf) = (values(&accum), values(&full));
    for (i, (a, f)) in va.iter().zip(&vf).enumerate() {
        crate::testing::assert_close(&format!("state {i}"), a, f, 1e-4);
    }
    assert_ne!(bits(&va), bits(&vf), "the sums run in another order");
    println!("grad_accum 2 vs full batch: losses {la:?} vs {lf:?}");
}

/// Accumulation in bf16 (f32 sums) and f16 (loss scaling with S/n seeds) is
/// deterministic and gives finite results close to one full-batch step.
#[test]
fn accumulation_in_half_precision_is_deterministic() {
    let bs = batches(2, 8);
    for dtype in [DType::BF16, DType::F16] {
        let mut a = trainer(dtype, 2);
        let mut b = trainer(dtype, 2);
        let la = train(&mut a, &bs);
        let lb = train(&mut b, &bs);
        assert_eq!(la, lb, "{dtype}");
        assert_eq!(bits(&values(&a)), bits(&values(&b)), "{dtype}");
        assert!(la.iter().all(|l| l.is_finite()), "{dtype}: {la:?}");
        assert_eq!(a.steps(), 2);
    }
}

#[test]
fn accumulation_errors_change_nothing() {
    assert!(Trainer::new(model(DType::F32, Some(1), 0.0), &tc(0)).is_err());
    let mut t = trainer(DType::F32, 2);
    let before = values(&t);
    let b = &batches(1, 3)[0];
    // 3 rows do not split in two.
    let e = t.step(&b.tokens, &b.targets, b.batch, b.seq).unwrap_err();
    assert!(e.to_string().contains("grad_accum = 2"), "{e}");
    // Lengths that do not fit the shape.
    assert!(t.step(&b.tokens[1..], &b.targets[1..], 2, b.seq).is_err());
    assert!(t.step_accum(&[]).is_err());
    // A bad second micro-batch fails after the first ran: still nothing is updated.
    let good = MicroBatch {
        tokens: &b.tokens,
        targets: &b.targets,
        batch: b.batch,
        seq: b.seq,
    };
    let bad = MicroBatch {
        tokens: &b.tokens[..b.seq],
        targets: &b.targets[..b.seq],
        batch: 2,
        seq: b.seq,
    };
    assert!(t.step_accum(&[good, bad]).is_err());
    assert_eq!(t.steps(), 0);
    assert_eq!(bits(&values(&t)), bits(&before));
}

#[test]
fn dropout_seeds_of_micro_batches() {
    assert_eq!(dropout_seed(7, 3, 0), 10);
    let seeds: std::collections::BTreeSet<u64> = (0..4)
        .flat_map(|s| (0..8).map(move |j| dropout_seed(7, s, j)))
        .collect();
    assert_eq!(
        seeds.len(),
        32,
        "no two (step, micro-batch) pairs share a seed"
    );
}

#[test]
fn hyper_param_diff_names_the_changed_keys() {
    let m = model(DType::F32, Some(1), 0.1);
    let base = tc(1);
    let old = hyper_params(&m, &base);
    assert!(diff_hyper_params(&old, &hyper_params(&m, &base)).is_empty());
    let mut changed = base.clone();
    changed.lr = 1e-4;
    changed.grad_accum = 4;
    changed.adamw.beta2 = 0.95;
    changed.max_grad_norm = None;
    changed.adamw.rounding = crate::optim::Rounding::Stochastic { seed: 3 };
    let mut m2 = model(DType::F32, None, 0.0);
    m2.attach_lora(&LoraConfig { r: 8, ..lora(0.1) }, 1)
        .unwrap();
    let d = diff_hyper_params(&old, &hyper_params(&m2, &changed));
    let keys: Vec<&str> = d.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "adamw.beta2",
            "adamw.rounding",
            "grad_accum",
            "lora.r",
            "lr",
            "max_grad_norm"
        ]
    );
    let text: Vec<String> = d.iter().map(ToString::to_string).collect();
    assert_eq!(
        text[1],
        r#"adamw.rounding: "nearest_even" → {"stochastic":3}"#
    );
    assert_eq!(text[3], "lora.r: 4 → 8");
    assert_eq!(text[5], "max_grad_norm: 1.0 → null");
    // Another dtype and LoRA gone: an object on one side only is one change.
    let full = Gpt2::new_random(&tiny(), DType::BF16, &Device::Cpu, 0).unwrap();
    let d = diff_hyper_params(&old, &hyper_params(&full, &base));
    let keys: Vec<&str> = d.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["dtype", "full_finetune", "lora"]);
    assert_eq!(d[2].new, Some(serde_json::Value::Null));
    assert_eq!(d[0].to_string(), r#"dtype: "f32" → "bf16""#);
    // A value read back from a file compares equal to the one computed now.
    let text = serde_json::to_string_pretty(&old).unwrap();
    let back: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(diff_hyper_params(&back, &hyper_params(&m, &base)).is_empty());
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A save that fails after 0, 2, 3 or 4 files returns the error, leaves no partial
/// checkpoint and no temporary directory, and the previous checkpoint is still the
/// latest and resumes; leftovers of a crash and incomplete directories are ignored,
/// and the next save removes the leftovers.
#[test]
fn a_failed_save_leaves_the_previous_checkpoint() {
    let run = tempfile::tempdir().unwrap();
    let bs = batches(3, 4);
    let mut t = trainer(DType::F32, 1);
    train(&mut t, &bs[..2]);
    let good = t
        .save_checkpoint(run.path(), &json!({"at": 2}), None)
        .unwrap();
    let at_2 = values(&t);
    train(&mut t, &bs[2..]);
    for n in [0, 2, 3, 4] {
        FAIL_IN_SAVE.with(|f| f.set(Some(n)));
        let e = t.save_checkpoint(run.path(), &json!({"at": 3}), None);
        FAIL_IN_SAVE.with(|f| f.set(None));
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("injected failure") && e.contains(".checkpoint-3.tmp"),
            "{e}"
        );
        assert_eq!(dir_names(run.path()), ["checkpoint-2"], "after {n} files");
        assert_eq!(latest_checkpoint(run.path()).unwrap(), Some(good.clone()));
    }
    // A crash's leftovers, an incomplete directory and unrelated entries are ignored.
    std::fs::create_dir(run.path().join(".checkpoint-3.tmp")).unwrap();
    std::fs::write(
        run.path().join(".checkpoint-3.tmp/optimizer.safetensors"),
        b"half",
    )
    .unwrap();
    std::fs::create_dir(run.path().join("checkpoint-9")).unwrap();
    std::fs::create_dir(run.path().join("checkpoint-x1")).unwrap();
    std::fs::write(run.path().join("checkpoint-10"), b"a file").unwrap();
    assert_eq!(latest_checkpoint(run.path()).unwrap(), Some(good.clone()));
    let (back, extra) = Trainer::resume(model(DType::F32, Some(5), 0.1), &tc(1), &good).unwrap();
    assert_eq!((back.steps(), extra), (2, json!({"at": 2})));
    assert_eq!(bits(&values(&back)), bits(&at_2));
    // The next save removes the leftover (only it).
    let third = t
        .save_checkpoint(run.path(), &json!({"at": 3}), None)
        .unwrap();
    assert_eq!(
        dir_names(run.path()),
        [
            "checkpoint-10",
            "checkpoint-2",
            "checkpoint-3",
            "checkpoint-9",
            "checkpoint-x1"
        ]
    );
    assert_eq!(latest_checkpoint(run.path()).unwrap(), Some(third));
    // A missing run directory is an error naming it; an empty one has no checkpoint.
    let missing = run.path().join("nope");
    let e = latest_checkpoint(&missing).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(latest_checkpoint(empty.path()).unwrap(), None);
}

#[test]
fn keep_prunes_old_checkpoints_and_a_resave_replaces() {
    let run = tempfile::tempdir().unwrap();
    let bs = batches(4, 4);
    let mut t = trainer(DType::F32, 1);
    assert!(t.save_checkpoint(run.path(), &json!(0), Some(0)).is_err());
    for b in &bs {
        train(&mut t, std::slice::from_ref(b));
        t.save_checkpoint(run.path(), &json!(t.steps()), Some(2))
            .unwrap();
    }
    assert_eq!(dir_names(run.path()), ["checkpoint-3", "checkpoint-4"]);
    // Saving step 4 again replaces it.
    let p = t
        .save_checkpoint(run.path(), &json!("again"), None)
        .unwrap();
    assert_eq!(read_checkpoint_state(&p).unwrap().extra, json!("again"));
    assert_eq!(dir_names(run.path()), ["checkpoint-3", "checkpoint-4"]);
}

/// Copies a checkpoint directory (flat) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Resumes a copy of `good` changed by `spoil`; the error must contain every needle.
fn expect_err(good: &Path, what: &str, needles: &[&str], spoil: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("checkpoint-2");
    copy_dir(good, &c);
    spoil(&c);
    let r = Trainer::resume(model(DType::F32, Some(5), 0.1), &tc(1), &c);
    let e = match r {
        Ok(_) => panic!("{what}: resumed"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(e.contains(n), "{what}: {e:?} lacks {n:?}");
    }
    println!("{what}: {e}");
}

fn edit_state(c: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = c.join(TRAINER_STATE_FILE);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

fn edit_tensors(path: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let (mut ts, meta) = ckpt::load_tensors_with_metadata(path).unwrap();
    f(&mut ts);
    ckpt::save_tensors(path, &ts, Some(meta)).unwrap();
}

#[test]
fn missing_and_corrupt_files_are_errors_naming_the_file() {
    let run = tempfile::tempdir().unwrap();
    let mut t = trainer(DType::F32, 1);
    train(&mut t, &batches(2, 4));
    let good = t.save_checkpoint(run.path(), &json!(null), None).unwrap();
    let opt = "optimizer.safetensors";
    let st = TRAINER_STATE_FILE;
    let ad = "adapter_model.safetensors";
    let first_a = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight";

    expect_err(&good, "no trainer state", &[st], |c| {
        std::fs::remove_file(c.join(st)).unwrap()
    });
    expect_err(
        &good,
        "trainer state not JSON",
        &[st, "not valid JSON"],
        |c| std::fs::write(c.join(st), b"{\"format\": \"lorafuse-tr").unwrap(),
    );
    expect_err(&good, "another format", &[st, "format"], |c| {
        edit_state(c, |v| v["format"] = json!("something-else"))
    });
    expect_err(&good, "another version", &[st, "format_version 2"], |c| {
        edit_state(c, |v| v["format_version"] = json!(2))
    });
    expect_err(&good, "a missing field", &[st, "optimizer_step"], |c| {
        edit_state(c, |v| {
            v.as_object_mut().unwrap().remove("optimizer_step");
        })
    });
    expect_err(&good, "a bad loss scaler", &[st, "loss scaler"], |c| {
        edit_state(c, |v| {
            v["loss_scaler"] = json!({"scale": 0.5, "scale_bits": 0.5f64.to_bits(),
                "growth_interval": 10, "clean_steps": 0, "overflows": 0, "on_device": false})
        })
    });
    expect_err(
        &good,
        "an inconsistent schedule",
        &[st, "schedule.position"],
        |c| edit_state(c, |v| v["schedule"]["position"] = json!(5)),
    );
    expect_err(
        &good,
        "a parameter renamed",
        &[st, "trainable parameter 0"],
        |c| edit_state(c, |v| v["trainable"]["params"][0]["name"] = json!("w")),
    );
    expect_err(&good, "no optimizer file", &[opt], |c| {
        std::fs::remove_file(c.join(opt)).unwrap()
    });
    expect_err(&good, "a truncated optimizer file", &[opt], |c| {
        let p = c.join(opt);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 9]).unwrap();
    });
    expect_err(&good, "garbage optimizer file", &[opt], |c| {
        std::fs::write(c.join(opt), b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap()
    });
    expect_err(
        &good,
        "an optimizer tensor missing",
        &[opt, "missing tensor", ".v"],
        |c| {
            edit_tensors(&c.join(opt), |ts| {
                ts.retain(|(n, _)| !n.ends_with("lora_B.weight.v"))
            })
        },
    );
    expect_err(
        &good,
        "an optimizer tensor too many",
        &[opt, "unexpected tensor zz"],
        |c| {
            edit_tensors(&c.join(opt), |ts| {
                ts.push((
                    "zz".into(),
                    Tensor::zeros([1], DType::F32, &Device::Cpu).unwrap(),
                ))
            })
        },
    );
    expect_err(
        &good,
        "an optimizer tensor of another shape",
        &[opt, first_a],
        |c| {
            edit_tensors(&c.join(opt), |ts| {
                let i = ts
                    .iter()
                    .position(|(n, _)| n == &format!("{first_a}.m"))
                    .unwrap();
                ts[i].1 = Tensor::zeros([3], DType::F32, &Device::Cpu).unwrap();
            })
        },
    );
    expect_err(
        &good,
        "an optimizer tensor of another dtype",
        &[opt, "f64"],
        |c| {
            edit_tensors(&c.join(opt), |ts| {
                let i = ts
                    .iter()
                    .position(|(n, _)| n == &format!("{first_a}.m"))
                    .unwrap();
                ts[i].1 = ts[i].1.to_dtype(DType::F64).unwrap();
            })
        },
    );
    expect_err(
        &good,
        "the optimizer at another step",
        &[opt, "step"],
        |c| {
            let p = c.join(opt);
            let (ts, mut meta) = ckpt::load_tensors_with_metadata(&p).unwrap();
            meta.insert("step".into(), "7".into());
            ckpt::save_tensors(&p, &ts, Some(meta)).unwrap();
        },
    );
    expect_err(
        &good,
        "an optimizer file of another format",
        &[opt, "format missing"],
        |c| {
            let p = c.join(opt);
            let (ts, mut meta) = ckpt::load_tensors_with_metadata(&p).unwrap();
            meta.remove("format");
            ckpt::save_tensors(&p, &ts, Some(meta)).unwrap();
        },
    );
    expect_err(&good, "no adapter weights", &[ad], |c| {
        std::fs::remove_file(c.join(ad)).unwrap()
    });
    expect_err(&good, "an adapter of another shape", &[ad, first_a], |c| {
        edit_tensors(&c.join(ad), |ts| {
            let i = ts.iter().position(|(n, _)| n == first_a).unwrap();
            ts[i].1 = Tensor::zeros([4, 31], DType::F32, &Device::Cpu).unwrap();
        })
    });
    expect_err(
        &good,
        "an adapter of another dtype",
        &[ad, first_a, "bf16"],
        |c| {
            edit_tensors(&c.join(ad), |ts| {
                let i = ts.iter().position(|(n, _)| n == first_a).unwrap();
                ts[i].1 = ts[i].1.to_dtype(DType::BF16).unwrap();
            })
        },
    );
    expect_err(
        &good,
        "an adapter tensor missing",
        &[ad, "missing tensor", first_a],
        |c| edit_tensors(&c.join(ad), |ts| ts.retain(|(n, _)| n != first_a)),
    );
    expect_err(&good, "no adapter config", &["adapter_config.json"], |c| {
        std::fs::remove_file(c.join("adapter_config.json")).unwrap()
    });

    // Models that do not fit the checkpoint.
    let try_resume = |m: Gpt2| {
        Trainer::resume(m, &tc(1), &good)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = try_resume(model(DType::BF16, Some(1), 0.1));
    assert!(e.contains(st) && e.contains("bf16"), "{e}");
    let mut other_rank = model(DType::F32, None, 0.0);
    other_rank
        .attach_lora(&LoraConfig { r: 2, ..lora(0.1) }, 1)
        .unwrap();
    let e = try_resume(other_rank);
    assert!(e.contains(st) && e.contains(first_a), "{e}");
    let mut full = model(DType::F32, Some(1), 0.1);
    full.set_full_finetune(true);
    let e = try_resume(full);
    assert!(e.contains("full fine-tuning"), "{e}");
    // A missing checkpoint directory.
    let e = Trainer::resume(
        model(DType::F32, Some(1), 0.1),
        &tc(1),
        &run.path().join("checkpoint-7"),
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(e.contains("checkpoint-7"), "{e}");
    // The good one still resumes.
    assert!(Trainer::resume(model(DType::F32, Some(5), 0.1), &tc(1), &good).is_ok());
}

/// A trainer whose model changed its trainable parameters refuses to save.
#[test]
fn saving_after_the_trainable_set_changed_is_refused() {
    let run = tempfile::tempdir().unwrap();
    let mut t = trainer(DType::F32, 1);
    t.model.set_full_finetune(true);
    let e = t
        .save_checkpoint(run.path(), &json!(null), None)
        .unwrap_err();
    assert!(e.to_string().contains("changed"), "{e}");
    assert!(dir_names(run.path()).is_empty());
}

/// The abort hook's value must be a number of files (the save reads it through this).
#[test]
fn the_abort_hook_value_is_parsed() {
    use super::checkpoint::parse_abort_hook;
    assert_eq!(parse_abort_hook(None).unwrap(), None);
    assert_eq!(parse_abort_hook(Some("3")).unwrap(), Some((3, None)));
    assert_eq!(parse_abort_hook(Some(" 0 ")).unwrap(), Some((0, None)));
    assert_eq!(parse_abort_hook(Some("2@4")).unwrap(), Some((2, Some(4))));
    assert!(parse_abort_hook(Some("2@x")).is_err());
    let e = parse_abort_hook(Some("two")).unwrap_err().to_string();
    assert!(e.contains(ABORT_IN_SAVE_ENV) && e.contains("two"), "{e}");
}

/// The loss scaler's whole state (scale, growth interval, clean steps, overflows)
/// survives a save and resume, on the host and on a device.
fn loss_scaler_round_trips(device: &Device) {
    let mut m = Gpt2::new_random(&tiny(), DType::F16, device, 0).unwrap();
    m.attach_lora(&lora(0.0), 1).unwrap();
    let mut t = Trainer::new(m, &tc(1)).unwrap();
    let odd = DynamicLossScaler::from_parts(1024.0, 300, 17, 3).unwrap();
    t.scaler = Some(if *device == Device::Cpu {
        Scaler::Host(odd.clone())
    } else {
        Scaler::Device(Box::new(DeviceLossScaler::new(&odd, device).unwrap()))
    });
    let run = tempfile::tempdir().unwrap();
    let c = t.save_checkpoint(run.path(), &json!(null), None).unwrap();
    let saved = read_checkpoint_state(&c).unwrap().loss_scaler.unwrap();
    assert_eq!(saved.on_device, *device != Device::Cpu);
    assert_eq!(saved.to_scaler().unwrap(), odd);
    let mut m = Gpt2::new_random(&tiny(), DType::F16, device, 0).unwrap();
    m.attach_lora(&lora(0.0), 2).unwrap();
    let (back, _) = Trainer::resume(m, &tc(1), &c).unwrap();
    assert_eq!(back.loss_scaler().unwrap(), Some(odd));
}

crate::test_device!(loss_scaler, loss_scaler_round_trips);
