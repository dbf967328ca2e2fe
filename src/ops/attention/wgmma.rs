//! Launcher of `kernels/attention_wgmma.cu`, the Hopper (sm_90a) attention (FlashAttention-3
//! style): when it runs ([`choose`]), the shapes the forward and the backward take
//! ([`eligible`], [`backward_eligible`]), and the tensor maps they read `qkv` and `gy`
//! through.

use super::cpu::Dims;
use crate::device::{LaunchConfig, TensorMap, TensorMap2d};
use crate::ops::hopper;
pub(crate) use crate::ops::hopper::Target;
use crate::storage::DeviceStorage;
use crate::{DType, Error, Result};

const OP: &str = "causal_attention";

/// Twin of `AttentionWgmmaParams` in `kernels/attention_wgmma.cu` (the size is checked
/// against the compiled struct by a kernel test): the tensor map, then the scalars, padded to
/// the map's 64-byte alignment as C++ pads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct WgmmaAttentionParams {
    pub qkv: TensorMap,
    pub out: u64,
    pub lse: u64,
    pub b: i64,
    pub t: i64,
    pub c: i64,
    pub h: i64,
    pub scale: f32,
    pub pad: i32,
    pub _pad: u64,
}

/// Twin of `AttentionWgmmaBwdParams` in `kernels/attention_wgmma.cu` (the size is checked
/// against the compiled struct by a kernel test): the two tensor maps, then the pointers and
/// scalars (320 bytes, a multiple of the maps' 64-byte alignment: no tail padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct WgmmaAttentionBwdParams {
    pub qkv: TensorMap,
    pub gy: TensorMap,
    pub dqkv: u64,
    pub lse: u64,
    pub delta: u64,
    pub b: i64,
    pub t: i64,
    pub c: i64,
    pub h: i64,
    pub scale: f32,
    pub pad: i32,
}

/// Every kernel of the module (checked against it by the tidy test).
pub(crate) const KERNELS: &[&str] = &[
    "attention_wgmma64_fwd_bf16",
    "attention_wgmma64_fwd_f16",
    "attention_wgmma128_fwd_bf16",
    "attention_wgmma128_fwd_f16",
    "attention_wgmma64_dkv_bwd_bf16",
    "attention_wgmma64_dkv_bwd_f16",
    "attention_wgmma64_dq_bwd_bf16",
    "attention_wgmma64_dq_bwd_f16",
];

/// Threads per block: a producer and two consumer warpgroups.
pub(crate) const THREADS: u32 = 384;

/// Query rows per block and keys per tile (`kBM`, `kBC` in the `.cu`): T must be a multiple.
pub(crate) const TILE: usize = 128;

/// The dynamic shared memory at head dim `hd`: 1024 bytes of alignment slack, Q and two
/// stages of K and V (`hd / 64` boxes of 16 KiB each), nine mbarriers.
pub(crate) fn smem_bytes(hd: usize) -> u32 {
    1024 + 5 * (hd as u32 / 64) * 16 * 1024 + 9 * 8
}

/// Rows of a streamed tile of the backward (`kRows` in the `.cu`): 64 keys (dq) or 64 queries
/// (dkv), each one TMA box of 64 rows.
pub(crate) const BWD_ROWS: usize = 64;

/// The dynamic shared memory of both backward kernels (hd 64): 1024 bytes of alignment slack,
/// two resident 128-row operands (16 KiB each), three stages of two streamed 64-row operands
/// (8 KiB each), seven mbarriers.
pub(crate) const BWD_SMEM_BYTES: u32 = 1024 + 2 * 16 * 1024 + 3 * 2 * 8 * 1024 + 7 * 8;

/// The automatic Hopper attention's switch.
static HOPPER: hopper::Switch = hopper::Switch::new("LORAFUSE_ATTENTION_HOPPER");

/// Whether the attention forwards and backwards that qualify take the Hopper kernels
/// (`kernels/attention_wgmma.cu`) on a compute-capability 9.0 GPU: on by default, off when
/// the environment had `LORAFUSE_ATTENTION_HOPPER=0` at the first attention launch, or as
/// [`set_hopper_attention`] last set it.
pub fn hopper_attention() -> bool {
    HOPPER.get()
}

/// Turns the automatic Hopper attention on or off for the forwards and backwards launched
/// after it (an A/B switch for benchmarks: `false` runs them on the sm_80 tensor-core
/// kernels).
/// Shapes that do not qualify, and GPUs other than compute capability 9.0, never take it.
pub fn set_hopper_attention(on: bool) {
    HOPPER.set(on);
}

/// Whether `device` can run the Hopper attention at all: a CUDA GPU of compute capability
/// 9.0 whose `attention_wgmma` module loaded from the sm_90a cubin (built by nvcc). False on
/// the CPU and the simulator (where only the kernel tests force it); an error when the GPU
/// cannot be used.
pub fn hopper_attention_available(device: &crate::Device) -> Result<bool> {
    hopper::available(device, KERNELS[0])
}

