//! Token + position embedding (GPT-2's `wte` and `wpe`).

pub(crate) mod cpu;
pub(crate) mod cuda;
#[cfg(test)]
mod kernel_tests;

use super::{output, with_real};
use crate::tape::Tape;
use crate::tensor::{same_device, same_dtype};
use crate::{DType, Device, Error, Real, Result, Tensor};

const OP: &str = "embedding";

/// `out[b, t] = wte[tokens[b·T + t]] + wpe[t]`: `tokens` has `batch·seq` ids; returns `[batch, seq, C]`.
///
/// `wte [V, C]` and `wpe [P, C]` share one dtype (the output's) and `seq ≤ P`. The sums are
/// taken in f32 (f64 for f64 tables) and rounded once.
///
/// Backward: `gwte` is the scatter-add of the output gradient rows by token, `gwpe[t]` their
/// sum over the batch (zero past `seq`). Both are deterministic: every element is summed in
/// token order by one thread. A `wte` tied with the LM head (also used by
/// [`linear`](crate::ops::linear) for the logits) gets both contributions through the tape.
///
/// Errors: `tokens.len() != batch·seq`, tables not rank 2, different widths, `C = 0` or
/// `seq > P` (shape); mixed dtypes or devices; a token `≥ V` (invalid argument, naming
/// its position and value).
pub fn embedding(
    tokens: &[u32],
    batch: usize,
    seq: usize,
    wte: &Tensor,
    wpe: &Tensor,
) -> Result<Tensor> {
    let (c, dtype) = check_inputs(tokens, batch, seq, 0, wte, wpe)?;
    let tape = Tape::of(OP, &[wte, wpe])?;
    fn fwd<T: Real>(
        tokens: &[u32],
        (batch, seq, c): (usize, usize, usize),
        wte: &Tensor,
        wpe: &Tensor,
    ) -> Result<Tensor> {
        let (e, p) = (wte.cpu_read::<T>(OP)?, wpe.cpu_read::<T>(OP)?);
        output(
            cpu::forward(tokens, seq, &e, &p, c),
            [batch, seq, c],
            wte.dtype(),
        )
    }
    let dims = (batch, seq, c);
    let y = if wte.device() == Device::Cpu {
        with_real(
            dtype,
            || fwd::<f32>(tokens, dims, wte, wpe),
            || fwd::<f64>(tokens, dims, wte, wpe),
        )?
    } else {
        cuda::forward(tokens, dims, 0, wte, wpe)?
    };
    if let Some(tape) = &tape {
        let (tokens, wte, wpe, yid) = (tokens.to_vec(), wte.clone(), wpe.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            fn bwd<T: Real>(
                tokens: &[u32],
                (batch, seq, c): (usize, usize, usize),
                wte: &Tensor,
                wpe: &Tensor,
                gy: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                let gv = gy.cpu_read::<T>(OP)?;
                let gwte = if wte.requires_grad() {
                    let v = wte.dims()[0];
                    Some(output(
                        cpu::grad_wte(tokens, &gv, v, c),
                        wte.shape().clone(),
                        wte.dtype(),
                    )?)
                } else {
                    None
                };
                let gwpe = if wpe.requires_grad() {
                    let p = wpe.dims()[0];
                    Some(output(
                        cpu::grad_wpe(&gv, batch, seq, p, c),
                        wpe.shape().clone(),
                        wpe.dtype(),
                    )?)
                } else {
                    None
                };
                Ok((gwte, gwpe))
            }
            let (gwte, gwpe) = if wte.device() == Device::Cpu {
                with_real(
                    wte.dtype(),
                    || bwd::<f32>(&tokens, dims, &wte, &wpe, &gy),
                    || bwd::<f64>(&tokens, dims, &wte, &wpe, &gy),
                )?
            } else {
                cuda::backward(&tokens, dims, &wte, &wpe, &gy)?
            };
            if let Some(gwte) = gwte {
                g.accumulate(&wte, gwte)?;
            }
            if let Some(gwpe) = gwpe {
                g.accumulate(&wpe, gwpe)?;
            }
            Ok(())
        });
    }
    Ok(y.with_tape(tape))
}

