//! The tidy test: the kernels the Rust side names exist in every compiled form, every
//! `kernels/*.cu` opens with its header comment, and — when nvcc built them — no kernel
//! spills registers (ptxas's report, printed as a table).

use super::kernels::{MODULES, NVCC_VERSION};
use super::sim;
use crate::ops::launched_kernels as launched;

const DTYPE_SUFFIXES: [&str; 3] = ["f32", "bf16", "f16"];

#[test]
fn every_launched_kernel_exists_in_every_compiled_form() {
    let sim_names = sim::kernel_names();
    let mut count = 0;
    for k in launched() {
        let m = super::kernels::module_of(k)
            .unwrap_or_else(|| panic!("{k}: launched by an op but defined by no kernels/*.cu"));
        assert!(
            sim_names.iter().any(|s| s == k),
            "{k}: missing from the simulator's registry"
        );
        assert!(
            sim::param_bytes(k).is_some(),
            "{k}: no parameter size in the simulator"
        );
        assert!(
            m.nvrtc_source.contains(&format!(" {k}(")),
            "{k}: missing from {}'s NVRTC source",
            m.name
        );
        if let Some(ptx) = m.ptx {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "{k}: missing from {}'s PTX",
                m.name
            );
        }
        for (target, cubin) in m.cubins {
            let found = cubin
                .windows(k.len() + 1)
                .any(|w| &w[..k.len()] == k.as_bytes() && w[k.len()] == 0);
            assert!(found, "{k}: missing from {}'s {target} cubin", m.name);
        }
        count += 1;
    }
    // No dead kernels: everything compiled is launched by some op.
    for m in MODULES {
        for k in m.kernels {
            assert!(
                launched().any(|l| l == *k),
                "{k} ({}.cu) is launched by no op",
                m.name
            );
        }
    }
    println!("{count} kernels checked in {} modules", MODULES.len());
}

