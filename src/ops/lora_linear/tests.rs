use super::*;
use crate::ops::{dropout, linear, profile};
use crate::testing::{assert_close, check_grads, rand_tensor, rng};
use crate::{DType, Device};

/// `W0 + Σ s·B·A` placed on each term's rows, computed naively in f64.
fn merged(w0: &Tensor, terms: &[(Tensor, Tensor, f64, Range<usize>)]) -> Tensor {
    let (n, k) = w0.shape().dims2("t").unwrap();
    let mut w = w0.to_vec_f64().unwrap();
    for (a, b, s, cols) in terms {
        let (av, bv) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
        let r = a.dims()[0];
        for (bi, row) in cols.clone().enumerate() {
            for j in 0..k {
                w[row * k + j] += s * (0..r).map(|p| bv[bi * r + p] * av[p * k + j]).sum::<f64>();
            }
        }
    }
    Tensor::from_vec(w, [n, k], &Device::Cpu).unwrap()
}

#[test]
fn forward_equals_the_merged_weight_for_full_and_qv_blocks() {
    let mut g = rng("lora_linear_merged");
    for &(m, k, c, r) in &[(7, 9, 4, 1), (13, 65, 8, 3), (1, 16, 5, 16)] {
        let n = 3 * c;
        let x = rand_tensor(&mut g, [m, k], -1.0, 1.0);
        let w0 = rand_tensor(&mut g, [n, k], -1.0, 1.0);
        let bias = rand_tensor(&mut g, [n], -1.0, 1.0);
        // full width
        let (a, b) = (
            rand_tensor(&mut g, [r, k], -1.0, 1.0),
            rand_tensor(&mut g, [n, r], -1.0, 1.0),
        );
        let y = lora_linear(
            &x,
            None,
            &w0,
            Some(&bias),
            &[LoraTerm {
                a: &a,
                b: &b,
                scale: 0.7,
                out_range: 0..n,
            }],
        )
        .unwrap();
        let want = linear(
            &x,
            &merged(&w0, &[(a.clone(), b.clone(), 0.7, 0..n)]),
            Some(&bias),
        )
        .unwrap();
        assert_close(
            "full",
            &y.to_vec_f64().unwrap(),
            &want.to_vec_f64().unwrap(),
            1e-13,
        );
        // q and v blocks only (loralib's MergedLinear with enable_lora = [q, v])
        let (aq, bq) = (
            rand_tensor(&mut g, [r, k], -1.0, 1.0),
            rand_tensor(&mut g, [c, r], -1.0, 1.0),
        );
        let (av, bv) = (
            rand_tensor(&mut g, [r, k], -1.0, 1.0),
            rand_tensor(&mut g, [c, r], -1.0, 1.0),
        );
        let terms = [
            LoraTerm {
                a: &aq,
                b: &bq,
                scale: 2.0,
                out_range: 0..c,
            },
            LoraTerm {
                a: &av,
                b: &bv,
                scale: 2.0,
                out_range: 2 * c..3 * c,
            },
        ];
        let y = lora_linear(&x, None, &w0, None, &terms).unwrap();
        let wm = merged(
            &w0,
            &[
                (aq.clone(), bq.clone(), 2.0, 0..c),
                (av.clone(), bv.clone(), 2.0, 2 * c..3 * c),
            ],
        );
        let want = linear(&x, &wm, None).unwrap();
        assert_close(
            "qv",
            &y.to_vec_f64().unwrap(),
            &want.to_vec_f64().unwrap(),
            1e-13,
        );
        // the k block is exactly the base product
        let base = linear(&x, &w0, None).unwrap().to_vec_f64().unwrap();
        let yv = y.to_vec_f64().unwrap();
        for i in 0..m {
            for j in c..2 * c {
                assert_eq!(yv[i * n + j], base[i * n + j]);
            }
        }
    }
}

