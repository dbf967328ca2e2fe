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

use crate::testing::rel_l2_tolerance as tol;

/// A random logical `rows × cols` matrix stored row-major or transposed, as a tensor of
/// `dtype` on `device`, with the dense f64 values it holds (after rounding).
struct Mat {
    t: Tensor,
    /// Elements before the matrix in its tensor (a misaligned view when odd).
    offset: usize,
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
        Mat::at(g, rows, cols, transposed, 0, dtype, device)
    }

    /// The same, stored `offset` elements into its tensor.
    fn at(
        g: &mut impl Rng,
        rows: usize,
        cols: usize,
        transposed: bool,
        offset: usize,
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
        let mut full: Vec<f64> = (0..offset).map(|_| g.random_range(-1.0..1.0)).collect();
        full.extend(stored);
        let t = Tensor::from_vec_as(full, [offset + rows * cols], dtype, device).unwrap();
        let back = t.to_vec_f64().unwrap()[offset..].to_vec();
        let dense = if transposed {
            (0..rows * cols)
                .map(|e| back[(e % cols) * rows + e / cols])
                .collect()
        } else {
            back
        };
        Mat {
            t,
            offset,
            transposed,
            rows,
            cols,
            dense,
        }
    }

    fn operand(&self) -> Operand<'_> {
        if self.transposed {
            Operand::transposed(&self.t, self.rows).at(self.offset)
        } else {
            Operand::rows(&self.t, self.cols).at(self.offset)
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

/// How the four operands of a case are stored: transposed or not, and how many elements
/// into their tensors (odd: a misaligned base, the tensor-core kernel's fallback loader).
#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    t: [bool; 4],
    offset: [usize; 4],
}

impl Layout {
    fn transposed(ta: bool, tb: bool, ta2: bool, tb2: bool) -> Layout {
        Layout {
            t: [ta, tb, ta2, tb2],
            offset: [0; 4],
        }
    }
}

/// The four operands A, B, A2, B2 of a case, random, stored as `l` says.
fn case_operands(device: &Device, g: &mut impl Rng, dtype: DType, c: &Case, l: Layout) -> [Mat; 4] {
    [
        Mat::at(g, c.m, c.k, l.t[0], l.offset[0], dtype, device),
        Mat::at(g, c.k, c.n, l.t[1], l.offset[1], dtype, device),
        Mat::at(g, c.m, c.k2, l.t[2], l.offset[2], dtype, device),
        Mat::at(g, c.k2, c.cols.len(), l.t[3], l.offset[3], dtype, device),
    ]
}

/// The product of a case over its operands (the extension when `k2 > 0`) on `variant`.
fn case_gemm<'a>(ops: &'a [Mat; 4], c: &Case, variant: Variant) -> Gemm<'a> {
    let [a, b, a2, b2] = ops;
    let mut gemm = Gemm::new(c.m, c.n, c.k, a.operand(), b.operand());
    gemm.variant = variant;
    if c.k2 > 0 {
        gemm = gemm.ext(Extension {
            a2: a2.operand(),
            b2: b2.operand(),
            k2: c.k2,
            cols: c.cols.clone(),
        });
    }
    gemm
}

/// Runs one case on `device` and compares it with the f64 reference.
fn check_case(
    device: &Device,
    g: &mut impl Rng,
    dtype: DType,
    variant: Variant,
    c: &Case,
    l: Layout,
) {
    let ops = case_operands(device, g, dtype, c, l);
    let [a, b, a2, b2] = &ops;
    let bias = Mat::new(g, 1, c.n, false, dtype, device);
    let c0 = Mat::new(g, c.m, c.n, false, dtype, device);
    let alpha = 0.75;
    let mut gemm = case_gemm(&ops, c, variant).alpha(alpha);
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
        c,
        a,
        b,
        a2,
        b2,
        c.bias.then_some(&bias.dense[..]),
        c.accumulate.then_some(&c0.dense[..]),
        alpha,
    );
    assert_close(
        &format!("{device} {dtype} {variant:?} {c:?} {l:?}"),
        &got,
        &want,
        tol(dtype),
    );
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
                check_case(
                    device,
                    &mut g,
                    dtype,
                    variant,
                    &c,
                    Layout::transposed(ta, tb, ta2, tb2),
                );
            }
        }
    }
}
crate::test_device!(products, products_match_the_reference);

