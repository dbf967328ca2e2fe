//! Launcher of `kernels/decode_attention.cu`, one code path for the CUDA backend and the
//! simulator: `decode_attention_fwd` appends the new keys and values to the caches and
//! attends over the keys split into `S` chunks ([`splits`]); with `S > 1` each split's
//! partial softmax goes to an f32 workspace that `decode_attention_combine_fwd` merges in
//! split order into `y`.

use super::cpu::Dims;
use crate::device::LaunchConfig;
use crate::ops::elementwise::cuda::suffix;
use crate::storage::{DeviceStorage, Storage};
use crate::{DType, Error, Result, Shape, Tensor};

const OP: &str = "decode_attention";

/// Twin of `DecodeAttentionParams` in `kernels/decode_attention.cu` (the size is checked
/// against the compiled struct by a kernel test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct DecodeAttentionParams {
    pub qkv: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub out: u64,
    pub part: u64,
    pub stats: u64,
    pub b: i64,
    pub n: i64,
    pub c: i64,
    pub h: i64,
    pub pos: i64,
    pub max_len: i64,
    pub chunk: i64,
    pub splits: i32,
    pub scale: f32,
}

/// Every kernel the launcher may launch (checked against the compiled modules by the tidy
/// test).
pub(crate) const KERNELS: &[&str] = &[
    "decode_attention_fwd_f32",
    "decode_attention_fwd_bf16",
    "decode_attention_fwd_f16",
    "decode_attention_combine_fwd_f32",
    "decode_attention_combine_fwd_bf16",
    "decode_attention_combine_fwd_f16",
];

/// Threads per block of both kernels (4 warps).
pub(crate) const THREADS: u32 = 128;
/// The largest head dim the kernel takes (`kMaxHd`: 4 columns per lane).
pub(crate) const MAX_HEAD_DIM: usize = 128;
/// Keys per tile of a block (`kTile`): a split's chunk is a multiple of it.
const TILE: usize = 16;
/// The fewest keys a split gets: below it a block's fixed costs outweigh its reads.
const MIN_KEYS_PER_SPLIT: usize = 64;
/// The blocks the split aims for (about two per SM of an H100/H200's 132).
const TARGET_BLOCKS: usize = 256;

/// The split of the keys: `(S, chunk)`, `chunk` keys (a multiple of [`TILE`]) per split,
/// `S = ⌈(L + N) / chunk⌉`. One split unless the `B·H·N` rows are fewer than
/// [`TARGET_BLOCKS`]; then as many as fill about that many blocks with at least
/// [`MIN_KEYS_PER_SPLIT`] keys each. A function of the shape alone, so a call's result does
/// not depend on the GPU.
pub(crate) fn splits(d: Dims) -> (usize, usize) {
    let keys = (d.pos + d.n).max(1);
    let rows = (d.b * d.h * d.n).max(1);
    let s = (keys / MIN_KEYS_PER_SPLIT)
        .min(TARGET_BLOCKS.div_ceil(rows))
        .max(1);
    let chunk = keys.div_ceil(s).div_ceil(TILE) * TILE;
    (keys.div_ceil(chunk), chunk)
}

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

/// Appends the new keys and values of `qkv [B, N, 3C]` to rows `pos..pos + N` of the caches
/// and returns `y [B, N, C]` (shapes, dtypes, devices and distinct storages validated by the
/// op; the head dim here).
pub(crate) fn forward(qkv: &Tensor, k_cache: &Tensor, v_cache: &Tensor, d: Dims) -> Result<Tensor> {
    let hd = d.hd();
    if hd == 0 || hd > MAX_HEAD_DIM {
        return Err(Error::unsupported(
            OP,
            format!("head dim {hd} on a device (the kernel takes 1 to {MAX_HEAD_DIM})"),
        ));
    }
    let dtype = qkv.dtype();
    let sfx = suffix(dtype)?;
    let (s, chunk) = splits(d);
    let too_big = || Error::invalid(format!("{OP}: {d:?} exceeds the launch grid"));
    let x =
        d.n.checked_mul(s)
            .and_then(|x| u32::try_from(x).ok())
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
    let qs = qkv.storage();
    // The write locks: the kernel appends to both caches.
    let (ks, vs) = (k_cache.storage_mut(), v_cache.storage_mut());
    let (qd, kd, vd) = (dev(&qs)?, dev(&ks)?, dev(&vs)?);
    let out = DeviceStorage::alloc(dtype, d.b * d.n * d.c, qd.device())?;
    let shape = Shape::from([d.b, d.n, d.c]);
    if d.b == 0 || d.n == 0 {
        return Tensor::from_storage(Storage::Device(out), shape);
    }
    let rows = d.b * d.h * d.n;
    // Freed in stream order after the launches (see device::cuda), so they may drop here.
    let workspace = if s > 1 {
        Some((
            DeviceStorage::alloc(DType::F32, rows * s * hd, qd.device())?,
            DeviceStorage::alloc(DType::F32, rows * s * 2, qd.device())?,
        ))
    } else {
        None
    };
    let prm = DecodeAttentionParams {
        qkv: qd.device_ptr(),
        k_cache: kd.device_ptr(),
        v_cache: vd.device_ptr(),
        out: out.device_ptr(),
        part: workspace.as_ref().map_or(0, |w| w.0.device_ptr()),
        stats: workspace.as_ref().map_or(0, |w| w.1.device_ptr()),
        b: int(d.b)?,
        n: int(d.n)?,
        c: int(d.c)?,
        h: int(d.h)?,
        pos: int(d.pos)?,
        max_len: int(d.max_len)?,
        chunk: int(chunk)?,
        splits: i32::try_from(s).map_err(|_| too_big())?,
        scale: (1.0 / (hd as f64).sqrt()) as f32,
    };
    let smem = 4 * (4 * hd + 8);
    let backend = qd.backend();
    backend.launch(
        &format!("decode_attention_fwd_{sfx}"),
        &LaunchConfig {
            grid: [x, y, z],
            block: [THREADS, 1, 1],
            shared_bytes: smem as u32,
        },
        &prm,
    )?;
    if s > 1 {
        // Launches on one stream run in order: every split's partial is in.
        backend.launch(
            &format!("decode_attention_combine_fwd_{sfx}"),
            &LaunchConfig {
                grid: [d.n as u32, y, z],
                block: [THREADS, 1, 1],
                shared_bytes: 0,
            },
            &prm,
        )?;
    }
    Tensor::from_storage(Storage::Device(out), shape)
}
