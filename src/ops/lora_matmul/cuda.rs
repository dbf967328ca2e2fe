//! Launcher of `kernels/lora_matmul.cu`, one code path for the CUDA backend and the
//! simulator.

use super::{Gemm, Operand, Variant};
use crate::device::LaunchConfig;
use crate::storage::{DeviceStorage, Storage};
use crate::{DType, Error, Result, Tensor};

/// Twin of `LoraMatmulParams` in `kernels/lora_matmul.cu` (the size is checked against the
/// compiled struct by a kernel test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LoraMatmulParams {
    pub a: u64,
    pub b: u64,
    pub a2: u64,
    pub b2: u64,
    pub c: u64,
    pub bias: u64,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub k2: i64,
    pub a_rs: i64,
    pub a_cs: i64,
    pub b_rs: i64,
    pub b_cs: i64,
    pub a2_rs: i64,
    pub a2_cs: i64,
    pub b2_rs: i64,
    pub b2_cs: i64,
    pub ldc: i64,
    pub b2_n0: i64,
    pub b2_n1: i64,
    pub alpha: f32,
    pub accumulate: i32,
}

/// Every kernel the launcher may launch (checked against the compiled modules by the tidy
/// test).
pub(crate) const KERNELS: &[&str] = &[
    "lora_matmul_fwd_f32",
    "lora_matmul_fwd_bf16",
    "lora_matmul_fwd_f16",
    "lora_matmul_tc_fwd_bf16",
    "lora_matmul_tc_fwd_f16",
];

/// The tile of C one block computes (the header's launch geometry).
const TILE: usize = 64;
const SIMT_THREADS: u32 = 256;
const TC_THREADS: u32 = 128;

/// The kernel for `dtype` and `variant`, and its block size.
pub(crate) fn kernel(dtype: DType, variant: Variant) -> Result<(&'static str, u32)> {
    let tc = match variant {
        Variant::Auto => dtype != DType::F32,
        Variant::Simt => false,
        Variant::TensorCore => true,
    };
    Ok(match (dtype, tc) {
        (DType::F32, false) => ("lora_matmul_fwd_f32", SIMT_THREADS),
        (DType::BF16, false) => ("lora_matmul_fwd_bf16", SIMT_THREADS),
        (DType::F16, false) => ("lora_matmul_fwd_f16", SIMT_THREADS),
        (DType::BF16, true) => ("lora_matmul_tc_fwd_bf16", TC_THREADS),
        (DType::F16, true) => ("lora_matmul_tc_fwd_f16", TC_THREADS),
        (dt, _) => {
            return Err(Error::Unsupported {
                op: "lora_matmul",
                msg: format!("no {dt} kernel"),
            })
        }
    })
}

/// The device address of an operand's first element.
fn address(o: &Operand<'_>) -> Result<u64> {
    let s = o.t.storage();
    match &*s {
        Storage::Device(d) => Ok(d.device_ptr() + (o.offset * o.t.dtype().size_in_bytes()) as u64),
        Storage::Cpu(_) => Err(Error::invalid(
            "lora_matmul: a CPU tensor reached the kernel launcher".to_string(),
        )),
    }
}

fn int(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("lora_matmul: {v} overflows i64")))
}

/// Launches the product into `c` (`[m, n]` contiguous): `C = …` or `C += …`.
pub(crate) fn launch(g: &Gemm<'_>, c: &Tensor, accumulate: bool) -> Result<()> {
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let dtype = c.dtype();
    let (name, threads) = kernel(dtype, g.variant)?;
    let (a2, b2, a2_rs, a2_cs, b2_rs, b2_cs, k2, n0, n1) = match &g.ext {
        Some(e) if e.k2 > 0 && !e.cols.is_empty() => (
            address(&e.a2)?,
            address(&e.b2)?,
            e.a2.row_stride,
            e.a2.col_stride,
            e.b2.row_stride,
            e.b2.col_stride,
            e.k2,
            e.cols.start,
            e.cols.end,
        ),
        _ => (0, 0, 0, 0, 0, 0, 0, 0, 0),
    };
    let grid_x = g.n.div_ceil(TILE);
    let grid_y = g.m.div_ceil(TILE);
    let grid_y = u32::try_from(grid_y)
        .ok()
        .filter(|&y| y <= 65_535)
        .ok_or_else(|| Error::invalid(format!("lora_matmul: {} rows exceed the grid", g.m)))?;
    let grid_x = u32::try_from(grid_x)
        .map_err(|_| Error::invalid(format!("lora_matmul: {} columns exceed the grid", g.n)))?;
    let cs = c.storage();
    let cd: &DeviceStorage = match &*cs {
        Storage::Device(d) => d,
        Storage::Cpu(_) => {
            return Err(Error::invalid(
                "lora_matmul: a CPU output reached the kernel launcher".to_string(),
            ))
        }
    };
    let params = LoraMatmulParams {
        a: address(&g.a)?,
        b: address(&g.b)?,
        a2,
        b2,
        c: cd.device_ptr(),
        bias: g
            .bias
            .map(|t| address(&Operand::rows(t, 1)))
            .transpose()?
            .unwrap_or(0),
        m: int(g.m)?,
        n: int(g.n)?,
        k: int(g.k)?,
        k2: int(k2)?,
        a_rs: int(g.a.row_stride)?,
        a_cs: int(g.a.col_stride)?,
        b_rs: int(g.b.row_stride)?,
        b_cs: int(g.b.col_stride)?,
        a2_rs: int(a2_rs)?,
        a2_cs: int(a2_cs)?,
        b2_rs: int(b2_rs)?,
        b2_cs: int(b2_cs)?,
        ldc: int(g.n)?,
        b2_n0: int(n0)?,
        b2_n1: int(n1)?,
        alpha: g.alpha as f32,
        accumulate: accumulate as i32,
    };
    let cfg = LaunchConfig {
        grid: [grid_x, grid_y, 1],
        block: [threads, 1, 1],
        shared_bytes: 0,
    };
    cd.backend().launch(name, &cfg, &params)
}
