//! Launchers of `kernels/layer_norm.cu`, one code path for the CUDA backend and the
//! simulator.

use crate::device::LaunchConfig;
use crate::ops::elementwise::cuda::suffix;
use crate::storage::{DeviceStorage, Storage};
use crate::{DType, Error, Result, Shape, Tensor};

/// Twin of `LayerNormParams` in `kernels/layer_norm.cu` (the size is checked against the
/// compiled struct by a kernel test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LayerNormParams {
    pub x: u64,
    pub gamma: u64,
    pub beta: u64,
    pub y: u64,
    pub mean: u64,
    pub rstd: u64,
    pub gy: u64,
    pub gx: u64,
    pub ggamma: u64,
    pub gbeta: u64,
    pub rows: i64,
    pub c: i64,
    pub row_blocks: i64,
    pub partials: u64,
    pub chunks: i64,
    pub eps: f32,
    /// 1: the backward runs `backward_fused` in every block.
    pub fused: i32,
}

/// Every kernel the launchers may launch (checked against the compiled modules by the tidy
/// test).
pub(crate) const KERNELS: &[&str] = &[
    "layer_norm_fwd_f32",
    "layer_norm_fwd_bf16",
    "layer_norm_fwd_f16",
    "layer_norm_bwd_f32",
    "layer_norm_bwd_bf16",
    "layer_norm_bwd_f16",
    "layer_norm_params_bwd_f32",
    "layer_norm_params_bwd_bf16",
    "layer_norm_params_bwd_f16",
];

/// Threads per block and rows per block (one warp per row), the header's launch geometry.
pub(crate) const THREADS: usize = 256;
const WARPS: usize = THREADS / 32;

/// The host twin of the kernels' `row_in_registers`: rows of `c` values of `dtype` are held
/// in registers as 16-byte vectors when `c` is a multiple of the vector width, at most 1024,
/// and every row pointer (`ptrs`) is 16-byte aligned.
pub(crate) fn row_in_registers(dtype: DType, c: usize, ptrs: &[u64]) -> bool {
    let width = 16 / dtype.size_in_bytes();
    c.is_multiple_of(width) && c <= 1024 && ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// Dynamic shared bytes of `backward_fused` for rows of `c ≤ 1024` values (the register
/// path's limit): two f32 staging rows per warp (`gy·n`, `gy`), 64 KiB at most.
pub(crate) fn fused_shared_bytes(c: usize) -> u32 {
    (2 * WARPS * c.min(1024) * 4) as u32
}

const OP: &str = "layer_norm";

fn dev(s: &Storage) -> Result<&DeviceStorage> {
    match s {
        Storage::Device(d) => Ok(d),
        Storage::Cpu(_) => Err(Error::invalid(format!(
            "{OP}: a CPU tensor reached the kernel launcher"
        ))),
    }
}

fn int(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{OP}: {v} overflows i64")))
}

fn new_tensor(dtype: DType, shape: Shape, like: &DeviceStorage) -> Result<Tensor> {
    let s = DeviceStorage::alloc(dtype, shape.elem_count(), like.device())?;
    Tensor::from_storage(Storage::Device(s), shape)
}

fn ptr(t: &Tensor) -> Result<u64> {
    Ok(dev(&t.storage())?.device_ptr())
}

/// The forward: `(y, mean, rstd)` with `mean`, `rstd` f32 tensors `[rows]` on the device
/// (shapes validated by the caller).
pub(crate) fn forward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = gamma.elem_count();
    let rows = x.elem_count() / c;
    let name = format!("layer_norm_fwd_{}", suffix(x.dtype())?);
    let xs = x.storage();
    let xd = dev(&xs)?;
    let y = new_tensor(x.dtype(), x.shape().clone(), xd)?;
    let mean = new_tensor(DType::F32, Shape::from([rows]), xd)?;
    let rstd = new_tensor(DType::F32, Shape::from([rows]), xd)?;
    if rows > 0 {
        let params = LayerNormParams {
            x: xd.device_ptr(),
            gamma: ptr(gamma)?,
            beta: ptr(beta)?,
            y: ptr(&y)?,
            mean: ptr(&mean)?,
            rstd: ptr(&rstd)?,
            rows: int(rows)?,
            c: int(c)?,
            eps: eps as f32,
            ..Default::default()
        };
        let backend = xd.backend();
        let cfg = LaunchConfig::grid_stride(rows, WARPS as u32, backend.max_blocks());
        let cfg = LaunchConfig {
            block: [THREADS as u32, 1, 1],
            ..cfg
        };
        backend.launch(&name, &cfg, &params)?;
    }
    Ok((y, mean, rstd))
}

