//! Softmax cross-entropy (stub until implemented).
use crate::{Error, Result, Tensor};
/// Targets equal to this are ignored (PyTorch's default).
pub const IGNORE_INDEX: i32 = -100;
/// Mean softmax cross-entropy of `logits [M, V]` against `targets` (M ids, or [`IGNORE_INDEX`]).
pub fn cross_entropy(_logits: &Tensor, _targets: &[i32]) -> Result<Tensor> {
    Err(Error::unsupported("cross_entropy", "not implemented yet"))
}
