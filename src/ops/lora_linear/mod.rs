//! The fused LoRA linear (DESIGN §2) as one op with its own backward.
//!
//! ```text
//! forward:  u_i = x_lora·A_iᵀ                       [M, r]   (saved)
//!           y   = x·W0ᵀ + b;  y[:, cols_i] += s_i·u_i·B_iᵀ   [M, N]
//! backward: v_i   = gy[:, cols_i]·B_i               [M, r]
//!           gx    = gy·W0 (+ Σ s_i·v_i·A_i when x_lora is x)
//!           gB_i  = s_i·gy[:, cols_i]ᵀ·u_i          [n_i, r]
//!           gA_i  = s_i·v_iᵀ·x_lora                 [r, K]
//!           gW0   only when W0 is tracked — never in LoRA training
//! ```
//!
//! `x_lora` is the LoRA path's input: `x` itself (pass `None`), or `dropout(x)` (PEFT
//! applies `lora_dropout` to the adapter's input only). Several adapters may target
//! disjoint or overlapping column ranges: one full-width adapter for PEFT's `c_attn`, or
//! a q-block and a v-block adapter for loralib's q/v-only `MergedLinear`.

pub(crate) mod cpu;
mod cuda;

use super::elementwise::bias_grad;
use super::{output, with_real};
use crate::tape::Tape;
use crate::tensor::{CpuRead, same_device, same_dtype};
use crate::{Device, Error, Real, Result, Tensor};
use std::ops::Range;

const OP: &str = "lora_linear";

/// One LoRA adapter applied to the output columns `out_range` of a linear.
#[derive(Clone, Debug)]
pub struct LoraTerm<'a> {
    /// `A [r, K]`.
    pub a: &'a Tensor,
    /// `B [n, r]` with `n = out_range.len()`.
    pub b: &'a Tensor,
    /// The scale `s` (α/r, or α/√r for rsLoRA).
    pub scale: f64,
    /// The output columns this adapter adds to.
    pub out_range: Range<usize>,
}

/// An owned copy of a term, kept by the backward.
struct SavedTerm {
    a: Tensor,
    b: Tensor,
    r: usize,
    scale: f64,
    cols: Range<usize>,
}

