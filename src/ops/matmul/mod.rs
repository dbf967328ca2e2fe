//! Dense products: `matmul` (`a·b`) and `linear` (`x·Wᵀ + b`, the layout of `nn.Linear`).

pub(crate) mod cpu;

use super::elementwise::bias_grad;
use super::{output, with_real};
use crate::ops::lora_matmul::{Gemm, Operand};
use crate::tape::Tape;
use crate::tensor::{same_device, same_dtype};
use crate::{Device, Error, Real, Result, Tensor};

/// `a·b` for `a [M, K]`, `b [K, N]`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "matmul";
    let (m, k) = a.shape().dims2(OP)?;
    let (k2, n) = b.shape().dims2(OP)?;
    if k != k2 {
        return Err(Error::shape(OP, format!("{} · {}", a.shape(), b.shape())));
    }
    let dtype = same_dtype(OP, &[a, b])?;
    same_device(OP, &[a, b])?;
    let tape = Tape::of(OP, &[a, b])?;
    fn fwd<T: Real>(a: &Tensor, b: &Tensor, (m, k, n): (usize, usize, usize)) -> Result<Tensor> {
        let (av, bv) = (a.cpu_read::<T>(OP)?, b.cpu_read::<T>(OP)?);
        let mut c = crate::storage::pool::scratch::<T>(m * n);
        cpu::matmul(&mut c, false, &av, false, &bv, false, (m, k, n), T::one())?;
        output(c, [m, n], a.dtype())
    }
    let y = if a.device() == Device::Cpu {
        with_real(
            dtype,
            || fwd::<f32>(a, b, (m, k, n)),
            || fwd::<f64>(a, b, (m, k, n)),
        )?
    } else {
        // The LoRA GEMM kernel with no extension.
        Gemm::new(m, n, k, Operand::rows(a, k), Operand::rows(b, n)).run([m, n])?
    };
    if let Some(tape) = &tape {
        let (a, b, yid) = (a.clone(), b.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            fn bwd<T: Real>(
                a: &Tensor,
                b: &Tensor,
                gy: &Tensor,
                (m, k, n): (usize, usize, usize),
            ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                let (av, bv, gv) = (
                    a.cpu_read::<T>(OP)?,
                    b.cpu_read::<T>(OP)?,
                    gy.cpu_read::<T>(OP)?,
                );
                let ga = if a.requires_grad() {
                    // ga = gy·bᵀ  [m, k]
                    let mut ga = crate::storage::pool::scratch::<T>(m * k);
                    cpu::matmul(&mut ga, false, &gv, false, &bv, true, (m, n, k), T::one())?;
                    Some(output(ga, [m, k], a.dtype())?)
                } else {
                    None
                };
                let gb = if b.requires_grad() {
                    // gb = aᵀ·gy  [k, n]
                    let mut gb = crate::storage::pool::scratch::<T>(k * n);
                    cpu::matmul(&mut gb, false, &av, true, &gv, false, (k, m, n), T::one())?;
                    Some(output(gb, [k, n], b.dtype())?)
                } else {
                    None
                };
                Ok((ga, gb))
            }
            let (ga, gb) = if a.device() == Device::Cpu {
                with_real(
                    a.dtype(),
                    || bwd::<f32>(&a, &b, &gy, (m, k, n)),
                    || bwd::<f64>(&a, &b, &gy, (m, k, n)),
                )?
            } else {
                // ga = gy·bᵀ, gb = aᵀ·gy
                let ga = a
                    .requires_grad()
                    .then(|| {
                        Gemm::new(m, k, n, Operand::rows(&gy, n), Operand::transposed(&b, n))
                            .run([m, k])
                    })
                    .transpose()?;
                let gb = b
                    .requires_grad()
                    .then(|| {
                        Gemm::new(k, n, m, Operand::transposed(&a, k), Operand::rows(&gy, n))
                            .run([k, n])
                    })
                    .transpose()?;
                (ga, gb)
            };
            if let Some(ga) = ga {
                g.accumulate(&a, ga)?;
            }
            if let Some(gb) = gb {
                g.accumulate(&b, gb)?;
            }
            Ok(())
        });
    }
    Ok(y.with_tape(tape))
}

