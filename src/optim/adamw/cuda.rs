//! The device side of [`AdamW`](super::AdamW): state on a `Sim` or `Cuda` device and the
//! launchers of `kernels/adamw.cu` (one code path for the GPU and the simulator).
//!
//! A step queues three launches and no host round trip: `adamw_norm_fwd_f32` (per-chunk
//! partial sums of squares and inf/NaN flags), `adamw_finish_fwd_f32` (one block: the
//! global norm in a fixed order, `found_inf`, the clip coefficient, the step count and the
//! step constants, into the device-resident [`StepState`]) and `adamw_apply_fwd_f32`
//! (every tensor in one launch; it returns without writing anything when `found_inf` is
//! set). The host reads the step state back only when it wants the report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{AdamWConfig, StepOptions, StepReport};
use crate::device::{Backend, DeviceBuffer, LaunchConfig};
use crate::optim::Rounding;
use crate::storage::{CpuStorage, DeviceStorage, Storage};
use crate::{DType, Device, Error, Result, Tensor};

const OP: &str = "adamw";

/// Every kernel of `kernels/adamw.cu` (checked against the compiled modules by the tidy
/// test).
pub(crate) const KERNELS: &[&str] = &[
    "adamw_norm_fwd_f32",
    "adamw_finish_fwd_f32",
    "adamw_apply_fwd_f32",
];

/// Threads per block of the three kernels (the header's launch geometry).
pub(crate) const THREADS: u32 = 256;

/// Elements per chunk (one block's unit of work) on a GPU.
const CHUNK_CUDA: usize = 16384;
/// Elements per chunk on the simulator: small, so that the tests' tensors span several.
const CHUNK_SIM: usize = 1024;

/// Twin of `AdamWTensor` in `kernels/adamw.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct TensorDesc {
    pub param: u64,
    pub m: u64,
    pub v: u64,
    pub master: u64,
    pub n: u64,
    pub param_dtype: u32,
    pub param_index: u32,
}

/// Twin of `AdamWGrad`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GradSlot {
    pub ptr: u64,
    pub dtype: u32,
    pub pad: u32,
}

/// Twin of `AdamWChunk`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ChunkDesc {
    pub tensor: u32,
    pub chunk: u32,
}

/// Twin of `AdamWPartial`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Partial {
    pub sumsq: f64,
    pub nonfinite: u32,
    pub pad: u32,
}

/// Twin of `AdamWStepState`: the device-resident step state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct StepState {
    /// Applied (not skipped) steps.
    pub step: u64,
    /// The stochastic-rounding key of the last applied step.
    pub key: u64,
    pub grad_norm: f64,
    pub clip_coef: f64,
    pub found_inf: u32,
    pub pad: u32,
    /// `StepConstants<f32>` of the last applied step, in declaration order, and a pad.
    pub consts: [f32; 10],
}

/// Twin of `AdamWNormParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct NormParams {
    pub tensors: u64,
    pub grads: u64,
    pub chunks: u64,
    pub partials: u64,
    pub num_chunks: u64,
    pub chunk_elems: u64,
    pub grad_scale_inv: f64,
    pub loss_scale: u64,
}

/// Twin of `AdamWLossScale`: dynamic loss scaling kept on the device (see
/// [`DeviceLossScaler`](crate::optim::DeviceLossScaler)).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LossScaleState {
    pub scale: f64,
    pub overflows: u64,
    pub clean_steps: u32,
    pub growth_interval: u32,
}

/// Twin of `AdamWFinishParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct FinishParams {
    pub partials: u64,
    pub state: u64,
    pub num_chunks: u64,
    pub seed: u64,
    pub grad_scale_inv: f64,
    pub max_grad_norm: f64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub loss_scale: u64,
    pub next_seed: u64,
}

/// Twin of `AdamWApplyParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ApplyParams {
    pub tensors: u64,
    pub grads: u64,
    pub chunks: u64,
    pub state: u64,
    pub num_chunks: u64,
    pub chunk_elems: u64,
    pub stochastic: u32,
    pub pad: u32,
}

/// The kernels' dtype code of a storage dtype.
fn dtype_code(dtype: DType) -> Result<u32> {
    match dtype {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        DType::F64 => Err(Error::unsupported(OP, "f64 tensors have no device kernels")),
    }
}

