//! Causal multi-head self-attention as one op, from GPT-2's fused `c_attn` output.
//!
//! On the CPU the forward saves the softmax probabilities `P [B, H, T, T]` (in the compute
//! type) for the backward rather than the per-row logsumexp: with `P` the backward needs no
//! score GEMM and no exponentials (4 GEMMs per head instead of 5), and at the CPU's sizes
//! the memory is small (`B=8, H=4, T=128`: 2 MB in f32). It grows as `T²`.
//!
//! On a device (`kernels/attention.cu`, launched by `cuda.rs`) the kernels are
//! flash-attention style: the forward runs over key tiles with an online softmax and saves
//! only the logsumexp `lse [B, H, T]` (f32) besides its output `y`; the backward recomputes
//! `P` tile by tile from `qkv` and `lse` and runs as two deterministic kernels (dq per
//! query tile, then dk and dv per key tile; for bf16/f16 at head dims 64 and 128 the
//! FlashAttention-2 tensor-core kernels: D = rowsum(gy ⊙ y), dk and dv per key block, dq per
//! query block), so no `T²` buffer exists at any point (at the
//! GPT-2 124M shape `B=8, H=12, T=1024`, P would be 403 MB per layer; lse is 0.39 MB).
//! On a compute-capability 9.0 GPU the forward at head dims 64 and 128 with `T` a multiple
//! of 128 runs the Hopper kernel instead (`kernels/attention_wgmma.cu`, launched by
//! `wgmma.rs`: wgmma fed by TMA, FlashAttention-3 style), with the same outputs; so does the
//! backward at head dim 64 (D on `kernels/attention.cu`, then dk, dv and dq on the Hopper
//! kernels, still without atomics).
//! The backward reads the `y` this op returned (the tape keeps a handle to it, which costs
//! no memory since the caller holds it too): it must not be modified in place before the
//! backward runs.

pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod wgmma;

use super::{output, with_real};
use crate::tape::Tape;
use crate::{Device, Error, Real, Result, Tensor};
use cpu::Dims;

/// Causal multi-head self-attention from a fused `qkv [B, T, 3C]`; returns `[B, T, C]`.
///
/// Along the last dimension of `qkv`, columns `0..C` are the queries, `C..2C` the keys and
/// `2C..3C` the values (GPT-2's `c_attn` layout); head `h` uses columns `h·hd..(h+1)·hd`
/// of each, with `hd = C / n_head`. For each batch and head,
/// `P = softmax(q·kᵀ / √hd)` with a causal mask (position `t` attends to `0..=t`), and the
/// head's output `P·v` lands in columns `h·hd..(h+1)·hd` of the result (GPT-2's
/// `merge_heads`). Computed in f32 (f64 for f64 input; bf16/f16 are widened and the output
/// rounded once), softmax with max-subtraction (on a device: an online softmax over key
/// tiles, see the module docs).
///
/// Backward: with `gy` split per head like the output, `dP = gy·vᵀ`, `dv = Pᵀ·gy`,
/// `dS = P ⊙ (dP − rowsum(dP ⊙ P)) / √hd`, `dq = dS·k`, `dk = dSᵀ·q`, written back into
/// the fused layout. On a device `P` is recomputed from the saved logsumexp and
/// `rowsum(dP ⊙ P)` is taken as `rowsum(gy ⊙ y)` (equal in exact arithmetic).
///
/// Errors: `qkv` not of rank 3, a last dimension not divisible by 3 or of 0, `n_head == 0`,
/// or `C` not divisible by `n_head`; on a device also a head dim `C / n_head` above 128
/// ([`Error::Unsupported`]).
pub fn causal_attention(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    const OP: &str = "causal_attention";
    let (b, t, c3) = qkv.shape().dims3(OP)?;
    if c3 % 3 != 0 || c3 == 0 {
        return Err(Error::shape(
            OP,
            format!("qkv {} needs a last dimension 3·C with C > 0", qkv.shape()),
        ));
    }
    let c = c3 / 3;
    if n_head == 0 || c % n_head != 0 {
        return Err(Error::shape(
            OP,
            format!("C = {c} is not divisible into {n_head} heads"),
        ));
    }
    let d = Dims { b, t, c, h: n_head };
    let tape = Tape::of(OP, &[qkv])?;
    fn fwd<T: Real>(qkv: &Tensor, d: Dims) -> Result<(Tensor, Tensor)> {
        let (y, p) = cpu::forward(&qkv.cpu_read::<T>(OP)?, d, cpu::BLOCK)?;
        let p = Tensor::from_vec(p, [d.b, d.h, d.t, d.t], &Device::Cpu)?;
        Ok((output(y, [d.b, d.t, d.c], qkv.dtype())?, p))
    }
    // What the backward needs besides qkv and gy: P on the CPU, y and lse on a device.
    let (y, saved) = if qkv.device() != Device::Cpu {
        let (y, lse) = cuda::forward(qkv, d)?;
        // `y` is untracked here (no tape handle), so keeping it in the closure that the
        // tape owns makes no reference cycle.
        let saved = Saved::Device { y: y.clone(), lse };
        (y, saved)
    } else {
        let (y, p) = with_real(qkv.dtype(), || fwd::<f32>(qkv, d), || fwd::<f64>(qkv, d))?;
        (y, Saved::Cpu { p })
    };
    if let Some(tape) = &tape {
        let (qkv, yid) = (qkv.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            fn bwd<T: Real>(qkv: &Tensor, p: &Tensor, gy: &Tensor, d: Dims) -> Result<Tensor> {
                let (qv, pv, gv) = (
                    qkv.cpu_read::<T>(OP)?,
                    p.cpu_read::<T>(OP)?,
                    gy.cpu_read::<T>(OP)?,
                );
                let gqkv = cpu::backward(&qv, &pv, &gv, d, cpu::BLOCK)?;
                output(gqkv, qkv.shape().clone(), qkv.dtype())
            }
            let gqkv = match &saved {
                Saved::Device { y, lse } => cuda::backward(&qkv, y, lse, &gy, d)?,
                Saved::Cpu { p } => with_real(
                    qkv.dtype(),
                    || bwd::<f32>(&qkv, p, &gy, d),
                    || bwd::<f64>(&qkv, p, &gy, d),
                )?,
            };
            g.accumulate(&qkv, gqkv)
        });
    }
    Ok(y.with_tape(tape))
}