#[test]
fn backward_matches_finite_differences_for_every_input() {
    let mut g = rng("lora_linear_fd");
    let (m, k, c, r) = (5, 6, 3, 2);
    let n = 3 * c;
    let ins = vec![
        rand_tensor(&mut g, [m, k], -1.0, 1.0),
        rand_tensor(&mut g, [n, k], -1.0, 1.0),
        rand_tensor(&mut g, [n], -1.0, 1.0),
        rand_tensor(&mut g, [r, k], -1.0, 1.0),
        rand_tensor(&mut g, [n, r], -1.0, 1.0),
        rand_tensor(&mut g, [r, k], -1.0, 1.0),
        rand_tensor(&mut g, [c, r], -1.0, 1.0),
    ];
    check_grads(
        "lora_linear (full + v block, shared input)",
        &ins,
        |t| {
            let terms = [
                LoraTerm {
                    a: &t[3],
                    b: &t[4],
                    scale: 1.5,
                    out_range: 0..n,
                },
                LoraTerm {
                    a: &t[5],
                    b: &t[6],
                    scale: 0.5,
                    out_range: 2 * c..n,
                },
            ];
            lora_linear(&t[0], None, &t[1], Some(&t[2]), &terms)
        },
        1e-7,
    );
    // LoRA input through dropout: gradients reach x by both paths.
    check_grads(
        "lora_linear (dropout on the LoRA path)",
        &[ins[0].clone(), ins[3].clone(), ins[4].clone()],
        |t| {
            let xd = dropout(&t[0], 0.3, 42)?;
            let term = [LoraTerm {
                a: &t[1],
                b: &t[2],
                scale: 2.0,
                out_range: 0..n,
            }];
            lora_linear(&t[0], Some(&xd), &ins[1], None, &term)
        },
        1e-7,
    );
}

#[test]
fn a_frozen_base_weight_costs_no_weight_gradient_gemm() {
    let d = Device::Cpu;
    let mut g = rng("lora_linear_frozen");
    let (m, k, n, r) = (64, 48, 32, 4);
    let x = rand_tensor(&mut g, [m, k], -1.0, 1.0);
    let w0 = rand_tensor(&mut g, [n, k], -1.0, 1.0);
    let a0 = rand_tensor(&mut g, [r, k], -1.0, 1.0);
    let b0 = Tensor::zeros([n, r], DType::F64, &d).unwrap();

    // Full fine-tuning: W0 trains.
    profile::reset();
    let tape = Tape::new();
    let (xt, wt) = (x.track(&tape), w0.track(&tape));
    let y = linear(&xt, &wt, None).unwrap();
    let full = tape
        .backward_with(&y, Tensor::ones_like(&y).unwrap())
        .unwrap();
    let full_counts = profile::counts();
    assert!(full.get(&w0).is_some());

    // LoRA: W0 frozen, A and B train.
    profile::reset();
    let tape = Tape::new();
    let (xt, at, bt) = (x.track(&tape), a0.track(&tape), b0.track(&tape));
    let y = lora_linear(
        &xt,
        None,
        &w0,
        None,
        &[LoraTerm {
            a: &at,
            b: &bt,
            scale: 2.0,
            out_range: 0..n,
        }],
    )
    .unwrap();
    let lora = tape
        .backward_with(&y, Tensor::ones_like(&y).unwrap())
        .unwrap();
    let lora_counts = profile::counts();
    assert!(lora.get(&w0).is_none(), "a frozen W0 must get no gradient");
    assert!(lora.get(&a0).is_some() && lora.get(&b0).is_some());

    // Full: 3 products of m·n·k. LoRA: 2 of them plus rank-r products.
    let big = 2 * (m * n * k) as u64;
    assert_eq!(full_counts.gemm_flops, 3 * big);
    let lora_small =
        2 * (m * r * k + m * n * r + m * r * n + m * k * r + n * r * m + r * k * m) as u64;
    assert_eq!(lora_counts.gemm_flops, 2 * big + lora_small);
    println!("full: {full_counts:?}, lora: {lora_counts:?}");
}

