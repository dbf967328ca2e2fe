//! Build script: compiles `kernels/*.cu` for every backend and embeds the results.
//!
//! 1. **nvcc** (found through `NVCC`, `CUDA_HOME`, `CUDA_PATH`, then `PATH`): each
//!    `kernels/<m>.cu` → PTX for `compute_80` and cubins for `sm_80`, `sm_90` (and
//!    `sm_90a` when the source uses Hopper-only instructions), keeping ptxas's `-v`
//!    resource report. Without nvcc the sources are embedded for NVRTC only and a cargo
//!    warning says so; `LORAFUSE_REQUIRE_NVCC=1` turns that, or a failing compile, into a
//!    build error.
//! 2. **NVRTC**: every module's source with `common.cuh` pasted in, always embedded.
//! 3. **The simulator** (DESIGN §7): the same sources compiled by the host C++ compiler
//!    against `kernels/sim/lf_sim.h` into a static library linked into the crate, plus two
//!    sanitizer builds (AddressSanitizer, ThreadSanitizer) of a small driver that the
//!    planted-bug tests run as child processes.
//!
//! Everything lands in `$OUT_DIR/kernels.rs`, included by `src/device/kernels.rs`.
//!
//! The outputs depend on the inputs only (`inputs_key`), not on the profile, so a run
//! whose inputs another profile's run already built (`cargo clippy`/`cargo doc` in `dev`,
//! then `cargo test`) copies that run's `OUT_DIR` and repeats its `cargo:` lines instead
//! of compiling everything again: CI pays for nvcc and the simulator once.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// nvcc targets: (name, nvcc arguments). PTX for compute_80 lets any sm_80+ device JIT.
const CUBIN_TARGETS: [(&str, &str); 2] = [("sm_80", "-arch=sm_80"), ("sm_90", "-arch=sm_90")];
const HOPPER_TARGET: (&str, &str) = ("sm_90a", "-gencode=arch=compute_90a,code=sm_90a");
/// Instructions that exist only on sm_90a; a source using any of them also gets an sm_90a cubin.
const HOPPER_ONLY: [&str; 3] = ["wgmma", "setmaxnreg", "LF_NEEDS_SM90A"];

/// Whether a kernel source uses Hopper-only instructions: one of [`HOPPER_ONLY`] outside
/// `//` comments (a header that merely names wgmma needs no sm_90a cubin).
fn uses_hopper_instructions(source: &str) -> bool {
    source
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .any(|code| HOPPER_ONLY.iter().any(|w| code.contains(w)))
}

/// One `kernels/<name>.cu`.
struct Module {
    name: String,
    path: PathBuf,
    source: String,
    kernels: Vec<String>,
}

/// What nvcc built for one module.
#[derive(Default)]
struct NvccOutput {
    ptx: Option<PathBuf>,
    cubins: Vec<(String, PathBuf)>,
    report: String,
}