/// The forward's state kept for the backward.
enum Saved {
    /// The CPU path: the probabilities `P [B, H, T, T]` in the compute type.
    Cpu { p: Tensor },
    /// The device path: the output `y` (the same storage as the returned tensor) and the
    /// logsumexp `lse [B, H, T]` in f32.
    Device { y: Tensor, lse: Tensor },
}

#[cfg(test)]
mod kernel_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::ops::profile;
    use crate::testing::{assert_close, check_grads, rand_tensor, rng};

    /// Independent reference: a plain f64 loop over batch, head, query and key.
    fn naive(qkv: &[f64], (b, t, c, h): (usize, usize, usize, usize)) -> Vec<f64> {
        let hd = c / h;
        let at = |bi: usize, ti: usize, col: usize| qkv[(bi * t + ti) * 3 * c + col];
        let mut y = vec![0.0; b * t * c];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..t {
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|e| at(bi, i, hi * hd + e) * at(bi, j, c + hi * hd + e))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = w.iter().sum();
                    for e in 0..hd {
                        y[(bi * t + i) * c + hi * hd + e] = (0..=i)
                            .map(|j| w[j] / z * at(bi, j, 2 * c + hi * hd + e))
                            .sum();
                    }
                }
            }
        }
        y
    }

    #[test]
    fn attention_forward_matches_naive_loops() {
        let mut r = rng("attention_naive");
        // (B, T, C, H): T = 1, odd head dims, T past one and several causal blocks.
        for (b, t, c, h) in [
            (1, 1, 4, 2),
            (2, 7, 6, 2),
            (2, 5, 12, 3),
            (1, 7, 8, 1),
            (2, 40, 8, 2),
            (1, 70, 9, 3),
        ] {
            let x = rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0);
            let y = causal_attention(&x, h).unwrap();
            assert_eq!(y.dims(), &[b, t, c]);
            assert_eq!(y.dtype(), DType::F64);
            let want = naive(&x.to_vec_f64().unwrap(), (b, t, c, h));
            assert_close(
                &format!("attention {b}x{t}x{c}/{h}"),
                &y.to_vec_f64().unwrap(),
                &want,
                1e-13,
            );
        }
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let mut r = rng("attention_fd");
        let x = rand_tensor(&mut r, [2, 5, 24], -1.5, 1.5);
        check_grads(
            "causal_attention B2 T5 C8 H2",
            &[x],
            |t| causal_attention(&t[0], 2),
            1e-7,
        );
        // More rows than one causal block, odd head dim.
        let x = rand_tensor(&mut r, [1, 37, 18], -1.5, 1.5);
        check_grads(
            "causal_attention B1 T37 C6 H2",
            &[x],
            |t| causal_attention(&t[0], 2),
            1e-7,
        );
    }

    #[test]
    fn blocked_kernels_match_unblocked_ones() {
        let mut r = rng("attention_blocks");
        let d = Dims {
            b: 2,
            t: 70,
            c: 12,
            h: 2,
        };
        let x = rand_tensor(&mut r, [d.b, d.t, 3 * d.c], -2.0, 2.0)
            .to_vec_f64()
            .unwrap();
        let gy = rand_tensor(&mut r, [d.b, d.t, d.c], -1.0, 1.0)
            .to_vec_f64()
            .unwrap();
        let (y_full, p_full) = cpu::forward(&x, d, d.t).unwrap();
        let g_full = cpu::backward(&x, &p_full, &gy, d, d.t).unwrap();
        for block in [1, 7, 32] {
            let (y, p) = cpu::forward(&x, d, block).unwrap();
            assert_close(&format!("y, block {block}"), &y, &y_full, 1e-14);
            assert_close(&format!("P, block {block}"), &p, &p_full, 1e-14);
            let g = cpu::backward(&x, &p, &gy, d, block).unwrap();
            assert_close(&format!("gqkv, block {block}"), &g, &g_full, 1e-13);
        }
    }

    #[test]
    fn attention_is_causal_in_both_directions() {
        let mut r = rng("attention_causal");
        let (b, t, c, h, t0) = (2, 40, 8, 2, 23);
        let x = rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0);
        let y = causal_attention(&x, h).unwrap().to_vec_f64().unwrap();
        // Change q, k and v at every position >= t0.
        let mut v = x.to_vec_f64().unwrap();
        for bi in 0..b {
            for ti in t0..t {
                for e in 0..3 * c {
                    v[(bi * t + ti) * 3 * c + e] += 0.5;
                }
            }
        }
        let x2 = Tensor::from_vec(v, [b, t, 3 * c], &Device::Cpu).unwrap();
        let y2 = causal_attention(&x2, h).unwrap().to_vec_f64().unwrap();
        for bi in 0..b {
            let rows =
                |y: &[f64], lo: usize, hi: usize| y[(bi * t + lo) * c..(bi * t + hi) * c].to_vec();
            assert_eq!(
                rows(&y, 0, t0),
                rows(&y2, 0, t0),
                "batch {bi}: earlier outputs changed"
            );
            assert_ne!(
                rows(&y, t0, t),
                rows(&y2, t0, t),
                "batch {bi}: later outputs did not change"
            );
        }
        // Backward: a gradient only on rows < t0 gives no gradient to positions >= t0.
        let tape = Tape::new();
        let xt = x.track(&tape);
        let yt = causal_attention(&xt, h).unwrap();
        let mut seed = rand_tensor(&mut r, [b, t, c], -1.0, 1.0)
            .to_vec_f64()
            .unwrap();
        for bi in 0..b {
            seed[(bi * t + t0) * c..(bi * t + t) * c].fill(0.0);
        }
        let seed = Tensor::from_vec(seed, [b, t, c], &Device::Cpu).unwrap();
        let gx = tape
            .backward_with(&yt, seed)
            .unwrap()
            .get(&xt)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        for bi in 0..b {
            let late = &gx[(bi * t + t0) * 3 * c..(bi * t + t) * 3 * c];
            assert!(
                late.iter().all(|&g| g == 0.0),
                "batch {bi}: gradient reached future positions"
            );
            let early = &gx[bi * t * 3 * c..(bi * t + t0) * 3 * c];
            assert!(early.iter().any(|&g| g != 0.0));
        }
    }

    #[test]
    fn attention_f32_and_bf16_are_close_to_f64() {
        let mut r = rng("attention_dtypes");
        let (b, t, c, h) = (2, 45, 16, 4);
        let x = rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0);
        let gy = rand_tensor(&mut r, [b, t, c], -1.0, 1.0);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            // Compare against f64 on the same (rounded) inputs: only compute and output rounding count.
            let xl = x.to_dtype(dtype).unwrap();
            let x64 = xl.to_dtype(DType::F64).unwrap();
            let (tape, tape64) = (Tape::new(), Tape::new());
            let (xt, xt64) = (xl.track(&tape), x64.track(&tape64));
            let (y, y64) = (
                causal_attention(&xt, h).unwrap(),
                causal_attention(&xt64, h).unwrap(),
            );
            assert_eq!(y.dtype(), dtype);
            assert_close(
                &format!("forward {dtype}"),
                &y.to_vec_f64().unwrap(),
                &y64.to_vec_f64().unwrap(),
                tol,
            );
            let g = tape.backward_with(&y, gy.to_dtype(dtype).unwrap()).unwrap();
            let g64 = tape64
                .backward_with(
                    &y64,
                    gy.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap(),
                )
                .unwrap();
            let (gx, gx64) = (g.get(&xt).unwrap(), g64.get(&xt64).unwrap());
            assert_eq!(gx.dtype(), dtype);
            assert_close(
                &format!("backward {dtype}"),
                &gx.to_vec_f64().unwrap(),
                &gx64.to_vec_f64().unwrap(),
                tol,
            );
        }
    }

    #[test]
    fn attention_counts_its_gemms_and_handles_empty_batches() {
        let d = Device::Cpu;
        let tape = Tape::new();
        let x = Tensor::zeros([2, 40, 24], DType::F32, &d)
            .unwrap()
            .track(&tape);
        profile::reset();
        let y = causal_attention(&x, 2).unwrap();
        // 2 row blocks (32 + 8 rows) per (b, h), 2 GEMMs each.
        assert_eq!(profile::counts().gemms, 2 * 2 * 2 * 2);
        profile::reset();
        tape.backward_with(&y, Tensor::ones_like(&y).unwrap())
            .unwrap();
        assert_eq!(profile::counts().gemms, 2 * 2 * 2 * 4);
        // Zeros in, uniform attention: each output is the mean of the (zero) values.
        assert!(y.to_vec_f64().unwrap().iter().all(|&v| v == 0.0));
        let e = causal_attention(&Tensor::zeros([0, 3, 12], DType::F32, &d).unwrap(), 2).unwrap();
        assert_eq!(e.dims(), &[0, 3, 4]);
        let e = causal_attention(&Tensor::zeros([2, 0, 12], DType::F32, &d).unwrap(), 2).unwrap();
        assert_eq!(e.dims(), &[2, 0, 4]);
    }

    #[test]
    fn attention_rejects_bad_shapes() {
        let d = Device::Cpu;
        let z = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &d).unwrap();
        assert!(matches!(
            causal_attention(&z(&[4, 24]), 2),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            causal_attention(&z(&[1, 4, 4, 24]), 2),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            causal_attention(&z(&[1, 4, 25]), 1),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            causal_attention(&z(&[1, 4, 0]), 1),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            causal_attention(&z(&[1, 4, 24]), 0),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            causal_attention(&z(&[1, 4, 24]), 3),
            Err(Error::Shape { .. })
        ));
        assert!(causal_attention(&z(&[1, 4, 24]), 8).is_ok());
    }

    /// Timing of forward + backward at the demo's size (prints, asserts nothing):
    /// `cargo test --lib attention_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_timing() {
        use std::time::Instant;
        let mut r = rng("attention_timing");
        let d = Dims {
            b: 8,
            t: 128,
            c: 256,
            h: 4,
        };
        let x: Vec<f32> = rand_tensor(&mut r, [d.b, d.t, 3 * d.c], -1.0, 1.0)
            .to_vec_f32()
            .unwrap();
        let gy: Vec<f32> = rand_tensor(&mut r, [d.b, d.t, d.c], -1.0, 1.0)
            .to_vec_f32()
            .unwrap();
        let best = |f: &mut dyn FnMut()| {
            f();
            (0..10)
                .map(|_| {
                    let s = Instant::now();
                    f();
                    s.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min)
        };
        for block in [16, 32, 64, 128] {
            let mut p = Vec::new();
            let fwd = best(&mut || p = cpu::forward(&x, d, block).unwrap().1);
            let bwd = best(&mut || {
                cpu::backward(&x, &p, &gy, d, block).unwrap();
            });
            println!(
                "attention f32 B8 T128 C256 H4, block {block:>3}: forward {fwd:.2} ms, backward {bwd:.2} ms, total {:.2} ms ({} threads)",
                fwd + bwd,
                rayon::current_num_threads()
            );
        }
        // The op itself (tensor conversion and output included), f32 and bf16.
        for dtype in [DType::F32, DType::BF16] {
            let xt = Tensor::from_vec(x.clone(), [d.b, d.t, 3 * d.c], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let seed = Tensor::from_vec(gy.clone(), [d.b, d.t, d.c], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let ms = best(&mut || {
                let tape = Tape::new();
                let xt = xt.track(&tape);
                let y = causal_attention(&xt, d.h).unwrap();
                tape.backward_with(&y, seed.clone()).unwrap();
            });
            println!("causal_attention op {dtype}, forward + backward: {ms:.2} ms");
        }
    }
}
