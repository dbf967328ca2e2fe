//! Ops with forward and backward. One op, one folder: `mod.rs` holds the public op, its
//! shape checks, backward recording and tests; `cpu.rs` the CPU reference kernels
//! (generic over the compute type, f32 or f64); `cuda.rs` the launchers of the op's
//! `kernels/<op>.cu`, shared by the CUDA backend and the simulator.
//!
//! Every op takes tensors, returns a new tensor, and records its backward on the tape of
//! its tracked inputs (if any). The backward computes a gradient only for the inputs that
//! are tracked: a frozen weight costs no gradient work.

pub(crate) mod attention;
pub(crate) mod cross_entropy;
pub(crate) mod dropout;
pub(crate) mod elementwise;
pub(crate) mod embedding;
pub(crate) mod layer_norm;
mod lora_linear;
pub(crate) mod lora_matmul;
pub(crate) mod lora_merge;
pub(crate) mod lora_reduce;
mod matmul;
pub mod profile;

pub use attention::causal_attention;
pub use cross_entropy::{cross_entropy, cross_entropy_fused, IGNORE_INDEX};
pub use dropout::{dropout, dropout_mask_value};
pub use elementwise::{add, bias_add, cast, gelu, reshape, scale};
pub use embedding::embedding;
pub use layer_norm::layer_norm;
pub use lora_linear::{lora_linear, LoraTerm};
pub use lora_merge::{lora_merge, lora_merge_with};
#[doc(hidden)]
pub use lora_reduce::bench_token_reduce;
pub use matmul::{linear, matmul};

use crate::{DType, Real, Result, Tensor};

/// Runs `f` with the compute type of `dtype`: f64 for f64 tensors, f32 otherwise
/// (bf16/f16 are widened on load and rounded once on store).
pub(crate) fn with_real<R>(
    dtype: DType,
    f32_path: impl FnOnce() -> R,
    f64_path: impl FnOnce() -> R,
) -> R {
    match dtype {
        DType::F64 => f64_path(),
        _ => f32_path(),
    }
}

/// Builds the op's output tensor from compute-type values, rounded once to `dtype`.
pub(crate) fn output<T: Real>(
    v: Vec<T>,
    shape: impl Into<crate::Shape>,
    dtype: DType,
) -> Result<Tensor> {
    Tensor::from_cpu_values(v, shape, dtype)
}
