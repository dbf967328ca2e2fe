//! Launchers of `kernels/cross_entropy.cu`, one code path for the CUDA backend and the
//! simulator.

use super::Cols;
use crate::device::{Backend, DeviceBuffer, LaunchConfig};
use crate::ops::elementwise::cuda::suffix;
use crate::storage::{DeviceStorage, Storage};
use crate::{DType, Error, Result, Shape, Tensor};

const OP: &str = "cross_entropy";

/// Twin of `CrossEntropyParams` in `kernels/cross_entropy.cu` (the size is checked against
/// the compiled struct by a kernel test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct CrossEntropyParams {
    pub x: u64,
    pub targets: u64,
    pub lse: u64,
    pub losses: u64,
    pub gy: u64,
    pub out: u64,
    pub rows: i64,
    pub v: i64,
    pub n_valid: i64,
    pub ld: i64,
}

/// Every kernel these launchers may launch (checked against the compiled modules by the
/// tidy test).
pub(crate) const KERNELS: &[&str] = &[
    "cross_entropy_fwd_f32",
    "cross_entropy_fwd_bf16",
    "cross_entropy_fwd_f16",
    "cross_entropy_fused_fwd_f32",
    "cross_entropy_fused_fwd_bf16",
    "cross_entropy_fused_fwd_f16",
    "cross_entropy_mean_fwd_f32",
    "cross_entropy_bwd_f32",
    "cross_entropy_bwd_bf16",
    "cross_entropy_bwd_f16",
];

/// Threads per block of every kernel in the file (the header's launch geometry).
pub(crate) const THREADS: u32 = 256;

/// What the forward leaves on the device for the backward: the per-row `logsumexp` (f32)
/// and the uploaded targets (i32), with the counts the kernels need.
pub(crate) struct Saved {
    lse: DeviceBuffer,
    targets: DeviceBuffer,
    rows: usize,
    cols: Cols,
    n_valid: usize,
}

fn dev(s: &Storage) -> Result<&DeviceStorage> {
    match s {
        Storage::Device(d) => Ok(d),
        Storage::Cpu(_) => Err(Error::invalid(format!(
            "{OP}: a CPU tensor reached a kernel launcher"
        ))),
    }
}

fn int(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{OP}: {v} overflows i64")))
}

/// The targets in device memory (i32, at least one element: no allocation is empty).
fn upload_targets(backend: &Backend, targets: &[i32]) -> Result<DeviceBuffer> {
    let n = targets.len().max(1);
    let mut buf = backend.alloc(4 * n)?;
    let mut bytes = vec![0u8; 4 * n];
    bytes[..4 * targets.len()].copy_from_slice(bytemuck::cast_slice(targets));
    backend.write(&bytes, &mut buf)?;
    Ok(buf)
}

/// One block per row in a grid-stride loop over rows.
fn rows_config(backend: &Backend, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid: [rows.clamp(1, backend.max_blocks() as usize) as u32, 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    }
}

/// The forward on the device: the scalar mean loss (f32 for every logits dtype) and what the
/// backward needs. `targets` are validated by the caller (`rows` of them, each in
/// `0..cols.v` or negative for an ignored row); `n_valid` counts the non-ignored ones.
pub(crate) fn forward(
    logits: &Tensor,
    targets: &[i32],
    cols: Cols,
    n_valid: usize,
) -> Result<(Tensor, Saved)> {
    let rows = targets.len();
    let sfx = suffix(logits.dtype())?;
    let xs = logits.storage();
    let xd = dev(&xs)?;
    let backend = xd.backend();
    let tbuf = upload_targets(backend, targets)?;
    // At least one element each, so that no allocation is empty.
    let lse = backend.alloc(4 * rows.max(1))?;
    // Freed in stream order after the launches (see device::cuda), so it may drop here.
    let losses = backend.alloc(4 * rows.max(1))?;
    let out = DeviceStorage::alloc(DType::F32, 1, xd.device())?;
    let params = CrossEntropyParams {
        x: xd.device_ptr(),
        targets: tbuf.device_ptr(),
        lse: lse.device_ptr(),
        losses: losses.device_ptr(),
        gy: 0,
        out: out.device_ptr(),
        rows: int(rows)?,
        v: int(cols.v)?,
        n_valid: int(n_valid)?,
        ld: int(cols.ld)?,
    };
    if rows > 0 {
        let cfg = rows_config(backend, rows);
        backend.launch(&format!("cross_entropy_fwd_{sfx}"), &cfg, &params)?;
    }
    let one = rows_config(backend, 1); // the mean: one block
    backend.launch("cross_entropy_mean_fwd_f32", &one, &params)?;
    let y = Tensor::from_storage(Storage::Device(out), Shape::from(()))?;
    let saved = Saved {
        lse,
        targets: tbuf,
        rows,
        cols,
        n_valid,
    };
    Ok((y, saved))
}

