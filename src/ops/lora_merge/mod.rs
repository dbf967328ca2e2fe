//! The merged-weight update (DESIGN §2): `W ← W + Σ sᵢ·Bᵢ·Aᵢ` in place.
//!
//! Each term's `scale` carries its sign and weight (`+s` merge, `−s` unmerge, `wᵢ·sᵢ` for
//! a weighted merge of several adapters). The sum is formed in f32 (f64 for an f64
//! weight) from the stored `W`, term by term and rank by rank with every product and sum
//! rounded once, and rounded once to `W`'s dtype: to nearest even ([`lora_merge`]) or
//! stochastically ([`lora_merge_with`]). The CUDA kernel (`kernels/lora_merge.cu`) does
//! the same operations in the same order, so every backend gives the same bits. This op
//! has no backward: it rewrites a frozen weight outside any tape.

pub(crate) mod cpu;
pub(crate) mod cuda;

use super::LoraTerm;
use crate::optim::rounding::{
    Rounding, round_bf16_stochastic, round_f16_stochastic, stream_bits, stream_key,
};
use crate::tensor::{same_device, same_dtype};
use crate::{DType, Device, Error, Real, Result, Tensor};

const OP: &str = "lora_merge";

/// Adds `Σ sᵢ·Bᵢ·Aᵢ` into each term's rows `out_range` of `w [N, K]`, in place, rounding
/// once to nearest even.
///
/// ```
/// use lorafuse::{ops, DType, Device, Tensor};
/// let w = Tensor::zeros([4, 3], DType::F32, &Device::Cpu).unwrap();
/// let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], [1, 3], &Device::Cpu).unwrap();
/// let b = Tensor::from_vec(vec![1.0f32, -1.0], [2, 1], &Device::Cpu).unwrap();
/// let term = ops::LoraTerm { a: &a, b: &b, scale: 0.5, out_range: 1..3 };
/// ops::lora_merge(&w, &[term]).unwrap();
/// assert_eq!(
///     w.to_vec::<f32>().unwrap(),
///     [0.0, 0.0, 0.0, 0.5, 1.0, 1.5, -0.5, -1.0, -1.5, 0.0, 0.0, 0.0]
/// );
/// ```
pub fn lora_merge(w: &Tensor, terms: &[LoraTerm<'_>]) -> Result<()> {
    lora_merge_with(w, terms, Rounding::NearestEven)
}

/// [`lora_merge`] with a choice of rounding for bf16/f16 weights. Stochastic rounding uses
/// the random bits `stream_bits(stream_key(seed, 0, 0), i·K + j)` for element `(i, j)`
/// (see [`crate::optim::rounding`]); f32 and f64 weights are not rounded.
///
/// Errors: shapes that do not fit `W`, mixed dtypes or devices, a non-finite scale, and
/// `W` sharing its storage with an adapter (the update is in place).
pub fn lora_merge_with(w: &Tensor, terms: &[LoraTerm<'_>], rounding: Rounding) -> Result<()> {
    let (n, k) = w.shape().dims2(OP)?;
    let mut ins = vec![w];
    for (i, t) in terms.iter().enumerate() {
        let (r, ka) = t.a.shape().dims2(OP)?;
        let (nb, rb) = t.b.shape().dims2(OP)?;
        if ka != k || rb != r || nb != t.out_range.len() || t.out_range.end > n {
            return Err(Error::shape(
                OP,
                format!(
                    "adapter {i}: A {} and B {} over rows {:?} of W {}",
                    t.a.shape(),
                    t.b.shape(),
                    t.out_range,
                    w.shape()
                ),
            ));
        }
        if !t.scale.is_finite() {
            return Err(Error::invalid(format!(
                "{OP}: adapter {i} has a non-finite scale {}",
                t.scale
            )));
        }
        if w.same_storage(t.a) || w.same_storage(t.b) {
            return Err(Error::invalid(format!(
                "{OP}: adapter {i} shares its storage with W, which is updated in place"
            )));
        }
        ins.push(t.a);
        ins.push(t.b);
    }
    same_dtype(OP, &ins)?;
    same_device(OP, &ins)?;
    if w.device() != Device::Cpu {
        return cuda::launch(w, terms, rounding);
    }
    match w.dtype() {
        DType::F64 => merge_on_cpu::<f64>(w, terms, k, Rounding::NearestEven),
        _ => merge_on_cpu::<f32>(w, terms, k, rounding),
    }
}

/// The CPU path: the reference sum in `T`, then one rounding into `W`'s dtype.
fn merge_on_cpu<T: Real>(
    w: &Tensor,
    terms: &[LoraTerm<'_>],
    k: usize,
    rounding: Rounding,
) -> Result<()> {
    let mut acc: Vec<T> = w.to_vec()?;
    let reads: Vec<_> = terms
        .iter()
        .map(|t| Ok((t.a.cpu_read::<T>(OP)?, t.b.cpu_read::<T>(OP)?)))
        .collect::<Result<_>>()?;
    let cterms: Vec<cpu::Term<'_, T>> = terms
        .iter()
        .zip(&reads)
        .map(|(t, (a, b))| cpu::Term {
            a,
            b,
            r: t.a.dims()[0],
            scale: T::c(t.scale),
            rows: t.out_range.clone(),
        })
        .collect();
    cpu::merge(&mut acc, k, &cterms);
    drop(reads);
    let seed = match rounding {
        Rounding::Stochastic { seed } => seed,
        Rounding::NearestEven => return w.assign(&acc),
    };
    let key = stream_key(seed, 0, 0);
    let bits = |i: usize, x: T| (x.to_f64() as f32, stream_bits(key, i as u64));
    match w.dtype() {
        DType::BF16 => {
            let v: Vec<half::bf16> = acc
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let (x, r) = bits(i, x);
                    round_bf16_stochastic(x, r)
                })
                .collect();
            w.assign(&v)
        }
        DType::F16 => {
            let v: Vec<half::f16> = acc
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let (x, r) = bits(i, x);
                    round_f16_stochastic(x, r)
                })
                .collect();
            w.assign(&v)
        }
        _ => w.assign(&acc),
    }
}

#[cfg(test)]
mod kernel_tests;