fn main() {
    let root = PathBuf::from(env("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels_dir = root.join("kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in RERUN_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // Another profile (clippy's and doc's `dev` beside `test`) may have built exactly this
    // already: reuse its outputs rather than compile everything again.
    let key = inputs_key(&root, &kernels_dir);
    if reuse_previous_run(&out, key) {
        return;
    }
    build(&root, &out, &kernels_dir);
    record_run(&out, key);
}

/// Our variables (nvcc's search and flags): a change reruns the build script.
const RERUN_VARS: [&str; 6] = [
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "LORAFUSE_REQUIRE_NVCC",
    "LORAFUSE_NVCC_FLAGS",
];

/// With [`RERUN_VARS`], the variables whose values can change what `build` writes (what
/// the `cc` crate reads for the simulator, and cargo's). Not `OPT_LEVEL`: the simulator's
/// optimisation level is set explicitly and nvcc ignores it, so `dev` and `test` builds
/// (opt-level 0 and 2) produce identical outputs and share them.
const KEY_VARS: [&str; 11] = [
    "CC",
    "CXX",
    "CFLAGS",
    "CXXFLAGS",
    "AR",
    "ARFLAGS",
    "CRATE_CC_NO_DEFAULTS",
    "TARGET",
    "HOST",
    "DEBUG",
    "PROFILE",
];

/// A hash of everything `build` reads: build.rs, Cargo.lock (the `cc` version), every
/// file under `kernels/`, [`RERUN_VARS`], [`KEY_VARS`] and nvcc's version.
fn inputs_key(root: &Path, kernels_dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for f in ["build.rs", "Cargo.lock"] {
        std::fs::read(root.join(f)).ok().hash(&mut h);
    }
    let mut files = Vec::new();
    let mut dirs = vec![kernels_dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in &files {
        f.strip_prefix(kernels_dir).ok().hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    for var in RERUN_VARS.iter().chain(&KEY_VARS) {
        (var, std::env::var_os(var)).hash(&mut h);
    }
    find_nvcc().and_then(|n| nvcc_version(&n)).hash(&mut h);
    h.finish()
}

/// `target/<profile dir>/build/lorafuse-out-<key>`: the `OUT_DIR` of the last complete run
/// with these inputs (profiles that share the folder share the file).
fn run_index(out: &Path, key: u64) -> Option<PathBuf> {
    Some(
        out.parent()?
            .parent()?
            .join(format!("lorafuse-out-{key:016x}")),
    )
}

/// The file in `OUT_DIR` saying that a run with these inputs finished.
const COMPLETE: &str = ".lorafuse-complete";

fn record_run(out: &Path, key: u64) {
    write(&out.join(COMPLETE), &format!("{key:016x}"));
    if let Some(index) = run_index(out, key) {
        let _ = std::fs::write(index, out.display().to_string());
    }
}

/// Copies a complete earlier run's `OUT_DIR` (same inputs, another profile) here and
/// repeats what it told cargo (its `output` file, which cargo wrote when it finished),
/// with its folder's path replaced by this one's. False when there is none to reuse.
fn reuse_previous_run(out: &Path, key: u64) -> bool {
    let Some(index) = run_index(out, key) else {
        return false;
    };
    let Ok(prev) = std::fs::read_to_string(&index) else {
        return false;
    };
    let prev = PathBuf::from(prev);
    let complete = std::fs::read_to_string(prev.join(COMPLETE)).ok();
    let told = prev.parent().map(|p| p.join("output"));
    let (Some(told), true) = (
        told,
        complete.as_deref() == Some(&format!("{key:016x}")[..]),
    ) else {
        return false;
    };
    let (Ok(lines), true) = (std::fs::read_to_string(told), prev != out) else {
        return false;
    };
    let (from, to) = (prev.display().to_string(), out.display().to_string());
    if copy_tree(&prev, out).is_err() {
        return false;
    }
    let table = out.join("kernels.rs");
    match std::fs::read_to_string(&table) {
        Ok(t) => write(&table, &t.replace(&from, &to)),
        Err(_) => return false,
    }
    for line in lines.lines().filter(|l| l.starts_with("cargo:")) {
        println!("{}", line.replace(&from, &to));
    }
    true
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// nvcc, NVRTC sources and the simulator into `out`, and the table `out/kernels.rs`.
fn build(root: &Path, out: &Path, kernels_dir: &Path) {
    let require_nvcc = env("LORAFUSE_REQUIRE_NVCC").as_deref() == Some("1");

    let common = read(&kernels_dir.join("common.cuh"));
    let modules = discover(kernels_dir);

    // nvcc: PTX + cubins per module, compiled in parallel (nvcc is single-threaded).
    let nvcc = find_nvcc();
    let mut nvcc_out: Vec<NvccOutput> = modules.iter().map(|_| NvccOutput::default()).collect();
    let mut include_dir = None;
    match &nvcc {
        None => {
            let msg = "nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, PATH): kernels are embedded \
                       as source and compiled by NVRTC at run time";
            if require_nvcc {
                panic!("LORAFUSE_REQUIRE_NVCC=1: {msg}");
            }
            println!("cargo:warning={msg}");
        }
        Some(nvcc) => {
            include_dir = nvcc
                .parent()
                .and_then(Path::parent)
                .map(|p| p.join("include"))
                .filter(|p| p.join("cuda_bf16.h").exists());
            let results: Vec<Result<NvccOutput, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = modules
                    .iter()
                    .map(|m| s.spawn(|| compile_nvcc(nvcc, m, kernels_dir, out)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("nvcc worker thread"))
                    .collect()
            });
            for (slot, (m, r)) in nvcc_out.iter_mut().zip(modules.iter().zip(results)) {
                match r {
                    Ok(o) => *slot = o,
                    Err(e) if require_nvcc => panic!("nvcc failed on {}:\n{e}", m.path.display()),
                    Err(e) => println!(
                        "cargo:warning=nvcc failed on {} (falling back to NVRTC): {}",
                        m.path.display(),
                        e.lines().next().unwrap_or("")
                    ),
                }
            }
        }
    }

    // NVRTC: one self-contained source per module.
    for m in &modules {
        let src = paste_common(&m.source, &common, &m.path);
        write(&out.join(format!("{}.nvrtc.cu", m.name)), &src);
    }

    build_simulator(root, out, &modules);

    // The generated table.
    let mut rs = String::new();
    writeln!(
        rs,
        "/// The kernel modules built from `kernels/*.cu`, in file-name order."
    )
    .unwrap();
    writeln!(rs, "pub static MODULES: &[KernelModule] = &[").unwrap();
    for (m, o) in modules.iter().zip(&nvcc_out) {
        writeln!(rs, "    KernelModule {{").unwrap();
        writeln!(rs, "        name: {:?},", m.name).unwrap();
        writeln!(rs, "        kernels: &{:?},", m.kernels).unwrap();
        match &o.ptx {
            Some(p) => writeln!(rs, "        ptx: Some(include_str!({:?})),", p).unwrap(),
            None => writeln!(rs, "        ptx: None,").unwrap(),
        }
        write!(rs, "        cubins: &[").unwrap();
        for (target, p) in &o.cubins {
            write!(rs, "({target:?}, include_bytes!({p:?})), ").unwrap();
        }
        writeln!(rs, "],").unwrap();
        let nvrtc = out.join(format!("{}.nvrtc.cu", m.name));
        writeln!(rs, "        nvrtc_source: include_str!({nvrtc:?}),").unwrap();
        writeln!(rs, "        ptxas_report: {:?},", o.report).unwrap();
        writeln!(rs, "    }},").unwrap();
    }
    writeln!(rs, "];").unwrap();
    let version = nvcc.as_ref().and_then(|n| nvcc_version(n));
    writeln!(
        rs,
        "/// `nvcc --version`'s release line, if nvcc built the kernels."
    )
    .unwrap();
    writeln!(rs, "pub const NVCC_VERSION: Option<&str> = {version:?};").unwrap();
    writeln!(
        rs,
        "/// The CUDA include folder beside the nvcc that built the kernels (for NVRTC)."
    )
    .unwrap();
    let inc = include_dir.map(|p| p.display().to_string());
    writeln!(rs, "pub const CUDA_INCLUDE_DIR: Option<&str> = {inc:?};").unwrap();
    write(&out.join("kernels.rs"), &rs);
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn write(p: &Path, s: &str) {
    std::fs::write(p, s).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()))
}

/// Every `kernels/*.cu` (not subfolders), sorted, with the kernel symbols it defines.
fn discover(dir: &Path) -> Vec<Module> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let source = read(&path);
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let kernels = kernel_symbols(&source);
            Module {
                name,
                path,
                source,
                kernels,
            }
        })
        .collect()
}