/// f32, bf16 and f16 on `device` against the f64 CPU reference (DESIGN §6 tolerances).
fn dtypes_track_the_f64_reference(device: &Device) {
    if *device != Device::Cpu {
        // The fused LoRA kernels arrive with issue 4; until then this op refuses device tensors.
        let x = Tensor::zeros([2, 3], DType::F32, device).unwrap();
        let w = Tensor::zeros([4, 3], DType::F32, device).unwrap();
        let e = lora_linear(&x, None, &w, None, &[]).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        println!("lora_linear on {device}: skipped (no kernel yet: {e})");
        return;
    }
    let mut g = rng("lora_linear_dtypes");
    let (m, k, n, r) = (33, 40, 24, 8);
    let ts: Vec<Tensor> = vec![
        rand_tensor(&mut g, [m, k], -1.0, 1.0),
        rand_tensor(&mut g, [n, k], -1.0, 1.0),
        rand_tensor(&mut g, [r, k], -1.0, 1.0),
        rand_tensor(&mut g, [n, r], -1.0, 1.0),
    ];
    let run = |dt: DType, dev: &Device| {
        let t: Vec<Tensor> = ts
            .iter()
            .map(|t| {
                Tensor::from_vec_as(t.to_vec_f64().unwrap(), t.shape().clone(), dt, dev).unwrap()
            })
            .collect();
        let term = LoraTerm {
            a: &t[2],
            b: &t[3],
            scale: 0.5,
            out_range: 0..n,
        };
        let y = lora_linear(&t[0], None, &t[1], None, &[term]).unwrap();
        assert_eq!((y.dtype(), y.device()), (dt, *dev));
        y.to_vec_f64().unwrap()
    };
    let want = run(DType::F64, &Device::Cpu);
    assert_close("f32", &run(DType::F32, device), &want, 1e-6);
    assert_close("bf16", &run(DType::BF16, device), &want, 1e-2);
    assert_close("f16", &run(DType::F16, device), &want, 2e-3);
}

crate::test_device!(
    low_precision_dtypes_track_the_f64_result,
    dtypes_track_the_f64_reference
);

#[test]
fn bad_adapters_are_errors() {
    let d = Device::Cpu;
    let z = |s: &[usize]| Tensor::zeros(s.to_vec(), DType::F32, &d).unwrap();
    let (x, w) = (z(&[4, 8]), z(&[6, 8]));
    let (a, b) = (z(&[2, 8]), z(&[6, 2]));
    let ok = LoraTerm {
        a: &a,
        b: &b,
        scale: 1.0,
        out_range: 0..6,
    };
    assert!(lora_linear(&x, None, &w, None, std::slice::from_ref(&ok)).is_ok());
    let run = |t: LoraTerm<'_>| lora_linear(&x, None, &w, None, &[t]);
    let bad_a = z(&[2, 7]);
    assert!(matches!(
        run(LoraTerm {
            a: &bad_a,
            ..ok.clone()
        }),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        run(LoraTerm {
            out_range: 1..7,
            ..ok.clone()
        }),
        Err(Error::Shape { .. })
    ));
    let (r0a, r0b) = (z(&[0, 8]), z(&[6, 0]));
    assert!(run(LoraTerm {
        a: &r0a,
        b: &r0b,
        ..ok.clone()
    })
    .is_err());
    assert!(matches!(
        run(LoraTerm {
            scale: f64::NAN,
            ..ok.clone()
        }),
        Err(Error::InvalidArgument(_))
    ));
    let bf = Tensor::zeros([6, 2], DType::BF16, &d).unwrap();
    assert!(matches!(
        run(LoraTerm { b: &bf, ..ok }),
        Err(Error::DType { .. })
    ));
}