/// The two tensor-core tiles (forced: 128×128 with 8 warps, 64×64 with 4) in every
/// layout of the four operands — A k- or m-contiguous, B k- or n-contiguous, the same for
/// A2/B2 — on a shape whose strides are multiples of 8 (every k-tile by cp.async) and
/// whose edges are not whole tiles: M 136, N 72 (partial tiles in both), K 40 (a
/// zero-filled half k-tile), K2 16 over the columns 8..64 (across the 64-wide tile
/// boundary). bf16 and f16 alternate over the 16 layouts, the other way round per tile,
/// so each (tile, layout) runs once and each (tile, dtype) eight times.
fn tensor_core_tiles_in_every_layout(device: &Device) {
    let mut g = rng("lora_matmul_tc_layouts");
    let c = Case {
        bias: true,
        ..case(136, 72, 40, 16, 8..64)
    };
    for (v, variant) in [Variant::TensorCore128, Variant::TensorCore64]
        .into_iter()
        .enumerate()
    {
        for bits in 0..16usize {
            let dtype = [DType::BF16, DType::F16][(bits + v) % 2];
            let l = Layout::transposed(bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0);
            let c = Case {
                accumulate: bits % 3 == 0,
                ..c.clone()
            };
            check_case(device, &mut g, dtype, variant, &c, l);
        }
    }
}
crate::test_device!(tc_layouts, tensor_core_tiles_in_every_layout);

/// Odd shapes on both tensor-core tiles: M, N, K from {1, 7, 63, 65, 127, 129, 200} and
/// K2 from {0, 1, 16, 64}, extensions straddling chunk and tile boundaries, random
/// layouts; strides that are not multiples of 8 take the fallback loader and the
/// element-wise epilogue. A covering subset, not the product (the simulator is slow).
fn tensor_core_odd_shapes(device: &Device) {
    let mut g = rng("lora_matmul_tc_odd");
    let shapes = [
        (
            Variant::TensorCore128,
            DType::BF16,
            case(129, 65, 7, 1, 3..65),
            true,
            false,
        ),
        (
            Variant::TensorCore128,
            DType::F16,
            case(200, 129, 65, 0, 0..0),
            true,
            true,
        ),
        (
            Variant::TensorCore128,
            DType::BF16,
            case(1, 63, 200, 16, 60..63),
            false,
            false,
        ),
        (
            Variant::TensorCore128,
            DType::F16,
            case(127, 200, 1, 64, 0..200),
            false,
            true,
        ),
        (
            Variant::TensorCore64,
            DType::F16,
            case(7, 200, 63, 64, 0..129),
            false,
            true,
        ),
        (
            Variant::TensorCore64,
            DType::BF16,
            case(65, 1, 127, 16, 0..1),
            true,
            false,
        ),
        (
            Variant::TensorCore64,
            DType::F16,
            case(63, 7, 129, 1, 2..5),
            true,
            true,
        ),
        (
            Variant::TensorCore64,
            DType::BF16,
            case(129, 127, 200, 16, 1..127),
            false,
            false,
        ),
    ];
    for (variant, dtype, c, bias, accumulate) in shapes {
        let c = Case {
            bias,
            accumulate,
            ..c
        };
        let l = Layout::transposed(g.random(), g.random(), g.random(), g.random());
        check_case(device, &mut g, dtype, variant, &c, l);
    }
}
crate::test_device!(tc_odd_shapes, tensor_core_odd_shapes);