/// `y = x·W0ᵀ + bias + Σ sᵢ·(x_lora·Aᵢᵀ)·Bᵢᵀ` over each term's output columns.
///
/// `x [.., K]`, `w0 [N, K]`, `bias [N]`; `x_lora` (same shape as `x`) defaults to `x`.
/// The backward computes `gW0` only if `w0` is tracked: a frozen base weight costs one
/// GEMM less per linear than full fine-tuning.
pub fn lora_linear(
    x: &Tensor,
    x_lora: Option<&Tensor>,
    w0: &Tensor,
    bias: Option<&Tensor>,
    terms: &[LoraTerm<'_>],
) -> Result<Tensor> {
    let (m, k) = x.shape().as_rows(OP)?;
    let (n, k2) = w0.shape().dims2(OP)?;
    if k != k2 {
        return Err(Error::shape(
            OP,
            format!("x {} with weight {}", x.shape(), w0.shape()),
        ));
    }
    if let Some(xl) = x_lora {
        Error::check_same_shape(OP, x.shape(), xl.shape())?;
    }
    if let Some(b) = bias
        && b.dims() != [n]
    {
        return Err(Error::shape(
            OP,
            format!("bias {} for weight {}", b.shape(), w0.shape()),
        ));
    }
    let mut saved = Vec::with_capacity(terms.len());
    for (i, t) in terms.iter().enumerate() {
        let (r, ka) = t.a.shape().dims2(OP)?;
        let (nb, rb) = t.b.shape().dims2(OP)?;
        if r == 0
            || ka != k
            || rb != r
            || nb != t.out_range.len()
            || t.out_range.end > n
            || t.out_range.start > t.out_range.end
        {
            return Err(Error::shape(
                OP,
                format!(
                    "adapter {i}: A {} and B {} over columns {:?} of a [{n}, {k}] weight",
                    t.a.shape(),
                    t.b.shape(),
                    t.out_range
                ),
            ));
        }
        if !t.scale.is_finite() {
            return Err(Error::invalid(format!(
                "{OP}: adapter {i} has a non-finite scale {}",
                t.scale
            )));
        }
        saved.push(SavedTerm {
            a: t.a.clone(),
            b: t.b.clone(),
            r,
            scale: t.scale,
            cols: t.out_range.clone(),
        });
    }
    let mut ins: Vec<&Tensor> = vec![x, w0];
    ins.extend(x_lora);
    ins.extend(bias);
    for t in terms {
        ins.push(t.a);
        ins.push(t.b);
    }
    let dtype = same_dtype(OP, &ins)?;
    same_device(OP, &ins)?;
    let tape = Tape::of(OP, &ins)?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = n;

    let device = x.device();
    let (y, us) = if device == Device::Cpu {
        with_real(
            dtype,
            || forward::<f32>(x, x_lora, w0, bias, &saved, (m, k, n), &out_dims),
            || forward::<f64>(x, x_lora, w0, bias, &saved, (m, k, n), &out_dims),
        )?
    } else {
        let (y, sus) = cuda::forward(
            x,
            x_lora.unwrap_or(x),
            w0,
            bias,
            &saved,
            (m, k, n),
            &out_dims,
        )?;
        (y, Saved::Device(sus))
    };
    let Some(tape) = tape else {
        us.recycle();
        return Ok(y);
    };
    {
        let (x, x_lora, w0, bias, yid) = (
            x.clone(),
            x_lora.cloned(),
            w0.clone(),
            bias.cloned(),
            y.id(),
        );
        tape.push(OP, move |g| {
            let Some(gy) = g.take_output(yid) else {
                return Ok(());
            };
            let grads = match &us {
                Saved::Device(sus) => {
                    let d = cuda::backward(&gy, &x, x_lora.as_ref(), &w0, &saved, sus, (m, k, n))?;
                    Grads2 {
                        gx: d.gx,
                        gx_lora: d.gx_lora,
                        gw0: d.gw0,
                        ga: d.ga,
                        gb: d.gb,
                    }
                }
                _ => with_real(
                    x.dtype(),
                    || backward::<f32>(&gy, &x, x_lora.as_ref(), &w0, &saved, &us, (m, k, n)),
                    || backward::<f64>(&gy, &x, x_lora.as_ref(), &w0, &saved, &us, (m, k, n)),
                )?,
            };
            us.recycle();
            if let Some(b) = &bias
                && b.requires_grad()
            {
                g.accumulate(b, bias_grad(&gy, n)?)?;
            }
            let Grads2 {
                gx,
                gx_lora,
                gw0,
                ga,
                gb,
            } = grads;
            if let Some(t) = gx {
                g.accumulate(&x, t)?;
            }
            if let (Some(xl), Some(t)) = (&x_lora, gx_lora) {
                g.accumulate(xl, t)?;
            }
            if let Some(t) = gw0 {
                g.accumulate(&w0, t)?;
            }
            for (st, (ga, gb)) in saved.iter().zip(ga.into_iter().zip(gb)) {
                if let Some(t) = ga {
                    g.accumulate(&st.a, t)?;
                }
                if let Some(t) = gb {
                    g.accumulate(&st.b, t)?;
                }
            }
            Ok(())
        });
    }
    Ok(y.with_tape(Some(tape)))
}

/// The saved `u` of each adapter: in the compute type of the op on the CPU, as `s·u`
/// tensors on a device.
enum Saved {
    F32(Vec<Vec<f32>>),
    F64(Vec<Vec<f64>>),
    Device(Vec<Tensor>),
}

impl Saved {
    /// Gives the buffers back to the pool once the backward is done with them.
    fn recycle(self) {
        match self {
            Saved::F32(us) => us.into_iter().for_each(crate::storage::pool::recycle),
            Saved::F64(us) => us.into_iter().for_each(crate::storage::pool::recycle),
            Saved::Device(_) => {}
        }
    }
}

/// Gradients as tensors.
struct Grads2 {
    gx: Option<Tensor>,
    gx_lora: Option<Tensor>,
    gw0: Option<Tensor>,
    ga: Vec<Option<Tensor>>,
    gb: Vec<Option<Tensor>>,
}

trait SavedOf: Real {
    fn wrap(us: Vec<Vec<Self>>) -> Saved;
    fn unwrap(s: &Saved) -> &[Vec<Self>];
}
impl SavedOf for f32 {
    fn wrap(us: Vec<Vec<f32>>) -> Saved {
        Saved::F32(us)
    }
    fn unwrap(s: &Saved) -> &[Vec<f32>] {
        match s {
            Saved::F32(v) => v,
            _ => unreachable!("the compute type is fixed by the dtype and device"),
        }
    }
}
impl SavedOf for f64 {
    fn wrap(us: Vec<Vec<f64>>) -> Saved {
        Saved::F64(us)
    }
    fn unwrap(s: &Saved) -> &[Vec<f64>] {
        match s {
            Saved::F64(v) => v,
            _ => unreachable!("the compute type is fixed by the dtype and device"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn forward<T: SavedOf>(
    x: &Tensor,
    x_lora: Option<&Tensor>,
    w0: &Tensor,
    bias: Option<&Tensor>,
    terms: &[SavedTerm],
    dims: (usize, usize, usize),
    out_dims: &[usize],
) -> Result<(Tensor, Saved)> {
    let xv = x.cpu_read::<T>(OP)?;
    let xl = x_lora.map(|t| t.cpu_read::<T>(OP)).transpose()?;
    let wv = w0.cpu_read::<T>(OP)?;
    let bv = bias.map(|t| t.cpu_read::<T>(OP)).transpose()?;
    let reads = read_terms::<T>(terms)?;
    let cterms = cpu_terms(terms, &reads);
    let (y, us) = cpu::forward(
        &xv,
        xl.as_deref().unwrap_or(&xv),
        &wv,
        bv.as_deref(),
        &cterms,
        dims,
    )?;
    Ok((output(y, out_dims.to_vec(), x.dtype())?, T::wrap(us)))
}

/// Host reads of every adapter's `A` and `B` (held while the kernels run).
#[allow(clippy::type_complexity)]
fn read_terms<T: Real>(terms: &[SavedTerm]) -> Result<Vec<(CpuRead<'_, T>, CpuRead<'_, T>)>> {
    terms
        .iter()
        .map(|t| Ok((t.a.cpu_read::<T>(OP)?, t.b.cpu_read::<T>(OP)?)))
        .collect()
}

/// The CPU kernels' view of the adapters.
fn cpu_terms<'a, T: Real>(
    terms: &[SavedTerm],
    reads: &'a [(CpuRead<'_, T>, CpuRead<'_, T>)],
) -> Vec<cpu::Term<'a, T>> {
    terms
        .iter()
        .zip(reads)
        .map(|(t, (a, b))| cpu::Term {
            a,
            b,
            r: t.r,
            scale: T::c(t.scale),
            cols: t.cols.clone(),
        })
        .collect()
}

fn backward<T: SavedOf>(
    gy: &Tensor,
    x: &Tensor,
    x_lora: Option<&Tensor>,
    w0: &Tensor,
    terms: &[SavedTerm],
    us: &Saved,
    dims: (usize, usize, usize),
) -> Result<Grads2> {
    let (_, k, n) = dims;
    let gv = gy.cpu_read::<T>(OP)?;
    let xv = x.cpu_read::<T>(OP)?;
    let xl = x_lora.map(|t| t.cpu_read::<T>(OP)).transpose()?;
    let wv = w0.cpu_read::<T>(OP)?;
    let reads = read_terms::<T>(terms)?;
    let cterms = cpu_terms(terms, &reads);
    let want = cpu::Wants {
        gx: x.requires_grad(),
        gx_lora: x_lora.is_some_and(|t| t.requires_grad()),
        gw0: w0.requires_grad(),
        ga: terms.iter().map(|t| t.a.requires_grad()).collect(),
        gb: terms.iter().map(|t| t.b.requires_grad()).collect(),
    };
    let shared = x_lora.is_none();
    let gr = cpu::backward(
        &gv,
        &xv,
        xl.as_deref().unwrap_or(&xv),
        shared,
        &wv,
        &cterms,
        T::unwrap(us),
        &want,
        dims,
    )?;
    let dt = x.dtype();
    let opt = |v: Option<Vec<T>>, shape: Vec<usize>| v.map(|v| output(v, shape, dt)).transpose();
    Ok(Grads2 {
        gx: opt(gr.gx, x.dims().to_vec())?,
        gx_lora: opt(gr.gx_lora, x.dims().to_vec())?,
        gw0: opt(gr.gw0, vec![n, k])?,
        ga: gr
            .ga
            .into_iter()
            .zip(terms)
            .map(|(v, t)| opt(v, vec![t.r, k]))
            .collect::<Result<_>>()?,
        gb: gr
            .gb
            .into_iter()
            .zip(terms)
            .map(|(v, t)| opt(v, vec![t.cols.len(), t.r]))
            .collect::<Result<_>>()?,
    })
}

#[cfg(test)]
mod tests;
