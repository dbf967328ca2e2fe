//! A LoRA training step's linear layers and optimizer on every backend present: two LoRA
//! linears around a GELU (bf16, r = 8 on the first, q/v-style blocks on the second), the
//! backward through the tape with `W0` frozen, and AdamW on the adapters — on the simulator
//! (and a GPU when present) every product runs on `kernels/lora_matmul.cu`, the GELU on
//! `kernels/elementwise.cu` and the update on `kernels/adamw.cu`. After three steps the
//! adapters must match the same steps on the CPU within the bf16 tolerance of DESIGN §6.

use lorafuse::ops::{LoraTerm, gelu, lora_linear};
use lorafuse::optim::{AdamW, AdamWConfig, StepOptions};
use lorafuse::testing::{assert_close, rand_tensor, rng};
use lorafuse::{DType, Device, Tape, Tensor};

const STEPS: usize = 3;

/// Runs the steps on `device` from the given f64 values; returns the adapters' gradients
/// of the first step and the adapters after the last.
fn train(device: &Device, init: &[Tensor]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let on = |t: &Tensor| {
        Tensor::from_vec_as(
            t.to_vec_f64().unwrap(),
            t.shape().clone(),
            DType::BF16,
            device,
        )
        .unwrap()
    };
    let t: Vec<Tensor> = init.iter().map(on).collect();
    let (x, w1, w2, gy) = (&t[0], &t[1], &t[2], &t[3]);
    let adapters: Vec<Tensor> = t[4..].to_vec();
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = AdamW::new(adapters.clone(), cfg).unwrap();
    let mut first_grads = Vec::new();
    for step in 0..STEPS {
        let tape = Tape::new();
        let p: Vec<Tensor> = adapters.iter().map(|a| a.track(&tape)).collect();
        let h = lora_linear(
            x,
            None,
            w1,
            None,
            &[LoraTerm {
                a: &p[0],
                b: &p[1],
                scale: 2.0,
                out_range: 0..w1.dims()[0],
            }],
        )
        .unwrap();
        let h = gelu(&h).unwrap();
        let n2 = w2.dims()[0];
        let y = lora_linear(
            &h,
            None,
            w2,
            None,
            &[
                LoraTerm {
                    a: &p[2],
                    b: &p[3],
                    scale: 1.0,
                    out_range: 0..n2 / 3,
                },
                LoraTerm {
                    a: &p[4],
                    b: &p[5],
                    scale: 1.0,
                    out_range: 2 * n2 / 3..n2,
                },
            ],
        )
        .unwrap();
        assert_eq!(y.device(), *device);
        let grads = tape.backward_with(&y, gy.clone()).unwrap();
        assert!(
            grads.get(w1).is_none() && grads.get(w2).is_none(),
            "W0 is frozen"
        );
        if step == 0 {
            first_grads = p
                .iter()
                .map(|a| grads.get(a).unwrap().to_vec_f64().unwrap())
                .collect();
        }
        let report = opt.step(&grads, 1e-3, StepOptions::default()).unwrap();
        assert!(!report.skipped);
    }
    assert_eq!(opt.step_count(), STEPS as u64);
    let params = adapters.iter().map(|a| a.to_vec_f64().unwrap()).collect();
    (first_grads, params)
}

fn adapters_follow_the_cpu(device: &Device) {
    let mut g = rng("lora_step_device");
    let (m, k, hidden, n, r) = (37, 48, 72, 63, 8);
    let init = vec![
        rand_tensor(&mut g, [m, k], -1.0, 1.0),
        rand_tensor(&mut g, [hidden, k], -0.2, 0.2),
        rand_tensor(&mut g, [n, hidden], -0.2, 0.2),
        rand_tensor(&mut g, [m, n], -1.0, 1.0),
        rand_tensor(&mut g, [r, k], -0.2, 0.2),
        rand_tensor(&mut g, [hidden, r], -0.2, 0.2),
        rand_tensor(&mut g, [4, hidden], -0.2, 0.2),
        rand_tensor(&mut g, [n / 3, 4], -0.2, 0.2),
        rand_tensor(&mut g, [4, hidden], -0.2, 0.2),
        rand_tensor(&mut g, [n - 2 * n / 3, 4], -0.2, 0.2),
    ];
    let (want_grads, want) = train(&Device::Cpu, &init);
    let (got_grads, got) = train(device, &init);
    for (i, (gv, wv)) in got_grads.iter().zip(&want_grads).enumerate() {
        assert_close(&format!("{device} adapter {i}: gradient"), gv, wv, 1e-2);
    }
    // Adam's first steps move each weight by about ±lr whatever the gradient's size, so a
    // near-zero gradient whose sign differs by rounding moves its weight the other way:
    // compare the weights, not the updates.
    for (i, (gv, wv)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("{device} adapter {i}"), gv, wv, 2e-2);
    }
}

lorafuse::test_device!(lora_step, adapters_follow_the_cpu);
