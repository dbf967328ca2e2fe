//! Launcher of `kernels/lora_merge.cu`, one code path for the CUDA backend and the
//! simulator.

use crate::device::LaunchConfig;
use crate::ops::LoraTerm;
use crate::optim::rounding::{Rounding, stream_key};
use crate::storage::Storage;
use crate::{DType, Error, Result, Tensor};

/// Twin of `LoraMergeTerm` in `kernels/lora_merge.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LoraMergeTerm {
    pub a: u64,
    pub b: u64,
    pub r: i64,
    pub row0: i64,
    pub row1: i64,
    pub scale: f32,
    pub pad: i32,
}
// The `.cu` asserts the same size for its twin.
const _: () = assert!(std::mem::size_of::<LoraMergeTerm>() == 48);

/// Twin of `LoraMergeParams` in `kernels/lora_merge.cu` (the size is checked against the
/// compiled struct by a kernel test).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LoraMergeParams {
    pub w: u64,
    pub terms: u64,
    pub n: i64,
    pub k: i64,
    pub num_terms: i64,
    pub key: u64,
    pub stochastic: i32,
    pub pad: i32,
}

/// Every kernel the launcher may launch (checked against the compiled modules by the tidy
/// test).
pub(crate) const KERNELS: &[&str] = &[
    "lora_merge_fwd_f32",
    "lora_merge_fwd_bf16",
    "lora_merge_fwd_f16",
];

/// Columns and rows of W per block (the header's launch geometry).
pub(crate) const THREADS: usize = 256;
const ROWS: usize = 32;

fn kernel(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("lora_merge_fwd_f32"),
        DType::BF16 => Ok("lora_merge_fwd_bf16"),
        DType::F16 => Ok("lora_merge_fwd_f16"),
        dt => Err(Error::Unsupported {
            op: "lora_merge",
            msg: format!("no {dt} kernel"),
        }),
    }
}

fn device_ptr(t: &Tensor) -> Result<u64> {
    match &*t.storage() {
        Storage::Device(d) => Ok(d.device_ptr()),
        Storage::Cpu(_) => Err(Error::invalid(
            "lora_merge: a CPU tensor reached the kernel launcher".to_string(),
        )),
    }
}

fn int(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("lora_merge: {v} overflows i64")))
}

/// Launches the merge of `terms` into `w [n, k]` (validated by the caller).
pub(crate) fn launch(w: &Tensor, terms: &[LoraTerm<'_>], rounding: Rounding) -> Result<()> {
    let (n, k) = (w.dims()[0], w.dims()[1]);
    let name = kernel(w.dtype())?;
    let terms: Vec<&LoraTerm<'_>> = terms
        .iter()
        .filter(|t| !t.out_range.is_empty() && t.a.dims()[0] > 0)
        .collect();
    if n == 0 || k == 0 || terms.is_empty() {
        return Ok(());
    }
    let descs = terms
        .iter()
        .map(|t| {
            Ok(LoraMergeTerm {
                a: device_ptr(t.a)?,
                b: device_ptr(t.b)?,
                r: int(t.a.dims()[0])?,
                row0: int(t.out_range.start)?,
                row1: int(t.out_range.end)?,
                scale: t.scale as f32,
                pad: 0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let grid_y = u32::try_from(n.div_ceil(ROWS))
        .ok()
        .filter(|&y| y <= 65_535)
        .ok_or_else(|| Error::invalid(format!("lora_merge: {n} rows exceed the grid")))?;
    let grid_x = u32::try_from(k.div_ceil(THREADS))
        .map_err(|_| Error::invalid(format!("lora_merge: {k} columns exceed the grid")))?;
    let ws = w.storage();
    let wd = match &*ws {
        Storage::Device(d) => d,
        Storage::Cpu(_) => {
            return Err(Error::invalid(
                "lora_merge: a CPU weight reached the kernel launcher".to_string(),
            ));
        }
    };
    let backend = wd.backend();
    let bytes: &[u8] = bytemuck::cast_slice(&descs);
    // Freed in stream order after the launch (see device::cuda), so it may drop here.
    let mut descs_buf = backend.alloc(bytes.len())?;
    backend.write(bytes, &mut descs_buf)?;
    let (stochastic, key) = match rounding {
        Rounding::Stochastic { seed } if w.dtype() != DType::F32 => (1, stream_key(seed, 0, 0)),
        _ => (0, 0),
    };
    let params = LoraMergeParams {
        w: wd.device_ptr(),
        terms: descs_buf.device_ptr(),
        n: int(n)?,
        k: int(k)?,
        num_terms: int(descs.len())?,
        key,
        stochastic,
        pad: 0,
    };
    let cfg = LaunchConfig {
        grid: [grid_x, grid_y, 1],
        block: [THREADS as u32, 1, 1],
        shared_bytes: 0,
    };
    backend.launch(name, &cfg, &params)
}
