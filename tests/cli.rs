//! The command line end to end, as a user runs it: `lorafuse train` (with `--resume`,
//! crashes, SIGKILL and SIGINT), `eval`, `generate`, `merge` and `inspect` on a tiny
//! GPT-2 directory and tokenizer made by the test (random weights in transformers'
//! layout, a BPE trained on a few paragraphs), on the CPU and the simulator; then every
//! bad input of the issue's list: exit code 1, a message naming the file or option, and
//! nothing written.

use lorafuse::text::fixtures::{self, TINY_CORPUS, TokenizerFiles};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The model's (and tokenizer's) vocabulary.
const VOCAB: usize = 300;

struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    text: PathBuf,
    pairs: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("gpt2");
        std::fs::create_dir_all(&model).unwrap();
        fixtures::write_tiny_gpt2_dir(&model, 7, VOCAB, TokenizerFiles::Json).unwrap();
        let text = dir.path().join("corpus.txt");
        std::fs::write(&text, [TINY_CORPUS; 3].join("\n\n")).unwrap();
        let pairs = dir.path().join("pairs.jsonl");
        let lines: Vec<String> = (0..12)
            .map(|i| {
                format!(
                    r#"{{"prompt": "Q: what is {i} plus one?", "completion": " A: {}."}}"#,
                    i + 1
                )
            })
            .collect();
        std::fs::write(&pairs, lines.join("\n")).unwrap();
        Fixture {
            dir,
            model,
            text,
            pairs,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `train` on the CPU with small settings; `extra` adds or overrides options.
    fn train_args(&self, out: &Path, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--model",
            s(&self.model),
            "--data",
            s(&self.text),
            s(&self.pairs),
            "--out",
            s(out),
            "--device",
            "cpu",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--steps",
            "6",
            "--rank",
            "4",
            "--dropout",
            "0.1",
            "--val-fraction",
            "0.2",
            "--eval-every",
            "3",
            "--save-every",
            "3",
            "--quiet",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        // `extra`'s options replace the same options above (clap takes each once).
        let mut i = 0;
        while i < extra.len() {
            let has_value = extra.get(i + 1).is_some_and(|x| !x.starts_with("--"));
            match v.iter().position(|x| x == extra[i]) {
                Some(j) if has_value => v[j + 1] = extra[i + 1].to_string(),
                Some(_) => {}
                None => {
                    v.push(extra[i].to_string());
                    if has_value {
                        v.push(extra[i + 1].to_string());
                    }
                }
            }
            i += 1 + usize::from(has_value);
        }
        v
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn lorafuse(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorafuse"));
    c.args(args).env_remove("LORAFUSE_TEST_ABORT_IN_SAVE");
    c
}

fn run(args: &[String]) -> Output {
    lorafuse(args).output().unwrap()
}

fn strs(args: &[&str]) -> Vec<String> {
    args.iter().map(|x| x.to_string()).collect()
}

/// `lorafuse merge` of `adapter` into the fixture's model, written to `out`.
fn merge_args(f: &Fixture, adapter: &Path, out: &Path) -> Vec<String> {
    strs(&[
        "merge",
        "--model",
        s(&f.model),
        "--adapter",
        s(adapter),
        "--out",
        s(out),
    ])
}

/// Runs and expects success; returns stdout.
fn ok(args: &[String]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "lorafuse {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and expects exit code 1 with `error:` and every needle in stderr; returns stderr.
fn fails(args: &[String], needles: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "lorafuse {args:?}: {err}");
    assert!(err.contains("error:"), "lorafuse {args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "lorafuse {args:?}: {n:?} not in {err}");
    }
    err
}

fn step_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .collect()
}

fn checkpoints(run_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    v.sort();
    v
}

fn eval_loss(stdout: &str) -> f64 {
    let word = stdout
        .split_whitespace()
        .skip_while(|w| *w != "loss")
        .nth(1);
    word.and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no loss in {stdout:?}"))
}

#[test]
fn train_eval_generate_merge_inspect_on_the_cpu() {
    let f = Fixture::new();
    let run_dir = f.path("run");
    let out = ok(&f.train_args(&run_dir, &[]));
    assert!(out.contains("adapter (PEFT format)"), "{out}");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(run_dir.join("adapter").join(file).is_file(), "{file}");
    }
    let steps = step_lines(&run_dir);
    assert_eq!(steps.len(), 6);
    assert!(
        steps
            .iter()
            .all(|v| v["loss"].as_f64().unwrap().is_finite())
    );
    let evals = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .matches("val_loss")
        .count();
    assert_eq!(evals, 2, "at step 3 and at the end");
    assert_eq!(checkpoints(&run_dir), ["checkpoint-3", "checkpoint-6"]);

    // eval: the adapter changes the loss; the merged model gives the unmerged one's.
    let adapter = run_dir.join("adapter");
    let eval = |model: &Path, adapter: Option<&Path>| {
        let mut a = strs(&["eval", "--model", s(model), "--data", s(&f.text)]);
        a.extend(strs(&["--seq-len", "16", "--device", "cpu"]));
        if let Some(ad) = adapter {
            a.extend(strs(&["--adapter", s(ad)]));
        }
        eval_loss(&ok(&a))
    };
    let base = eval(&f.model, None);
    let tuned = eval(&f.model, Some(&adapter));
    assert!(base.is_finite() && tuned.is_finite());
    assert_ne!(base, tuned);
    let merged = f.path("merged");
    ok(&merge_args(&f, &adapter, &merged));
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(file).is_file(), "{file}");
    }
    let merged_loss = eval(&merged, None);
    assert!(
        (merged_loss - tuned).abs() <= 1e-5 * tuned.abs(),
        "merged {merged_loss} vs unmerged {tuned}"
    );
    // merge refuses a non-empty output directory.
    fails(&merge_args(&f, &adapter, &merged), &["not empty"]);

    // generate: greedy is reproducible; sampling is seeded.
    let r#gen = |extra: &[&str]| {
        let mut a = strs(&["generate", "--model", s(&f.model), "--adapter", s(&adapter)]);
        a.extend(strs(&[
            "--prompt",
            "The cat",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
        ]));
        a.extend(strs(extra));
        ok(&a)
    };
    let g1 = r#gen(&["--temperature", "0"]);
    assert!(g1.starts_with("The cat"), "{g1}");
    assert_eq!(g1, r#gen(&["--temperature", "0"]));
    let s1 = r#gen(&[
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]);
    assert_eq!(
        s1,
        r#gen(&[
            "--temperature",
            "0.8",
            "--top-k",
            "20",
            "--top-p",
            "0.9",
            "--seed",
            "3"
        ])
    );

    // inspect: the config, the modules, the parameter count.
    let ins = ok(&strs(&["inspect", s(&adapter)]));
    assert!(
        ins.contains("h.0.attn.c_attn") && ins.contains("h.1.attn.c_attn"),
        "{ins}"
    );
    // 2 layers × (A [4, 32] + B [96, 4]).
    assert!(
        ins.contains(&format!(
            "{} parameters in 2 modules",
            2 * (4 * 32 + 96 * 4)
        )),
        "{ins}"
    );
}

