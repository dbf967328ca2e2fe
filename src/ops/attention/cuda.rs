//! Launcher of `kernels/attention.cu` (flash-attention style), one code path for the CUDA
//! backend and the simulator: the forward returns `y` and the per-row logsumexp
//! `lse [B, H, T]` (f32), the only state the backward needs besides `qkv`, `y` and `gy`; the
//! backward runs `attention_bwd` (D = rowsum(gy ⊙ y) into a `[B, H, T]` f32 scratch, dq)
//! and then `attention_dkv_bwd` (dk, dv), each writing its own columns of the fused
//! `dqkv [B, T, 3C]`. Nothing of size `T²` is allocated.
//!
//! bf16 and f16 at head dims 64 and 128 take the tensor-core (FlashAttention-2) kernels
//! instead ([`tc_path`]): `attention_tc{hd}_fwd` (64 query rows per block), and for the
//! backward `attention_delta_bwd` (D), `attention_tc{hd}_dkv_bwd` (64 keys per block) and
//! `attention_tc{hd}_dq_bwd` (64 query rows per block), all within 48 KiB of shared memory.
//! On a Hopper GPU the forward and (at hd 64) the backward's dk/dv and dq take
//! `kernels/attention_wgmma.cu` instead (`wgmma.rs` decides).
//!
//! Tiles: every block owns [`BR`] rows and loops over tiles of `bc` rows, `bc` the largest of
//! 32, 16 and 8 whose dynamic shared memory fits [`SMEM_BUDGET`] (chosen per kernel from the
//! head dim, see [`tile`]). Head dims up to [`MAX_HEAD_DIM`] are supported (the kernels keep
//! a thread's share of a row of `hd` accumulators in registers); larger ones are an
//! [`Error::Unsupported`].

use super::cpu::Dims;
use crate::device::LaunchConfig;
use crate::ops::elementwise::cuda::suffix;
use crate::storage::{DeviceStorage, Storage};
use crate::{DType, Error, Result, Shape, Tensor};

const OP: &str = "causal_attention";

/// Twin of `AttentionParams` in `kernels/attention.cu` (the size is checked against the
/// compiled struct by a kernel test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AttentionParams {
    pub qkv: u64,
    pub y: u64,
    pub gy: u64,
    pub out: u64,
    pub lse: u64,
    pub delta: u64,
    pub b: i64,
    pub t: i64,
    pub c: i64,
    pub h: i64,
    pub scale: f32,
    pub br: i32,
    pub bc: i32,
    pub pad: i32,
}

/// Every kernel the launcher may launch (checked against the compiled modules by the tidy
/// test).
pub(crate) const KERNELS: &[&str] = &[
    "attention_fwd_f32",
    "attention_fwd_bf16",
    "attention_fwd_f16",
    "attention_bwd_f32",
    "attention_bwd_bf16",
    "attention_bwd_f16",
    "attention_dkv_bwd_f32",
    "attention_dkv_bwd_bf16",
    "attention_dkv_bwd_f16",
    "attention_tc64_fwd_bf16",
    "attention_tc64_fwd_f16",
    "attention_tc128_fwd_bf16",
    "attention_tc128_fwd_f16",
    "attention_delta_bwd_bf16",
    "attention_delta_bwd_f16",
    "attention_tc64_dq_bwd_bf16",
    "attention_tc64_dq_bwd_f16",
    "attention_tc128_dq_bwd_bf16",
    "attention_tc128_dq_bwd_f16",
    "attention_tc64_dkv_bwd_bf16",
    "attention_tc64_dkv_bwd_f16",
    "attention_tc128_dkv_bwd_bf16",
    "attention_tc128_dkv_bwd_f16",
];

/// Threads per block (the header's launch geometry: 8 × 16).
pub(crate) const THREADS: u32 = 128;
/// Rows of the tile a block owns (`kBR` in the `.cu`).
pub(crate) const BR: usize = 32;
/// The largest head dim the kernels take (`kTX · kGroups` in the `.cu`).
pub(crate) const MAX_HEAD_DIM: usize = 128;
/// The dynamic shared memory a kernel may use: the default limit, no opt-in needed.
pub(crate) const SMEM_BUDGET: usize = 48 * 1024;

/// The three kernels, for their shared-memory layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `attention_fwd`: Q [BR, ld], K, V [bc, ld], S/P [BR, bc+1], α, l [BR].
    Fwd,
    /// `attention_bwd`: Q, gy [BR, ld], K, V [bc, ld], dS [BR, bc+1], lse, D [BR].
    Dq,
    /// `attention_dkv_bwd`: K, V [BR, ld], Q, gy [bc, ld], Pᵀ, dSᵀ [BR, bc+1], lse, D [bc].
    Dkv,
}