/// `x·Wᵀ + b` for `x [.., K]`, `w [N, K]`, `bias [N]`: the output is `[.., N]`.
///
/// Backward: `gx = gy·W`, `gW = gyᵀ·x`, `gb = Σ_rows gy`, each computed only when
/// that input is tracked.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "linear";
    let (m, k) = x.shape().as_rows(OP)?;
    let (n, k2) = w.shape().dims2(OP)?;
    if k != k2 {
        return Err(Error::shape(
            OP,
            format!("x {} with weight {}", x.shape(), w.shape()),
        ));
    }
    if let Some(b) = bias
        && b.dims() != [n]
    {
        return Err(Error::shape(
            OP,
            format!("bias {} for weight {}", b.shape(), w.shape()),
        ));
    }
    let mut ins = vec![x, w];
    ins.extend(bias);
    let dtype = same_dtype(OP, &ins)?;
    same_device(OP, &ins)?;
    let tape = Tape::of(OP, &ins)?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;
    fn fwd<T: Real>(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        (m, k, n): (usize, usize, usize),
        dims: Vec<usize>,
    ) -> Result<Tensor> {
        let (xv, wv) = (x.cpu_read::<T>(OP)?, w.cpu_read::<T>(OP)?);
        let mut y = match bias {
            Some(b) => {
                let mut y = crate::storage::pool::scratch::<T>(m * n);
                let bv = b.cpu_read::<T>(OP)?;
                y.chunks_exact_mut(n)
                    .for_each(|row| row.copy_from_slice(&bv));
                y
            }
            None => crate::storage::pool::scratch::<T>(m * n),
        };
        cpu::matmul(
            &mut y,
            bias.is_some(),
            &xv,
            false,
            &wv,
            true,
            (m, k, n),
            T::one(),
        )?;
        output(y, dims, x.dtype())
    }
    let y = if x.device() == Device::Cpu {
        with_real(
            dtype,
            || fwd::<f32>(x, w, bias, (m, k, n), out_dims.clone()),
            || fwd::<f64>(x, w, bias, (m, k, n), out_dims.clone()),
        )?
    } else {
        fwd_gemm(x, w, (m, k, n)).bias(bias).run(out_dims.clone())?
    };
    if let Some(tape) = &tape {
        let (x, w, bias, yid) = (x.clone(), w.clone(), bias.cloned(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            fn bwd<T: Real>(
                x: &Tensor,
                w: &Tensor,
                gy: &Tensor,
                (m, k, n): (usize, usize, usize),
            ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                let gv = gy.cpu_read::<T>(OP)?;
                let gx = if x.requires_grad() {
                    let wv = w.cpu_read::<T>(OP)?;
                    let mut gx = crate::storage::pool::scratch::<T>(m * k);
                    cpu::matmul(&mut gx, false, &gv, false, &wv, false, (m, n, k), T::one())?;
                    Some(output(gx, x.shape().clone(), x.dtype())?)
                } else {
                    None
                };
                let gw = if w.requires_grad() {
                    let xv = x.cpu_read::<T>(OP)?;
                    let mut gw = crate::storage::pool::scratch::<T>(n * k);
                    cpu::matmul(&mut gw, false, &gv, true, &xv, false, (n, m, k), T::one())?;
                    Some(output(gw, [n, k], w.dtype())?)
                } else {
                    None
                };
                Ok((gx, gw))
            }
            let (gx, gw) = if x.device() == Device::Cpu {
                with_real(
                    x.dtype(),
                    || bwd::<f32>(&x, &w, &gy, (m, k, n)),
                    || bwd::<f64>(&x, &w, &gy, (m, k, n)),
                )?
            } else {
                // gx = gy·W, gW = gyᵀ·x
                let gx = x
                    .requires_grad()
                    .then(|| gx_gemm(&gy, &w, (m, k, n)).run(x.shape().clone()))
                    .transpose()?;
                let gw = w
                    .requires_grad()
                    .then(|| gw_gemm(&gy, &x, (m, k, n)).run([n, k]))
                    .transpose()?;
                (gx, gw)
            };
            if let Some(b) = &bias
                && b.requires_grad()
            {
                g.accumulate(b, bias_grad(&gy, n)?)?;
            }
            if let Some(gx) = gx {
                g.accumulate(&x, gx)?;
            }
            if let Some(gw) = gw {
                g.accumulate(&w, gw)?;
            }
            Ok(())
        });
    }
    Ok(y.with_tape(tape))
}

