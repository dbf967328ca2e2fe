//! The CUDA backend: one GPU, one context, one stream, the kernels of `kernels/*.cu`.
//!
//! Built on cudarc 0.19 with dynamic loading, so the crate builds and runs without CUDA:
//! nothing here touches `libcuda` before [`cudarc::driver::sys::is_culib_present`] has
//! said it can be loaded and every driver symbol this file calls has been found in it
//! (cudarc resolves symbols lazily and panics on a missing one). Machines with no driver,
//! no GPU, an unknown ordinal or a GPU below compute capability 8.0 (the kernels need bf16
//! `mma`) get [`Error::DeviceUnavailable`], never a panic.
//!
//! **Ordering.** All work — copies, memsets, launches, frees — goes to one stream, the
//! context's legacy default stream, so it runs in the order it was issued. That is what
//! makes the raw device pointers in kernel parameter structs sound: a buffer dropped on the
//! host is freed in stream order (`cuMemFreeAsync` on the same stream, or a synchronise
//! before `cuMemFree`), after every kernel issued before the drop. cudarc's per-buffer
//! event tracking (two CUDA events per allocation, for multi-stream use) is switched off
//! for the same reason: with one stream there is nothing to track. Anything else that
//! issues work on this GPU (a cuBLAS handle) must use [`CudaBackend::stream`].
//!
//! Uploads of up to `STAGING_SLOT_BYTES` are staged through a ring of page-locked slots
//! and queued with `cuMemcpyHtoDAsync` (see [`StagingRing`]), so a step's uploads (token
//! ids, targets, descriptor tables) do not drain the stream as a pageable `cuMemcpyHtoD`
//! would; a slot is rewritten only after the event recorded behind its last copy.
//!
//! **Modules** load on the first launch of any of their kernels, from the best form
//! build.rs embedded for the device (see [`ModuleSource`] and `load_plan`): a cubin for the
//! device's architecture, else the `compute_80` PTX (JIT-compiled by the driver), else the
//! source compiled here by NVRTC. `LORAFUSE_CUDA_LOAD=cubin|ptx|nvrtc` forces one path (for
//! testing each of them on a GPU runner).
//!
//! Environment: `LORAFUSE_CUDA_SYNC=1` synchronises and checks after every launch (a
//! faulting kernel is then named in the error); `LORAFUSE_CUDA_INCLUDE` points NVRTC at
//! a CUDA include folder (see [`nvrtc_compile`]).

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_void};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::result::{self as drv, DriverError};
use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use cudarc::nvrtc::result as nvrtc;

use super::kernels::{self, KernelModule};
use super::staging::StagingRing;
use super::{Device, LaunchConfig};
use crate::{Error, Result};

/// Driver entry points reached through the cudarc calls this file makes (context creation,
/// allocation, copies, memset, modules, launches, errors). Each is checked to exist in the
/// loaded `libcuda` before any is called: cudarc panics on a missing symbol.
/// `cuFuncGetParamInfo` (CUDA 12.4) is what lets [`CudaBackend::launch`] check a parameter
/// struct's size against the kernel's.
const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuTensorMapEncodeTiled",
    "cuGetErrorString",
    "cuDeviceGet",
    "cuDeviceGetCount",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuMemAlloc_v2",
    "cuMemAllocAsync",
    "cuMemFree_v2",
    "cuMemFreeAsync",
    "cuMemcpyHtoD_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemsetD8Async",
    "cuStreamSynchronize",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuFuncGetAttribute",
    "cuFuncSetAttribute",
    "cuFuncGetParamInfo",
    "cuLaunchKernel",
];

/// NVRTC entry points [`nvrtc_compile`] reaches through cudarc, checked the same way.
const NVRTC_SYMBOLS: &[&str] = &[
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcDestroyProgram",
];

/// The oldest compute capability the kernels support (bf16 `mma.sync` needs sm_80).
const MIN_CC: (u32, u32) = (8, 0);
/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_MAX_DYNAMIC_SMEM: u32 = 48 * 1024;
/// Slots of the pinned staging ring for uploads ([`StagingRing`]).
const STAGING_SLOTS: usize = 16;
/// Bytes per staging slot: the largest upload staged (a step's token ids at batch 64 ×
/// 1024 as u32); larger ones (weights, at load) are copied synchronously.
const STAGING_SLOT_BYTES: usize = 256 * 1024;

/// The pinned staging ring of a backend: `STAGING_SLOTS × STAGING_SLOT_BYTES` bytes of
/// page-locked host memory and the events fencing each slot's last copy.
struct Staging {
    /// The page-locked buffer (`cuMemHostAlloc`), slot `i` at `ring.offset(i)`.
    host: *mut u8,
    /// Its context, current when it is freed.
    ctx: Arc<CudaContext>,
    /// Which slot is next and what each must wait for.
    ring: StagingRing<CudaEvent>,
}

// SAFETY: `host` is a private allocation only touched through `&mut Staging`, which the
// backend hands out under its mutex; CUDA events and page-locked memory may be used from
// any thread of the process.
unsafe impl Send for Staging {}

impl Staging {
    /// Allocates the ring's page-locked memory (the context must be current).
    fn new(ctx: &Arc<CudaContext>) -> std::result::Result<Staging, DriverError> {
        let ring = StagingRing::new(STAGING_SLOTS, STAGING_SLOT_BYTES);
        let bytes = ring.slots() * ring.slot_bytes();
        // SAFETY: a plain page-locked allocation of `bytes` bytes in the current context;
        // freed once in `Drop`. Flags 0: portable to this context only, cached (the host
        // writes it, the copy engine reads it).
        let host = unsafe { drv::malloc_host(bytes, 0) }?.cast::<u8>();
        Ok(Staging {
            host,
            ctx: ctx.clone(),
            ring,
        })
    }
}

impl Drop for Staging {
    /// Waits for every queued copy from the ring, then frees its memory.
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        for fence in self.ring.take_fences() {
            self.ctx.record_err(fence.synchronize());
        }
        // SAFETY: `host` came from `cuMemHostAlloc` and no queued copy reads it any more
        // (every fence has completed).
        self.ctx
            .record_err(unsafe { drv::free_host(self.host.cast()) });
    }
}

/// Where a loaded module's code came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ModuleSource {
    /// A cubin built by nvcc for this target (e.g. `sm_90`, `sm_90a`).
    Cubin(&'static str),
    /// The `compute_80` PTX built by nvcc, JIT-compiled by the driver.
    Ptx,
    /// The source compiled at run time by NVRTC for the device's `compute_XY`.
    Nvrtc,
}

impl fmt::Display for ModuleSource {
    /// `cubin sm_90`, `ptx` or `nvrtc`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleSource::Cubin(t) => write!(f, "cubin {t}"),
            ModuleSource::Ptx => f.write_str("ptx"),
            ModuleSource::Nvrtc => f.write_str("nvrtc"),
        }
    }
}

/// One kernel of a loaded module, with what its launches are checked against.
struct KernelFn {
    /// The function; it holds its module alive.
    func: CudaFunction,
    /// The size of the kernel's single parameter, or why its parameter list is unusable.
    param_bytes: std::result::Result<usize, String>,
    /// `CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK` (registers and `__launch_bounds__` cap it).
    max_threads: u32,
    /// The dynamic shared memory this kernel has been opted in to (48 KiB by default).
    max_dynamic_smem: AtomicU32,
}

/// The modules loaded so far, and their kernels.
#[derive(Default)]
struct Loaded {
    /// Module name → where its code came from.
    modules: HashMap<&'static str, ModuleSource>,
    /// Kernel symbol → function.
    kernels: HashMap<&'static str, Arc<KernelFn>>,
}

