//! Kernel-level tests (DESIGN §6) of the fused LoRA GEMM on every backend present: every
//! layout the LoRA linear uses, odd shapes (1, 7, 63, 65, 127: not multiples of the 64-wide
//! tiles or the 16/32-deep k-tiles), extensions of rank 1–64 over partial column ranges,
//! bias and accumulation, both kernels (SIMT, tensor cores) and three dtypes, against an
//! f64 product of dense copies of the logical matrices. Device outputs start as NaN, so an
//! element a kernel forgets to write fails.

use super::*;
use crate::testing::{assert_close, rng};
use rand::Rng;

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// DESIGN §6's rel-L2 tolerance for `dtype` outputs (f32 SIMT, bf16/f16 operands).
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        DType::F64 => 1e-12,
    }
}

/// A random logical `rows × cols` matrix stored row-major or transposed, as a tensor of
/// `dtype` on `device`, with the dense f64 values it holds (after rounding).
struct Mat {
    t: Tensor,
    transposed: bool,
    rows: usize,
    cols: usize,
    dense: Vec<f64>,
}

impl Mat {
    fn new(
        g: &mut impl Rng,
        rows: usize,
        cols: usize,
        transposed: bool,
        dtype: DType,
        device: &Device,
    ) -> Mat {
        let logical: Vec<f64> = (0..rows * cols)
            .map(|_| g.random_range(-1.0..1.0))
            .collect();
        let stored: Vec<f64> = if transposed {
            (0..rows * cols)
                .map(|e| logical[(e % rows) * cols + e / rows])
                .collect()
        } else {
            logical
        };
        let dims = if transposed {
            [cols, rows]
        } else {
            [rows, cols]
        };
        let t = Tensor::from_vec_as(stored, dims, dtype, device).unwrap();
        let back = t.to_vec_f64().unwrap();
        let dense = if transposed {
            (0..rows * cols)
                .map(|e| back[(e % cols) * rows + e / cols])
                .collect()
        } else {
            back
        };
        Mat {
            t,
            transposed,
            rows,
            cols,
            dense,
        }
    }

    fn operand(&self) -> Operand<'_> {
        if self.transposed {
            Operand::transposed(&self.t, self.rows)
        } else {
            Operand::rows(&self.t, self.cols)
        }
    }
}

/// One case: `[m, n]` from a reduction of `k` plus an extension of rank `k2` over `cols`.
#[derive(Clone, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    k2: usize,
    cols: Range<usize>,
    bias: bool,
    accumulate: bool,
}

fn case(m: usize, n: usize, k: usize, k2: usize, cols: Range<usize>) -> Case {
    Case {
        m,
        n,
        k,
        k2,
        cols,
        bias: false,
        accumulate: false,
    }
}

/// Shapes around the tiles; every LoRA rank of DESIGN §6 appears as an extension.
fn cases() -> Vec<Case> {
    vec![
        case(1, 1, 1, 0, 0..0),
        case(7, 63, 65, 1, 0..63),
        case(65, 7, 127, 2, 3..7),
        case(63, 65, 33, 4, 10..60),
        Case {
            bias: true,
            ..case(127, 64, 16, 8, 0..64)
        },
        Case {
            accumulate: true,
            ..case(64, 127, 1, 16, 64..127)
        },
        Case {
            bias: true,
            accumulate: true,
            ..case(33, 70, 0, 64, 5..70)
        },
        case(16, 24, 200, 0, 0..0),
    ]
}

/// Shapes the tensor-core kernel's 16-byte vector loads take (contiguous dimension a
/// multiple of 8, full 32-deep k-tiles, 64 full columns), run in all four layouts.
fn aligned_cases() -> Vec<Case> {
    vec![
        Case {
            bias: true,
            ..case(65, 128, 96, 16, 0..128)
        },
        Case {
            accumulate: true,
            ..case(70, 64, 40, 8, 8..64)
        },
    ]
}

/// The f64 reference of a case from the dense logical matrices.
#[allow(clippy::too_many_arguments)]
fn reference(
    c: &Case,
    a: &Mat,
    b: &Mat,
    a2: &Mat,
    b2: &Mat,
    bias: Option<&[f64]>,
    c0: Option<&[f64]>,
    alpha: f64,
) -> Vec<f64> {
    let mut out = vec![0.0; c.m * c.n];
    for i in 0..c.m {
        for j in 0..c.n {
            let mut acc = 0.0;
            for p in 0..c.k {
                acc += a.dense[i * c.k + p] * b.dense[p * c.n + j];
            }
            if c.cols.contains(&j) {
                let w = c.cols.len();
                for q in 0..c.k2 {
                    acc += a2.dense[i * c.k2 + q] * b2.dense[q * w + j - c.cols.start];
                }
            }
            let mut v = alpha * acc;
            if let Some(b) = bias {
                v += b[j];
            }
            if let Some(c0) = c0 {
                v += c0[i * c.n + j];
            }
            out[i * c.n + j] = v;
        }
    }
    out
}

