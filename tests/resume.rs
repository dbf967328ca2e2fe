//! Crash-safe checkpoints and bitwise resume (issue 13 item 2), end to end: a run
//! trained `N` steps without a break ends bit for bit where a run saved at step `K`,
//! dropped, and resumed from disk ends — adapters, optimizer moments and master weights,
//! step counts, the f16 loss scaler — on the CPU and the simulator, in f32, bf16 (with
//! stochastic rounding) and f16 (dynamic loss scaling, gradient accumulation), with
//! LoRA dropout on so that the RNG position matters. A process aborted in the middle of a
//! save (the `LORAFUSE_TEST_ABORT_IN_SAVE` hook) leaves the previous checkpoint, which
//! `latest_checkpoint` finds and which resumes.

use lorafuse::checkpoint::Gpt2Config;
use lorafuse::data::{Batch, MIN_VOCAB, Task, TaskGen};
use lorafuse::lora::{LoraConfig, LoraTarget};
use lorafuse::model::Gpt2;
use lorafuse::optim::{AdamWConfig, ParamStateOwned, Rounding};
use lorafuse::train::{TrainConfig, Trainer, latest_checkpoint, read_checkpoint_state};
use lorafuse::{DType, Device};
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

fn lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        dropout: 0.1,
        targets: vec![LoraTarget::CAttn, LoraTarget::MlpCFc],
        ..Default::default()
    }
}

/// Steps of the whole run and the step of the save (the simulator runs every launch on
/// the CPU: few steps).
const N: usize = 3;
const K: usize = 2;

