//! Launcher of `kernels/lora_matmul_wgmma.cu`, the Hopper (sm_90a) GEMM: when it runs
//! ([`choose`]), the operands it takes ([`eligible`]), its tile ([`tile_for`]) and the tensor
//! maps it reads through TMA.

use super::{Gemm, Operand, Variant, cuda};
use crate::device::{Backend, LaunchConfig, TensorMap, TensorMap2d};
use crate::ops::hopper;
pub(crate) use crate::ops::hopper::Target;
use crate::storage::DeviceStorage;
use crate::{DType, Error, Result};

const OP: &str = "lora_matmul";

/// Twin of `LoraMatmulWgmmaParams` in `kernels/lora_matmul_wgmma.cu` (the size is checked
/// against the compiled struct by a kernel test): four tensor maps, then the product's
/// scalars, padded to the maps' 64-byte alignment as C++ pads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct WgmmaParams {
    pub a: TensorMap,
    pub b: TensorMap,
    pub a2: TensorMap,
    pub b2: TensorMap,
    pub c: u64,
    pub bias: u64,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub k2: i64,
    pub ldc: i64,
    pub b2_n0: i64,
    pub b2_n1: i64,
    pub alpha: f32,
    pub accumulate: i32,
    pub b_mn_major: i32,
    pub pad: i32,
    pub _pad: [u64; 5],
}

/// Every kernel of the module (checked against it by the tidy test).
pub(crate) const KERNELS: &[&str] = &[
    "lora_matmul_wgmma256_fwd_bf16",
    "lora_matmul_wgmma256_fwd_f16",
    "lora_matmul_wgmma128_fwd_bf16",
    "lora_matmul_wgmma128_fwd_f16",
];

/// Threads per block: a producer and two consumer warpgroups.
pub(crate) const THREADS: u32 = 384;

/// Tile rows, the k-tile depth, the pipeline's stages (the header's constants).
const BM: usize = 128;
const BK: u32 = 64;
const STAGES: u32 = 4;

/// The dynamic shared memory of a 128×`bn` tile: 1024 bytes of alignment slack, the stages,
/// two mbarriers per stage.
pub(crate) fn smem_bytes(bn: usize) -> u32 {
    1024 + STAGES * (BM as u32 + bn as u32) * BK * 2 + 2 * STAGES * 8
}

/// The automatic Hopper GEMM's switch.
static HOPPER: hopper::Switch = hopper::Switch::new("LORAFUSE_GEMM_HOPPER");

/// Whether the products that qualify take the Hopper GEMM (`kernels/lora_matmul_wgmma.cu`)
/// on a compute-capability 9.0 GPU: on by default, off when the environment had
/// `LORAFUSE_GEMM_HOPPER=0` at the first product, or as [`set_hopper_gemm`] last set it.
pub fn hopper_gemm() -> bool {
    HOPPER.get()
}

/// Turns the automatic Hopper GEMM path on or off for the products launched after it (an
/// A/B switch for benchmarks: `false` runs every product on the sm_80 kernels). Products
/// that do not qualify, and GPUs other than compute capability 9.0, never take it.
pub fn set_hopper_gemm(on: bool) {
    HOPPER.set(on);
}

/// Whether `device` can run the Hopper GEMM at all: a CUDA GPU of compute capability 9.0
/// whose `lora_matmul_wgmma` module loaded from the sm_90a cubin (built by nvcc). False on
/// the CPU and the simulator (where only the kernel tests force it); an error when the GPU
/// cannot be used.
pub fn hopper_gemm_available(device: &crate::Device) -> Result<bool> {
    hopper::available(device, KERNELS[0])
}

/// Whether a product runs on the Hopper kernel: always for the forced variants (an error
/// when the GPU cannot run it or an operand does not qualify, `why_not`), and for `Auto` /
/// `TensorCore` on a GPU with the `sm_90a` cubin when the operands qualify, the dtype is
/// bf16/f16 and the switch [`hopper_gemm`] is on (`disabled` when off). Every other GPU and
/// variant keeps the sm_80 kernel.
pub(crate) fn choose(
    variant: Variant,
    dtype: DType,
    target: Target,
    why_not: Option<&str>,
    disabled: bool,
) -> Result<bool> {
    let run = |forced| hopper::choose(OP, "wgmma kernel", forced, target, why_not, disabled);
    match variant {
        Variant::Wgmma | Variant::Wgmma128 | Variant::Wgmma256 => run(true),
        Variant::Auto | Variant::TensorCore => Ok(dtype != DType::F32 && run(false)?),
        Variant::Simt | Variant::TensorCore128 | Variant::TensorCore64 => Ok(false),
    }
}

