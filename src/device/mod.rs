//! Devices: where a tensor's storage lives and which backend runs its ops.

use std::fmt;

/// A compute device.
///
/// `Cpu` is the reference backend, always present. `Cuda` runs the hand-written kernels
/// on an NVIDIA GPU (creating a tensor there returns [`crate::Error::DeviceUnavailable`]
/// when there is no driver or no such GPU) and `Sim` runs the same `kernels/*.cu` on the
/// CPU through the simulator, always present. Ops without a kernel yet return
/// [`crate::Error::Unsupported`] on `Cuda` and `Sim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The CPU reference backend.
    #[default]
    Cpu,
    /// A CUDA GPU, by ordinal.
    Cuda(usize),
    /// The CUDA-kernel simulator (runs `kernels/*.cu` on the CPU).
    Sim,
}

impl Device {
    /// Parses `cpu`, `cuda`, `cuda:N` or `sim`.
    pub fn parse(s: &str) -> crate::Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "sim" => Ok(Device::Sim),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    crate::Error::invalid(format!(
                        "unknown device {s:?} (expected cpu, cuda, cuda:N or sim)"
                    ))
                }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Sim => f.write_str("sim"),
        }
    }
}

pub mod cpu;
mod cublas;
pub(crate) mod cuda;
pub mod kernels;
mod memory;
pub(crate) mod sim;
#[cfg(test)]
pub(crate) mod sim_mutation;
#[cfg(test)]
mod sim_tests;
mod staging;
#[cfg(test)]
mod tidy;

pub use cublas::{cublas_linear, cublas_unavailable_reason};
pub use memory::{CountingAllocator, MemoryStats};
use std::sync::Arc;

use crate::{Error, Result};
use cuda::{CudaBackend, CudaBuffer};
use sim::SimBuffer;

impl Device {
    /// Whether tensors can be created on this device in this process (for `Cuda`: a
    /// driver and that GPU are present).
    pub fn is_available(&self) -> bool {
        self.unavailable_reason().is_none()
    }

    /// Why this device cannot be used here, or `None` when it can. Never panics, also
    /// on machines with no CUDA driver at all.
    pub fn unavailable_reason(&self) -> Option<String> {
        match self {
            Device::Cpu | Device::Sim => None,
            Device::Cuda(n) => CudaBackend::unavailable_reason(*n),
        }
    }

    /// Waits until every kernel and copy queued on this device has finished, and reports
    /// any error a kernel raised. A no-op on the CPU and the simulator (their launches
    /// complete before they return). Benchmarks call it inside the timed region.
    ///
    /// ```
    /// lorafuse::Device::Cpu.synchronize()?;
    /// # Ok::<(), lorafuse::Error>(())
    /// ```
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu | Device::Sim => Ok(()),
            Device::Cuda(_) => Backend::of(*self)?.synchronize(),
        }
    }
}

/// A kernel launch's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LaunchConfig {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D grid-stride launch over `n` items: `threads` per block, at most `max_blocks`.
    pub(crate) fn grid_stride(n: usize, threads: u32, max_blocks: u32) -> LaunchConfig {
        let blocks = n.div_ceil(threads as usize).clamp(1, max_blocks as usize) as u32;
        LaunchConfig {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
        }
    }
}

/// A device allocation on one of the kernel backends.
#[derive(Debug)]
pub(crate) enum DeviceBuffer {
    /// Simulated device memory (host memory with red zones).
    Sim(SimBuffer),
    /// CUDA device memory.
    Cuda(CudaBuffer),
}

impl DeviceBuffer {
    /// The address kernels see.
    pub(crate) fn device_ptr(&self) -> u64 {
        match self {
            DeviceBuffer::Sim(b) => b.device_ptr(),
            DeviceBuffer::Cuda(b) => b.device_ptr(),
        }
    }

    /// Bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            DeviceBuffer::Sim(b) => b.len(),
            DeviceBuffer::Cuda(b) => b.len(),
        }
    }
}

/// A 2-D tiled tensor map to encode: `dims[0]` elements contiguous, `dims[1]` rows
/// `stride1` bytes apart, from the device address `base`; boxes of `box_dims` elements,
/// `swizzle` bytes (0, 32, 64, 128); elements outside the tensor read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TensorMap2d {
    /// The tensor's first element (16-byte aligned).
    pub base: u64,
    /// Bytes per element.
    pub elem_bytes: u32,
    /// Elements along the contiguous dimension, then rows.
    pub dims: [u64; 2],
    /// Bytes between rows (a multiple of 16, at least a row).
    pub stride1: u64,
    /// The box TMA copies, in elements.
    pub box_dims: [u32; 2],
    /// The shared-memory swizzle span in bytes.
    pub swizzle: u32,
}

/// An encoded tensor map (CUDA's `CUtensorMap`: 128 opaque bytes, 64-byte aligned), a field
/// of a kernel's parameter struct (`lf::TensorMap` in `kernels/common.cuh`).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct TensorMap(pub [u64; 16]);