/// The names of the `extern "C" __global__ void [__launch_bounds__(..)] NAME(` definitions.
fn kernel_symbols(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("extern \"C\" __global__") {
        rest = &rest[i + "extern \"C\" __global__".len()..];
        let mut head = rest
            .trim_start()
            .strip_prefix("void")
            .unwrap_or(rest)
            .trim_start();
        if let Some(after) = head.strip_prefix("__launch_bounds__") {
            let close = after.find(')').expect("__launch_bounds__(...) closes");
            head = after[close + 1..].trim_start();
        }
        let end = head
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(head.len());
        if end > 0 && head[end..].trim_start().starts_with('(') {
            names.push(head[..end].to_string());
        }
    }
    names
}

/// The module source with `#include "common.cuh"` replaced by the header itself, so NVRTC
/// needs only the CUDA include folder.
fn paste_common(src: &str, common: &str, path: &Path) -> String {
    let directive = "#include \"common.cuh\"";
    assert!(
        src.contains(directive),
        "{} must `#include \"common.cuh\"`",
        path.display()
    );
    let body = common.replace("#pragma once", "");
    src.replacen(directive, &body, 1)
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = |dir: PathBuf| dir.join("nvcc");
    if let Some(p) = env("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env(var) {
            let p = exe(PathBuf::from(home).join("bin"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(exe)
        .find(|p| p.is_file())
}

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("release"))
        .map(|l| l.trim().to_string())
}

/// Runs nvcc, returning its stderr (ptxas's report goes there) or the error text.
fn run_nvcc(nvcc: &Path, args: &[&str], kernels_dir: &Path) -> Result<String, String> {
    let extra = env("LORAFUSE_NVCC_FLAGS").unwrap_or_default();
    let out = Command::new(nvcc)
        .args(["-std=c++17", "-O3", "-lineinfo", "-I"])
        .arg(kernels_dir)
        .args(extra.split_whitespace())
        .args(args)
        .output()
        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stderr)
    } else {
        Err(format!("{} {}\n{stderr}", nvcc.display(), args.join(" ")))
    }
}

