//! Split-K token reductions of `kernels/lora_reduce.cu`: a product whose reduction runs
//! over the `M` tokens and whose output is small,
//!
//! ```text
//! C[i, j] = alpha·Σ_t L[t, i]·R[t, j]   (+ C[i, j] with accumulate)     i < m, j < n
//! ```
//!
//! with `min(m, n) ≤ 64` — the LoRA backward's `gA = s·vᵀ·x [r, K]` and
//! `gB = s·gyᵀ·u [N, r]` (DESIGN §2). The tokens are cut into chunks of 64–256 (see
//! [`plan`]) so the grid fills the GPU; every (chunk, 64-row tile) block writes an f32
//! partial into a workspace `[chunks, big, small]`, and a second pass adds the chunks in
//! index order, applies `alpha` (and the old `C`) with one fma and rounds once: the result
//! is deterministic and, given the partials, bit-matched by the CPU twin ([`cpu`]).
//!
//! The skinny products `s·x·Aᵀ`, `s·gy·B` (`[M, r]`, reductions over `K`/`N`) are not
//! token reductions and stay with the generic GEMM ([`crate::ops::lora_matmul`]): at
//! `M = 8192` its 64-row tiles already make `M/64 = 128` blocks (one per SM), each reading
//! its own 64 rows of `x` or `gy` once, so they are bound by the same bytes (`2·M·K`) as
//! a dedicated `64 × r` tile would be; the 48 idle columns of a 64×64 tile cost mma issue
//! slots only (`2·M·K·64` FLOPs, ≤ 1 µs at the GPT-2 shape). What they lack — a
//! `cp.async` pipeline — is the generic GEMM's rewrite.

pub(crate) mod cpu;
pub(crate) mod cuda;

use crate::ops::lora_matmul::{Operand, check_accumulate};
use crate::tensor::{same_device, same_dtype};
use crate::{DType, Device, Error, Result, Shape, Tensor};

const OP: &str = "lora_reduce";

/// The most columns of the small side (the kernels' tile width).
pub(crate) const MAX_SMALL: usize = 64;
/// Rows of the big side per block.
pub(crate) const TILE: usize = 64;
/// The chunk-size bounds (tokens) and granularity (two 32-token k-tiles).
pub(crate) const CHUNK_MIN: usize = 64;
pub(crate) const CHUNK_MAX: usize = 256;
/// Blocks the heuristic aims for: 4 per SM on a 132-SM H100/H200.
pub(crate) const TARGET_BLOCKS: usize = 4 * 132;

/// How a reduction is cut: the canonical orientation (big side rows, small side columns),
/// the chunk size and count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// `true` when `m` is the small side: the kernel computes `Cᵀ` (`R` is its big operand).
    pub swapped: bool,
    pub big: usize,
    pub small: usize,
    /// Tokens per chunk, a multiple of 64 in `[64, 256]`.
    pub chunk: usize,
    pub chunks: usize,
    /// 64-row tiles of the big side.
    pub tiles: usize,
}

/// The chunk heuristic: `chunk = clamp(round_up(⌈tokens·tiles / 528⌉, 64), 64, 256)`, so
/// that `tiles·chunks` comes to about 528 blocks (4 per SM on 132 SMs) or more where the
/// tokens allow it (GPT-2's gA: 12 tiles × 43 chunks of 192 = 516), with chunks no longer
/// than 256 tokens (bounding the workspace and the second pass) and no shorter than 64 (two
/// k-tiles: the pipeline's prologue amortised). `None` when neither side is ≤ 64.
pub(crate) fn plan(m: usize, n: usize, tokens: usize) -> Option<Plan> {
    let (swapped, big, small) = if n <= MAX_SMALL {
        (false, m, n)
    } else if m <= MAX_SMALL {
        (true, n, m)
    } else {
        return None;
    };
    let tiles = big.div_ceil(TILE);
    let want = (tokens * tiles).div_ceil(TARGET_BLOCKS);
    let chunk = want.div_ceil(CHUNK_MIN).max(1) * CHUNK_MIN;
    let chunk = chunk.clamp(CHUNK_MIN, CHUNK_MAX);
    Some(Plan {
        swapped,
        big,
        small,
        chunk,
        chunks: tokens.div_ceil(chunk),
        tiles,
    })
}

/// One reduction over `t` tokens: `C [m, n] = alpha·Σ_t L[t, i]·R[t, j]`, `L` a `t × m`
/// view, `R` a `t × n` view.
#[derive(Clone, Debug)]
pub(crate) struct TokenReduce<'a> {
    pub m: usize,
    pub n: usize,
    pub t: usize,
    pub l: Operand<'a>,
    pub r: Operand<'a>,
    pub alpha: f64,
}

