//! Tensors: an immutable handle to shaped, typed storage on a device, optionally
//! recorded on an autograd [`Tape`].

use crate::storage::{CpuStorage, DeviceStorage, Storage};
use crate::tape::Tape;
use crate::{DType, Device, Element, Error, Real, Result, Shape};
use rand::Rng;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A unique tensor identity: gradients are keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

struct Inner {
    id: TensorId,
    shape: Shape,
    dtype: DType,
    device: Device,
    storage: Arc<RwLock<Storage>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle to a host buffer gives it back to the pool for the next step.
        if let Some(lock) = Arc::get_mut(&mut self.storage) {
            let storage = std::mem::replace(
                lock.get_mut().unwrap_or_else(|e| e.into_inner()),
                Storage::Cpu(CpuStorage::F32(Vec::new())),
            );
            if let Storage::Cpu(c) = storage {
                crate::storage::pool::give(c);
            }
        }
    }
}

/// A tensor: contiguous row-major elements of one [`DType`] on one [`Device`].
///
/// Cloning is cheap (reference counted). A tensor is *tracked* when it carries a
/// [`Tape`]: ops on tracked tensors record their backward on that tape; ops on untracked
/// tensors record nothing, so inference and frozen weights cost no gradient work.
///
/// ```
/// use lorafuse::{Device, Tensor, Tape, ops};
/// let tape = Tape::new();
/// let x = Tensor::from_vec(vec![1.0f32, -2.0, 3.0], [3], &Device::Cpu)?.track(&tape);
/// let y = ops::gelu(&x)?;
/// let grads = tape.backward_with(&y, Tensor::ones_like(&y)?)?;
/// assert_eq!(grads.get(&x).unwrap().dims(), &[3]);
/// # Ok::<(), lorafuse::Error>(())
/// ```
#[derive(Clone)]
pub struct Tensor {
    inner: Arc<Inner>,
    tape: Option<Tape>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {}, {}{})",
            self.inner.id,
            self.inner.shape,
            self.inner.dtype,
            self.inner.device,
            if self.tape.is_some() { ", tracked" } else { "" }
        )
    }
}

/// Read access to a tensor's host elements as the compute type `T`: borrowed when the
/// storage already holds `T`, converted once otherwise.
pub(crate) struct CpuRead<'a, T> {
    guard: RwLockReadGuard<'a, Storage>,
    converted: Option<Vec<T>>,
}

impl<T: Element> Deref for CpuRead<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.converted {
            Some(v) => v,
            None => match &*self.guard {
                Storage::Cpu(c) => c
                    .as_slice::<T>()
                    .expect("CpuRead::converted is None only when the dtypes agree"),
                Storage::Device(_) => unreachable!("cpu_read refuses device storage"),
            },
        }
    }
}

impl Tensor {
    fn new(storage: Storage, shape: Shape, dtype: DType) -> Tensor {
        let device = storage.device();
        Tensor {
            inner: Arc::new(Inner {
                id: TensorId::fresh(),
                shape,
                dtype,
                device,
                storage: Arc::new(RwLock::new(storage)),
            }),
            tape: None,
        }
    }

    pub(crate) fn from_storage(storage: Storage, shape: Shape) -> Result<Tensor> {
        let (n, dtype) = (storage.len(), storage.dtype());
        if n != shape.elem_count() {
            return Err(Error::shape(
                "tensor",
                format!("{n} elements for shape {shape}"),
            ));
        }
        Ok(Tensor::new(storage, shape, dtype))
    }

    /// Host elements placed on `device` (uploaded for a kernel device).
    fn place(c: CpuStorage, device: &Device) -> Result<Storage> {
        Ok(match device {
            Device::Cpu => Storage::Cpu(c),
            d => Storage::Device(DeviceStorage::upload(&c, *d)?),
        })
    }