fn compile_nvcc(
    nvcc: &Path,
    m: &Module,
    kernels_dir: &Path,
    out: &Path,
) -> Result<NvccOutput, String> {
    let src = m.path.to_str().ok_or("non-UTF-8 path")?;
    let ptx = out.join(format!("{}.compute_80.ptx", m.name));
    run_nvcc(
        nvcc,
        &["-ptx", "-arch=compute_80", src, "-o", ptx.to_str().unwrap()],
        kernels_dir,
    )?;
    let mut targets: Vec<(&str, &str)> = CUBIN_TARGETS.to_vec();
    if uses_hopper_instructions(&m.source) {
        targets.push(HOPPER_TARGET);
    } else {
        // A reused OUT_DIR may hold this module's sm_90a cubin from an earlier source; what
        // is left there is what the GPU runner's bundle copies.
        let _ = std::fs::remove_file(out.join(format!("{}.{}.cubin", m.name, HOPPER_TARGET.0)));
    }
    let mut o = NvccOutput {
        ptx: Some(ptx),
        ..Default::default()
    };
    for (target, arch) in targets {
        let cubin = out.join(format!("{}.{target}.cubin", m.name));
        let report = run_nvcc(
            nvcc,
            &[
                "-cubin",
                arch,
                "-Xptxas",
                "-v",
                src,
                "-o",
                cubin.to_str().unwrap(),
            ],
            kernels_dir,
        )?;
        o.report.push_str(&report);
        o.cubins.push((target.to_string(), cubin));
    }
    Ok(o)
}

/// g++ ignores the `section` attribute on the static locals of function templates
/// (`__shared__` arrays of templated kernels) and puts them in `.bss`; with
/// `-fdata-sections` each gets a section `.bss._ZZ<function>E<name>`. Renaming those into
/// `lf_sim_shared` puts them between the linker's `__start_`/`__stop_lf_sim_shared`, where
/// the runtime poisons static shared memory before every block (kernels/sim/README.md).
/// Kernel code has no function-local statics other than `__shared__` ones
/// (`device::tidy` checks the sources), so every such section is shared memory. The
/// simulator's own templates (namespace `lf_sim`, `std`) are left alone.
fn move_template_shared_into_section(obj: &Path) {
    let objcopy = std::env::var_os("OBJCOPY").unwrap_or_else(|| "objcopy".into());
    let sections = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(obj)
        .output()
        .unwrap_or_else(|e| panic!("running readelf on {}: {e}", obj.display()));
    assert!(sections.status.success(), "readelf -S {}", obj.display());
    let text = String::from_utf8_lossy(&sections.stdout);
    let renames: Vec<String> = text
        .split_whitespace()
        .filter(|w| {
            w.starts_with(".bss._ZZ")
                && !w.starts_with(".bss._ZZN6lf_sim")
                && !w.starts_with(".bss._ZZNSt")
                && !w.starts_with(".bss._ZZSt")
        })
        .map(|w| format!("{w}=lf_sim_shared"))
        .collect();
    if renames.is_empty() {
        return;
    }
    let mut cmd = Command::new(&objcopy);
    for r in &renames {
        cmd.arg("--rename-section").arg(r);
    }
    let status = cmd.arg(obj).status().unwrap_or_else(|e| {
        panic!(
            "running {} on {}: {e}",
            objcopy.to_string_lossy(),
            obj.display()
        )
    });
    assert!(
        status.success(),
        "objcopy --rename-section on {}",
        obj.display()
    );
}