/// [`embedding`] at positions `pos0..pos0 + seq`: `out[b, t] = wte[tokens[b·T + t]] +
/// wpe[pos0 + t]`, for incremental decoding (the new tokens of a sequence whose first
/// `pos0` positions are in a key/value cache). Inference only: it records no backward.
///
/// Errors: those of [`embedding`], with `pos0 + seq ≤ P` in place of `seq ≤ P`; a table
/// recorded on a tape (invalid argument).
pub fn embedding_at(
    tokens: &[u32],
    batch: usize,
    seq: usize,
    pos0: usize,
    wte: &Tensor,
    wpe: &Tensor,
) -> Result<Tensor> {
    let (c, dtype) = check_inputs(tokens, batch, seq, pos0, wte, wpe)?;
    if wte.requires_grad() || wpe.requires_grad() {
        return Err(Error::invalid(format!(
            "{OP}: embedding_at is inference only (it records no backward); pass untracked tables"
        )));
    }
    if wte.device() != Device::Cpu {
        return cuda::forward(tokens, (batch, seq, c), pos0, wte, wpe);
    }
    fn fwd<T: Real>(
        tokens: &[u32],
        (batch, seq, c, pos0): (usize, usize, usize, usize),
        wte: &Tensor,
        wpe: &Tensor,
    ) -> Result<Tensor> {
        let (e, p) = (wte.cpu_read::<T>(OP)?, wpe.cpu_read::<T>(OP)?);
        output(
            cpu::forward(tokens, seq, &e, &p[pos0 * c..], c),
            [batch, seq, c],
            wte.dtype(),
        )
    }
    let dims = (batch, seq, c, pos0);
    with_real(
        dtype,
        || fwd::<f32>(tokens, dims, wte, wpe),
        || fwd::<f64>(tokens, dims, wte, wpe),
    )
}

