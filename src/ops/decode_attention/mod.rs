//! Cached causal attention for incremental decoding (inference only): the new positions'
//! queries against a key/value cache, which the op extends by their keys and values.
//!
//! A decoder keeps, per layer, `K` and `V` caches `[B, H, Lmax, hd]` ([`kv_cache_tensor`]);
//! for each call with `N` new positions per sequence (the prompt, then one token at a time)
//! [`decode_attention`] writes their keys and values at rows `L..L + N` and attends, so a
//! step costs one pass over the cache instead of a forward over the whole prefix. On a
//! device it is one launch (`kernels/decode_attention.cu`; two when the keys are split over
//! blocks), on the CPU two GEMMs per (batch, head) pair (`cpu.rs`).

pub(crate) mod cpu;
pub(crate) mod cuda;
#[cfg(test)]
mod kernel_tests;

use super::output;
use crate::storage::{CpuStorage, DeviceStorage, Storage};
use crate::tensor::{same_device, same_dtype};
use crate::{DType, Device, Element, Error, Real, Result, Shape, Tensor};
use cpu::Dims;
use half::{bf16, f16};

const OP: &str = "decode_attention";

/// A key or value cache `[batch, n_head, max_len, head_dim]` of `dtype` on `device`, for
/// [`decode_attention`]. Its rows are unwritten until the op appends to them: NaN on the
/// CPU, uninitialised on a GPU (NaN-poisoned on the simulator and in debug builds), so a
/// kernel that read a row past the cache's length would show it.
///
/// Errors: f64 on a kernel device, an unavailable device, or a size that overflows.
pub fn kv_cache_tensor(
    batch: usize,
    n_head: usize,
    max_len: usize,
    head_dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = Shape::from([batch, n_head, max_len, head_dim]);
    let n = [batch, n_head, max_len, head_dim]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(format!("{OP}: a cache of {shape} overflows")))?;
    let storage = match device {
        Device::Cpu => {
            let mut c = CpuStorage::zeros(dtype, n);
            match &mut c {
                CpuStorage::F32(v) => v.fill(f32::NAN),
                CpuStorage::F64(v) => v.fill(f64::NAN),
                CpuStorage::BF16(v) => v.fill(bf16::NAN),
                CpuStorage::F16(v) => v.fill(f16::NAN),
            }
            Storage::Cpu(c)
        }
        d => Storage::Device(DeviceStorage::alloc(dtype, n, *d)?),
    };
    Tensor::from_storage(storage, shape)
}

