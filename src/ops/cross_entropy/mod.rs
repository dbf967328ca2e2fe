//! Softmax cross-entropy with an ignore index, mean over the rows that count.

pub(crate) mod cpu;
pub(crate) mod cuda;
#[cfg(test)]
mod kernel_tests;

use super::{output, with_real};
use crate::tape::Tape;
use crate::{DType, Device, Error, Real, Result, Shape, Tensor};

/// Targets equal to this are ignored (PyTorch's default).
pub const IGNORE_INDEX: i32 = -100;

/// The per-row `logsumexp` of the forward, in the compute type, kept for the backward
/// (on the device, with the uploaded targets, for a device tensor).
enum Lse {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Device(cuda::Saved),
}

/// Mean softmax cross-entropy of `logits [M, V]` against `targets` (M ids, or [`IGNORE_INDEX`]).
///
/// `logits` may be any `[.., V]`, viewed as `M` rows of `V`. Returns a scalar (shape `[]`,
/// f32 — f64 for f64 logits — whatever the logits' dtype, as under PyTorch's autocast: a
/// bf16 loss would hide the training curve in its 8-bit mantissa, and an f16 loss could
/// not carry a loss scale of `2^16` into the backward): the mean over the non-ignored rows of
/// `logsumexp(row) − row[target]`, computed with max subtraction in f32 (f64 for f64
/// logits) and summed in row order. On a kernel device (`kernels/cross_entropy.cu`) the
/// same f32 math runs as fixed-order block reductions (deterministic, within rounding of
/// the CPU's result); the targets are checked on the host and uploaded, and the loss stays
/// a device scalar.
///
/// When every row is ignored the loss is 0 and so is its gradient (PyTorch returns NaN
/// there; a batch made only of padding should not poison a run).
///
/// Backward: `g·(softmax(row) − onehot(target)) / n_valid` for each non-ignored row and 0
/// for the ignored ones, where `g` is the incoming scalar gradient; the softmax comes from
/// the `logsumexp` saved by the forward. On a device the kernel reads `g` there (no copy
/// to the host) and recomputes the softmax from the saved per-row `logsumexp`.
///
/// [`cross_entropy_padded`] is the same over the first columns of wider rows (a padded
/// vocabulary).
///
/// Errors: a scalar `logits` or `V = 0`, or `targets.len() != M` (shape); a target outside
/// `0..V` that is not [`IGNORE_INDEX`] (invalid argument, naming its row and value).
pub fn cross_entropy(logits: &Tensor, targets: &[i32]) -> Result<Tensor> {
    let (_, v) = logits.shape().as_rows("cross_entropy")?;
    forward("cross_entropy", logits, targets, v)
}

/// [`cross_entropy`] over the first `classes` columns of `logits [.., Vp]`: the columns
/// `classes..Vp` are padding (GPT-2's vocabulary of 50257 padded to 50304, a multiple of
/// 64, so that the LM head's GEMMs see 16-byte-aligned rows). They never enter the max,
/// the sum or the loss — whatever they hold, NaN included — and their gradient is written
/// as exactly 0 (on every row; an ignored row's gradient is 0 throughout). The loss and
/// the gradient's first `classes` columns equal [`cross_entropy`]'s of the unpadded
/// `[.., classes]` logits (the same operations in the same order on the CPU; on a device
/// the kernels' fixed-order reductions over a differently aligned row may round
/// differently in the last bits). The gradient has the logits' padded shape.
///
/// ```
/// use lorafuse::{ops, Device, Tensor};
/// let d = Device::Cpu;
/// // Two classes padded to four columns; the padding holds garbage.
/// let padded = Tensor::from_vec(vec![1.0f32, 2.0, f32::NAN, 9e9, 0.5, 0.0, 7.0, -1.0], [2, 4], &d)?;
/// let plain = Tensor::from_vec(vec![1.0f32, 2.0, 0.5, 0.0], [2, 2], &d)?;
/// let a = ops::cross_entropy_padded(&padded, &[1, 0], 2)?.to_scalar()?;
/// assert_eq!(a, ops::cross_entropy(&plain, &[1, 0])?.to_scalar()?);
/// # Ok::<(), lorafuse::Error>(())
/// ```
///
/// Errors: those of [`cross_entropy`] with `classes` in place of `V` (a target must be in
/// `0..classes`); `classes` of 0 or more than the row width (shape).
pub fn cross_entropy_padded(logits: &Tensor, targets: &[i32], classes: usize) -> Result<Tensor> {
    forward("cross_entropy_padded", logits, targets, classes)
}

