//! The fused LoRA linear (DESIGN §2, §10) against its unfused composition and against the
//! dense GEMM of the base shape — ours and cuBLAS's.
//!
//! - `fused_fwd`: `lora_linear` — one GEMM over `K + r` plus the skinny `s·x·Aᵀ`.
//! - `unfused_fwd`: `linear(x, W0)` + `linear(x, A)` + `linear(u, B)` + `scale` + `add` —
//!   our GEMM, two skinny GEMMs and two elementwise passes (PEFT's structure).
//! - `dense_ours`, `dense_cublas`: `x·W0ᵀ` alone by our kernel and by `cublasGemmEx`.
//! - `fused_fwd_bwd`, `unfused_fwd_bwd`: forward + backward with `A`, `B` trained, `W0`
//!   frozen (no `gW0`) and the input gradient `gx` computed (as inside a network).
//!
//! Throughput is reported as `Elements` = FLOPs (criterion's "elem/s" is FLOP/s): the base
//! `2·M·N·K` plus the LoRA products. Every timed iteration ends with
//! `Device::synchronize()`, so GPU times are complete. On a GPU: the headline shape
//! (bf16, M = 8192, K = N = 4096, r = 16). Without one, the `cuda` group prints `skipped`
//! and a small f32 CPU group runs instead.
//!
//! `lora_matmul/gpt2/<gemm>` (GPU only; `skipped` without one): each GEMM of the GPT-2-124M
//! LoRA step at M = 8192 tokens, bf16, r = 16 on the block linears — the forward `y` (the
//! fused `lora_linear`: the base GEMM over K + r plus the skinny `s·x·Aᵀ`) and the
//! backward `gx = gy·W0` (the base product, W0 n-contiguous) — for c_attn 768→2304,
//! attn.c_proj 768→768, mlp.c_fc 768→3072, mlp.c_proj 3072→768 and lm_head 768→50304
//! (no LoRA; GPT-2's 50257 padded to a multiple of 64, as the model runs it). Each prints its TFLOP/s and the fraction of the 800 TFLOP/s floor of
//! `kernels/lora_matmul.cu`'s header, from a plain timed loop, before criterion's samples.
//!
//!
//! On a compute-capability 9.0 GPU (H100/H200) the forward products (every operand K-major)
//! and the backward gx (W0 read MN-major) run the Hopper GEMM `kernels/lora_matmul_wgmma.cu`;
//! the `*_sm80` rows (`dense_ours_sm80`, `fused_fwd_sm80`, `gpt2/<gemm>/y_sm80`,
//! `gpt2/<gemm>/gx_sm80`) rerun them with `set_hopper_gemm(false)`, so one call shows the
//! sm_80 path, the Hopper path and cuBLAS side by side.
//!
//! `cargo bench --bench lora_matmul`; BENCHMARKS.md records the numbers.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lorafuse::ops::{LoraTerm, add, linear, lora_linear, matmul, scale};
use lorafuse::{DType, Device, Tape, Tensor};
use rand::SeedableRng;
use std::time::{Duration, Instant};

/// The bf16 matrix rate the kernel header's floors assume (DESIGN §9: cuBLAS-class).
const FLOOR_TFLOPS: f64 = 800.0;

struct Shape {
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    dtype: DType,
}

impl Shape {
    fn id(&self) -> String {
        format!(
            "M{}_K{}_N{}_r{}_{}",
            self.m, self.k, self.n, self.r, self.dtype
        )
    }
    fn base_flops(&self) -> u64 {
        2 * (self.m * self.n * self.k) as u64
    }
    /// `s·x·Aᵀ` and the rank-r extension of the base GEMM.
    fn lora_fwd_flops(&self) -> u64 {
        2 * (self.m * self.r * (self.k + self.n)) as u64
    }
    /// Backward: `gx` (base + extension), `s·gy·B`, `gA`, `gB`.
    fn fwd_bwd_flops(&self) -> u64 {
        2 * self.base_flops()
            + 2 * self.lora_fwd_flops()
            + 2 * (self.m * self.r * (self.k + self.n)) as u64
    }
}