/// Cached causal attention: `qkv [B, N, 3C]` holds the fused queries, keys and values of `N`
/// new positions per sequence (GPT-2's `c_attn` layout, as for
/// [`causal_attention`](crate::ops::causal_attention)), at absolute positions `pos..pos + N`;
/// `k_cache` and `v_cache` `[B, H, Lmax, hd]` (`hd = C / H`) hold the keys and values of
/// positions `0..pos`. The op writes the new keys and values into rows `pos..pos + N` of the
/// caches (in place: every handle of a cache sees them) and returns `y [B, N, C]`, row `i`
/// attending to the keys `0..=pos + i`: the rows `pos..pos + N` of what `causal_attention`
/// gives on the whole sequence. Computed in f32 (f64 for f64), softmax with max-subtraction
/// (on a device an online softmax over key tiles and splits), `y` rounded once.
///
/// Inference only: it records no backward. The cache rows past `pos + N` are never read.
///
/// Errors: `qkv` not `[B, N, 3C]` with `C > 0` divisible by `n_head > 0`; caches not both
/// `[B, n_head, Lmax, hd]`; `pos + N > Lmax` (shape); mixed dtypes or devices; a cache
/// sharing storage with the other cache or with `qkv`, or an input recorded on a tape
/// (invalid argument); on a device a head dim above 128 ([`Error::Unsupported`]).
pub fn decode_attention(
    qkv: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    pos: usize,
    n_head: usize,
) -> Result<Tensor> {
    let (b, n, c3) = qkv.shape().dims3(OP)?;
    if c3 % 3 != 0 || c3 == 0 {
        return Err(Error::shape(
            OP,
            format!("qkv {} needs a last dimension 3·C with C > 0", qkv.shape()),
        ));
    }
    let c = c3 / 3;
    if n_head == 0 || c % n_head != 0 {
        return Err(Error::shape(
            OP,
            format!("C = {c} is not divisible into {n_head} heads"),
        ));
    }
    let hd = c / n_head;
    let cache_dims = k_cache.dims();
    if cache_dims.len() != 4
        || v_cache.dims() != cache_dims
        || cache_dims[0] != b
        || cache_dims[1] != n_head
        || cache_dims[3] != hd
    {
        return Err(Error::shape(
            OP,
            format!(
                "caches {} and {} for qkv {} with {n_head} heads: expected [{b}, {n_head}, Lmax, {hd}] both",
                k_cache.shape(),
                v_cache.shape(),
                qkv.shape()
            ),
        ));
    }
    let max_len = cache_dims[2];
    if pos.checked_add(n).is_none_or(|end| end > max_len) {
        return Err(Error::shape(
            OP,
            format!("{n} new positions at {pos} overflow a cache of {max_len}"),
        ));
    }
    let dtype = same_dtype(OP, &[qkv, k_cache, v_cache])?;
    let device = same_device(OP, &[qkv, k_cache, v_cache])?;
    if k_cache.same_storage(v_cache) || qkv.same_storage(k_cache) || qkv.same_storage(v_cache) {
        return Err(Error::invalid(format!(
            "{OP}: the key cache, the value cache and qkv must be three separate buffers"
        )));
    }
    if [qkv, k_cache, v_cache].iter().any(|t| t.requires_grad()) {
        return Err(Error::invalid(format!(
            "{OP}: inference only (it records no backward); pass untracked tensors"
        )));
    }
    let d = Dims {
        b,
        n,
        c,
        h: n_head,
        pos,
        max_len,
    };
    if device != Device::Cpu {
        return cuda::forward(qkv, k_cache, v_cache, d);
    }
    fn go<S: Element, T: Real>(
        qkv: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        d: Dims,
    ) -> Result<Tensor> {
        let q = qkv.cpu_read::<T>(OP)?;
        let (mut ks, mut vs) = (k_cache.storage_mut(), v_cache.storage_mut());
        let bad = || Error::invalid(format!("{OP}: a cache's storage is not {}", S::DTYPE));
        let kc = ks.cpu_mut(OP)?.as_mut_slice::<S>().ok_or_else(bad)?;
        let vc = vs.cpu_mut(OP)?.as_mut_slice::<S>().ok_or_else(bad)?;
        let y = cpu::forward::<S, T>(&q, kc, vc, d)?;
        output(y, [d.b, d.n, d.c], qkv.dtype())
    }
    match dtype {
        DType::F32 => go::<f32, f32>(qkv, k_cache, v_cache, d),
        DType::BF16 => go::<bf16, f32>(qkv, k_cache, v_cache, d),
        DType::F16 => go::<f16, f32>(qkv, k_cache, v_cache, d),
        DType::F64 => go::<f64, f64>(qkv, k_cache, v_cache, d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tape;
    use crate::ops::causal_attention;
    use crate::testing::{assert_close, rand_tensor, rng};

    /// Independent reference: plain f64 loops over the whole sequence `k`, `v` (each
    /// `[B, T, C]`) and the queries of the last `n` positions.
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        (b, t, n, c, h): (usize, usize, usize, usize, usize),
    ) -> Vec<f64> {
        let hd = c / h;
        let mut y = vec![0.0; b * n * c];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..n {
                    let p = t - n + i;
                    let qi = |e: usize| q[(bi * n + i) * c + hi * hd + e];
                    let at = |x: &[f64], j: usize, e: usize| x[(bi * t + j) * c + hi * hd + e];
                    let s: Vec<f64> = (0..=p)
                        .map(|j| {
                            (0..hd).map(|e| qi(e) * at(k, j, e)).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = w.iter().sum();
                    for e in 0..hd {
                        y[(bi * n + i) * c + hi * hd + e] =
                            (0..=p).map(|j| w[j] / z * at(v, j, e)).sum();
                    }
                }
            }
        }
        y
    }

    /// Columns `which·C..(which+1)·C` of `qkv [B, T, 3C]`, rows `t0..t1`, as `[B, t1 − t0, C]`.
    fn part(
        qkv: &[f64],
        (b, t, c): (usize, usize, usize),
        which: usize,
        t0: usize,
        t1: usize,
    ) -> Vec<f64> {
        let mut out = Vec::new();
        for bi in 0..b {
            for ti in t0..t1 {
                let row = (bi * t + ti) * 3 * c + which * c;
                out.extend_from_slice(&qkv[row..row + c]);
            }
        }
        out
    }

    /// Rows `t0..t1` of `x [B, T, W]` as `[B, t1 − t0, W]`.
    fn rows(x: &[f64], (b, t, w): (usize, usize, usize), t0: usize, t1: usize) -> Vec<f64> {
        (0..b)
            .flat_map(|bi| x[(bi * t + t0) * w..(bi * t + t1) * w].to_vec())
            .collect()
    }

    /// A whole sequence fed in chunks: (B, C, H, chunk lengths).
    const CASES: [(usize, usize, usize, &[usize]); 5] = [
        (2, 12, 3, &[5, 1, 1, 3]),
        (1, 8, 2, &[1, 1, 1]),
        (2, 15, 3, &[7, 1, 33, 1]),
        (1, 64, 1, &[40, 1]),
        (3, 4, 4, &[2, 2, 1]),
    ];

    #[test]
    fn chunked_decoding_matches_naive_loops_and_causal_attention() {
        let mut r = rng("decode_attention_naive");
        for (b, c, h, chunks) in CASES {
            let t: usize = chunks.iter().sum();
            let hd = c / h;
            let x = rand_tensor(&mut r, [b, t, 3 * c], -2.0, 2.0);
            let xv = x.to_vec_f64().unwrap();
            let full = causal_attention(&x, h).unwrap().to_vec_f64().unwrap();
            let (k, v) = (part(&xv, (b, t, c), 1, 0, t), part(&xv, (b, t, c), 2, 0, t));
            let kc = kv_cache_tensor(b, h, t + 2, hd, DType::F64, &Device::Cpu).unwrap();
            let vc = kv_cache_tensor(b, h, t + 2, hd, DType::F64, &Device::Cpu).unwrap();
            let mut pos = 0;
            for &n in chunks {
                let name = format!("B{b} C{c} H{h} pos {pos} n {n}");
                let new = rows(&xv, (b, t, 3 * c), pos, pos + n);
                let qkv = Tensor::from_vec(new, [b, n, 3 * c], &Device::Cpu).unwrap();
                let y = decode_attention(&qkv, &kc, &vc, pos, h).unwrap();
                assert_eq!(y.dims(), &[b, n, c], "{name}");
                let yv = y.to_vec_f64().unwrap();
                let q = part(&xv, (b, t, c), 0, pos, pos + n);
                let want = naive(
                    &q,
                    &rows(&k, (b, t, c), 0, pos + n),
                    &rows(&v, (b, t, c), 0, pos + n),
                    (b, pos + n, n, c, h),
                );
                assert_close(&format!("{name}: vs naive"), &yv, &want, 1e-13);
                let want = rows(&full, (b, t, c), pos, pos + n);
                assert_close(&format!("{name}: vs causal_attention"), &yv, &want, 1e-13);
                pos += n;
            }
            // The caches hold every key and value, head-major, and NaN past the end.
            let kv = kc.to_vec_f64().unwrap();
            for bi in 0..b {
                for hi in 0..h {
                    for ti in 0..t + 2 {
                        for e in 0..hd {
                            let got = kv[((bi * h + hi) * (t + 2) + ti) * hd + e];
                            if ti < t {
                                assert_eq!(got, k[(bi * t + ti) * c + hi * hd + e]);
                            } else {
                                assert!(got.is_nan(), "row {ti} past the end was written");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn decode_attention_in_f32_and_bf16_is_close_to_f64() {
        let mut r = rng("decode_attention_dtypes");
        let (b, c, h, pos, n) = (2, 16, 2, 9, 3);
        let hist = rand_tensor(&mut r, [b, pos, 3 * c], -2.0, 2.0);
        let new = rand_tensor(&mut r, [b, n, 3 * c], -2.0, 2.0);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let run = |dt: DType| {
                let (hist, new) = (hist.to_dtype(dtype).unwrap(), new.to_dtype(dtype).unwrap());
                let (hist, new) = (hist.to_dtype(dt).unwrap(), new.to_dtype(dt).unwrap());
                let kc = kv_cache_tensor(b, h, pos + n, c / h, dt, &Device::Cpu).unwrap();
                let vc = kv_cache_tensor(b, h, pos + n, c / h, dt, &Device::Cpu).unwrap();
                decode_attention(&hist, &kc, &vc, 0, h).unwrap();
                decode_attention(&new, &kc, &vc, pos, h).unwrap()
            };
            let (y, y64) = (run(dtype), run(DType::F64));
            assert_eq!(y.dtype(), dtype);
            assert_close(
                &format!("{dtype}"),
                &y.to_vec_f64().unwrap(),
                &y64.to_vec_f64().unwrap(),
                crate::testing::rel_l2_tolerance(dtype),
            );
        }
    }

    #[test]
    fn decode_attention_rejects_bad_input() {
        let d = Device::Cpu;
        let z = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &d).unwrap();
        let cache = || kv_cache_tensor(2, 2, 8, 3, DType::F32, &d).unwrap();
        let (kc, vc) = (cache(), cache());
        let qkv = z(&[2, 3, 18]);
        assert!(decode_attention(&qkv, &kc, &vc, 5, 2).is_ok());
        let shape_err = |r: Result<Tensor>| matches!(r, Err(Error::Shape { .. }));
        // qkv not rank 3, not 3·C, C not divisible into heads, no heads.
        assert!(shape_err(decode_attention(&z(&[6, 18]), &kc, &vc, 0, 2)));
        assert!(shape_err(decode_attention(&z(&[2, 3, 17]), &kc, &vc, 0, 2)));
        assert!(shape_err(decode_attention(&z(&[2, 3, 0]), &kc, &vc, 0, 2)));
        assert!(shape_err(decode_attention(&qkv, &kc, &vc, 0, 4)));
        assert!(shape_err(decode_attention(&qkv, &kc, &vc, 0, 0)));
        // Caches of another batch, head count or head dim, or two different shapes.
        for bad in [[1, 2, 8, 3], [2, 3, 8, 3], [2, 2, 8, 4]] {
            let other = kv_cache_tensor(bad[0], bad[1], bad[2], bad[3], DType::F32, &d).unwrap();
            let other2 = kv_cache_tensor(bad[0], bad[1], bad[2], bad[3], DType::F32, &d).unwrap();
            assert!(
                shape_err(decode_attention(&qkv, &other, &other2, 0, 2)),
                "{bad:?}"
            );
        }
        let longer = kv_cache_tensor(2, 2, 9, 3, DType::F32, &d).unwrap();
        assert!(shape_err(decode_attention(&qkv, &kc, &longer, 0, 2)));
        assert!(shape_err(decode_attention(
            &qkv,
            &z(&[2, 2, 24]),
            &vc,
            0,
            2
        )));
        // Past the cache's end.
        match decode_attention(&qkv, &kc, &vc, 6, 2) {
            Err(Error::Shape { msg, .. }) => {
                assert!(msg.contains("overflow a cache of 8"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        assert!(shape_err(decode_attention(&qkv, &kc, &vc, usize::MAX, 2)));
        // Mixed dtypes.
        let k16 = kv_cache_tensor(2, 2, 8, 3, DType::BF16, &d).unwrap();
        let v16 = kv_cache_tensor(2, 2, 8, 3, DType::BF16, &d).unwrap();
        assert!(matches!(
            decode_attention(&qkv, &k16, &v16, 0, 2),
            Err(Error::DType { .. })
        ));
        // Aliased buffers.
        assert!(matches!(
            decode_attention(&qkv, &kc, &kc, 0, 2),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            decode_attention(&qkv, &kc, &kc.clone(), 0, 2),
            Err(Error::InvalidArgument(_))
        ));
        // Tracked input.
        let tape = Tape::new();
        match decode_attention(&qkv.track(&tape), &kc, &vc, 0, 2) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains("inference only"), "{msg}"),
            other => panic!("{other:?}"),
        }
        // No new positions, an empty batch: empty results, caches untouched.
        assert_eq!(
            decode_attention(&z(&[2, 0, 18]), &kc, &vc, 8, 2)
                .unwrap()
                .dims(),
            &[2, 0, 6]
        );
        let (k0, v0) = (
            kv_cache_tensor(0, 2, 8, 3, DType::F32, &d).unwrap(),
            kv_cache_tensor(0, 2, 8, 3, DType::F32, &d).unwrap(),
        );
        assert_eq!(
            decode_attention(&z(&[0, 3, 18]), &k0, &v0, 0, 2)
                .unwrap()
                .dims(),
            &[0, 3, 6]
        );
        // A cache too large to address.
        assert!(matches!(
            kv_cache_tensor(usize::MAX, 2, 8, 3, DType::F32, &d),
            Err(Error::InvalidArgument(_))
        ));
    }
}