/// The CUDA backend for one GPU (see the module docs).
pub(crate) struct CudaBackend {
    /// The device's primary context.
    ctx: Arc<CudaContext>,
    /// The one stream all work goes to (the context's legacy default stream).
    stream: Arc<CudaStream>,
    /// The GPU's ordinal.
    ordinal: usize,
    /// The GPU's name, e.g. `NVIDIA H100 80GB HBM3`.
    name: String,
    /// The GPU's compute capability (major, minor).
    cc: (u32, u32),
    /// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`.
    max_smem_optin: u32,
    /// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
    multiprocessors: u32,
    /// Loaded modules and kernels.
    loaded: Mutex<Loaded>,
    /// The pinned staging ring for small uploads, made on the first one (`None` inside
    /// if page-locked memory could not be had: uploads are then synchronous).
    staging: OnceLock<Option<Mutex<Staging>>>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("compute_capability", &self.cc)
            .finish_non_exhaustive()
    }
}

/// Device memory on one GPU: `len` bytes, freed (in stream order) on drop.
pub(crate) struct CudaBuffer {
    /// The allocation; `None` for a zero-byte buffer (the driver refuses to allocate 0).
    slice: Option<CudaSlice<u8>>,
    /// The allocation's device address (0 for a zero-byte buffer).
    ptr: u64,
    /// Bytes.
    len: usize,
    /// The GPU it lives on.
    ordinal: usize,
}

impl fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("ordinal", &self.ordinal)
            .finish()
    }
}