/// Why the forward cannot run on the Hopper kernel, if it cannot (the host twin of the kernel
/// header's contract): bf16/f16, head dim 64 or 128, T a positive multiple of 128 (whole
/// tiles: no TMA box reaches the next batch's rows), B·T below 2^31 (32-bit coordinates),
/// `qkv` 16-byte aligned (its rows are: 3C·2 bytes with C a multiple of 64).
pub(crate) fn eligible(dtype: DType, d: Dims, qkv_ptr: u64) -> Option<String> {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Some(format!("{dtype} (bf16 and f16 only)"));
    }
    if d.h == 0 || !d.c.is_multiple_of(d.h) || !matches!(d.c / d.h, 64 | 128) {
        return Some(format!("head dim {} (64 and 128 only)", d.c / d.h.max(1)));
    }
    if d.t == 0 || !d.t.is_multiple_of(TILE) {
        return Some(format!("T = {} is not a positive multiple of {TILE}", d.t));
    }
    if d.b.checked_mul(d.t).is_none_or(|r| r >= 1 << 31) {
        return Some(format!("B·T = {}·{} is past 32-bit coordinates", d.b, d.t));
    }
    if !qkv_ptr.is_multiple_of(16) {
        return Some("qkv is not 16-byte aligned".into());
    }
    None
}

/// Why the backward cannot run on the Hopper kernels, if it cannot: the forward's rules
/// ([`eligible`]), head dim 64 only (at 128 the dkv kernel's four accumulator tiles would not
/// fit a consumer's 240 registers), and `gy` 16-byte aligned (the second tensor map's base).
pub(crate) fn backward_eligible(
    dtype: DType,
    d: Dims,
    qkv_ptr: u64,
    gy_ptr: u64,
) -> Option<String> {
    if let Some(why) = eligible(dtype, d, qkv_ptr) {
        return Some(why);
    }
    if d.c / d.h != 64 {
        return Some(format!(
            "head dim {} (the backward takes 64 only)",
            d.c / d.h
        ));
    }
    if !gy_ptr.is_multiple_of(16) {
        return Some("gy is not 16-byte aligned".into());
    }
    None
}

/// Whether a forward or backward runs on the Hopper kernels: when `forced`, always (an error where the GPU
/// cannot run it or the shape does not qualify, `why_not`); otherwise on a GPU with the
/// sm_90a cubin when the shape qualifies and the switch is on (`disabled` when off).
pub(crate) fn choose(
    forced: bool,
    target: Target,
    why_not: Option<&str>,
    disabled: bool,
) -> Result<bool> {
    hopper::choose(OP, "wgmma attention", forced, target, why_not, disabled)
}

/// The kernel of `dtype` at head dim `hd`.
pub(crate) fn kernel_name(dtype: DType, hd: usize) -> Result<&'static str> {
    Ok(match (dtype, hd) {
        (DType::BF16, 64) => "attention_wgmma64_fwd_bf16",
        (DType::F16, 64) => "attention_wgmma64_fwd_f16",
        (DType::BF16, 128) => "attention_wgmma128_fwd_bf16",
        (DType::F16, 128) => "attention_wgmma128_fwd_f16",
        (dt, _) => {
            return Err(Error::Unsupported {
                op: OP,
                msg: format!("no {dt} wgmma attention at head dim {hd}"),
            });
        }
    })
}

/// Runs the forward of `qkv` (`qd`, validated by the caller) into `y` and `lse` on the Hopper
/// kernel when [`choose`] says so: `Ok(true)` when it was launched, `Ok(false)` when the
/// sm_80 kernels should run it.
pub(crate) fn try_launch(
    qd: &DeviceStorage,
    y: &DeviceStorage,
    lse: &DeviceStorage,
    dtype: DType,
    d: Dims,
    forced: bool,
) -> Result<bool> {
    if !chosen(qd, dtype, forced, || eligible(dtype, d, qd.device_ptr()))? {
        return Ok(false);
    }
    let backend = qd.backend();
    let hd = d.c / d.h;
    let name = kernel_name(dtype, hd)?;
    let qkv = backend.encode_tensor_map(&rows_map(qd, 3 * d.c, d, TILE))?;
    let params = WgmmaAttentionParams {
        qkv,
        out: y.device_ptr(),
        lse: lse.device_ptr(),
        b: int(d.b)?,
        t: int(d.t)?,
        c: int(d.c)?,
        h: int(d.h)?,
        scale: (1.0 / (hd as f64).sqrt()) as f32,
        pad: 0,
        _pad: 0,
    };
    let smem = smem_bytes(hd);
    backend.opt_in_dynamic_shared(name, smem)?;
    backend
        .launch(name, &launch_config(d, smem)?, &params)
        .map(|()| true)
}

