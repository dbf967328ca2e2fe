//! Seeded dropout (stub until implemented).
use crate::{Error, Result, Tensor};
/// Inverted dropout with probability `p`, mask from a counter-based hash of `(seed, index)`.
pub fn dropout(_x: &Tensor, _p: f64, _seed: u64) -> Result<Tensor> {
    Err(Error::unsupported("dropout", "not implemented yet"))
}
/// Whether element `index` is kept under `(seed, p)`.
pub fn dropout_mask_value(_seed: u64, _index: u64, _p: f64) -> bool {
    true
}
