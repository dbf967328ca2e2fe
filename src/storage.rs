//! Per-backend storage of a tensor's elements.

use crate::device::{Backend, DeviceBuffer};
use crate::{DType, Device, Element, Error, Result};
use half::{bf16, f16};

/// Where a tensor's elements live. One variant per kind of memory.
#[derive(Debug)]
#[non_exhaustive]
pub enum Storage {
    /// Host memory, used by the CPU reference backend.
    Cpu(CpuStorage),
    /// Memory of a kernel device: a CUDA GPU or the simulator.
    Device(DeviceStorage),
}

/// Elements in the memory of a kernel device (`Device::Cuda` or `Device::Sim`), in one of
/// the dtypes kernels store: f32, bf16 or f16.
pub struct DeviceStorage {
    buf: DeviceBuffer,
    backend: Backend,
    device: Device,
    dtype: DType,
    len: usize,
}

impl std::fmt::Debug for DeviceStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceStorage({}, {}, {} elements)",
            self.device, self.dtype, self.len
        )
    }
}

impl Storage {
    /// The device this storage lives on.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Device(d) => d.device,
        }
    }

    /// The elements' dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(c) => c.dtype(),
            Storage::Device(d) => d.dtype,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(c) => c.len(),
            Storage::Device(d) => d.len,
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The host storage, or an error naming `op` for other backends.
    pub fn cpu(&self, op: &'static str) -> Result<&CpuStorage> {
        match self {
            Storage::Cpu(c) => Ok(c),
            Storage::Device(d) => Err(no_kernel(op, d.device)),
        }
    }

    /// The host storage, mutably, or an error naming `op` for other backends.
    pub fn cpu_mut(&mut self, op: &'static str) -> Result<&mut CpuStorage> {
        match self {
            Storage::Cpu(c) => Ok(c),
            Storage::Device(d) => Err(no_kernel(op, d.device)),
        }
    }

    /// A copy in new memory on the same device.
    pub fn try_clone(&self) -> Result<Storage> {
        Ok(match self {
            Storage::Cpu(c) => Storage::Cpu(c.clone()),
            Storage::Device(d) => Storage::Device(DeviceStorage {
                buf: d.backend.duplicate(&d.buf)?,
                backend: d.backend.clone(),
                ..*d
            }),
        })
    }

    /// The elements in host memory (a download for device storage).
    pub fn to_host(&self) -> Result<CpuStorage> {
        match self {
            Storage::Cpu(c) => Ok(c.clone()),
            Storage::Device(d) => d.to_host(),
        }
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: Device) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(self.to_host()?)),
            _ => Ok(Storage::Device(DeviceStorage::upload(
                &self.to_host()?,
                device,
            )?)),
        }
    }
}

/// Host storage: one `Vec` per dtype.
#[derive(Debug, Clone)]
pub enum CpuStorage {
    /// f32 elements.
    F32(Vec<f32>),
    /// f64 elements.
    F64(Vec<f64>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
}

/// The error for an op that has no kernel on `device` yet.
pub(crate) fn no_kernel(op: &'static str, device: Device) -> Error {
    Error::Unsupported {
        op,
        msg: format!(
            "no {device} kernel for this op yet; move the tensor with `to_device(&Device::Cpu)`"
        ),
    }
}

impl DeviceStorage {
    fn check_dtype(dtype: DType, device: Device) -> Result<()> {
        if dtype == DType::F64 {
            return Err(Error::Unsupported {
                op: "device storage",
                msg: format!("f64 tensors live on the CPU only, not on {device}"),
            });
        }
        Ok(())
    }

    /// Uninitialised storage (NaN-poisoned on the simulator and in debug builds).
    pub(crate) fn alloc(dtype: DType, len: usize, device: Device) -> Result<DeviceStorage> {
        Self::check_dtype(dtype, device)?;
        let backend = Backend::of(device)?;
        let bytes = len
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| Error::invalid(format!("{len} elements of {dtype} overflow")))?;
        Ok(DeviceStorage {
            buf: backend.alloc(bytes)?,
            backend,
            device,
            dtype,
            len,
        })
    }

    /// Zeros.
    pub(crate) fn zeros(dtype: DType, len: usize, device: Device) -> Result<DeviceStorage> {
        let mut s = Self::alloc(dtype, len, device)?;
        s.backend.memset(&mut s.buf, 0)?;
        Ok(s)
    }

    /// A copy of host elements on `device`.
    pub(crate) fn upload(src: &CpuStorage, device: Device) -> Result<DeviceStorage> {
        let mut s = Self::alloc(src.dtype(), src.len(), device)?;
        s.backend.write(src.as_bytes(), &mut s.buf)?;
        Ok(s)
    }

    /// Overwrites the elements from host elements of the same dtype and length.
    pub(crate) fn write(&mut self, src: &CpuStorage) -> Result<()> {
        if src.dtype() != self.dtype {
            return Err(Error::DType {
                op: "upload",
                lhs: self.dtype,
                rhs: src.dtype(),
            });
        }
        self.backend.write(src.as_bytes(), &mut self.buf)
    }

