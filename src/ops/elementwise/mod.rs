//! Elementwise ops: residual add, bias add, tanh-GELU, scaling, casts and reshapes.

pub(crate) mod cpu;
pub(crate) mod cuda;
#[cfg(test)]
mod kernel_tests;

use super::{output, with_real};
use crate::tape::Tape;
use crate::tensor::{same_device, same_dtype};
use crate::{DType, Device, Error, Real, Result, Shape, Tensor};

/// `a + b`, same shape and dtype (the residual add).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    Error::check_same_shape(OP, a.shape(), b.shape())?;
    let dtype = same_dtype(OP, &[a, b])?;
    same_device(OP, &[a, b])?;
    let tape = Tape::of(OP, &[a, b])?;
    fn fwd<T: Real>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (av, bv) = (a.cpu_read::<T>(OP)?, b.cpu_read::<T>(OP)?);
        output(
            cpu::zip_map(&av, &bv, |x, y| x + y),
            a.shape().clone(),
            a.dtype(),
        )
    }
    let y = if a.device() == Device::Cpu {
        with_real(dtype, || fwd::<f32>(a, b), || fwd::<f64>(a, b))?
    } else {
        cuda::add(a, b)?
    };
    if let Some(tape) = &tape {
        let (a, b, yid) = (a.clone(), b.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            g.accumulate(&a, gy.clone())?;
            g.accumulate(&b, gy)
        });
    }
    Ok(y.with_tape(tape))
}

/// `x + b` with `b` broadcast over the rows: `x [.., N]`, `b [N]`.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "bias_add";
    let (_, n) = x.shape().as_rows(OP)?;
    if b.dims() != [n] {
        return Err(Error::shape(
            OP,
            format!("bias {} for input {}", b.shape(), x.shape()),
        ));
    }
    let dtype = same_dtype(OP, &[x, b])?;
    same_device(OP, &[x, b])?;
    let tape = Tape::of(OP, &[x, b])?;
    fn fwd<T: Real>(x: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (xv, bv) = (x.cpu_read::<T>(OP)?, b.cpu_read::<T>(OP)?);
        output(cpu::bias_add(&xv, &bv), x.shape().clone(), x.dtype())
    }
    let y = if x.device() == Device::Cpu {
        with_real(dtype, || fwd::<f32>(x, b), || fwd::<f64>(x, b))?
    } else {
        cuda::bias_add(x, b)?
    };
    if let Some(tape) = &tape {
        let (x, b, yid) = (x.clone(), b.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            if b.requires_grad() {
                g.accumulate(&b, bias_grad(&gy, n)?)?;
            }
            g.accumulate(&x, gy)
        });
    }
    Ok(y.with_tape(tape))
}

/// The gradient of a bias: the column sums of `gy [rows, n]`, accumulated in the compute type.
pub(crate) fn bias_grad(gy: &Tensor, n: usize) -> Result<Tensor> {
    if gy.device() != Device::Cpu {
        return cuda::bias_grad(gy, n);
    }
    fn go<T: Real>(gy: &Tensor, n: usize) -> Result<Tensor> {
        let v = gy.cpu_read::<T>("bias_grad")?;
        output(cpu::column_sums(&v, n), [n], gy.dtype())
    }
    with_real(gy.dtype(), || go::<f32>(gy, n), || go::<f64>(gy, n))
}

/// tanh-approximated GELU (GPT-2's `gelu_new`), elementwise.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "gelu";
    let tape = Tape::of(OP, &[x])?;
    fn fwd<T: Real>(x: &Tensor) -> Result<Tensor> {
        let xv = x.cpu_read::<T>(OP)?;
        output(
            cpu::map(&xv, |v| cpu::gelu(v)),
            x.shape().clone(),
            x.dtype(),
        )
    }
    let y = if x.device() == Device::Cpu {
        with_real(x.dtype(), || fwd::<f32>(x), || fwd::<f64>(x))?
    } else {
        cuda::gelu(x)?
    };
    if let Some(tape) = &tape {
        let (x, yid) = (x.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            fn bwd<T: Real>(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
                let (xv, gv) = (x.cpu_read::<T>(OP)?, gy.cpu_read::<T>(OP)?);
                output(
                    cpu::zip_map(&xv, &gv, |x, g| g * cpu::gelu_grad(x)),
                    x.shape().clone(),
                    x.dtype(),
                )
            }
            let gx = if x.device() == Device::Cpu {
                with_real(x.dtype(), || bwd::<f32>(&x, &gy), || bwd::<f64>(&x, &gy))?
            } else {
                cuda::gelu_bwd(&x, &gy)?
            };
            g.accumulate(&x, gx)
        });
    }
    Ok(y.with_tape(tape))
}

/// `c · x`.
pub fn scale(x: &Tensor, c: f64) -> Result<Tensor> {
    const OP: &str = "scale";
    let tape = Tape::of(OP, &[x])?;
    fn go(x: &Tensor, c: f64) -> Result<Tensor> {
        fn host<T: Real>(x: &Tensor, c: f64) -> Result<Tensor> {
            let xv = x.cpu_read::<T>(OP)?;
            let c = T::c(c);
            output(cpu::map(&xv, |v| v * c), x.shape().clone(), x.dtype())
        }
        if x.device() == Device::Cpu {
            with_real(x.dtype(), || host::<f32>(x, c), || host::<f64>(x, c))
        } else {
            cuda::scale(x, c)
        }
    }
    let y = go(x, c)?;
    if let Some(tape) = &tape {
        let (x, yid) = (x.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            let gx = go(&gy, c)?;
            g.accumulate(&x, gx)
        });
    }
    Ok(y.with_tape(tape))
}