/// The device GEMM of [`linear`]'s forward `y = x·Wᵀ` for `x [m, k]` and the first `n`
/// rows of `w [≥ n, k]` (all of them for `linear`; [`linear_rows`] takes fewer).
pub(crate) fn fwd_gemm<'a>(
    x: &'a Tensor,
    w: &'a Tensor,
    (m, k, n): (usize, usize, usize),
) -> Gemm<'a> {
    Gemm::new(m, n, k, Operand::rows(x, k), Operand::transposed(w, k))
}

/// The device GEMM of [`linear`]'s input gradient `gx = gy·W` for `gy [m, n]` and the
/// first `n` rows of `w [≥ n, k]`.
pub(crate) fn gx_gemm<'a>(
    gy: &'a Tensor,
    w: &'a Tensor,
    (m, k, n): (usize, usize, usize),
) -> Gemm<'a> {
    Gemm::new(m, k, n, Operand::rows(gy, n), Operand::rows(w, k))
}

/// The device GEMM of [`linear`]'s weight gradient `gW = gyᵀ·x` (`[n, k]`) for `gy [m, n]`
/// and `x [m, k]`.
pub(crate) fn gw_gemm<'a>(
    gy: &'a Tensor,
    x: &'a Tensor,
    (m, k, n): (usize, usize, usize),
) -> Gemm<'a> {
    Gemm::new(n, k, m, Operand::transposed(gy, n), Operand::rows(x, k))
}