fn int(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{OP}: {v} overflows i64")))
}

/// The tensor map of a bf16/f16 `[B·T, cols]` row-major tensor at `s`: boxes of 64 columns ×
/// `box_rows` rows, 128-byte swizzle (the kernels' shared layouts).
fn rows_map(s: &DeviceStorage, cols: usize, d: Dims, box_rows: usize) -> TensorMap2d {
    TensorMap2d {
        base: s.device_ptr(),
        elem_bytes: 2,
        dims: [cols as u64, (d.b * d.t) as u64],
        stride1: (cols * 2) as u64,
        box_dims: [64, box_rows as u32],
        swizzle: 128,
    }
}

/// Grid (T/128, H, B) of [`THREADS`] threads with `smem` bytes of dynamic shared memory.
fn launch_config(d: Dims, smem: u32) -> Result<LaunchConfig> {
    let too_big = || Error::invalid(format!("{OP}: {d:?} exceeds the launch grid"));
    let grid = [
        u32::try_from(d.t / TILE).map_err(|_| too_big())?,
        u32::try_from(d.h)
            .ok()
            .filter(|&y| y <= 65_535)
            .ok_or_else(too_big)?,
        u32::try_from(d.b)
            .ok()
            .filter(|&z| z <= 65_535)
            .ok_or_else(too_big)?,
    ];
    Ok(LaunchConfig {
        grid,
        block: [THREADS, 1, 1],
        shared_bytes: smem,
    })
}

/// The backward's tensors (validated by the caller): `qkv`, `gy`, the forward's `lse`, the
/// row sums `delta` that `attention_delta_bwd` wrote, and the output `dqkv`.
pub(crate) struct BackwardArgs<'a> {
    pub qkv: &'a DeviceStorage,
    pub gy: &'a DeviceStorage,
    pub lse: &'a DeviceStorage,
    pub delta: &'a DeviceStorage,
    pub dqkv: &'a DeviceStorage,
}

/// Whether the backward runs on the Hopper kernels ([`choose`] on [`backward_eligible`]);
/// the caller then launches `attention_delta_bwd` first and [`launch_backward`] after it.
pub(crate) fn backward_chosen(
    qd: &DeviceStorage,
    gd: &DeviceStorage,
    dtype: DType,
    d: Dims,
    forced: bool,
) -> Result<bool> {
    chosen(qd, dtype, forced, || {
        backward_eligible(dtype, d, qd.device_ptr(), gd.device_ptr())
    })
}

/// [`choose`] for a launch on `qd`'s backend, with `why_not` the shape's eligibility
/// (evaluated only when the switch or the force asks for the Hopper kernels).
fn chosen(
    qd: &DeviceStorage,
    dtype: DType,
    forced: bool,
    why_not: impl FnOnce() -> Option<String>,
) -> Result<bool> {
    if !forced && (dtype == DType::F32 || !hopper_attention()) {
        return Ok(false);
    }
    let target = Target::of(qd.backend(), KERNELS[0], forced)?;
    choose(forced, target, why_not().as_deref(), !hopper_attention())
}

/// Launches the Hopper backward of a shape [`backward_chosen`] accepted: dk and dv
/// (`attention_wgmma64_dkv_bwd`, one block per 128 keys), then dq
/// (`attention_wgmma64_dq_bwd`, one block per 128 query rows), each writing its own columns
/// of `dqkv`.
pub(crate) fn launch_backward(a: &BackwardArgs<'_>, dtype: DType, d: Dims) -> Result<()> {
    let sfx = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => {
            return Err(Error::Unsupported {
                op: OP,
                msg: format!("no {dt} wgmma attention backward"),
            });
        }
    };
    let backend = a.qkv.backend();
    let params = WgmmaAttentionBwdParams {
        qkv: backend.encode_tensor_map(&rows_map(a.qkv, 3 * d.c, d, BWD_ROWS))?,
        gy: backend.encode_tensor_map(&rows_map(a.gy, d.c, d, BWD_ROWS))?,
        dqkv: a.dqkv.device_ptr(),
        lse: a.lse.device_ptr(),
        delta: a.delta.device_ptr(),
        b: int(d.b)?,
        t: int(d.t)?,
        c: int(d.c)?,
        h: int(d.h)?,
        scale: (1.0 / ((d.c / d.h) as f64).sqrt()) as f32,
        pad: 0,
    };
    let cfg = launch_config(d, BWD_SMEM_BYTES)?;
    for kernel in ["dkv", "dq"] {
        let name = format!("attention_wgmma64_{kernel}_bwd_{sfx}");
        backend.opt_in_dynamic_shared(&name, BWD_SMEM_BYTES)?;
        backend.launch(&name, &cfg, &params)?;
    }
    Ok(())
}