/// The kernel backend behind a `Sim` or `Cuda` device: allocation, copies and launches,
/// with one code path for both wherever the hardware allows.
#[derive(Clone)]
pub(crate) enum Backend {
    /// The simulator.
    Sim,
    /// A CUDA GPU.
    Cuda(Arc<CudaBackend>),
}

/// Whether fresh device buffers are filled with NaN (0xFF bytes). Always on the
/// simulator; on a GPU in debug builds (tests) or with `LORAFUSE_POISON=1`, since it
/// costs a memset per allocation.
fn poison_cuda() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(debug_assertions) || std::env::var("LORAFUSE_POISON").is_ok_and(|v| v == "1")
    })
}

impl Backend {
    /// The backend of a kernel device; `Cpu` has none.
    pub(crate) fn of(device: Device) -> Result<Backend> {
        match device {
            Device::Sim => Ok(Backend::Sim),
            Device::Cuda(n) => Ok(Backend::Cuda(CudaBackend::get(n)?)),
            Device::Cpu => Err(Error::invalid(
                "the CPU reference backend runs no kernels".to_string(),
            )),
        }
    }

    /// The grid cap for 1-D grid-stride kernels: enough blocks to fill a GPU; few on the
    /// simulator, whose blocks run one after another (the loops make the result the same).
    pub(crate) fn max_blocks(&self) -> u32 {
        match self {
            Backend::Sim => 8,
            Backend::Cuda(_) => 4096,
        }
    }