/// The checks of [`embedding`] and [`embedding_at`] (positions `pos0..pos0 + seq`):
/// returns `C` and the tables' dtype.
fn check_inputs(
    tokens: &[u32],
    batch: usize,
    seq: usize,
    pos0: usize,
    wte: &Tensor,
    wpe: &Tensor,
) -> Result<(usize, DType)> {
    let (v, c) = wte.shape().dims2(OP)?;
    let (p, c2) = wpe.shape().dims2(OP)?;
    if c != c2 || c == 0 {
        return Err(Error::shape(
            OP,
            format!("wte {} with wpe {}", wte.shape(), wpe.shape()),
        ));
    }
    if batch.checked_mul(seq) != Some(tokens.len()) {
        return Err(Error::shape(
            OP,
            format!("{} tokens for batch {batch} × seq {seq}", tokens.len()),
        ));
    }
    if pos0.checked_add(seq).is_none_or(|end| end > p) {
        let at = if pos0 > 0 {
            format!(" at position {pos0}")
        } else {
            String::new()
        };
        return Err(Error::shape(
            OP,
            format!(
                "seq {seq}{at} exceeds the {p} positions of wpe {}",
                wpe.shape()
            ),
        ));
    }
    if let Some((i, &tok)) = tokens.iter().enumerate().find(|&(_, &t)| t as usize >= v) {
        return Err(Error::invalid(format!(
            "{OP}: token {tok} at position {i} is outside the vocabulary of {v}"
        )));
    }
    let dtype = same_dtype(OP, &[wte, wpe])?;
    same_device(OP, &[wte, wpe])?;
    Ok((c, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor, rng};
    use crate::{DType, Device};
    use rand::Rng;

    fn tokens(r: &mut impl Rng, n: usize, v: usize) -> Vec<u32> {
        (0..n).map(|_| r.random_range(0..v as u32)).collect()
    }

    #[test]
    fn embedding_matches_naive_lookup() {
        let mut r = rng("embedding_naive");
        let (b, t, v, p, c) = (3, 5, 11, 8, 6);
        let wte = rand_tensor(&mut r, [v, c], -1.0, 1.0);
        let wpe = rand_tensor(&mut r, [p, c], -1.0, 1.0);
        let toks = tokens(&mut r, b * t, v);
        let y = embedding(&toks, b, t, &wte, &wpe).unwrap();
        assert_eq!(y.dims(), &[b, t, c]);
        assert_eq!(y.dtype(), DType::F64);
        let (e, pe) = (wte.to_vec_f64().unwrap(), wpe.to_vec_f64().unwrap());
        let mut want = vec![];
        for bi in 0..b {
            for ti in 0..t {
                let tok = toks[bi * t + ti] as usize;
                for j in 0..c {
                    want.push(e[tok * c + j] + pe[ti * c + j]);
                }
            }
        }
        assert_eq!(y.to_vec_f64().unwrap(), want);
    }

    #[test]
    fn embedding_backward_matches_finite_differences() {
        let mut r = rng("embedding_fd");
        let (b, t, v, p, c) = (2, 4, 6, 5, 5);
        let wte = rand_tensor(&mut r, [v, c], -1.0, 1.0);
        let wpe = rand_tensor(&mut r, [p, c], -1.0, 1.0);
        // Repeated tokens exercise the scatter-add; token 5 never appears (zero gradient row).
        let toks = vec![0, 3, 3, 1, 2, 3, 0, 4];
        check_grads(
            "embedding",
            &[wte.clone(), wpe.clone()],
            |w| embedding(&toks, b, t, &w[0], &w[1]),
            1e-7,
        );
        // Tied with the LM head: logits = embed(tokens)·wteᵀ, through gelu so the
        // gradient is not linear in wte; both uses of wte contribute.
        check_grads(
            "embedding tied with lm head",
            &[wte, wpe],
            |w| {
                crate::ops::linear(
                    &crate::ops::gelu(&embedding(&toks, b, t, &w[0], &w[1])?)?,
                    &w[0],
                    None,
                )
            },
            1e-7,
        );
    }

    #[test]
    fn embedding_gradients_are_deterministic_scatter_adds() {
        let mut r = rng("embedding_grad");
        // Enough rows for several rayon tasks in both gradients; few distinct tokens.
        let (b, t, v, p, c) = (8, 300, 50, 320, 96);
        let wte = rand_tensor(&mut r, [v, c], -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let wpe = rand_tensor(&mut r, [p, c], -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let toks = tokens(&mut r, b * t, v - 3); // the last 3 rows get no gradient
        let seed = rand_tensor(&mut r, [b, t, c], -1.0, 1.0)
            .to_dtype(DType::F32)
            .unwrap();
        let run = || {
            let tape = Tape::new();
            let (e, pe) = (wte.track(&tape), wpe.track(&tape));
            let y = embedding(&toks, b, t, &e, &pe).unwrap();
            let g = tape.backward_with(&y, seed.clone()).unwrap();
            (
                g.get(&e).unwrap().to_vec_f32().unwrap(),
                g.get(&pe).unwrap().to_vec_f32().unwrap(),
            )
        };
        let (ge, gp) = run();
        assert_eq!((ge.clone(), gp.clone()), run());
        // Bit-identical to serial f32 loops in token order.
        let sv = seed.to_vec_f32().unwrap();
        let (mut we, mut wp) = (vec![0.0f32; v * c], vec![0.0f32; p * c]);
        for (i, &tok) in toks.iter().enumerate() {
            for j in 0..c {
                we[tok as usize * c + j] += sv[i * c + j];
                wp[(i % t) * c + j] += sv[i * c + j];
            }
        }
        assert_eq!(ge, we);
        assert_eq!(gp, wp);
        assert!(
            ge[(v - 3) * c..]
                .iter()
                .chain(&gp[t * c..])
                .all(|&g| g == 0.0)
        );
    }

    #[test]
    fn embedding_f32_and_bf16_tables() {
        let mut r = rng("embedding_lowp");
        let (b, t, v, p, c) = (2, 7, 13, 9, 16);
        let wte = rand_tensor(&mut r, [v, c], -1.0, 1.0);
        let wpe = rand_tensor(&mut r, [p, c], -1.0, 1.0);
        let toks = tokens(&mut r, b * t, v);
        let want = embedding(&toks, b, t, &wte, &wpe)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        // Inputs and output each rounded once: within a few units of roundoff.
        for (dt, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
            let (e, pe) = (wte.to_dtype(dt).unwrap(), wpe.to_dtype(dt).unwrap());
            let tape = Tape::new();
            let (et, pt) = (e.track(&tape), pe.track(&tape));
            let y = embedding(&toks, b, t, &et, &pt).unwrap();
            assert_eq!(y.dtype(), dt);
            assert_close(
                &format!("embedding {dt}"),
                &y.to_vec_f64().unwrap(),
                &want,
                tol,
            );
            let g = tape
                .backward_with(&y, Tensor::ones_like(&y).unwrap())
                .unwrap();
            assert_eq!(g.get(&et).unwrap().dtype(), dt);
            // gwpe of an all-ones seed: b for every used position (exact in any dtype).
            let gp = g.get(&pt).unwrap().to_vec_f64().unwrap();
            assert!(
                gp.iter()
                    .enumerate()
                    .all(|(i, &x)| x == if i < t * c { b as f64 } else { 0.0 })
            );
        }
    }

    #[test]
    fn embedding_rejects_bad_inputs() {
        let d = Device::Cpu;
        let wte = Tensor::zeros([10, 4], DType::F32, &d).unwrap();
        let wpe = Tensor::zeros([6, 4], DType::F32, &d).unwrap();
        let toks = [1u32, 2, 3, 4, 5, 6];
        assert!(embedding(&toks, 2, 3, &wte, &wpe).is_ok());
        assert!(matches!(
            embedding(&toks, 2, 4, &wte, &wpe),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            embedding(&toks[..5], 1, 6, &wte, &wpe),
            Err(Error::Shape { .. })
        ));
        assert!(embedding(&toks, 1, 6, &wte, &wpe).is_ok());
        let short = Tensor::zeros([5, 4], DType::F32, &d).unwrap();
        assert!(matches!(
            embedding(&toks, 1, 6, &wte, &short),
            Err(Error::Shape { .. })
        ));
        let narrow = Tensor::zeros([6, 3], DType::F32, &d).unwrap();
        assert!(matches!(
            embedding(&toks, 2, 3, &wte, &narrow),
            Err(Error::Shape { .. })
        ));
        let flat = Tensor::zeros([40], DType::F32, &d).unwrap();
        assert!(matches!(
            embedding(&toks, 2, 3, &flat, &wpe),
            Err(Error::Shape { .. })
        ));
        let (e0, p0) = (
            Tensor::zeros([10, 0], DType::F32, &d).unwrap(),
            Tensor::zeros([6, 0], DType::F32, &d).unwrap(),
        );
        assert!(matches!(
            embedding(&toks, 2, 3, &e0, &p0),
            Err(Error::Shape { .. })
        ));
        let wpe16 = Tensor::zeros([6, 4], DType::BF16, &d).unwrap();
        assert!(matches!(
            embedding(&toks, 2, 3, &wte, &wpe16),
            Err(Error::DType { .. })
        ));
        match embedding(&[1, 2, 10, 4, 5, 6], 2, 3, &wte, &wpe) {
            Err(Error::InvalidArgument(msg)) => {
                assert!(msg.contains("token 10 at position 2"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            embedding(&[1, u32::MAX], 1, 2, &wte, &wpe),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn embedding_at_reads_the_positions_from_pos0() {
        let mut r = rng("embedding_at");
        let (b, t, v, p, c) = (2, 3, 11, 9, 5);
        let wte = rand_tensor(&mut r, [v, c], -1.0, 1.0);
        let wpe = rand_tensor(&mut r, [p, c], -1.0, 1.0);
        let toks = tokens(&mut r, b * t, v);
        for pos0 in [0, 1, 4, p - t] {
            let y = embedding_at(&toks, b, t, pos0, &wte, &wpe).unwrap();
            assert_eq!(y.dims(), &[b, t, c]);
            let (e, pe) = (wte.to_vec_f64().unwrap(), wpe.to_vec_f64().unwrap());
            let mut want = vec![];
            for bi in 0..b {
                for ti in 0..t {
                    let tok = toks[bi * t + ti] as usize;
                    for j in 0..c {
                        want.push(e[tok * c + j] + pe[(pos0 + ti) * c + j]);
                    }
                }
            }
            assert_eq!(y.to_vec_f64().unwrap(), want, "pos0 {pos0}");
        }
        // pos0 = 0 is `embedding`, bit for bit.
        let (e32, p32) = (
            wte.to_dtype(DType::BF16).unwrap(),
            wpe.to_dtype(DType::BF16).unwrap(),
        );
        assert_eq!(
            embedding_at(&toks, b, t, 0, &e32, &p32)
                .unwrap()
                .to_vec_f64()
                .unwrap(),
            embedding(&toks, b, t, &e32, &p32)
                .unwrap()
                .to_vec_f64()
                .unwrap()
        );
        // Past the positions, a bad token, a tracked table.
        match embedding_at(&toks, b, t, p - t + 1, &wte, &wpe) {
            Err(Error::Shape { msg, .. }) => {
                assert!(
                    msg.contains("seq 3 at position 7 exceeds the 9 positions"),
                    "{msg}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            embedding_at(&toks, b, t, usize::MAX, &wte, &wpe),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            embedding_at(&[0, 1, 11, 0, 0, 0], b, t, 1, &wte, &wpe),
            Err(Error::InvalidArgument(_))
        ));
        let tape = Tape::new();
        match embedding_at(&toks, b, t, 1, &wte.track(&tape), &wpe) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("inference only"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}
