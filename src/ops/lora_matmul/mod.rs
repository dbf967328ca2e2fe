//! The fused LoRA GEMM of `kernels/lora_matmul.cu`: one strided matrix product whose
//! reduction runs over a base pair of operands and then over a rank-`r` extension,
//!
//! ```text
//! C[i, j] = alpha·(Σ_{p<K} A[i, p]·B[p, j] + Σ_{q<K2} A2[i, q]·B2[q, j]) (+ bias[j]) (+ C)
//! ```
//!
//! with `B2` zero outside a column range. Every product of the LoRA linear's forward and
//! backward (DESIGN §2) is one call with other strides: `y = [x | s·u]·[W0 | B]ᵀ + b`,
//! `gx = [gy | s·v]·[W0 ; A]`, the skinny `s·u = s·x·Aᵀ`, `s·v = s·gy·B`, `gA`, `gB`.
//! [`lora_linear`](crate::ops::lora_linear) calls it on the CUDA backend and the simulator;
//! the CPU reference of this exact contract is [`cpu::gemm`] (f64 loops), the twin the
//! kernel tests compare against.

pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod wgmma;

use crate::storage::Storage;
use crate::tensor::{same_device, same_dtype};
use crate::{DType, Device, Error, Result, Shape, Tensor};
use std::ops::Range;

const OP: &str = "lora_matmul";

/// The `+=` output of an `[m, n]` product holds `m·n` elements (`op` names the caller).
pub(crate) fn check_accumulate(
    op: &'static str,
    accumulate: Option<&Tensor>,
    m: usize,
    n: usize,
) -> Result<()> {
    match accumulate {
        Some(c) if c.elem_count() != m * n => Err(Error::shape(
            op,
            format!("accumulating into {} for [{m}, {n}]", c.shape()),
        )),
        _ => Ok(()),
    }
}

/// A logical matrix read out of a tensor's storage: element `(i, j)` is at
/// `offset + i·row_stride + j·col_stride` (elements).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand<'a> {
    pub t: &'a Tensor,
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// The row-major matrix `t` itself (`[rows, cols]` with `cols` elements per row).
    pub fn rows(t: &'a Tensor, cols: usize) -> Self {
        Operand {
            t,
            offset: 0,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of the row-major `[rows, cols]` matrix `t`.
    pub fn transposed(t: &'a Tensor, cols: usize) -> Self {
        Operand {
            t,
            offset: 0,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// The same view starting `offset` elements further.
    pub fn at(mut self, offset: usize) -> Self {
        self.offset += offset;
        self
    }

    /// Checks that a `rows × cols` view stays inside the tensor.
    fn check(&self, name: &str, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let last = (rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|a| (cols - 1).checked_mul(self.col_stride).map(|b| (a, b)))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|x| x.checked_add(self.offset));
        match last {
            Some(l) if l < self.t.elem_count() => Ok(()),
            _ => Err(Error::shape(
                OP,
                format!(
                    "operand {name}: a {rows}×{cols} view (offset {}, strides {}, {}) \
                     does not fit in {} elements",
                    self.offset,
                    self.row_stride,
                    self.col_stride,
                    self.t.elem_count()
                ),
            )),
        }
    }
}

/// The rank-`K2` extension of the reduction: `A2 [M, K2]`, `B2 [K2, cols.len()]` adding to
/// the output columns `cols` only.
#[derive(Clone, Debug)]
pub(crate) struct Extension<'a> {
    pub a2: Operand<'a>,
    pub b2: Operand<'a>,
    pub k2: usize,
    pub cols: Range<usize>,
}

/// Which kernel computes the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// The forced tensor-core variants are chosen by the kernel tests only.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Variant {
    /// Tensor cores for bf16/f16 (the tile chosen per shape by [`cuda::tc_config`]), SIMT
    /// for f32.
    Auto,
    /// The SIMT kernel for every dtype.
    Simt,
    /// Tensor cores (bf16/f16 only), the tile chosen per shape.
    TensorCore,
    /// Tensor cores with 128×128 tiles (8 warps), whatever the shape.
    TensorCore128,
    /// Tensor cores with 64×64 tiles (4 warps), whatever the shape.
    TensorCore64,
    /// The Hopper kernel (wgmma + TMA, `kernels/lora_matmul_wgmma.cu`), the tile chosen per
    /// shape: an error where it cannot run (not a CC 9.0 GPU with the sm_90a cubin, nor the
    /// simulator) or cannot take the operands. `Auto` and `TensorCore` pick it by themselves
    /// on such a GPU ([`wgmma::choose`]).
    Wgmma,
    /// The Hopper kernel with 128×128 tiles.
    Wgmma128,
    /// The Hopper kernel with 128×256 tiles.
    Wgmma256,
}

/// One product: `C [m, n] = alpha·(A·B + A2·B2) (+ bias)`, into a new tensor or added
/// into `accumulate` (`[m, n]` row-major, contiguous).
#[derive(Clone, Debug)]
pub(crate) struct Gemm<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand<'a>,
    pub b: Operand<'a>,
    pub ext: Option<Extension<'a>>,
    pub bias: Option<&'a Tensor>,
    pub alpha: f64,
    pub variant: Variant,
}