struct Operands {
    x: Tensor,
    w0: Tensor,
    a: Tensor,
    b: Tensor,
    gy: Tensor,
}

fn operands(s: &Shape, device: &Device) -> Operands {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut t = |dims: [usize; 2], bound: f64| {
        Tensor::rand_uniform(-bound, bound, dims, s.dtype, device, &mut rng).expect("tensor")
    };
    Operands {
        x: t([s.m, s.k], 1.0),
        w0: t([s.n, s.k], (1.0 / s.k as f64).sqrt()),
        a: t([s.r, s.k], (1.0 / s.k as f64).sqrt()),
        // Non-zero B so the LoRA path carries real values (after init it is 0).
        b: t([s.n, s.r], 0.1),
        gy: t([s.m, s.n], 1.0),
    }
}

const SCALE: f64 = 2.0;

/// `x`, `A`, `B` tracked on `tape` (x: the input gradient a real layer needs), `W0` frozen.
fn inputs(o: &Operands, tape: Option<&Tape>) -> (Tensor, Tensor, Tensor) {
    match tape {
        Some(t) => (o.x.track(t), o.a.track(t), o.b.track(t)),
        None => (o.x.clone(), o.a.clone(), o.b.clone()),
    }
}

fn fused(o: &Operands, tape: Option<&Tape>) -> Tensor {
    let (x, a, b) = inputs(o, tape);
    let term = LoraTerm {
        a: &a,
        b: &b,
        scale: SCALE,
        out_range: 0..o.w0.dims()[0],
    };
    lora_linear(&x, None, &o.w0, None, &[term]).expect("fused")
}

fn unfused(o: &Operands, tape: Option<&Tape>) -> Tensor {
    let (x, a, b) = inputs(o, tape);
    let y0 = linear(&x, &o.w0, None).expect("base");
    let u = linear(&x, &a, None).expect("u");
    let z = linear(&u, &b, None).expect("z");
    add(&y0, &scale(&z, SCALE).expect("scale")).expect("add")
}

fn run_group(c: &mut Criterion, name: &str, device: Device, s: &Shape, cublas: bool) {
    let o = operands(s, &device);
    let sync = || device.synchronize().expect("synchronize");
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let id = s.id();
    g.throughput(Throughput::Elements(s.base_flops()));
    g.bench_function(BenchmarkId::new("dense_ours", &id), |bch| {
        bch.iter(|| {
            let y = linear(&o.x, &o.w0, None).expect("linear");
            sync();
            y
        })
    });
    if cublas {
        g.bench_function(BenchmarkId::new("dense_cublas", &id), |bch| {
            bch.iter(|| {
                let y = lorafuse::device::cublas_linear(&o.x, &o.w0).expect("cublas");
                sync();
                y
            })
        });
    }
    g.throughput(Throughput::Elements(s.base_flops() + s.lora_fwd_flops()));
    g.bench_function(BenchmarkId::new("fused_fwd", &id), |bch| {
        bch.iter(|| {
            let y = fused(&o, None);
            sync();
            y
        })
    });
    // On an H100/H200 the two above run the Hopper GEMM; these run the sm_80 kernel beside
    // them (the same calls with the Hopper path switched off).
    if matches!(device, Device::Cuda(_)) && hopper(&device) {
        lorafuse::ops::set_hopper_gemm(false);
        g.throughput(Throughput::Elements(s.base_flops()));
        g.bench_function(BenchmarkId::new("dense_ours_sm80", &id), |bch| {
            bch.iter(|| {
                let y = linear(&o.x, &o.w0, None).expect("linear");
                sync();
                y
            })
        });
        g.throughput(Throughput::Elements(s.base_flops() + s.lora_fwd_flops()));
        g.bench_function(BenchmarkId::new("fused_fwd_sm80", &id), |bch| {
            bch.iter(|| {
                let y = fused(&o, None);
                sync();
                y
            })
        });
        lorafuse::ops::set_hopper_gemm(true);
    }
    g.bench_function(BenchmarkId::new("unfused_fwd", &id), |bch| {
        bch.iter(|| {
            let y = unfused(&o, None);
            sync();
            y
        })
    });
    g.throughput(Throughput::Elements(s.fwd_bwd_flops()));
    for (label, f) in [
        (
            "fused_fwd_bwd",
            fused as fn(&Operands, Option<&Tape>) -> Tensor,
        ),
        ("unfused_fwd_bwd", unfused),
    ] {
        g.bench_function(BenchmarkId::new(label, &id), |bch| {
            bch.iter(|| {
                let tape = Tape::new();
                let y = f(&o, Some(&tape));
                let grads = tape.backward_with(&y, o.gy.clone()).expect("backward");
                sync();
                grads
            })
        });
    }
    g.finish();
}

