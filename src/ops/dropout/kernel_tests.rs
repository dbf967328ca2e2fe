//! Kernel-level tests (DESIGN §6) of seeded dropout on every backend present: the device
//! mask must be the CPU's bit for bit (the kernel ports the hash), and so must the outputs
//! of the forward and the backward (one f32 multiply rounded once, as on the CPU), for three
//! dtypes, several `p` (0 included), random seeds, sizes that are not multiples of the
//! block, NaN inputs. Outputs start poisoned (NaN) on the devices, so an unwritten element
//! fails.

use super::*;
use crate::DType;
use crate::testing::rng;
use rand::Rng;

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// Equal bit patterns, or both NaN (a GPU may return another NaN payload).
fn assert_same(name: &str, got: &Tensor, want: &Tensor) {
    let (a, b) = (got.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
    assert_eq!(a.len(), b.len(), "{name}: lengths differ");
    if let Some(i) = (0..a.len())
        .find(|&i| a[i].to_bits() != b[i].to_bits() && !(a[i].is_nan() && b[i].is_nan()))
    {
        panic!(
            "{name}: first differing element {i}: got {}, want {}",
            a[i], b[i]
        );
    }
}

fn matches_the_cpu_bit_for_bit(device: &Device) {
    let mut g = rng("dropout_kernel");
    for dtype in DTYPES {
        for (shape, p) in [
            (vec![1usize], 0.5),
            (vec![7, 33], 0.1),
            (vec![3, 40_001], 0.3),
            (vec![1000], 0.0),
            (vec![257, 3], 0.9),
            (vec![0, 5], 0.5),
        ] {
            let seed: u64 = g.random();
            let n: usize = shape.iter().product();
            let mut x: Vec<f64> = (0..n).map(|_| g.random_range(-3.0..3.0)).collect();
            let gy: Vec<f64> = (0..n).map(|_| g.random_range(-3.0..3.0)).collect();
            if n > 10 {
                x[3] = f64::NAN;
                x[n - 1] = f64::INFINITY;
            }
            let name = format!("{device} {dtype} {shape:?} p {p} seed {seed}");
            let on = |d: &Device| {
                let tape = Tape::new();
                let xt = Tensor::from_vec_as(x.clone(), shape.clone(), dtype, d)
                    .unwrap()
                    .track(&tape);
                let y = dropout(&xt, p, seed).unwrap();
                let seed_g = Tensor::from_vec_as(gy.clone(), shape.clone(), dtype, d).unwrap();
                let gx = tape
                    .backward_with(&y, seed_g)
                    .unwrap()
                    .get(&xt)
                    .unwrap()
                    .clone();
                (y, gx)
            };
            let (y, gx) = on(device);
            let (y_cpu, gx_cpu) = on(&Device::Cpu);
            assert_eq!((y.dims(), y.dtype()), (&shape[..], dtype), "{name}");
            assert_same(&format!("{name} forward"), &y, &y_cpu);
            assert_same(&format!("{name} backward"), &gx, &gx_cpu);
            // The mask itself, element by element, against the definition.
            let (yv, gv) = (y.to_vec_f64().unwrap(), gx.to_vec_f64().unwrap());
            for i in 0..n {
                let kept = dropout_mask_value(seed, i as u64, p);
                if !kept {
                    assert!(
                        yv[i].to_bits() == 0 && gv[i].to_bits() == 0,
                        "{name}: element {i} should be dropped"
                    );
                } else if x[i] != 0.0 && gy[i] != 0.0 {
                    assert!(
                        yv[i] != 0.0 && gv[i] != 0.0,
                        "{name}: element {i} should be kept"
                    );
                }
            }
            // Deterministic.
            let (y2, gx2) = on(device);
            assert_same(&format!("{name} forward again"), &y2, &y);
            assert_same(&format!("{name} backward again"), &gx2, &gx);
        }
    }
}
crate::test_device!(matches_cpu, matches_the_cpu_bit_for_bit);

fn bad_p_is_an_error(device: &Device) {
    let x = Tensor::zeros([4], DType::BF16, device).unwrap();
    for p in [-0.1, 1.0, f64::NAN] {
        assert!(
            matches!(dropout(&x, p, 0), Err(Error::InvalidArgument(_))),
            "{device}: p {p}"
        );
    }
}
crate::test_device!(bad_p, bad_p_is_an_error);

#[test]
fn params_match_the_kernels() {
    for k in cuda::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::DropoutParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}