/// PEFT (Python) reads the adapter `lorafuse train` wrote exactly, q/k/v thirds (saved as
/// a block-structured `c_attn`) included, and `lorafuse merge` is PEFT's
/// `merge_and_unload` (tests/python/check_peft_adapter.py). Skipped, visibly, where torch,
/// transformers and peft do not import: `LORAFUSE_PYTHON` names the interpreter (e.g. the
/// venv of bench/pytorch/README.md), `LORAFUSE_REQUIRE_PEFT=1` makes a skip a failure.
#[test]
fn peft_loads_the_adapter_train_wrote_exactly() {
    let python = std::env::var("LORAFUSE_PYTHON").unwrap_or_else(|_| "python3".into());
    let imports = Command::new(&python)
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !imports {
        lorafuse::testing::skip(
            "peft_loads_the_adapter_train_wrote_exactly",
            &format!("{python} cannot import torch, transformers and peft; set LORAFUSE_PYTHON"),
            Some("LORAFUSE_REQUIRE_PEFT"),
        );
        return;
    }
    let f = Fixture::new();
    let run_dir = f.path("run");
    let targets = ["--targets", "c_attn.q,c_attn.v,mlp.c_fc", "--dropout", "0"];
    ok(&f.train_args(&run_dir, &targets));
    let adapter = run_dir.join("adapter");
    let merged = f.path("merged");
    ok(&merge_args(&f, &adapter, &merged));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/check_peft_adapter.py"
    );
    let out = Command::new(&python)
        .args([script, "--model", s(&f.model), "--adapter", s(&adapter)])
        .args(["--merged", s(&merged)])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("\nPASS"), "{text}");
    println!("{text}");
}

