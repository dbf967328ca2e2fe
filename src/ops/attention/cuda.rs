//! Launcher of `kernels/attention.cu`, one code path for the CUDA backend and the
//! simulator: the forward saves `P [B, H, T, T]` in f32 as a device tensor, the backward
//! runs `attention_bwd` (dS into an f32 scratch tensor, dq) and then `attention_dkv_bwd`
//! (dk, dv), each writing its own columns of the fused `dqkv [B, T, 3C]`.

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
    pub gy: u64,
    pub out: u64,
    pub p: u64,
    pub ds: u64,
    pub b: i64,
    pub t: i64,
    pub c: i64,
    pub h: i64,
    pub scale: f32,
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
];

/// Threads per block (the header's launch geometry).
const THREADS: u32 = 128;

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

/// Grid (T, H, B), validated against CUDA's limits.
fn config(d: Dims) -> Result<LaunchConfig> {
    let too_big = || Error::invalid(format!("{OP}: {d:?} exceeds the launch grid"));
    let x = u32::try_from(d.t)
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
    Ok(LaunchConfig {
        grid: [x, y, z],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    })
}

/// The parameters shared by every kernel (pointers filled in by the caller).
fn params(d: Dims) -> Result<AttentionParams> {
    Ok(AttentionParams {
        b: int(d.b)?,
        t: int(d.t)?,
        c: int(d.c)?,
        h: int(d.h)?,
        scale: (1.0 / ((d.c / d.h) as f64).sqrt()) as f32,
        ..Default::default()
    })
}

/// Forward: `y [B, T, C]` in `qkv`'s dtype and `P [B, H, T, T]` in f32 (zero above the
/// diagonal), both on `qkv`'s device.
pub(crate) fn forward(qkv: &Tensor, d: Dims) -> Result<(Tensor, Tensor)> {
    let dtype = qkv.dtype();
    let name = format!("attention_fwd_{}", suffix(dtype)?);
    let qs = qkv.storage();
    let qd = dev(&qs)?;
    let y = DeviceStorage::alloc(dtype, d.b * d.t * d.c, qd.device())?;
    let p = DeviceStorage::alloc(DType::F32, d.b * d.h * d.t * d.t, qd.device())?;
    if d.b > 0 && d.t > 0 {
        let prm = AttentionParams {
            qkv: qd.device_ptr(),
            out: y.device_ptr(),
            p: p.device_ptr(),
            ..params(d)?
        };
        qd.backend().launch(&name, &config(d)?, &prm)?;
    }
    Ok((
        Tensor::from_storage(Storage::Device(y), Shape::from([d.b, d.t, d.c]))?,
        Tensor::from_storage(Storage::Device(p), Shape::from([d.b, d.h, d.t, d.t]))?,
    ))
}

/// Backward: `dqkv [B, T, 3C]` in `qkv`'s dtype from `qkv`, the saved `P` and `gy`.
pub(crate) fn backward(qkv: &Tensor, p: &Tensor, gy: &Tensor, d: Dims) -> Result<Tensor> {
    let dtype = qkv.dtype();
    if gy.dtype() != dtype || p.dtype() != DType::F32 {
        return Err(Error::invalid(format!(
            "{OP}: backward with qkv {dtype}, gy {} and P {}",
            gy.dtype(),
            p.dtype()
        )));
    }
    if gy.dims() != [d.b, d.t, d.c] || p.dims() != [d.b, d.h, d.t, d.t] {
        return Err(Error::shape(
            OP,
            format!("backward with gy {} and P {}", gy.shape(), p.shape()),
        ));
    }
    let sfx = suffix(dtype)?;
    let (qs, ps, gs) = (qkv.storage(), p.storage(), gy.storage());
    let (qd, pd, gd) = (dev(&qs)?, dev(&ps)?, dev(&gs)?);
    let dqkv = DeviceStorage::alloc(dtype, d.b * d.t * 3 * d.c, qd.device())?;
    if d.b > 0 && d.t > 0 {
        let ds = DeviceStorage::alloc(DType::F32, d.b * d.h * d.t * d.t, qd.device())?;
        let prm = AttentionParams {
            qkv: qd.device_ptr(),
            gy: gd.device_ptr(),
            out: dqkv.device_ptr(),
            p: pd.device_ptr(),
            ds: ds.device_ptr(),
            ..params(d)?
        };
        let cfg = config(d)?;
        let backend = qd.backend();
        backend.launch(&format!("attention_bwd_{sfx}"), &cfg, &prm)?;
        // Launches on one stream run in order: dS is complete before dk and dv read it,
        // and the scratch is freed in stream order after the launch.
        backend.launch(&format!("attention_dkv_bwd_{sfx}"), &cfg, &prm)?;
    }
    Tensor::from_storage(Storage::Device(dqkv), Shape::from([d.b, d.t, 3 * d.c]))
}
