//! Checks the invariants that ARCHITECTURE.md states, by reading the source tree.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Lines of code, with `//` comments stripped (doc comments may mention anything).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
}

#[test]
fn unsafe_lives_only_in_the_device_layer_with_a_safety_comment() {
    let device = src().join("device");
    for f in rust_files(&src()) {
        let text = fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (n, code) in code_lines(&text) {
            if !code.contains("unsafe ") && !code.contains("unsafe{") {
                continue;
            }
            assert!(
                f.starts_with(&device),
                "{}:{n}: `unsafe` outside src/device/",
                f.display()
            );
            let before = &lines[n.saturating_sub(12)..n - 1];
            assert!(
                before
                    .iter()
                    .any(|l| l.trim_start().starts_with("// SAFETY:")),
                "{}:{n}: unsafe block without a `// SAFETY:` comment above it",
                f.display()
            );
        }
    }
}

#[test]
fn the_model_trainer_cli_and_adapters_never_touch_storage_or_device_code() {
    let mut files = rust_files(&src().join("model"));
    for layer in ["train", "cli", "text", "study"] {
        files.extend(rust_files(&src().join(layer)));
    }
    files.retain(|f| !f.ends_with("tests.rs"));
    files.push(src().join("lora.rs"));
    files.push(src().join("demo.rs"));
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        let body = text.split("#[cfg(test)]").next().unwrap();
        for (n, code) in code_lines(body) {
            for banned in ["storage", "cpu_read", "device::cpu", "CpuStorage", "gemm"] {
                assert!(
                    !code.contains(banned),
                    "{}:{n}: uses `{banned}`; go through ops instead",
                    f.display()
                );
            }
        }
    }
}

#[test]
fn every_op_has_a_cpu_twin_and_every_differentiable_op_a_finite_difference_check() {
    let ops = src().join("ops");
    let mut n_ops = 0;
    for e in fs::read_dir(&ops).unwrap() {
        let dir = e.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        n_ops += 1;
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            dir.join("mod.rs").exists() && dir.join("cpu.rs").exists(),
            "ops/{name} needs mod.rs and cpu.rs"
        );
        let all: String = rust_files(&dir)
            .iter()
            .map(|f| fs::read_to_string(f).unwrap())
            .collect();
        let has_backward = all.contains("tape.push(");
        if has_backward {
            assert!(
                all.contains("check_grads("),
                "ops/{name} records a backward but has no finite-difference check"
            );
        }
    }
    assert!(n_ops >= 9, "found only {n_ops} op folders");
}

#[test]
fn every_kernel_file_has_an_op_or_optimizer_folder_with_a_launcher_a_cpu_twin_and_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The list of launched kernels lives one floor above the device layer (ops::LAUNCHERS).
    let launched = fs::read_to_string(src().join("ops/mod.rs")).unwrap();
    let mut n = 0;
    for e in fs::read_dir(root.join("kernels")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "cu") {
            continue;
        }
        let stem = p.file_stem().unwrap().to_string_lossy().to_string();
        // An op's kernels live in ops/<op>/, the optimizer's (adamw) in optim/<op>/. A second
        // kernel file of an op, kernels/<op>_<variant>.cu (e.g. lora_matmul_wgmma.cu, the
        // Hopper GEMM), belongs to the same folder, launched by <area>/<op>/<variant>.rs.
        let split = |at: usize| (stem[..at].to_string(), Some(stem[at + 1..].to_string()));
        let candidates = std::iter::once((stem.clone(), None))
            .chain(stem.match_indices('_').map(|(at, _)| split(at)));
        let (area, op, variant, dir) = candidates
            .flat_map(|(op, variant)| {
                ["ops", "optim"]
                    .into_iter()
                    .map(move |area| (area, op.clone(), variant.clone()))
            })
            .map(|(area, op, variant)| {
                let dir = src().join(area).join(&op);
                (area, op, variant, dir)
            })
            .find(|(_, _, variant, d)| {
                d.is_dir()
                    && variant
                        .as_ref()
                        .is_none_or(|v| d.join(format!("{v}.rs")).exists())
            })
            .unwrap_or_else(|| {
                panic!(
                    "kernels/{stem}.cu: no ops/ or optim/ folder of its op (nor its <variant>.rs)"
                )
            });
        for f in ["mod.rs", "cpu.rs", "cuda.rs"] {
            assert!(
                dir.join(f).exists(),
                "kernels/{op}.cu: {area}/{op}/{f} is missing"
            );
        }
        let launcher = variant.as_deref().unwrap_or("cuda");
        let cuda = fs::read_to_string(dir.join(format!("{launcher}.rs"))).unwrap();
        assert!(
            cuda.contains("pub(crate) const KERNELS: &[&str]"),
            "{area}/{op}/{launcher}.rs must list its kernels in `KERNELS`"
        );
        let listed = match area {
            "ops" => format!("kernels: {op}::{launcher}::KERNELS"),
            _ => format!("kernels: crate::{area}::{op}::{launcher}::KERNELS"),
        };
        assert!(
            launched.contains(&listed),
            "ops::LAUNCHERS (src/ops/mod.rs) must include {area}::{op}::{launcher}::KERNELS"
        );
        let tests: String = rust_files(&dir)
            .iter()
            .map(|f| fs::read_to_string(f).unwrap())
            .collect();
        assert!(
            tests.contains("test_device!("),
            "{area}/{op} must test its kernels on every backend (test_device!)"
        );
        n += 1;
    }
    assert!(n >= 1, "no kernels/*.cu found");
}