/// The forward of [`cross_entropy_padded`] (and of [`cross_entropy`], `v` = the row width).
fn forward(op: &'static str, logits: &Tensor, targets: &[i32], v: usize) -> Result<Tensor> {
    let cols = check_inputs(op, logits, targets, v)?;
    let tape = Tape::of(op, &[logits])?;
    fn fwd<T: Real>(
        logits: &Tensor,
        targets: &[i32],
        cols: Cols,
    ) -> Result<(Tensor, Vec<T>, usize)> {
        cpu_loss(
            &logits.cpu_read::<T>("cross_entropy")?,
            logits.dtype(),
            targets,
            cols,
        )
    }
    let (y, lse, n_valid) = if logits.device() == Device::Cpu {
        with_real(
            logits.dtype(),
            || fwd::<f32>(logits, targets, cols).map(|(y, l, n)| (y, Lse::F32(l), n)),
            || fwd::<f64>(logits, targets, cols).map(|(y, l, n)| (y, Lse::F64(l), n)),
        )?
    } else {
        let n = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let (y, saved) = cuda::forward(logits, targets, cols, n)?;
        (y, Lse::Device(saved), n)
    };
    if let Some(tape) = &tape {
        let (logits, targets, yid) = (logits.clone(), targets.to_vec(), y.id());
        tape.push(op, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            if !logits.requires_grad() {
                return Ok(());
            }
            // 0 when no row counts: the loss is the constant 0 then. (Host gradients only:
            // the device kernel reads gy on the device and scales by it there.)
            let scale = || -> Result<f64> {
                Ok(if n_valid == 0 {
                    0.0
                } else {
                    gy.to_scalar()? / n_valid as f64
                })
            };
            fn bwd<T: Real>(
                logits: &Tensor,
                lse: &[T],
                targets: &[i32],
                cols: Cols,
                scale: f64,
            ) -> Result<Tensor> {
                let x = logits.cpu_read::<T>("cross_entropy")?;
                output(
                    cpu::backward(&x, lse, targets, (cols.ld, cols.v), T::c(scale)),
                    logits.shape().clone(),
                    logits.dtype(),
                )
            }
            let gx = match &lse {
                Lse::F32(l) => bwd::<f32>(&logits, l, &targets, cols, scale()?)?,
                Lse::F64(l) => bwd::<f64>(&logits, l, &targets, cols, scale()?)?,
                Lse::Device(saved) => cuda::backward(&logits, &gy, saved)?,
            };
            g.accumulate(&logits, gx)
        });
    }
    Ok(y.with_tape(tape))
}