/// Forward and gradient in one pass (`cross_entropy_fused_fwd`): the scalar mean loss (f32)
/// and the logits gradient for a backward seeded with `seed` (a one-element f32 tensor on
/// the logits' device, read by the kernel; checked by the caller), 0 in the padding
/// columns `cols.v..cols.ld`. `targets` as for [`forward`]. With `in_place` (the caller
/// owns the only handle on the logits), the gradient is written over the logits and
/// returned in their storage.
pub(crate) fn forward_fused(
    logits: Tensor,
    targets: &[i32],
    cols: Cols,
    n_valid: usize,
    seed: &Tensor,
    in_place: bool,
) -> Result<(Tensor, Tensor)> {
    let rows = targets.len();
    let sfx = suffix(logits.dtype())?;
    // The write lock: the kernel may write the logits' own buffer.
    let (xs, ss) = (logits.storage_mut(), seed.storage());
    let (xd, sd) = (dev(&xs)?, dev(&ss)?);
    let backend = xd.backend();
    let tbuf = upload_targets(backend, targets)?;
    // Freed in stream order after the launches (see device::cuda), so they may drop here.
    let losses = backend.alloc(4 * rows.max(1))?;
    let gx = if in_place {
        None
    } else {
        Some(DeviceStorage::alloc(
            logits.dtype(),
            rows * cols.ld,
            xd.device(),
        )?)
    };
    let loss = DeviceStorage::alloc(DType::F32, 1, xd.device())?;
    let mut params = CrossEntropyParams {
        x: xd.device_ptr(),
        targets: tbuf.device_ptr(),
        lse: 0,
        losses: losses.device_ptr(),
        gy: sd.device_ptr(),
        out: gx
            .as_ref()
            .map_or(xd.device_ptr(), DeviceStorage::device_ptr),
        rows: int(rows)?,
        v: int(cols.v)?,
        n_valid: int(n_valid)?,
        ld: int(cols.ld)?,
    };
    if rows > 0 {
        let cfg = rows_config(backend, rows);
        backend.launch(&format!("cross_entropy_fused_fwd_{sfx}"), &cfg, &params)?;
    }
    params.out = loss.device_ptr();
    let one = rows_config(backend, 1); // the mean: one block
    backend.launch("cross_entropy_mean_fwd_f32", &one, &params)?;
    drop((xs, ss));
    let loss = Tensor::from_storage(Storage::Device(loss), Shape::from(()))?;
    let gx = match gx {
        Some(g) => Tensor::from_storage(Storage::Device(g), logits.shape().clone())?,
        // The logits' storage now holds the gradient: hand it on under a fresh id,
        // untracked (the logits' handle drops here).
        None => logits.view_as(logits.shape().clone())?,
    };
    Ok((loss, gx))
}

/// The logits gradient `gy/n_valid·(softmax − onehot)` (0 on ignored rows and in the
/// padding columns), with `gy` the device scalar gradient of the loss, read by the kernel.
pub(crate) fn backward(logits: &Tensor, gy: &Tensor, saved: &Saved) -> Result<Tensor> {
    if gy.dtype() != DType::F32 || gy.elem_count() != 1 {
        return Err(Error::invalid(format!(
            "{OP}: the loss gradient is {} {}, not an f32 scalar",
            gy.dtype(),
            gy.shape(),
        )));
    }
    let sfx = suffix(logits.dtype())?;
    let (xs, gs) = (logits.storage(), gy.storage());
    let (xd, gd) = (dev(&xs)?, dev(&gs)?);
    let backend = xd.backend();
    let out = DeviceStorage::alloc(logits.dtype(), saved.rows * saved.cols.ld, xd.device())?;
    if saved.rows > 0 {
        let params = CrossEntropyParams {
            x: xd.device_ptr(),
            targets: saved.targets.device_ptr(),
            lse: saved.lse.device_ptr(),
            losses: 0,
            gy: gd.device_ptr(),
            out: out.device_ptr(),
            rows: int(saved.rows)?,
            v: int(saved.cols.v)?,
            n_valid: int(saved.n_valid)?,
            ld: int(saved.cols.ld)?,
        };
        let cfg = rows_config(backend, saved.rows);
        backend.launch(&format!("cross_entropy_bwd_{sfx}"), &cfg, &params)?;
    }
    Tensor::from_storage(Storage::Device(out), logits.shape().clone())
}
