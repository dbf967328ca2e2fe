//! Kernel-level tests (DESIGN §6) of cached attention on every backend present: one call
//! with `N` new positions against caches holding `L` positions, `y` against the f64 CPU
//! reference on the same rounded inputs and the caches bit for bit, over odd `L` (0, 5, 37,
//! 130, 140, up to 1023 = GPT-2's last position), `N` = 1, 3, 4, 40, 130, head dims 1, 3, 5, 64 and
//! 128, one split and several (an empty one included), and the three storage dtypes. The
//! cache rows past `L` start as NaN (the device's fresh buffers are poisoned, and the tests
//! write NaN there), as does `y` on a device: a kernel that read an unwritten row, or left an
//! output element unwritten, fails. Two runs agree bit for bit.

use super::*;
use crate::testing::{assert_close, rand_tensor, rel_l2_tolerance as tol, rng};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// (B, C, H, L, N).
const SHAPES: [(usize, usize, usize, usize, usize); 8] = [
    (1, 6, 2, 0, 1),      // the first token, hd 3
    (2, 15, 3, 37, 1),    // hd 5, odd L, one split
    (2, 15, 3, 5, 4),     // several new rows, causal among them
    (1, 128, 2, 130, 1),  // hd 64, 2 splits of 80 keys
    (1, 128, 1, 140, 3),  // hd 128, 2 splits
    (1, 4, 1, 10, 130),   // 2 splits, the second empty for the first rows
    (1, 7, 7, 0, 40),     // hd 1, a prefill
    (1, 128, 2, 1023, 1), // GPT-2's last position: 16 splits of 64 keys
];

/// A cache `[b, h, max_len, hd]` holding the keys (`which` = 1) or values (2) of `hist`
/// `[b, l, 3c]` in rows `0..l`, NaN after, as `dtype` on `device`.
fn cache(
    hist: &[f64],
    (b, c, h, l, max_len): (usize, usize, usize, usize, usize),
    which: usize,
    dtype: DType,
    device: &Device,
) -> Tensor {
    let hd = c / h;
    let mut v = vec![f64::NAN; b * h * max_len * hd];
    for bi in 0..b {
        for hi in 0..h {
            for t in 0..l {
                for e in 0..hd {
                    v[((bi * h + hi) * max_len + t) * hd + e] =
                        hist[(bi * l + t) * 3 * c + which * c + hi * hd + e];
                }
            }
        }
    }
    Tensor::from_vec_as(v, [b, h, max_len, hd], dtype, device).unwrap()
}

/// `t`'s values as a tensor of `dtype` on `device`.
fn on(t: &Tensor, dtype: DType, device: &Device) -> Tensor {
    Tensor::from_vec_as(t.to_vec_f64().unwrap(), t.shape().clone(), dtype, device).unwrap()
}

/// The bit patterns of a tensor's values (widened exactly to f64; every NaN alike).
fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec_f64()
        .unwrap()
        .iter()
        .map(|v| if v.is_nan() { u64::MAX } else { v.to_bits() })
        .collect()
}