/// The dynamic shared bytes of `kernel` at head dim `hd` and inner tile `bc` (the layouts
/// in the `.cu` header; rows of `ld = hd | 1` floats).
pub(crate) fn shared_bytes(kernel: Kernel, hd: usize, bc: usize) -> usize {
    let (ld, lp) = (hd | 1, bc + 1);
    let floats = match kernel {
        Kernel::Fwd => BR * ld + 2 * bc * ld + BR * lp + 2 * BR,
        Kernel::Dq => 2 * BR * ld + 2 * bc * ld + BR * lp + 2 * BR,
        Kernel::Dkv => 2 * BR * ld + 2 * bc * ld + 2 * BR * lp + 2 * bc,
    };
    4 * floats
}

/// The inner tile of `kernel` at head dim `hd`: the largest of 32, 16 and 8 whose shared
/// memory fits [`SMEM_BUDGET`], with those bytes. Every `hd ≤ MAX_HEAD_DIM` fits at 8.
pub(crate) fn tile(kernel: Kernel, hd: usize) -> Result<(usize, usize)> {
    if hd == 0 || hd > MAX_HEAD_DIM {
        return Err(Error::unsupported(
            OP,
            format!("head dim {hd} on a device (the kernels take 1 to {MAX_HEAD_DIM})"),
        ));
    }
    [32, 16, 8]
        .into_iter()
        .map(|bc| (bc, shared_bytes(kernel, hd, bc)))
        .find(|&(_, bytes)| bytes <= SMEM_BUDGET)
        .ok_or_else(|| {
            Error::unsupported(OP, format!("head dim {hd}: no tile fits the shared memory"))
        })
}

/// Rows a tensor-core block owns (`tc::kBM` in the `.cu`): 64 query rows (forward, dq) or
/// 64 keys (dkv), 16 per warp.
pub(crate) const TC_BM: usize = 64;
/// Rows per block of `attention_delta_bwd` (8 threads per row).
const DELTA_ROWS: usize = 16;

/// The tensor-core (FlashAttention-2) kernels of one head dim: the inner tile of each
/// (`bc` in the parameters), as instantiated in the `.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcPath {
    /// The head dim (64 or 128).
    pub hd: usize,
    /// Keys per K/V tile of the forward and of dq.
    pub bc: usize,
    /// Query rows per Q/gy tile of dkv.
    pub bq: usize,
}

impl TcPath {
    /// Dynamic shared bytes of the forward: Q [64, hd], 2 stages × (K, V) [bc, hd].
    pub(crate) fn fwd_bytes(&self) -> usize {
        2 * (TC_BM + 4 * self.bc) * self.hd
    }
    /// Of dq: stage 0 (K, V [bc, hd]), then one region for Q, gy [64, hd] (at the start)
    /// and stage 1.
    pub(crate) fn dq_bytes(&self) -> usize {
        2 * (2 * self.bc + (2 * self.bc).max(2 * TC_BM)) * self.hd
    }
    /// Of dkv: K, V [64, hd], 2 stages × (Q, gy) [bq, hd].
    pub(crate) fn dkv_bytes(&self) -> usize {
        2 * (2 * TC_BM + 4 * self.bq) * self.hd
    }
}

/// The tensor-core path for `dtype` at head dim `hd`, if there is one (bf16 and f16 at head
/// dims 64 and 128); everything else runs on the SIMT kernels.
pub(crate) fn tc_path(dtype: DType, hd: usize) -> Option<TcPath> {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return None;
    }
    match hd {
        64 => Some(TcPath { hd, bc: 64, bq: 64 }),
        128 => Some(TcPath { hd, bc: 32, bq: 16 }),
        _ => None,
    }
}

/// The device storage of a tensor's storage guard.
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

/// Grid (⌈T/BR⌉, H, B) and the shared bytes of `kernel`, validated against CUDA's limits;
/// the parameters with `kernel`'s tile. Pointers are filled in by the caller.
fn launch_setup(kernel: Kernel, d: Dims) -> Result<(LaunchConfig, AttentionParams)> {
    let (bc, bytes) = tile(kernel, d.c / d.h)?;
    grid_setup(d, BR, BR, bc, bytes)
}