impl Variant {
    /// The default variant: `Simt` when `LORAFUSE_GEMM=simt`, else `Auto` (an A/B switch
    /// for GPU runs; `LORAFUSE_GEMM_TILE=128|64` pins the tensor-core tile, see
    /// [`cuda::tc_config`]).
    pub fn from_env() -> Variant {
        static V: std::sync::OnceLock<Variant> = std::sync::OnceLock::new();
        *V.get_or_init(|| match std::env::var("LORAFUSE_GEMM").as_deref() {
            Ok("simt") => Variant::Simt,
            _ => Variant::Auto,
        })
    }

    /// Whether this variant insists on the tensor cores.
    fn tensor_cores_only(self) -> bool {
        matches!(
            self,
            Variant::TensorCore
                | Variant::TensorCore128
                | Variant::TensorCore64
                | Variant::Wgmma
                | Variant::Wgmma128
                | Variant::Wgmma256
        )
    }
}

impl<'a> Gemm<'a> {
    /// `C = alpha·A·B` with no extension, bias or accumulation.
    pub fn new(m: usize, n: usize, k: usize, a: Operand<'a>, b: Operand<'a>) -> Self {
        Gemm {
            m,
            n,
            k,
            a,
            b,
            ext: None,
            bias: None,
            alpha: 1.0,
            variant: Variant::from_env(),
        }
    }

    /// Adds the extension `A2·B2` to the reduction.
    pub fn ext(mut self, ext: Extension<'a>) -> Self {
        self.ext = Some(ext);
        self
    }

    /// Scales the product.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// Adds `bias [n]` to every row.
    pub fn bias(mut self, bias: Option<&'a Tensor>) -> Self {
        self.bias = bias;
        self
    }

    /// Checks the operands: dtypes, devices, views inside their tensors.
    fn validate(&self, accumulate: Option<&Tensor>) -> Result<DType> {
        let mut ins = vec![self.a.t, self.b.t];
        if let Some(e) = &self.ext {
            ins.push(e.a2.t);
            ins.push(e.b2.t);
        }
        ins.extend(self.bias);
        ins.extend(accumulate);
        let dtype = same_dtype(OP, &ins)?;
        same_device(OP, &ins)?;
        self.a.check("A", self.m, self.k)?;
        self.b.check("B", self.k, self.n)?;
        if let Some(e) = &self.ext {
            if e.cols.start > e.cols.end || e.cols.end > self.n {
                return Err(Error::shape(
                    OP,
                    format!("extension columns {:?} of {} outputs", e.cols, self.n),
                ));
            }
            e.a2.check("A2", self.m, e.k2)?;
            e.b2.check("B2", e.k2, e.cols.len())?;
        }
        if let Some(b) = self.bias
            && b.elem_count() != self.n
        {
            return Err(Error::shape(
                OP,
                format!("bias {} for {} outputs", b.shape(), self.n),
            ));
        }
        check_accumulate(OP, accumulate, self.m, self.n)?;
        if !self.alpha.is_finite() {
            return Err(Error::invalid(format!("{OP}: alpha {}", self.alpha)));
        }
        if self.variant.tensor_cores_only() && dtype == DType::F32 {
            return Err(Error::Unsupported {
                op: OP,
                msg: "the tensor-core kernel takes bf16/f16 operands".into(),
            });
        }
        Ok(dtype)
    }

    /// The product as a new `[m, n]` tensor (`shape` must hold `m·n` elements).
    pub fn run(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != self.m * self.n {
            return Err(Error::shape(
                OP,
                format!("output {shape} for [{}, {}]", self.m, self.n),
            ));
        }
        let dtype = self.validate(None)?;
        let device = self.a.t.device();
        if device == Device::Cpu {
            let c = cpu::gemm(self, None)?;
            return Tensor::from_cpu_values(c, shape, dtype);
        }
        let out = crate::storage::DeviceStorage::alloc(dtype, self.m * self.n, device)?;
        let t = Tensor::from_storage(Storage::Device(out), shape)?;
        cuda::launch(self, &t, false)?;
        Ok(t)
    }

    /// The product in the first `m·n` elements of a new tensor of `shape` (at least `m·n`
    /// elements), the rest zero: e.g. the gradient of the first `m` rows of a `[rows, n]`
    /// weight whose last rows take no part in the product (a padded vocabulary).
    pub fn run_zero_padded(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() < self.m * self.n {
            return Err(Error::shape(
                OP,
                format!("output {shape} for [{}, {}]", self.m, self.n),
            ));
        }
        let dtype = self.validate(None)?;
        let device = self.a.t.device();
        let t = Tensor::zeros(shape, dtype, &device)?;
        if device == Device::Cpu {
            let mut c = cpu::gemm(self, None)?;
            c.resize(t.elem_count(), 0.0);
            t.assign(&c)?;
            return Ok(t);
        }
        cuda::launch(self, &t, false)?;
        Ok(t)
    }

    /// Adds the product into `c` (`[m, n]`, contiguous), rounding once per element.
    pub fn accumulate_into(&self, c: &Tensor) -> Result<()> {
        self.validate(Some(c))?;
        if c.device() == Device::Cpu {
            let v = cpu::gemm(self, Some(c))?;
            return c.assign(&v);
        }
        cuda::launch(self, c, true)
    }
}

#[cfg(test)]
mod kernel_tests;