/// Converts to `dtype` (rounding once); the gradient is cast back.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    const OP: &str = "cast";
    let tape = Tape::of(OP, &[x])?;
    let y = x.to_dtype(dtype)?;
    if let Some(tape) = &tape {
        let (x, yid) = (x.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            g.accumulate(&x, gy.to_dtype(x.dtype())?)
        });
    }
    Ok(y.with_tape(tape))
}

/// The same elements under another shape (no copy).
pub fn reshape(x: &Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
    const OP: &str = "reshape";
    let tape = Tape::of(OP, &[x])?;
    let y = x.view_as(shape.into())?;
    if let Some(tape) = &tape {
        let (x, yid) = (x.clone(), y.id());
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            g.accumulate(&x, gy.view_as(x.shape().clone())?)
        });
    }
    Ok(y.with_tape(tape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::testing::{check_grads, rand_tensor};

    #[test]
    fn add_bias_gelu_scale_match_their_definitions() {
        let d = Device::Cpu;
        let x = Tensor::from_vec(vec![-3.0f64, -0.5, 0.0, 0.7, 2.0, 10.0], [2, 3], &d).unwrap();
        let b = Tensor::from_vec(vec![1.0f64, 2.0, 3.0], [3], &d).unwrap();
        assert_eq!(
            bias_add(&x, &b).unwrap().to_vec_f64().unwrap(),
            vec![-2.0, 1.5, 3.0, 1.7, 4.0, 13.0]
        );
        assert_eq!(
            add(&x, &x).unwrap().to_vec_f64().unwrap(),
            vec![-6.0, -1.0, 0.0, 1.4, 4.0, 20.0]
        );
        assert_eq!(
            scale(&x, -2.0).unwrap().to_vec_f64().unwrap(),
            vec![6.0, 1.0, -0.0, -1.4, -4.0, -20.0]
        );
        // gelu_new reference values (PyTorch `gelu(x, approximate="tanh")`).
        let want = [
            -0.0036373920817729943,
            -0.15428599017485606,
            0.0,
            0.5305701347051167,
            1.954597694087775,
            10.0,
        ];
        for (g, w) in gelu(&x).unwrap().to_vec_f64().unwrap().iter().zip(want) {
            assert!((g - w).abs() < 1e-14, "{g} vs {w}");
        }
    }

    #[test]
    fn elementwise_ops_reject_mismatched_inputs() {
        let d = Device::Cpu;
        let a = Tensor::zeros([2, 3], DType::F32, &d).unwrap();
        let b = Tensor::zeros([3, 2], DType::F32, &d).unwrap();
        assert!(matches!(add(&a, &b), Err(Error::Shape { .. })));
        let c = Tensor::zeros([2, 3], DType::BF16, &d).unwrap();
        assert!(matches!(add(&a, &c), Err(Error::DType { .. })));
        assert!(matches!(
            bias_add(&a, &Tensor::zeros([2], DType::F32, &d).unwrap()),
            Err(Error::Shape { .. })
        ));
        assert!(reshape(&a, [4]).is_err());
    }

    #[test]
    fn elementwise_backward_matches_finite_differences() {
        let mut rng = crate::testing::rng("elementwise_fd");
        let x = rand_tensor(&mut rng, [5, 7], -2.0, 2.0);
        let y = rand_tensor(&mut rng, [5, 7], -2.0, 2.0);
        let b = rand_tensor(&mut rng, [7], -1.0, 1.0);
        check_grads("add", &[x.clone(), y.clone()], |t| add(&t[0], &t[1]), 1e-7);
        check_grads(
            "bias_add",
            &[x.clone(), b],
            |t| bias_add(&t[0], &t[1]),
            1e-7,
        );
        check_grads("gelu", std::slice::from_ref(&x), |t| gelu(&t[0]), 1e-7);
        check_grads(
            "scale",
            std::slice::from_ref(&x),
            |t| scale(&t[0], 1.7),
            1e-7,
        );
        check_grads(
            "reshape",
            std::slice::from_ref(&x),
            |t| gelu(&reshape(&t[0], [35])?),
            1e-7,
        );
        // cast: the gradient is the seed cast back to the input's dtype.
        let tape = Tape::new();
        let xt = x.track(&tape);
        let y = cast(&xt, DType::BF16).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let seed = rand_tensor(&mut rng, [5, 7], -1.0, 1.0)
            .to_dtype(DType::BF16)
            .unwrap();
        let g = tape.backward_with(&y, seed.clone()).unwrap();
        let gx = g.get(&xt).unwrap();
        assert_eq!(gx.dtype(), DType::F64);
        assert_eq!(gx.to_vec_f64().unwrap(), seed.to_vec_f64().unwrap());
    }

    #[test]
    fn a_value_used_twice_gets_both_gradient_contributions() {
        let d = Device::Cpu;
        let tape = Tape::new();
        let x = Tensor::from_vec(vec![1.0f64, 2.0], [2], &d)
            .unwrap()
            .track(&tape);
        // y = x + 3x  =>  dy/dx = 4
        let y = add(&x, &scale(&x, 3.0).unwrap()).unwrap();
        let g = tape
            .backward_with(&y, Tensor::ones_like(&y).unwrap())
            .unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec_f64().unwrap(), vec![4.0, 4.0]);
    }
}
