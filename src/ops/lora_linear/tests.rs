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

use crate::testing::rel_l2_tolerance as tol;

/// One configuration of the op: shape, adapters (rank, scale, output columns), a separate
/// LoRA input (PEFT's dropout path), a bias, a tracked `W0`.
struct Config {
    m: usize,
    k: usize,
    n: usize,
    adapters: Vec<(usize, f64, Range<usize>)>,
    own_input: bool,
    bias: bool,
    train_w0: bool,
}

/// Ranks 1–64 of DESIGN §6, odd shapes (not multiples of the kernels' 64-wide tiles),
/// one full-width adapter (PEFT's `c_attn`), q/v blocks (loralib's `MergedLinear`), a
/// separate LoRA input and a trainable `W0`.
fn configs() -> Vec<Config> {
    let full = |r, n| vec![(r, 2.0, 0..n)];
    vec![
        Config {
            m: 1,
            k: 7,
            n: 9,
            adapters: full(1, 9),
            own_input: false,
            bias: true,
            train_w0: false,
        },
        Config {
            m: 7,
            k: 63,
            n: 66,
            adapters: vec![(2, 0.5, 0..22), (2, 1.5, 44..66)],
            own_input: false,
            bias: false,
            train_w0: false,
        },
        Config {
            m: 65,
            k: 33,
            n: 63,
            adapters: full(4, 63),
            own_input: true,
            bias: true,
            train_w0: false,
        },
        Config {
            m: 63,
            k: 65,
            n: 24,
            adapters: full(8, 24),
            own_input: false,
            bias: true,
            train_w0: true,
        },
        Config {
            m: 17,
            k: 40,
            n: 48,
            adapters: vec![(16, 1.0, 0..16), (16, 1.0, 32..48)],
            own_input: true,
            bias: false,
            train_w0: false,
        },
        Config {
            m: 5,
            k: 70,
            n: 65,
            adapters: full(64, 65),
            own_input: false,
            bias: false,
            train_w0: false,
        },
        Config {
            m: 4,
            k: 16,
            n: 8,
            adapters: vec![],
            own_input: false,
            bias: true,
            train_w0: false,
        },
    ]
}

/// Forward and backward of the op on `device` in f32, bf16 and f16 against the f64 CPU
/// reference from the same (rounded) inputs, every output and gradient compared.
fn forward_and_backward_track_the_f64_reference(device: &Device) {
    let mut g = rng("lora_linear_device");
    for c in configs() {
        let mut host = vec![
            rand_tensor(&mut g, [c.m, c.k], -1.0, 1.0),
            rand_tensor(&mut g, [c.n, c.k], -1.0, 1.0),
            rand_tensor(&mut g, [c.n], -1.0, 1.0),
            rand_tensor(&mut g, [c.m, c.k], -1.0, 1.0),
            rand_tensor(&mut g, [c.m, c.n], -1.0, 1.0),
        ];
        for (r, _, cols) in &c.adapters {
            host.push(rand_tensor(&mut g, [*r, c.k], -1.0, 1.0));
            host.push(rand_tensor(&mut g, [cols.len(), *r], -1.0, 1.0));
        }
        // Runs the op and its backward; returns y and every gradient, as f64.
        let run = |dt: DType, dev: &Device, inputs: &[Tensor]| -> Vec<(String, Vec<f64>)> {
            let t: Vec<Tensor> = inputs
                .iter()
                .map(|t| {
                    Tensor::from_vec_as(t.to_vec_f64().unwrap(), t.shape().clone(), dt, dev)
                        .unwrap()
                })
                .collect();
            let tape = Tape::new();
            let x = t[0].track(&tape);
            let w0 = if c.train_w0 {
                t[1].track(&tape)
            } else {
                t[1].clone()
            };
            let xl = c.own_input.then(|| t[3].track(&tape));
            let ab: Vec<Tensor> = t[5..].iter().map(|t| t.track(&tape)).collect();
            let terms: Vec<LoraTerm<'_>> = c
                .adapters
                .iter()
                .enumerate()
                .map(|(i, (_, s, cols))| LoraTerm {
                    a: &ab[2 * i],
                    b: &ab[2 * i + 1],
                    scale: *s,
                    out_range: cols.clone(),
                })
                .collect();
            let bias = c.bias.then(|| t[2].track(&tape));
            let y = lora_linear(&x, xl.as_ref(), &w0, bias.as_ref(), &terms).unwrap();
            assert_eq!((y.dtype(), y.device()), (dt, *dev));
            let grads = tape.backward_with(&y, t[4].clone()).unwrap();
            let mut out = vec![("y".to_string(), y.to_vec_f64().unwrap())];
            let mut grad = |name: &str, of: &Tensor| {
                let g = grads
                    .get(of)
                    .unwrap_or_else(|| panic!("no gradient for {name}"));
                out.push((format!("g{name}"), g.to_vec_f64().unwrap()));
            };
            grad("x", &x);
            if let Some(xl) = &xl {
                grad("x_lora", xl);
            }
            if c.train_w0 {
                grad("W0", &w0);
            }
            if let Some(b) = &bias {
                grad("bias", b);
            }
            for (i, t) in ab.iter().enumerate() {
                grad(
                    &format!("{}{}", if i % 2 == 0 { "A" } else { "B" }, i / 2),
                    t,
                );
            }
            out
        };
        for dt in [DType::F32, DType::BF16, DType::F16] {
            // The reference sees exactly the inputs the device sees (rounded to dt).
            let rounded: Vec<Tensor> = host
                .iter()
                .map(|t| {
                    let r = Tensor::from_vec_as(
                        t.to_vec_f64().unwrap(),
                        t.shape().clone(),
                        dt,
                        &Device::Cpu,
                    )
                    .unwrap();
                    Tensor::from_vec(r.to_vec_f64().unwrap(), t.shape().clone(), &Device::Cpu)
                        .unwrap()
                })
                .collect();
            let want = run(DType::F64, &Device::Cpu, &rounded);
            let got = run(dt, device, &rounded);
            for ((name, gv), (_, wv)) in got.iter().zip(&want) {
                let ranks: Vec<usize> = c.adapters.iter().map(|a| a.0).collect();
                assert_close(
                    &format!(
                        "{device} {dt} m{} k{} n{} ranks {ranks:?}: {name}",
                        c.m, c.k, c.n
                    ),
                    gv,
                    wv,
                    tol(dt),
                );
            }
        }
    }
}

crate::test_device!(
    forward_and_backward_on_every_backend,
    forward_and_backward_track_the_f64_reference
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
    assert!(
        run(LoraTerm {
            a: &r0a,
            b: &r0b,
            ..ok.clone()
        })
        .is_err()
    );
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
