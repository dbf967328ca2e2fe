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
pub(crate) mod decode_attention;
pub(crate) mod dropout;
pub(crate) mod elementwise;
pub(crate) mod embedding;
pub(crate) mod hopper;
pub(crate) mod layer_norm;
mod lora_linear;
pub(crate) mod lora_matmul;
pub(crate) mod lora_merge;
pub(crate) mod lora_reduce;
mod matmul;
pub mod profile;

pub use attention::causal_attention;
pub use attention::wgmma::{hopper_attention, hopper_attention_available, set_hopper_attention};
pub use cross_entropy::{
    IGNORE_INDEX, cross_entropy, cross_entropy_fused, cross_entropy_fused_padded,
    cross_entropy_padded,
};
pub use decode_attention::{decode_attention, kv_cache_tensor};
pub use dropout::{dropout, dropout_mask_value};
pub use elementwise::{add, bias_add, cast, gelu, reshape, scale};
pub use embedding::{embedding, embedding_at};
pub use layer_norm::layer_norm;
pub use lora_linear::{LoraTerm, lora_linear};
pub use lora_matmul::wgmma::{hopper_gemm, hopper_gemm_available, set_hopper_gemm};
pub use lora_merge::{lora_merge, lora_merge_with};
#[doc(hidden)]
pub use lora_reduce::bench_token_reduce;
pub(crate) use matmul::linear_rows;
pub use matmul::{linear, matmul};

use crate::{DType, Real, Result, Tensor};

/// One launcher's kernels and the block size it gives each of them.
struct Launcher {
    /// Every kernel the launcher may launch.
    kernels: &'static [&'static str],
    /// Threads per block of a kernel of `kernels`.
    threads: fn(&str) -> u32,
}

/// Every launcher of the crate (the ops, and the optimizer's fused AdamW). The device layer
/// knows nothing of them: the tidy test checks that these lists name exactly the kernels
/// `kernels/*.cu` defines, and the GPU tests that each kernel's `__launch_bounds__` admit
/// the block its launcher gives it.
const LAUNCHERS: [Launcher; 13] = [
    Launcher {
        kernels: attention::cuda::KERNELS,
        threads: |_| attention::cuda::THREADS,
    },
    Launcher {
        kernels: attention::wgmma::KERNELS,
        threads: |_| attention::wgmma::THREADS,
    },
    Launcher {
        kernels: cross_entropy::cuda::KERNELS,
        threads: |_| cross_entropy::cuda::THREADS,
    },
    Launcher {
        kernels: decode_attention::cuda::KERNELS,
        threads: |_| decode_attention::cuda::THREADS,
    },
    Launcher {
        kernels: dropout::cuda::KERNELS,
        threads: |_| dropout::cuda::THREADS,
    },
    Launcher {
        kernels: elementwise::cuda::KERNELS,
        threads: |_| elementwise::cuda::THREADS,
    },
    Launcher {
        kernels: embedding::cuda::KERNELS,
        threads: |_| embedding::cuda::THREADS,
    },
    Launcher {
        kernels: layer_norm::cuda::KERNELS,
        threads: |_| layer_norm::cuda::THREADS as u32,
    },
    Launcher {
        kernels: lora_matmul::cuda::KERNELS,
        threads: lora_matmul_threads,
    },
    Launcher {
        kernels: lora_matmul::wgmma::KERNELS,
        threads: |_| lora_matmul::wgmma::THREADS,
    },
    Launcher {
        kernels: lora_merge::cuda::KERNELS,
        threads: |_| lora_merge::cuda::THREADS as u32,
    },
    Launcher {
        kernels: lora_reduce::cuda::KERNELS,
        threads: |k| {
            if k.starts_with("lora_reduce_sum_") {
                lora_reduce::cuda::SUM_THREADS
            } else {
                lora_reduce::cuda::THREADS
            }
        },
    },
    Launcher {
        kernels: crate::optim::adamw::cuda::KERNELS,
        threads: |_| crate::optim::adamw::cuda::THREADS,
    },
];

/// The block size `lora_matmul`'s launcher picks for `kernel` (0 if it never picks it).
fn lora_matmul_threads(kernel: &str) -> u32 {
    use lora_matmul::Variant;
    [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .flat_map(|dt| {
            [Variant::Simt, Variant::TensorCore128, Variant::TensorCore64]
                .map(|v| lora_matmul::cuda::plan(dt, v, 1, 1))
        })
        .flatten()
        .find(|p| p.name == kernel)
        .map_or(0, |p| p.threads)
}

/// Every kernel symbol the crate's ops (and the optimizer) may launch, op by op.
#[cfg_attr(not(test), allow(dead_code))] // read by the tidy test
pub(crate) fn launched_kernels() -> impl Iterator<Item = &'static str> {
    LAUNCHERS.iter().flat_map(|l| l.kernels.iter().copied())
}

/// The threads per block that `kernel`'s launcher gives it, if some op launches it: what
/// the kernel's `__launch_bounds__` (and its registers) must admit.
#[cfg_attr(not(test), allow(dead_code))] // read by the tidy and GPU tests
pub(crate) fn block_threads(kernel: &str) -> Option<u32> {
    LAUNCHERS
        .iter()
        .find(|l| l.kernels.contains(&kernel))
        .map(|l| (l.threads)(kernel))
}

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