/// The device storage of a tensor.
fn dev<'a>(s: &'a Storage, what: &str) -> Result<&'a DeviceStorage> {
    match s {
        Storage::Device(d) => Ok(d),
        Storage::Cpu(_) => Err(Error::invalid(format!(
            "adamw: {what} is a CPU tensor, the optimizer's state is on a device"
        ))),
    }
}

/// An uploaded copy of `items`, at least one element long (no zero-byte buffers).
fn upload<T: bytemuck::Pod + Default>(backend: &Backend, items: &[T]) -> Result<DeviceBuffer> {
    let mut v = items.to_vec();
    if v.is_empty() {
        v.push(T::default());
    }
    let bytes: &[u8] = bytemuck::cast_slice(&v);
    let mut buf = backend.alloc(bytes.len())?;
    backend.write(bytes, &mut buf)?;
    Ok(buf)
}

/// The host copy of one tensor's state: m, v and the master weights (bf16/f16 only).
pub(crate) type HostState = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// The state of one parameter on the device.
pub(crate) struct TensorState {
    pub m: DeviceStorage,
    pub v: DeviceStorage,
    pub master: Option<DeviceStorage>,
}

/// AdamW's state on a kernel device: moments, master weights, the descriptor, gradient
/// and chunk tables, the per-chunk partials and the step state.
pub(crate) struct DeviceState {
    backend: Backend,
    device: Device,
    pub(crate) tensors: Vec<TensorState>,
    descs: Vec<TensorDesc>,
    descs_buf: DeviceBuffer,
    slots: Vec<GradSlot>,
    slots_buf: DeviceBuffer,
    chunks_buf: DeviceBuffer,
    num_chunks: usize,
    chunk_elems: usize,
    partials_buf: DeviceBuffer,
    state_buf: DeviceBuffer,
    /// The step count as of the last read of the step state.
    known_step: AtomicU64,
    /// Set when steps were queued since the last read (the count must be read back).
    stale: AtomicBool,
}

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceState({}, {} tensors, {} chunks of {})",
            self.device,
            self.tensors.len(),
            self.num_chunks,
            self.chunk_elems
        )
    }
}

