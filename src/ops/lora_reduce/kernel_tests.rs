//! Kernel-level tests (DESIGN §6) of the split-K token reductions on every backend present:
//! both orientations (gA-like: the small side first; gB-like: the small side second), ranks
//! 1–64, odd token counts and widths (1, 7, 63, 65, 127, 130, 300: partial k-tiles, chunks
//! and 64-row tiles), strided column slices (gy[:, cols]), the 16-byte and the element-wise
//! load paths, accumulation, three dtypes. On a kernel device the workspace is read back:
//! the second pass must equal the CPU twin's fixed-order sum of the same partials bit for
//! bit, the f32 (SIMT) partials and result must equal the twin's bit for bit, two runs must
//! be bitwise identical, and the result must match an f64 reference within DESIGN §6's
//! tolerance. Device outputs start as NaN (simulator buffers always are).

use super::*;
use crate::storage::{DeviceStorage, Storage};
use crate::testing::{assert_close, rng};
use rand::Rng;

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

use crate::testing::rel_l2_tolerance as tol;

/// A `rows × cols` row-major view at column offset `offset` of a `rows × width` tensor,
/// with the dense f64 values of the view (after rounding to the dtype).
struct View {
    t: Tensor,
    width: usize,
    offset: usize,
    dense: Vec<f64>,
}

impl View {
    #[allow(clippy::too_many_arguments)]
    fn new(
        g: &mut impl Rng,
        rows: usize,
        cols: usize,
        width: usize,
        offset: usize,
        dtype: DType,
        device: &Device,
    ) -> View {
        let v: Vec<f64> = (0..rows * width)
            .map(|_| g.random_range(-1.0..1.0))
            .collect();
        let t = Tensor::from_vec_as(v, [rows, width], dtype, device).unwrap();
        let back = t.to_vec_f64().unwrap();
        let dense = (0..rows * cols)
            .map(|e| back[(e / cols) * width + offset + e % cols])
            .collect();
        View {
            t,
            width,
            offset,
            dense,
        }
    }

    fn operand(&self) -> Operand<'_> {
        Operand::rows(&self.t, self.width).at(self.offset)
    }
}

/// One reduction: `C [m, n]` over `t` tokens, `L` a column slice (`l_width`, `l_off`) and
/// `R` a column slice (`r_width`, `r_off`).
#[derive(Clone, Debug)]
struct Case {
    t: usize,
    m: usize,
    n: usize,
    l_width: usize,
    l_off: usize,
    r_width: usize,
    r_off: usize,
    accumulate: bool,
}

fn dense(t: usize, m: usize, n: usize) -> Case {
    Case {
        t,
        m,
        n,
        l_width: m,
        l_off: 0,
        r_width: n,
        r_off: 0,
        accumulate: false,
    }
}

/// gA-like cases put the rank first (`m = r`, swapped), gB-like second (`n = r`).
fn cases() -> Vec<Case> {
    vec![
        dense(1, 1, 1),
        dense(7, 2, 65),   // gA, r 2, K 65
        dense(63, 130, 4), // gB, N 130, r 4
        dense(65, 8, 130), // gA, r 8, K 130
        Case {
            accumulate: true,
            ..dense(127, 7, 16) // gB, N 7, r 16
        },
        dense(300, 64, 7),  // gA, r 64, K 7
        dense(300, 65, 64), // gB, N 65, r 64
        dense(300, 16, 1),  // gA, r 16, K 1
        // The 16-byte paths: gy[:, 8..138] of a 144-wide gy (row stride a multiple of 8,
        // the last vector partial), su [t, 16].
        Case {
            l_width: 144,
            l_off: 8,
            ..dense(300, 130, 16)
        },
        Case {
            accumulate: true,
            ..dense(130, 8, 72) // gA, sv [t, 8], x [t, 72]
        },
        dense(65, 64, 64),  // both sides 16-byte, every column group
        dense(127, 1, 136), // gA, r 1: sv element-wise, x 16-byte
        // A slice with an odd offset: element-wise although the width is aligned.
        Case {
            l_width: 72,
            l_off: 3,
            r_width: 24,
            r_off: 8,
            ..dense(200, 65, 16)
        },
    ]
}

/// The f64 reference `alpha·Lᵀ·R (+ c0)`.
fn reference(c: &Case, l: &View, r: &View, alpha: f64, c0: Option<&[f64]>) -> Vec<f64> {
    let mut out = vec![0.0; c.m * c.n];
    for i in 0..c.m {
        for j in 0..c.n {
            let mut acc = 0.0;
            for t in 0..c.t {
                acc += l.dense[t * c.m + i] * r.dense[t * c.n + j];
            }
            out[i * c.n + j] = alpha * acc + c0.map_or(0.0, |c0| c0[i * c.n + j]);
        }
    }
    out
}

