//! Launchers of `kernels/embedding.cu`, one code path for the CUDA backend and the
//! simulator. The token ids come from the host: they are uploaded (host → device) with
//! each launch; nothing is copied back.

use crate::device::{Backend, DeviceBuffer, LaunchConfig};
use crate::ops::elementwise::cuda::suffix;
use crate::storage::{DeviceStorage, Storage};
use crate::{Error, Result, Shape, Tensor};

/// Twin of `EmbeddingParams` in `kernels/embedding.cu` (the size is checked against the
/// compiled struct by a kernel test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct EmbeddingParams {
    pub tokens: u64,
    pub wte: u64,
    pub wpe: u64,
    pub out: u64,
    pub gy: u64,
    pub order: u64,
    pub offsets: u64,
    pub gwte: u64,
    pub gwpe: u64,
    pub n: i64,
    pub batch: i64,
    pub seq: i64,
    pub v: i64,
    pub p: i64,
    pub c: i64,
}

/// Every kernel the launchers may launch (checked against the compiled modules by the tidy
/// test).
pub(crate) const KERNELS: &[&str] = &[
    "embedding_fwd_f32",
    "embedding_fwd_bf16",
    "embedding_fwd_f16",
    "embedding_bwd_f32",
    "embedding_bwd_bf16",
    "embedding_bwd_f16",
];

/// Threads per block (the header's launch geometry): a block per row, its threads over
/// the row's 16-byte vectors (C = 768 bf16: 96 of them).
pub(crate) const THREADS: u32 = 128;

/// One block per row in a grid-stride loop over `rows` rows.
fn rows_config(backend: &Backend, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid: [rows.clamp(1, backend.max_blocks() as usize) as u32, 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    }
}

const OP: &str = "embedding";

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

/// A device copy of host values (freed in stream order once dropped after the launch).
fn upload<T: bytemuck::Pod>(backend: &Backend, v: &[T]) -> Result<DeviceBuffer> {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let mut buf = backend.alloc(bytes.len())?;
    backend.write(bytes, &mut buf)?;
    Ok(buf)
}

/// `out [batch, seq, c] = wte[tokens] + wpe[pos0 + position]` (validated by the caller:
/// tokens `< V`, `batch·seq` of them, `pos0 + seq ≤ P`). The kernel sees the rows of `wpe`
/// from `pos0` on as its table.
pub(crate) fn forward(
    tokens: &[u32],
    (batch, seq, c): (usize, usize, usize),
    pos0: usize,
    wte: &Tensor,
    wpe: &Tensor,
) -> Result<Tensor> {
    let name = format!("embedding_fwd_{}", suffix(wte.dtype())?);
    let (es, ps) = (wte.storage(), wpe.storage());
    let (ed, pd) = (dev(&es)?, dev(&ps)?);
    let shape = Shape::from([batch, seq, c]);
    let out = DeviceStorage::alloc(wte.dtype(), shape.elem_count(), ed.device())?;
    if tokens.len() * c > 0 {
        let backend = ed.backend();
        let toks = upload(backend, tokens)?;
        let params = EmbeddingParams {
            tokens: toks.device_ptr(),
            wte: ed.device_ptr(),
            wpe: pd.device_ptr() + (pos0 * c * wpe.dtype().size_in_bytes()) as u64,
            out: out.device_ptr(),
            n: int(tokens.len())?,
            batch: int(batch)?,
            seq: int(seq)?,
            v: int(wte.dims()[0])?,
            p: int(wpe.dims()[0] - pos0)?,
            c: int(c)?,
            ..Default::default()
        };
        backend.launch(&name, &rows_config(backend, tokens.len()), &params)?;
    }
    Tensor::from_storage(Storage::Device(out), shape)
}

/// The gradients `(gwte, gwpe)` of the tables that want one, from `gy [batch, seq, c]`.
pub(crate) fn backward(
    tokens: &[u32],
    (batch, seq, c): (usize, usize, usize),
    wte: &Tensor,
    wpe: &Tensor,
    gy: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dtype = wte.dtype();
    let name = format!("embedding_bwd_{}", suffix(dtype)?);
    let (v, p) = (wte.dims()[0], wpe.dims()[0]);
    let gs = gy.storage();
    let gd = dev(&gs)?;
    let alloc = |t: &Tensor| {
        DeviceStorage::alloc(dtype, t.elem_count(), gd.device()).map(|s| (s, t.shape().clone()))
    };
    let gwte = wte.requires_grad().then(|| alloc(wte)).transpose()?;
    let gwpe = wpe.requires_grad().then(|| alloc(wpe)).transpose()?;
    let rows = gwte.as_ref().map_or(0, |_| v) + gwpe.as_ref().map_or(0, |_| p);
    if rows * c > 0 {
        let backend = gd.backend();
        // The positions stably sorted by token id, and where each token's run starts.
        let mut order: Vec<i64> = (0..tokens.len() as i64).collect();
        order.sort_by_key(|&i| tokens[i as usize]);
        let mut offsets = vec![0i64; v + 1];
        for &t in tokens {
            offsets[t as usize + 1] += 1;
        }
        for i in 0..v {
            offsets[i + 1] += offsets[i];
        }
        // A zero-length buffer is still a valid allocation; keep one element at least.
        let order = if order.is_empty() { vec![0] } else { order };
        let (order, offsets) = (upload(backend, &order)?, upload(backend, &offsets)?);
        let params = EmbeddingParams {
            gy: gd.device_ptr(),
            order: order.device_ptr(),
            offsets: offsets.device_ptr(),
            gwte: gwte.as_ref().map_or(0, |s| s.0.device_ptr()),
            gwpe: gwpe.as_ref().map_or(0, |s| s.0.device_ptr()),
            n: int(tokens.len())?,
            batch: int(batch)?,
            seq: int(seq)?,
            v: int(v)?,
            p: int(p)?,
            c: int(c)?,
            ..Default::default()
        };
        backend.launch(&name, &rows_config(backend, rows), &params)?;
    }
    let wrap = |s: Option<(DeviceStorage, Shape)>| {
        s.map(|(s, shape)| Tensor::from_storage(Storage::Device(s), shape))
            .transpose()
    };
    Ok((wrap(gwte)?, wrap(gwpe)?))
}
