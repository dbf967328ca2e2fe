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
    "lora_matmul_tc128_fwd_bf16",
    "lora_matmul_tc128_fwd_f16",
    "lora_matmul_tc64_fwd_bf16",
    "lora_matmul_tc64_fwd_f16",
];

/// The SIMT kernel: one 64×64 tile of C per block (`blockIdx.x` the tile column,
/// `blockIdx.y` the tile row), 256 threads.
const SIMT_TILE: usize = 64;
const SIMT_THREADS: u32 = 256;

/// The two tensor-core configurations of the header: the tile of C per block, the
/// threads, the dynamic shared memory (3 stages of A and B k-tiles, 32 deep, 2 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcConfig {
    pub tile: usize,
    pub threads: u32,
    pub smem: u32,
}

/// 128×128 tiles, 8 warps, 48 KiB.
pub(crate) const TC_LARGE: TcConfig = TcConfig {
    tile: 128,
    threads: 256,
    smem: 3 * (128 + 128) * 32 * 2,
};
/// 64×64 tiles, 4 warps, 24 KiB.
pub(crate) const TC_SMALL: TcConfig = TcConfig {
    tile: 64,
    threads: 128,
    smem: 3 * (64 + 64) * 32 * 2,
};

/// The streaming multiprocessors of an H100 SXM / H200: the wave the heuristic fills.
const SMS: usize = 132;

/// The tile heuristic (the header's): 128×128 tiles when M and N both exceed 64 and the
/// 128×128 grid has at least one wave of tiles (`SMS`); 64×64 tiles otherwise, so the
/// skinny LoRA products (`N = r` or `M = r`) and small shapes still spread over the SMs.
/// `LORAFUSE_GEMM_TILE=128` or `=64` pins one tile for every shape (an A/B switch for GPU
/// runs).
pub(crate) fn tc_config(m: usize, n: usize) -> TcConfig {
    static PINNED: std::sync::OnceLock<Option<TcConfig>> = std::sync::OnceLock::new();
    let pinned = PINNED.get_or_init(|| match std::env::var("LORAFUSE_GEMM_TILE").as_deref() {
        Ok("128") => Some(TC_LARGE),
        Ok("64") => Some(TC_SMALL),
        _ => None,
    });
    if let Some(c) = pinned {
        return *c;
    }
    if m > 64 && n > 64 && m.div_ceil(128) * n.div_ceil(128) >= SMS {
        TC_LARGE
    } else {
        TC_SMALL
    }
}

/// How one launch runs: the kernel, its block size, shared memory and tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub name: &'static str,
    pub threads: u32,
    pub smem: u32,
    /// `None` for the SIMT kernel (2-D grid); the tensor-core tile otherwise (1-D grid of
    /// rasterized tiles).
    pub tc: Option<TcConfig>,
}

/// The kernel for `dtype`, `variant` and the output shape `[m, n]`.
pub(crate) fn plan(dtype: DType, variant: Variant, m: usize, n: usize) -> Result<Plan> {
    let tc = match variant {
        Variant::Auto if dtype != DType::F32 => Some(tc_config(m, n)),
        Variant::Auto | Variant::Simt => None,
        Variant::TensorCore => Some(tc_config(m, n)),
        Variant::TensorCore128 => Some(TC_LARGE),
        Variant::TensorCore64 => Some(TC_SMALL),
        Variant::Wgmma | Variant::Wgmma128 | Variant::Wgmma256 => {
            return Err(Error::Unsupported {
                op: "lora_matmul",
                msg: format!("{variant:?} runs the wgmma kernel, not a plan of the sm_80 ones"),
            });
        }
    };
    let name = match (dtype, tc.map(|c| c.tile)) {
        (DType::F32, None) => "lora_matmul_fwd_f32",
        (DType::BF16, None) => "lora_matmul_fwd_bf16",
        (DType::F16, None) => "lora_matmul_fwd_f16",
        (DType::BF16, Some(128)) => "lora_matmul_tc128_fwd_bf16",
        (DType::F16, Some(128)) => "lora_matmul_tc128_fwd_f16",
        (DType::BF16, Some(_)) => "lora_matmul_tc64_fwd_bf16",
        (DType::F16, Some(_)) => "lora_matmul_tc64_fwd_f16",
        (dt, _) => {
            return Err(Error::Unsupported {
                op: "lora_matmul",
                msg: format!("no {dt} kernel for {variant:?}"),
            });
        }
    };
    Ok(match tc {
        Some(c) => Plan {
            name,
            threads: c.threads,
            smem: c.smem,
            tc: Some(c),
        },
        None => Plan {
            name,
            threads: SIMT_THREADS,
            smem: 0,
            tc: None,
        },
    })
}

/// How the tensor-core kernel brings one operand's k-tiles into shared memory: the host twin
/// of `tc_mode` in `kernels/lora_matmul.cu` (the kernel decides at run time from the
/// parameters; keep the two in step). What a planning test checks before a GPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// Read by the planning tests only.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum TcLoad {
    /// 16-byte `cp.async` copies along the reduction (the K layout: `ks = 1`, the outer
    /// stride a multiple of 8 elements, a 16-byte-aligned base).
    KContiguous,
    /// 16-byte `cp.async` copies along the outer index (the O layout: `os = 1`, the
    /// reduction stride and the first outer index multiples of 8, an aligned base).
    OuterContiguous,
    /// The register-staged fallback: element loads, latency exposed (~0.2–0.3 of the
    /// floor, the header's estimate).
    Fallback,
}