/// Asserts that two buffers hold the same bits, naming the first difference.
fn assert_bits<T: Copy + PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {n} of {} elements differ, first at {i}: {:?} vs {:?}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// f32 values rounded once into `dtype`, as f64.
fn rounded(v: Vec<f32>, dtype: DType) -> Vec<f64> {
    let n = v.len();
    Tensor::from_cpu_values(v, [n], dtype)
        .unwrap()
        .to_vec_f64()
        .unwrap()
}

/// One device run: the output and the workspace, read back.
fn device_run(red: &TokenReduce<'_>, c0: Option<&[f64]>, dtype: DType) -> (Vec<f64>, Vec<f32>) {
    let plan = red.plan().unwrap();
    let device = red.l.t.device();
    let out = match c0 {
        Some(v) => Tensor::from_vec_as(v.to_vec(), [red.m, red.n], dtype, &device).unwrap(),
        None => {
            let s = DeviceStorage::alloc(dtype, red.m * red.n, device).unwrap();
            Tensor::from_storage(Storage::Device(s), Shape::from([red.m, red.n])).unwrap()
        }
    };
    let ws = cuda::launch(red, &plan, &out, c0.is_some()).unwrap();
    let ws = ws.map_or(Vec::new(), |w| w.to_vec::<f32>().unwrap());
    (out.to_vec_f64().unwrap(), ws)
}

fn reductions_match_the_twin_and_the_reference(device: &Device) {
    let mut g = rng("lora_reduce_products");
    let alpha = 0.75;
    for dtype in DTYPES {
        for c in cases() {
            let l = View::new(&mut g, c.t, c.m, c.l_width, c.l_off, dtype, device);
            let r = View::new(&mut g, c.t, c.n, c.r_width, c.r_off, dtype, device);
            let c0: Option<Vec<f64>> = c.accumulate.then(|| {
                let t = Tensor::from_vec_as(
                    (0..c.m * c.n)
                        .map(|_| g.random_range(-1.0..1.0))
                        .collect::<Vec<f64>>(),
                    [c.m, c.n],
                    dtype,
                    device,
                )
                .unwrap();
                t.to_vec_f64().unwrap()
            });
            let red = TokenReduce::new(c.m, c.n, c.t, l.operand(), r.operand()).alpha(alpha);
            let want = reference(&c, &l, &r, alpha, c0.as_deref());
            let name = format!("{device} {dtype} {c:?}");
            if *device == Device::Cpu {
                let got = match &c0 {
                    Some(v) => {
                        let t = Tensor::from_vec_as(v.clone(), [c.m, c.n], dtype, device).unwrap();
                        red.accumulate_into(&t).unwrap();
                        t.to_vec_f64().unwrap()
                    }
                    None => red.run([c.m, c.n]).unwrap().to_vec_f64().unwrap(),
                };
                assert_close(&name, &got, &want, tol(dtype));
                continue;
            }
            let plan = red.plan().unwrap();
            let (got, ws) = device_run(&red, c0.as_deref(), dtype);
            assert_close(&name, &got, &want, tol(dtype));
            // The second pass is the twin's fixed-order sum of these very partials.
            let old32: Option<Vec<f32>> =
                c0.as_ref().map(|v| v.iter().map(|&x| x as f32).collect());
            let twin = rounded(
                cpu::finish(&ws, &plan, alpha as f32, old32.as_deref()),
                dtype,
            );
            assert_bits(
                &format!("{name}: second pass vs the twin's sum"),
                &bits(&got),
                &bits(&twin),
            );
            if dtype == DType::F32 {
                // SIMT: the partials are the twin's token-order fma chains, so the whole
                // result is the twin's too.
                let p = cpu::partials(&red, &plan).unwrap();
                assert_bits(
                    &format!("{name}: SIMT partials vs the twin"),
                    &bits32(&ws),
                    &bits32(&p),
                );
                let old = c0
                    .as_ref()
                    .map(|v| Tensor::from_vec_as(v.clone(), [c.m, c.n], dtype, &Device::Cpu))
                    .transpose()
                    .unwrap();
                let whole = rounded(cpu::reduce(&red, &plan, old.as_ref()).unwrap(), dtype);
                assert_bits(
                    &format!("{name}: SIMT result vs the twin"),
                    &bits(&got),
                    &bits(&whole),
                );
            }
            // Twice: bitwise identical.
            let (again, ws2) = device_run(&red, c0.as_deref(), dtype);
            assert_bits(&format!("{name}: a second run"), &bits(&again), &bits(&got));
            assert_bits(
                &format!("{name}: a second workspace"),
                &bits32(&ws2),
                &bits32(&ws),
            );
        }
    }
}
crate::test_device!(products, reductions_match_the_twin_and_the_reference);

