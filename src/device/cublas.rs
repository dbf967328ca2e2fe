//! cuBLAS as a baseline: the dense product `y = x·Wᵀ` by `cublasGemmEx` on the backend's
//! stream, so benchmarks can put our GEMM beside the vendor's on the same tensors
//! (DESIGN §10: "our GEMM ≥ 0.8× cuBLAS"). Not used by the engine itself.

use super::cuda::CudaBackend;
use crate::storage::Storage;
use crate::{DType, Device, Error, Result, Shape, Tensor};
use cudarc::cublas::{result as blas, sys};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// Whether libcublas can be loaded by cudarc's names (never panics).
fn cublas_present() -> bool {
    std::panic::catch_unwind(|| {
        // SAFETY: only probes whether the shared library can be opened.
        unsafe { sys::is_culib_present() }
    })
    .unwrap_or(false)
}

/// The cuBLAS libraries for CUDA 13, in load order (cuBLAS needs cuBLASLt).
const CUBLAS_LIBS: [&str; 2] = ["libcublasLt.so.13", "libcublas.so.13"];

/// Folders that may hold cuBLAS besides the loader's path, best first:
/// `LORAFUSE_CUBLAS_DIR`, `$CUDA_HOME`/`$CUDA_PATH` `lib64`, `/usr/local/cuda/lib64`, then
/// NVIDIA's pip layout (`nvidia/cu13/lib`, `nvidia/cublas/lib`) in the `site-packages` or
/// `dist-packages` of every `python3*` under `$VIRTUAL_ENV`, `$CONDA_PREFIX`,
/// `~/.local`, `/usr/local`, `/usr` and `/opt/conda`: where a GPU runner's PyTorch keeps
/// it (DESIGN §9). `scripts/gpu-runner.sh` sets `LORAFUSE_CUBLAS_DIR` from that Python.
fn cublas_candidate_dirs() -> Vec<PathBuf> {
    let env_dir = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    dirs.extend(env_dir("LORAFUSE_CUBLAS_DIR"));
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        dirs.extend(env_dir(var).map(|d| d.join("lib64")));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    let mut prefixes: Vec<PathBuf> = Vec::new();
    prefixes.extend(env_dir("VIRTUAL_ENV"));
    prefixes.extend(env_dir("CONDA_PREFIX"));
    prefixes.extend(env_dir("HOME").map(|h| h.join(".local")));
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for py in pythons.iter().rev() {
            for packages in ["site-packages", "dist-packages"] {
                for sub in ["nvidia/cu13/lib", "nvidia/cublas/lib"] {
                    dirs.push(py.join(packages).join(sub));
                }
            }
        }
    }
    dirs
}

/// The first of `dirs` that holds every library of [`CUBLAS_LIBS`].
fn find_cublas_dir(dirs: &[PathBuf]) -> Option<&Path> {
    dirs.iter()
        .map(PathBuf::as_path)
        .find(|d| CUBLAS_LIBS.iter().all(|lib| d.join(lib).is_file()))
}

/// Why cuBLAS cannot be used here (`no cuBLAS: ...`), or `None` when it can; never panics.
/// When `libcublas.so.13` is not on the dynamic loader's path, it is looked for in
/// `LORAFUSE_CUBLAS_DIR`, `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`, `/usr/local/cuda/lib64`
/// and NVIDIA's pip layout (`nvidia/cu13/lib`, `nvidia/cublas/lib` under the
/// `site-packages` of the usual Python prefixes: where a GPU runner's PyTorch keeps it)
/// and, if found, loaded from there by its full path (cuBLASLt first), which is what
/// cudarc's later `dlopen("libcublas.so.13")` then finds: the loader matches a loaded
/// library by its soname. Asked once per process.
pub fn cublas_unavailable_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            if cublas_present() {
                return None;
            }
            let dirs = cublas_candidate_dirs();
            let Some(dir) = find_cublas_dir(&dirs) else {
                return Some(format!(
                    "no cuBLAS: {} is not on the loader's path nor in any of {} folders \
                     searched (set LORAFUSE_CUBLAS_DIR to the folder holding it, e.g. \
                     PyTorch's site-packages/nvidia/cu13/lib)",
                    CUBLAS_LIBS[1],
                    dirs.len()
                ));
            };
            for lib in CUBLAS_LIBS {
                let path = dir.join(lib);
                // SAFETY: loading NVIDIA's cuBLAS runs its initialisers, as any program
                // linked against it does; the handle is leaked so the library stays loaded
                // for cudarc, which opens it again by name.
                match unsafe { libloading::Library::new(&path) } {
                    Ok(l) => std::mem::forget(l),
                    Err(e) => {
                        return Some(format!("no cuBLAS: {} failed to load: {e}", path.display()));
                    }
                }
            }
            if cublas_present() {
                None
            } else {
                Some(format!(
                    "no cuBLAS: loaded from {} but cudarc still cannot open it",
                    dir.display()
                ))
            }
        })
        .clone()
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
            });
        }
    };
    if let Some(msg) = cublas_unavailable_reason() {
        return Err(Error::Cuda {
            call: "dlopen(libcublas)",
            msg,
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
        if let Some(why) = cublas_unavailable_reason() {
            crate::testing::skip("cublas_linear", &why, Some("LORAFUSE_REQUIRE_CUBLAS"));
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
    fn cublas_is_found_in_the_first_folder_holding_both_libraries() {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str, libs: &[&str]| {
            let d = root.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            for lib in libs {
                std::fs::write(d.join(lib), b"").unwrap();
            }
            d
        };
        let empty = dir("empty", &[]);
        let only_blas = dir("only_blas", &["libcublas.so.13"]);
        let old = dir("old", &["libcublasLt.so.12", "libcublas.so.12"]);
        let torch = dir("site-packages/nvidia/cu13/lib", &CUBLAS_LIBS);
        let later = dir("later", &CUBLAS_LIBS);
        let missing = root.path().join("missing");
        let dirs = [missing, empty, only_blas, old, torch.clone(), later];
        assert_eq!(find_cublas_dir(&dirs), Some(torch.as_path()));
        assert_eq!(find_cublas_dir(&dirs[..4]), None);
        assert_eq!(find_cublas_dir(&[]), None);
        assert!(cublas_candidate_dirs().contains(&PathBuf::from("/usr/local/cuda/lib64")));
    }

    #[test]
    fn cublas_reason_never_panics() {
        let reason = cublas_unavailable_reason();
        assert_eq!(reason, cublas_unavailable_reason());
        if let Some(r) = &reason {
            assert!(r.starts_with("no cuBLAS"), "{r}");
        }
        println!("cuBLAS: {}", reason.as_deref().unwrap_or("available"));
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