/// One call on `device`: `(y, k_cache, v_cache)` after it.
fn run(
    hist: &Tensor,
    new: &Tensor,
    s: (usize, usize, usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> (Tensor, Tensor, Tensor) {
    let (b, c, h, l, _) = s;
    let hist = on(hist, dtype, &Device::Cpu).to_vec_f64().unwrap();
    let (kc, vc) = (
        cache(&hist, s, 1, dtype, device),
        cache(&hist, s, 2, dtype, device),
    );
    let y = decode_attention(&on(new, dtype, device), &kc, &vc, l, h).unwrap();
    assert_eq!(y.dims(), &[b, new.dims()[1], c]);
    assert_eq!((y.dtype(), y.device()), (dtype, *device));
    (y, kc, vc)
}

fn decode_matches_the_reference(device: &Device) {
    let mut r = rng("decode_attention_kernel");
    for (b, c, h, l, n) in SHAPES {
        let s = (b, c, h, l, l + n + 1);
        let hist = rand_tensor(&mut r, [b, l, 3 * c], -2.0, 2.0);
        let new = rand_tensor(&mut r, [b, n, 3 * c], -2.0, 2.0);
        let (splits, _) = cuda::splits(Dims {
            b,
            n,
            c,
            h,
            pos: l,
            max_len: l + n + 1,
        });
        for dtype in DTYPES {
            let name = format!("{device} {dtype} B{b} C{c} H{h} L{l} N{n} ({splits} splits)");
            let (y, kc, vc) = run(&hist, &new, s, dtype, device);
            // The reference: the CPU in f64 on the same rounded inputs.
            let rounded = |t: &Tensor| on(t, dtype, &Device::Cpu);
            let (y64, kc64, vc64) =
                run(&rounded(&hist), &rounded(&new), s, DType::F64, &Device::Cpu);
            assert_close(
                &format!("{name}: y"),
                &y.to_vec_f64().unwrap(),
                &y64.to_vec_f64().unwrap(),
                tol(dtype),
            );
            // The caches: the new rows appended exactly, every other row as it was (NaN past
            // the end stays NaN).
            assert_eq!(bits(&kc), bits(&kc64), "{name}: key cache");
            assert_eq!(bits(&vc), bits(&vc64), "{name}: value cache");
            if crate::testing::rerun_can_differ(device) {
                let (y2, kc2, _) = run(&hist, &new, s, dtype, device);
                assert_eq!(bits(&y), bits(&y2), "{name}: y differs between runs");
                assert_eq!(
                    bits(&kc),
                    bits(&kc2),
                    "{name}: the cache differs between runs"
                );
            }
        }
    }
}
crate::test_device!(matches_reference, decode_matches_the_reference);

/// A head dim above the kernel's 128 is an error on a device (never a launch); the CPU
/// takes any.
fn decode_rejects_wide_heads_on_a_device(device: &Device) {
    let (b, c, h, l) = (1, 129, 1, 2);
    let kc = kv_cache_tensor(b, h, l + 1, c, DType::F32, device).unwrap();
    let vc = kv_cache_tensor(b, h, l + 1, c, DType::F32, device).unwrap();
    let qkv = Tensor::zeros([b, 1, 3 * c], DType::F32, device).unwrap();
    let got = decode_attention(&qkv, &kc, &vc, l, h);
    if *device == Device::Cpu {
        assert!(got.is_ok());
    } else {
        match got {
            Err(Error::Unsupported { msg, .. }) => assert!(msg.contains("head dim 129"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}
crate::test_device!(wide_heads, decode_rejects_wide_heads_on_a_device);

#[test]
fn splits_cover_the_keys_with_whole_tiles() {
    let d = |b, h, n, pos| Dims {
        b,
        n,
        c: 64 * h,
        h,
        pos,
        max_len: pos + n,
    };
    // GPT-2 124M decode at the last position: 16 splits of 64 keys.
    assert_eq!(cuda::splits(d(1, 12, 1, 1023)), (16, 64));
    // Enough rows already: one split.
    assert_eq!(cuda::splits(d(8, 12, 4, 1000)).0, 1);
    assert_eq!(cuda::splits(d(1, 1, 1, 0)), (1, 16));
    assert_eq!(cuda::splits(d(1, 2, 1, 130)), (2, 80));
    assert_eq!(cuda::splits(d(1, 1, 130, 10)), (2, 80));
    for (b, h, n, pos) in [
        (1, 2, 1, 130),
        (1, 1, 3, 140),
        (1, 1, 130, 10),
        (3, 5, 7, 999),
        (1, 1, 1, 63),
    ] {
        let (s, chunk) = cuda::splits(d(b, h, n, pos));
        let keys = pos + n;
        assert!(chunk % 16 == 0 && chunk >= 16);
        assert!(
            s * chunk >= keys && (s - 1) * chunk < keys,
            "{s} × {chunk} for {keys}"
        );
        assert!(s == 1 || chunk >= 64, "splits of fewer than 64 keys");
    }
}

#[test]
fn params_match_the_kernels() {
    for k in cuda::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::DecodeAttentionParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}