fn train_config(total: usize, grad_accum: usize, rounding: Rounding) -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 1,
        total_steps: total,
        seed: 7,
        grad_accum,
        adamw: AdamWConfig {
            rounding,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn batches(n: usize) -> Vec<Batch> {
    let mut r#gen = TaskGen::new(Task::A, 4, 3).unwrap();
    (0..n).map(|_| r#gen.sample_batch(2)).collect()
}

/// The base model (seed 0) with adapters initialised from `lora_seed`.
fn model(device: &Device, dtype: DType, lora_seed: Option<u64>) -> Gpt2 {
    let mut m = Gpt2::new_random(&tiny(), dtype, device, 0).unwrap();
    if let Some(s) = lora_seed {
        m.attach_lora(&lora(), s).unwrap();
    }
    m
}

/// One parameter's optimizer state as bits: m, v and the master weights.
type StateBits = (Vec<u32>, Vec<u32>, Option<Vec<u32>>);

/// Everything a step depends on, as bits.
#[derive(Debug, PartialEq)]
struct Snapshot {
    params: Vec<(String, Vec<u64>)>,
    optimizer: Vec<StateBits>,
    steps: usize,
    optimizer_steps: u64,
    scaler: Option<(u64, u32, u32, u64)>,
}

fn snapshot(t: &Trainer) -> Snapshot {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    Snapshot {
        params: t
            .model
            .trainable_params()
            .into_iter()
            .map(|(n, p)| {
                let v = p.to_vec_f64().unwrap(); // exact for every dtype
                (n, v.iter().map(|x| x.to_bits()).collect())
            })
            .collect(),
        optimizer: (0..t.optimizer().params().len())
            .map(|i| match t.optimizer().state_to_host(i).unwrap().unwrap() {
                ParamStateOwned::F32 { m, v, master } => {
                    (bits(&m), bits(&v), master.as_deref().map(bits))
                }
                ParamStateOwned::F64 { .. } => panic!("no f64 here"),
            })
            .collect(),
        steps: t.steps(),
        optimizer_steps: t.optimizer().try_step_count().unwrap(),
        scaler: t.loss_scaler().unwrap().map(|s| {
            (
                s.scale().to_bits(),
                s.growth_interval(),
                s.clean_steps(),
                s.overflows(),
            )
        }),
    }
}

fn train(t: &mut Trainer, bs: &[Batch]) -> Vec<u64> {
    bs.iter()
        .map(|b| {
            t.step(&b.tokens, &b.targets, b.batch, b.seq)
                .unwrap()
                .loss
                .to_bits()
        })
        .collect()
}

/// One configuration: a run of `N` steps that saves at step `K` on the way (saving must
/// not disturb it), against a trainer built from the checkpoint alone (a fresh base
/// model whose adapters start elsewhere) and trained from `K` to `N`.
fn resume_matches(device: &Device, dtype: DType, grad_accum: usize, rounding: Rounding) {
    let what = format!("{device} {dtype} grad_accum {grad_accum} {rounding:?}");
    let started = std::time::Instant::now();
    let tc = train_config(N, grad_accum, rounding);
    let bs = batches(N);
    let dir = tempfile::tempdir().unwrap();
    let extra = json!({"cursor": K, "file": "data.txt"});

    let mut whole = Trainer::new(model(device, dtype, Some(1)), &tc).unwrap();
    let mut losses_whole = train(&mut whole, &bs[..K]);
    let at_k = snapshot(&whole);
    let ckpt = whole.save_checkpoint(dir.path(), &extra, None).unwrap();
    assert_eq!(ckpt, dir.path().join(format!("checkpoint-{K}")));
    losses_whole.extend(train(&mut whole, &bs[K..]));
    let end = snapshot(&whole);
    drop(whole);

    assert_eq!(latest_checkpoint(dir.path()).unwrap(), Some(ckpt.clone()));
    let state = read_checkpoint_state(&ckpt).unwrap();
    assert_eq!((state.step, state.extra.clone()), (K as u64, extra.clone()));
    let (mut resumed, got_extra) =
        Trainer::resume(model(device, dtype, Some(99)), &tc, &ckpt).unwrap();
    assert_eq!(got_extra, extra);
    assert_eq!(snapshot(&resumed), at_k, "{what}: the state at step {K}");
    let losses = train(&mut resumed, &bs[K..]);
    assert_eq!(
        losses,
        losses_whole[K..],
        "{what}: the losses after the resume"
    );
    assert_eq!(snapshot(&resumed), end, "{what}: the state at step {N}");
    if dtype == DType::F16 {
        let (_, _, clean, overflows) = end.scaler.unwrap();
        println!("{what}: loss scaler at the end: {clean} clean steps, {overflows} overflows");
        assert!(clean + overflows as u32 > 0);
    }
    println!(
        "{what}: resumed at {K} of {N}, bit-identical ({:.1} s; losses {:?})",
        started.elapsed().as_secs_f64(),
        losses_whole
            .iter()
            .map(|b| f64::from_bits(*b))
            .collect::<Vec<_>>()
    );
}

fn resume_is_bitwise(device: &Device) {
    // f32 keeps no master weights or loss scale: on a device its state is a subset of
    // bf16's, and the simulator's time is CI's limit.
    if *device == Device::Cpu {
        resume_matches(device, DType::F32, 1, Rounding::NearestEven);
    }
    resume_matches(device, DType::BF16, 1, Rounding::Stochastic { seed: 5 });
    // Accumulation under loss scaling: each micro-batch's backward is seeded with S/2.
    resume_matches(device, DType::F16, 2, Rounding::NearestEven);
}

lorafuse::test_device!(resume, resume_is_bitwise);

/// Full fine-tuning: the base weights are in the checkpoint and come back exactly.
#[test]
fn full_finetune_resumes_bitwise_on_the_cpu() {
    let d = Device::Cpu;
    let tc = train_config(N, 1, Rounding::NearestEven);
    let bs = batches(N);
    let mut whole = Trainer::new(model(&d, DType::F32, None), &tc).unwrap();
    train(&mut whole, &bs);
    let end = snapshot(&whole);

    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(model(&d, DType::F32, None), &tc).unwrap();
    train(&mut first, &bs[..K]);
    let ckpt = first
        .save_checkpoint(dir.path(), &json!(null), None)
        .unwrap();
    drop(first);
    for f in ["model.safetensors", "config.json", "optimizer.safetensors"] {
        assert!(ckpt.join(f).is_file(), "{f}");
    }
    assert!(!ckpt.join("adapter_model.safetensors").exists());
    // A base model from another seed: every weight comes from the checkpoint.
    let other = Gpt2::new_random(&tiny(), DType::F32, &d, 3).unwrap();
    let (mut resumed, _) = Trainer::resume(other, &tc, &ckpt).unwrap();
    train(&mut resumed, &bs[K..]);
    assert_eq!(snapshot(&resumed), end);
}

/// A model without adapters gets them attached from the checkpoint.
#[test]
fn resume_attaches_the_adapters_when_the_model_has_none() {
    let d = Device::Cpu;
    let tc = train_config(N, 1, Rounding::NearestEven);
    let bs = batches(N);
    let mut whole = Trainer::new(model(&d, DType::F32, Some(1)), &tc).unwrap();
    train(&mut whole, &bs);
    let end = snapshot(&whole);

    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(model(&d, DType::F32, Some(1)), &tc).unwrap();
    train(&mut first, &bs[..K]);
    let ckpt = first.save_checkpoint(dir.path(), &json!({}), None).unwrap();
    drop(first);
    let (mut resumed, _) = Trainer::resume(model(&d, DType::F32, None), &tc, &ckpt).unwrap();
    assert_eq!(resumed.model.lora_config().unwrap().r, lora().r);
    train(&mut resumed, &bs[K..]);
    assert_eq!(snapshot(&resumed), end);
}

/// The environment variable that makes the child below run.
const CHILD_DIR: &str = "LORAFUSE_RESUME_TEST_CHILD_DIR";

/// Run by `an_aborted_save_leaves_the_previous_checkpoint` in a child process: trains
/// and saves at steps 1 and 2; the second save aborts (the parent sets the test hook to
/// `files@2`: only step 2's save). Does nothing in a normal run.
#[test]
fn child_saves_until_aborted() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let dir = Path::new(&dir);
    let d = Device::Cpu;
    let tc = train_config(N, 1, Rounding::NearestEven);
    let bs = batches(2);
    let mut t = Trainer::new(model(&d, DType::F32, Some(1)), &tc).unwrap();
    train(&mut t, &bs[..1]);
    t.save_checkpoint(dir, &json!({"cursor": 1}), None).unwrap();
    train(&mut t, &bs[1..]);
    t.save_checkpoint(dir, &json!({"cursor": 2}), None).unwrap();
    unreachable!("the save should have aborted");
}

/// A process that aborts in the middle of a save (after 0, 2 or 3 files, or with every
/// file written but before the rename) leaves `checkpoint-1` complete and loadable, and
/// a leftover temporary directory that `latest_checkpoint` ignores and the next save
/// removes.
#[test]
fn an_aborted_save_leaves_the_previous_checkpoint() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for files in [0, 2, 3, 4] {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                "child_saves_until_aborted",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .env("LORAFUSE_TEST_ABORT_IN_SAVE", format!("{files}@2"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{files}: the child did not abort");
        assert!(
            stderr.contains("LORAFUSE_TEST_ABORT_IN_SAVE: aborting"),
            "{files}: {stderr}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(out.status.signal(), Some(6), "{files}: not SIGABRT");
        }
        let tmp = dir.path().join(".checkpoint-2.tmp");
        assert!(
            tmp.is_dir(),
            "{files}: the interrupted save left no temp dir"
        );
        assert!(!dir.path().join("checkpoint-2").exists());
        let latest = latest_checkpoint(dir.path()).unwrap().unwrap();
        assert_eq!(latest, dir.path().join("checkpoint-1"));
        let d = Device::Cpu;
        let tc = train_config(N, 1, Rounding::NearestEven);
        let (mut t, extra) = Trainer::resume(model(&d, DType::F32, None), &tc, &latest).unwrap();
        assert_eq!((t.steps(), extra), (1, json!({"cursor": 1})));
        // The next save cleans the leftover up.
        let bs = batches(2);
        train(&mut t, &bs[1..]);
        t.save_checkpoint(dir.path(), &json!({"cursor": 2}), None)
            .unwrap();
        assert!(!tmp.exists());
        assert_eq!(
            latest_checkpoint(dir.path()).unwrap(),
            Some(dir.path().join("checkpoint-2"))
        );
        println!("aborted after {files} file(s): checkpoint-1 resumed, the leftover removed");
    }
}
