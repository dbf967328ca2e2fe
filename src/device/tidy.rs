//! The tidy test: the kernels the Rust side names exist in every compiled form, every
//! `kernels/*.cu` opens with its header comment, and — when nvcc built them — no kernel
//! spills registers (ptxas's report, printed as a table).

use super::kernels::{launched, MODULES, NVCC_VERSION};
use super::sim;

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
        let why = "built without nvcc (kernels embedded for NVRTC only)";
        assert!(
            std::env::var("LORAFUSE_REQUIRE_NVCC").as_deref() != Ok("1"),
            "LORAFUSE_REQUIRE_NVCC=1 but {why}"
        );
        println!("ptxas_reports_no_spills: skipped ({why})");
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