#[cfg_attr(not(test), allow(dead_code))]
impl TcLoad {
    /// `tc_mode(ptr, os, ks, o_lo)` for a base `byte_offset` bytes past a 16-byte-aligned
    /// allocation.
    fn of(byte_offset: usize, os: usize, ks: usize, o_lo: usize) -> TcLoad {
        const VEC: usize = 8; // kVec: bf16/f16 values per 16 bytes
        let aligned = byte_offset.is_multiple_of(16);
        if ks == 1 && os.is_multiple_of(VEC) && aligned {
            TcLoad::KContiguous
        } else if os == 1 && ks.is_multiple_of(VEC) && o_lo.is_multiple_of(VEC) && aligned {
            TcLoad::OuterContiguous
        } else {
            TcLoad::Fallback
        }
    }
}

/// The tensor-core kernel's path through one product: each operand's loads (the
/// extension's when it has one) and whether the epilogue stores 16-byte vectors (`ldc = n`
/// a multiple of 8, an aligned bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct TcPath {
    pub a: TcLoad,
    pub b: TcLoad,
    pub ext: Option<(TcLoad, TcLoad)>,
    pub vector_epilogue: bool,
}

#[cfg_attr(not(test), allow(dead_code))]
impl TcPath {
    /// No operand on the fallback loader and a vector epilogue.
    pub fn is_fast(&self) -> bool {
        let fast = |l: TcLoad| l != TcLoad::Fallback;
        fast(self.a)
            && fast(self.b)
            && self.ext.is_none_or(|(a2, b2)| fast(a2) && fast(b2))
            && self.vector_epilogue
    }
}

/// The path `g` takes on the tensor-core kernel (bf16/f16: 2-byte elements), for device
/// tensors (allocations 16-byte aligned: 256 on CUDA, 16 on the simulator, so an
/// operand's alignment is its offset's) and a fresh output.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn tc_path(g: &Gemm<'_>) -> TcPath {
    const S: usize = 2;
    let load =
        |o: &Operand<'_>, os: usize, ks: usize, o_lo: usize| TcLoad::of(o.offset * S, os, ks, o_lo);
    TcPath {
        a: load(&g.a, g.a.row_stride, g.a.col_stride, 0),
        b: load(&g.b, g.b.col_stride, g.b.row_stride, 0),
        ext: g
            .ext
            .as_ref()
            .filter(|e| e.k2 > 0 && !e.cols.is_empty())
            .map(|e| {
                (
                    load(&e.a2, e.a2.row_stride, e.a2.col_stride, 0),
                    load(&e.b2, e.b2.col_stride, e.b2.row_stride, e.cols.start),
                )
            }),
        vector_epilogue: g.n.is_multiple_of(8),
    }
}

/// The device address of an operand's first element.
pub(super) fn address(o: &Operand<'_>) -> Result<u64> {
    let s = o.t.storage();
    match &*s {
        Storage::Device(d) => Ok(d.device_ptr() + (o.offset * o.t.dtype().size_in_bytes()) as u64),
        Storage::Cpu(_) => Err(Error::invalid(
            "lora_matmul: a CPU tensor reached the kernel launcher".to_string(),
        )),
    }
}

pub(super) fn int(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("lora_matmul: {v} overflows i64")))
}

/// Launches the product into `c` (`[m, n]` contiguous): `C = …` or `C += …`.
pub(crate) fn launch(g: &Gemm<'_>, c: &Tensor, accumulate: bool) -> Result<()> {
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let dtype = c.dtype();
    {
        let cs = c.storage();
        if let Storage::Device(d) = &*cs
            && super::wgmma::try_launch(g, d, dtype, accumulate)?
        {
            return Ok(());
        }
    }
    let plan = plan(dtype, g.variant, g.m, g.n)?;
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
    let too_big = || Error::invalid(format!("lora_matmul: [{}, {}] exceeds the grid", g.m, g.n));
    let grid = match plan.tc {
        // One block per tile, the tile order rasterized by the kernel: a 1-D grid.
        Some(tc) => {
            let tiles = g.m.div_ceil(tc.tile).checked_mul(g.n.div_ceil(tc.tile));
            let x = tiles
                .and_then(|t| u32::try_from(t).ok())
                .filter(|&t| t <= i32::MAX as u32)
                .ok_or_else(too_big)?;
            [x, 1, 1]
        }
        None => {
            let y = u32::try_from(g.m.div_ceil(SIMT_TILE))
                .ok()
                .filter(|&y| y <= 65_535)
                .ok_or_else(too_big)?;
            let x = u32::try_from(g.n.div_ceil(SIMT_TILE)).map_err(|_| too_big())?;
            [x, y, 1]
        }
    };
    let cs = c.storage();
    let cd: &DeviceStorage = match &*cs {
        Storage::Device(d) => d,
        Storage::Cpu(_) => {
            return Err(Error::invalid(
                "lora_matmul: a CPU output reached the kernel launcher".to_string(),
            ));
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
        grid,
        block: [plan.threads, 1, 1],
        shared_bytes: plan.smem,
    };
    cd.backend().launch(plan.name, &cfg, &params)
}