/// The `__launch_bounds__` a kernel's definition in `source` declares, with a named
/// constant (`kTcThreads`) resolved from its `NAME = <int>` definition in `source`.
fn launch_bounds(source: &str, kernel: &str) -> Option<u32> {
    let decl = source
        .match_indices(&format!(" {kernel}("))
        .map(|(at, _)| &source[source[..at].rfind([';', '}']).map_or(0, |i| i + 1)..at])
        .find(|decl| decl.contains("__global__"))?;
    let arg = decl
        .split("__launch_bounds__(")
        .nth(1)?
        .split(')')
        .next()?
        .trim();
    let arg = arg.split(',').next()?.trim();
    arg.parse().ok().or_else(|| {
        let def = source.split(&format!("{arg} = ")).nth(1)?;
        def.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// The most threads per block a kernel using `registers` per thread can launch with on
/// sm_80/sm_90 (64 Ki registers per block, allocated per warp in units of 256).
fn register_limited_threads(registers: u32) -> u32 {
    let per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    (65536 / per_warp * 32).min(1024)
}

/// The block each launcher gives its kernels fits them: a whole number of warps, within
/// the kernel's `__launch_bounds__` and (when nvcc built it) within what its registers
/// allow on every target, which is what `CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK` will say
/// on the GPU (checked there by `every_load_path_loads_every_module_on_the_gpu`).
#[test]
fn every_launch_fits_its_kernels_launch_bounds() {
    let mut bounded = 0;
    for k in launched() {
        let threads = crate::ops::block_threads(k).unwrap_or(0);
        assert!(
            (32..=1024).contains(&threads) && threads.is_multiple_of(32),
            "{k}: its launcher's block of {threads} threads is not 1..=32 whole warps"
        );
        let m = super::kernels::module_of(k).unwrap_or_else(|| panic!("{k}: no module"));
        if let Some(bound) = launch_bounds(m.nvrtc_source, k) {
            assert!(
                threads <= bound,
                "{k}: launched with {threads} threads but declares __launch_bounds__({bound})"
            );
            bounded += 1;
        }
        for r in parse_ptxas(m.ptxas_report).iter().filter(|r| r.kernel == k) {
            assert!(
                threads <= register_limited_threads(r.registers),
                "{k} on {}: {} registers allow {} threads, its launcher uses {threads}",
                r.target,
                r.registers,
                register_limited_threads(r.registers)
            );
        }
    }
    println!("{bounded} kernels declare __launch_bounds__; every launch fits");
}

#[test]
fn launch_bounds_and_register_limits_parse() {
    let src = "constexpr int kTc = 128;\nextern \"C\" __global__ void __launch_bounds__(256) a_fwd_f32(P p) { f(p); }\n\
extern \"C\" __global__ void __launch_bounds__(kTc)\n    b_fwd_f32(P p) { g(p); }\n\
extern \"C\" __global__ void c_fwd_f32(P p) { h(p); }\n";
    assert_eq!(launch_bounds(src, "a_fwd_f32"), Some(256));
    assert_eq!(launch_bounds(src, "b_fwd_f32"), Some(128));
    assert_eq!(launch_bounds(src, "c_fwd_f32"), None);
    assert_eq!(register_limited_threads(32), 1024);
    assert_eq!(register_limited_threads(64), 1024);
    assert_eq!(register_limited_threads(128), 512);
    assert_eq!(register_limited_threads(255), 256);
    assert_eq!(register_limited_threads(168), 384);
}

#[test]
fn kernel_names_follow_the_convention() {
    for m in MODULES {
        for k in m.kernels {
            let parts: Vec<&str> = k.split('_').collect();
            let pos = parts.iter().position(|p| *p == "fwd" || *p == "bwd");
            let ok = pos.is_some_and(|i| {
                i > 0
                    && i + 1 < parts.len()
                    && parts[i + 1..].iter().all(|d| DTYPE_SUFFIXES.contains(d))
            });
            assert!(ok, "{k}: not <op>_<fwd|bwd>_<dtype>");
        }
    }
}

/// The function-local `static`s of a kernel source that are not `__shared__` (nor
/// `constexpr`): build.rs moves every function-local static of a kernel object into the
/// simulator's poisoned shared-memory section, which is right only if there are none.
fn non_shared_local_statics(source: &str) -> Vec<String> {
    source
        .lines()
        .filter(|l| l.starts_with(char::is_whitespace))
        .map(str::trim)
        .filter(|l| {
            l.starts_with("static ")
                && !l.starts_with("static constexpr")
                && !l.starts_with("static_assert")
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn kernels_have_no_function_local_statics_but_shared_ones() {
    let planted = "__device__ void f() {\n    static int calls;\n    __shared__ float t[4];\n}\n";
    assert_eq!(non_shared_local_statics(planted), ["static int calls;"]);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files = 0;
    for p in std::iter::once(dir.join("sim").join("planted_bugs.cu"))
        .chain(std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
    {
        let found = non_shared_local_statics(&std::fs::read_to_string(&p).unwrap());
        assert!(found.is_empty(), "{}: {found:?}", p.display());
        files += 1;
    }
    assert!(files >= 10, "{files} kernel sources read");
}

#[test]
fn every_kernel_file_opens_with_its_header() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "cu") {
            continue;
        }
        let src = std::fs::read_to_string(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy();
        let header: String = src
            .lines()
            .take_while(|l| l.starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            header.starts_with(&format!("// {name} — ")),
            "{name}: must open with `// {name} — <what it is>`"
        );
        for section in [
            "Math",
            "Dtypes",
            "FLOPs",
            "bytes",
            "Launch geometry",
            "(out =)",
        ] {
            assert!(
                header.contains(section),
                "{name}: header comment lacks {section:?}"
            );
        }
        files += 1;
    }
    assert_eq!(
        files,
        MODULES.len(),
        "every kernels/*.cu is a compiled module"
    );
}

/// One ptxas resource line per (kernel, target).
#[derive(Debug)]
struct Resources {
    kernel: String,
    target: String,
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
    smem: u32,
}

/// Parses `-Xptxas -v` output.
fn parse_ptxas(report: &str) -> Vec<Resources> {
    let number_before = |line: &str, what: &str| -> u32 {
        line.split(',')
            .find(|p| p.contains(what))
            .and_then(|p| p.split_whitespace().find_map(|w| w.parse().ok()))
            .unwrap_or(0)
    };
    let mut out: Vec<Resources> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut it = rest.split('\'');
            let kernel = it.next().unwrap_or_default().to_string();
            let target = it.nth(1).unwrap_or_default().to_string();
            out.push(Resources {
                kernel,
                target,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack: 0,
                smem: 0,
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("spill stores") {
                r.stack = number_before(line, "stack frame");
                r.spill_stores = number_before(line, "spill stores");
                r.spill_loads = number_before(line, "spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = line
                    .split("Used")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                r.smem = number_before(line, "smem");
            }
        }
    }
    out
}

#[test]
fn ptxas_reports_no_spills() {
    let Some(version) = NVCC_VERSION else {
        crate::testing::skip(
            "ptxas_reports_no_spills",
            "built without nvcc (kernels embedded for NVRTC only)",
            Some("LORAFUSE_REQUIRE_NVCC"),
        );
        return;
    };
    println!("nvcc: {version}");
    println!(
        "{:<24} {:<7} {:>5} {:>6} {:>7} {:>7}",
        "kernel", "target", "regs", "stack", "spill", "smem"
    );
    let mut rows = 0;
    for m in MODULES {
        let res = parse_ptxas(m.ptxas_report);
        for k in m.kernels {
            for (target, _) in m.cubins {
                let r = res
                    .iter()
                    .find(|r| r.kernel == *k && r.target == *target)
                    .unwrap_or_else(|| panic!("{k}: no ptxas report for {target}"));
                println!(
                    "{:<24} {:<7} {:>5} {:>6} {:>7} {:>7}",
                    r.kernel,
                    r.target,
                    r.registers,
                    r.stack,
                    r.spill_stores + r.spill_loads,
                    r.smem
                );
                assert!(r.registers > 0, "{k} {target}: unparsed report");
                assert_eq!(
                    (r.spill_stores, r.spill_loads),
                    (0, 0),
                    "{k} on {target} spills registers"
                );
                rows += 1;
            }
        }
    }
    assert!(rows > 0, "nvcc built no cubins");
}

#[test]
fn the_ptxas_parser_reads_a_real_report() {
    let report = "ptxas info    : Compiling entry function 'add_fwd_f32' for 'sm_90'\n\
ptxas info    : Function properties for add_fwd_f32\n    \
8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 13 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]\n";
    let r = &parse_ptxas(report)[0];
    assert_eq!(
        (r.kernel.as_str(), r.target.as_str()),
        ("add_fwd_f32", "sm_90")
    );
    assert_eq!(
        (r.registers, r.stack, r.spill_stores, r.spill_loads, r.smem),
        (13, 8, 4, 12, 1024)
    );
}

/// When nvcc built the kernels, exactly the modules whose code (not only their comments)
/// uses Hopper-only instructions have an `sm_90a` cubin: the Hopper GEMM has one (its
/// dispatch needs it, and the runner's SASS check reads it), the sm_80 GEMM does not.
#[test]
fn sm_90a_cubins_are_built_for_the_hopper_modules_only() {
    let module = |n: &str| MODULES.iter().find(|m| m.name == n).expect("module");
    let has_90a = |n: &str| module(n).cubins.iter().any(|(t, _)| *t == "sm_90a");
    if module("lora_matmul").cubins.is_empty() {
        crate::testing::skip(
            "device::tidy::sm_90a_cubins_are_built_for_the_hopper_modules_only",
            "no nvcc at build time: no cubins",
            Some("LORAFUSE_REQUIRE_NVCC"),
        );
        return;
    }
    assert!(has_90a("lora_matmul_wgmma"));
    assert!(
        !has_90a("lora_matmul"),
        "lora_matmul.cu names wgmma in comments only"
    );
}