/// `gx`, and `(ggamma, gbeta)`, each when wanted.
pub(crate) type Grads = (Option<Tensor>, Option<(Tensor, Tensor)>);

/// The backward: `gx` when `want_x`, `(ggamma, gbeta)` when `want_params`, from the saved
/// f32 row statistics.
pub(crate) fn backward(
    x: &Tensor,
    gamma: &Tensor,
    gy: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    want_x: bool,
    want_params: bool,
) -> Result<Grads> {
    let c = gamma.elem_count();
    let rows = x.elem_count() / c;
    let dtype = x.dtype();
    let name = format!("layer_norm_bwd_{}", suffix(dtype)?);
    let xs = x.storage();
    let xd = dev(&xs)?;
    let gx = if want_x {
        Some(new_tensor(dtype, x.shape().clone(), xd)?)
    } else {
        None
    };
    let gp = if want_params {
        Some((
            new_tensor(gamma.dtype(), gamma.shape().clone(), xd)?,
            new_tensor(gamma.dtype(), gamma.shape().clone(), xd)?,
        ))
    } else {
        None
    };
    let backend = xd.backend();
    let cap = backend.max_blocks() as usize;
    let row_blocks = if want_x && rows > 0 {
        rows.div_ceil(WARPS).clamp(1, cap)
    } else {
        0
    };
    // The parameter sums: K row chunks × G channel groups of work units.
    let chunks = rows.div_ceil(super::cpu::ROW_CHUNK);
    let chan_blocks = if want_params {
        (chunks * c.div_ceil(THREADS)).clamp(1, cap)
    } else {
        0
    };
    // Both wanted and the rows fit the register path: one pass (`backward_fused`), a block
    // per chunk (grid-stride past the cap), instead of gx blocks beside chunk-sum blocks.
    let gx_ptr = gx.as_ref().map_or(Ok(0), ptr)?;
    let fused = want_x
        && want_params
        && rows > 0
        && row_in_registers(dtype, c, &[xd.device_ptr(), ptr(gy)?, gx_ptr, ptr(gamma)?]);
    let (row_blocks, chan_blocks) = if fused {
        (0, chunks.clamp(1, cap))
    } else {
        (row_blocks, chan_blocks)
    };
    let partials = if want_params {
        Some(DeviceStorage::alloc(
            DType::F32,
            (2 * chunks * c).max(1),
            xd.device(),
        )?)
    } else {
        None
    };
    if row_blocks + chan_blocks == 0 {
        return Ok((gx, gp));
    }
    let grid = u32::try_from(row_blocks + chan_blocks)
        .map_err(|_| Error::invalid(format!("{OP}: the grid overflows")))?;
    let opt_ptr = |t: Option<&Tensor>| t.map_or(Ok(0), ptr);
    let params = LayerNormParams {
        x: xd.device_ptr(),
        gamma: ptr(gamma)?,
        mean: ptr(mean)?,
        rstd: ptr(rstd)?,
        gy: ptr(gy)?,
        gx: opt_ptr(gx.as_ref())?,
        ggamma: opt_ptr(gp.as_ref().map(|p| &p.0))?,
        gbeta: opt_ptr(gp.as_ref().map(|p| &p.1))?,
        rows: int(rows)?,
        c: int(c)?,
        row_blocks: int(row_blocks)?,
        partials: partials.as_ref().map_or(0, DeviceStorage::device_ptr),
        chunks: int(chunks)?,
        fused: i32::from(fused),
        ..Default::default()
    };
    let shared_bytes = if fused { fused_shared_bytes(c) } else { 0 };
    if shared_bytes > 48 * 1024 {
        backend.opt_in_dynamic_shared(&name, shared_bytes)?;
    }
    let cfg = LaunchConfig {
        grid: [grid, 1, 1],
        block: [THREADS as u32, 1, 1],
        shared_bytes,
    };
    backend.launch(&name, &cfg, &params)?;
    if want_params {
        // In stream order after the chunk sums; the scratch is freed in stream order too.
        // One warp per channel.
        let blocks = c.div_ceil(WARPS).clamp(1, cap) as u32;
        let cfg = LaunchConfig {
            grid: [blocks, 1, 1],
            shared_bytes: 0,
            ..cfg
        };
        backend.launch(
            &format!("layer_norm_params_bwd_{}", suffix(dtype)?),
            &cfg,
            &params,
        )?;
    }
    Ok((gx, gp))
}