    /// A tensor from a `Vec` of elements; the dtype is the element type's.
    pub fn from_vec<T: Element>(
        data: Vec<T>,
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Tensor> {
        Self::from_storage(
            Self::place(CpuStorage::from_vec(data), device)?,
            shape.into(),
        )
    }

    /// A tensor of `dtype` from elements of any type, rounded once (nearest even).
    pub fn from_vec_as<T: Element>(
        data: Vec<T>,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        Self::from_storage(
            Self::place(CpuStorage::from_vec_as(data, dtype), device)?,
            shape.into(),
        )
    }

    /// A tensor filled with zeros.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(dtype, n)),
            d => Storage::Device(DeviceStorage::zeros(dtype, n, *d)?),
        };
        Ok(Tensor::new(storage, shape, dtype))
    }

    /// A tensor filled with one value.
    pub fn full(
        value: f64,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = Self::zeros(shape, dtype, &Device::Cpu)?;
        match t.storage_mut().cpu_mut("full")? {
            CpuStorage::F32(v) => v.fill(value as f32),
            CpuStorage::F64(v) => v.fill(value),
            CpuStorage::BF16(v) => v.fill(Element::from_f64(value)),
            CpuStorage::F16(v) => v.fill(Element::from_f64(value)),
        }
        t.to_device(device)
    }

    /// Ones with the shape, dtype and device of `t` (untracked).
    pub fn ones_like(t: &Tensor) -> Result<Tensor> {
        Self::full(1.0, t.shape().clone(), t.dtype(), &t.device())
    }

    /// Zeros with the shape, dtype and device of `t` (untracked).
    pub fn zeros_like(t: &Tensor) -> Result<Tensor> {
        Self::zeros(t.shape().clone(), t.dtype(), &t.device())
    }

    /// Uniform samples in `[lo, hi)`, drawn in f64 and rounded once to `dtype`.
    pub fn rand_uniform(
        lo: f64,
        hi: f64,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> Result<Tensor> {
        if !lo.is_finite() || !hi.is_finite() || lo >= hi {
            return Err(Error::invalid(format!(
                "rand_uniform: bad range [{lo}, {hi})"
            )));
        }
        let shape = shape.into();
        let v: Vec<f64> = (0..shape.elem_count())
            .map(|_| rng.random_range(lo..hi))
            .collect();
        Self::from_vec_as(v, shape, dtype, device)
    }

    /// Normal samples with mean 0 and standard deviation `std` (Box–Muller in f64).
    pub fn randn(
        std: f64,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> Result<Tensor> {
        if !std.is_finite() || std < 0.0 {
            return Err(Error::invalid(format!("randn: bad std {std}")));
        }
        let shape = shape.into();
        let n = shape.elem_count();
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let t = std::f64::consts::TAU * u2;
            v.push(r * t.cos());
            v.push(r * t.sin());
        }
        v.truncate(n);
        Self::from_vec_as(v, shape, dtype, device)
    }

    /// This tensor's identity (gradients are keyed by it).
    pub fn id(&self) -> TensorId {
        self.inner.id
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.inner.shape
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.inner.shape.dims()
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.inner.shape.elem_count()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    /// The device.
    pub fn device(&self) -> Device {
        self.inner.device
    }

    /// True when this tensor is recorded on a tape (it, or something it was computed from,
    /// needs a gradient).
    pub fn requires_grad(&self) -> bool {
        self.tape.is_some()
    }

    /// The tape this tensor is recorded on, if any.
    pub fn tape(&self) -> Option<&Tape> {
        self.tape.as_ref()
    }

    /// The same tensor (same id and storage) recorded on `tape`: a leaf that gets a gradient.
    pub fn track(&self, tape: &Tape) -> Tensor {
        Tensor {
            inner: self.inner.clone(),
            tape: Some(tape.clone()),
        }
    }

    /// The same tensor (same id and storage) with no tape: no gradient flows through it.
    pub fn detach(&self) -> Tensor {
        Tensor {
            inner: self.inner.clone(),
            tape: None,
        }
    }

    pub(crate) fn with_tape(mut self, tape: Option<Tape>) -> Tensor {
        self.tape = tape;
        self
    }

    /// A new tensor sharing this one's storage under another shape of the same element
    /// count (a fresh id, untracked; [`crate::ops::reshape`] is the tracked version).
    pub(crate) fn view_as(&self, shape: Shape) -> Result<Tensor> {
        if shape.elem_count() != self.elem_count() {
            return Err(Error::shape(
                "reshape",
                format!("{} to {shape}", self.shape()),
            ));
        }
        Ok(Tensor {
            inner: Arc::new(Inner {
                id: TensorId::fresh(),
                shape,
                dtype: self.inner.dtype,
                device: self.inner.device,
                storage: self.inner.storage.clone(),
            }),
            tape: None,
        })
    }

    /// True when this handle is the only way to reach the storage (no clone, view or
    /// detached copy shares it): an op that consumes the tensor may then write over it.
    pub(crate) fn is_unique(&self) -> bool {
        Arc::strong_count(&self.inner) == 1 && Arc::strong_count(&self.inner.storage) == 1
    }

    /// True when both handles share one storage buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.inner.storage, &other.inner.storage)
    }

    /// Read access to the storage.
    pub fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        // A poisoned lock only means another thread panicked mid-write; the data is
        // still a valid buffer of floats, so we keep going rather than propagate a panic.
        self.inner.storage.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Write access to the storage (in-place updates: optimizer steps, merges).
    pub fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.inner
            .storage
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The host elements as compute type `T` (borrowed if the dtype is `T`).
    pub(crate) fn cpu_read<T: Element>(&self, op: &'static str) -> Result<CpuRead<'_, T>> {
        let guard = self.storage();
        let converted = {
            let c = guard.cpu(op)?;
            if c.dtype() == T::DTYPE {
                None
            } else {
                Some(c.to_vec::<T>())
            }
        };
        Ok(CpuRead { guard, converted })
    }

    /// A CPU tensor of `dtype` built from compute-type values, rounded once.
    pub(crate) fn from_cpu_values<T: Real>(
        v: Vec<T>,
        shape: impl Into<Shape>,
        dtype: DType,
    ) -> Result<Tensor> {
        Self::from_storage(
            Storage::Cpu(CpuStorage::from_vec_as(v, dtype)),
            shape.into(),
        )
    }

    /// Copies the elements out, converted to `T` (a download for a kernel device).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        match &*self.storage() {
            Storage::Cpu(c) => Ok(c.to_vec()),
            s => Ok(s.to_host()?.to_vec()),
        }
    }

    /// Gives every host buffer the CPU's pool holds back to the allocator (e.g. before
    /// measuring a step's peak host memory: pooled buffers from earlier work would serve
    /// the step without raising the peak). Live tensors are not touched.
    pub fn release_host_pool() {
        crate::storage::pool::release();
    }

    /// A copy on `device` (untracked); the same handle when it is already there.
    ///
    /// ```
    /// use lorafuse::{Device, Tensor};
    /// let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], [3], &Device::Cpu)?;
    /// let on_sim = x.to_device(&Device::Sim)?; // the CUDA-kernel simulator
    /// assert_eq!(on_sim.to_vec::<f32>()?, vec![1.0, 2.0, 3.0]);
    /// # Ok::<(), lorafuse::Error>(())
    /// ```
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device() == *device {
            return Ok(self.detach());
        }
        let s = self.storage().to_device(*device)?;
        Tensor::from_storage(s, self.shape().clone())
    }

    /// Copies the elements out as f32.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.to_vec()
    }

    /// Copies the elements out as f64 (exact).
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        self.to_vec()
    }

    /// The value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f64> {
        if self.elem_count() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("{} is not one element", self.shape()),
            ));
        }
        Ok(self.to_vec_f64()?[0])
    }

    /// A deep copy with a fresh id and its own storage (untracked).
    pub fn deep_clone(&self) -> Result<Tensor> {
        let s = self.storage().try_clone()?;
        Tensor::from_storage(s, self.shape().clone())
    }

    /// A copy converted to `dtype` (untracked; [`crate::ops::cast`] records a backward).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if self.device() != Device::Cpu {
            return crate::ops::elementwise::cuda::cast(self, dtype);
        }
        let v = self.to_vec_f64()?;
        Tensor::from_vec_as(v, self.shape().clone(), dtype, &self.device())
    }

    /// Copies `src`'s values into this tensor's storage, in place (same shape, dtype and
    /// device; a device-to-device copy on a GPU, queued on its stream). Every handle of
    /// this tensor sees the new values. The memory-bound kernels' benchmarks use it as the
    /// copy-bandwidth baseline.
    ///
    /// ```
    /// use lorafuse::{Device, Tensor};
    /// let a = Tensor::from_vec(vec![1.0f32, 2.0], [2], &Device::Cpu)?;
    /// let b = Tensor::zeros([2], a.dtype(), &Device::Cpu)?;
    /// b.copy_from(&a)?;
    /// assert_eq!(b.to_vec::<f32>()?, [1.0, 2.0]);
    /// # Ok::<(), lorafuse::Error>(())
    /// ```
    pub fn copy_from(&self, src: &Tensor) -> Result<()> {
        const OP: &str = "copy_from";
        Error::check_same_shape(OP, self.shape(), src.shape())?;
        same_dtype(OP, &[self, src])?;
        same_device(OP, &[self, src])?;
        if self.same_storage(src) {
            return Ok(());
        }
        let from = src.storage();
        let mut to = self.storage_mut();
        match (&*from, &mut *to) {
            (Storage::Cpu(s), Storage::Cpu(d)) => d.as_bytes_mut().copy_from_slice(s.as_bytes()),
            (Storage::Device(s), Storage::Device(d)) => s.copy_to(d)?,
            _ => return Err(Error::invalid(format!("{OP}: a CPU and a device tensor"))),
        }
        Ok(())
    }

    /// Overwrites the elements from `src` (rounded once to this dtype), in place.
    pub fn assign<T: Element>(&self, src: &[T]) -> Result<()> {
        match &mut *self.storage_mut() {
            Storage::Cpu(c) => c.assign_from(src),
            Storage::Device(d) => {
                let mut c = CpuStorage::zeros(d.dtype(), d.len());
                c.assign_from(src)?;
                d.write(&c)
            }
        }
    }
}