    /// The elements in host memory.
    pub(crate) fn to_host(&self) -> Result<CpuStorage> {
        let mut c = CpuStorage::zeros(self.dtype, self.len);
        self.backend.read(&self.buf, c.as_bytes_mut())?;
        Ok(c)
    }

    /// The device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backend that owns the memory.
    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Copies these elements into `dst` on the device (same dtype and length).
    pub(crate) fn copy_to(&self, dst: &mut DeviceStorage) -> Result<()> {
        if self.dtype != dst.dtype {
            return Err(Error::DType {
                op: "copy",
                lhs: self.dtype,
                rhs: dst.dtype,
            });
        }
        self.backend.copy(&self.buf, &mut dst.buf)
    }

    /// The address kernels see.
    pub(crate) fn device_ptr(&self) -> u64 {
        self.buf.device_ptr()
    }
}

impl CpuStorage {
    /// The storage's dtype.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Zeros of a dtype.
    pub fn zeros(dtype: DType, n: usize) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(pool::zeroed(n)),
            DType::F64 => CpuStorage::F64(pool::zeroed(n)),
            DType::BF16 => CpuStorage::BF16(pool::zeroed(n)),
            DType::F16 => CpuStorage::F16(pool::zeroed(n)),
        }
    }

    /// Takes a `Vec` of any element type, converting (round to nearest even) to `dtype`.
    /// No copy when the types already agree.
    pub fn from_vec_as<T: Element>(v: Vec<T>, dtype: DType) -> Self {
        if T::DTYPE == dtype {
            return Self::from_vec(v);
        }
        match dtype {
            DType::F32 => CpuStorage::F32(convert(&v)),
            DType::F64 => CpuStorage::F64(convert(&v)),
            DType::BF16 => CpuStorage::BF16(convert(&v)),
            DType::F16 => CpuStorage::F16(convert(&v)),
        }
    }

    /// Wraps a `Vec` without conversion.
    pub fn from_vec<T: Element>(v: Vec<T>) -> Self {
        // The casts below are identity casts: T::DTYPE names T exactly.
        match T::DTYPE {
            DType::F32 => CpuStorage::F32(bytemuck::allocation::cast_vec(v)),
            DType::F64 => CpuStorage::F64(bytemuck::allocation::cast_vec(v)),
            DType::BF16 => CpuStorage::BF16(bytemuck::allocation::cast_vec(v)),
            DType::F16 => CpuStorage::F16(bytemuck::allocation::cast_vec(v)),
        }
    }

    /// The elements as a slice of `T`, when `T` is the storage's own type.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        if T::DTYPE != self.dtype() {
            return None;
        }
        Some(match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F64(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
        })
    }

    /// The elements' bytes (native endianness).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F64(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
        }
    }

    /// The elements' bytes, mutably.
    pub(crate) fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F64(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
        }
    }

    /// The elements as a mutable slice of `T`, when `T` is the storage's own type.
    pub fn as_mut_slice<T: Element>(&mut self) -> Option<&mut [T]> {
        if T::DTYPE != self.dtype() {
            return None;
        }
        Some(match self {
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F64(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
        })
    }

    /// The elements converted to `T` (widening is exact; narrowing rounds to nearest even).
    pub fn to_vec<T: Element>(&self) -> Vec<T> {
        match self {
            CpuStorage::F32(v) => convert(v),
            CpuStorage::F64(v) => convert(v),
            CpuStorage::BF16(v) => convert(v),
            CpuStorage::F16(v) => convert(v),
        }
    }

    /// Overwrites every element from `src`, rounding once to the storage's dtype.
    pub fn assign_from<T: Element>(&mut self, src: &[T]) -> Result<()> {
        if src.len() != self.len() {
            return Err(Error::shape(
                "assign",
                format!("{} elements into {}", src.len(), self.len()),
            ));
        }
        fn go<S: Element, D: Element>(dst: &mut [D], src: &[S]) {
            if S::DTYPE == DType::F64 || D::DTYPE == DType::F64 {
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(d, s)| *d = D::from_f64(s.to_f64()));
            } else {
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(d, s)| *d = D::from_f32(s.to_f32()));
            }
        }
        match self {
            CpuStorage::F32(v) => go(v, src),
            CpuStorage::F64(v) => go(v, src),
            CpuStorage::BF16(v) => go(v, src),
            CpuStorage::F16(v) => go(v, src),
        }
        Ok(())
    }
}

/// Converts element-wise, through f32 unless f64 is involved (exact widening, one rounding).
/// Large buffers convert in parallel (each element independently: deterministic).
pub(crate) fn convert<S: Element, D: Element>(src: &[S]) -> Vec<D> {
    use rayon::prelude::*;
    let wide = S::DTYPE == DType::F64 || D::DTYPE == DType::F64;
    let one = move |s: &S| {
        if wide {
            D::from_f64(s.to_f64())
        } else {
            D::from_f32(s.to_f32())
        }
    };
    if src.len() >= 1 << 16 {
        src.par_iter().map(one).collect()
    } else {
        src.iter().map(one).collect()
    }
}