/// Grid (⌈T/rows⌉, H, B) of 128 threads with `bytes` of dynamic shared memory, validated
/// against CUDA's limits; the parameters with `br`, `bc`.
fn grid_setup(
    d: Dims,
    rows: usize,
    br: usize,
    bc: usize,
    bytes: usize,
) -> Result<(LaunchConfig, AttentionParams)> {
    let hd = d.c / d.h;
    let too_big = || Error::invalid(format!("{OP}: {d:?} exceeds the launch grid"));
    let x = u32::try_from(d.t.div_ceil(rows))
        .ok()
        .filter(|&x| x < 1 << 31)
        .ok_or_else(too_big)?;
    let y = u32::try_from(d.h)
        .ok()
        .filter(|&y| y <= 65_535)
        .ok_or_else(too_big)?;
    let z = u32::try_from(d.b)
        .ok()
        .filter(|&z| z <= 65_535)
        .ok_or_else(too_big)?;
    let cfg = LaunchConfig {
        grid: [x, y, z],
        block: [THREADS, 1, 1],
        shared_bytes: u32::try_from(bytes).map_err(|_| too_big())?,
    };
    let prm = AttentionParams {
        b: int(d.b)?,
        t: int(d.t)?,
        c: int(d.c)?,
        h: int(d.h)?,
        scale: (1.0 / (hd as f64).sqrt()) as f32,
        br: br as i32,
        bc: bc as i32,
        ..Default::default()
    };
    Ok((cfg, prm))
}

/// Checks that `t` (called `name`) has `dims`, `dtype` and `qkv`'s device.
fn expect(name: &str, t: &Tensor, dims: &[usize], dtype: DType, qkv: &Tensor) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::invalid(format!(
            "{OP}: {name} is {}, expected {dtype}",
            t.dtype()
        )));
    }
    if t.dims() != dims {
        return Err(Error::shape(
            OP,
            format!("{name} {}, expected {:?}", t.shape(), dims),
        ));
    }
    if t.device() != qkv.device() {
        return Err(Error::Device {
            op: OP,
            lhs: qkv.device(),
            rhs: t.device(),
        });
    }
    Ok(())
}

/// Checks that `d` is a well-formed attention shape (the op validated it already; the
/// launcher does not rely on that).
fn check_dims(d: Dims) -> Result<()> {
    if d.h == 0 || d.c == 0 || !d.c.is_multiple_of(d.h) {
        return Err(Error::shape(
            OP,
            format!("C = {} is not divisible into {} heads", d.c, d.h),
        ));
    }
    Ok(())
}

/// Forward: `y [B, T, C]` in `qkv`'s dtype and `lse [B, H, T]` in f32 (`m + ln l` of each
/// row's softmax, for the backward), both on `qkv`'s device.
pub(crate) fn forward(qkv: &Tensor, d: Dims) -> Result<(Tensor, Tensor)> {
    forward_on(qkv, d, false)
}

/// [`forward`], on the Hopper kernel (`kernels/attention_wgmma.cu`) when `force_wgmma` (an
/// error where it cannot run), else as [`super::wgmma::try_launch`] picks.
pub(crate) fn forward_on(qkv: &Tensor, d: Dims, force_wgmma: bool) -> Result<(Tensor, Tensor)> {
    check_dims(d)?;
    let dtype = qkv.dtype();
    let name = format!("attention_fwd_{}", suffix(dtype)?);
    expect("qkv", qkv, &[d.b, d.t, 3 * d.c], dtype, qkv)?;
    let (name, (cfg, prm)) = match tc_path(dtype, d.c / d.h) {
        Some(tc) => (
            format!("attention_tc{}_fwd_{}", tc.hd, suffix(dtype)?),
            grid_setup(d, TC_BM, TC_BM, tc.bc, tc.fwd_bytes())?,
        ),
        None => (name, launch_setup(Kernel::Fwd, d)?),
    };
    let qs = qkv.storage();
    let qd = dev(&qs)?;
    let y = DeviceStorage::alloc(dtype, d.b * d.t * d.c, qd.device())?;
    let lse = DeviceStorage::alloc(DType::F32, d.b * d.h * d.t, qd.device())?;
    let nonempty = d.b > 0 && d.t > 0;
    let hopper =
        (nonempty || force_wgmma) && super::wgmma::try_launch(qd, &y, &lse, dtype, d, force_wgmma)?;
    if nonempty && !hopper {
        let prm = AttentionParams {
            qkv: qd.device_ptr(),
            out: y.device_ptr(),
            lse: lse.device_ptr(),
            ..prm
        };
        qd.backend().launch(&name, &cfg, &prm)?;
    }
    Ok((
        Tensor::from_storage(Storage::Device(y), Shape::from([d.b, d.t, d.c]))?,
        Tensor::from_storage(Storage::Device(lse), Shape::from([d.b, d.h, d.t]))?,
    ))
}

/// Backward: `dqkv [B, T, 3C]` in `qkv`'s dtype from `qkv`, the forward's output `y` and
/// `lse`, and `gy`. Errors (never a launch) when a tensor has the wrong dtype, shape or
/// device.
pub(crate) fn backward(
    qkv: &Tensor,
    y: &Tensor,
    lse: &Tensor,
    gy: &Tensor,
    d: Dims,
) -> Result<Tensor> {
    backward_on(qkv, y, lse, gy, d, false)
}