#[test]
fn train_generate_and_eval_on_the_simulator() {
    let f = Fixture::new();
    let run_dir = f.path("run");
    let mut args = f.train_args(
        &run_dir,
        &["--device", "sim", "--steps", "2", "--save-every", "1"],
    );
    args.retain(|a| a != "--dropout" && a != "0.1");
    ok(&args);
    assert_eq!(step_lines(&run_dir).len(), 2);
    let adapter = run_dir.join("adapter");
    let g = ok(&strs(&[
        "generate",
        "--model",
        s(&f.model),
        "--adapter",
        s(&adapter),
        "--prompt",
        "The dog",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
        "--device",
        "sim",
    ]));
    assert!(g.starts_with("The dog"), "{g}");
    let e = ok(&strs(&[
        "eval",
        "--model",
        s(&f.model),
        "--adapter",
        s(&adapter),
        "--data",
        s(&f.pairs),
        "--seq-len",
        "16",
        "--device",
        "sim",
    ]));
    assert!(eval_loss(&e).is_finite());
}

/// A run killed in the middle of a save (the abort hook, in the save of step 6) resumes
/// from the checkpoint before it and ends with adapters bit-identical to a run never
/// interrupted.
#[test]
fn a_run_crashed_in_a_save_resumes_bit_identically() {
    let f = Fixture::new();
    let whole = f.path("whole");
    ok(&f.train_args(&whole, &[]));
    let crashed = f.path("crashed");
    let out = lorafuse(&f.train_args(&crashed, &[]))
        .env("LORAFUSE_TEST_ABORT_IN_SAVE", "2@6")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the hook must abort the save of step 6"
    );
    assert_eq!(checkpoints(&crashed), ["checkpoint-3"]);
    assert!(!crashed.join("adapter").exists());
    let resumed = ok(&strs(&["train", "--resume", s(&crashed), "--quiet"]));
    assert!(resumed.contains("steps 3..6"), "{resumed}");
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        let a = std::fs::read(whole.join("adapter").join(file)).unwrap();
        let b = std::fs::read(crashed.join("adapter").join(file)).unwrap();
        assert!(
            a == b,
            "{file} differs between the whole and the resumed run"
        );
    }
    // metrics.jsonl: one line per step, the crashed run's lines past step 3 replaced.
    let (a, b) = (step_lines(&whole), step_lines(&crashed));
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["loss"], y["loss"]);
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL at an arbitrary moment of a run that saves every step: every checkpoint left
/// is complete, and `--resume` finishes the run from the newest.
#[test]
fn a_run_killed_with_sigkill_resumes_from_its_newest_complete_checkpoint() {
    let f = Fixture::new();
    let run_dir = f.path("run");
    let args = f.train_args(
        &run_dir,
        &["--steps", "400", "--save-every", "1", "--keep", "3"],
    );
    let mut child = lorafuse(&args).stdout(Stdio::null()).spawn().unwrap();
    wait_for("a few checkpoints", Duration::from_secs(120), || {
        step_lines(&run_dir).len() >= 5
    });
    std::thread::sleep(Duration::from_millis(37));
    let pid = child.id().to_string();
    let k = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    assert!(k.success());
    let status = child.wait().unwrap();
    assert!(!status.success());
    let left = checkpoints(&run_dir);
    assert!(!left.is_empty());
    for c in &left {
        assert!(
            run_dir.join(c).join("trainer_state.json").is_file(),
            "{c} incomplete"
        );
    }
    let newest: usize = left
        .iter()
        .map(|c| c["checkpoint-".len()..].parse::<usize>().unwrap())
        .max()
        .unwrap();
    let out = ok(&strs(&["train", "--resume", s(&run_dir), "--quiet"]));
    assert!(out.contains(&format!("steps {newest}..400")), "{out}");
    assert_eq!(step_lines(&run_dir).len(), 400);
    assert!(
        run_dir
            .join("adapter")
            .join("adapter_model.safetensors")
            .is_file()
    );
}

