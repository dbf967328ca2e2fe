//! Launcher of `kernels/attention_wgmma.cu`, the Hopper (sm_90a) attention forward
//! (FlashAttention-3 style): when it runs ([`choose`]), the shapes it takes ([`eligible`]),
//! and the tensor map it reads `qkv` through.

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

/// Every kernel of the module (checked against it by the tidy test).
pub(crate) const KERNELS: &[&str] = &[
    "attention_wgmma64_fwd_bf16",
    "attention_wgmma64_fwd_f16",
    "attention_wgmma128_fwd_bf16",
    "attention_wgmma128_fwd_f16",
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

/// The automatic Hopper attention's switch.
static HOPPER: hopper::Switch = hopper::Switch::new("LORAFUSE_ATTENTION_HOPPER");

/// Whether the attention forwards that qualify take the Hopper kernel
/// (`kernels/attention_wgmma.cu`) on a compute-capability 9.0 GPU: on by default, off when
/// the environment had `LORAFUSE_ATTENTION_HOPPER=0` at the first forward, or as
/// [`set_hopper_attention`] last set it.
pub fn hopper_attention() -> bool {
    HOPPER.get()
}

/// Turns the automatic Hopper attention forward on or off for the forwards launched after it
/// (an A/B switch for benchmarks: `false` runs them on the sm_80 tensor-core kernels).
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

/// Whether a forward runs on the Hopper kernel: when `forced`, always (an error where the GPU
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
    if !forced && (dtype == DType::F32 || !hopper_attention()) {
        return Ok(false);
    }
    let backend = qd.backend();
    let target = Target::of(backend, KERNELS[0], forced)?;
    let why_not = eligible(dtype, d, qd.device_ptr());
    if !choose(forced, target, why_not.as_deref(), !hopper_attention())? {
        return Ok(false);
    }
    let hd = d.c / d.h;
    let name = kernel_name(dtype, hd)?;
    let int =
        |v: usize| i64::try_from(v).map_err(|_| Error::invalid(format!("{OP}: {v} overflows i64")));
    let qkv = backend.encode_tensor_map(&TensorMap2d {
        base: qd.device_ptr(),
        elem_bytes: 2,
        dims: [3 * d.c as u64, (d.b * d.t) as u64],
        stride1: (3 * d.c * 2) as u64,
        box_dims: [64, TILE as u32],
        swizzle: 128,
    })?;
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
    let smem = smem_bytes(hd);
    backend.opt_in_dynamic_shared(name, smem)?;
    let cfg = LaunchConfig {
        grid,
        block: [THREADS, 1, 1],
        shared_bytes: smem,
    };
    backend.launch(name, &cfg, &params).map(|()| true)
}