/// [`cross_entropy`] with the logits' gradient computed in the same pass, for training:
/// `seed` is the gradient the backward will start from (a one-element f32 tensor on the
/// logits' device: `1`, or the loss scale of f16 training), known before the forward. The
/// returned loss equals [`cross_entropy`]'s bit for bit, and so does the gradient the
/// backward hands to the logits — but it is computed now (`kernels/cross_entropy.cu`'s
/// fused kernel on a device: one DRAM pass over the logits fewer). The op consumes the
/// logits: on a device, when no other handle shares their storage, the gradient is written
/// over them in place, so the step holds one `[M, V]` buffer at the loss instead of two (at
/// GPT-2's vocabulary the largest activations of the step: 824 MB each for bf16, 8×1024
/// tokens of 50304 padded columns). A logits tensor still shared (a clone kept by the
/// caller) is left intact and the gradient gets its own buffer.
///
/// The backward must be seeded with this very tensor: `tape.backward_with(&loss, seed)`
/// (a clone shares its storage and counts as the same); another seed is an error, since
/// the gradient was computed for this one. Without a tape, or for logits that need no
/// gradient, it is [`cross_entropy`]. [`cross_entropy_fused_padded`] is the same over the
/// first columns of padded rows.
///
/// ```
/// use lorafuse::{ops, Device, Tape, Tensor};
/// let d = Device::Cpu;
/// let tape = Tape::new();
/// let logits = Tensor::from_vec(vec![1.0f32, 2.0, 0.5, 0.0], [2, 2], &d)?.track(&tape);
/// let seed = Tensor::full(1.0, [], lorafuse::DType::F32, &d)?;
/// let plain = ops::cross_entropy(&logits, &[1, 0])?.to_scalar()?;
/// let loss = ops::cross_entropy_fused(logits.clone(), &[1, 0], &seed)?;
/// assert_eq!(loss.to_scalar()?, plain);
/// let grads = tape.backward_with(&loss, seed)?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[2, 2]);
/// # Ok::<(), lorafuse::Error>(())
/// ```
///
/// Errors: those of [`cross_entropy`]; a `seed` that is not one f32 element on the logits'
/// device; at backward time, another seed.
pub fn cross_entropy_fused(logits: Tensor, targets: &[i32], seed: &Tensor) -> Result<Tensor> {
    let (_, v) = logits.shape().as_rows("cross_entropy_fused")?;
    fused("cross_entropy_fused", logits, targets, v, seed)
}

/// [`cross_entropy_fused`] over the first `classes` columns of `logits [.., Vp]`, the rest
/// padding, as [`cross_entropy_padded`]: the loss equals [`cross_entropy_padded`]'s bit for
/// bit and the gradient (written over the logits on a device when they are not shared) is
/// exactly 0 in the padding columns. What the trainer's loss runs on GPT-2's padded
/// vocabulary ([`crate::model::Gpt2::loss_fused`]).
///
/// Errors: those of [`cross_entropy_padded`] and [`cross_entropy_fused`].
pub fn cross_entropy_fused_padded(
    logits: Tensor,
    targets: &[i32],
    classes: usize,
    seed: &Tensor,
) -> Result<Tensor> {
    fused("cross_entropy_fused_padded", logits, targets, classes, seed)
}

/// [`cross_entropy_fused_padded`] (and [`cross_entropy_fused`], `v` = the row width).
fn fused(
    op: &'static str,
    logits: Tensor,
    targets: &[i32],
    v: usize,
    seed: &Tensor,
) -> Result<Tensor> {
    let cols = check_inputs(op, &logits, targets, v)?;
    if seed.elem_count() != 1 || seed.dtype() != DType::F32 {
        return Err(Error::invalid(format!(
            "{op}: the seed is {} {}, not one f32 element",
            seed.dtype(),
            seed.shape()
        )));
    }
    if seed.device() != logits.device() {
        return Err(Error::Device {
            op,
            lhs: logits.device(),
            rhs: seed.device(),
        });
    }
    let tape = Tape::of(op, &[&logits])?;
    let Some(tape) = tape.filter(|_| logits.requires_grad()) else {
        return forward(op, &logits, targets, v);
    };
    let xid = logits.id();
    let n_valid = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let (y, gx) = if logits.device() == Device::Cpu {
        // The same steps as the unfused forward and backward, at once.
        let scale = if n_valid == 0 {
            0.0
        } else {
            seed.to_scalar()? / n_valid as f64
        };
        fn both<T: Real>(
            logits: &Tensor,
            targets: &[i32],
            cols: Cols,
            scale: f64,
        ) -> Result<(Tensor, Tensor)> {
            let x = logits.cpu_read::<T>("cross_entropy_fused")?;
            let (loss, lse, _) = cpu_loss(&x, logits.dtype(), targets, cols)?;
            let gx = cpu::backward(&x, &lse, targets, (cols.ld, cols.v), T::c(scale));
            Ok((loss, output(gx, logits.shape().clone(), logits.dtype())?))
        }
        with_real(
            logits.dtype(),
            || both::<f32>(&logits, targets, cols, scale),
            || both::<f64>(&logits, targets, cols, scale),
        )?
    } else {
        let in_place = logits.is_unique();
        cuda::forward_fused(logits, targets, cols, n_valid, seed, in_place)?
    };
    // Only the logits' id is kept, not the logits (consumed above).
    let (seed_c, yid) = (seed.clone(), y.id());
    tape.push(op, move |g| {
        let Some(gy) = g.take_output(yid) else {
            return Ok(());
        };
        if !gy.same_storage(&seed_c) {
            return Err(Error::invalid(format!(
                "{op}: the backward was seeded with another tensor than the seed given to the forward; seed it with that tensor (tape.backward_with(&loss, seed))"
            )));
        }
        g.accumulate_id(xid, gx)
    });
    Ok(y.with_tape(Some(tape)))
}