/// SIGINT saves a checkpoint of the step reached and exits 0.
#[test]
fn sigint_saves_a_checkpoint_and_exits_zero() {
    let f = Fixture::new();
    let run_dir = f.path("run");
    let args = f.train_args(&run_dir, &["--steps", "1000000", "--save-every", "0"]);
    let child = lorafuse(&args).stdout(Stdio::piped()).spawn().unwrap();
    wait_for("three steps", Duration::from_secs(120), || {
        step_lines(&run_dir).len() >= 3
    });
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}", out.status);
    assert!(stdout.contains("interrupted at step"), "{stdout}");
    let n = step_lines(&run_dir).len();
    assert_eq!(checkpoints(&run_dir), [format!("checkpoint-{n}")]);
}

/// `--resume` with options other than the run's is refused, naming them, unless `--force`.
#[test]
fn resuming_with_other_options_needs_force() {
    let f = Fixture::new();
    let run_dir = f.path("run");
    ok(&f.train_args(&run_dir, &["--steps", "3"]));
    let err = fails(
        &strs(&[
            "train",
            "--resume",
            s(&run_dir),
            "--lr",
            "0.001",
            "--batch",
            "4",
        ]),
        &["lr: 0.0002 → 0.001", "batch: 2 → 4", "--force"],
    );
    assert!(!err.contains("rank"), "{err}");
    let out = ok(&strs(&[
        "train",
        "--resume",
        s(&run_dir),
        "--steps",
        "5",
        "--force",
        "--quiet",
    ]));
    assert!(out.contains("steps 3..5"), "{out}");
    // A directory that is not a run.
    fails(
        &strs(&["train", "--resume", s(&f.model)]),
        &["not a lorafuse run directory"],
    );
    // A new run into a directory that holds one.
    fails(
        &f.train_args(&run_dir, &[]),
        &["already holds a run", "--resume"],
    );
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            v.push(p.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    v.sort();
    v
}

/// A full disk: the process may write files of at most `kib` KiB (`ulimit -f`, with
/// SIGXFSZ ignored so a write past it fails with EFBIG as a write to a full disk fails with
/// ENOSPC, on the same code path), which a test can set up without privileges.
fn run_on_a_full_disk(kib: usize, args: &[String]) -> Output {
    Command::new("bash")
        .args([
            "-c",
            &format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""),
        ])
        .arg(env!("CARGO_BIN_EXE_lorafuse"))
        .args(args)
        .env_remove("LORAFUSE_TEST_ABORT_IN_SAVE")
        .output()
        .unwrap()
}

/// A disk that fills up during a save: exit 1 with the file and the OS's reason, no
/// temporary file or half-written checkpoint left, and the run resumes once there is room.
#[test]
fn a_full_disk_is_a_clear_error_and_leaves_nothing_half_written() {
    let f = Fixture::new();
    let run_dir = f.path("run");
    // The adapters alone are 2 × (4·32 + 96·4) f32 = 4 KiB: the first checkpoint cannot fit.
    let out = run_on_a_full_disk(2, &f.train_args(&run_dir, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(s(&run_dir)) && err.contains("too large"),
        "{err}"
    );
    let left = files_under(&run_dir);
    assert!(
        left.iter().all(|n| !n.contains("tmp")
            && !n.starts_with("checkpoint-")
            && !n.starts_with("adapter")),
        "a failed save left {left:?}"
    );
    // With room again, the same command resumes (from nothing: no checkpoint was complete)
    // and finishes.
    ok(&strs(&["train", "--resume", s(&run_dir), "--quiet"]));
    assert_eq!(checkpoints(&run_dir), ["checkpoint-3", "checkpoint-6"]);

    // merge: the merged model does not fit; nothing is left in its output directory.
    let merged = f.path("merged");
    let out = run_on_a_full_disk(8, &merge_args(&f, &run_dir.join("adapter"), &merged));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(s(&merged)) && err.contains("too large"),
        "{err}"
    );
    assert!(!merged.exists(), "merge left {}", merged.display());
    let stray = files_under(f.dir.path());
    assert!(
        stray.iter().all(|n| !n.contains(".merged")),
        "merge left its temporary directory: {stray:?}"
    );
}