    /// An uninitialised allocation of `bytes` (poisoned with NaN, see `poison_cuda`).
    pub(crate) fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        match self {
            Backend::Sim => Ok(DeviceBuffer::Sim(SimBuffer::new(bytes)?)),
            Backend::Cuda(c) => {
                let mut b = DeviceBuffer::Cuda(c.alloc(bytes)?);
                if poison_cuda() {
                    self.memset(&mut b, sim::POISON_BYTE)?;
                }
                Ok(b)
            }
        }
    }

    /// Copies `src` into `dst` (equal lengths).
    pub(crate) fn write(&self, src: &[u8], dst: &mut DeviceBuffer) -> Result<()> {
        check_len("upload", src.len(), dst.len())?;
        match (self, dst) {
            (Backend::Sim, DeviceBuffer::Sim(d)) => {
                memory::written_from_host(Device::Sim);
                d.bytes_mut().copy_from_slice(src);
                Ok(())
            }
            (Backend::Cuda(c), DeviceBuffer::Cuda(d)) => {
                memory::written_from_host(Device::Cuda(c.ordinal()));
                c.htod(src, d)
            }
            _ => Err(mixed("upload")),
        }
    }

    /// Copies `src` into host memory `dst` (equal lengths); waits for queued work.
    pub(crate) fn read(&self, src: &DeviceBuffer, dst: &mut [u8]) -> Result<()> {
        check_len("download", src.len(), dst.len())?;
        match (self, src) {
            (Backend::Sim, DeviceBuffer::Sim(s)) => {
                memory::read_to_host(Device::Sim);
                dst.copy_from_slice(s.bytes());
                Ok(())
            }
            (Backend::Cuda(c), DeviceBuffer::Cuda(s)) => {
                memory::read_to_host(Device::Cuda(c.ordinal()));
                c.dtoh(s, dst)
            }
            _ => Err(mixed("download")),
        }
    }

    /// A new allocation holding a copy of `src`.
    pub(crate) fn duplicate(&self, src: &DeviceBuffer) -> Result<DeviceBuffer> {
        let mut dst = self.alloc(src.len())?;
        match (self, src, &mut dst) {
            (Backend::Sim, DeviceBuffer::Sim(s), DeviceBuffer::Sim(d)) => {
                d.bytes_mut().copy_from_slice(s.bytes())
            }
            (Backend::Cuda(c), DeviceBuffer::Cuda(s), DeviceBuffer::Cuda(d)) => c.dtod(s, d)?,
            _ => return Err(mixed("copy")),
        }
        Ok(dst)
    }

    /// Copies `src` into `dst` on the device (equal lengths), e.g. the copy-bandwidth
    /// baseline of the memory-bound kernels' benches.
    pub(crate) fn copy(&self, src: &DeviceBuffer, dst: &mut DeviceBuffer) -> Result<()> {
        check_len("copy", src.len(), dst.len())?;
        match (self, src, dst) {
            (Backend::Sim, DeviceBuffer::Sim(s), DeviceBuffer::Sim(d)) => {
                d.bytes_mut().copy_from_slice(s.bytes());
                Ok(())
            }
            (Backend::Cuda(c), DeviceBuffer::Cuda(s), DeviceBuffer::Cuda(d)) => c.dtod(s, d),
            _ => Err(mixed("copy")),
        }
    }

    /// Waits for every queued kernel and copy (a no-op on the simulator).
    pub(crate) fn synchronize(&self) -> Result<()> {
        match self {
            Backend::Sim => Ok(()),
            Backend::Cuda(c) => c.synchronize(),
        }
    }

    /// Sets every byte of `dst`.
    pub(crate) fn memset(&self, dst: &mut DeviceBuffer, byte: u8) -> Result<()> {
        match (self, dst) {
            (Backend::Sim, DeviceBuffer::Sim(d)) => {
                d.bytes_mut().fill(byte);
                Ok(())
            }
            (Backend::Cuda(c), DeviceBuffer::Cuda(d)) => c.memset(d, byte),
            _ => Err(mixed("memset")),
        }
    }

    /// Lets `kernel` use up to `bytes` of dynamic shared memory per block. Above 48 KiB a
    /// launch needs this first, on CUDA (`cuFuncSetAttribute` with
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`) and on the simulator alike (a
    /// recorded per-kernel maximum); both check it at launch. Idempotent; the maximum only
    /// grows.
    pub(crate) fn opt_in_dynamic_shared(&self, kernel: &str, bytes: u32) -> Result<()> {
        match self {
            Backend::Sim => sim::opt_in_dynamic_shared(kernel, bytes),
            Backend::Cuda(c) => c.opt_in_dynamic_shared(kernel, bytes),
        }
    }

    /// Encodes a 2-D TMA tensor map (`cuTensorMapEncodeTiled` on CUDA; the simulator's
    /// emulation, which checks what the driver checks) for a kernel parameter.
    pub(crate) fn encode_tensor_map(&self, m: &TensorMap2d) -> Result<TensorMap> {
        match self {
            Backend::Sim => sim::tensor_map_2d(
                m.base,
                m.elem_bytes,
                m.dims,
                m.stride1,
                m.box_dims,
                m.swizzle,
            )
            .map(|bytes| TensorMap(bytemuck::cast(bytes))),
            Backend::Cuda(c) => c.encode_tensor_map(m),
        }
    }

    /// The streaming multiprocessors a persistent grid fills: the GPU's count
    /// (`CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`); 2 on the simulator, so that its
    /// persistent blocks each take several tiles in the tests.
    pub(crate) fn multiprocessors(&self) -> u32 {
        match self {
            Backend::Sim => 2,
            Backend::Cuda(c) => c.multiprocessors(),
        }
    }

    /// Whether `kernel` runs from a cubin built for this GPU's architecture-specific target
    /// (`sm_90a` on a compute-capability 9.0 GPU: wgmma, TMA, setmaxnreg), loading its
    /// module if needed. False on the simulator (it has no compute capability; it runs the
    /// Hopper instructions through its own model when a kernel is launched there).
    pub(crate) fn runs_arch_specific_cubin(&self, kernel: &str) -> Result<bool> {
        match self {
            Backend::Sim => Ok(false),
            Backend::Cuda(c) => c.runs_arch_specific_cubin(kernel),
        }
    }

    /// Launches `kernel` with one by-value `#[repr(C)]` parameter struct.
    pub(crate) fn launch<P: bytemuck::Pod>(
        &self,
        kernel: &str,
        cfg: &LaunchConfig,
        params: &P,
    ) -> Result<()> {
        // Only kernels of `kernels/*.cu` are launched (the simulator's own test kernels,
        // `sim_*`, are exempt). The tidy test checks that the ops' `KERNELS` lists
        // (`crate::ops::launched_kernels`) name exactly these, so no launch escapes its
        // checks, without this layer knowing the ops.
        if cfg!(debug_assertions)
            && !kernel.starts_with("sim_")
            && kernels::module_of(kernel).is_none()
        {
            return Err(Error::Kernel {
                kernel: kernel.to_string(),
                msg: "defined by no kernels/*.cu".into(),
            });
        }
        match self {
            Backend::Sim => sim::launch(kernel, cfg, params),
            Backend::Cuda(c) => c.launch(kernel, cfg, params),
        }
    }
}

/// Runs `f` when the process exits normally (C's `atexit`; e.g. after libtest's summary),
/// at most 32 functions in all as C guarantees. False if it could not be registered.
pub(crate) fn at_exit(f: extern "C" fn()) -> bool {
    // SAFETY: these declarations match the C definitions they link to (the same
    // parameter and return types), which is what an `unsafe extern` block asserts.
    unsafe extern "C" {
        fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
    }
    // SAFETY: `atexit` only stores the pointer; `f` is a plain `extern "C" fn` (no
    // captures, 'static), called once by `exit` on the main thread.
    unsafe { atexit(f) == 0 }
}

fn check_len(op: &'static str, src: usize, dst: usize) -> Result<()> {
    if src != dst {
        return Err(Error::shape(op, format!("{src} bytes into {dst}")));
    }
    Ok(())
}

fn mixed(op: &str) -> Error {
    Error::invalid(format!("{op}: buffer belongs to another backend"))
}
