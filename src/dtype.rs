//! Element types: storage dtypes and the CPU compute types.

use half::{bf16, f16};
use std::fmt;

/// The storage type of a tensor's elements.
///
/// `F64` exists for the CPU reference only (finite-difference gradient checks); the GPU
/// kernels handle `F32`, `BF16` and `F16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary64 (CPU reference only).
    F64,
    /// bfloat16: 8 exponent bits, 7 mantissa bits.
    BF16,
    /// IEEE binary16.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// True for the 16-bit types, which train with an fp32 master copy.
    pub fn is_half(self) -> bool {
        matches!(self, DType::BF16 | DType::F16)
    }

    /// The lowercase name (`"f32"`, `"bf16"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// Parses a name as printed by [`DType::as_str`].
    pub fn parse(s: &str) -> crate::Result<Self> {
        match s {
            "f32" => Ok(DType::F32),
            "f64" => Ok(DType::F64),
            "bf16" => Ok(DType::BF16),
            "f16" => Ok(DType::F16),
            _ => Err(crate::Error::invalid(format!(
                "unknown dtype {s:?} (expected f32, f64, bf16 or f16)"
            ))),
        }
    }

    /// Unit roundoff: half an ulp of 1.0 in this type (the bound of one rounding, relative).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64 / 2.0,
            DType::F64 => f64::EPSILON / 2.0,
            DType::BF16 => 2f64.powi(-8),
            DType::F16 => 2f64.powi(-11),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Rust type that can be the element type of a tensor.
pub trait Element: Copy + Send + Sync + 'static + bytemuck::Pod {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widens to f64 (exact for every supported type).
    fn to_f64(self) -> f64;
    /// Rounds from f64 (round to nearest even).
    fn from_f64(v: f64) -> Self;
    /// Widens to f32 (exact for the 16-bit types; rounds for f64).
    fn to_f32(self) -> f32;
    /// Rounds from f32 (round to nearest even).
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}

/// `v` rounded to f32 toward zero, with the last bit set when that was inexact ("round to
/// odd"). Rounding this to a format with at least two fewer mantissa bits than f32, to
/// nearest even, gives exactly the nearest-even rounding of `v` itself: one rounding from
/// f64 to bf16/f16, without double-rounding errors.
fn f64_to_f32_round_to_odd(v: f64) -> f32 {
    if !v.is_finite() {
        return v as f32;
    }
    let mut t = v as f32;
    if (t as f64).abs() > v.abs() {
        // Rounded away from zero (or overflowed to ±inf): step back one ulp toward zero.
        t = f32::from_bits(t.to_bits() - 1);
    }
    if t as f64 != v {
        t = f32::from_bits(t.to_bits() | 1);
    }
    t
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn from_f64(v: f64) -> Self {
        // Not `bf16::from_f64`: half 2.x rounds some values just above a tie down
        // (0x3f1c8001 as f64 → 0x3f1c, nearest even is 0x3f1d).
        bf16::from_f32(f64_to_f32_round_to_odd(v))
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f32(f64_to_f32_round_to_odd(v))
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// A type the CPU reference computes in: `f32` for f32/bf16/f16 tensors, `f64` for f64.
///
/// CPU kernels are written once, generic over `Real`.
pub trait Real:
    Element
    + num_traits::Float
    + num_traits::FromPrimitive
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::fmt::Debug
    + Default
{
    /// Converts an f64 constant.
    fn c(v: f64) -> Self {
        <Self as Element>::from_f64(v)
    }
    /// `e^x` for hot loops: vectorisable, relative error < 3e-7 for f32, libm's for f64.
    fn exp_fast(self) -> Self;
    /// `tanh(x)` for hot loops: vectorisable within 3e-7 absolute for f32, libm's for f64.
    fn tanh_fast(self) -> Self;
}
impl Real for f32 {
    #[inline(always)]
    fn exp_fast(self) -> Self {
        crate::math::exp_f32(self)
    }
    #[inline(always)]
    fn tanh_fast(self) -> Self {
        crate::math::tanh_f32(self)
    }
}
impl Real for f64 {
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn tanh_fast(self) -> Self {
        self.tanh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rand::Rng;

    #[test]
    fn from_f64_of_an_f32_value_equals_from_f32() {
        let mut g = crate::testing::rng("from_f64_of_f32");
        for _ in 0..1_000_000 {
            let x = f32::from_bits(g.random());
            if x.is_nan() {
                continue;
            }
            let (b, h) = (
                <bf16 as Element>::from_f64(x as f64),
                <f16 as Element>::from_f64(x as f64),
            );
            assert_eq!(b.to_bits(), bf16::from_f32(x).to_bits(), "bf16 of {x:e}");
            assert_eq!(h.to_bits(), f16::from_f32(x).to_bits(), "f16 of {x:e}");
        }
    }

    /// Just above, just below and exactly at the midpoint of two neighbours (values that no
    /// f32 holds), from_f64 picks the nearer one, and the even one on a tie.
    #[test]
    fn from_f64_rounds_near_ties_once() {
        fn check<T: Element>(lo: T, hi: T, lo_bits: u16) {
            let (l, h) = (lo.to_f64(), hi.to_f64());
            let m = (l + h) / 2.0;
            let eps = (h - l) * 2f64.powi(-30);
            let even = if lo_bits.is_multiple_of(2) { l } else { h };
            assert_eq!(T::from_f64(m + eps).to_f64(), h, "{m:e} + eps");
            assert_eq!(T::from_f64(m - eps).to_f64(), l, "{m:e} - eps");
            assert_eq!(T::from_f64(m).to_f64(), even, "{m:e}");
        }
        let mut g = crate::testing::rng("from_f64_near_ties");
        for _ in 0..100_000 {
            let bits = g.random::<u16>() & 0x7f7e; // finite, below the largest value
            check(bf16::from_bits(bits), bf16::from_bits(bits + 1), bits);
            let bits = g.random::<u16>() & 0x7bfe;
            check(f16::from_bits(bits), f16::from_bits(bits + 1), bits);
        }
    }
}