/// [`backward`], on the Hopper kernels (`kernels/attention_wgmma.cu`) when `force_wgmma` (an
/// error where they cannot run), else as [`super::wgmma::backward_chosen`] picks.
pub(crate) fn backward_on(
    qkv: &Tensor,
    y: &Tensor,
    lse: &Tensor,
    gy: &Tensor,
    d: Dims,
    force_wgmma: bool,
) -> Result<Tensor> {
    check_dims(d)?;
    let dtype = qkv.dtype();
    let sfx = suffix(dtype)?;
    expect("qkv", qkv, &[d.b, d.t, 3 * d.c], dtype, qkv)?;
    expect("y", y, &[d.b, d.t, d.c], dtype, qkv)?;
    expect("gy", gy, &[d.b, d.t, d.c], dtype, qkv)?;
    expect("lse", lse, &[d.b, d.h, d.t], DType::F32, qkv)?;
    let tc = tc_path(dtype, d.c / d.h);
    let (cfg_dq, prm_dq) = match tc {
        Some(tc) => grid_setup(d, TC_BM, TC_BM, tc.bc, tc.dq_bytes())?,
        None => launch_setup(Kernel::Dq, d)?,
    };
    let (cfg_dkv, prm_dkv) = match tc {
        Some(tc) => grid_setup(d, TC_BM, TC_BM, tc.bq, tc.dkv_bytes())?,
        None => launch_setup(Kernel::Dkv, d)?,
    };
    let (qs, ys, ls, gs) = (qkv.storage(), y.storage(), lse.storage(), gy.storage());
    let (qd, yd, ld, gd) = (dev(&qs)?, dev(&ys)?, dev(&ls)?, dev(&gs)?);
    let dqkv = DeviceStorage::alloc(dtype, d.b * d.t * 3 * d.c, qd.device())?;
    let nonempty = d.b > 0 && d.t > 0;
    let hopper =
        (nonempty || force_wgmma) && super::wgmma::backward_chosen(qd, gd, dtype, d, force_wgmma)?;
    if nonempty {
        let delta = DeviceStorage::alloc(DType::F32, d.b * d.h * d.t, qd.device())?;
        let with_ptrs = |prm: AttentionParams| AttentionParams {
            qkv: qd.device_ptr(),
            y: yd.device_ptr(),
            gy: gd.device_ptr(),
            out: dqkv.device_ptr(),
            lse: ld.device_ptr(),
            delta: delta.device_ptr(),
            ..prm
        };
        let backend = qd.backend();
        if let Some(tc) = tc {
            // D first; then dk, dv per key block and dq per query block, both reading it
            // (launches on one stream run in order), on the Hopper kernels when chosen.
            let (cfg_d, prm_d) = grid_setup(d, DELTA_ROWS, DELTA_ROWS, 0, 0)?;
            backend.launch(
                &format!("attention_delta_bwd_{sfx}"),
                &cfg_d,
                &with_ptrs(prm_d),
            )?;
            if hopper {
                let args = super::wgmma::BackwardArgs {
                    qkv: qd,
                    gy: gd,
                    lse: ld,
                    delta: &delta,
                    dqkv: &dqkv,
                };
                super::wgmma::launch_backward(&args, dtype, d)?;
                return Tensor::from_storage(
                    Storage::Device(dqkv),
                    Shape::from([d.b, d.t, 3 * d.c]),
                );
            }
            let hd = tc.hd;
            backend.launch(
                &format!("attention_tc{hd}_dkv_bwd_{sfx}"),
                &cfg_dkv,
                &with_ptrs(prm_dkv),
            )?;
            backend.launch(
                &format!("attention_tc{hd}_dq_bwd_{sfx}"),
                &cfg_dq,
                &with_ptrs(prm_dq),
            )?;
            return Tensor::from_storage(Storage::Device(dqkv), Shape::from([d.b, d.t, 3 * d.c]));
        }
        backend.launch(&format!("attention_bwd_{sfx}"), &cfg_dq, &with_ptrs(prm_dq))?;
        // Launches on one stream run in order: D is complete before attention_dkv_bwd
        // reads it, and the scratch is freed in stream order after the launch.
        backend.launch(
            &format!("attention_dkv_bwd_{sfx}"),
            &cfg_dkv,
            &with_ptrs(prm_dkv),
        )?;
    }
    Tensor::from_storage(Storage::Device(dqkv), Shape::from([d.b, d.t, 3 * d.c]))
}