/// Misaligned operands (an odd offset: the base is not 16-byte aligned) take the
/// fallback loader, each operand alone and all at once, in both tiles; the rest of the
/// operands stay on cp.async. Shape aligned as in `tc_layouts`, so only the offset
/// decides the path.
fn tensor_core_misaligned_operands(device: &Device) {
    let mut g = rng("lora_matmul_tc_misaligned");
    let c = Case {
        accumulate: true,
        ..case(136, 72, 40, 16, 8..64)
    };
    let offsets = [
        [1, 0, 0, 0],
        [0, 3, 0, 0],
        [0, 0, 5, 0],
        [0, 0, 0, 7],
        [1, 1, 1, 1],
    ];
    for (v, variant) in [Variant::TensorCore128, Variant::TensorCore64]
        .into_iter()
        .enumerate()
    {
        for (o, offset) in offsets.into_iter().enumerate() {
            let dtype = [DType::BF16, DType::F16][(o + v) % 2];
            let t = [o % 2 == 0, o % 3 == 0, o >= 2, v == 1];
            check_case(device, &mut g, dtype, variant, &c, Layout { t, offset });
        }
    }
}
crate::test_device!(tc_misaligned, tensor_core_misaligned_operands);

/// Every `__syncthreads()` and `cp_async_wait` the GEMM kernels reach is load-bearing:
/// with any one deleted (the simulator's mutation sites), this small probe fails. It runs
/// both tensor-core tiles over 5 k-tiles with the extension, bias and accumulate, in the
/// plain and the transposed layouts (the `ldmatrix.trans` loads), a misaligned operand (the
/// fallback loader) and the SIMT kernel.
#[test]
fn every_barrier_and_wait_is_load_bearing() {
    let c = Case {
        bias: true,
        accumulate: true,
        ..case(136, 72, 160, 16, 8..64)
    };
    let plain = Layout::default();
    let all_t = Layout::transposed(true, true, true, true);
    let misaligned = Layout {
        t: [false, true, false, true],
        offset: [1, 0, 0, 3],
    };
    let probe = |variant: Variant, dtype: DType, l: Layout| {
        let c = c.clone();
        move || {
            let mut g = rng("lora_matmul_mutants");
            check_case(&Device::Sim, &mut g, dtype, variant, &c, l);
        }
    };
    let probes = [
        probe(Variant::TensorCore128, DType::BF16, plain),
        probe(Variant::TensorCore128, DType::F16, all_t),
        probe(Variant::TensorCore64, DType::BF16, all_t),
        probe(Variant::TensorCore64, DType::F16, misaligned),
        probe(Variant::TensorCore128, DType::BF16, misaligned),
        probe(Variant::Simt, DType::F32, plain),
    ];
    let probes: Vec<&dyn Fn()> = probes.iter().map(|p| p as &dyn Fn()).collect();
    crate::device::sim_mutation::assert_every_site_is_load_bearing(
        "lora_matmul",
        &["lora_matmul_tc128", "lora_matmul_tc64", "lora_matmul_fwd"],
        &probes,
    );
}

/// The tile heuristic of the header: 128×128 tiles for one wave or more of them, 64×64
/// for small or skinny products.
#[test]
fn tile_heuristic() {
    use cuda::{TC_LARGE, TC_SMALL, tc_config};
    assert_eq!(tc_config(8192, 4096), TC_LARGE);
    assert_eq!(tc_config(8192, 768), TC_LARGE); // 64 × 6 = 384 tiles
    assert_eq!(tc_config(8192, 50257), TC_LARGE);
    assert_eq!(tc_config(8192, 16), TC_SMALL); // s·u: N = r
    assert_eq!(tc_config(16, 768), TC_SMALL); // gA: M = r
    assert_eq!(tc_config(1024, 1024), TC_SMALL); // 64 tiles < 132
    assert_eq!(TC_LARGE.smem, 48 * 1024);
}

