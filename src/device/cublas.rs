//! cuBLAS as a baseline: the dense product `y = x·Wᵀ` by `cublasGemmEx` on the backend's
//! stream, so benchmarks can put our GEMM beside the vendor's on the same tensors
//! (DESIGN §10: "our GEMM ≥ 0.8× cuBLAS"). Not used by the engine itself.

use super::cuda::CudaBackend;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Shape, Tensor};
use cudarc::cublas::{result as blas, sys};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One cuBLAS handle per GPU, bound to that backend's stream.
struct Handle(sys::cublasHandle_t);
// SAFETY: a cuBLAS handle may be used from any thread as long as calls on it do not run
// concurrently; every use below holds the map's mutex.
unsafe impl Send for Handle {}

fn handles() -> &'static Mutex<HashMap<usize, Handle>> {
    static H: OnceLock<Mutex<HashMap<usize, Handle>>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(HashMap::new()))
}

fn blas_err(call: &'static str) -> impl FnOnce(blas::CublasError) -> Error {
    move |e| Error::Cuda {
        call,
        msg: format!("{e:?}"),
    }
}

/// Whether libcublas can be loaded (never panics).
fn cublas_present() -> bool {
    std::panic::catch_unwind(|| {
        // SAFETY: only probes whether the shared library can be opened.
        unsafe { sys::is_culib_present() }
    })
    .unwrap_or(false)
}

/// `y = x·Wᵀ` by cuBLAS (`cublasGemmEx`, f32 accumulation, default algorithm) for `x [.., K]`
/// and `w [N, K]` on a CUDA device, in f32, bf16 or f16: the vendor baseline our GEMM
/// kernel is measured against.
///
/// Errors with [`Error::Unsupported`] on other devices, [`Error::DeviceUnavailable`]-like
/// `Error::Cuda` when libcublas is missing or a call fails.
pub fn cublas_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    const OP: &str = "cublas_linear";
    let (m, k) = x.shape().as_rows(OP)?;
    let (n, k2) = w.shape().dims2(OP)?;
    if k != k2 {
        return Err(Error::shape(
            OP,
            format!("x {} with weight {}", x.shape(), w.shape()),
        ));
    }
    let dtype = crate::tensor::same_dtype(OP, &[x, w])?;
    let device = crate::tensor::same_device(OP, &[x, w])?;
    let Device::Cuda(ordinal) = device else {
        return Err(Error::Unsupported {
            op: OP,
            msg: format!("cuBLAS runs on a CUDA device, not {device}"),
        });
    };
    let data_type = match dtype {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::F64 => {
            return Err(Error::Unsupported {
                op: OP,
                msg: "f64".into(),
            })
        }
    };
    if !cublas_present() {
        return Err(Error::Cuda {
            call: "dlopen(libcublas)",
            msg: "libcublas was not found on the library path".into(),
        });
    }
    let backend: Arc<CudaBackend> = CudaBackend::get(ordinal)?;
    // cuBLAS works on the calling thread's current context.
    backend.bind()?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    let y = Tensor::zeros(Shape::from(dims), dtype, &device)?;
    if m == 0 || n == 0 {
        return Ok(y);
    }
    let int = |v: usize| {
        i32::try_from(v).map_err(|_| Error::invalid(format!("{OP}: {v} exceeds cuBLAS's int")))
    };
    let (mi, ni, ki) = (int(m)?, int(n)?, int(k)?);
    let ptr = |t: &Tensor| -> Result<u64> {
        match &*t.storage() {
            Storage::Device(d) => Ok(d.device_ptr()),
            Storage::Cpu(_) => Err(Error::invalid(format!("{OP}: a CPU tensor"))),
        }
    };
    let (xp, wp, yp) = (ptr(x)?, ptr(w)?, ptr(&y)?);
    let mut map = handles()
        .lock()
        .map_err(|_| Error::invalid(format!("{OP}: the handle map is poisoned")))?;
    let h = match map.entry(ordinal) {
        std::collections::hash_map::Entry::Occupied(e) => e.get().0,
        std::collections::hash_map::Entry::Vacant(e) => {
            let h = blas::create_handle().map_err(blas_err("cublasCreate"))?;
            // SAFETY: `h` is a fresh handle; the stream belongs to the backend, which lives
            // for the process (backends are never dropped).
            unsafe { blas::set_stream(h, backend.stream().cu_stream() as _) }
                .map_err(blas_err("cublasSetStream"))?;
            e.insert(Handle(h)).0
        }
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    // Row-major y[M,N] = x[M,K]·W[N,K]ᵀ is column-major yᵀ[N,M] = W·xᵀ: cuBLAS's A is W
    // (column-major K×N, transposed), B is x (column-major K×M), C is y (ld N).
    // SAFETY: the three pointers are live device allocations of the checked sizes
    // (x: M·K, w: N·K, y: M·N elements of `dtype`), owned by tensors borrowed for the call;
    // alpha/beta are host f32 scalars as CUBLAS_COMPUTE_32F requires.
    unsafe {
        blas::gemm_ex(
            h,
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            ni,
            mi,
            ki,
            (&alpha as *const f32).cast(),
            wp as *const std::ffi::c_void,
            data_type,
            ki,
            xp as *const std::ffi::c_void,
            data_type,
            ki,
            (&beta as *const f32).cast(),
            yp as *mut std::ffi::c_void,
            data_type,
            ni,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(blas_err("cublasGemmEx"))?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, device_available, rand_tensor, rng};

    #[test]
    fn cublas_linear_matches_the_reference_on_a_gpu() {
        let d = Device::Cuda(0);
        if !device_available("cublas_linear", &d) {
            return;
        }
        let mut g = rng("cublas_linear");
        let x = rand_tensor(&mut g, [65, 33], -1.0, 1.0);
        let w = rand_tensor(&mut g, [70, 33], -1.0, 1.0);
        let want = crate::ops::linear(&x, &w, None)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let xd = Tensor::from_vec_as(x.to_vec_f64().unwrap(), [65, 33], dt, &d).unwrap();
            let wd = Tensor::from_vec_as(w.to_vec_f64().unwrap(), [70, 33], dt, &d).unwrap();
            let y = cublas_linear(&xd, &wd).unwrap();
            assert_close(
                &format!("cublas {dt}"),
                &y.to_vec_f64().unwrap(),
                &want,
                tol,
            );
        }
    }

    #[test]
    fn cublas_linear_refuses_other_devices() {
        for d in [Device::Cpu, Device::Sim] {
            let x = Tensor::zeros([2, 3], DType::F32, &d).unwrap();
            let w = Tensor::zeros([4, 3], DType::F32, &d).unwrap();
            assert!(matches!(
                cublas_linear(&x, &w),
                Err(Error::Unsupported { .. })
            ));
        }
    }
}