/// Every bad input of the issue's list: exit 1, the file or option named, nothing written.
#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let f = Fixture::new();
    let out = f.path("out");
    let train = |extra: &[&str], needles: &[&str]| {
        fails(&f.train_args(&out, extra), needles);
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    };
    // Settings.
    train(&["--rank", "0"], &["rank"]);
    train(&["--lr", "NaN"], &["--lr"]);
    train(&["--lr", "-1"], &["--lr"]);
    train(&["--lr", "0"], &["--lr"]);
    train(&["--batch", "0"], &["--batch"]);
    train(&["--grad-accum", "0"], &["--grad-accum"]);
    train(&["--steps", "0"], &["--steps"]);
    train(&["--epochs", "0"], &["--epochs"]);
    train(&["--seq-len", "0"], &["--seq-len"]);
    train(&["--dropout", "1"], &["--dropout"]);
    train(&["--val-fraction", "1.5"], &["--val-fraction"]);
    train(&["--keep", "0"], &["--keep"]);
    train(&["--weight-decay", "-0.1"], &["--weight-decay"]);
    train(&["--max-grad-norm", "inf"], &["--max-grad-norm"]);
    train(&["--alpha", "-2"], &["--alpha"]);
    train(&["--init", "zeros"], &["--init"]);
    train(&["--targets", "c_attn,bogus"], &["bogus"]);
    train(&["--dtype", "f64x"], &["f64x"]);
    train(&["--device", "tpu"], &["tpu"]);
    // Mismatches.
    train(&["--seq-len", "100"], &["--seq-len 100", "64"]);
    let small = f.path("small-vocab");
    std::fs::create_dir_all(&small).unwrap();
    fixtures::write_tiny_gpt2_dir(&small, 1, 280, TokenizerFiles::Json).unwrap();
    fixtures::write_tiny_tokenizer(&small, TINY_CORPUS, VOCAB).unwrap();
    train(&["--model", s(&small)], &["vocab"]);
    // Files: a missing or corrupt model, non-UTF-8 text, an empty dataset, one shorter
    // than a sequence.
    train(&["--model", s(&f.path("nowhere"))], &["nowhere"]);
    let corrupt = f.path("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(f.model.join(file), corrupt.join(file)).unwrap();
    }
    std::fs::write(corrupt.join("model.safetensors"), b"not a safetensors file").unwrap();
    train(&["--model", s(&corrupt)], &["model.safetensors"]);
    let latin1 = f.path("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait\n").unwrap();
    let empty = f.path("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let short = f.path("short.txt");
    std::fs::write(&short, b"The cat.").unwrap();
    let bad_json = f.path("bad.jsonl");
    std::fs::write(&bad_json, b"{\"text\": \"ok\"}\n{\"text\": 3}\n").unwrap();
    for (data, needle) in [
        (&latin1, "latin1.txt"),
        (&empty, "empty.txt"),
        (&short, "fewer than one sequence"),
        (&bad_json, "bad.jsonl"),
        (&f.path("missing.txt"), "missing.txt"),
        (&f.path("data.csv"), "csv"),
    ] {
        let mut a = f.train_args(&out, &[]);
        let i = a.iter().position(|x| x == "--data").unwrap();
        a.splice(i + 1..i + 3, [s(data).to_string()]);
        fails(&a, &[needle]);
        assert!(!out.exists(), "{needle}: wrote {}", out.display());
    }
    // An output directory that cannot be written (/proc refuses even root), one that is
    // not empty.
    fails(
        &f.train_args(Path::new("/proc/lorafuse-test/run"), &[]),
        &["/proc/lorafuse-test"],
    );
    let busy = f.path("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"mine").unwrap();
    fails(&f.train_args(&busy, &[]), &["not empty"]);
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);

    // An adapter: missing, corrupt, for another base.
    let run_dir = f.path("run");
    ok(&f.train_args(&run_dir, &["--steps", "1"]));
    let adapter = run_dir.join("adapter");
    let eval = |model: &Path, adapter: &Path, needles: &[&str]| {
        fails(
            &strs(&[
                "eval",
                "--model",
                s(model),
                "--adapter",
                s(adapter),
                "--data",
                s(&f.text),
                "--seq-len",
                "16",
                "--device",
                "cpu",
            ]),
            needles,
        );
    };
    eval(&f.model, &f.path("no-adapter"), &["adapter_config.json"]);
    let broken = f.path("broken-adapter");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        broken.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(
        broken.join("adapter_model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{}",
    )
    .unwrap();
    eval(&f.model, &broken, &["adapter_model.safetensors"]);
    let other = f.path("other-base");
    std::fs::create_dir_all(&other).unwrap();
    let mut cfg = fixtures::tiny_gpt2_config(VOCAB);
    cfg.n_embd = 48;
    cfg.n_head = 3;
    lorafuse::model::Gpt2::new_random(&cfg, lorafuse::DType::F32, &lorafuse::Device::Cpu, 0)
        .unwrap()
        .save(&other)
        .unwrap();
    std::fs::copy(f.model.join("tokenizer.json"), other.join("tokenizer.json")).unwrap();
    eval(
        &other,
        &adapter,
        &[
            "adapter_model.safetensors",
            "expected [4, 48], found [4, 32]",
        ],
    );
    fails(
        &strs(&["inspect", s(&broken)]),
        &["adapter_model.safetensors"],
    );

    // generate's and eval's numbers.
    let r#gen = |extra: &[&str], needle: &str| {
        let mut a = strs(&[
            "generate",
            "--model",
            s(&f.model),
            "--prompt",
            "The",
            "--device",
            "cpu",
        ]);
        a.extend(strs(extra));
        fails(&a, &[needle]);
    };
    r#gen(&["--temperature", "-1"], "temperature");
    r#gen(&["--top-p", "0"], "top_p");
    r#gen(&["--max-new-tokens", "100"], "context");
    fails(
        &strs(&[
            "eval",
            "--model",
            s(&f.model),
            "--data",
            s(&f.text),
            "--batch",
            "0",
        ]),
        &["--batch"],
    );
}

