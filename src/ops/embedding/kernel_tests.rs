//! Kernel-level tests (DESIGN §6) of the token + position embedding on every backend
//! present: the forward and both table gradients through the tape against the CPU engine
//! in the same dtype, bit for bit (the kernels add in the reference's order), over odd
//! shapes (1–130 tokens, 1–768 channels, repeated and unused tokens, positions past
//! `seq`) and the three storage dtypes. Device outputs start as NaN (fresh buffers are
//! poisoned), so an unwritten element (an unused vocabulary row, a position past `seq`)
//! fails.

use super::*;
use crate::DType;
use crate::testing::{rand_tensor, rng};
use rand::Rng;

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// (batch, seq, vocab, positions, channels).
/// C = 8, 64, 768, 1000: 16-byte vectors for every dtype; 772: vectors for f32 only;
/// 1, 3, 7, 31, 33, 257: one channel at a time.
const SHAPES: [(usize, usize, usize, usize, usize); 11] = [
    (1, 1, 1, 1, 1),
    (2, 9, 20, 12, 8),
    (3, 5, 11, 5, 64),
    (1, 6, 9, 7, 7),
    (2, 3, 6, 4, 772),
    (1, 4, 6, 4, 1000),
    (1, 7, 5, 9, 3),
    (5, 13, 50, 16, 31),
    (2, 65, 300, 70, 768),
    (130, 1, 7, 2, 33),
    (1, 130, 1000, 130, 257),
];

/// `t`'s values as a tensor of `dtype` on `device`.
fn on(t: &Tensor, dtype: DType, device: &Device) -> Tensor {
    Tensor::from_vec_as(t.to_vec_f64().unwrap(), t.shape().clone(), dtype, device).unwrap()
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// y and the gradients of the tracked tables.
type Run = (Vec<u64>, Option<Vec<u64>>, Option<Vec<u64>>);

fn run(
    toks: &[u32],
    (b, t): (usize, usize),
    ins: &[Tensor; 3],
    dtype: DType,
    device: &Device,
    track: (bool, bool),
) -> Run {
    let tape = Tape::new();
    let [wte, wpe, seed] = ins.clone().map(|x| on(&x, dtype, device));
    let wte = if track.0 { wte.track(&tape) } else { wte };
    let wpe = if track.1 { wpe.track(&tape) } else { wpe };
    let y = embedding(toks, b, t, &wte, &wpe).unwrap();
    assert_eq!((y.device(), y.dtype()), (*device, dtype));
    let g = tape.backward_with(&y, seed).unwrap();
    let grad = |x: &Tensor| {
        g.get(x).map(|gt| {
            assert_eq!((gt.device(), gt.dtype()), (*device, dtype));
            bits(gt)
        })
    };
    let (ge, gp) = (grad(&wte), grad(&wpe));
    assert_eq!((ge.is_some(), gp.is_some()), track);
    (bits(&y), ge, gp)
}

fn matches_the_cpu_engine_bitwise(device: &Device) {
    let mut r = rng("embedding_kernel");
    for (b, t, v, p, c) in SHAPES {
        // Tokens from the first 2/3 of the vocabulary (repeats, unused rows).
        let used = (2 * v / 3).max(1);
        let toks: Vec<u32> = (0..b * t).map(|_| r.random_range(0..used as u32)).collect();
        let ins = [
            rand_tensor(&mut r, [v, c], -1.0, 1.0),
            rand_tensor(&mut r, [p, c], -1.0, 1.0),
            rand_tensor(&mut r, [b, t, c], -1.0, 1.0),
        ];
        for dt in DTYPES {
            let name = format!("embedding {device} {dt} b{b} t{t} v{v} p{p} c{c}");
            for track in [(true, true), (false, true), (true, false)] {
                let got = run(&toks, (b, t), &ins, dt, device, track);
                let want = run(&toks, (b, t), &ins, dt, &Device::Cpu, track);
                assert!(got.0 == want.0, "{name}: y differs from the CPU");
                assert!(
                    got.1 == want.1,
                    "{name} {track:?}: gwte differs from the CPU"
                );
                assert!(
                    got.2 == want.2,
                    "{name} {track:?}: gwpe differs from the CPU"
                );
            }
        }
    }
}
crate::test_device!(embedding_kernel, matches_the_cpu_engine_bitwise);

/// `embedding_at` (the kernel reading `wpe` from row `pos0` on) equals the CPU bit for bit,
/// `pos0` odd so the table's start is not 16-byte aligned for some dtypes and widths.
fn embedding_at_matches_the_cpu(device: &Device) {
    let mut r = rng("embedding_at_kernel");
    for (b, t, v, p, c, pos0) in [
        (2, 3, 11, 9, 8, 5),
        (1, 1, 7, 20, 7, 19),
        (3, 2, 5, 6, 64, 1),
    ] {
        let toks: Vec<u32> = (0..b * t).map(|_| r.random_range(0..v as u32)).collect();
        let (wte, wpe) = (
            rand_tensor(&mut r, [v, c], -1.0, 1.0),
            rand_tensor(&mut r, [p, c], -1.0, 1.0),
        );
        for dt in DTYPES {
            let name = format!("embedding_at {device} {dt} b{b} t{t} c{c} pos0 {pos0}");
            let y = |d: &Device| {
                let y =
                    embedding_at(&toks, b, t, pos0, &on(&wte, dt, d), &on(&wpe, dt, d)).unwrap();
                assert_eq!((y.device(), y.dtype()), (*d, dt), "{name}");
                bits(&y)
            };
            assert!(y(device) == y(&Device::Cpu), "{name}: differs from the CPU");
        }
    }
}
crate::test_device!(embedding_at_kernel, embedding_at_matches_the_cpu);

/// Out-of-range tokens are an error before anything reaches the device.
fn rejects_bad_tokens(device: &Device) {
    let wte = Tensor::zeros([10, 4], DType::F32, device).unwrap();
    let wpe = Tensor::zeros([6, 4], DType::F32, device).unwrap();
    match embedding(&[1, 2, 10, 4, 5, 6], 2, 3, &wte, &wpe) {
        Err(Error::InvalidArgument(msg)) => {
            assert!(msg.contains("token 10 at position 2"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        embedding(&[1, u32::MAX], 1, 2, &wte, &wpe),
        Err(Error::InvalidArgument(_))
    ));
    assert!(embedding(&[1, 2, 9, 4, 5, 0], 2, 3, &wte, &wpe).is_ok());
}
crate::test_device!(embedding_kernel_bad_tokens, rejects_bad_tokens);

#[test]
fn params_match_the_kernels() {
    for k in cuda::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::EmbeddingParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}