/// The heuristic's numbers at the shapes the kernel header quotes.
#[test]
fn the_plan_fills_the_gpu_at_the_gpt2_and_headline_shapes() {
    let ga = plan(16, 768, 8192).unwrap();
    assert_eq!(
        (ga.swapped, ga.big, ga.small, ga.tiles, ga.chunk, ga.chunks),
        (true, 768, 16, 12, 192, 43)
    );
    let gb = plan(2304, 16, 8192).unwrap();
    assert_eq!(
        (gb.swapped, gb.tiles, gb.chunk, gb.chunks),
        (false, 36, 256, 32)
    );
    let head = plan(16, 4096, 8192).unwrap();
    assert_eq!((head.tiles, head.chunk, head.chunks), (64, 256, 32));
    for p in [ga, gb, head] {
        assert!(p.tiles * p.chunks >= 500, "{p:?}: under ~4 blocks per SM");
    }
    for (m, n, t) in [
        (1, 1, 1),
        (64, 64, 0),
        (7, 100_000, 300),
        (3000, 2, 1 << 20),
    ] {
        let p = plan(m, n, t).unwrap();
        assert!(p.chunk.is_multiple_of(CHUNK_MIN) && (CHUNK_MIN..=CHUNK_MAX).contains(&p.chunk));
        assert_eq!(p.chunks, t.div_ceil(p.chunk));
    }
    assert!(plan(65, 65, 10).is_none());
}

/// No side ≤ 64, a view outside its tensor, mixed dtypes: errors, not launches.
fn bad_input_is_an_error(device: &Device) {
    let l = Tensor::zeros([8, 70], DType::BF16, device).unwrap();
    let r = Tensor::zeros([8, 70], DType::BF16, device).unwrap();
    let f = Tensor::zeros([8, 4], DType::F32, device).unwrap();
    let ok = TokenReduce::new(70, 4, 8, Operand::rows(&l, 70), Operand::rows(&r, 70));
    assert!(ok.run([70, 4]).is_ok());
    let wide = TokenReduce::new(70, 70, 8, Operand::rows(&l, 70), Operand::rows(&r, 70));
    assert!(matches!(wide.run([70, 70]), Err(Error::Unsupported { .. })));
    let far = TokenReduce::new(70, 4, 8, Operand::rows(&l, 70).at(1), Operand::rows(&r, 70));
    assert!(matches!(far.run([70, 4]), Err(Error::Shape { .. })));
    let mixed = TokenReduce::new(70, 4, 8, Operand::rows(&l, 70), Operand::rows(&f, 4));
    assert!(matches!(mixed.run([70, 4]), Err(Error::DType { .. })));
    assert!(ok.run([70, 5]).is_err());
}
crate::test_device!(bad_input, bad_input_is_an_error);

#[test]
fn params_match_the_kernels() {
    for k in cuda::KERNELS {
        assert_eq!(
            crate::device::sim::param_bytes(k),
            Some(std::mem::size_of::<cuda::LoraReduceParams>()),
            "{k}: the Rust and C++ parameter structs differ in size"
        );
    }
}

/// Every `__syncthreads()` and `cp_async_wait` of the reduction kernels is load-bearing:
/// with any one deleted (the simulator's mutation sites), this small probe fails. It runs
/// the tensor-core partials over several k-tiles of tokens (bf16, 16-byte operands) and the
/// SIMT partials (f32), each with the second pass.
#[test]
fn every_barrier_and_wait_is_load_bearing() {
    let probe = |dtype: DType, c: Case| {
        move || {
            let mut g = rng("lora_reduce_mutants");
            let device = Device::Sim;
            let l = View::new(&mut g, c.t, c.m, c.l_width, c.l_off, dtype, &device);
            let r = View::new(&mut g, c.t, c.n, c.r_width, c.r_off, dtype, &device);
            let c0: Option<Vec<f64>> = c.accumulate.then(|| {
                let v: Vec<f64> = (0..c.m * c.n).map(|_| g.random_range(-1.0..1.0)).collect();
                Tensor::from_vec_as(v, [c.m, c.n], dtype, &Device::Cpu)
                    .unwrap()
                    .to_vec_f64()
                    .unwrap()
            });
            let red = TokenReduce::new(c.m, c.n, c.t, l.operand(), r.operand()).alpha(0.75);
            let want = reference(&c, &l, &r, 0.75, c0.as_deref());
            let (got, _) = device_run(&red, c0.as_deref(), dtype);
            assert_close(&format!("{dtype} {c:?}"), &got, &want, tol(dtype));
        }
    };
    let probes = [
        probe(DType::BF16, dense(300, 16, 136)),
        probe(
            DType::F16,
            Case {
                accumulate: true,
                ..dense(200, 72, 8)
            },
        ),
        probe(DType::F32, dense(130, 8, 65)),
    ];
    let probes: Vec<&dyn Fn()> = probes.iter().map(|p| p as &dyn Fn()).collect();
    crate::device::sim_mutation::assert_every_site_is_load_bearing(
        "lora_reduce",
        &["lora_reduce_"],
        &probes,
    );
}
