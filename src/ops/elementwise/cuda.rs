//! Launchers for `kernels/elementwise.cu`, one code path for the CUDA backend and the
//! simulator.

use crate::device::{Backend, LaunchConfig};
use crate::storage::{DeviceStorage, Storage};
use crate::{DType, Error, Result, Shape, Tensor};

/// Twin of `ElementwiseParams` in `kernels/elementwise.cu` (the size is checked against
/// the compiled struct by `tests::params_match_the_kernels`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ElementwiseParams {
    pub x: u64,
    pub y: u64,
    pub out: u64,
    pub n: u64,
    pub cols: u64,
    pub rows: u64,
    pub alpha: f32,
    pub pad: u32,
}

/// Every kernel these launchers may launch (checked against the compiled modules by the
/// tidy test).
pub(crate) const KERNELS: &[&str] = &[
    "add_fwd_f32",
    "add_fwd_bf16",
    "add_fwd_f16",
    "bias_add_fwd_f32",
    "bias_add_fwd_bf16",
    "bias_add_fwd_f16",
    "bias_add_bwd_f32",
    "bias_add_bwd_bf16",
    "bias_add_bwd_f16",
    "gelu_fwd_f32",
    "gelu_fwd_bf16",
    "gelu_fwd_f16",
    "gelu_bwd_f32",
    "gelu_bwd_bf16",
    "gelu_bwd_f16",
    "scale_fwd_f32",
    "scale_fwd_bf16",
    "scale_fwd_f16",
    "cast_fwd_f32_bf16",
    "cast_fwd_f32_f16",
    "cast_fwd_bf16_f32",
    "cast_fwd_bf16_f16",
    "cast_fwd_f16_f32",
    "cast_fwd_f16_bf16",
];

/// Threads per block of every elementwise kernel (the header's launch geometry).
pub(crate) const THREADS: u32 = 256;

/// The grid-stride work items of a vectorised kernel over `n` values of `dtype`: one per
/// 16-byte vector (4 f32 or 8 bf16/f16 values), as `lf::vec16` in the kernels.
fn vectors(n: usize, dtype: DType) -> usize {
    n.div_ceil(16 / dtype.size_in_bytes())
}

/// The kernel-name suffix of a storage dtype.
pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F64 => Err(Error::Unsupported {
            op: "kernel",
            msg: "f64 has no kernels".into(),
        }),
    }
}

/// The device storage of a tensor's storage guard.
fn dev<'a>(s: &'a Storage, op: &'static str) -> Result<&'a DeviceStorage> {
    match s {
        Storage::Device(d) => Ok(d),
        Storage::Cpu(_) => Err(Error::invalid(format!(
            "{op}: a CPU tensor reached a kernel launcher"
        ))),
    }
}

/// Allocates the output, launches `kernel` over `work` items with the pointers filled in
/// by `params`, and wraps the output as a tensor of `shape`.
fn run(
    kernel: String,
    like: &DeviceStorage,
    dtype: DType,
    shape: Shape,
    work: usize,
    params: impl FnOnce(u64) -> ElementwiseParams,
) -> Result<Tensor> {
    let out = DeviceStorage::alloc(dtype, shape.elem_count(), like.device())?;
    let backend: &Backend = like.backend();
    if work > 0 {
        let cfg = LaunchConfig::grid_stride(work, THREADS, backend.max_blocks());
        backend.launch(&kernel, &cfg, &params(out.device_ptr()))?;
    }
    Tensor::from_storage(Storage::Device(out), shape)
}

/// `x ∘ y` elementwise for the two-input kernels (`add`, `bias_add`, `gelu_bwd`).
fn binary(op: &'static str, kernel: &str, x: &Tensor, y: &Tensor, cols: usize) -> Result<Tensor> {
    let (xs, ys) = (x.storage(), y.storage());
    let (xd, yd) = (dev(&xs, op)?, dev(&ys, op)?);
    let n = x.elem_count();
    run(
        format!("{kernel}_{}", suffix(x.dtype())?),
        xd,
        x.dtype(),
        x.shape().clone(),
        vectors(n, x.dtype()),
        |out| ElementwiseParams {
            x: xd.device_ptr(),
            y: yd.device_ptr(),
            out,
            n: n as u64,
            cols: cols as u64,
            ..Default::default()
        },
    )
}

/// `a + b`.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary("add", "add_fwd", a, b, 0)
}

/// `x + b` with `b [cols]` broadcast over rows.
pub(crate) fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary("bias_add", "bias_add_fwd", x, b, b.elem_count())
}

/// `gy · gelu'(x)`.
pub(crate) fn gelu_bwd(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    // The kernel reads gy as its first input and x as its second.
    binary("gelu_bwd", "gelu_bwd", gy, x, 0)
}

/// One-input kernels: `gelu_fwd`, `scale_fwd` (with `alpha`) and the casts (`vectorised`:
/// the kernel takes 16-byte vectors; the casts take one element per work item).
fn unary(
    op: &'static str,
    kernel: String,
    x: &Tensor,
    dtype: DType,
    alpha: f32,
    vectorised: bool,
) -> Result<Tensor> {
    let xs = x.storage();
    let xd = dev(&xs, op)?;
    let n = x.elem_count();
    let work = if vectorised { vectors(n, x.dtype()) } else { n };
    run(kernel, xd, dtype, x.shape().clone(), work, |out| {
        ElementwiseParams {
            x: xd.device_ptr(),
            out,
            n: n as u64,
            alpha,
            ..Default::default()
        }
    })
}

/// tanh-GELU.
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    unary(
        "gelu",
        format!("gelu_fwd_{}", suffix(x.dtype())?),
        x,
        x.dtype(),
        0.0,
        true,
    )
}

/// `c · x`, with `c` rounded to f32 (the kernels compute in f32).
pub(crate) fn scale(x: &Tensor, c: f64) -> Result<Tensor> {
    let k = format!("scale_fwd_{}", suffix(x.dtype())?);
    unary("scale", k, x, x.dtype(), c as f32, true)
}

/// A copy converted to `dtype`, rounding once (nearest even).
pub(crate) fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == x.dtype() {
        return x.deep_clone();
    }
    let k = format!("cast_fwd_{}_{}", suffix(x.dtype())?, suffix(dtype)?);
    unary("cast", k, x, dtype, 0.0, false)
}

/// The bias gradient: column sums of `gy [rows, cols]`, rows in order.
pub(crate) fn bias_grad(gy: &Tensor, cols: usize) -> Result<Tensor> {
    let gs = gy.storage();
    let gd = dev(&gs, "bias_grad")?;
    let rows = gy.elem_count() / cols.max(1);
    run(
        format!("bias_add_bwd_{}", suffix(gy.dtype())?),
        gd,
        gy.dtype(),
        Shape::from([cols]),
        cols,
        |out| ElementwiseParams {
            x: gd.device_ptr(),
            out,
            n: cols as u64,
            cols: cols as u64,
            rows: rows as u64,
            ..Default::default()
        },
    )
}