/// The simulator: `liblorafuse_sim.a` (linked into the crate) and the sanitizer victims.
fn build_simulator(root: &Path, out: &Path, modules: &[Module]) {
    let kernels_dir = root.join("kernels");
    let sim_dir = kernels_dir.join("sim");
    let generated = out.join("sim");
    std::fs::create_dir_all(&generated).expect("creating $OUT_DIR/sim");

    // One translation unit per module (the .cu plus its registry entries), one table.
    let mut units = Vec::new();
    let mut all_kernels = Vec::new();
    let planted = sim_dir.join("planted_bugs.cu");
    let planted_module = Module {
        name: "planted_bugs".into(),
        kernels: kernel_symbols(&read(&planted)),
        source: String::new(),
        path: planted,
    };
    for m in modules.iter().chain(std::iter::once(&planted_module)) {
        let mut tu = format!("#include {:?}\n", m.path.display().to_string());
        for k in &m.kernels {
            writeln!(tu, "LF_SIM_ENTRY({k})").unwrap();
            all_kernels.push(k.clone());
        }
        let p = generated.join(format!("{}.sim.cpp", m.name));
        write(&p, &tu);
        units.push(p);
    }
    let mut reg = String::from("#include \"lf_sim.h\"\n#include <string_view>\n");
    for k in &all_kernels {
        writeln!(
            reg,
            "extern \"C\" const lf_sim::KernelEntry lf_sim_entry_{k};"
        )
        .unwrap();
    }
    reg.push_str("static const lf_sim::KernelEntry* const lf_sim_table[] = {\n");
    for k in &all_kernels {
        writeln!(reg, "    &lf_sim_entry_{k},").unwrap();
    }
    reg.push_str(concat!(
        "    nullptr,\n};\n",
        "extern \"C\" const lf_sim::KernelEntry* const* lf_sim_kernel_table() { return lf_sim_table; }\n",
        "// The size of a kernel's parameter struct, or 0 for an unknown kernel (for the size tests).\n",
        "extern \"C\" size_t lf_sim_param_bytes(const char* name) {\n",
        "    for (auto e = lf_sim_table; *e; ++e)\n",
        "        if (std::string_view((*e)->name) == name) return (*e)->param_bytes;\n",
        "    return 0;\n",
        "}\n",
    ));
    let registry = generated.join("registry.cpp");
    write(&registry, &reg);
    units.push(registry.clone());
    units.push(sim_dir.join("runtime.cpp"));

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .define("LORAFUSE_SIM", None)
        .include(&kernels_dir)
        .include(&sim_dir)
        .flag("-pthread")
        .opt_level(2)
        .warnings(true)
        .extra_warnings(false)
        // Every static in a section of its own, so the function templates' static
        // __shared__ arrays can be moved into lf_sim_shared (below).
        .flag("-fdata-sections")
        // Parameter structs with 64-byte-aligned members (TMA tensor maps) draw GCC's note
        // that their by-value ABI changed in GCC 4.6: nothing here links against objects
        // that old.
        .flag("-Wno-psabi")
        .files(&units);
    let objects = build.compile_intermediates();
    // The kernel modules' objects only: the runtime's and the registry's statics are not
    // shared memory.
    for (unit, obj) in units.iter().zip(&objects) {
        if unit.starts_with(&generated) && unit != &registry {
            move_template_shared_into_section(obj);
        }
    }
    let library = build.create_archive("lorafuse_sim", &objects);
    cc::emit_link_directives(&build, &library);

    // Sanitizer builds of the victim driver, for the planted-bug tests. A failure here is
    // reported to those tests (they fail with it) rather than failing the whole build.
    let compiler = build.get_compiler();
    let victim_main = sim_dir.join("victim_main.cpp");
    // The two builds are independent: run them side by side.
    let build_victim = |name: &str, flag: &str| -> String {
        let exe = generated.join(format!("victim_{name}"));
        let status = Command::new(compiler.path())
            .args([
                "-std=c++20",
                "-DLORAFUSE_SIM",
                "-g",
                "-O1",
                "-pthread",
                "-fno-omit-frame-pointer",
                flag,
            ])
            .arg("-I")
            .arg(&kernels_dir)
            .arg("-I")
            .arg(&sim_dir)
            .args(&units)
            .arg(&victim_main)
            .arg("-o")
            .arg(&exe)
            .output();
        match status {
            Ok(o) if o.status.success() => exe.display().to_string(),
            Ok(o) => format!(
                "error: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
            Err(e) => format!("error: running {}: {e}", compiler.path().display()),
        }
    };
    let (asan, tsan) = std::thread::scope(|s| {
        let asan = s.spawn(|| build_victim("asan", "-fsanitize=address"));
        let tsan = build_victim("tsan", "-fsanitize=thread");
        (asan.join().expect("ASan build thread"), tsan)
    });
    println!("cargo:rustc-env=LORAFUSE_SIM_VICTIM_ASAN={asan}");
    println!("cargo:rustc-env=LORAFUSE_SIM_VICTIM_TSAN={tsan}");
}