fn products_match_the_reference(device: &Device) {
    let mut g = rng("lora_matmul_products");
    for dtype in DTYPES {
        let variants: &[Variant] = if dtype == DType::F32 {
            &[Variant::Simt]
        } else {
            &[Variant::Simt, Variant::TensorCore]
        };
        for &variant in variants {
            let mut all: Vec<(Case, Option<(bool, bool)>)> =
                cases().into_iter().map(|c| (c, None)).collect();
            for c in aligned_cases() {
                for layout in [(false, false), (false, true), (true, false), (true, true)] {
                    all.push((c.clone(), Some(layout)));
                }
            }
            for (c, layout) in all {
                let (ta, tb, ta2, tb2) = (
                    g.random::<bool>(),
                    g.random::<bool>(),
                    g.random::<bool>(),
                    g.random::<bool>(),
                );
                let (ta, tb) = layout.unwrap_or((ta, tb));
                let a = Mat::new(&mut g, c.m, c.k, ta, dtype, device);
                let b = Mat::new(&mut g, c.k, c.n, tb, dtype, device);
                let a2 = Mat::new(&mut g, c.m, c.k2, ta2, dtype, device);
                let b2 = Mat::new(&mut g, c.k2, c.cols.len(), tb2, dtype, device);
                let bias = Mat::new(&mut g, 1, c.n, false, dtype, device);
                let c0 = Mat::new(&mut g, c.m, c.n, false, dtype, device);
                let alpha = 0.75;
                let mut gemm = Gemm::new(c.m, c.n, c.k, a.operand(), b.operand()).alpha(alpha);
                gemm.variant = variant;
                if c.k2 > 0 {
                    gemm = gemm.ext(Extension {
                        a2: a2.operand(),
                        b2: b2.operand(),
                        k2: c.k2,
                        cols: c.cols.clone(),
                    });
                }
                if c.bias {
                    gemm = gemm.bias(Some(&bias.t));
                }
                let got = if c.accumulate {
                    gemm.accumulate_into(&c0.t).unwrap();
                    c0.t.to_vec_f64().unwrap()
                } else {
                    gemm.run([c.m, c.n]).unwrap().to_vec_f64().unwrap()
                };
                let want = reference(
                    &c,
                    &a,
                    &b,
                    &a2,
                    &b2,
                    c.bias.then_some(&bias.dense[..]),
                    c.accumulate.then_some(&c0.dense[..]),
                    alpha,
                );
                assert_close(
                    &format!(
                        "{device} {dtype} {variant:?} {c:?} (A{} B{})",
                        if ta { "ᵀ" } else { "" },
                        if tb { "ᵀ" } else { "" }
                    ),
                    &got,
                    &want,
                    tol(dtype),
                );
            }
        }
    }
}
crate::test_device!(products, products_match_the_reference);

/// A view reaching outside its tensor, mixed dtypes and an f32 tensor-core request are
/// errors, not launches.
fn bad_input_is_an_error(device: &Device) {
    let a = Tensor::zeros([4, 8], DType::BF16, device).unwrap();
    let b = Tensor::zeros([8, 4], DType::BF16, device).unwrap();
    let f = Tensor::zeros([8, 4], DType::F32, device).unwrap();
    let ok = Gemm::new(4, 4, 8, Operand::rows(&a, 8), Operand::rows(&b, 4));
    assert!(ok.run([4, 4]).is_ok());
    let too_far = Gemm::new(4, 4, 8, Operand::rows(&a, 8).at(1), Operand::rows(&b, 4));
    assert!(matches!(too_far.run([4, 4]), Err(Error::Shape { .. })));
    let mixed = Gemm::new(4, 4, 8, Operand::rows(&a, 8), Operand::rows(&f, 4));
    assert!(matches!(mixed.run([4, 4]), Err(Error::DType { .. })));
    let af = Tensor::zeros([4, 8], DType::F32, device).unwrap();
    let mut tc = Gemm::new(4, 4, 8, Operand::rows(&af, 8), Operand::rows(&f, 4));
    tc.variant = Variant::TensorCore;
    assert!(matches!(tc.run([4, 4]), Err(Error::Unsupported { .. })));
    assert!(ok.run([5, 4]).is_err());
}
crate::test_device!(bad_input, bad_input_is_an_error);

#[test]
fn params_match_the_kernels() {
    for k in cuda::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::LoraMatmulParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}