/// The host twin of the kernel's per-operand loader choice (`tc_mode`): 16-byte copies
/// along k or along the outer index where strides and base allow, the fallback otherwise.
#[test]
fn tc_load_follows_the_kernels_tc_mode() {
    use cuda::TcLoad::{self, Fallback, KContiguous, OuterContiguous};
    let of = |off: usize, os: usize, ks: usize, o_lo: usize| -> TcLoad {
        let t = Tensor::zeros([1], DType::BF16, &Device::Cpu).unwrap();
        let o = Operand {
            t: &t,
            offset: off,
            row_stride: os,
            col_stride: ks,
        };
        // Operand A of a product: its outer stride is the row stride.
        let g = Gemm::new(8, 8, 8, o, Operand::rows(&t, 8)).ext(Extension {
            a2: o,
            b2: Operand {
                t: &t,
                offset: off,
                row_stride: ks,
                col_stride: os,
            },
            k2: 4,
            cols: o_lo..o_lo + 8,
        });
        let p = cuda::tc_path(&g);
        let (a2, b2) = p.ext.unwrap();
        assert_eq!(p.a, a2);
        if o_lo == 0 {
            assert_eq!(p.a, b2, "B2 with its columns from 0 is loaded as A is");
        }
        if !o_lo.is_multiple_of(8) && p.a == OuterContiguous {
            assert_eq!(
                b2, Fallback,
                "B2 in the O layout needs b2_n0 a multiple of 8"
            );
        }
        p.a
    };
    assert_eq!(of(0, 768, 1, 0), KContiguous);
    assert_eq!(of(0, 50304, 1, 0), KContiguous);
    assert_eq!(of(0, 50257, 1, 0), Fallback); // the unpadded glogits rows
    assert_eq!(of(8, 64, 1, 0), KContiguous);
    assert_eq!(of(3, 64, 1, 0), Fallback); // misaligned base
    assert_eq!(of(0, 1, 768, 0), OuterContiguous);
    assert_eq!(of(0, 1, 50304, 0), OuterContiguous);
    assert_eq!(of(0, 1, 50257, 0), Fallback); // the unpadded glogitsᵀ
    assert_eq!(of(0, 1, 768, 4), OuterContiguous);
    assert_eq!(of(0, 3, 5, 0), Fallback);
    let t = Tensor::zeros([1], DType::BF16, &Device::Cpu).unwrap();
    let g = |n| Gemm::new(8, n, 8, Operand::rows(&t, 8), Operand::rows(&t, n));
    assert!(cuda::tc_path(&g(64)).vector_epilogue && cuda::tc_path(&g(64)).is_fast());
    assert!(!cuda::tc_path(&g(61)).vector_epilogue && !cuda::tc_path(&g(61)).is_fast());
}