/// [`linear`] without bias over the first `rows` rows of `w [R, K]` only: `x·W[..rows]ᵀ`
/// for `x [.., K]`, output `[.., rows]`. The LM head over a padded vocabulary (GPT-2's
/// `wte [Vp, C]` with `Vp − V` zero rows that no logit of the model's output comes from):
/// the `[N, V]` logits straight from the GEMM, with no `[N, Vp]` buffer and no copy.
///
/// Backward: `gx = gy·W[..rows]`; `gW` has `w`'s shape `[R, K]`, with `gyᵀ·x` in its
/// first `rows` rows and exactly 0 in the others. With `rows = R` it is `linear(x, w,
/// None)`.
///
/// Errors: those of [`linear`]; `rows` of 0 or more than `R` (shape).
pub(crate) fn linear_rows(x: &Tensor, w: &Tensor, rows: usize) -> Result<Tensor> {
    const OP: &str = "linear_rows";
    let (r, k2) = w.shape().dims2(OP)?;
    if rows == r {
        return linear(x, w, None);
    }
    let (m, k) = x.shape().as_rows(OP)?;
    if k != k2 || rows == 0 || rows > r {
        return Err(Error::shape(
            OP,
            format!(
                "x {} with the first {rows} rows of weight {}",
                x.shape(),
                w.shape()
            ),
        ));
    }
    same_dtype(OP, &[x, w])?;
    same_device(OP, &[x, w])?;
    let tape = Tape::of(OP, &[x, w])?;
    let n = rows;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;
    fn fwd<T: Real>(
        x: &Tensor,
        w: &Tensor,
        (m, k, n): (usize, usize, usize),
        dims: Vec<usize>,
    ) -> Result<Tensor> {
        let (xv, wv) = (x.cpu_read::<T>(OP)?, w.cpu_read::<T>(OP)?);
        let mut y = crate::storage::pool::scratch::<T>(m * n);
        cpu::matmul(
            &mut y,
            false,
            &xv,
            false,
            &wv[..n * k],
            true,
            (m, k, n),
            T::one(),
        )?;
        output(y, dims, x.dtype())
    }
    let y = if x.device() == Device::Cpu {
        with_real(
            x.dtype(),
            || fwd::<f32>(x, w, (m, k, n), out_dims.clone()),
            || fwd::<f64>(x, w, (m, k, n), out_dims.clone()),
        )?
    } else {
        fwd_gemm(x, w, (m, k, n)).run(out_dims)?
    };
    if let Some(tape) = &tape {
        let (x, w, yid) = (x.clone(), w.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            fn bwd<T: Real>(
                x: &Tensor,
                w: &Tensor,
                gy: &Tensor,
                (m, k, n, r): (usize, usize, usize, usize),
            ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                let gv = gy.cpu_read::<T>(OP)?;
                let wv = w.cpu_read::<T>(OP)?;
                let gx = if x.requires_grad() {
                    let mut gx = crate::storage::pool::scratch::<T>(m * k);
                    cpu::matmul(
                        &mut gx,
                        false,
                        &gv,
                        false,
                        &wv[..n * k],
                        false,
                        (m, n, k),
                        T::one(),
                    )?;
                    Some(output(gx, x.shape().clone(), x.dtype())?)
                } else {
                    None
                };
                let gw = if w.requires_grad() {
                    let xv = x.cpu_read::<T>(OP)?;
                    // The rows past `n` took no part: their gradient is 0.
                    let mut gw = crate::storage::pool::zeroed::<T>(r * k);
                    cpu::matmul(
                        &mut gw[..n * k],
                        false,
                        &gv,
                        true,
                        &xv,
                        false,
                        (n, m, k),
                        T::one(),
                    )?;
                    Some(output(gw, [r, k], w.dtype())?)
                } else {
                    None
                };
                Ok((gx, gw))
            }
            let (gx, gw) = if x.device() == Device::Cpu {
                with_real(
                    x.dtype(),
                    || bwd::<f32>(&x, &w, &gy, (m, k, n, r)),
                    || bwd::<f64>(&x, &w, &gy, (m, k, n, r)),
                )?
            } else {
                let gx = x
                    .requires_grad()
                    .then(|| gx_gemm(&gy, &w, (m, k, n)).run(x.shape().clone()))
                    .transpose()?;
                let gw = w
                    .requires_grad()
                    .then(|| gw_gemm(&gy, &x, (m, k, n)).run_zero_padded([r, k]))
                    .transpose()?;
                (gx, gw)
            };
            if let Some(gx) = gx {
                g.accumulate(&x, gx)?;
            }
            if let Some(gw) = gw {
                g.accumulate(&w, gw)?;
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

    #[test]
    fn matmul_and_linear_match_naive_products() {
        let mut r = rng("matmul_naive");
        let (m, k, n) = (7, 65, 13);
        let a = rand_tensor(&mut r, [m, k], -1.0, 1.0);
        let w = rand_tensor(&mut r, [n, k], -1.0, 1.0);
        let b = rand_tensor(&mut r, [n], -1.0, 1.0);
        let (av, wv, bv) = (
            a.to_vec_f64().unwrap(),
            w.to_vec_f64().unwrap(),
            b.to_vec_f64().unwrap(),
        );
        let want: Vec<f64> = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                bv[j] + (0..k).map(|p| av[i * k + p] * wv[j * k + p]).sum::<f64>()
            })
            .collect();
        let y = linear(&a, &w, Some(&b)).unwrap();
        assert_close("linear", &y.to_vec_f64().unwrap(), &want, 1e-14);
        // matmul with wᵀ given explicitly is the same product without the bias
        let wt: Vec<f64> = (0..k * n).map(|pj| wv[(pj % n) * k + pj / n]).collect();
        let wt = Tensor::from_vec(wt, [k, n], &Device::Cpu).unwrap();
        let y2 = matmul(&a, &wt).unwrap().to_vec_f64().unwrap();
        let want2: Vec<f64> = want
            .iter()
            .enumerate()
            .map(|(ij, v)| v - bv[ij % n])
            .collect();
        assert_close("matmul", &y2, &want2, 1e-14);
    }

    #[test]
    fn matmul_backward_matches_finite_differences() {
        let mut r = rng("matmul_fd");
        let a = rand_tensor(&mut r, [5, 9], -1.0, 1.0);
        let b = rand_tensor(&mut r, [9, 4], -1.0, 1.0);
        check_grads("matmul", &[a.clone(), b], |t| matmul(&t[0], &t[1]), 1e-7);
        let x = rand_tensor(&mut r, [2, 3, 9], -1.0, 1.0);
        let w = rand_tensor(&mut r, [6, 9], -1.0, 1.0);
        let bias = rand_tensor(&mut r, [6], -1.0, 1.0);
        check_grads(
            "linear",
            &[x, w, bias],
            |t| linear(&t[0], &t[1], Some(&t[2])),
            1e-7,
        );
    }

    /// `matmul` and `linear` (forward and every gradient) on `device` against the f64 CPU
    /// reference, from the same rounded inputs, in f32, bf16 and f16.
    fn products_and_gradients_track_the_f64_reference(device: &Device) {
        let mut r = rng("matmul_device");
        let (m, k, n) = (65, 33, 70);
        let host = [
            rand_tensor(&mut r, [m, k], -1.0, 1.0),
            rand_tensor(&mut r, [k, n], -1.0, 1.0),
            rand_tensor(&mut r, [n, k], -1.0, 1.0),
            rand_tensor(&mut r, [n], -1.0, 1.0),
            rand_tensor(&mut r, [m, n], -1.0, 1.0),
        ];
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let tol = match dt {
                DType::F32 => 1e-5,
                DType::BF16 => 1e-2,
                _ => 2e-3,
            };
            let run = |dtype: DType, dev: &Device| -> Vec<Vec<f64>> {
                let t: Vec<Tensor> = host
                    .iter()
                    .map(|h| {
                        let v = Tensor::from_vec_as(
                            h.to_vec_f64().unwrap(),
                            h.shape().clone(),
                            dt,
                            &Device::Cpu,
                        )
                        .unwrap()
                        .to_vec_f64()
                        .unwrap();
                        Tensor::from_vec_as(v, h.shape().clone(), dtype, dev).unwrap()
                    })
                    .collect();
                let tape = crate::Tape::new();
                let (a, b, w, bias) = (
                    t[0].track(&tape),
                    t[1].track(&tape),
                    t[2].track(&tape),
                    t[3].track(&tape),
                );
                let y1 = matmul(&a, &b).unwrap();
                let y2 = linear(&a, &w, Some(&bias)).unwrap();
                let g1 = tape.backward_with(&y1, t[4].clone()).unwrap();
                let tape2 = crate::Tape::new();
                let (a2, w2, bias2) = (t[0].track(&tape2), t[2].track(&tape2), t[3].track(&tape2));
                let y2b = linear(&a2, &w2, Some(&bias2)).unwrap();
                let g2 = tape2.backward_with(&y2b, t[4].clone()).unwrap();
                vec![
                    y1.to_vec_f64().unwrap(),
                    y2.to_vec_f64().unwrap(),
                    g1.get(&a).unwrap().to_vec_f64().unwrap(),
                    g1.get(&b).unwrap().to_vec_f64().unwrap(),
                    g2.get(&a2).unwrap().to_vec_f64().unwrap(),
                    g2.get(&w2).unwrap().to_vec_f64().unwrap(),
                    g2.get(&bias2).unwrap().to_vec_f64().unwrap(),
                ]
            };
            let want = run(DType::F64, &Device::Cpu);
            let got = run(dt, device);
            let names = [
                "matmul",
                "linear",
                "matmul ga",
                "matmul gb",
                "linear gx",
                "linear gW",
                "linear gb",
            ];
            for ((name, g), w) in names.iter().zip(&got).zip(&want) {
                assert_close(&format!("{device} {dt} {name}"), g, w, tol);
            }
        }
    }
    crate::test_device!(
        on_every_backend,
        products_and_gradients_track_the_f64_reference
    );

    #[test]
    fn linear_rows_backward_matches_finite_differences() {
        let mut r = rng("linear_rows_fd");
        let x = rand_tensor(&mut r, [2, 3, 9], -1.0, 1.0);
        let w = rand_tensor(&mut r, [8, 9], -1.0, 1.0);
        check_grads(
            "linear_rows",
            &[x, w],
            |t| linear_rows(&t[0], &t[1], 5),
            1e-7,
        );
    }

    /// `linear_rows` is `linear` of the weight's first rows on every backend, forward and
    /// gradients, against the f64 CPU reference (from the same rounded inputs); the other
    /// rows, filled with garbage, change nothing and get a gradient of exactly 0.
    fn linear_rows_is_linear_of_the_first_rows(device: &Device) {
        let mut r = rng("linear_rows");
        let (m, k, rows, total) = (37, 24, 61, 64);
        let x = rand_tensor(&mut r, [m, k], -1.0, 1.0);
        let w = rand_tensor(&mut r, [total, k], -1.0, 1.0);
        let gy = rand_tensor(&mut r, [m, rows], -1.0, 1.0);
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let name = format!("{device} {dt}");
            let round = |t: &Tensor| {
                Tensor::from_vec_as(t.to_vec_f64().unwrap(), t.shape().clone(), dt, &Device::Cpu)
                    .unwrap()
                    .to_vec_f64()
                    .unwrap()
            };
            let (xv, mut wv, gv) = (round(&x), round(&w), round(&gy));
            // Garbage in the rows past `rows`: huge, so any use of them shows.
            for (i, v) in wv[rows * k..].iter_mut().enumerate() {
                *v = if i % 2 == 0 { 3e4 } else { -3e4 };
            }
            let on = |v: &[f64], dims: &[usize], dtype, dev: &Device| {
                Tensor::from_vec_as(v.to_vec(), dims.to_vec(), dtype, dev).unwrap()
            };
            // The reference: linear of the narrowed weight, in f64 on the CPU.
            let tape = crate::Tape::new();
            let (xr, wr) = (
                on(&xv, &[m, k], DType::F64, &Device::Cpu).track(&tape),
                on(&wv[..rows * k], &[rows, k], DType::F64, &Device::Cpu).track(&tape),
            );
            let yr = linear(&xr, &wr, None).unwrap();
            let gr = tape
                .backward_with(&yr, on(&gv, &[m, rows], DType::F64, &Device::Cpu))
                .unwrap();
            let tape = crate::Tape::new();
            let (xd, wd) = (
                on(&xv, &[m, k], dt, device).track(&tape),
                on(&wv, &[total, k], dt, device).track(&tape),
            );
            let y = linear_rows(&xd, &wd, rows).unwrap();
            assert_eq!(y.dims(), &[m, rows], "{name}");
            let gd = tape
                .backward_with(&y, on(&gv, &[m, rows], dt, device))
                .unwrap();
            let tol = crate::testing::rel_l2_tolerance(dt);
            let f = |t: &Tensor| t.to_vec_f64().unwrap();
            assert_close(&format!("{name} y"), &f(&y), &f(&yr), tol);
            assert_close(
                &format!("{name} gx"),
                &f(gd.get(&xd).unwrap()),
                &f(gr.get(&xr).unwrap()),
                tol,
            );
            let gw = f(gd.get(&wd).unwrap());
            assert_eq!(gw.len(), total * k, "{name}: gW has w's shape");
            assert_close(
                &format!("{name} gW"),
                &gw[..rows * k],
                &f(gr.get(&wr).unwrap()),
                tol,
            );
            assert!(
                gw[rows * k..].iter().all(|g| g.to_bits() == 0),
                "{name}: the unused rows' gradient is not +0"
            );
        }
    }
    crate::test_device!(
        rows_on_every_backend,
        linear_rows_is_linear_of_the_first_rows
    );

    #[test]
    fn linear_rows_of_every_row_is_linear_and_bad_rows_are_errors() {
        let mut r = rng("linear_rows_all");
        let x = rand_tensor(&mut r, [3, 5], -1.0, 1.0);
        let w = rand_tensor(&mut r, [4, 5], -1.0, 1.0);
        assert_eq!(
            linear_rows(&x, &w, 4).unwrap().to_vec_f64().unwrap(),
            linear(&x, &w, None).unwrap().to_vec_f64().unwrap()
        );
        for bad in [0, 5] {
            assert!(
                matches!(linear_rows(&x, &w, bad), Err(Error::Shape { .. })),
                "{bad} rows"
            );
        }
        let w6 = rand_tensor(&mut r, [4, 6], -1.0, 1.0);
        assert!(matches!(linear_rows(&x, &w6, 2), Err(Error::Shape { .. })));
        let w32 = w.to_dtype(DType::F32).unwrap();
        assert!(matches!(linear_rows(&x, &w32, 2), Err(Error::DType { .. })));
    }

    #[test]
    fn linear_rejects_bad_shapes_and_dtypes() {
        let d = Device::Cpu;
        let x = Tensor::zeros([4, 8], DType::F32, &d).unwrap();
        let w = Tensor::zeros([3, 7], DType::F32, &d).unwrap();
        assert!(matches!(linear(&x, &w, None), Err(Error::Shape { .. })));
        let w16 = Tensor::zeros([3, 8], DType::BF16, &d).unwrap();
        assert!(matches!(linear(&x, &w16, None), Err(Error::DType { .. })));
        assert!(matches!(matmul(&x, &x), Err(Error::Shape { .. })));
    }
}
