//! Causal multi-head attention (stub until implemented).
use crate::{Error, Result, Tensor};
/// Causal multi-head self-attention from a fused `qkv [B, T, 3C]`; returns `[B, T, C]`.
pub fn causal_attention(_qkv: &Tensor, _n_head: usize) -> Result<Tensor> {
    Err(Error::unsupported(
        "causal_attention",
        "not implemented yet",
    ))
}