/// Checks that a `rows × cols` view stays inside its tensor.
fn check_view(o: &Operand<'_>, name: &str, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1)
        .checked_mul(o.row_stride)
        .zip((cols - 1).checked_mul(o.col_stride))
        .and_then(|(a, b)| a.checked_add(b))
        .and_then(|x| x.checked_add(o.offset));
    match last {
        Some(l) if l < o.t.elem_count() => Ok(()),
        _ => Err(Error::shape(
            OP,
            format!(
                "operand {name}: a {rows}×{cols} view (offset {}, strides {}, {}) does not \
                 fit in {} elements",
                o.offset,
                o.row_stride,
                o.col_stride,
                o.t.elem_count()
            ),
        )),
    }
}

impl<'a> TokenReduce<'a> {
    /// `C = L ᵀ·R` over `t` tokens (alpha 1).
    pub fn new(m: usize, n: usize, t: usize, l: Operand<'a>, r: Operand<'a>) -> Self {
        TokenReduce {
            m,
            n,
            t,
            l,
            r,
            alpha: 1.0,
        }
    }

    /// Scales the product.
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.alpha = alpha;
        self
    }

    /// The chunking of this reduction, or an error when neither side is ≤ 64.
    pub fn plan(&self) -> Result<Plan> {
        plan(self.m, self.n, self.t).ok_or_else(|| Error::Unsupported {
            op: OP,
            msg: format!(
                "a [{}, {}] output: one side must have at most {MAX_SMALL} elements",
                self.m, self.n
            ),
        })
    }

    /// Checks the operands: dtypes, devices, views, the plan.
    fn validate(&self, accumulate: Option<&Tensor>) -> Result<(DType, Plan)> {
        let mut ins = vec![self.l.t, self.r.t];
        ins.extend(accumulate);
        let dtype = same_dtype(OP, &ins)?;
        same_device(OP, &ins)?;
        check_view(&self.l, "L", self.t, self.m)?;
        check_view(&self.r, "R", self.t, self.n)?;
        check_accumulate(OP, accumulate, self.m, self.n)?;
        if !self.alpha.is_finite() {
            return Err(Error::invalid(format!("{OP}: alpha {}", self.alpha)));
        }
        if dtype == DType::F64 {
            return Err(Error::Unsupported {
                op: OP,
                msg: "f32/bf16/f16 operands only".into(),
            });
        }
        Ok((dtype, self.plan()?))
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
        let (dtype, plan) = self.validate(None)?;
        let device = self.l.t.device();
        if device == Device::Cpu {
            let c = cpu::reduce(self, &plan, None)?;
            return Tensor::from_cpu_values(c, shape, dtype);
        }
        let out = crate::storage::DeviceStorage::alloc(dtype, self.m * self.n, device)?;
        let t = Tensor::from_storage(crate::storage::Storage::Device(out), shape)?;
        cuda::launch(self, &plan, &t, false)?;
        Ok(t)
    }

    /// Adds the product into `c` (`[m, n]`, contiguous), rounding once per element (the
    /// second pass's `C +=`; the LoRA linear has no caller yet, the tests do).
    #[allow(dead_code)]
    pub fn accumulate_into(&self, c: &Tensor) -> Result<()> {
        let (_, plan) = self.validate(Some(c))?;
        if c.device() == Device::Cpu {
            let v = cpu::reduce(self, &plan, Some(c))?;
            return c.assign(&v);
        }
        cuda::launch(self, &plan, c, true).map(|_| ())
    }
}

/// `alpha·Lᵀ·R` for row-major `L [t, m]`, `R [t, n]` (one side ≤ 64) by the split-K
/// kernels, or — with `split_k = false` — by the generic GEMM the LoRA backward used
/// before them. For the benches (`benches/lora_reduce.rs`); not a stable API.
#[doc(hidden)]
pub fn bench_token_reduce(l: &Tensor, r: &Tensor, alpha: f64, split_k: bool) -> Result<Tensor> {
    let (t, m) = l.shape().dims2(OP)?;
    let (t2, n) = r.shape().dims2(OP)?;
    if t != t2 {
        return Err(Error::shape(
            OP,
            format!("L {} and R {} differ in tokens", l.shape(), r.shape()),
        ));
    }
    if split_k {
        TokenReduce::new(m, n, t, Operand::rows(l, m), Operand::rows(r, n))
            .alpha(alpha)
            .run([m, n])
    } else {
        crate::ops::lora_matmul::Gemm::new(m, n, t, Operand::transposed(l, m), Operand::rows(r, n))
            .alpha(alpha)
            .run([m, n])
    }
}

#[cfg(test)]
mod kernel_tests;
