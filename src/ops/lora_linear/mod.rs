//! The fused LoRA linear (stub until implemented).
use crate::{Error, Result, Tensor};
use std::ops::Range;
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
/// `y = x·W0ᵀ + b + Σ s·(x_lora·Aᵀ)·Bᵀ` (stub).
pub fn lora_linear(_x: &Tensor, _x_lora: Option<&Tensor>, _w0: &Tensor, _bias: Option<&Tensor>, _terms: &[LoraTerm<'_>]) -> Result<Tensor> {
    Err(Error::unsupported("lora_linear", "not implemented yet"))
}