/// One GEMM of the GPT-2 step: `x [M, K]`, `W0 [N, K]`, LoRA rank `r` (0: none).
struct StepGemm {
    name: &'static str,
    k: usize,
    n: usize,
    r: usize,
}

const GPT2_M: usize = 8192;
const GPT2_GEMMS: [StepGemm; 5] = [
    StepGemm {
        name: "c_attn",
        k: 768,
        n: 2304,
        r: 16,
    },
    StepGemm {
        name: "attn.c_proj",
        k: 768,
        n: 768,
        r: 16,
    },
    StepGemm {
        name: "mlp.c_fc",
        k: 768,
        n: 3072,
        r: 16,
    },
    StepGemm {
        name: "mlp.c_proj",
        k: 3072,
        n: 768,
        r: 16,
    },
    StepGemm {
        name: "lm_head",
        k: 768,
        n: 50304,
        r: 0,
    },
];

/// Times `f` in a plain loop (3 warm-up calls, then `iters`), ending with a synchronize;
/// prints TFLOP/s and the fraction of the floor.
fn rate(label: &str, flops: u64, iters: u32, device: &Device, mut f: impl FnMut()) {
    for _ in 0..3 {
        f();
    }
    device.synchronize().expect("synchronize");
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    device.synchronize().expect("synchronize");
    let s = t.elapsed().as_secs_f64() / f64::from(iters);
    let tflops = flops as f64 / s / 1e12;
    println!(
        "{label}: {:.1} µs, {tflops:.1} TFLOP/s, {:.2} of the {FLOOR_TFLOPS} TFLOP/s floor",
        s * 1e6,
        tflops / FLOOR_TFLOPS
    );
}

/// Whether the forward products run the Hopper GEMM on `device` (printed once per call).
fn hopper(device: &Device) -> bool {
    match lorafuse::ops::hopper_gemm_available(device) {
        Ok(on) => {
            let path = if on {
                "the Hopper wgmma kernel (`*_sm80` rows: the sm_80 kernel)"
            } else {
                "the sm_80 kernel (no CC 9.0 GPU with the sm_90a cubin)"
            };
            println!("lora_matmul on {device}: y and gx products on {path}");
            on
        }
        Err(e) => panic!("lora_matmul: {e}"),
    }
}