/// Why one operand cannot be a TMA box source, if it cannot: it must be K-major (`ks = 1`,
/// rows of `kext` values `os` elements apart), or for B and B2 (`mn_ok`) MN-major (`os = 1`,
/// `rows` values contiguous, k-rows `ks` apart); the row pitch `·2` a multiple of 16 bytes
/// and at least a row, a 16-byte-aligned first element (`offset` elements into a
/// 256-byte-aligned allocation), and fewer than 2^31 rows (32-bit coordinates).
fn why_not_operand(
    name: &str,
    o: &Operand<'_>,
    os: usize,
    ks: usize,
    kext: usize,
    rows: usize,
    mn_ok: bool,
) -> Option<String> {
    const S: usize = 2;
    let (pitch, line) = if ks == 1 {
        (os, kext)
    } else if mn_ok && os == 1 {
        (ks, rows)
    } else if mn_ok {
        return Some(format!(
            "{name} is contiguous along neither the reduction nor its other dimension (strides {ks}, {os})"
        ));
    } else {
        return Some(format!(
            "{name} is not contiguous along the reduction (stride {ks})"
        ));
    };
    if !(pitch * S).is_multiple_of(16) || pitch < line {
        return Some(format!(
            "{name}'s rows are {pitch} elements apart (TMA needs a multiple of 8, at least {line})"
        ));
    }
    if !(o.offset * S).is_multiple_of(16) {
        return Some(format!(
            "{name} starts {} elements into its tensor (not 16-byte aligned)",
            o.offset
        ));
    }
    if rows >= 1 << 31 || kext >= 1 << 31 {
        return Some(format!("{name} is {rows}×{kext}: past 32-bit coordinates"));
    }
    None
}

/// Whether B (and B2) are read MN-major: contiguous along N rather than the reduction (the
/// LoRA backward `gx = [gy | s·v]·[W0 ; A]`). `eligible` checks that they agree.
pub(crate) fn b_mn_major(g: &Gemm<'_>) -> bool {
    g.b.row_stride != 1 && g.b.col_stride == 1
}

/// Why the product cannot run on the Hopper kernel, if it cannot (the host twin of the
/// kernel header's contract): A and A2 K-major, B and B2 both K-major or both MN-major, all
/// TMA-addressable, K ≥ 1, M and N below 2^31.
pub(crate) fn eligible(g: &Gemm<'_>) -> Option<String> {
    if g.k == 0 {
        return Some("K = 0".into());
    }
    if g.m >= 1 << 31 || g.n >= 1 << 31 {
        return Some(format!("[{}, {}] is past 32-bit coordinates", g.m, g.n));
    }
    let ext = g.ext.as_ref().filter(|e| e.k2 > 0 && !e.cols.is_empty());
    let mn = b_mn_major(g);
    why_not_operand("A", &g.a, g.a.row_stride, g.a.col_stride, g.k, g.m, false)
        .or_else(|| why_not_operand("B", &g.b, g.b.col_stride, g.b.row_stride, g.k, g.n, true))
        .or_else(|| {
            ext.and_then(|e| {
                let w = e.cols.len();
                why_not_operand(
                    "A2",
                    &e.a2,
                    e.a2.row_stride,
                    e.a2.col_stride,
                    e.k2,
                    g.m,
                    false,
                )
                .or_else(|| {
                    why_not_operand("B2", &e.b2, e.b2.col_stride, e.b2.row_stride, e.k2, w, true)
                })
                .or_else(|| {
                    let b2_mn = e.b2.row_stride != 1 && e.b2.col_stride == 1;
                    (b2_mn != mn).then(|| {
                        format!(
                            "B is {} but B2 is {} (the kernel reads both one way)",
                            if mn { "MN-major" } else { "K-major" },
                            if b2_mn { "MN-major" } else { "K-major" }
                        )
                    })
                })
            })
        })
}

/// The tile width for `[m, n]` on `sms` multiprocessors: 256 or 128, whichever gives the
/// fewer wave-quantized column-units of work, ceil(tiles / sms)·BN, a 128-wide tile
/// counted 10 % dearer (its B panel feeds half the FLOPs per byte of shared memory). E.g.
/// on 132 SMs: the GPT-2 c_proj forward (8192 × 768) takes 128 (2.9 full waves rather than
/// 1.5), the lm_head (8192 × 50304) and the headline (8192 × 4096) take 256.
pub(crate) fn tile_for(m: usize, n: usize, sms: usize) -> usize {
    let cost = |bn: usize| {
        let tiles = m.div_ceil(BM) * n.div_ceil(bn);
        let waves = tiles.div_ceil(sms.max(1)) as f64;
        waves * bn as f64 * if bn == 128 { 1.1 } else { 1.0 }
    };
    if cost(256) <= cost(128) { 256 } else { 128 }
}

/// The kernel of `dtype` with 128×`bn` tiles.
pub(crate) fn kernel_name(dtype: DType, bn: usize) -> Result<&'static str> {
    Ok(match (dtype, bn) {
        (DType::BF16, 256) => "lora_matmul_wgmma256_fwd_bf16",
        (DType::F16, 256) => "lora_matmul_wgmma256_fwd_f16",
        (DType::BF16, 128) => "lora_matmul_wgmma128_fwd_bf16",
        (DType::F16, 128) => "lora_matmul_wgmma128_fwd_f16",
        (dt, _) => {
            return Err(Error::Unsupported {
                op: "lora_matmul",
                msg: format!("no {dt} wgmma kernel with {bn}-wide tiles"),
            });
        }
    })
}