/// `lorafuse study` on a checkpoint and its text (a tiny configuration), and its bad input:
/// exit 1 naming the option, nothing written (no report, no temporary directory).
#[test]
fn study_on_a_checkpoint_writes_a_report_and_bad_input_writes_nothing() {
    let f = Fixture::new();
    let out = f.path("study");
    let args = |extra: &[&str]| {
        let mut v = strs(&[
            "study",
            "--model",
            s(&f.model),
            "--data",
            s(&f.text),
            "--out",
            s(&out),
            "--device",
            "cpu",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--steps",
            "1",
            "--seeds",
            "2",
            "--ranks",
            "1,8",
            "--top-k",
            "2",
            "--val-fraction",
            "0.2",
            "--no-sim",
        ]);
        // An option given again replaces the one above (clap takes each once).
        for pair in extra.chunks(2) {
            match v.iter().position(|x| *x == pair[0]) {
                Some(i) if pair.len() == 2 => v[i + 1] = pair[1].to_string(),
                _ => v.extend(strs(pair)),
            }
        }
        v
    };
    let leftovers = || {
        std::fs::read_dir(f.dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp-")
            })
            .count()
    };
    for (extra, needle) in [
        (&["--seeds", "1"][..], "--seeds"),
        (&["--steps", "0"], "--steps"),
        (&["--epsilon", "2"], "--epsilon"),
        (&["--lr", "NaN"], "--lr"),
        (&["--ranks", "0"], "--ranks"),
        (&["--ranks", "1,x"], "--ranks"),
        (&["--ranks", "64"], "--ranks"),
        (&["--layer", "5"], "--layer"),
        (&["--val-fraction", "0"], "--val-fraction"),
    ] {
        fails(&args(extra), &[needle]);
        assert!(
            !out.exists() && leftovers() == 0,
            "{extra:?} wrote something"
        );
    }
    // --model without --data: clap's usage error (exit 2, as for every missing argument).
    let missing = run(&strs(&["study", "--model", s(&f.model), "--out", s(&out)]));
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--data"));
    assert!(!out.exists());
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("mine.txt"), b"keep").unwrap();
    fails(&args(&[]), &["--out", "not an empty directory"]);
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["mine.txt"]);
    std::fs::remove_dir_all(&out).unwrap();
    let stdout = ok(&args(&[]));
    assert!(
        stdout.contains("Table 7") && stdout.contains("perplexity"),
        "{stdout}"
    );
    for file in [
        "report.md",
        "report.json",
        "table6_rank.csv",
        "fig3_wq.png",
        "adapters/wq-r8-s0/adapter_model.safetensors",
        "full-ft/s1/model.safetensors",
        "base/config.json",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    assert_eq!(leftovers(), 0);
}