/// The `lora_matmul/gpt2/<gemm>` groups: forward `y` and backward `gx` of each GEMM.
fn gpt2_groups(c: &mut Criterion, device: Device) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let m = GPT2_M;
    let on_hopper = hopper(&device);
    for s in &GPT2_GEMMS {
        let mut t = |dims: [usize; 2], bound: f64| {
            Tensor::rand_uniform(-bound, bound, dims, DType::BF16, &device, &mut rng)
                .expect("tensor")
        };
        let x = t([m, s.k], 1.0);
        let w0 = t([s.n, s.k], (1.0 / s.k as f64).sqrt());
        let gy = t([m, s.n], 1.0);
        let lora = (s.r > 0).then(|| (t([s.r, s.k], 0.05), t([s.n, s.r], 0.1)));
        let y = || match &lora {
            Some((a, b)) => {
                let term = LoraTerm {
                    a,
                    b,
                    scale: SCALE,
                    out_range: 0..s.n,
                };
                lora_linear(&x, None, &w0, None, &[term]).expect("y")
            }
            None => linear(&x, &w0, None).expect("y"),
        };
        let gx = || matmul(&gy, &w0).expect("gx");
        // y: the base over K + r and s·x·Aᵀ; gx: the base product.
        let y_flops = 2 * (m * s.n * (s.k + s.r) + m * s.r * s.k) as u64;
        let gx_flops = 2 * (m * s.k * s.n) as u64;
        let name = format!("lora_matmul/gpt2/{}", s.name);
        let id = format!("M{m}_K{}_N{}_r{}_bf16", s.k, s.n, s.r);
        let sync = || device.synchronize().expect("synchronize");
        rate(&format!("{name}/y/{id}"), y_flops, 20, &device, || {
            y();
        });
        if on_hopper {
            lorafuse::ops::set_hopper_gemm(false);
            rate(&format!("{name}/y_sm80/{id}"), y_flops, 20, &device, || {
                y();
            });
            lorafuse::ops::set_hopper_gemm(true);
        }
        rate(&format!("{name}/gx/{id}"), gx_flops, 20, &device, || {
            gx();
        });
        if on_hopper {
            lorafuse::ops::set_hopper_gemm(false);
            rate(
                &format!("{name}/gx_sm80/{id}"),
                gx_flops,
                20,
                &device,
                || {
                    gx();
                },
            );
            lorafuse::ops::set_hopper_gemm(true);
        }
        let mut g = c.benchmark_group(&name);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(1));
        g.throughput(Throughput::Elements(y_flops));
        g.bench_function(BenchmarkId::new("y", &id), |bch| {
            bch.iter(|| {
                let out = y();
                sync();
                out
            })
        });
        g.throughput(Throughput::Elements(gx_flops));
        g.bench_function(BenchmarkId::new("gx", &id), |bch| {
            bch.iter(|| {
                let out = gx();
                sync();
                out
            })
        });
        g.finish();
    }
}

fn benches(c: &mut Criterion) {
    let gpu = Device::Cuda(0);
    match gpu.unavailable_reason() {
        None => {
            let headline = Shape {
                m: 8192,
                k: 4096,
                n: 4096,
                r: 16,
                dtype: DType::BF16,
            };
            // cuBLAS is the baseline, not the subject: without it the group still runs.
            let cublas = match lorafuse::device::cublas_unavailable_reason() {
                None => true,
                Some(why) if std::env::var("LORAFUSE_REQUIRE_CUBLAS").as_deref() == Ok("1") => {
                    panic!("lora_matmul/cuda: LORAFUSE_REQUIRE_CUBLAS=1 but {why}")
                }
                Some(why) => {
                    println!("lora_matmul/cuda/dense_cublas: skipped ({why})");
                    false
                }
            };
            run_group(c, "lora_matmul/cuda", gpu, &headline, cublas);
            gpt2_groups(c, gpu);
        }
        Some(reason) => {
            println!("lora_matmul/cuda: skipped ({reason})");
            println!("lora_matmul/gpt2: skipped ({reason})");
        }
    }
    let small = Shape {
        m: 512,
        k: 256,
        n: 256,
        r: 16,
        dtype: DType::F32,
    };
    run_group(c, "lora_matmul/cpu", Device::Cpu, &small, false);
}

criterion_group!(lora_matmul, benches);
criterion_main!(lora_matmul);
