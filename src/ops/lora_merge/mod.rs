//! The merged-weight update (DESIGN §2): `W ← W + Σ sᵢ·Bᵢ·Aᵢ` in place.
//!
//! Each term's `scale` carries its sign and weight (`+s` merge, `−s` unmerge, `wᵢ·sᵢ` for
//! a weighted merge of several adapters). The sum is formed in f32 (f64 for an f64
//! weight) from the stored `W` and rounded once to `W`'s dtype (nearest even). This op
//! has no backward: it rewrites a frozen weight outside any tape.

pub(crate) mod cpu;

use super::LoraTerm;
use crate::tensor::{same_device, same_dtype};
use crate::{DType, Error, Real, Result, Tensor};

/// Adds `Σ sᵢ·Bᵢ·Aᵢ` into the rows `out_range` of `w [N, K]`, in place, rounding once.
pub fn lora_merge(w: &Tensor, terms: &[LoraTerm<'_>]) -> Result<()> {
    const OP: &str = "lora_merge";
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
        ins.push(t.a);
        ins.push(t.b);
    }
    same_dtype(OP, &ins)?;
    same_device(OP, &ins)?;
    fn go<T: Real>(w: &Tensor, terms: &[LoraTerm<'_>], k: usize) -> Result<()> {
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
        w.assign(&acc)
    }
    match w.dtype() {
        DType::F64 => go::<f64>(w, terms, k),
        _ => go::<f32>(w, terms, k),
    }
}
