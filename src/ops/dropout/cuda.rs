//! Launcher of `kernels/dropout.cu`, one code path for the CUDA backend and the simulator.

use crate::device::LaunchConfig;
use crate::ops::elementwise::cuda::suffix;
use crate::storage::{DeviceStorage, Storage};
use crate::{Error, Result, Tensor};

/// Twin of `DropoutParams` in `kernels/dropout.cu` (the size is checked against the
/// compiled struct by a kernel test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct DropoutParams {
    pub x: u64,
    pub out: u64,
    pub n: u64,
    pub seed: u64,
    pub threshold: u32,
    pub scale: f32,
}

/// Every kernel the launcher may launch (checked against the compiled modules by the tidy
/// test).
pub(crate) const KERNELS: &[&str] = &[
    "dropout_fwd_f32",
    "dropout_fwd_bf16",
    "dropout_fwd_f16",
    "dropout_bwd_f32",
    "dropout_bwd_bf16",
    "dropout_bwd_f16",
];

/// Threads per block (the header's launch geometry).
pub(crate) const THREADS: u32 = 256;

/// The masked scale of `x` (the forward on `x`, or the backward on the output gradient
/// when `backward`), with `p ∈ [0, 1)` checked by the caller.
pub(crate) fn apply(x: &Tensor, p: f64, seed: u64, backward: bool) -> Result<Tensor> {
    let name = format!(
        "dropout_{}_{}",
        if backward { "bwd" } else { "fwd" },
        suffix(x.dtype())?
    );
    let xs = x.storage();
    let xd = match &*xs {
        Storage::Device(d) => d,
        Storage::Cpu(_) => {
            return Err(Error::invalid(
                "dropout: a CPU tensor reached the kernel launcher".to_string(),
            ));
        }
    };
    let n = x.elem_count();
    let out = DeviceStorage::alloc(x.dtype(), n, xd.device())?;
    if n > 0 {
        let backend = xd.backend();
        let params = DropoutParams {
            x: xd.device_ptr(),
            out: out.device_ptr(),
            n: n as u64,
            seed,
            threshold: super::cpu::threshold(p),
            scale: (1.0 / (1.0 - p)) as f32,
        };
        let cfg = LaunchConfig::grid_stride(n, THREADS, backend.max_blocks());
        backend.launch(&name, &cfg, &params)?;
    }
    Tensor::from_storage(Storage::Device(out), x.shape().clone())
}
