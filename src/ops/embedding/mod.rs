//! Token + position embedding (stub until implemented).
use crate::{Error, Result, Tensor};
/// `out[b, t] = wte[tokens[b·T + t]] + wpe[t]`: `tokens` has `batch·seq` ids; returns `[batch, seq, C]`.
pub fn embedding(
    _tokens: &[u32],
    _batch: usize,
    _seq: usize,
    _wte: &Tensor,
    _wpe: &Tensor,
) -> Result<Tensor> {
    Err(Error::unsupported("embedding", "not implemented yet"))
}
