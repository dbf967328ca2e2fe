//! LayerNorm over the last dimension, with the row statistics saved for backward.

pub(crate) mod cpu;
pub(crate) mod cuda;
#[cfg(test)]
mod kernel_tests;

use super::{output, with_real};
use crate::tape::Tape;
use crate::tensor::{same_device, same_dtype};
use crate::{Device, Error, Real, Result, Tensor};

/// The row statistics of the forward, in the compute type, kept for the backward (f32
/// device tensors `[rows]` for a device input).
enum Stats {
    F32 { mean: Vec<f32>, rstd: Vec<f32> },
    F64 { mean: Vec<f64>, rstd: Vec<f64> },
    Device { mean: Tensor, rstd: Tensor },
}

/// LayerNorm over the last dimension: `x [.., C]`, `gamma [C]`, `beta [C]`, all of one
/// dtype; returns `(x − mean)·rstd·gamma + beta` with the shape and dtype of `x`.
///
/// Per row, `mean` and `rstd = 1/√(var + eps)` (biased variance, as PyTorch) are computed
/// in f32 (f64 for f64 tensors) and saved for the backward, which uses llm.c's formula;
/// `ggamma` and `gbeta` are summed over the rows in chunks of 256 rows, each in row order,
/// then the chunk sums in order (deterministic; the kernel follows the same order).
///
/// Errors: `gamma`/`beta` not `[C]`, a scalar `x` or `C = 0` (shape); mixed dtypes or
/// devices; `eps` negative or not finite (invalid argument).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let (_, c) = x.shape().as_rows(OP)?;
    if c == 0 {
        return Err(Error::shape(
            OP,
            format!("empty last dimension in {}", x.shape()),
        ));
    }
    for (name, p) in [("gamma", gamma), ("beta", beta)] {
        if p.dims() != [c] {
            return Err(Error::shape(
                OP,
                format!("{name} {} for input {}", p.shape(), x.shape()),
            ));
        }
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(format!(
            "{OP}: eps must be finite and >= 0, got {eps}"
        )));
    }
    let dtype = same_dtype(OP, &[x, gamma, beta])?;
    same_device(OP, &[x, gamma, beta])?;
    let tape = Tape::of(OP, &[x, gamma, beta])?;
    fn fwd<T: Real>(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Vec<T>, Vec<T>)> {
        let (xv, gv, bv) = (
            x.cpu_read::<T>(OP)?,
            gamma.cpu_read::<T>(OP)?,
            beta.cpu_read::<T>(OP)?,
        );
        let (y, mean, rstd) = cpu::forward(&xv, &gv, &bv, T::c(eps));
        Ok((output(y, x.shape().clone(), x.dtype())?, mean, rstd))
    }
    let (y, stats) = if x.device() == Device::Cpu {
        with_real(
            dtype,
            || {
                fwd::<f32>(x, gamma, beta, eps)
                    .map(|(y, mean, rstd)| (y, Stats::F32 { mean, rstd }))
            },
            || {
                fwd::<f64>(x, gamma, beta, eps)
                    .map(|(y, mean, rstd)| (y, Stats::F64 { mean, rstd }))
            },
        )?
    } else {
        let (y, mean, rstd) = cuda::forward(x, gamma, beta, eps)?;
        (y, Stats::Device { mean, rstd })
    };
    if let Some(tape) = &tape {
        let (x, gamma, beta, yid) = (x.clone(), gamma.clone(), beta.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            type Grads = (Option<Tensor>, Option<(Tensor, Tensor)>);
            fn bwd<T: Real>(
                x: &Tensor,
                gamma: &Tensor,
                beta: &Tensor,
                gy: &Tensor,
                mean: &[T],
                rstd: &[T],
            ) -> Result<Grads> {
                let (xv, gyv) = (x.cpu_read::<T>(OP)?, gy.cpu_read::<T>(OP)?);
                let gx = if x.requires_grad() {
                    let gv = gamma.cpu_read::<T>(OP)?;
                    Some(output(
                        cpu::backward_x(&xv, &gv, &gyv, mean, rstd),
                        x.shape().clone(),
                        x.dtype(),
                    )?)
                } else {
                    None
                };
                let gp = if gamma.requires_grad() || beta.requires_grad() {
                    let c = gamma.elem_count();
                    let (gg, gb) = cpu::backward_params(&xv, &gyv, mean, rstd, c);
                    Some((
                        output(gg, [c], gamma.dtype())?,
                        output(gb, [c], beta.dtype())?,
                    ))
                } else {
                    None
                };
                Ok((gx, gp))
            }
            let (gx, gp) = match &stats {
                Stats::F32 { mean, rstd } => bwd::<f32>(&x, &gamma, &beta, &gy, mean, rstd)?,
                Stats::F64 { mean, rstd } => bwd::<f64>(&x, &gamma, &beta, &gy, mean, rstd)?,
                Stats::Device { mean, rstd } => cuda::backward(
                    &x,
                    &gamma,
                    &gy,
                    mean,
                    rstd,
                    x.requires_grad(),
                    gamma.requires_grad() || beta.requires_grad(),
                )?,
            };
            if let Some(gx) = gx {
                g.accumulate(&x, gx)?;
            }
            if let Some((gg, gb)) = gp {
                g.accumulate(&gamma, gg)?;
                g.accumulate(&beta, gb)?;
            }
            Ok(())
        });
    }
    Ok(y.with_tape(tape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor, rng};
    use crate::{DType, Device};

    /// Textbook LayerNorm in f64, one element at a time.
    fn naive(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
        let c = gamma.len();
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks(c) {
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            for j in 0..c {
                y.push((row[j] - mean) / (var + eps).sqrt() * gamma[j] + beta[j]);
            }
        }
        y
    }

    #[test]
    fn layer_norm_matches_naive_and_normalises_rows() {
        let mut r = rng("layer_norm_naive");
        let x = rand_tensor(&mut r, [3, 5, 33], -3.0, 5.0);
        let gamma = rand_tensor(&mut r, [33], -2.0, 2.0);
        let beta = rand_tensor(&mut r, [33], -1.0, 1.0);
        let y = layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
        assert_eq!(y.dims(), &[3, 5, 33]);
        assert_eq!(y.dtype(), DType::F64);
        let want = naive(
            &x.to_vec_f64().unwrap(),
            &gamma.to_vec_f64().unwrap(),
            &beta.to_vec_f64().unwrap(),
            1e-5,
        );
        assert_close("layer_norm", &y.to_vec_f64().unwrap(), &want, 1e-14);
        // gamma = 1, beta = 0: each row has mean 0 and (biased) variance var/(var+eps) ≈ 1.
        let d = Device::Cpu;
        let ones = Tensor::full(1.0, [33], DType::F64, &d).unwrap();
        let zeros = Tensor::zeros([33], DType::F64, &d).unwrap();
        let y = layer_norm(&x, &ones, &zeros, 0.0)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        for row in y.chunks(33) {
            let mean = row.iter().sum::<f64>() / 33.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 33.0;
            assert!(
                mean.abs() < 1e-14 && (var - 1.0).abs() < 1e-13,
                "mean {mean} var {var}"
            );
        }
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let mut r = rng("layer_norm_fd");
        let x = rand_tensor(&mut r, [2, 3, 7], -2.0, 2.0);
        let gamma = rand_tensor(&mut r, [7], -1.5, 1.5);
        let beta = rand_tensor(&mut r, [7], -1.0, 1.0);
        check_grads(
            "layer_norm",
            &[x, gamma, beta],
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            1e-7,
        );
        // A wider row, mixed with other ops (the gradient flowing in is not the seed itself).
        // Few rows: the FD noise grows with |L|, the sum over all outputs.
        let x = rand_tensor(&mut r, [2, 40], -2.0, 2.0);
        let gamma = rand_tensor(&mut r, [40], -1.5, 1.5);
        let beta = rand_tensor(&mut r, [40], -1.0, 1.0);
        check_grads(
            "layer_norm∘gelu",
            &[x, gamma, beta],
            |t| crate::ops::gelu(&layer_norm(&crate::ops::gelu(&t[0])?, &t[1], &t[2], 1e-5)?),
            1e-7,
        );
    }

    #[test]
    fn layer_norm_grads_only_for_tracked_inputs_and_deterministic() {
        let mut r = rng("layer_norm_partial");
        // Large enough for several rayon tasks and column blocks, and more chunks than lanes.
        let (m, c) = (1100, 200);
        let x = rand_tensor(&mut r, [m, c], -2.0, 2.0)
            .to_dtype(DType::F32)
            .unwrap();
        let gamma = rand_tensor(&mut r, [c], -1.5, 1.5)
            .to_dtype(DType::F32)
            .unwrap();
        let beta = rand_tensor(&mut r, [c], -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let seed = rand_tensor(&mut r, [m, c], -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let run = |track_x: bool| {
            let tape = Tape::new();
            let xt = if track_x { x.track(&tape) } else { x.clone() };
            let (gt, bt) = (gamma.track(&tape), beta.track(&tape));
            let y = layer_norm(&xt, &gt, &bt, 1e-5).unwrap();
            let g = tape.backward_with(&y, seed.clone()).unwrap();
            assert_eq!(g.get(&xt).is_some(), track_x);
            let gx = g.get(&xt).map(|t| t.to_vec_f32().unwrap());
            (
                gx,
                g.get(&gt).unwrap().to_vec_f32().unwrap(),
                g.get(&bt).unwrap().to_vec_f32().unwrap(),
            )
        };
        let a = run(true);
        let b = run(true);
        assert_eq!(a, b, "two runs differ");
        let c2 = run(false);
        assert_eq!((&a.1, &a.2), (&c2.1, &c2.2));
        // gbeta is the column sum of the seed in the documented order (rows in chunks of
        // cpu::ROW_CHUNK, each in row order; chunk k into lane k mod 32 in order; the lanes
        // by the xor tree of distances 16 … 1): bit for bit.
        let sv = seed.to_vec_f32().unwrap();
        let mut lanes = vec![[0.0f32; 32]; c];
        for (k, chunk) in sv.chunks(cpu::ROW_CHUNK * c).enumerate() {
            let mut part = vec![0.0f32; c];
            for row in chunk.chunks(c) {
                for (p, v) in part.iter_mut().zip(row) {
                    *p += v;
                }
            }
            for (l, p) in lanes.iter_mut().zip(&part) {
                l[k % 32] += p;
            }
        }
        let want: Vec<f32> = lanes
            .iter()
            .map(|l| {
                let mut l = *l;
                for d in [16, 8, 4, 2, 1] {
                    l = std::array::from_fn(|i| l[i] + l[i ^ d]);
                }
                l[0]
            })
            .collect();
        assert_eq!(c2.2, want);
        assert!(m > 32 * cpu::ROW_CHUNK, "the chunks wrap around the lanes");
    }

    #[test]
    fn layer_norm_f32_and_bf16_inputs_are_close_to_f64() {
        let mut r = rng("layer_norm_lowp");
        let x = rand_tensor(&mut r, [6, 48], -3.0, 3.0);
        let gamma = rand_tensor(&mut r, [48], -1.5, 1.5);
        let beta = rand_tensor(&mut r, [48], -1.0, 1.0);
        let seed = rand_tensor(&mut r, [6, 48], -1.0, 1.0);
        for (dt, tol_y, tol_g) in [(DType::F32, 1e-6, 1e-5), (DType::BF16, 8e-3, 3e-2)] {
            // The reference runs in f64 on the inputs rounded to `dt`.
            let ins: Vec<Tensor> = [&x, &gamma, &beta, &seed]
                .iter()
                .map(|t| t.to_dtype(dt).unwrap())
                .collect();
            let ref_ins: Vec<Tensor> = ins
                .iter()
                .map(|t| t.to_dtype(DType::F64).unwrap())
                .collect();
            let grads = |ins: &[Tensor]| {
                let tape = Tape::new();
                let t: Vec<Tensor> = ins[..3].iter().map(|t| t.track(&tape)).collect();
                let y = layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap();
                let g = tape.backward_with(&y, ins[3].clone()).unwrap();
                let gs: Vec<Tensor> = t.iter().map(|t| g.get(t).unwrap().clone()).collect();
                (y, gs)
            };
            let (y, g) = grads(&ins);
            let (y64, g64) = grads(&ref_ins);
            assert_eq!(y.dtype(), dt);
            assert_close(
                &format!("layer_norm y {dt}"),
                &y.to_vec_f64().unwrap(),
                &y64.to_vec_f64().unwrap(),
                tol_y,
            );
            for (i, (g, g64)) in g.iter().zip(&g64).enumerate() {
                assert_eq!(g.dtype(), dt);
                assert_close(
                    &format!("layer_norm grad {i} {dt}"),
                    &g.to_vec_f64().unwrap(),
                    &g64.to_vec_f64().unwrap(),
                    tol_g,
                );
            }
        }
    }

    #[test]
    fn layer_norm_rejects_bad_inputs() {
        let d = Device::Cpu;
        let x = Tensor::zeros([4, 8], DType::F32, &d).unwrap();
        let g8 = Tensor::zeros([8], DType::F32, &d).unwrap();
        let g7 = Tensor::zeros([7], DType::F32, &d).unwrap();
        let g2d = Tensor::zeros([1, 8], DType::F32, &d).unwrap();
        assert!(matches!(
            layer_norm(&x, &g7, &g8, 1e-5),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            layer_norm(&x, &g8, &g7, 1e-5),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            layer_norm(&x, &g2d, &g8, 1e-5),
            Err(Error::Shape { .. })
        ));
        let scalar = Tensor::zeros((), DType::F32, &d).unwrap();
        assert!(matches!(
            layer_norm(&scalar, &g8, &g8, 1e-5),
            Err(Error::Shape { .. })
        ));
        let empty = Tensor::zeros([4, 0], DType::F32, &d).unwrap();
        let g0 = Tensor::zeros([0], DType::F32, &d).unwrap();
        assert!(matches!(
            layer_norm(&empty, &g0, &g0, 1e-5),
            Err(Error::Shape { .. })
        ));
        let b16 = Tensor::zeros([8], DType::BF16, &d).unwrap();
        assert!(matches!(
            layer_norm(&x, &g8, &b16, 1e-5),
            Err(Error::DType { .. })
        ));
        for eps in [-1e-5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                layer_norm(&x, &g8, &g8, eps),
                Err(Error::InvalidArgument(_))
            ));
        }
    }
}