/// The GPT-2 124M LM head (8192 tokens, C = 768, V = 50257 padded to Vp = 50304), its three
/// products as `linear` builds them (the logits `x·wteᵀ`, and in the backward `gx =
/// glogits·wte` and `gwte = glogitsᵀ·x`): at Vp each takes the tensor-core kernel with
/// every operand on `cp.async` and 16-byte stores; at the unpadded 50257 both backward
/// products load glogits through the fallback and the forward stores element-wise. A
/// planning test (strides only: stand-in tensors, no GEMM of 633 GFLOP runs).
#[test]
fn lm_head_gemms_take_the_tensor_core_path_at_the_padded_vocabulary() {
    use crate::ops::matmul::{fwd_gemm, gw_gemm, gx_gemm};
    use cuda::TcLoad::{Fallback, KContiguous, OuterContiguous};
    let (tokens, c) = (8192, 768);
    let cfg = crate::checkpoint::Gpt2Config::gpt2_small();
    let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size());
    assert_eq!((v, vp), (50257, 50304));
    let t = Tensor::zeros([1], DType::BF16, &Device::Cpu).unwrap();
    let (x, wte, glogits) = (&t, &t, &t);
    for dtype in [DType::BF16, DType::F16] {
        for cols in [vp, v] {
            let dims = (tokens, c, cols);
            let products = [
                ("logits = x·wteᵀ", fwd_gemm(x, wte, dims)),
                ("gx = glogits·wte", gx_gemm(glogits, wte, dims)),
                ("gwte = glogitsᵀ·x", gw_gemm(glogits, x, dims)),
            ];
            for (i, (name, g)) in products.iter().enumerate() {
                let name = format!("{dtype} {name} at {cols} columns");
                let plan = cuda::plan(dtype, Variant::Auto, g.m, g.n).unwrap();
                assert!(
                    plan.tc.is_some() && plan.name.contains("_tc"),
                    "{name}: {plan:?}"
                );
                let path = cuda::tc_path(g);
                println!("{name}: {} {path:?}", plan.name);
                if cols == vp {
                    assert!(path.is_fast(), "{name}: {path:?}");
                    continue;
                }
                // Unpadded, what the padding fixes.
                let want = [
                    (KContiguous, KContiguous, false),
                    (Fallback, OuterContiguous, true),
                    (Fallback, OuterContiguous, true),
                ][i];
                assert_eq!((path.a, path.b, path.vector_epilogue), want, "{name}");
            }
        }
    }
}

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
    for v in [
        Variant::TensorCore,
        Variant::TensorCore128,
        Variant::TensorCore64,
    ] {
        let mut tc = Gemm::new(4, 4, 8, Operand::rows(&af, 8), Operand::rows(&f, 4));
        tc.variant = v;
        assert!(matches!(tc.run([4, 4]), Err(Error::Unsupported { .. })));
    }
    assert!(ok.run([5, 4]).is_err());
}
crate::test_device!(bad_input, bad_input_is_an_error);

/// `run_zero_padded`: the product in the first `m·n` elements of a larger output, the rest
/// exactly 0 (the output starts zeroed, not poisoned), the same values as `run`; an output
/// smaller than `m·n` is an error.
fn zero_padded_output(device: &Device) {
    let mut g = rng("lora_matmul_zero_padded");
    for dtype in DTYPES {
        let (m, n, k) = (13, 24, 40);
        let a = Mat::new(&mut g, m, k, false, dtype, device);
        let b = Mat::new(&mut g, k, n, true, dtype, device);
        let gemm = || {
            Gemm::new(
                m,
                n,
                k,
                Operand::rows(&a.t, k),
                Operand::transposed(&b.t, k),
            )
        };
        let want = gemm().run([m, n]).unwrap().to_vec_f64().unwrap();
        let got = gemm().run_zero_padded([m + 3, n]).unwrap();
        assert_eq!(got.dims(), &[m + 3, n]);
        let got = got.to_vec_f64().unwrap();
        assert_eq!(&got[..m * n], &want[..], "{device} {dtype}");
        assert!(
            got[m * n..].iter().all(|x| x.to_bits() == 0),
            "{device} {dtype}: the padding is not +0"
        );
        assert!(matches!(
            gemm().run_zero_padded([m * n - 1]),
            Err(Error::Shape { .. })
        ));
    }
}
crate::test_device!(zero_padded, zero_padded_output);

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

// ---- The Hopper kernel (kernels/lora_matmul_wgmma.cu) ----

/// The layouts the wgmma kernel takes: every operand contiguous along the reduction (A and
/// A2 row-major, B and B2 stored transposed), as in the LoRA forward `[x | s·u]·[W0 | B]ᵀ`.
const K_MAJOR: Layout = Layout {
    t: [false, true, false, true],
    offset: [0; 4],
};

/// The layouts of the backward gx on the wgmma kernel: every operand row-major, so B and B2
/// are contiguous along N (MN-major, read through transposed-B descriptors).
const MN_B: Layout = Layout {
    t: [false; 4],
    offset: [0; 4],
};