impl DeviceState {
    /// Allocates the state of `params` (all on `device`, checked by the caller): zero
    /// moments, master copies of the bf16/f16 parameters, the tables and the step state.
    pub(crate) fn new(params: &[Tensor], device: Device) -> Result<DeviceState> {
        let backend = Backend::of(device)?;
        let chunk_elems = match backend {
            Backend::Sim => CHUNK_SIM,
            Backend::Cuda(_) => CHUNK_CUDA,
        };
        let mut tensors = Vec::with_capacity(params.len());
        let mut descs = Vec::with_capacity(params.len());
        let mut chunks = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let n = p.elem_count();
            let master = if p.dtype().is_half() {
                let w = p.to_vec::<f32>()?;
                Some(DeviceStorage::upload(&CpuStorage::F32(w), device)?)
            } else {
                None
            };
            let ts = TensorState {
                m: DeviceStorage::zeros(DType::F32, n, device)?,
                v: DeviceStorage::zeros(DType::F32, n, device)?,
                master,
            };
            let guard = p.storage();
            let pd = dev(&guard, "a parameter")?;
            descs.push(TensorDesc {
                param: pd.device_ptr(),
                m: ts.m.device_ptr(),
                v: ts.v.device_ptr(),
                master: ts.master.as_ref().map_or(0, DeviceStorage::device_ptr),
                n: n as u64,
                param_dtype: dtype_code(p.dtype())?,
                param_index: u32::try_from(i)
                    .map_err(|_| Error::invalid("adamw: more than 2^32 parameters"))?,
            });
            let nchunks = n.div_ceil(chunk_elems);
            let nchunks = u32::try_from(nchunks).map_err(|_| {
                Error::invalid(format!("adamw: parameter {i} has too many elements ({n})"))
            })?;
            chunks.extend((0..nchunks).map(|c| ChunkDesc {
                tensor: i as u32,
                chunk: c,
            }));
            tensors.push(ts);
        }
        let slots = vec![GradSlot::default(); params.len()];
        let partials = vec![Partial::default(); chunks.len()];
        Ok(DeviceState {
            descs_buf: upload(&backend, &descs)?,
            slots_buf: upload(&backend, &slots)?,
            chunks_buf: upload(&backend, &chunks)?,
            partials_buf: upload(&backend, &partials)?,
            state_buf: upload(&backend, &[StepState::default()])?,
            num_chunks: chunks.len(),
            chunk_elems,
            tensors,
            descs,
            slots,
            backend,
            device,
            known_step: AtomicU64::new(0),
            stale: AtomicBool::new(false),
        })
    }

    /// The device.
    pub(crate) fn device(&self) -> Device {
        self.device
    }

    /// Queues one step: `work` holds (parameter index, gradient) pairs, already checked
    /// for shape and dtype by the caller. Uploads the gradient pointers when they changed
    /// (and the descriptors when a parameter's storage moved), then launches norm →
    /// finish → apply. Nothing is read back. With `loss_scale` (the device addresses of a
    /// [`LossScaleState`] and its f32 seed, on this device), `1/S` replaces
    /// `opts.grad_scale_inv` and finish updates the scale.
    pub(crate) fn queue_step(
        &mut self,
        params: &[Tensor],
        work: &[(usize, Tensor)],
        lr: f64,
        opts: StepOptions,
        cfg: &AdamWConfig,
        loss_scale: Option<(u64, u64)>,
    ) -> Result<()> {
        let (ls_state, ls_seed) = loss_scale.unwrap_or((0, 0));
        // Hold read guards on every parameter and gradient until the launches are queued
        // (on the simulator, until they ran).
        let pguards: Vec<_> = params.iter().map(|p| p.storage()).collect();
        let gguards: Vec<_> = work.iter().map(|(_, g)| g.storage()).collect();
        let mut descs = self.descs.clone();
        for (d, g) in descs.iter_mut().zip(&pguards) {
            let s = dev(g, "a parameter")?;
            if s.device() != self.device {
                return Err(Error::Device {
                    op: OP,
                    lhs: self.device,
                    rhs: s.device(),
                });
            }
            d.param = s.device_ptr();
        }
        let mut slots = vec![GradSlot::default(); params.len()];
        for ((i, _), g) in work.iter().zip(&gguards) {
            let s = dev(g, "a gradient")?;
            if s.device() != self.device {
                return Err(Error::Device {
                    op: OP,
                    lhs: self.device,
                    rhs: s.device(),
                });
            }
            slots[*i] = GradSlot {
                ptr: s.device_ptr(),
                dtype: dtype_code(s.dtype())?,
                pad: 0,
            };
        }
        if descs != self.descs {
            self.backend
                .write(bytemuck::cast_slice(&descs), &mut self.descs_buf)?;
            self.descs = descs;
        }
        if slots != self.slots {
            self.backend
                .write(bytemuck::cast_slice(&slots), &mut self.slots_buf)?;
            self.slots = slots;
        }
        self.stale.store(true, Ordering::Release);
        let b = &self.backend;
        let grid = LaunchConfig::grid_stride(self.num_chunks, 1, b.max_blocks());
        let grid = LaunchConfig {
            block: [THREADS, 1, 1],
            ..grid
        };
        let one = LaunchConfig {
            grid: [1, 1, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        };
        b.launch(
            "adamw_norm_fwd_f32",
            &grid,
            &NormParams {
                tensors: self.descs_buf.device_ptr(),
                grads: self.slots_buf.device_ptr(),
                chunks: self.chunks_buf.device_ptr(),
                partials: self.partials_buf.device_ptr(),
                num_chunks: self.num_chunks as u64,
                chunk_elems: self.chunk_elems as u64,
                grad_scale_inv: opts.grad_scale_inv,
                loss_scale: ls_state,
            },
        )?;
        b.launch(
            "adamw_finish_fwd_f32",
            &one,
            &FinishParams {
                partials: self.partials_buf.device_ptr(),
                state: self.state_buf.device_ptr(),
                num_chunks: self.num_chunks as u64,
                seed: match cfg.rounding {
                    Rounding::NearestEven => 0,
                    Rounding::Stochastic { seed } => seed,
                },
                grad_scale_inv: opts.grad_scale_inv,
                max_grad_norm: opts.max_grad_norm.unwrap_or(0.0),
                lr,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
                loss_scale: ls_state,
                next_seed: ls_seed,
            },
        )?;
        b.launch(
            "adamw_apply_fwd_f32",
            &grid,
            &ApplyParams {
                tensors: self.descs_buf.device_ptr(),
                grads: self.slots_buf.device_ptr(),
                chunks: self.chunks_buf.device_ptr(),
                state: self.state_buf.device_ptr(),
                num_chunks: self.num_chunks as u64,
                chunk_elems: self.chunk_elems as u64,
                stochastic: matches!(cfg.rounding, Rounding::Stochastic { .. }) as u32,
                pad: 0,
            },
        )?;
        drop(gguards);
        drop(pguards);
        Ok(())
    }

    /// Reads the step state back: waits for every queued launch (the one sync of
    /// [`AdamW::step`](super::AdamW::step) on a device).
    pub(crate) fn read_report(&self) -> Result<StepReport> {
        let s = read_state(&self.backend, &self.state_buf)?;
        self.known_step.store(s.step, Ordering::Release);
        self.stale.store(false, Ordering::Release);
        Ok(report_of(&s))
    }

    /// A copy of the step state as it will be after the queued launches, queued on the
    /// device (nothing waits).
    pub(crate) fn snapshot(&self) -> Result<PendingDevice> {
        Ok(PendingDevice {
            buf: self.backend.duplicate(&self.state_buf)?,
            backend: self.backend.clone(),
        })
    }

    /// The applied step count (reads the step state back when steps were queued since
    /// the last read).
    pub(crate) fn step_count(&self) -> Result<u64> {
        if self.stale.load(Ordering::Acquire) {
            self.read_report()?;
        }
        Ok(self.known_step.load(Ordering::Acquire))
    }

    /// The step count as of the last read of the step state.
    pub(crate) fn last_known_step(&self) -> u64 {
        self.known_step.load(Ordering::Acquire)
    }

    /// The state of tensor `i` in host memory (m, v, master).
    pub(crate) fn to_host(&self, i: usize) -> Result<HostState> {
        let t = &self.tensors[i];
        let f = |s: &DeviceStorage| -> Result<Vec<f32>> {
            match s.to_host()? {
                CpuStorage::F32(v) => Ok(v),
                other => Err(Error::DType {
                    op: OP,
                    lhs: DType::F32,
                    rhs: other.dtype(),
                }),
            }
        };
        Ok((f(&t.m)?, f(&t.v)?, t.master.as_ref().map(f).transpose()?))
    }

    /// Overwrites the step count and every tensor's m, v and master with `states` (one
    /// per tensor, checked by the caller to fit: f32, each tensor's length, a master
    /// exactly where the tensor has one). The rest of the step state is rewritten by the
    /// next step's finish kernel before anything reads it.
    pub(crate) fn load(&mut self, step: u64, states: &[super::ParamStateOwned]) -> Result<()> {
        for (t, s) in self.tensors.iter_mut().zip(states) {
            let super::ParamStateOwned::F32 { m, v, master } = s else {
                return Err(Error::invalid("adamw: f64 state on a device"));
            };
            t.m.write(&CpuStorage::F32(m.clone()))?;
            t.v.write(&CpuStorage::F32(v.clone()))?;
            match (&mut t.master, master) {
                (Some(d), Some(h)) => d.write(&CpuStorage::F32(h.clone()))?,
                (None, None) => {}
                _ => return Err(Error::invalid("adamw: master weights do not fit")),
            }
        }
        let s = StepState {
            step,
            ..Default::default()
        };
        self.backend
            .write(bytemuck::bytes_of(&s), &mut self.state_buf)?;
        self.known_step.store(step, Ordering::Release);
        self.stale.store(false, Ordering::Release);
        Ok(())
    }

    /// Bytes of m, v and master.
    pub(crate) fn state_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| 4 * (t.m.len() + t.v.len() + t.master.as_ref().map_or(0, DeviceStorage::len)))
            .sum()
    }
}

fn read_state(backend: &Backend, buf: &DeviceBuffer) -> Result<StepState> {
    let mut s = StepState::default();
    backend.read(buf, bytemuck::bytes_of_mut(&mut s))?;
    Ok(s)
}

fn report_of(s: &StepState) -> StepReport {
    StepReport {
        grad_norm: s.grad_norm,
        skipped: s.found_inf != 0,
        clip_coef: s.clip_coef,
    }
}

/// A step state copied on the device, read by [`PendingStepReport::wait`](super::PendingStepReport::wait).
pub(crate) struct PendingDevice {
    backend: Backend,
    buf: DeviceBuffer,
}

impl PendingDevice {
    /// Waits for the step and reads its report.
    pub(crate) fn wait(&self) -> Result<StepReport> {
        Ok(report_of(&read_state(&self.backend, &self.buf)?))
    }
}