/// The row layout of a cross-entropy call: rows of `ld` elements whose first `v` are the
/// classes (`v == ld` without padding).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cols {
    pub ld: usize,
    pub v: usize,
}

/// The CPU forward: the mean loss as a scalar tensor (f32, f64 for f64 logits of
/// `dtype`), the per-row logsumexp and the number of rows that count.
fn cpu_loss<T: Real>(
    x: &[T],
    dtype: DType,
    targets: &[i32],
    cols: Cols,
) -> Result<(Tensor, Vec<T>, usize)> {
    let lse = cpu::row_lse(x, cols.ld, cols.v);
    let (sum, n) = cpu::loss_sum(x, &lse, targets, cols.ld);
    let loss = if n == 0 {
        T::zero()
    } else {
        sum / T::c(n as f64)
    };
    let dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    Ok((output(vec![loss], Shape::from(()), dtype)?, lse, n))
}

/// Checks the shapes and targets of a cross-entropy call over the first `v` columns of
/// each row; returns the row layout.
fn check_inputs(op: &'static str, logits: &Tensor, targets: &[i32], v: usize) -> Result<Cols> {
    let (m, ld) = logits.shape().as_rows(op)?;
    if ld == 0 || v == 0 {
        return Err(Error::shape(
            op,
            format!("empty class dimension in {}", logits.shape()),
        ));
    }
    if v > ld {
        return Err(Error::shape(
            op,
            format!("{v} classes in rows of {} ({})", ld, logits.shape()),
        ));
    }
    if targets.len() != m {
        return Err(Error::shape(
            op,
            format!(
                "{} targets for logits {} ({m} rows)",
                targets.len(),
                logits.shape()
            ),
        ));
    }
    if let Some((r, &t)) = targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t != IGNORE_INDEX && !(0..v as i64).contains(&(t as i64)))
    {
        return Err(Error::invalid(format!(
            "{op}: target {t} at row {r} is outside 0..{v} and is not the ignore index {IGNORE_INDEX}"
        )));
    }
    Ok(Cols { ld, v })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grads, rand_tensor, rng};
    use crate::{DType, Device};
    use rand::Rng;

    /// Textbook cross-entropy in f64 without max subtraction (fine for small logits).
    fn naive(x: &[f64], targets: &[i32], v: usize) -> f64 {
        let (mut s, mut n) = (0.0, 0);
        for (row, &t) in x.chunks(v).zip(targets) {
            if t == IGNORE_INDEX {
                continue;
            }
            let p = row[t as usize].exp() / row.iter().map(|x| x.exp()).sum::<f64>();
            s -= p.ln();
            n += 1;
        }
        s / n as f64
    }

    fn targets(r: &mut impl Rng, m: usize, v: usize, ignore_every: usize) -> Vec<i32> {
        (0..m)
            .map(|i| {
                if i % ignore_every == 1 {
                    IGNORE_INDEX
                } else {
                    r.random_range(0..v as i32)
                }
            })
            .collect()
    }

    #[test]
    fn cross_entropy_matches_naive_and_known_values() {
        let mut r = rng("cross_entropy_naive");
        let (m, v) = (37, 29);
        let x = rand_tensor(&mut r, [m, v], -4.0, 4.0);
        let t = targets(&mut r, m, v, 5);
        let y = cross_entropy(&x, &t).unwrap();
        assert_eq!(y.dims(), &[] as &[usize]);
        assert_eq!(y.dtype(), DType::F64);
        let want = naive(&x.to_vec_f64().unwrap(), &t, v);
        assert_close("cross_entropy", &[y.to_scalar().unwrap()], &[want], 1e-14);
        // [.., V] is viewed as rows.
        let x3 = crate::ops::reshape(&x, [1, m, v]).unwrap();
        assert_eq!(
            cross_entropy(&x3, &t).unwrap().to_scalar().unwrap(),
            y.to_scalar().unwrap()
        );
        // Uniform logits: ln V, whatever the offset; huge logits stay finite.
        let d = Device::Cpu;
        for c in [0.0, 1e4, -1e4] {
            let u = Tensor::full(c, [3, 50], DType::F64, &d).unwrap();
            let l = cross_entropy(&u, &[0, 49, 7]).unwrap().to_scalar().unwrap();
            assert!((l - 50f64.ln()).abs() < 1e-11, "{c}: {l}");
        }
        let big = Tensor::from_vec(vec![1000.0f32, 0.0, -1000.0, 0.0], [2, 2], &d).unwrap();
        // Both rows put their target 1000 below the other logit: each loss is 1000 + ln(1 + e^-1000).
        let l = cross_entropy(&big, &[1, 0]).unwrap().to_scalar().unwrap();
        assert!((l - 1000.0).abs() < 1e-3, "{l}");
    }

    #[test]
    fn cross_entropy_backward_matches_finite_differences() {
        let mut r = rng("cross_entropy_fd");
        // The check seeds the scalar loss with a random value: the seed's scale is tested too.
        let x = rand_tensor(&mut r, [2, 3, 6], -3.0, 3.0);
        let t = targets(&mut r, 6, 6, 4);
        check_grads("cross_entropy", &[x], |xs| cross_entropy(&xs[0], &t), 1e-7);
        // Few rows and classes keep the gradients large against the FD noise (~1e-10·|L|).
        let x = rand_tensor(&mut r, [4, 6], -3.0, 3.0);
        let t = targets(&mut r, 4, 6, 3);
        check_grads(
            "cross_entropy∘gelu",
            &[x],
            |xs| cross_entropy(&crate::ops::gelu(&xs[0])?, &t),
            1e-7,
        );
    }

    #[test]
    fn cross_entropy_gradient_is_softmax_minus_onehot_over_n() {
        let mut r = rng("cross_entropy_grad");
        let (m, v) = (700, 97); // several rayon tasks
        let x = rand_tensor(&mut r, [m, v], -4.0, 4.0);
        let t = targets(&mut r, m, v, 7);
        let tape = Tape::new();
        let xt = x.track(&tape);
        let y = cross_entropy(&xt, &t).unwrap();
        let g = tape.backward_scaled(&y, 3.0).unwrap();
        let got = g.get(&xt).unwrap().to_vec_f64().unwrap();
        let xv = x.to_vec_f64().unwrap();
        let n = t.iter().filter(|&&t| t != IGNORE_INDEX).count() as f64;
        let mut want = vec![0.0; m * v];
        for (i, (row, &ti)) in xv.chunks(v).zip(&t).enumerate() {
            if ti == IGNORE_INDEX {
                continue;
            }
            let z: f64 = row.iter().map(|x| x.exp()).sum();
            for j in 0..v {
                let onehot = if j == ti as usize { 1.0 } else { 0.0 };
                want[i * v + j] = 3.0 * (row[j].exp() / z - onehot) / n;
            }
        }
        assert_close("cross_entropy grad", &got, &want, 1e-13);
        for (row, &ti) in got.chunks(v).zip(&t) {
            if ti == IGNORE_INDEX {
                assert!(row.iter().all(|&g| g == 0.0));
            }
        }
        // Deterministic: a second run is bit-identical.
        let tape = Tape::new();
        let x32 = x.to_dtype(DType::F32).unwrap().track(&tape);
        let y1 = cross_entropy(&x32, &t).unwrap();
        let g1 = tape
            .backward(&y1)
            .unwrap()
            .get(&x32)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        let tape = Tape::new();
        let x32b = x32.track(&tape);
        let y2 = cross_entropy(&x32b, &t).unwrap();
        let g2 = tape
            .backward(&y2)
            .unwrap()
            .get(&x32b)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        assert_eq!(
            y1.to_scalar().unwrap().to_bits(),
            y2.to_scalar().unwrap().to_bits()
        );
        assert_eq!(g1, g2);
    }

    #[test]
    fn cross_entropy_with_every_row_ignored_is_zero_with_zero_gradient() {
        let mut r = rng("cross_entropy_all_ignored");
        let tape = Tape::new();
        let x = rand_tensor(&mut r, [3, 5], -1.0, 1.0).track(&tape);
        let y = cross_entropy(&x, &[IGNORE_INDEX; 3]).unwrap();
        assert_eq!(y.to_scalar().unwrap(), 0.0);
        let g = tape.backward(&y).unwrap();
        assert!(
            g.get(&x)
                .unwrap()
                .to_vec_f64()
                .unwrap()
                .iter()
                .all(|&g| g == 0.0)
        );
    }

    #[test]
    fn cross_entropy_f32_and_bf16_logits_are_close_to_f64() {
        let mut r = rng("cross_entropy_lowp");
        let (m, v) = (16, 64);
        let x = rand_tensor(&mut r, [m, v], -5.0, 5.0);
        let t = targets(&mut r, m, v, 6);
        // The loss is f32 for bf16 logits too: only f32 rounding separates it from f64's.
        for (dt, tol_y, tol_g) in [(DType::F32, 1e-6, 1e-6), (DType::BF16, 1e-6, 8e-3)] {
            let xd = x.to_dtype(dt).unwrap();
            let x64 = xd.to_dtype(DType::F64).unwrap();
            let run = |x: &Tensor| {
                let tape = Tape::new();
                let xt = x.track(&tape);
                let y = cross_entropy(&xt, &t).unwrap();
                let g = tape.backward(&y).unwrap().get(&xt).unwrap().clone();
                (y, g)
            };
            let ((y, g), (y64, g64)) = (run(&xd), run(&x64));
            assert_eq!((y.dtype(), g.dtype()), (DType::F32, dt));
            assert_close(
                &format!("cross_entropy {dt}"),
                &[y.to_scalar().unwrap()],
                &[y64.to_scalar().unwrap()],
                tol_y,
            );
            assert_close(
                &format!("cross_entropy grad {dt}"),
                &g.to_vec_f64().unwrap(),
                &g64.to_vec_f64().unwrap(),
                tol_g,
            );
        }
    }

    #[test]
    fn cross_entropy_rejects_bad_inputs() {
        let d = Device::Cpu;
        let x = Tensor::zeros([4, 8], DType::F32, &d).unwrap();
        assert!(matches!(
            cross_entropy(&x, &[0, 1, 2]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            cross_entropy(&x, &[0, 1, 2, 3, 4]),
            Err(Error::Shape { .. })
        ));
        for bad in [8, -1, -101, i32::MAX, i32::MIN] {
            match cross_entropy(&x, &[0, IGNORE_INDEX, bad, 3]) {
                Err(Error::InvalidArgument(msg)) => {
                    assert!(msg.contains(&format!("target {bad} at row 2")), "{msg}")
                }
                other => panic!("target {bad}: {other:?}"),
            }
        }
        let scalar = Tensor::zeros((), DType::F32, &d).unwrap();
        assert!(matches!(
            cross_entropy(&scalar, &[0]),
            Err(Error::Shape { .. })
        ));
        let empty = Tensor::zeros([2, 0], DType::F32, &d).unwrap();
        assert!(matches!(
            cross_entropy(&empty, &[0, 0]),
            Err(Error::Shape { .. })
        ));
    }
}