/// Where a test of the wgmma kernel can run (`testing::hopper_kernel_runs_on`).
fn wgmma_runs_on(device: &Device) -> bool {
    crate::testing::hopper_kernel_runs_on(device, wgmma::KERNELS[0])
}

/// Both wgmma tiles against the f64 reference on shapes around them: M and N not multiples
/// of 128 or 256 (partial tiles, a tile wider than N), K a multiple of 8 but not of 64 (a
/// zero-filled k-tile), extensions of rank 8–64 over column ranges that start and end inside
/// tiles or miss whole tile columns (their k-tiles skipped), bias and accumulate, more tiles
/// than the simulator's 2 persistent blocks (each block runs several tiles, its pipeline
/// phases carried across them), more k-tiles than stages.
fn wgmma_products_match_the_reference(device: &Device) {
    if !wgmma_runs_on(device) {
        return;
    }
    let mut g = rng("lora_matmul_wgmma");
    let shapes = [
        (
            Variant::Wgmma256,
            DType::BF16,
            case(136, 300, 200, 16, 8..280),
            true,
            true,
        ),
        (
            Variant::Wgmma128,
            DType::F16,
            case(129, 300, 72, 8, 0..100),
            true,
            false,
        ),
        (
            Variant::Wgmma128,
            DType::BF16,
            case(7, 64, 8, 64, 60..64),
            false,
            true,
        ),
        (
            Variant::Wgmma256,
            DType::F16,
            case(200, 33, 64, 0, 0..0),
            false,
            false,
        ),
        (
            Variant::Wgmma,
            DType::BF16,
            case(65, 130, 320, 8, 0..130),
            true,
            false,
        ),
    ];
    for (variant, dtype, c, bias, accumulate) in shapes {
        let c = Case {
            bias,
            accumulate,
            ..c
        };
        check_case(device, &mut g, dtype, variant, &c, K_MAJOR);
    }
    // MN-major B and B2 (the backward gx = [gy | s·v]·[W0 ; A]: every operand row-major):
    // N past one tile and cut inside the next, a tile wider than N, K not a multiple of 64,
    // extensions of rank 8 and 16 over ranges that start inside a tile.
    let mn_shapes = [
        (
            Variant::Wgmma256,
            DType::BF16,
            case(136, 296, 200, 16, 8..280),
            true,
            true,
        ),
        (
            Variant::Wgmma128,
            DType::F16,
            case(70, 64, 136, 8, 0..64),
            false,
            false,
        ),
        (
            Variant::Wgmma128,
            DType::BF16,
            case(65, 200, 64, 8, 72..200),
            true,
            false,
        ),
    ];
    for (variant, dtype, c, bias, accumulate) in mn_shapes {
        let c = Case {
            bias,
            accumulate,
            ..c
        };
        check_case(device, &mut g, dtype, variant, &c, MN_B);
    }
}
crate::test_device!(wgmma_products, wgmma_products_match_the_reference);