/// Checks that all tensors share one dtype and returns it.
pub(crate) fn same_dtype(op: &'static str, ts: &[&Tensor]) -> Result<DType> {
    let d = ts[0].dtype();
    for t in &ts[1..] {
        if t.dtype() != d {
            return Err(Error::DType {
                op,
                lhs: d,
                rhs: t.dtype(),
            });
        }
    }
    Ok(d)
}

/// Checks that all tensors share one device and returns it.
pub(crate) fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts[0].device();
    for t in &ts[1..] {
        if t.device() != d {
            return Err(Error::Device {
                op,
                lhs: d,
                rhs: t.device(),
            });
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_from_copies_in_place_and_checks_its_operands() {
        for device in [Device::Cpu, Device::Sim] {
            let a = Tensor::from_vec(vec![1.5f32, -2.0, 3.25], [3], &device).unwrap();
            let b = Tensor::zeros([3], DType::F32, &device).unwrap();
            let alias = b.clone();
            b.copy_from(&a).unwrap();
            assert_eq!(alias.to_vec::<f32>().unwrap(), [1.5, -2.0, 3.25]);
            let wrong_shape = Tensor::zeros([2], DType::F32, &device).unwrap();
            assert!(wrong_shape.copy_from(&a).is_err());
            let wrong_dtype = Tensor::zeros([3], DType::BF16, &device).unwrap();
            assert!(wrong_dtype.copy_from(&a).is_err());
        }
        let cpu = Tensor::zeros([3], DType::F32, &Device::Cpu).unwrap();
        let sim = Tensor::zeros([3], DType::F32, &Device::Sim).unwrap();
        assert!(cpu.copy_from(&sim).is_err());
    }

    /// `full` rounds its f64 value once, like every other constructor: 0x3f1c8001 lies just
    /// above a bf16 tie, so nearest even is 0x3f1d (half 2.x's `bf16::from_f64` gives 0x3f1c).
    #[test]
    fn full_rounds_once_to_nearest_even() {
        let v = f32::from_bits(0x3f1c_8001) as f64;
        for device in [Device::Cpu, Device::Sim] {
            let t = Tensor::full(v, [3], DType::BF16, &device).unwrap();
            let want = Tensor::from_vec_as(vec![v; 3], [3], DType::BF16, &device).unwrap();
            assert_eq!(
                t.to_vec::<half::bf16>().unwrap(),
                want.to_vec::<half::bf16>().unwrap()
            );
            assert_eq!(
                t.to_vec::<half::bf16>().unwrap()[0].to_bits(),
                0x3f1d,
                "on {device}"
            );
        }
    }
}
