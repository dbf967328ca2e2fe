//! LayerNorm (stub until implemented).
use crate::{Error, Result, Tensor};
/// LayerNorm over the last dimension: `x [.., C]`, `gamma [C]`, `beta [C]`.
pub fn layer_norm(_x: &Tensor, _gamma: &Tensor, _beta: &Tensor, _eps: f64) -> Result<Tensor> {
    Err(Error::unsupported("layer_norm", "not implemented yet"))
}