/// Operands the wgmma kernel cannot read are errors when it is forced (never a wrong
/// launch), each naming its reason; the automatic choice sends them to the sm_80 kernel.
fn wgmma_refuses_what_tma_cannot_read(device: &Device) {
    if *device == Device::Cpu || !wgmma_runs_on(device) {
        return;
    }
    let mut g = rng("lora_matmul_wgmma_refusals");
    let mut forced = |c: &Case, l: Layout, dtype: DType| {
        let ops = case_operands(device, &mut g, dtype, c, l);
        case_gemm(&ops, c, Variant::Wgmma)
            .run([c.m, c.n])
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let c = case(16, 24, 32, 8, 0..24);
    for (l, dtype, why) in [
        (
            Layout::transposed(false, false, false, true),
            DType::BF16,
            "B is MN-major but B2 is K-major",
        ),
        (
            Layout::transposed(true, true, false, true),
            DType::F16,
            "A is not contiguous",
        ),
        (
            Layout {
                offset: [0, 0, 3, 0],
                ..K_MAJOR
            },
            DType::BF16,
            "A2 starts 3 elements",
        ),
        (K_MAJOR, DType::F32, "bf16/f16"),
    ] {
        let e = forced(&c, l, dtype);
        assert!(e.contains(why), "{l:?} {dtype}: {e}");
    }
    let e = forced(&case(16, 24, 30, 8, 0..24), K_MAJOR, DType::BF16);
    assert!(e.contains("rows are 30 elements apart"), "{e}");
    let e = forced(&case(16, 24, 32, 4, 0..24), K_MAJOR, DType::BF16);
    assert!(e.contains("A2's rows are 4 elements apart"), "{e}");
}
crate::test_device!(wgmma_refusals, wgmma_refuses_what_tma_cannot_read);

/// Every barrier and wait of the wgmma kernel — the block barrier after the mbarriers'
/// initialisation, the producer's wait for a free stage, the consumers' wait for a full one,
/// their wgmma waits — is load-bearing: with any one deleted (a simulator mutation site),
/// this probe fails. One block of each tile runs more k-tiles than stages, over two tiles.
#[test]
fn every_wgmma_wait_is_load_bearing() {
    let probe = |variant: Variant, dtype: DType, c: Case| {
        move || {
            let mut g = rng("lora_matmul_wgmma_mutants");
            check_case(&Device::Sim, &mut g, dtype, variant, &c, K_MAJOR);
        }
    };
    let probes = [
        probe(
            Variant::Wgmma128,
            DType::BF16,
            Case {
                bias: true,
                ..case(130, 40, 320, 8, 0..40)
            },
        ),
        probe(
            Variant::Wgmma256,
            DType::F16,
            Case {
                accumulate: true,
                ..case(8, 260, 256, 16, 100..260)
            },
        ),
    ];
    let mn_probe = || {
        let mut g = rng("lora_matmul_wgmma_mutants_mn");
        let c = case(70, 136, 320, 8, 0..136);
        check_case(
            &Device::Sim,
            &mut g,
            DType::BF16,
            Variant::Wgmma128,
            &c,
            MN_B,
        );
    };
    let mut probes: Vec<&dyn Fn()> = probes.iter().map(|p| p as &dyn Fn()).collect();
    probes.push(&mn_probe);
    crate::device::sim_mutation::assert_every_hopper_site_is_load_bearing(
        "lora_matmul_wgmma",
        &["lora_matmul_wgmma128", "lora_matmul_wgmma256"],
        &probes,
    );
}

/// The dispatch: the Hopper kernel on a GPU with the sm_90a cubin (compute capability 9.0)
/// for bf16/f16 products it can read, unless switched off (`set_hopper_gemm`,
/// `LORAFUSE_GEMM_HOPPER=0`); the sm_80 kernel on
/// every other GPU, for f32, for the forced sm_80 variants and on the simulator's automatic
/// path; the forced wgmma variants an error where they cannot run.
#[test]
fn wgmma_dispatch_picks_hopper_only_where_it_runs() {
    use wgmma::{Target, choose};
    let hopper = Target::Gpu { sm90a: true };
    let other_gpu = Target::Gpu { sm90a: false };
    for v in [Variant::Auto, Variant::TensorCore] {
        assert!(choose(v, DType::BF16, hopper, None, false).unwrap());
        assert!(choose(v, DType::F16, hopper, None, false).unwrap());
        assert!(!choose(v, DType::F32, hopper, None, false).unwrap());
        assert!(!choose(v, DType::BF16, hopper, Some("B is MN-major"), false).unwrap());
        assert!(
            !choose(v, DType::BF16, hopper, None, true).unwrap(),
            "disabled"
        );
        assert!(!choose(v, DType::BF16, other_gpu, None, false).unwrap());
        assert!(!choose(v, DType::BF16, Target::Simulator, None, false).unwrap());
    }
    for v in [Variant::Simt, Variant::TensorCore128, Variant::TensorCore64] {
        assert!(!choose(v, DType::BF16, hopper, None, false).unwrap());
    }
    for v in [Variant::Wgmma, Variant::Wgmma128, Variant::Wgmma256] {
        assert!(choose(v, DType::BF16, hopper, None, true).unwrap());
        assert!(choose(v, DType::BF16, Target::Simulator, None, false).unwrap());
        assert!(matches!(
            choose(v, DType::BF16, other_gpu, None, false),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            choose(v, DType::BF16, hopper, Some("K = 0"), false),
            Err(Error::Unsupported { .. })
        ));
    }
    // Which device and module source counts as sm_90a is `load_plan`'s (device::cuda tests):
    // the sm_90a cubin is offered on compute capability 9.0 only.
    assert!(!crate::ops::hopper_gemm_available(&Device::Sim).unwrap());
    assert!(!crate::ops::hopper_gemm_available(&Device::Cpu).unwrap());
}

/// The LoRA linear's products on the Hopper kernel: the forward `y = [x | s·u]·[W0 | B]ᵀ`
/// (K-major throughout) and the backward `gx = [gy | s·v]·[W0 ; A]` (W0 and A read MN-major)
/// at ranks that are multiples of 8; not a rank-4 extension (rows of 8 bytes), which keeps the
/// sm_80 kernel.
#[test]
fn wgmma_takes_the_lora_forward_and_leaves_the_rest() {
    let (m, k, n) = (64, 768, 2304);
    let t = |len: usize| Tensor::zeros([len], DType::BF16, &Device::Cpu).unwrap();
    let (x, w0, gy) = (t(m * k), t(n * k), t(m * n));
    for (r, ok) in [(8, true), (16, true), (64, true), (4, false)] {
        let (su, a, b) = (t(m * r), t(r * k), t(n * r));
        let fwd =
            Gemm::new(m, n, k, Operand::rows(&x, k), Operand::transposed(&w0, k)).ext(Extension {
                a2: Operand::rows(&su, r),
                b2: Operand::transposed(&b, r),
                k2: r,
                cols: 0..n,
            });
        assert_eq!(
            wgmma::eligible(&fwd).is_none(),
            ok,
            "rank {r}: {:?}",
            wgmma::eligible(&fwd)
        );
        let gx = Gemm::new(m, k, n, Operand::rows(&gy, n), Operand::rows(&w0, k)).ext(Extension {
            a2: Operand::rows(&su, r),
            b2: Operand::rows(&a, k),
            k2: r,
            cols: 0..k,
        });
        assert!(wgmma::b_mn_major(&gx));
        assert_eq!(
            wgmma::eligible(&gx).is_none(),
            ok,
            "gx, rank {r}: {:?}",
            wgmma::eligible(&gx)
        );
    }
}

/// The tile heuristic of `wgmma::tile_for` at the step's forward shapes on 132 SMs.
#[test]
fn wgmma_tile_heuristic() {
    use wgmma::tile_for;
    assert_eq!(tile_for(8192, 4096, 132), 256, "headline");
    assert_eq!(tile_for(8192, 50304, 132), 256, "lm_head");
    assert_eq!(
        tile_for(8192, 768, 132),
        128,
        "c_proj: 2.9 waves of 128 beat 1.5 of 256"
    );
    assert_eq!(tile_for(8192, 3072, 132), 256, "c_fc");
    assert_eq!(
        tile_for(16, 16, 132),
        128,
        "one tile either way: the narrower wastes less"
    );
}

#[test]
fn wgmma_params_match_the_kernels() {
    assert_eq!(std::mem::size_of::<wgmma::WgmmaParams>(), 640);
    for k in wgmma::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<wgmma::WgmmaParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
    assert_eq!(wgmma::smem_bytes(256), 197_696);
    assert_eq!(wgmma::smem_bytes(128), 132_160);
}
