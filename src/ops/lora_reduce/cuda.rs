//! Launchers of `kernels/lora_reduce.cu`, one code path for the CUDA backend and the
//! simulator: the partials into an f32 workspace, then the chunk sums.

use super::{Plan, TILE, TokenReduce};
use crate::device::LaunchConfig;
use crate::ops::lora_matmul::Operand;
use crate::storage::{DeviceStorage, Storage};
use crate::{DType, Error, Result, Shape, Tensor};

/// Twin of `LoraReduceParams` in `kernels/lora_reduce.cu` (the size is checked against the
/// compiled struct by a kernel test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LoraReduceParams {
    pub l: u64,
    pub r: u64,
    pub c: u64,
    pub ws: u64,
    pub tokens: i64,
    pub big: i64,
    pub small: i64,
    pub l_rs: i64,
    pub l_cs: i64,
    pub r_rs: i64,
    pub r_cs: i64,
    pub c_rs: i64,
    pub c_cs: i64,
    pub chunk: i64,
    pub chunks: i64,
    pub alpha: f32,
    pub accumulate: i32,
}

/// Every kernel the launcher may launch (checked against the compiled modules by the tidy
/// test).
pub(crate) const KERNELS: &[&str] = &[
    "lora_reduce_bwd_f32",
    "lora_reduce_bwd_bf16",
    "lora_reduce_bwd_f16",
    "lora_reduce_sum_bwd_f32",
    "lora_reduce_sum_bwd_bf16",
    "lora_reduce_sum_bwd_f16",
];

/// Threads of a partials block and of a second-pass block (the header's geometry).
pub(crate) const THREADS: u32 = 128;
pub(crate) const SUM_THREADS: u32 = 256;

const OP: &str = "lora_reduce";

fn suffix(dtype: DType) -> Result<&'static str> {
    crate::ops::elementwise::cuda::suffix(dtype)
}

/// The device address of an operand's first element.
fn address(o: &Operand<'_>) -> Result<u64> {
    match &*o.t.storage() {
        Storage::Device(d) => Ok(d.device_ptr() + (o.offset * o.t.dtype().size_in_bytes()) as u64),
        Storage::Cpu(_) => Err(Error::invalid(format!(
            "{OP}: a CPU tensor reached the kernel launcher"
        ))),
    }
}

fn int(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{OP}: {v} overflows i64")))
}

/// Launches the reduction into `c` (`[m, n]` contiguous): `C = …` or `C += …`. Returns the
/// workspace `[chunks, big, small]` (f32) the second pass summed, `None` when it is empty.
pub(crate) fn launch(
    red: &TokenReduce<'_>,
    plan: &Plan,
    c: &Tensor,
    accumulate: bool,
) -> Result<Option<Tensor>> {
    if red.m == 0 || red.n == 0 {
        return Ok(None);
    }
    let dtype = c.dtype();
    let sfx = suffix(dtype)?;
    let (bo, so) = if plan.swapped {
        (&red.r, &red.l)
    } else {
        (&red.l, &red.r)
    };
    let (c_rs, c_cs) = if plan.swapped {
        (1, plan.big)
    } else {
        (plan.small, 1)
    };
    let cs = c.storage();
    let cd: &DeviceStorage = match &*cs {
        Storage::Device(d) => d,
        Storage::Cpu(_) => {
            return Err(Error::invalid(format!(
                "{OP}: a CPU output reached the kernel launcher"
            )));
        }
    };
    let plane = plan.big * plan.small;
    let ws_len = plan
        .chunks
        .checked_mul(plane)
        .ok_or_else(|| Error::invalid(format!("{OP}: the workspace overflows")))?;
    let ws = DeviceStorage::alloc(DType::F32, ws_len.max(1), cd.device())?;
    let params = LoraReduceParams {
        l: address(bo)?,
        r: address(so)?,
        c: cd.device_ptr(),
        ws: ws.device_ptr(),
        tokens: int(red.t)?,
        big: int(plan.big)?,
        small: int(plan.small)?,
        l_rs: int(bo.row_stride)?,
        l_cs: int(bo.col_stride)?,
        r_rs: int(so.row_stride)?,
        r_cs: int(so.col_stride)?,
        c_rs: int(c_rs)?,
        c_cs: int(c_cs)?,
        chunk: int(plan.chunk)?,
        chunks: int(plan.chunks)?,
        alpha: red.alpha as f32,
        accumulate: accumulate as i32,
    };
    let backend = cd.backend();
    if plan.chunks > 0 {
        let chunks = u32::try_from(plan.chunks)
            .ok()
            .filter(|&x| x < i32::MAX as u32)
            .ok_or_else(|| {
                Error::invalid(format!("{OP}: {} chunks exceed the grid", plan.chunks))
            })?;
        let tiles = u32::try_from(plan.big.div_ceil(TILE))
            .ok()
            .filter(|&y| y <= 65_535)
            .ok_or_else(|| Error::invalid(format!("{OP}: {} rows exceed the grid", plan.big)))?;
        let cfg = LaunchConfig {
            grid: [chunks, tiles, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        };
        backend.launch(&format!("lora_reduce_bwd_{sfx}"), &cfg, &params)?;
    }
    // In stream order after the partials; the workspace is freed in stream order too.
    let cfg = LaunchConfig::grid_stride(plane, SUM_THREADS, backend.max_blocks());
    backend.launch(&format!("lora_reduce_sum_bwd_{sfx}"), &cfg, &params)?;
    if ws_len == 0 {
        return Ok(None);
    }
    let shape = Shape::from([plan.chunks, plan.big, plan.small]);
    Ok(Some(Tensor::from_storage(Storage::Device(ws), shape)?))
}
