//! The compiled kernels, embedded by `build.rs`.
//!
//! For every `kernels/<module>.cu`, build.rs records the `extern "C" __global__` symbols
//! it defines and embeds what it could build: PTX for `compute_80` and cubins for
//! `sm_80`/`sm_90` (and `sm_90a` when the source uses Hopper-only instructions) when nvcc
//! was found, and always a self-contained source for NVRTC (`common.cuh` pasted in).
//! The CUDA backend loads a module from the best of these for the device
//! (cubin → PTX → NVRTC); the simulator runs the same source compiled by the host C++
//! compiler.

/// One `kernels/<name>.cu`, as compiled at build time.
#[derive(Debug)]
pub struct KernelModule {
    /// The file stem, e.g. `elementwise`.
    pub name: &'static str,
    /// The kernel symbols the file defines, in source order.
    pub kernels: &'static [&'static str],
    /// PTX for `compute_80` from nvcc, if nvcc was found.
    pub ptx: Option<&'static str>,
    /// Cubins by target (`sm_80`, `sm_90`, `sm_90a`), if nvcc was found.
    pub cubins: &'static [(&'static str, &'static [u8])],
    /// The source with `common.cuh` pasted in, ready for NVRTC.
    pub nvrtc_source: &'static str,
    /// ptxas's `-v` resource report for every target, if nvcc was found.
    pub ptxas_report: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module that defines `kernel`, if any.
pub fn module_of(kernel: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.kernels.contains(&kernel))
}

/// Every kernel symbol the crate's ops (and the optimizer) may launch, op by op.
pub fn launched() -> impl Iterator<Item = &'static str> {
    [
        crate::ops::attention::cuda::KERNELS,
        crate::ops::cross_entropy::cuda::KERNELS,
        crate::ops::dropout::cuda::KERNELS,
        crate::ops::elementwise::cuda::KERNELS,
        crate::ops::embedding::cuda::KERNELS,
        crate::ops::layer_norm::cuda::KERNELS,
        crate::ops::lora_matmul::cuda::KERNELS,
        crate::ops::lora_merge::cuda::KERNELS,
        crate::ops::lora_reduce::cuda::KERNELS,
        crate::optim::adamw::cuda::KERNELS,
    ]
    .into_iter()
    .flatten()
    .copied()
}