/// Runs the product on the Hopper kernel when [`choose`] says so: `Ok(true)` when it was
/// launched, `Ok(false)` when the sm_80 kernel should run it.
pub(crate) fn try_launch(
    g: &Gemm<'_>,
    out: &DeviceStorage,
    dtype: DType,
    accumulate: bool,
) -> Result<bool> {
    let forced = matches!(
        g.variant,
        Variant::Wgmma | Variant::Wgmma128 | Variant::Wgmma256
    );
    if !forced && !matches!(g.variant, Variant::Auto | Variant::TensorCore) {
        return Ok(false);
    }
    if !forced && (dtype == DType::F32 || !hopper_gemm()) {
        return Ok(false);
    }
    let backend = out.backend();
    let target = Target::of(backend, KERNELS[0], forced)?;
    let why_not = eligible(g);
    if !choose(g.variant, dtype, target, why_not.as_deref(), !hopper_gemm())? {
        return Ok(false);
    }
    let sms = backend.multiprocessors() as usize;
    let bn = match g.variant {
        Variant::Wgmma128 => 128,
        Variant::Wgmma256 => 256,
        _ => tile_for(g.m, g.n, sms),
    };
    launch(g, out, dtype, accumulate, bn, sms).map(|()| true)
}

/// A K-major operand's tensor map: `kext` elements along the reduction, `rows` rows, boxes of
/// 64 × `box_rows`, 128-byte swizzled.
fn map(
    backend: &Backend,
    o: &Operand<'_>,
    os: usize,
    kext: usize,
    rows: usize,
    box_rows: usize,
) -> Result<TensorMap> {
    let base = cuda::address(o)?;
    backend.encode_tensor_map(&TensorMap2d {
        base,
        elem_bytes: 2,
        dims: [kext as u64, rows as u64],
        stride1: (os * 2) as u64,
        box_dims: [BK, box_rows as u32],
        swizzle: 128,
    })
}

/// An MN-major B operand's tensor map: `cols` contiguous values per k-row, `kext` k-rows
/// `ks` elements apart, boxes of 64 columns × 64 k-rows, 128-byte swizzled.
fn map_mn(
    backend: &Backend,
    o: &Operand<'_>,
    ks: usize,
    kext: usize,
    cols: usize,
) -> Result<TensorMap> {
    let base = cuda::address(o)?;
    backend.encode_tensor_map(&TensorMap2d {
        base,
        elem_bytes: 2,
        dims: [cols as u64, kext as u64],
        stride1: (ks * 2) as u64,
        box_dims: [64, BK],
        swizzle: 128,
    })
}

fn launch(
    g: &Gemm<'_>,
    out: &DeviceStorage,
    dtype: DType,
    accumulate: bool,
    bn: usize,
    sms: usize,
) -> Result<()> {
    let backend = out.backend();
    let name = kernel_name(dtype, bn)?;
    let int = |v: usize| cuda::int(v);
    let mn = b_mn_major(g);
    let a = map(backend, &g.a, g.a.row_stride, g.k, g.m, BM)?;
    let b = if mn {
        map_mn(backend, &g.b, g.b.row_stride, g.k, g.n)?
    } else {
        map(backend, &g.b, g.b.col_stride, g.k, g.n, bn)?
    };
    let zero = TensorMap([0; 16]);
    let (a2, b2, k2, n0, n1) = match g.ext.as_ref().filter(|e| e.k2 > 0 && !e.cols.is_empty()) {
        Some(e) => (
            map(backend, &e.a2, e.a2.row_stride, e.k2, g.m, BM)?,
            if mn {
                map_mn(backend, &e.b2, e.b2.row_stride, e.k2, e.cols.len())?
            } else {
                map(backend, &e.b2, e.b2.col_stride, e.k2, e.cols.len(), bn)?
            },
            e.k2,
            e.cols.start,
            e.cols.end,
        ),
        None => (zero, zero, 0, 0, 0),
    };
    let params = WgmmaParams {
        a,
        b,
        a2,
        b2,
        c: out.device_ptr(),
        bias: g
            .bias
            .map(|t| cuda::address(&Operand::rows(t, 1)))
            .transpose()?
            .unwrap_or(0),
        m: int(g.m)?,
        n: int(g.n)?,
        k: int(g.k)?,
        k2: int(k2)?,
        ldc: int(g.n)?,
        b2_n0: int(n0)?,
        b2_n1: int(n1)?,
        alpha: g.alpha as f32,
        accumulate: accumulate as i32,
        b_mn_major: mn as i32,
        pad: 0,
        _pad: [0; 5],
    };
    let tiles = g.m.div_ceil(BM) * g.n.div_ceil(bn);
    let grid = tiles.min(sms).max(1) as u32;
    let smem = smem_bytes(bn);
    backend.opt_in_dynamic_shared(name, smem)?;
    let cfg = LaunchConfig {
        grid: [grid, 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: smem,
    };
    backend.launch(name, &cfg, &params)
}
