//! The memory-bound kernels on a GPU at GPT-2 124M's shapes (bf16, B·T = 8·1024 tokens,
//! C = 768, V = 50257 padded to Vp = 50304 as the model keeps it, the MLP's 4·C = 3072),
//! against the device copy bandwidth measured in the same run (DESIGN §10's baseline).
//!
//! - `membound/layer_norm_fwd`: `layer_norm` of x [8192, 768];
//! - `membound/layer_norm_fwd_bwd`: the same, tracked, then the backward (gx, gγ, gβ);
//! - `membound/cross_entropy_fused`: `cross_entropy_fused_padded` of the model's logits
//!   [8192, 50304] over their 50257 classes, in place (forward and gradient; the gradient
//!   becomes the next iteration's logits);
//! - `membound/embedding_fwd`, `membound/embedding_fwd_bwd`: the token + position lookup,
//!   then with both tables' gradients (gwte [50304, 768] is written in full);
//! - `membound/gelu_fwd`, `membound/gelu_fwd_bwd`: tanh-GELU of [8192, 3072];
//! - `membound/add`: the residual add of two [8192, 768];
//! - `membound/device_copy`: [`Tensor::copy_from`] of 256 MiB (read + write).
//!
//! Each line printed gives the bytes the kernel headers count per call, the time, GB/s and
//! the fraction of `device_copy`'s GB/s (the headers predict ≥ 0.8). Without a GPU it prints
//! `membound/cuda: skipped (<reason>)` and runs nothing. `cargo bench --bench membound`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lorafuse::ops::{add, cross_entropy_fused_padded, embedding, gelu, layer_norm};
use lorafuse::{DType, Device, Tape, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

const B: usize = 8;
const T: usize = 1024;
const C: usize = 768;
const V: usize = 50257;
/// The model's padded vocabulary (`Gpt2Config::padded_vocab_size`).
const VP: usize = 50304;
const N: usize = B * T;

fn rand(shape: &[usize], lo: f64, hi: f64, device: &Device, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Tensor::rand_uniform(lo, hi, shape.to_vec(), DType::BF16, device, &mut rng).expect("tensor")
}

/// Seconds per call of `f` (which synchronises), the median of 15 after 3 warm-ups.
fn seconds(f: &mut dyn FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut t: Vec<f64> = (0..15)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Measures one case: prints bytes, time, GB/s and the fraction of the copy bandwidth,
/// then hands it to criterion with its byte count.
fn case(c: &mut Criterion, name: &str, bytes: u64, copy_gbs: f64, mut f: impl FnMut()) {
    let s = seconds(&mut f);
    let gbs = bytes as f64 / s / 1e9;
    let frac = if copy_gbs > 0.0 { gbs / copy_gbs } else { 0.0 };
    println!(
        "membound/{name}: {:.1} MB per call, {:.1} us, {gbs:.0} GB/s, {frac:.2} of the device copy",
        bytes as f64 / 1e6,
        s * 1e6
    );
    let mut group = c.benchmark_group("membound");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function(name, |b| b.iter(&mut f));
    group.finish();
}

fn bench_cuda(c: &mut Criterion, dev: Device) {
    let sync = || dev.synchronize().expect("sync");
    // The copy baseline: 256 MiB read + 256 MiB written.
    let words = 64 << 20;
    let src = Tensor::full(1.0, [words], DType::F32, &dev).expect("src");
    let dst = Tensor::zeros([words], DType::F32, &dev).expect("dst");
    let copy_bytes = 2 * 4 * words as u64;
    let copy_s = seconds(&mut || {
        dst.copy_from(&src).expect("copy");
        sync();
    });
    let copy_gbs = copy_bytes as f64 / copy_s / 1e9;
    case(c, "device_copy", copy_bytes, copy_gbs, || {
        dst.copy_from(&src).expect("copy");
        sync();
    });
    drop((src, dst));

    let s2 = 2u64; // bytes per bf16
    let (n, cc) = (N as u64, C as u64);
    // LayerNorm: forward x + y + γβ + mean/rstd; backward x + gy + gx + γ + the chunk sums.
    let x = rand(&[N, C], -2.0, 2.0, &dev, 1);
    let gamma = rand(&[C], 0.5, 1.5, &dev, 2);
    let beta = rand(&[C], -0.5, 0.5, &dev, 3);
    let gy = rand(&[N, C], -1.0, 1.0, &dev, 4);
    let ln_fwd = 2 * s2 * n * cc + 2 * s2 * cc + 8 * n;
    // The parameter sums' 32-row chunks (`kChunkRows` in kernels/layer_norm.cu).
    let chunks = n.div_ceil(32);
    let ln_bwd = 3 * s2 * n * cc + s2 * cc + 8 * n + 2 * 2 * 4 * chunks * cc + 2 * s2 * cc;
    case(c, "layer_norm_fwd", ln_fwd, copy_gbs, || {
        layer_norm(&x, &gamma, &beta, 1e-5).expect("ln");
        sync();
    });
    case(c, "layer_norm_fwd_bwd", ln_fwd + ln_bwd, copy_gbs, || {
        let tape = Tape::new();
        let (xt, gt, bt) = (x.track(&tape), gamma.track(&tape), beta.track(&tape));
        let y = layer_norm(&xt, &gt, &bt, 1e-5).expect("ln");
        tape.backward_with(&y, gy.clone()).expect("ln backward");
        sync();
    });
    drop((x, gamma, beta, gy));

    // Cross-entropy, fused and in place: the design's 2 reads + 1 write of the logits.
    {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let targets: Vec<i32> = (0..N).map(|_| rng.random_range(0..V as i32)).collect();
        let seed = Tensor::full(1.0, [], DType::F32, &dev).expect("seed");
        let mut logits = Some(rand(&[N, VP], -4.0, 4.0, &dev, 6));
        // Two reads of the classes, one write of the padded row.
        let bytes = s2 * n * (2 * V + VP) as u64 + 12 * n;
        case(c, "cross_entropy_fused", bytes, copy_gbs, || {
            let tape = Tape::new();
            let x = logits.take().expect("logits").track(&tape);
            let id = x.id();
            let loss = cross_entropy_fused_padded(x, &targets, V, &seed).expect("ce");
            let g = tape
                .backward_with(&loss, seed.clone())
                .expect("ce backward");
            logits = Some(g.get_id(id).expect("gradient").clone());
            sync();
        });
        println!(
            "membound/cross_entropy_fused: (1 read + 1 write, the floor with the second pass \
             from L2, is {:.0} MB)",
            (s2 * n * (V + VP) as u64) as f64 / 1e6
        );
    }

    // Embedding: forward wte rows + wpe rows + out + tokens; backward gy (read by both
    // tables' sums) + gwte + gwpe + the host-built index.
    {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let toks: Vec<u32> = (0..N).map(|_| rng.random_range(0..V as u32)).collect();
        let wte = rand(&[VP, C], -1.0, 1.0, &dev, 8);
        let wpe = rand(&[T, C], -1.0, 1.0, &dev, 9);
        let gy = rand(&[B, T, C], -1.0, 1.0, &dev, 10);
        let fwd = 3 * s2 * n * cc + 4 * n;
        let bwd = 2 * s2 * n * cc + s2 * (VP + T) as u64 * cc + 8 * (n + VP as u64 + 1);
        case(c, "embedding_fwd", fwd, copy_gbs, || {
            embedding(&toks, B, T, &wte, &wpe).expect("embedding");
            sync();
        });
        case(c, "embedding_fwd_bwd", fwd + bwd, copy_gbs, || {
            let tape = Tape::new();
            let (et, pt) = (wte.track(&tape), wpe.track(&tape));
            let y = embedding(&toks, B, T, &et, &pt).expect("embedding");
            tape.backward_with(&y, gy.clone())
                .expect("embedding backward");
            sync();
        });
    }

    // GELU on the MLP's hidden [8192, 3072]; the residual add on [8192, 768].
    {
        let h = rand(&[N, 4 * C], -3.0, 3.0, &dev, 11);
        let gh = rand(&[N, 4 * C], -1.0, 1.0, &dev, 12);
        let e = n * 4 * cc;
        case(c, "gelu_fwd", 2 * s2 * e, copy_gbs, || {
            gelu(&h).expect("gelu");
            sync();
        });
        case(c, "gelu_fwd_bwd", 5 * s2 * e, copy_gbs, || {
            let tape = Tape::new();
            let ht = h.track(&tape);
            let y = gelu(&ht).expect("gelu");
            tape.backward_with(&y, gh.clone()).expect("gelu backward");
            sync();
        });
        let (a, b) = (
            rand(&[N, C], -1.0, 1.0, &dev, 13),
            rand(&[N, C], -1.0, 1.0, &dev, 14),
        );
        case(c, "add", 3 * s2 * n * cc, copy_gbs, || {
            add(&a, &b).expect("add");
            sync();
        });
    }
}

fn bench_membound(c: &mut Criterion) {
    let dev = Device::Cuda(0);
    match dev.unavailable_reason() {
        Some(reason) => println!("membound/cuda: skipped ({reason})"),
        None => bench_cuda(c, dev),
    }
}

criterion_group!(benches, bench_membound);
criterion_main!(benches);