impl CudaBuffer {
    /// The device address kernels see (0 for a zero-byte buffer).
    pub(crate) fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for CudaBuffer {
    /// Makes the context current on this thread before the slice frees itself: cudarc's
    /// `CudaSlice` drop calls `cuMemFreeAsync` without binding it, which fails (and leaks,
    /// and poisons the context's next call with the recorded error) on a thread where the
    /// context was never current.
    fn drop(&mut self) {
        if self.slice.is_some() {
            super::memory::freed(crate::Device::Cuda(self.ordinal), self.len);
        }
        if let Some(s) = &self.slice {
            s.context().record_err(s.context().bind_to_thread());
        }
    }
}

/// The process's backends by ordinal, including why an ordinal is unavailable (asked once:
/// drivers and GPUs do not come and go while we run).
type BackendMap = HashMap<usize, std::result::Result<Arc<CudaBackend>, String>>;

fn backends() -> MutexGuard<'static, BackendMap> {
    static MAP: OnceLock<Mutex<BackendMap>> = OnceLock::new();
    MAP.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f`, turning a panic inside cudarc into an error message (belt and braces: the
/// checks before each call are meant to make cudarc's panics unreachable).
fn no_panic<T>(
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            Err(format!("cudarc panicked: {msg}"))
        }
    }
}

/// A driver error as `CUDA_ERROR_X (description)`.
fn describe(e: DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// An [`Error::Cuda`] for a failed driver call.
fn cuda_err(call: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Cuda {
        call,
        msg: describe(e),
    }
}

/// Tells the device's default stream-ordered memory pool (the one `cuMemAllocAsync` draws
/// from) to keep freed memory rather than release it to the driver at every
/// synchronisation (its default release threshold is 0), so each training step reuses the
/// memory of the last instead of mapping it again. This changes our process's pool, not
/// the card. Best effort: without the symbols, or on an error, the pool keeps its default.
fn keep_pool_memory(device: sys::CUdevice) {
    if missing_driver_symbol(&["cuDeviceGetDefaultMemPool", "cuMemPoolSetAttribute"]).is_some() {
        return;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: both symbols exist in the loaded driver (checked above); `pool` is a valid
    // out-pointer, and the threshold is passed as a pointer to a live u64 as the attribute
    // requires (cuuint64_t).
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, device) != sys::CUresult::CUDA_SUCCESS {
            return;
        }
        let mut threshold: u64 = u64::MAX;
        let _ = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        );
    }
}

/// Whether the loaded `libcuda` has every symbol in `names`; the first missing one if not.
fn missing_driver_symbol(names: &[&'static str]) -> Option<&'static str> {
    names.iter().copied().find(|name| {
        // SAFETY: `culib()` only runs after `is_culib_present()` found a loadable libcuda
        // (and it loads the same candidate names in the same order, so it finds it again);
        // `get` only looks the symbol up — the pointer type is never used to call anything.
        let found = unsafe { sys::culib().get::<unsafe extern "C" fn()>(*name).is_ok() };
        !found
    })
}

/// Whether the loaded `libnvrtc` has every symbol in `names`; the first missing one if not.
fn missing_nvrtc_symbol(names: &[&'static str]) -> Option<&'static str> {
    names.iter().copied().find(|name| {
        // SAFETY: as in `missing_driver_symbol`, for libnvrtc: only called after
        // `cudarc::nvrtc::sys::is_culib_present()` returned true; the symbol is never called.
        let found = unsafe {
            cudarc::nvrtc::sys::culib()
                .get::<unsafe extern "C" fn()>(*name)
                .is_ok()
        };
        !found
    })
}

/// Parses `LORAFUSE_CUDA_SYNC=1` once.
fn sync_each_launch() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LORAFUSE_CUDA_SYNC").is_ok_and(|v| v == "1"))
}

/// `LORAFUSE_CUDA_LOAD`: the one module path to use, if forced.
fn forced_load_path() -> Result<Option<&'static str>> {
    match std::env::var("LORAFUSE_CUDA_LOAD") {
        Err(_) => Ok(None),
        Ok(v) => match v.as_str() {
            "" => Ok(None),
            "cubin" => Ok(Some("cubin")),
            "ptx" => Ok(Some("ptx")),
            "nvrtc" => Ok(Some("nvrtc")),
            other => Err(Error::invalid(format!(
                "LORAFUSE_CUDA_LOAD={other:?}: expected cubin, ptx or nvrtc"
            ))),
        },
    }
}

impl CudaBackend {
    /// The backend for GPU `ordinal`, created once per process and cached. Never panics:
    /// no driver, no GPU, an unknown ordinal, a GPU below compute capability 8.0 or a
    /// driver too old for this build are all [`Error::DeviceUnavailable`].
    pub(crate) fn get(ordinal: usize) -> Result<Arc<CudaBackend>> {
        let mut map = backends();
        let entry = map
            .entry(ordinal)
            .or_insert_with(|| no_panic(|| CudaBackend::create(ordinal)).map(Arc::new));
        entry.clone().map_err(|reason| Error::DeviceUnavailable {
            device: Device::Cuda(ordinal),
            reason,
        })
    }

    /// Why CUDA device `ordinal` can't be used, or `None` if it can (creates the backend
    /// when it can, which is then cached).
    pub(crate) fn unavailable_reason(ordinal: usize) -> Option<String> {
        match CudaBackend::get(ordinal) {
            Ok(_) => None,
            Err(Error::DeviceUnavailable { reason, .. }) => Some(reason),
            Err(e) => Some(e.to_string()),
        }
    }

    /// Opens GPU `ordinal`; the error is the reason it is unavailable.
    fn create(ordinal: usize) -> std::result::Result<CudaBackend, String> {
        // SAFETY: `is_culib_present` only tries `libloading::Library::new` on cudarc's
        // candidate names and drops what it opened (cudarc 0.19.10 src/driver/sys/mod.rs,
        // `is_culib_present`); loading the NVIDIA driver library runs its initialisers,
        // which is what every CUDA program does.
        if !unsafe { sys::is_culib_present() } {
            return Err(
                "no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver \
                        installed, or it is not on the dynamic loader's path)"
                    .into(),
            );
        }
        if let Some(sym) = missing_driver_symbol(DRIVER_SYMBOLS) {
            return Err(format!(
                "the CUDA driver is too old: libcuda lacks {sym} (a CUDA 13.0 driver is needed)"
            ));
        }
        drv::init().map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                "no CUDA GPU: the driver is installed but reports no device".to_string()
            }
            _ => format!("cuInit failed: {}", describe(e)),
        })?;
        let count = drv::device::get_count()
            .map_err(|e| format!("cuDeviceGetCount failed: {}", describe(e)))?;
        let count = usize::try_from(count).unwrap_or(0);
        if count == 0 {
            return Err("no CUDA GPU: the driver reports no device".into());
        }
        if ordinal >= count {
            return Err(format!(
                "no GPU with ordinal {ordinal}: the driver reports {count} (cuda:0..cuda:{})",
                count - 1
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            format!(
                "creating a context on GPU {ordinal} failed: {}",
                describe(e)
            )
        })?;
        let name = ctx
            .name()
            .map_err(|e| format!("cuDeviceGetName failed: {}", describe(e)))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("reading the compute capability failed: {}", describe(e)))?;
        let cc = (
            u32::try_from(major).unwrap_or(0),
            u32::try_from(minor).unwrap_or(0),
        );
        if cc < MIN_CC {
            return Err(format!(
                "{name} has compute capability {}.{}; the kernels need {}.{} or newer (bf16 mma)",
                cc.0, cc.1, MIN_CC.0, MIN_CC.1
            ));
        }
        let max_smem_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .ok()
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(DEFAULT_MAX_DYNAMIC_SMEM);
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .ok()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| v > 0)
            .unwrap_or(1);
        // SAFETY: event tracking only synchronises a `CudaSlice` used on several streams.
        // This backend creates no stream besides the default one below and sends all work
        // there, in order, so no slice is ever shared between streams; it is switched off
        // before any slice exists, so no slice was created with events either.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        keep_pool_memory(ctx.cu_device());
        Ok(CudaBackend {
            ctx,
            stream,
            ordinal,
            name,
            cc,
            max_smem_optin,
            multiprocessors,
            loaded: Mutex::new(Loaded::default()),
            staging: OnceLock::new(),
        })
    }

    /// The GPU's name.
    #[allow(dead_code)]
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The GPU's compute capability (major, minor), at least (8, 0).
    #[allow(dead_code)]
    pub(crate) fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }

    /// The GPU's ordinal.
    #[allow(dead_code)]
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The stream all of this backend's work runs on; anything else issuing work on this
    /// GPU (e.g. a cuBLAS handle) must use it, or the ordering the module docs rely on breaks.
    #[allow(dead_code)]
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The GPU's streaming multiprocessors.
    pub(crate) fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }

    /// Whether `kernel`'s module loaded (loading it now if needed) from the cubin of this
    /// GPU's architecture-specific target (`sm_90a`: `load_plan` offers it only on exactly
    /// compute capability 9.0).
    pub(crate) fn runs_arch_specific_cubin(&self, kernel: &str) -> Result<bool> {
        self.kernel(kernel)?;
        let module = kernels::module_of(kernel).ok_or_else(|| Error::Kernel {
            kernel: kernel.to_string(),
            msg: "defined by no kernels/*.cu".into(),
        })?;
        Ok(matches!(
            self.module_source(module.name),
            Some(ModuleSource::Cubin(t)) if parse_sm(t).is_some_and(|(_, _, specific)| specific)
        ))
    }

    /// `cuTensorMapEncodeTiled` for a 2-D tensor of 1-, 2-, 4- or 8-byte elements (as
    /// unsigned integers: TMA copies bytes), element strides 1, no interleave, 256-byte L2
    /// promotion, zeros outside the tensor.
    pub(crate) fn encode_tensor_map(&self, m: &super::TensorMap2d) -> Result<super::TensorMap> {
        use sys::{
            CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
            CUtensorMapL2promotion, CUtensorMapSwizzle,
        };
        let data_type = match m.elem_bytes {
            1 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            2 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            4 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT32,
            8 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT64,
            b => return Err(Error::invalid(format!("tensor map: {b}-byte elements"))),
        };
        let swizzle = match m.swizzle {
            0 => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
            32 => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
            64 => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
            128 => CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            b => return Err(Error::invalid(format!("tensor map: a {b}-byte swizzle"))),
        };
        let dims = m.dims;
        let strides = [m.stride1];
        let box_dims = m.box_dims;
        let element_strides = [1u32, 1];
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        self.bind()?;
        // SAFETY: every pointer is to a live local of the length the driver reads for rank 2
        // (2 dims, 1 stride, 2 box sides, 2 element strides) and `map` is a writable
        // CUtensorMap; `m.base` is only recorded in the map (the driver validates it and
        // the other values, returning an error rather than faulting); the context is current.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                data_type,
                2,
                m.base as usize as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                box_dims.as_ptr(),
                element_strides.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        r.result().map_err(|e| Error::Cuda {
            call: "cuTensorMapEncodeTiled",
            msg: format!("{m:?}: {}", describe(e)),
        })?;
        Ok(super::TensorMap(map.opaque))
    }

    /// Where module `module` was loaded from, if it has been loaded.
    #[allow(dead_code)]
    pub(crate) fn module_source(&self, module: &str) -> Option<ModuleSource> {
        self.lock_loaded().modules.get(module).copied()
    }

    fn lock_loaded(&self) -> MutexGuard<'_, Loaded> {
        self.loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes the context current on this thread (and reports any error cudarc recorded in a
    /// drop since the last call).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("cuCtxSetCurrent"))
    }

    fn check_mine(&self, b: &CudaBuffer, op: &str) -> Result<()> {
        if b.ordinal != self.ordinal {
            return Err(Error::invalid(format!(
                "{op}: buffer lives on cuda:{}, not cuda:{}",
                b.ordinal, self.ordinal
            )));
        }
        Ok(())
    }

    /// `bytes` of uninitialised device memory (`bytes` may be 0).
    pub(crate) fn alloc(&self, bytes: usize) -> Result<CudaBuffer> {
        if bytes == 0 {
            return Ok(CudaBuffer {
                slice: None,
                ptr: 0,
                len: 0,
                ordinal: self.ordinal,
            });
        }
        // SAFETY: the memory is left uninitialised, which `alloc` is unsafe for: any byte
        // pattern is a valid `u8`, and device memory is only ever read by kernels and by
        // copies into initialised host buffers, never as Rust values.
        let slice = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| Error::Cuda {
            call: "cuMemAlloc",
            msg: format!("{bytes} bytes on cuda:{}: {}", self.ordinal, describe(e)),
        })?;
        let (ptr, record) = slice.device_ptr(&self.stream);
        drop(record);
        super::memory::allocated(crate::Device::Cuda(self.ordinal), bytes);
        Ok(CudaBuffer {
            slice: Some(slice),
            ptr,
            len: bytes,
            ordinal: self.ordinal,
        })
    }

    /// Copies `src` into `dst` (equal lengths, else an error). The host buffer is free
    /// again on return; the copy is ordered after all earlier work. Uploads of up to
    /// `STAGING_SLOT_BYTES` go through the pinned staging ring and return without waiting
    /// for the device ([`CudaBackend::htod_staged`]); larger ones are synchronous.
    pub(crate) fn htod(&self, src: &[u8], dst: &mut CudaBuffer) -> Result<()> {
        self.check_mine(dst, "upload")?;
        check_len("upload", src.len(), dst.len)?;
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        if let Some(done) = self.htod_staged(src, dst) {
            return done;
        }
        // SAFETY: `dst` owns `dst.len == src.len()` bytes of live device memory in this
        // context (current on this thread). `cuMemcpyHtoD` (synchronous) from pageable
        // memory returns once `src` has been copied to staging memory (CUDA "API
        // synchronization behavior"), so `src` is not read after this borrow ends; it runs
        // on the legacy default stream, which is this backend's stream, so it is ordered
        // after every earlier launch.
        unsafe { drv::memcpy_htod_sync(dst.ptr, src) }.map_err(cuda_err("cuMemcpyHtoD"))
    }

    /// Uploads `src` (non-empty) through a slot of the staging ring: waits for that slot's
    /// previous copy (its event), copies `src` into the slot, queues `cuMemcpyHtoDAsync`
    /// from it on the stream and records the slot's event after it. The host does not
    /// wait for the device's queued work (a pageable `cuMemcpyHtoD` would drain the
    /// stream first). `None` when `src` does not fit a slot or there is no ring; the
    /// context must be current.
    fn htod_staged(&self, src: &[u8], dst: &CudaBuffer) -> Option<Result<()>> {
        let staging = self
            .staging
            .get_or_init(|| Staging::new(&self.ctx).ok().map(Mutex::new))
            .as_ref()?;
        let mut st = staging
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (slot, fence) = st.ring.acquire(src.len())?;
        if let Some(ev) = &fence
            && let Err(e) = ev.synchronize()
        {
            st.ring.abandon(slot, fence);
            return Some(Err(cuda_err("cuEventSynchronize")(e)));
        }
        let offset = st.ring.offset(slot);
        // SAFETY: the slot spans `slot_bytes ≥ src.len()` bytes at `offset` inside the
        // ring's live page-locked allocation; the copy last queued from it has completed
        // (its event, waited for above), and no other reference to these bytes exists
        // (the ring is only reached through the mutex held here).
        let host = unsafe { std::slice::from_raw_parts_mut(st.host.add(offset), src.len()) };
        host.copy_from_slice(src);
        // SAFETY: `dst` owns `dst.len == src.len()` bytes of live device memory in this
        // context (current); it is freed in stream order, so after this copy. `host` is
        // page-locked, so the copy is asynchronous and reads it later, on the stream:
        // the slot is not written again before the event recorded below has completed.
        if let Err(e) = unsafe { drv::memcpy_htod_async(dst.ptr, host, self.stream.cu_stream()) } {
            st.ring.abandon(slot, None);
            return Some(Err(cuda_err("cuMemcpyHtoDAsync")(e)));
        }
        let ev = match fence {
            Some(ev) => ev,
            None => match self.ctx.new_event(None) {
                Ok(ev) => ev,
                Err(e) => {
                    // No fence for a queued copy: wait for it before the slot is reused.
                    let _ = self.stream.synchronize();
                    st.ring.abandon(slot, None);
                    return Some(Err(cuda_err("cuEventCreate")(e)));
                }
            },
        };
        if let Err(e) = ev.record(&self.stream) {
            let _ = self.stream.synchronize();
            st.ring.abandon(slot, None);
            return Some(Err(cuda_err("cuEventRecord")(e)));
        }
        st.ring.queued(slot, ev);
        Some(Ok(()))
    }

    /// Copies `src` into host memory `dst` (equal lengths, else an error), after all
    /// earlier work: synchronises the stream.
    pub(crate) fn dtoh(&self, src: &CudaBuffer, dst: &mut [u8]) -> Result<()> {
        self.check_mine(src, "download")?;
        check_len("download", src.len, dst.len())?;
        if !dst.is_empty() {
            self.bind()?;
            // SAFETY: `src` owns `src.len == dst.len()` bytes of live device memory in this
            // context (current). `cuMemcpyDtoH` (synchronous) to host memory returns only
            // once the copy has completed, so nothing writes `dst` after this borrow ends;
            // on the legacy default stream it is ordered after every earlier launch.
            unsafe { drv::memcpy_dtoh_sync(dst, src.ptr) }.map_err(cuda_err("cuMemcpyDtoH"))?;
        }
        self.synchronize()
    }

    /// Copies `src` into `dst` (equal lengths, else an error), in stream order.
    pub(crate) fn dtod(&self, src: &CudaBuffer, dst: &mut CudaBuffer) -> Result<()> {
        self.check_mine(src, "copy")?;
        self.check_mine(dst, "copy")?;
        check_len("copy", src.len, dst.len)?;
        if src.len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both buffers are live allocations of exactly `src.len` bytes in this
        // context (current), and distinct (`dst` is borrowed mutably). The copy is
        // stream-ordered on the stream both will be freed on, so it finishes before either
        // allocation is released.
        unsafe { drv::memcpy_dtod_async(dst.ptr, src.ptr, src.len, self.stream.cu_stream()) }
            .map_err(cuda_err("cuMemcpyDtoDAsync"))
    }

    /// Sets every byte of `dst` to `byte`, in stream order.
    pub(crate) fn memset(&self, dst: &mut CudaBuffer, byte: u8) -> Result<()> {
        self.check_mine(dst, "memset")?;
        if dst.len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: `dst` is a live allocation of `dst.len` bytes in this context (current);
        // the memset is stream-ordered on the stream it will be freed on.
        unsafe { drv::memset_d8_async(dst.ptr, byte, dst.len, self.stream.cu_stream()) }
            .map_err(cuda_err("cuMemsetD8Async"))
    }

    /// Waits for all work issued so far; reports any error a kernel hit.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_err("cuStreamSynchronize"))
    }

    /// Lets kernel `name` use up to `bytes` of dynamic shared memory per block
    /// (`cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)`): launches with
    /// more than the default 48 KiB fail without it. Fails if the device allows less.
    pub(crate) fn opt_in_dynamic_shared(&self, name: &str, bytes: u32) -> Result<()> {
        let kernel_err = |msg: String| Error::Kernel {
            kernel: name.to_string(),
            msg,
        };
        let k = self.kernel(name)?;
        if bytes <= k.max_dynamic_smem.load(Ordering::Relaxed) {
            return Ok(());
        }
        if bytes > self.max_smem_optin {
            return Err(kernel_err(format!(
                "cannot opt in to {bytes} bytes of dynamic shared memory: the device allows at \
                 most {} per block",
                self.max_smem_optin
            )));
        }
        self.bind()?;
        let attr = i32::try_from(bytes).unwrap_or(i32::MAX);
        k.func
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                attr,
            )
            .map_err(|e| {
                kernel_err(format!(
                    "opting in to {bytes} bytes of dynamic shared memory failed: {}",
                    describe(e)
                ))
            })?;
        k.max_dynamic_smem.fetch_max(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Launches kernel `name` (defined by some `kernels/*.cu`; its module is loaded on
    /// first use) with its one by-value parameter struct `params`, a `#[repr(C)]` twin of
    /// the kernel's struct. Checks that the struct's size is the kernel's parameter size,
    /// that the geometry is launchable, and the launch itself; with `LORAFUSE_CUDA_SYNC=1`
    /// also synchronises and checks that the kernel ran.
    pub(crate) fn launch<P: bytemuck::Pod>(
        &self,
        name: &str,
        cfg: &LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let kernel_err = |msg: String| Error::Kernel {
            kernel: name.to_string(),
            msg,
        };
        let k = self.kernel(name)?;
        let want = k.param_bytes.clone().map_err(&kernel_err)?;
        if std::mem::size_of::<P>() != want {
            return Err(kernel_err(format!(
                "its parameter is {want} bytes but the Rust parameter struct is {} bytes",
                std::mem::size_of::<P>()
            )));
        }
        check_config(cfg, k.max_threads, self.max_smem_optin).map_err(&kernel_err)?;
        let allowed = k.max_dynamic_smem.load(Ordering::Relaxed);
        if cfg.shared_bytes > allowed {
            return Err(kernel_err(format!(
                "{} bytes of dynamic shared memory exceed the {allowed} it may use (above 48 KiB a \
                 kernel needs an opt-in: Backend::opt_in_dynamic_shared)",
                cfg.shared_bytes
            )));
        }
        self.bind()?;
        let mut args = [params as *const P as *mut c_void];
        let [gx, gy, gz] = cfg.grid;
        let [bx, by, bz] = cfg.block;
        // SAFETY: `k.func` is a live function of a module loaded in this context (current
        // on this thread; the function holds its module). The kernel takes exactly one
        // parameter (checked when it was loaded, with `cuFuncGetParamInfo`) of
        // `size_of::<P>()` bytes (checked above), so the driver copies exactly the bytes of
        // `*params` — a live, fully initialised (`Pod`: no padding) value — into the
        // launch's parameter buffer before `cuLaunchKernel` returns, and reads nothing
        // else; it never writes through the pointer. The device addresses inside `params`
        // are the caller's contract (live buffers of this backend, which are freed in
        // stream order, after this kernel).
        unsafe {
            drv::launch_kernel(
                k.func.cu_function(),
                (gx, gy, gz),
                (bx, by, bz),
                cfg.shared_bytes,
                self.stream.cu_stream(),
                &mut args,
            )
        }
        .map_err(|e| kernel_err(format!("launch failed: {}", describe(e))))?;
        if sync_each_launch() {
            self.stream.synchronize().map_err(|e| {
                kernel_err(format!(
                    "failed while running (LORAFUSE_CUDA_SYNC=1): {}",
                    describe(e)
                ))
            })?;
        }
        Ok(())
    }

    /// Kernel `name`, loading its module on first use.
    fn kernel(&self, name: &str) -> Result<Arc<KernelFn>> {
        let mut loaded = self.lock_loaded();
        if let Some(k) = loaded.kernels.get(name) {
            return Ok(k.clone());
        }
        let module = kernels::module_of(name).ok_or_else(|| Error::Kernel {
            kernel: name.to_string(),
            msg: "defined by no kernels/*.cu".into(),
        })?;
        let (source, functions) = self.load_module(module)?;
        loaded.modules.insert(module.name, source);
        for (symbol, k) in functions {
            loaded.kernels.insert(symbol, Arc::new(k));
        }
        loaded
            .kernels
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Kernel {
                kernel: name.to_string(),
                msg: format!("not found in module {} after loading it", module.name),
            })
    }

    /// Loads `module` from the first of its forms (in `load_plan` order) that loads.
    fn load_module(
        &self,
        module: &'static KernelModule,
    ) -> Result<(ModuleSource, Vec<(&'static str, KernelFn)>)> {
        let plan = load_plan(module, self.cc, forced_load_path()?);
        let mut failures = Vec::new();
        for source in plan {
            match self.load_from(module, source) {
                Ok(functions) => return Ok((source, functions)),
                Err(e) => failures.push(format!("{source}: {e}")),
            }
        }
        Err(Error::Cuda {
            call: "cuModuleLoadData",
            msg: format!(
                "module {} for compute capability {}.{}: nothing loaded: {}",
                module.name,
                self.cc.0,
                self.cc.1,
                if failures.is_empty() {
                    "no form allowed by LORAFUSE_CUDA_LOAD".to_string()
                } else {
                    failures.join("; ")
                }
            ),
        })
    }

    /// Loads `module` from one form and looks up all of its kernels.
    fn load_from(
        &self,
        module: &'static KernelModule,
        source: ModuleSource,
    ) -> Result<Vec<(&'static str, KernelFn)>> {
        let ptx = match source {
            ModuleSource::Cubin(target) => {
                let bytes = module
                    .cubins
                    .iter()
                    .find(|(t, _)| *t == target)
                    .map(|(_, b)| *b)
                    .ok_or_else(|| Error::invalid(format!("no {target} cubin")))?;
                Ptx::from_binary(bytes.to_vec())
            }
            ModuleSource::Ptx => {
                let text = module
                    .ptx
                    .ok_or_else(|| Error::invalid("no PTX embedded".to_string()))?;
                ptx_text(text)?
            }
            ModuleSource::Nvrtc => {
                let arch = format!("compute_{}{}", self.cc.0, self.cc.1);
                ptx_text(&nvrtc_compile(module, &arch)?)?
            }
        };
        // `load_module` binds the context itself. With `Ptx::from_src` it builds a CString
        // (checked NUL-free by `ptx_text`); a cubin is passed as bytes.
        let m = self
            .ctx
            .load_module(ptx)
            .map_err(cuda_err("cuModuleLoadData"))?;
        let mut out = Vec::with_capacity(module.kernels.len());
        for &symbol in module.kernels {
            // `load_function` builds a CString from the name: kernel symbols are C
            // identifiers (build.rs extracts only [A-Za-z0-9_]), never with a NUL.
            let func = m.load_function(symbol).map_err(|e| Error::Cuda {
                call: "cuModuleGetFunction",
                msg: format!("{symbol}: {}", describe(e)),
            })?;
            let max_threads = func
                .max_threads_per_block()
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0);
            let param_bytes = single_param_bytes(&func);
            out.push((
                symbol,
                KernelFn {
                    func,
                    param_bytes,
                    max_threads,
                    max_dynamic_smem: AtomicU32::new(DEFAULT_MAX_DYNAMIC_SMEM),
                },
            ));
        }
        Ok(out)
    }
}

/// The size of a kernel's parameter when it has exactly one (our convention), from
/// `cuFuncGetParamInfo`; the context must be current.
fn single_param_bytes(func: &CudaFunction) -> std::result::Result<usize, String> {
    let info = |index: usize| {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: `func` is a live function of a loaded module (it holds the module), the
        // symbol was checked present when the backend was created, and both out-pointers
        // are valid `usize`s on this stack frame.
        let r =
            unsafe { sys::cuFuncGetParamInfo(func.cu_function(), index, &mut offset, &mut size) };
        r.result().map(|()| size)
    };
    let first = info(0).map_err(|e| format!("cuFuncGetParamInfo(0) failed: {}", describe(e)));
    single_param_from(first, info(1))
}

/// The single parameter's size from `cuFuncGetParamInfo` at index 0 and 1. Index 0 must
/// succeed; then *any* error at index 1 means there is no second parameter: the driver
/// documents `CUDA_ERROR_INVALID_VALUE` for an index past the end, but drivers have
/// answered others (e.g. `CUDA_ERROR_INVALID_HANDLE`, `CUDA_ERROR_NOT_FOUND`) for it.
fn single_param_from(
    first: std::result::Result<usize, String>,
    second: std::result::Result<usize, DriverError>,
) -> std::result::Result<usize, String> {
    let size = first?;
    match second {
        Err(_) => Ok(size),
        Ok(_) => Err("takes more than one parameter (lorafuse kernels take one struct)".into()),
    }
}

/// PTX text as cudarc's `Ptx`, refusing an interior NUL (`load_module` would panic on it).
fn ptx_text(text: &str) -> Result<Ptx> {
    let text = text.trim_end_matches('\0');
    if text.contains('\0') {
        return Err(Error::invalid("PTX contains a NUL byte".to_string()));
    }
    Ok(Ptx::from_src(text))
}

/// The forms to try when loading `module` on a device of compute capability `cc`, best
/// first: cubins that run on it (`sm_{M}{m}a` only on exactly that device, then
/// `sm_{M}{m}`, then `sm_{M}{k}` for k < m, highest first: a cubin runs on its own major
/// at an equal or higher minor), then the `compute_80` PTX (the driver JIT-compiles it for
/// any device ≥ 8.0), then NVRTC. `only` (`LORAFUSE_CUDA_LOAD`) keeps one kind.
fn load_plan(module: &KernelModule, cc: (u32, u32), only: Option<&str>) -> Vec<ModuleSource> {
    let mut cubins: Vec<(u32, bool, &'static str)> = module
        .cubins
        .iter()
        .filter_map(|&(target, _)| {
            let (major, minor, arch_specific) = parse_sm(target)?;
            let runs = major == cc.0
                && if arch_specific {
                    minor == cc.1
                } else {
                    minor <= cc.1
                };
            runs.then_some((minor, arch_specific, target))
        })
        .collect();
    // Highest minor first; at equal minor, the arch-specific (`a`) cubin first.
    cubins.sort_by_key(|&(minor, arch_specific, _)| std::cmp::Reverse((minor, arch_specific)));
    let mut plan: Vec<ModuleSource> = cubins
        .into_iter()
        .map(|(_, _, t)| ModuleSource::Cubin(t))
        .collect();
    if module.ptx.is_some() && cc >= (8, 0) {
        plan.push(ModuleSource::Ptx);
    }
    plan.push(ModuleSource::Nvrtc);
    if let Some(only) = only {
        plan.retain(|s| match s {
            ModuleSource::Cubin(_) => only == "cubin",
            ModuleSource::Ptx => only == "ptx",
            ModuleSource::Nvrtc => only == "nvrtc",
        });
    }
    plan
}

/// `sm_90` → (9, 0, false), `sm_90a` → (9, 0, true), `sm_120` → (12, 0, false); other
/// suffixes (e.g. the family-specific `f`) are not understood and give `None`.
fn parse_sm(target: &str) -> Option<(u32, u32, bool)> {
    let rest = target.strip_prefix("sm_")?;
    let (digits, arch_specific) = match rest.strip_suffix('a') {
        Some(d) => (d, true),
        None => (rest, false),
    };
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (major, minor) = digits.split_at(digits.len() - 1);
    Some((major.parse().ok()?, minor.parse().ok()?, arch_specific))
}

/// Whether `cfg` is launchable: every dimension ≥ 1 and within CUDA's limits, at most
/// `max_threads` threads per block (the kernel's limit), and dynamic shared memory within
/// the device's opt-in limit. The message says which rule failed.
fn check_config(
    cfg: &LaunchConfig,
    max_threads: u32,
    max_smem: u32,
) -> std::result::Result<(), String> {
    const GRID_MAX: [u32; 3] = [i32::MAX as u32, 65535, 65535];
    const BLOCK_MAX: [u32; 3] = [1024, 1024, 64];
    for (axis, (&g, &max)) in ["x", "y", "z"].iter().zip(cfg.grid.iter().zip(&GRID_MAX)) {
        if g == 0 || g > max {
            return Err(format!("grid.{axis} = {g} is outside 1..={max} ({cfg:?})"));
        }
    }
    for (axis, (&b, &max)) in ["x", "y", "z"].iter().zip(cfg.block.iter().zip(&BLOCK_MAX)) {
        if b == 0 || b > max {
            return Err(format!("block.{axis} = {b} is outside 1..={max} ({cfg:?})"));
        }
    }
    let threads = cfg.block.iter().map(|&b| u64::from(b)).product::<u64>();
    if threads > u64::from(max_threads) {
        return Err(format!(
            "{threads} threads per block, but the kernel allows at most {max_threads} ({cfg:?})"
        ));
    }
    if cfg.shared_bytes > max_smem {
        return Err(format!(
            "{} bytes of dynamic shared memory, but the device allows at most {max_smem} per block",
            cfg.shared_bytes
        ));
    }
    Ok(())
}

fn check_len(op: &'static str, src: usize, dst: usize) -> Result<()> {
    if src != dst {
        return Err(Error::shape(op, format!("{src} bytes into {dst}")));
    }
    Ok(())
}

/// Whether libnvrtc can be loaded and has the symbols we call (probed once).
fn nvrtc_library_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            // SAFETY: as for libcuda in `CudaBackend::create`: only `Library::new` on
            // cudarc's candidate names (cudarc 0.19.10 src/nvrtc/sys/mod.rs,
            // `is_culib_present`), dropping what it opened.
            if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Some(
                    "libnvrtc could not be loaded (put the folder holding libnvrtc.so.13 on \
                     LD_LIBRARY_PATH)"
                        .into(),
                );
            }
            no_panic(|| match missing_nvrtc_symbol(NVRTC_SYMBOLS) {
                Some(sym) => Err(format!("libnvrtc lacks {sym}")),
                None => Ok(()),
            })
            .err()
        })
        .clone()
}

/// The CUDA include folder for NVRTC: the first of `LORAFUSE_CUDA_INCLUDE`, the folder
/// beside the nvcc build.rs used, `$CUDA_HOME/include`, `$CUDA_PATH/include`,
/// `/usr/local/cuda/include`, and the `include` folder beside a libnvrtc found on
/// `LD_LIBRARY_PATH` (the PyPI layout, `nvidia/cu13/{lib,include}`) that has
/// `cuda_bf16.h`.
fn cuda_include_dir() -> Option<PathBuf> {
    let env_dir = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut candidates: Vec<PathBuf> = Vec::new();
    candidates.extend(env_dir("LORAFUSE_CUDA_INCLUDE"));
    candidates.extend(kernels::CUDA_INCLUDE_DIR.map(PathBuf::from));
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        candidates.extend(env_dir(var).map(|d| d.join("include")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&paths) {
            if has_nvrtc(&lib)
                && let Some(parent) = lib.parent()
            {
                candidates.push(parent.join("include"));
            }
        }
    }
    candidates
        .into_iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
}

/// Whether folder `dir` holds a `libnvrtc.so*`.
fn has_nvrtc(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("libnvrtc.so"))
        })
    })
}

/// Why NVRTC can't be used here (libnvrtc not loadable, or no CUDA include folder with
/// `cuda_bf16.h`), or `None` if it can. Never panics.
pub(crate) fn nvrtc_unavailable_reason() -> Option<String> {
    if let Some(reason) = nvrtc_library_reason() {
        return Some(reason);
    }
    if cuda_include_dir().is_none() {
        return Some(
            "no CUDA include folder with cuda_bf16.h (set LORAFUSE_CUDA_INCLUDE, CUDA_HOME or \
             CUDA_PATH)"
                .into(),
        );
    }
    None
}

/// Destroys an NVRTC program when dropped.
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by `nvrtc::create_program` and is destroyed only
        // here, once; a failure only leaks it.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

/// NVRTC's log for `prog`, as text (empty if it cannot be read).
fn program_log(prog: &Program) -> String {
    // SAFETY: `prog` is a live program (destroyed only when `Program` drops).
    match unsafe { nvrtc::get_program_log(prog.0) } {
        Ok(log) => c_chars_to_string(&log),
        Err(_) => String::new(),
    }
}

/// A NUL-terminated `c_char` buffer as text (up to the first NUL).
fn c_chars_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one module's `nvrtc_source` with NVRTC for virtual architecture `arch` (e.g.
/// `compute_80`), with `-std=c++17` and the CUDA include folder (see `cuda_include_dir`
/// for the search order). Returns the PTX text; errors carry NVRTC's log.
pub(crate) fn nvrtc_compile(module: &KernelModule, arch: &str) -> Result<String> {
    let err = |call: &'static str, msg: String| Error::Cuda {
        call,
        msg: format!("module {} for {arch}: {msg}", module.name),
    };
    if let Some(reason) = nvrtc_unavailable_reason() {
        return Err(err(
            "nvrtcCreateProgram",
            format!("NVRTC unavailable: {reason}"),
        ));
    }
    let include = cuda_include_dir()
        .ok_or_else(|| err("nvrtcCreateProgram", "no CUDA include folder".into()))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        format!("--include-path={}", include.display()),
    ];
    // cudarc's `compile_program` unwraps `CString::new` on every option.
    if options.iter().any(|o| o.contains('\0')) {
        return Err(err(
            "nvrtcCompileProgram",
            "an option contains a NUL byte".into(),
        ));
    }
    let src = CString::new(module.nvrtc_source).map_err(|_| {
        err(
            "nvrtcCreateProgram",
            "the source contains a NUL byte".into(),
        )
    })?;
    let name = CString::new(format!("{}.cu", module.name)).map_err(|_| {
        err(
            "nvrtcCreateProgram",
            "the module name contains a NUL byte".into(),
        )
    })?;
    no_panic(|| {
        let prog = nvrtc::create_program(&src, Some(&name))
            .map(Program)
            .map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?;
        // SAFETY: `prog` is live (destroyed when `Program` drops, after this call); the
        // options are NUL-free (checked above), so cudarc's CString conversion cannot fail.
        if let Err(e) = unsafe { nvrtc::compile_program(prog.0, &options) } {
            return Err(format!(
                "nvrtcCompileProgram: {e:?} (options {options:?})\n{}",
                program_log(&prog)
            ));
        }
        // SAFETY: `prog` is live and compiled successfully.
        let ptx = unsafe { nvrtc::get_ptx(prog.0) }.map_err(|e| format!("nvrtcGetPTX: {e:?}"))?;
        let ptx = c_chars_to_string(&ptx);
        if ptx.trim().is_empty() {
            return Err(format!("nvrtcGetPTX: empty PTX\n{}", program_log(&prog)));
        }
        Ok(ptx)
    })
    .map_err(|msg| err("nvrtcCompileProgram", msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports the running test skipped ([`crate::testing::skip`]), or panics when
    /// `require_var=1`.
    fn skip(reason: &str, require_var: &str) {
        crate::testing::skip(&crate::testing::current_test(), reason, Some(require_var));
    }

    /// The backend for cuda:0, or None (after printing why) when there is none.
    fn gpu() -> Option<Arc<CudaBackend>> {
        match CudaBackend::unavailable_reason(0) {
            None => Some(CudaBackend::get(0).expect("available")),
            Some(reason) => {
                skip(&reason, "LORAFUSE_REQUIRE_GPU");
                None
            }
        }
    }

    #[test]
    fn unavailable_gpu_is_an_error_not_a_panic() {
        let reason = CudaBackend::unavailable_reason(0);
        match (&reason, CudaBackend::get(0)) {
            (Some(r), Err(Error::DeviceUnavailable { device, reason })) => {
                assert_eq!(device, Device::Cuda(0));
                assert_eq!(r, &reason);
                println!("cuda:0 unavailable: {reason}");
            }
            (None, Ok(b)) => println!("cuda:0: {} (sm_{}{})", b.name(), b.cc.0, b.cc.1),
            (r, g) => panic!("unavailable_reason {r:?} disagrees with get {g:?}"),
        }
        // An ordinal no machine has is always unavailable, with or without a driver.
        let far = CudaBackend::get(10_000);
        assert!(
            matches!(
                far,
                Err(Error::DeviceUnavailable {
                    device: Device::Cuda(10_000),
                    ..
                })
            ),
            "{far:?}"
        );
        assert!(CudaBackend::unavailable_reason(10_000).is_some());
        assert!(!Device::Cuda(10_000).is_available());
    }

    #[test]
    fn copies_round_trip_on_the_gpu() {
        let Some(b) = gpu() else { return };
        let (major, minor) = b.compute_capability();
        assert!((major, minor) >= (8, 0), "{major}.{minor}");
        assert!(!b.name().is_empty());
        println!("cuda:0: {} sm_{major}{minor}", b.name());
        for n in [0usize, 1, 3, 7, 4099, (1 << 20) + 13] {
            let host: Vec<u8> = (0..n).map(|i| (i * 31 + 7) as u8).collect();
            let mut a = b.alloc(n).unwrap();
            assert_eq!(a.len(), n);
            assert_eq!(a.device_ptr() == 0, n == 0);
            b.htod(&host, &mut a).unwrap();
            let mut c = b.alloc(n).unwrap();
            b.memset(&mut c, 0xAB).unwrap();
            let mut back = vec![0u8; n];
            b.dtoh(&c, &mut back).unwrap();
            assert!(back.iter().all(|&x| x == 0xAB), "memset, n = {n}");
            b.dtod(&a, &mut c).unwrap();
            b.dtoh(&c, &mut back).unwrap();
            assert_eq!(back, host, "round trip, n = {n}");
            // Length mismatches are errors, not panics or partial copies.
            if n > 0 {
                assert!(b.htod(&host[1..], &mut a).is_err());
                assert!(b.dtoh(&a, &mut back[1..]).is_err());
                let mut shorter = b.alloc(n - 1).unwrap();
                assert!(b.dtod(&a, &mut shorter).is_err());
            }
        }
        // Buffers dropped on another thread (where the context was never current) are
        // freed without poisoning the next call.
        let moved = b.alloc(1024).unwrap();
        std::thread::spawn(move || drop(moved)).join().unwrap();
        b.synchronize().unwrap();
        let _ = b.alloc(16).unwrap();
    }

    #[test]
    fn staged_uploads_wait_for_their_slot_on_the_gpu() {
        use crate::ops::elementwise::cuda::ElementwiseParams;
        let Some(b) = gpu() else { return };
        // Hold the stream with a long kernel, then queue more small uploads than the ring
        // has slots, each from a host buffer that is overwritten right after: every slot
        // is reused while earlier copies may still be waiting behind the kernel.
        let n = 1usize << 26;
        let big = b.alloc(n * 4).unwrap();
        let params = ElementwiseParams {
            x: big.device_ptr(),
            out: big.device_ptr(),
            n: n as u64,
            alpha: 1.0,
            ..Default::default()
        };
        b.launch(
            "scale_fwd_f32",
            &LaunchConfig::grid_stride(n, 256, 64),
            &params,
        )
        .unwrap();
        let uploads = 3 * STAGING_SLOTS + 1;
        let mut host = vec![0u8; 4099];
        let mut bufs = Vec::new();
        for i in 0..uploads {
            host.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = (i * 7 + j) as u8);
            let mut d = b.alloc(host.len()).unwrap();
            b.htod(&host, &mut d).unwrap();
            bufs.push(d);
        }
        for (i, d) in bufs.iter().enumerate() {
            let mut back = vec![0u8; host.len()];
            b.dtoh(d, &mut back).unwrap();
            assert!(
                back.iter()
                    .enumerate()
                    .all(|(j, &x)| x == (i * 7 + j) as u8),
                "upload {i} of {uploads} was overwritten in its staging slot"
            );
        }
        assert!(
            b.staging.get().is_some_and(Option::is_some),
            "no staging ring"
        );
    }

    #[test]
    fn launches_check_their_parameters_on_the_gpu() {
        use crate::ops::elementwise::cuda::ElementwiseParams;
        let Some(b) = gpu() else { return };
        let n = 1000usize;
        let xs: Vec<f32> = (0..n).map(|i| i as f32 - 500.0).collect();
        let mut x = b.alloc(n * 4).unwrap();
        b.htod(bytemuck::cast_slice(&xs), &mut x).unwrap();
        let out = b.alloc(n * 4).unwrap();
        let params = ElementwiseParams {
            x: x.device_ptr(),
            out: out.device_ptr(),
            n: n as u64,
            alpha: 0.5,
            ..Default::default()
        };
        let cfg = LaunchConfig::grid_stride(n, 256, 4096);
        b.launch("scale_fwd_f32", &cfg, &params).unwrap();
        let mut back = vec![0u8; n * 4];
        b.dtoh(&out, &mut back).unwrap();
        let ys: &[f32] = bytemuck::cast_slice(&back);
        for (i, (&x, &y)) in xs.iter().zip(ys).enumerate() {
            assert_eq!(y, 0.5 * x, "element {i}");
        }
        println!(
            "elementwise loaded from {}",
            b.module_source("elementwise").unwrap()
        );
        // Misuse is an error naming the kernel, never undefined behaviour.
        let wrong_size = b.launch("scale_fwd_f32", &cfg, &0u64);
        assert!(
            matches!(&wrong_size, Err(Error::Kernel { msg, .. }) if msg.contains("bytes")),
            "{wrong_size:?}"
        );
        let no_blocks = LaunchConfig {
            grid: [0, 1, 1],
            ..cfg
        };
        assert!(matches!(
            b.launch("scale_fwd_f32", &no_blocks, &params),
            Err(Error::Kernel { .. })
        ));
        let too_wide = LaunchConfig {
            block: [2048, 1, 1],
            ..cfg
        };
        assert!(matches!(
            b.launch("scale_fwd_f32", &too_wide, &params),
            Err(Error::Kernel { .. })
        ));
        assert!(matches!(
            b.launch("no_such_kernel_f32", &cfg, &params),
            Err(Error::Kernel { .. })
        ));
        b.synchronize().unwrap();
    }

    #[test]
    fn every_load_path_loads_every_module_on_the_gpu() {
        let Some(b) = gpu() else { return };
        let nvrtc = nvrtc_unavailable_reason();
        if let Some(reason) = &nvrtc {
            // The cubin and PTX paths still run; the NVRTC one is reported as skipped.
            skip(
                &format!("its nvrtc path: {reason}"),
                "LORAFUSE_REQUIRE_NVRTC",
            );
        }
        for m in kernels::MODULES {
            for source in load_plan(m, b.cc, None) {
                if source == ModuleSource::Nvrtc && nvrtc.is_some() {
                    continue;
                }
                let functions = b
                    .load_from(m, source)
                    .unwrap_or_else(|e| panic!("{} from {source}: {e}", m.name));
                assert_eq!(functions.len(), m.kernels.len());
                for (symbol, k) in &functions {
                    let bytes = k
                        .param_bytes
                        .as_ref()
                        .unwrap_or_else(|e| panic!("{symbol}: {e}"));
                    // The parameter is the simulator's C++ twin of the Rust struct, and the
                    // kernel admits the block its launcher gives it (its
                    // `__launch_bounds__` and registers cap `max_threads`).
                    assert_eq!(
                        Some(*bytes),
                        super::super::sim::param_bytes(symbol),
                        "{symbol}: parameter bytes on the GPU vs the simulator"
                    );
                    let threads = crate::ops::block_threads(symbol)
                        .unwrap_or_else(|| panic!("{symbol}: launched by no op"));
                    assert!(
                        k.max_threads >= threads,
                        "{symbol}: admits {} threads per block, its launcher uses {threads}",
                        k.max_threads
                    );
                }
                println!("{} from {source}: {} kernels", m.name, functions.len());
            }
        }
    }

    #[test]
    fn nvrtc_compiles_every_module() {
        if let Some(reason) = nvrtc_unavailable_reason() {
            skip(&reason, "LORAFUSE_REQUIRE_NVRTC");
            return;
        }
        println!("include folder: {}", cuda_include_dir().unwrap().display());
        for m in kernels::MODULES {
            for arch in ["compute_80", "compute_90"] {
                let ptx = nvrtc_compile(m, arch).unwrap_or_else(|e| panic!("{e}"));
                let target = format!(".target sm_{}", &arch["compute_".len()..]);
                assert!(
                    ptx.contains(&target),
                    "{}: no `{target}` in the PTX",
                    m.name
                );
                for k in m.kernels {
                    assert!(
                        ptx.contains(&format!(".entry {k}(")),
                        "{k} missing from {} ({arch})",
                        m.name
                    );
                }
                println!(
                    "{} {arch}: {} bytes of PTX, {} kernels",
                    m.name,
                    ptx.len(),
                    m.kernels.len()
                );
            }
        }
        println!("{} modules compiled", kernels::MODULES.len());
    }

    #[test]
    fn nvrtc_reports_compile_errors_with_the_log() {
        if let Some(reason) = nvrtc_unavailable_reason() {
            skip(&reason, "LORAFUSE_REQUIRE_NVRTC");
            return;
        }
        let broken = KernelModule {
            name: "broken",
            kernels: &["broken_fwd_f32"],
            ptx: None,
            cubins: &[],
            nvrtc_source: "extern \"C\" __global__ void broken_fwd_f32(int p) { undeclared = p; }",
            ptxas_report: "",
        };
        match nvrtc_compile(&broken, "compute_80") {
            Err(Error::Cuda { msg, .. }) => assert!(msg.contains("undeclared"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let nul = KernelModule {
            nvrtc_source: "int x;\0",
            ..broken
        };
        assert!(matches!(
            nvrtc_compile(&nul, "compute_80"),
            Err(Error::Cuda { .. })
        ));
    }

    #[test]
    fn nvrtc_reason_never_panics() {
        // Whatever this machine has, asking twice gives the same answer and no panic.
        assert_eq!(nvrtc_unavailable_reason(), nvrtc_unavailable_reason());
    }

    const FAKE: &[u8] = &[0];

    fn fake(cubins: &'static [(&'static str, &'static [u8])], ptx: bool) -> KernelModule {
        KernelModule {
            name: "fake",
            kernels: &[],
            ptx: ptx.then_some(""),
            cubins,
            nvrtc_source: "",
            ptxas_report: "",
        }
    }

    #[test]
    fn load_plan_prefers_the_closest_cubin_then_ptx_then_nvrtc() {
        use ModuleSource::{Cubin, Nvrtc, Ptx};
        let all = fake(&[("sm_80", FAKE), ("sm_90", FAKE), ("sm_90a", FAKE)], true);
        assert_eq!(
            load_plan(&all, (9, 0), None),
            [Cubin("sm_90a"), Cubin("sm_90"), Ptx, Nvrtc]
        );
        assert_eq!(load_plan(&all, (8, 0), None), [Cubin("sm_80"), Ptx, Nvrtc]);
        // sm_86/sm_89 run the sm_80 cubin; sm_90a only on exactly 9.0.
        assert_eq!(load_plan(&all, (8, 9), None), [Cubin("sm_80"), Ptx, Nvrtc]);
        assert_eq!(load_plan(&all, (9, 1), None), [Cubin("sm_90"), Ptx, Nvrtc]);
        // Blackwell: no cubin of its major; the compute_80 PTX JITs.
        assert_eq!(load_plan(&all, (10, 0), None), [Ptx, Nvrtc]);
        assert_eq!(load_plan(&all, (12, 0), None), [Ptx, Nvrtc]);
        let several = fake(&[("sm_80", FAKE), ("sm_86", FAKE), ("sm_87", FAKE)], false);
        assert_eq!(
            load_plan(&several, (8, 9), None),
            [Cubin("sm_87"), Cubin("sm_86"), Cubin("sm_80"), Nvrtc]
        );
        assert_eq!(
            load_plan(&several, (8, 6), None),
            [Cubin("sm_86"), Cubin("sm_80"), Nvrtc]
        );
        let source_only = fake(&[], false);
        assert_eq!(load_plan(&source_only, (9, 0), None), [Nvrtc]);
        // LORAFUSE_CUDA_LOAD keeps one kind.
        assert_eq!(load_plan(&all, (9, 0), Some("ptx")), [Ptx]);
        assert_eq!(load_plan(&all, (9, 0), Some("nvrtc")), [Nvrtc]);
        assert_eq!(
            load_plan(&all, (9, 0), Some("cubin")),
            [Cubin("sm_90a"), Cubin("sm_90")]
        );
        assert_eq!(load_plan(&all, (10, 0), Some("cubin")), []);
        assert_eq!(Cubin("sm_90").to_string(), "cubin sm_90");
        assert_eq!(Ptx.to_string(), "ptx");
        assert_eq!(Nvrtc.to_string(), "nvrtc");
    }

    #[test]
    fn param_info_any_error_past_the_first_parameter_means_one() {
        use sys::CUresult::*;
        let e = |c| Err(DriverError(c));
        for past_the_end in [
            CUDA_ERROR_INVALID_VALUE,
            CUDA_ERROR_INVALID_HANDLE,
            CUDA_ERROR_NOT_FOUND,
            CUDA_ERROR_NOT_SUPPORTED,
        ] {
            assert_eq!(single_param_from(Ok(48), e(past_the_end)), Ok(48));
        }
        assert!(
            single_param_from(Ok(48), Ok(8))
                .unwrap_err()
                .contains("more than one parameter")
        );
        let failed = Err("cuFuncGetParamInfo(0) failed".to_string());
        assert_eq!(
            single_param_from(failed.clone(), e(CUDA_ERROR_INVALID_VALUE)),
            failed
        );
    }

    #[test]
    fn sm_targets_parse() {
        assert_eq!(parse_sm("sm_80"), Some((8, 0, false)));
        assert_eq!(parse_sm("sm_90a"), Some((9, 0, true)));
        assert_eq!(parse_sm("sm_120"), Some((12, 0, false)));
        assert_eq!(parse_sm("sm_100a"), Some((10, 0, true)));
        assert_eq!(parse_sm("sm_100f"), None);
        assert_eq!(parse_sm("sm_9"), None);
        assert_eq!(parse_sm("compute_80"), None);
        assert_eq!(parse_sm("sm_"), None);
    }

    #[test]
    fn launch_configs_are_checked() {
        let ok = LaunchConfig {
            grid: [4096, 1, 1],
            block: [256, 1, 1],
            shared_bytes: 0,
        };
        assert_eq!(check_config(&ok, 1024, 48 * 1024), Ok(()));
        let bad = [
            LaunchConfig {
                grid: [0, 1, 1],
                ..ok
            },
            LaunchConfig {
                grid: [1, 0, 1],
                ..ok
            },
            LaunchConfig {
                grid: [1, 65536, 1],
                ..ok
            },
            LaunchConfig {
                block: [1025, 1, 1],
                ..ok
            },
            LaunchConfig {
                block: [1, 1, 65],
                ..ok
            },
            LaunchConfig {
                block: [1, 1, 0],
                ..ok
            },
            LaunchConfig {
                block: [512, 4, 1],
                ..ok
            },
            LaunchConfig {
                shared_bytes: 48 * 1024 + 1,
                ..ok
            },
        ];
        for cfg in bad {
            assert!(check_config(&cfg, 1024, 48 * 1024).is_err(), "{cfg:?}");
        }
        // The kernel's own limit (registers, __launch_bounds__) binds too.
        assert!(check_config(&ok, 128, 48 * 1024).is_err());
        assert_eq!(
            check_config(
                &LaunchConfig {
                    grid: [i32::MAX as u32, 65535, 65535],
                    ..ok
                },
                256,
                0
            ),
            Ok(())
        );
    }
}