impl CpuStorage {
    /// The `Vec` inside, when `T` is the storage's own type.
    fn into_vec<T: Element>(self) -> Option<Vec<T>> {
        if T::DTYPE != self.dtype() {
            return None;
        }
        // Identity casts: T::DTYPE names T exactly.
        Some(match self {
            CpuStorage::F32(v) => bytemuck::allocation::cast_vec(v),
            CpuStorage::F64(v) => bytemuck::allocation::cast_vec(v),
            CpuStorage::BF16(v) => bytemuck::allocation::cast_vec(v),
            CpuStorage::F16(v) => bytemuck::allocation::cast_vec(v),
        })
    }
}

/// A pool of host buffers, so a training step reuses the previous step's memory instead
/// of asking the allocator (and the kernel, for large buffers: page faults and zeroing)
/// for it again. Tensors return their buffer when their last handle drops; ops take
/// buffers with `pool::zeroed`/`pool::scratch`. The pool holds at most `LORAFUSE_POOL_BYTES` bytes
/// (default 1 GiB); buffers below 1024 elements are not pooled.
pub mod pool {
    use super::CpuStorage;
    use crate::{DType, Element};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    const MIN_POOLED: usize = 1024;

    #[derive(Default)]
    struct Pool {
        free: HashMap<(DType, usize), Vec<CpuStorage>>,
        bytes: usize,
        stats: PoolStats,
    }

    /// Counters of the pool since the last [`reset_stats`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct PoolStats {
        /// Buffers served from the pool.
        pub hits: u64,
        /// Pooled-size buffers that had to be allocated.
        pub misses: u64,
        /// Bytes held by the pool now.
        pub bytes_held: usize,
    }

    fn pool() -> &'static Mutex<Pool> {
        static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();
        POOL.get_or_init(Default::default)
    }

    fn cap() -> usize {
        static CAP: OnceLock<usize> = OnceLock::new();
        *CAP.get_or_init(|| {
            std::env::var("LORAFUSE_POOL_BYTES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1 << 30)
        })
    }

    fn lock() -> std::sync::MutexGuard<'static, Pool> {
        // The pool holds only plain buffers: a panic elsewhere cannot leave it inconsistent.
        pool().lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `n` zeros, reused from the pool when one of that size is free.
    pub(crate) fn zeroed<T: Element>(n: usize) -> Vec<T> {
        let mut v = scratch::<T>(n);
        v.fill(T::zeroed());
        v
    }

    /// A buffer of `n` elements whose contents are unspecified (zeros or a previous
    /// step's values — always initialised memory), for outputs the caller overwrites
    /// completely: it skips the zero fill of [`zeroed`].
    pub(crate) fn scratch<T: Element>(n: usize) -> Vec<T> {
        if n >= MIN_POOLED {
            let reused = {
                let mut p = lock();
                let hit = p.free.get_mut(&(T::DTYPE, n)).and_then(Vec::pop);
                match &hit {
                    Some(_) => {
                        p.bytes -= n * T::DTYPE.size_in_bytes();
                        p.stats.hits += 1;
                    }
                    None => p.stats.misses += 1,
                }
                hit
            };
            if let Some(v) = reused.and_then(CpuStorage::into_vec::<T>) {
                return poisoned(v);
            }
        }
        poisoned(vec![T::zeroed(); n])
    }

    /// In debug builds (tests included) scratch buffers are filled with NaN (all bits
    /// set), so an output element a kernel forgets to write fails every comparison
    /// (DESIGN §6's poisoned outputs).
    fn poisoned<T: Element>(mut v: Vec<T>) -> Vec<T> {
        if cfg!(debug_assertions) {
            bytemuck::cast_slice_mut::<T, u8>(&mut v).fill(0xFF);
        }
        v
    }

    /// Returns a scratch buffer that never became a tensor's storage.
    pub(crate) fn recycle<T: Element>(v: Vec<T>) {
        give(CpuStorage::from_vec(v));
    }

    /// Returns a buffer to the pool (dropped instead when the pool is full or it is small).
    pub(crate) fn give(s: CpuStorage) {
        let n = s.len();
        let bytes = n * s.dtype().size_in_bytes();
        if n < MIN_POOLED {
            return;
        }
        let mut p = lock();
        if p.bytes + bytes > cap() {
            return;
        }
        p.bytes += bytes;
        p.free.entry((s.dtype(), n)).or_default().push(s);
    }

    /// The pool's counters.
    pub fn stats() -> PoolStats {
        let p = lock();
        PoolStats {
            bytes_held: p.bytes,
            ..p.stats
        }
    }

    /// Resets the hit/miss counters.
    pub fn reset_stats() {
        lock().stats = PoolStats::default();
    }

    /// Gives every held buffer back to the allocator (e.g. before measuring a step's peak
    /// host memory, so that buffers kept from earlier work neither hide nor inflate it).
    pub fn release() {
        let mut p = lock();
        p.free.clear();
        p.bytes = 0;
    }
}
