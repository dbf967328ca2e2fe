//! AdamW with decoupled weight decay, fp32 master weights for bf16/f16 parameters,
//! global gradient-norm clipping and skipping of non-finite steps.

//!
//! The CPU reference lives in `cpu.rs`; on a `Sim` or `Cuda` device the state lives on the
//! device and a step runs the kernels of `kernels/adamw.cu` (`cuda.rs`).

use std::sync::OnceLock;

use super::rounding::{Rounding, stream_key};
#[cfg(test)]
use crate::Element;
use crate::storage::CpuStorage;
use crate::{DType, Device, Error, Gradients, Real, Result, Tensor};
#[cfg(test)]
use cpu::CHUNK;
use cpu::{sum_squares, update_half, update_plain};

pub(crate) mod cpu;
pub(crate) mod cuda;
#[cfg(test)]
mod kernel_tests;

const OP: &str = "adamw";

/// The hyper-parameters of [`AdamW`] (the defaults of `torch.optim.AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Decay of the first moment, in `[0, 1)`. Default 0.9.
    pub beta1: f64,
    /// Decay of the second moment, in `[0, 1)`. Default 0.999.
    pub beta2: f64,
    /// Added to `√v̂` in the denominator, `> 0`. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay (`p ← p·(1 − lr·wd)` before the Adam update), `≥ 0`.
    /// Default 0.01.
    pub weight_decay: f64,
    /// How the fp32 master value is rounded into a bf16/f16 parameter. Default
    /// [`Rounding::NearestEven`].
    pub rounding: Rounding,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            rounding: Rounding::NearestEven,
        }
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(format!(
                    "adamw: {name} = {b} is outside [0, 1)"
                )));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid(format!(
                "adamw: eps = {} must be finite and > 0",
                self.eps
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid(format!(
                "adamw: weight_decay = {} must be finite and >= 0",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

/// Per-call options of [`AdamW::step`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOptions {
    /// Multiplies every gradient before anything else: `1/loss_scale` when the loss was
    /// scaled ([`crate::Tape::backward_scaled`]). Finite and `> 0`; default 1.
    pub grad_scale_inv: f64,
    /// Clip the global L2 norm of the (unscaled) gradients to this value, like
    /// `torch.nn.utils.clip_grad_norm_`. Finite and `> 0`; default `None` (no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            grad_scale_inv: 1.0,
            max_grad_norm: None,
        }
    }
}

/// What [`AdamW::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The global L2 norm of the unscaled gradients (`grad · grad_scale_inv`) of all
    /// parameters that have one, before clipping; inf or NaN when the step was skipped.
    pub grad_norm: f64,
    /// True when a gradient held an inf or NaN: nothing was modified.
    pub skipped: bool,
    /// The factor the gradients were multiplied by: `min(1, max_grad_norm/(grad_norm +
    /// 1e-6))`, or 1 without clipping or when skipped.
    pub clip_coef: f64,
}

/// The scalars of one AdamW step, computed once on the host in f64 and rounded once to
/// the compute type `T` (f32 for f32/bf16/f16 parameters, f64 for f64). A GPU kernel
/// receives exactly these values.
///
/// With `t` the 1-based step number, `lr` the learning rate and `grad_mul =
/// grad_scale_inv · clip_coef`:
///
/// | field | value (in f64, then rounded to `T`) |
/// |---|---|
/// | `grad_mul` | `grad_scale_inv · clip_coef` |
/// | `decay` | `1 − lr · weight_decay` |
/// | `beta1`, `one_minus_beta1` | `β₁`, `1 − β₁` |
/// | `beta2`, `one_minus_beta2` | `β₂`, `1 − β₂` |
/// | `sqrt_bias2` | `√(1 − β₂ᵗ)` |
/// | `step_size` | `lr / (1 − β₁ᵗ)` |
/// | `eps` | `ε` |
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConstants<T> {
    /// Multiplies the raw gradient.
    pub grad_mul: T,
    /// The decoupled weight-decay factor.
    pub decay: T,
    /// `β₁`.
    pub beta1: T,
    /// `1 − β₁`.
    pub one_minus_beta1: T,
    /// `β₂`.
    pub beta2: T,
    /// `1 − β₂`.
    pub one_minus_beta2: T,
    /// `√(1 − β₂ᵗ)`, the second-moment bias correction under the square root.
    pub sqrt_bias2: T,
    /// `lr / (1 − β₁ᵗ)`, the learning rate with the first-moment bias correction.
    pub step_size: T,
    /// `ε`.
    pub eps: T,
}

impl<T: Real> StepConstants<T> {
    /// The constants of step `t` (1-based) at learning rate `lr`, with the gradients
    /// multiplied by `grad_mul`.
    ///
    /// `β₁ᵗ` and `β₂ᵗ` are [`pow_by_squaring`], so that the device, which keeps the step
    /// count and computes these constants itself, gets the same bits.
    pub fn new(cfg: &AdamWConfig, lr: f64, t: u64, grad_mul: f64) -> Self {
        let bias1 = 1.0 - pow_by_squaring(cfg.beta1, t);
        let bias2 = 1.0 - pow_by_squaring(cfg.beta2, t);
        StepConstants {
            grad_mul: T::c(grad_mul),
            decay: T::c(1.0 - lr * cfg.weight_decay),
            beta1: T::c(cfg.beta1),
            one_minus_beta1: T::c(1.0 - cfg.beta1),
            beta2: T::c(cfg.beta2),
            one_minus_beta2: T::c(1.0 - cfg.beta2),
            sqrt_bias2: T::c(bias2.sqrt()),
            step_size: T::c(lr / bias1),
            eps: T::c(cfg.eps),
        }
    }
}

/// `base^exp` by binary exponentiation in f64, the bias corrections' `βᵗ`:
///
/// ```text
/// acc = 1; b = base
/// while exp > 0 { if exp & 1 { acc = acc·b }; b = b·b; exp >>= 1 }
/// ```
///
/// Each product is one correctly rounded IEEE f64 multiplication, in this order, so the
/// AdamW kernel (`kernels/adamw.cu`, which computes the step constants on the device
/// because the step count lives there) reproduces it bit for bit; `f64::powf` is libm's
/// and has no such twin. Within a few ulps of the exact power (⌊log₂ exp⌋ + popcount
/// roundings of relative size 2⁻⁵³ each).
///
/// ```
/// use lorafuse::optim::pow_by_squaring;
/// assert_eq!(pow_by_squaring(0.5, 10), 1.0 / 1024.0);
/// assert_eq!(pow_by_squaring(0.9, 0), 1.0);
/// let (a, b) = (pow_by_squaring(0.999, 1000), 0.999f64.powf(1000.0));
/// assert!(((a - b) / b).abs() < 1e-14, "{a} vs {b}");
/// ```
pub fn pow_by_squaring(base: f64, exp: u64) -> f64 {
    let (mut acc, mut b, mut e) = (1.0f64, base, exp);
    while e > 0 {
        if e & 1 == 1 {
            acc *= b;
        }
        b *= b;
        e >>= 1;
    }
    acc
}

/// One AdamW update of one element: returns the new parameter (or master) value and
/// updates the moments in place. In this order, each operation rounded once in `T`
/// (no fused multiply-add: a CUDA port uses `__fmul_rn`/`__fadd_rn` or `-fmad=false`;
/// `sqrt` and `/` are IEEE, as with nvcc's default `-prec-sqrt=true -prec-div=true`):
///
/// ```text
/// g = grad · grad_mul
/// p = p · decay                                  decoupled weight decay
/// m = beta1 · m + one_minus_beta1 · g
/// v = beta2 · v + one_minus_beta2 · (g · g)
/// d = sqrt(v) / sqrt_bias2 + eps                 = √v̂ + ε
/// p = p − step_size · (m / d)                    = p − lr · m̂ / (√v̂ + ε)
/// ```
///
/// This is `torch.optim.AdamW` (single-tensor path), which computes the same
/// `denom = √v/√(1−β₂ᵗ) + ε` and `step_size = lr/(1−β₁ᵗ)`; it differs from PyTorch's
/// roundings only in writing `m = β₁·m + (1−β₁)·g` where PyTorch uses `m.lerp_(g, 1−β₁)`.
#[inline]
pub fn adamw_element<T: Real>(p: T, m: &mut T, v: &mut T, grad: T, k: &StepConstants<T>) -> T {
    let g = grad * k.grad_mul;
    let p = p * k.decay;
    *m = k.beta1 * *m + k.one_minus_beta1 * g;
    *v = k.beta2 * *v + k.one_minus_beta2 * (g * g);
    let d = v.sqrt() / k.sqrt_bias2 + k.eps;
    p - k.step_size * (*m / d)
}

/// The optimizer state of one parameter.
#[derive(Clone, Debug)]
enum ParamState {
    /// f32, bf16 and f16 parameters: f32 moments, and an f32 master copy for bf16/f16.
    F32 {
        m: Vec<f32>,
        v: Vec<f32>,
        master: Option<Vec<f32>>,
    },
    /// f64 parameters (CPU reference tests): f64 moments, no master.
    F64 { m: Vec<f64>, v: Vec<f64> },
}

/// Read access to the state of one parameter (see [`AdamW::state`]).
#[derive(Clone, Copy, Debug)]
pub enum ParamStateRef<'a> {
    /// The state of an f32, bf16 or f16 parameter.
    F32 {
        /// First moment.
        m: &'a [f32],
        /// Second moment.
        v: &'a [f32],
        /// The fp32 master weights of a bf16/f16 parameter (`None` for f32).
        master: Option<&'a [f32]>,
    },
    /// The state of an f64 parameter.
    F64 {
        /// First moment.
        m: &'a [f64],
        /// Second moment.
        v: &'a [f64],
    },
}

/// An owned copy of the state of one parameter (see [`AdamW::state_to_host`]), for state
/// that lives on a device.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamStateOwned {
    /// The state of an f32, bf16 or f16 parameter.
    F32 {
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
        /// The fp32 master weights of a bf16/f16 parameter (`None` for f32).
        master: Option<Vec<f32>>,
    },
    /// The state of an f64 parameter (CPU only).
    F64 {
        /// First moment.
        m: Vec<f64>,
        /// Second moment.
        v: Vec<f64>,
    },
}

impl ParamStateOwned {
    /// Borrowed access, as [`AdamW::state`] gives it.
    pub fn as_ref(&self) -> ParamStateRef<'_> {
        match self {
            ParamStateOwned::F32 { m, v, master } => ParamStateRef::F32 {
                m,
                v,
                master: master.as_deref(),
            },
            ParamStateOwned::F64 { m, v } => ParamStateRef::F64 { m, v },
        }
    }
}

/// The report of a step queued by [`AdamW::step_deferred`]: [`wait`](Self::wait) blocks
/// until the step ran on the device and reads its [`StepReport`].
///
/// On a device, the step state (norm, skip flag, clip coefficient) is copied into a small
/// buffer of its own, queued right after the step's kernels, so later steps do not
/// overwrite it: reports can be waited for in any order, or dropped. On the CPU the
/// report is ready at once.
pub struct PendingStepReport {
    inner: Pending,
}

enum Pending {
    Ready(StepReport),
    Device(cuda::PendingDevice),
}

impl std::fmt::Debug for PendingStepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Pending::Ready(r) => write!(f, "PendingStepReport(ready: {r:?})"),
            Pending::Device(_) => f.write_str("PendingStepReport(on the device)"),
        }
    }
}

impl PendingStepReport {
    /// Waits for the step (a device synchronisation) and returns its report.
    pub fn wait(self) -> Result<StepReport> {
        match self.inner {
            Pending::Ready(r) => Ok(r),
            Pending::Device(d) => d.wait(),
        }
    }
}

/// Where the state lives.
enum Backing {
    /// Host vectors, updated by the CPU reference (`cpu.rs`).
    Cpu { states: Vec<ParamState>, step: u64 },
    /// Device buffers, updated by `kernels/adamw.cu` (`cuda.rs`); host copies of the
    /// state are made on demand by [`AdamW::state`] and cached until the next step.
    Device {
        state: Box<cuda::DeviceState>,
        cache: Vec<OnceLock<ParamStateOwned>>,
    },
}

/// AdamW (Loshchilov & Hutter, decoupled weight decay) with the semantics of
/// `torch.optim.AdamW`, bias correction included; see [`adamw_element`] for the exact
/// per-element arithmetic.
///
/// - **State**: per parameter, f32 moments `m` and `v`; bf16/f16 parameters also get an
///   f32 *master* copy that accumulates the updates (which are often far below the
///   16-bit resolution) and is rounded into the parameter after every step
///   ([`Rounding`]). f64 parameters (for tests) compute in f64 with f64 moments.
/// - **Step** ([`AdamW::step`]): one pass over all gradients computes the global L2
///   norm of the unscaled gradients and looks for inf/NaN; a non-finite gradient skips
///   the whole step without modifying anything (parameters, master weights, moments,
///   step count); otherwise the gradients are clipped by
///   `min(1, max_norm/(norm + 1e-6))` and every parameter with a gradient is updated in
///   place. A parameter without a gradient in this step is left alone (no weight decay
///   either, like PyTorch), but the step count, and so the bias correction, is global.
///
/// - **Devices**: with the parameters on `Device::Sim` or `Device::Cuda`, the state is
///   allocated on that device and a step runs the multi-tensor kernels of
///   `kernels/adamw.cu` (norm → finish → apply: three launches for the whole list),
///   bit-identical to the CPU reference (the gradient norm is summed in another order, so
///   a clipped step agrees to rounding). The step count and the skip decision live on the
///   device: no host round trip decides a skip. [`AdamW::step`] reads the report back
///   (one synchronisation); [`AdamW::step_deferred`] does not. All parameters must be on
///   one device.
///
/// Parameters are updated through their storage, so every handle of a parameter
/// (including the tracked copies on later tapes) sees the new values. The master copy is
/// taken in [`AdamW::new`]: writes to a bf16/f16 parameter made outside the optimizer
/// are not seen by it.
///
/// ```
/// use lorafuse::optim::{AdamW, AdamWConfig, StepOptions};
/// use lorafuse::{Device, Gradients, Tensor};
/// let p = Tensor::from_vec(vec![1.0f32, -2.0], [2], &Device::Cpu)?;
/// let mut opt = AdamW::new(vec![p.clone()], AdamWConfig { weight_decay: 0.0, ..Default::default() })?;
/// let mut grads = Gradients::default();
/// grads.insert(&p, Tensor::from_vec(vec![0.5f32, -0.1], [2], &Device::Cpu)?)?;
/// let report = opt.step(&grads, 1e-3, StepOptions::default())?;
/// assert!(!report.skipped);
/// // The first Adam step moves each weight by about lr against its gradient's sign.
/// let w = p.to_vec_f32()?;
/// assert!((w[0] - 0.999).abs() < 1e-6 && (w[1] + 1.999).abs() < 1e-6);
/// assert_eq!(opt.state_bytes(), 2 * 2 * 4); // m and v, f32
/// # Ok::<(), lorafuse::Error>(())
/// ```
pub struct AdamW {
    params: Vec<Tensor>,
    backing: Backing,
    cfg: AdamWConfig,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AdamW({} params on {}, step {}, {} state bytes, {:?})",
            self.params.len(),
            self.device(),
            self.step_count(),
            self.state_bytes(),
            self.cfg
        )
    }
}

/// Whether a gradient of `grad` dtype is accepted for a parameter of `param` dtype: the
/// same dtype, or f32 for a bf16/f16 parameter.
fn grad_dtype_ok(param: DType, grad: DType) -> bool {
    param == grad || (param.is_half() && grad == DType::F32)
}

impl AdamW {
    /// An optimizer over `params`, the trainable tensors (tracked or not: the optimizer
    /// keeps untracked handles to the same storage; gradients are matched by
    /// [`Tensor::id`]). Moments start at zero; bf16/f16 parameters get an f32 master
    /// copy of their current values.
    ///
    /// Parameters on `Device::Sim` or `Device::Cuda` get their state on that device (see
    /// the type's documentation); f64 parameters live on the CPU only.
    ///
    /// Errors: an invalid config, no parameters, a parameter given twice (same id or the
    /// same storage), or parameters on different devices.
    pub fn new(params: Vec<Tensor>, cfg: AdamWConfig) -> Result<AdamW> {
        cfg.validate()?;
        if params.is_empty() {
            return Err(Error::invalid("adamw: no parameters to optimise"));
        }
        for (i, p) in params.iter().enumerate() {
            if let Some(j) = params[..i]
                .iter()
                .position(|q| q.id() == p.id() || q.same_storage(p))
            {
                return Err(Error::invalid(format!(
                    "adamw: parameters {j} and {i} are the same tensor ({:?})",
                    p.id()
                )));
            }
        }
        let device = params[0].device();
        if let Some(p) = params.iter().find(|p| p.device() != device) {
            return Err(Error::Device {
                op: OP,
                lhs: device,
                rhs: p.device(),
            });
        }
        let params: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
        if device != Device::Cpu {
            let state = Box::new(cuda::DeviceState::new(&params, device)?);
            return Ok(AdamW {
                backing: Backing::Device {
                    state,
                    cache: (0..params.len()).map(|_| OnceLock::new()).collect(),
                },
                params,
                cfg,
            });
        }
        let mut states = Vec::with_capacity(params.len());
        for p in &params {
            let guard = p.storage();
            let s = guard.cpu(OP)?;
            let n = s.len();
            states.push(match s.dtype() {
                DType::F64 => ParamState::F64 {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                },
                dt => ParamState::F32 {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    master: dt.is_half().then(|| s.to_vec::<f32>()),
                },
            });
        }
        Ok(AdamW {
            params,
            backing: Backing::Cpu { states, step: 0 },
            cfg,
        })
    }

    /// The device the parameters and the state live on.
    pub fn device(&self) -> Device {
        match &self.backing {
            Backing::Cpu { .. } => Device::Cpu,
            Backing::Device { state, .. } => state.device(),
        }
    }

    /// The parameters, in the order given to [`AdamW::new`] (untracked handles sharing
    /// the parameters' ids and storage).
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The configuration.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The number of steps taken (skipped steps do not count). The next step is
    /// `step_count() + 1`, the `t` of its bias correction.
    ///
    /// On a device the count lives in device memory (a skip is decided there): after
    /// [`AdamW::step_deferred`] this reads it back, which waits for the queued steps.
    /// Should that read fail (a device error, which the next step or
    /// [`AdamW::try_step_count`] also reports), the last count read is returned.
    pub fn step_count(&self) -> u64 {
        match &self.backing {
            Backing::Cpu { step, .. } => *step,
            Backing::Device { state, .. } => state
                .step_count()
                .unwrap_or_else(|_| state.last_known_step()),
        }
    }

    /// [`AdamW::step_count`], with the error of a failed device read.
    pub fn try_step_count(&self) -> Result<u64> {
        match &self.backing {
            Backing::Cpu { step, .. } => Ok(*step),
            Backing::Device { state, .. } => state.step_count(),
        }
    }

    /// Bytes of optimizer state: the moments `m` and `v` of every parameter plus the f32
    /// master copies of the bf16/f16 ones (8 bytes per element for f32 parameters, 12 for
    /// bf16/f16, 16 for f64). Compare LoRA (adapters only) with full fine-tuning.
    pub fn state_bytes(&self) -> usize {
        let states = match &self.backing {
            Backing::Cpu { states, .. } => states,
            Backing::Device { state, .. } => return state.state_bytes(),
        };
        states
            .iter()
            .map(|s| match s {
                ParamState::F32 { m, v, master } => {
                    4 * (m.len() + v.len() + master.as_ref().map_or(0, Vec::len))
                }
                ParamState::F64 { m, v } => 8 * (m.len() + v.len()),
            })
            .sum()
    }

    /// The state of parameter `index` (in [`AdamW::params`] order), or `None` past the end.
    ///
    /// For state on a device this is a host copy, downloaded on the first call after a
    /// step (a synchronisation) and kept until the next step; `None` also when that
    /// download fails — [`AdamW::state_to_host`] returns the error.
    pub fn state(&self, index: usize) -> Option<ParamStateRef<'_>> {
        let states = match &self.backing {
            Backing::Cpu { states, .. } => states,
            Backing::Device { cache, .. } => {
                let slot = cache.get(index)?;
                if slot.get().is_none()
                    && let Ok(Some(s)) = self.state_to_host(index)
                {
                    let _ = slot.set(s);
                }
                return slot.get().map(ParamStateOwned::as_ref);
            }
        };
        states.get(index).map(|s| match s {
            ParamState::F32 { m, v, master } => ParamStateRef::F32 {
                m,
                v,
                master: master.as_deref(),
            },
            ParamState::F64 { m, v } => ParamStateRef::F64 { m, v },
        })
    }

    /// An owned copy of the state of parameter `index` (downloaded from the device where it
    /// lives there), or `None` past the end.
    pub fn state_to_host(&self, index: usize) -> Result<Option<ParamStateOwned>> {
        if index >= self.params.len() {
            return Ok(None);
        }
        match &self.backing {
            Backing::Cpu { states, .. } => Ok(Some(match &states[index] {
                ParamState::F32 { m, v, master } => ParamStateOwned::F32 {
                    m: m.clone(),
                    v: v.clone(),
                    master: master.clone(),
                },
                ParamState::F64 { m, v } => ParamStateOwned::F64 {
                    m: m.clone(),
                    v: v.clone(),
                },
            })),
            Backing::Device { state, .. } => {
                let (m, v, master) = state.to_host(index)?;
                Ok(Some(ParamStateOwned::F32 { m, v, master }))
            }
        }
    }

    /// Replaces the whole state, e.g. with one saved in a training checkpoint: the step
    /// count (applied steps, as [`AdamW::step_count`]) and, for every parameter in
    /// [`AdamW::params`] order, its moments and master weights as
    /// [`AdamW::state_to_host`] gives them. The parameters' own values are not touched
    /// (restore them first); afterwards the optimizer continues exactly as the one the
    /// state was read from.
    ///
    /// Errors, before anything changes: not one state per parameter, or a state that does
    /// not fit its parameter (f64 moments for an f64 parameter and f32 ones otherwise,
    /// each of the parameter's length, and a master copy exactly for bf16/f16).
    ///
    /// ```
    /// use lorafuse::optim::{AdamW, AdamWConfig, StepOptions};
    /// use lorafuse::{DType, Device, Gradients, Tensor};
    /// let d = Device::Cpu;
    /// let p = Tensor::from_vec_as(vec![1.0f32, -2.0], [2], DType::BF16, &d)?;
    /// let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default())?;
    /// let mut g = Gradients::default();
    /// g.insert(&p, Tensor::from_vec_as(vec![0.5f32, -0.1], [2], DType::BF16, &d)?)?;
    /// opt.step(&g, 1e-3, StepOptions::default())?;
    /// // A second optimizer over a copy of the parameter takes the state over.
    /// let q = p.deep_clone()?;
    /// let mut again = AdamW::new(vec![q.clone()], AdamWConfig::default())?;
    /// again.load_state(opt.step_count(), &[opt.state_to_host(0)?.unwrap()])?;
    /// assert_eq!(again.step_count(), 1);
    /// assert_eq!(again.state_to_host(0)?, opt.state_to_host(0)?);
    /// # Ok::<(), lorafuse::Error>(())
    /// ```
    pub fn load_state(&mut self, step: u64, states: &[ParamStateOwned]) -> Result<()> {
        if states.len() != self.params.len() {
            return Err(Error::invalid(format!(
                "adamw: {} parameter states for {} parameters",
                states.len(),
                self.params.len()
            )));
        }
        for (i, (p, s)) in self.params.iter().zip(states).enumerate() {
            let n = p.elem_count();
            let (lens, master, f64_state) = match s {
                ParamStateOwned::F32 { m, v, master } => {
                    ((m.len(), v.len()), master.as_ref().map(Vec::len), false)
                }
                ParamStateOwned::F64 { m, v } => ((m.len(), v.len()), None, true),
            };
            let bad = |what: String| {
                Err(Error::invalid(format!(
                    "adamw: the state of parameter {i} ({} {}): {what}",
                    p.dtype(),
                    p.shape()
                )))
            };
            if f64_state != (p.dtype() == DType::F64) {
                return bad(format!("{} moments", if f64_state { "f64" } else { "f32" }));
            }
            if lens != (n, n) {
                return bad(format!("moments of {} and {} elements", lens.0, lens.1));
            }
            match (p.dtype().is_half(), master) {
                (true, Some(len)) if len == n => {}
                (true, Some(len)) => return bad(format!("a master copy of {len} elements")),
                (true, None) => return bad("no master copy".into()),
                (false, Some(_)) => return bad("a master copy (only bf16/f16 have one)".into()),
                (false, None) => {}
            }
        }
        match &mut self.backing {
            Backing::Cpu {
                states: mine,
                step: my_step,
            } => {
                *mine = states
                    .iter()
                    .map(|s| match s.clone() {
                        ParamStateOwned::F32 { m, v, master } => ParamState::F32 { m, v, master },
                        ParamStateOwned::F64 { m, v } => ParamState::F64 { m, v },
                    })
                    .collect();
                *my_step = step;
            }
            Backing::Device { state, cache } => {
                state.load(step, states)?;
                cache.iter_mut().for_each(|c| *c = OnceLock::new());
            }
        }
        Ok(())
    }

    /// One optimizer step at learning rate `lr` with the gradients in `grads` (keyed by
    /// parameter id; gradients of other tensors are ignored). In order:
    ///
    /// 1. one pass over the gradients of all parameters computes
    ///    `norm = √Σ (grad · grad_scale_inv)²` in f64 and whether any gradient element is
    ///    inf or NaN. The order is fixed (independent of the thread count): each
    ///    parameter's elements in chunks of 2¹⁵, each chunk summed left to right, chunk
    ///    sums added in order, parameters in [`AdamW::params`] order;
    /// 2. if one is (or the norm overflows), the step is skipped: the report says so
    ///    and nothing is modified (parameters, master weights, moments, step count);
    /// 3. `clip_coef = min(1, max_grad_norm / (norm + 1e-6))` (1 without clipping);
    /// 4. the step count `t` increases by one and every parameter with a gradient gets
    ///    [`adamw_element`] with [`StepConstants::new`]`(cfg, lr, t, grad_scale_inv ·
    ///    clip_coef)`, written in place; bf16/f16 parameters update their master copy and
    ///    are rounded from it.
    ///
    /// A gradient must have its parameter's shape and dtype (f32 is also accepted for
    /// bf16/f16 parameters). Errors (a bad `lr` or option, a mismatched gradient) are
    /// reported before anything is modified.
    pub fn step(&mut self, grads: &Gradients, lr: f64, opts: StepOptions) -> Result<StepReport> {
        let work = self.prepare(grads, lr, opts)?;
        match &mut self.backing {
            Backing::Cpu { .. } => self.step_cpu(&work, lr, opts),
            Backing::Device { state, cache } => {
                state.queue_step(&self.params, &work, lr, opts, &self.cfg, None)?;
                cache.iter_mut().for_each(|c| *c = OnceLock::new());
                // The one synchronisation: everything is queued, then the step state is
                // read back (this waits for the three launches).
                state.read_report()
            }
        }
    }

    /// [`AdamW::step`] without waiting: on a device, the step's kernels are queued and the
    /// report comes later from [`PendingStepReport::wait`], so the host can go on to the
    /// next forward pass while the GPU updates (the skip decision and the step count stay
    /// on the device). On the CPU the step runs at once and the report is ready.
    ///
    /// The same checks and errors as [`AdamW::step`]. Calling [`AdamW::step_count`] or
    /// [`AdamW::state`] afterwards reads the device, which waits for the queued steps.
    ///
    /// ```
    /// use lorafuse::optim::{AdamW, AdamWConfig, StepOptions};
    /// use lorafuse::{Device, Gradients, Tensor};
    /// let d = Device::Sim;
    /// let p = Tensor::from_vec(vec![1.0f32, -2.0], [2], &d)?;
    /// let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default())?;
    /// let mut grads = Gradients::default();
    /// grads.insert(&p, Tensor::from_vec(vec![0.5f32, f32::INFINITY], [2], &d)?)?;
    /// let pending = opt.step_deferred(&grads, 1e-3, StepOptions::default())?;
    /// assert!(pending.wait()?.skipped); // decided on the device
    /// assert_eq!(opt.step_count(), 0);
    /// # Ok::<(), lorafuse::Error>(())
    /// ```
    pub fn step_deferred(
        &mut self,
        grads: &Gradients,
        lr: f64,
        opts: StepOptions,
    ) -> Result<PendingStepReport> {
        let work = self.prepare(grads, lr, opts)?;
        let inner = match &mut self.backing {
            Backing::Cpu { .. } => Pending::Ready(self.step_cpu(&work, lr, opts)?),
            Backing::Device { state, cache } => {
                state.queue_step(&self.params, &work, lr, opts, &self.cfg, None)?;
                cache.iter_mut().for_each(|c| *c = OnceLock::new());
                Pending::Device(state.snapshot()?)
            }
        };
        Ok(PendingStepReport { inner })
    }

    /// [`AdamW::step_deferred`] under dynamic loss scaling kept on the device: the
    /// gradients in `grads` are `S ×` their true value (from
    /// [`DeviceLossScaler::backward`](crate::optim::DeviceLossScaler::backward)), the
    /// kernels read `grad_scale_inv = 1/S` from `scaler`, skip the step on an inf/NaN
    /// gradient and then update `S` ([`DynamicLossScaler::update`](crate::optim::DynamicLossScaler::update)'s
    /// policy) and the next backward's seed. Nothing is read back: the skip decision and
    /// the next scale never leave the device.
    ///
    /// Errors: those of [`AdamW::step`]; the optimizer's state on the CPU (use
    /// [`scaled_backward_step`](crate::optim::scaled_backward_step)) or `scaler` on
    /// another device.
    pub fn step_deferred_scaled(
        &mut self,
        grads: &Gradients,
        lr: f64,
        max_grad_norm: Option<f64>,
        scaler: &mut crate::optim::DeviceLossScaler,
    ) -> Result<PendingStepReport> {
        let opts = StepOptions {
            grad_scale_inv: 1.0,
            max_grad_norm,
        };
        let work = self.prepare(grads, lr, opts)?;
        let Backing::Device { state, cache } = &mut self.backing else {
            return Err(Error::invalid(
                "adamw: step_deferred_scaled needs the optimizer's state on a device; on the CPU use scaled_backward_step",
            ));
        };
        if scaler.device() != state.device() {
            return Err(Error::Device {
                op: OP,
                lhs: state.device(),
                rhs: scaler.device(),
            });
        }
        state.queue_step(
            &self.params,
            &work,
            lr,
            opts,
            &self.cfg,
            Some(scaler.kernel_args()),
        )?;
        cache.iter_mut().for_each(|c| *c = OnceLock::new());
        Ok(PendingStepReport {
            inner: Pending::Device(state.snapshot()?),
        })
    }

    /// Checks the options and the gradients, and returns the (parameter index, gradient)
    /// pairs of the step (a gradient that shares storage with a parameter is copied).
    fn prepare(
        &self,
        grads: &Gradients,
        lr: f64,
        opts: StepOptions,
    ) -> Result<Vec<(usize, Tensor)>> {
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(Error::invalid(format!(
                "adamw: learning rate {lr} must be finite and >= 0"
            )));
        }
        if !(opts.grad_scale_inv > 0.0 && opts.grad_scale_inv.is_finite()) {
            return Err(Error::invalid(format!(
                "adamw: grad_scale_inv {} must be finite and > 0",
                opts.grad_scale_inv
            )));
        }
        if let Some(mx) = opts.max_grad_norm
            && !(mx > 0.0 && mx.is_finite())
        {
            return Err(Error::invalid(format!(
                "adamw: max_grad_norm {mx} must be finite and > 0"
            )));
        }

        let mut work: Vec<(usize, Tensor)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p) else { continue };
            Error::check_same_shape(OP, p.shape(), g.shape())?;
            if !grad_dtype_ok(p.dtype(), g.dtype()) {
                return Err(Error::DType {
                    op: OP,
                    lhs: p.dtype(),
                    rhs: g.dtype(),
                });
            }
            if g.device() != p.device() {
                return Err(Error::Device {
                    op: OP,
                    lhs: p.device(),
                    rhs: g.device(),
                });
            }
            // A gradient sharing storage with a parameter would be read while that
            // parameter is written (and under its write lock): update from a copy.
            let g = if self.params.iter().any(|q| q.same_storage(g)) {
                g.deep_clone()?
            } else {
                g.clone()
            };
            work.push((i, g));
        }
        Ok(work)
    }

    /// The CPU reference step.
    fn step_cpu(
        &mut self,
        work: &[(usize, Tensor)],
        lr: f64,
        opts: StepOptions,
    ) -> Result<StepReport> {
        let Backing::Cpu { states, step } = &mut self.backing else {
            return Err(Error::invalid("adamw: the CPU step on device state"));
        };
        // (a) One pass for the norm and the non-finite check.
        let (mut sumsq, mut finite) = (0.0f64, true);
        for (_, g) in work {
            let (s, f) = {
                let guard = g.storage();
                match guard.cpu(OP)? {
                    CpuStorage::F32(x) => sum_squares(x, opts.grad_scale_inv),
                    CpuStorage::F64(x) => sum_squares(x, opts.grad_scale_inv),
                    CpuStorage::BF16(x) => sum_squares(x, opts.grad_scale_inv),
                    CpuStorage::F16(x) => sum_squares(x, opts.grad_scale_inv),
                }
            };
            sumsq += s;
            finite &= f;
        }
        let grad_norm = sumsq.sqrt();

        // (b) Skip without touching anything.
        if !finite || !grad_norm.is_finite() {
            return Ok(StepReport {
                grad_norm,
                skipped: true,
                clip_coef: 1.0,
            });
        }

        // (c) Clipping.
        let clip_coef = match opts.max_grad_norm {
            Some(mx) => (mx / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };

        // (d) Update.
        *step += 1;
        let t = *step;
        let grad_mul = opts.grad_scale_inv * clip_coef;
        let k32 = StepConstants::<f32>::new(&self.cfg, lr, t, grad_mul);
        let k64 = StepConstants::<f64>::new(&self.cfg, lr, t, grad_mul);
        for (i, g) in work {
            let key = match self.cfg.rounding {
                Rounding::NearestEven => None,
                Rounding::Stochastic { seed } => Some(stream_key(seed, t, *i as u64)),
            };
            let mut pguard = self.params[*i].storage_mut();
            let gguard = g.storage();
            let (ps, gs) = (pguard.cpu_mut(OP)?, gguard.cpu(OP)?);
            match (&mut states[*i], ps, gs) {
                (
                    ParamState::F32 { m, v, master: None },
                    CpuStorage::F32(p),
                    CpuStorage::F32(g),
                ) => update_plain(p, m, v, g, &k32),
                (ParamState::F64 { m, v }, CpuStorage::F64(p), CpuStorage::F64(g)) => {
                    update_plain(p, m, v, g, &k64)
                }
                (
                    ParamState::F32 {
                        m,
                        v,
                        master: Some(w),
                    },
                    CpuStorage::BF16(p),
                    CpuStorage::BF16(g),
                ) => update_half(p, w, m, v, g, &k32, key),
                (
                    ParamState::F32 {
                        m,
                        v,
                        master: Some(w),
                    },
                    CpuStorage::BF16(p),
                    CpuStorage::F32(g),
                ) => update_half(p, w, m, v, g, &k32, key),
                (
                    ParamState::F32 {
                        m,
                        v,
                        master: Some(w),
                    },
                    CpuStorage::F16(p),
                    CpuStorage::F16(g),
                ) => update_half(p, w, m, v, g, &k32, key),
                (
                    ParamState::F32 {
                        m,
                        v,
                        master: Some(w),
                    },
                    CpuStorage::F16(p),
                    CpuStorage::F32(g),
                ) => update_half(p, w, m, v, g, &k32, key),
                // Unreachable: dtypes were checked in (a) and a tensor's dtype never changes.
                (_, p, g) => {
                    return Err(Error::unsupported(
                        OP,
                        format!("{} gradient for a {} parameter", g.dtype(), p.dtype()),
                    ));
                }
            }
        }
        Ok(StepReport {
            grad_norm,
            skipped: false,
            clip_coef,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::optim::DynamicLossScaler;
    use crate::optim::rounding::stream_bits;
    use crate::testing::rng;
    use half::{bf16, f16};
    use rand::Rng;

    const CPU: Device = Device::Cpu;

    fn grads_of(pairs: &[(&Tensor, Tensor)]) -> Gradients {
        let mut g = Gradients::default();
        for (p, t) in pairs {
            g.insert(p, t.clone()).unwrap();
        }
        g
    }

    /// The update written out independently: same formula, same order, same rounding of
    /// the constants (f64 on the host, then `T`).
    #[allow(clippy::too_many_arguments)]
    fn reference_step<T: Real>(
        p: &mut [T],
        m: &mut [T],
        v: &mut [T],
        g: &[T],
        lr: f64,
        t: u64,
        grad_mul: f64,
        cfg: &AdamWConfig,
    ) {
        let c = |x: f64| T::c(x);
        let bias1 = 1.0 - pow_by_squaring(cfg.beta1, t);
        let bias2 = 1.0 - pow_by_squaring(cfg.beta2, t);
        let (gm, decay, b1, omb1, b2, omb2) = (
            c(grad_mul),
            c(1.0 - lr * cfg.weight_decay),
            c(cfg.beta1),
            c(1.0 - cfg.beta1),
            c(cfg.beta2),
            c(1.0 - cfg.beta2),
        );
        let (sb2, step_size, eps) = (c(bias2.sqrt()), c(lr / bias1), c(cfg.eps));
        for i in 0..p.len() {
            let gi = g[i] * gm;
            let pi = p[i] * decay;
            m[i] = b1 * m[i] + omb1 * gi;
            v[i] = b2 * v[i] + omb2 * (gi * gi);
            p[i] = pi - step_size * (m[i] / (v[i].sqrt() / sb2 + eps));
        }
    }

    fn moments_f32(opt: &AdamW, i: usize) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
        match opt.state(i).unwrap() {
            ParamStateRef::F32 { m, v, master } => {
                (m.to_vec(), v.to_vec(), master.map(<[f32]>::to_vec))
            }
            ParamStateRef::F64 { .. } => panic!("f64 state"),
        }
    }

    fn moments_f64(opt: &AdamW, i: usize) -> (Vec<f64>, Vec<f64>) {
        match opt.state(i).unwrap() {
            ParamStateRef::F64 { m, v } => (m.to_vec(), v.to_vec()),
            ParamStateRef::F32 { .. } => panic!("f32 state"),
        }
    }

    fn bits32(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// (i) f32 and f64 steps equal the reference loop bit for bit over several steps,
    /// with a varying lr, a loss scale, a parameter that misses its gradient on one step
    /// (it is left alone, the step count stays global) and a parameter larger than one
    /// rayon chunk.
    fn matches_reference_loop<T: Real>(name: &str) {
        let mut r = rng(name);
        let shapes: [&[usize]; 3] = [&[37], &[5, 3], &[CHUNK + 123]];
        let init: Vec<Vec<T>> = shapes
            .iter()
            .map(|s| {
                (0..s.iter().product::<usize>())
                    .map(|_| T::c(r.random_range(-1.0..1.0)))
                    .collect()
            })
            .collect();
        let params: Vec<Tensor> = init
            .iter()
            .zip(&shapes)
            .map(|(v, s)| Tensor::from_vec(v.clone(), s.to_vec(), &CPU).unwrap())
            .collect();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(params.clone(), cfg).unwrap();
        let mut ref_p = init.clone();
        let mut ref_m: Vec<Vec<T>> = init.iter().map(|v| vec![T::zero(); v.len()]).collect();
        let mut ref_v = ref_m.clone();
        let scale_inv = 1.0 / 1024.0;
        for step in 1..=5u64 {
            let lr = 1e-2 / step as f64;
            let mut grads = Gradients::default();
            let mut gvals = Vec::new();
            for (i, p) in params.iter().enumerate() {
                let g: Vec<T> = (0..p.elem_count())
                    .map(|_| T::c(r.random_range(-1024.0..1024.0)))
                    .collect();
                if !(step == 3 && i == 1) {
                    grads
                        .insert(
                            p,
                            Tensor::from_vec(g.clone(), p.shape().clone(), &CPU).unwrap(),
                        )
                        .unwrap();
                }
                gvals.push(g);
            }
            let rep = opt
                .step(
                    &grads,
                    lr,
                    StepOptions {
                        grad_scale_inv: scale_inv,
                        max_grad_norm: None,
                    },
                )
                .unwrap();
            assert!(!rep.skipped && rep.clip_coef == 1.0);
            for i in 0..params.len() {
                if step == 3 && i == 1 {
                    continue;
                }
                reference_step(
                    &mut ref_p[i],
                    &mut ref_m[i],
                    &mut ref_v[i],
                    &gvals[i],
                    lr,
                    step,
                    scale_inv,
                    &cfg,
                );
            }
            for (i, p) in params.iter().enumerate() {
                let got: Vec<T> = p.to_vec().unwrap();
                let (m, v): (Vec<f64>, Vec<f64>) = match opt.state(i).unwrap() {
                    ParamStateRef::F32 { m, v, master } => {
                        assert!(master.is_none());
                        (
                            m.iter().map(|x| *x as f64).collect(),
                            v.iter().map(|x| *x as f64).collect(),
                        )
                    }
                    ParamStateRef::F64 { m, v } => (m.to_vec(), v.to_vec()),
                };
                let want_m: Vec<f64> = ref_m[i].iter().map(|x| Element::to_f64(*x)).collect();
                let want_v: Vec<f64> = ref_v[i].iter().map(|x| Element::to_f64(*x)).collect();
                assert!(
                    got == ref_p[i],
                    "{name}: step {step} param {i} differs from the reference loop"
                );
                assert!(
                    m == want_m && v == want_v,
                    "{name}: step {step} param {i} moments differ"
                );
            }
        }
        assert_eq!(opt.step_count(), 5);
        println!("{name}: 5 steps bit-identical to the reference loop");
    }

    #[test]
    fn f32_step_is_bit_identical_to_reference_loop() {
        matches_reference_loop::<f32>("f32_step_is_bit_identical_to_reference_loop");
    }

    #[test]
    fn f64_step_is_bit_identical_to_reference_loop() {
        matches_reference_loop::<f64>("f64_step_is_bit_identical_to_reference_loop");
    }

    /// (ii) Two steps of `torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    /// weight_decay=0.01)` worked out by hand (40-digit arithmetic with `bc`), and the
    /// textbook form `p ← p(1 − lr·wd) − lr·m̂/(√v̂ + ε)` evaluated here in f64.
    #[test]
    #[allow(clippy::excessive_precision)] // the 40-digit hand results, kept verbatim
    fn matches_pytorch_adamw_by_hand() {
        // Element 0: p = 1, grads 0.5 then −0.25. Step 1: p·(1 − 1e-5) = 0.99999;
        // m = 0.05, v = 0.00025, m̂ = 0.5, v̂ = 0.25, update = 1e-3·0.5/(0.5 + 1e-8).
        // Element 1: p = −2, grads 0.1 then 0.3.
        let want1 = [
            0.9989900000199999996000000079999998400001,
            -2.0009799999000000099999990000000999999900,
        ];
        let want2 = [
            0.9987136730870782616255977640285734666596,
            -2.0018777711779451074420541580611218698185,
        ];
        let p = Tensor::from_vec(vec![1.0f64, -2.0], [2], &CPU).unwrap();
        let mut opt = AdamW::new(vec![p.clone()], AdamWConfig::default()).unwrap();
        let grads = [[0.5, 0.1], [-0.25, 0.3]];
        let cfg = AdamWConfig::default();
        let (mut tp, mut tm, mut tv) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (step, (g, want)) in grads.iter().zip([want1, want2]).enumerate() {
            let t = step as i32 + 1;
            opt.step(
                &grads_of(&[(&p, Tensor::from_vec(g.to_vec(), [2], &CPU).unwrap())]),
                1e-3,
                StepOptions::default(),
            )
            .unwrap();
            let got = p.to_vec_f64().unwrap();
            for j in 0..2 {
                // Textbook AdamW.
                tp[j] -= 1e-3 * cfg.weight_decay * tp[j];
                tm[j] = cfg.beta1 * tm[j] + (1.0 - cfg.beta1) * g[j];
                tv[j] = cfg.beta2 * tv[j] + (1.0 - cfg.beta2) * g[j] * g[j];
                let mhat = tm[j] / (1.0 - cfg.beta1.powi(t));
                let vhat = tv[j] / (1.0 - cfg.beta2.powi(t));
                tp[j] -= 1e-3 * mhat / (vhat.sqrt() + cfg.eps);
                let (e_hand, e_book) = (
                    (got[j] - want[j]).abs() / want[j].abs(),
                    (got[j] - tp[j]).abs() / tp[j].abs(),
                );
                println!(
                    "step {t} element {j}: got {:.17} want {:.17} (rel err {e_hand:.2e}; textbook {e_book:.2e})",
                    got[j], want[j]
                );
                assert!(e_hand < 1e-14 && e_book < 1e-14);
            }
        }
        // The same steps in f32 agree to f32 precision.
        let p32 = Tensor::from_vec(vec![1.0f32, -2.0], [2], &CPU).unwrap();
        let mut opt32 = AdamW::new(vec![p32.clone()], AdamWConfig::default()).unwrap();
        for g in &grads {
            let g32 = Tensor::from_vec(g.iter().map(|x| *x as f32).collect::<Vec<_>>(), [2], &CPU)
                .unwrap();
            opt32
                .step(&grads_of(&[(&p32, g32)]), 1e-3, StepOptions::default())
                .unwrap();
        }
        let got = p32.to_vec_f64().unwrap();
        for j in 0..2 {
            assert!(
                (got[j] - want2[j]).abs() / want2[j].abs() < 1e-6,
                "f32 element {j}: {} vs {}",
                got[j],
                want2[j]
            );
        }
    }

    /// (iii) bf16 parameters: the master stays f32 and equals the f32 reference, the
    /// parameter is `round(master)` after every step, and updates far below the bf16
    /// resolution accumulate in the master until the parameter moves.
    #[test]
    fn bf16_params_keep_f32_master_weights() {
        let p = Tensor::from_vec(
            vec![
                bf16::from_f32(1.0),
                bf16::from_f32(-0.5),
                bf16::from_f32(3.0),
            ],
            [3],
            &CPU,
        )
        .unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![p.clone()], cfg).unwrap();
        let (mut rp, mut rm, mut rv) = (vec![1.0f32, -0.5, 3.0], vec![0.0f32; 3], vec![0.0f32; 3]);
        let g = vec![
            bf16::from_f32(1.0),
            bf16::from_f32(-2.0),
            bf16::from_f32(0.25),
        ];
        let g32: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
        let lr = 1e-4; // ≈ the update per step: 40× below bf16's half-ulp at 1.0 (2^-9)
        let mut first_move = None;
        for step in 1..=60u64 {
            let grads = grads_of(&[(&p, Tensor::from_vec(g.clone(), [3], &CPU).unwrap())]);
            opt.step(&grads, lr, StepOptions::default()).unwrap();
            reference_step(&mut rp, &mut rm, &mut rv, &g32, lr, step, 1.0, &cfg);
            let (m, v, master) = moments_f32(&opt, 0);
            let master = master.expect("bf16 params have a master copy");
            assert_eq!(bits32(&master), bits32(&rp), "step {step}: master");
            assert_eq!(
                (bits32(&m), bits32(&v)),
                (bits32(&rm), bits32(&rv)),
                "step {step}: moments"
            );
            let pv: Vec<bf16> = p.to_vec().unwrap();
            for (x, w) in pv.iter().zip(&master) {
                assert_eq!(
                    x.to_bits(),
                    bf16::from_f32(*w).to_bits(),
                    "step {step}: param != round(master)"
                );
            }
            if step == 1 {
                assert_eq!(
                    pv[0],
                    bf16::from_f32(1.0),
                    "one tiny update does not move the bf16 value"
                );
                assert!(master[0] < 1.0 && master[0] > 0.9998);
            }
            if first_move.is_none() && pv[0] != bf16::from_f32(1.0) {
                first_move = Some(step);
            }
        }
        // 1 − 2^-9 (the rounding boundary below 1.0) is crossed after ~20 steps of ~1e-4.
        let first_move = first_move.expect("the bf16 param never moved");
        println!("bf16 param moved off 1.0 at step {first_move}");
        assert!((15..=25).contains(&first_move));
        assert_eq!(p.to_vec::<bf16>().unwrap()[0], bf16::from_f32(0.9921875)); // master ≈ 0.994
    }

    /// bf16 parameters with f32 gradients, and f16 parameters, follow the same path.
    #[test]
    fn half_params_accept_f32_or_own_dtype_grads() {
        for dtype in [DType::BF16, DType::F16] {
            let init = [0.3f64, -1.7, 2.5, 1e-3];
            let p1 = Tensor::from_vec_as(init.to_vec(), [4], dtype, &CPU).unwrap();
            let p2 = Tensor::from_vec_as(init.to_vec(), [4], dtype, &CPU).unwrap();
            let mut o1 = AdamW::new(vec![p1.clone()], AdamWConfig::default()).unwrap();
            let mut o2 = AdamW::new(vec![p2.clone()], AdamWConfig::default()).unwrap();
            let g = [0.5f64, -0.25, 1.0, 2.0]; // exact in every dtype
            for _ in 0..3 {
                o1.step(
                    &grads_of(&[(
                        &p1,
                        Tensor::from_vec_as(g.to_vec(), [4], dtype, &CPU).unwrap(),
                    )]),
                    1e-2,
                    StepOptions::default(),
                )
                .unwrap();
                o2.step(
                    &grads_of(&[(
                        &p2,
                        Tensor::from_vec_as(g.to_vec(), [4], DType::F32, &CPU).unwrap(),
                    )]),
                    1e-2,
                    StepOptions::default(),
                )
                .unwrap();
            }
            assert_eq!(
                p1.to_vec_f64().unwrap(),
                p2.to_vec_f64().unwrap(),
                "{dtype}"
            );
            assert_eq!(moments_f32(&o1, 0), moments_f32(&o2, 0), "{dtype}");
            let (_, _, master) = moments_f32(&o1, 0);
            let round = |w: f32| {
                if dtype == DType::BF16 {
                    bf16::from_f32(w).to_f64()
                } else {
                    f16::from_f32(w).to_f64()
                }
            };
            let rounded: Vec<f64> = master.unwrap().iter().map(|&w| round(w)).collect();
            assert_eq!(
                p1.to_vec_f64().unwrap(),
                rounded,
                "{dtype}: param == round(master)"
            );
        }
    }

    /// The bits of every parameter (widened exactly to f64), of every moment and master
    /// value, and the step count.
    fn snapshot(opt: &AdamW) -> (Vec<Vec<u64>>, Vec<Vec<u64>>, u64) {
        let params = opt
            .params()
            .iter()
            .map(|p| {
                p.to_vec_f64()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect();
        let states = (0..opt.params().len())
            .map(|i| match opt.state(i).unwrap() {
                ParamStateRef::F32 { m, v, master } => m
                    .iter()
                    .chain(v)
                    .chain(master.unwrap_or(&[]))
                    .map(|x| x.to_bits() as u64)
                    .collect(),
                ParamStateRef::F64 { m, v } => m.iter().chain(v).map(|x| x.to_bits()).collect(),
            })
            .collect();
        (params, states, opt.step_count())
    }

    /// (iv) An inf or NaN in one gradient of several: nothing changes (bit for bit), the
    /// report says skipped, and the loss scaler backs off.
    #[test]
    fn non_finite_gradient_skips_the_step_and_the_scaler_backs_off() {
        let mut r = rng("non_finite_gradient_skips_the_step");
        let dtypes = [DType::F32, DType::BF16, DType::F16, DType::F64];
        let params: Vec<Tensor> = dtypes
            .iter()
            .map(|&dt| Tensor::rand_uniform(-1.0, 1.0, [4, 5], dt, &CPU, &mut r).unwrap())
            .collect();
        let cfg = AdamWConfig {
            rounding: Rounding::Stochastic { seed: 9 },
            ..Default::default()
        };
        let mut opt = AdamW::new(params.clone(), cfg).unwrap();
        let mut scaler = DynamicLossScaler::new();
        let scale = scaler.scale();
        let random_grads = |r: &mut rand::rngs::StdRng| -> Vec<Vec<f64>> {
            params
                .iter()
                .map(|p| {
                    (0..p.elem_count())
                        .map(|_| r.random_range(-0.5..0.5) * scale)
                        .collect()
                })
                .collect()
        };
        let make = |vals: &[Vec<f64>]| {
            let mut g = Gradients::default();
            for (p, v) in params.iter().zip(vals) {
                g.insert(
                    p,
                    Tensor::from_vec_as(v.clone(), p.shape().clone(), p.dtype(), &CPU).unwrap(),
                )
                .unwrap();
            }
            g
        };
        let opts = StepOptions {
            grad_scale_inv: 1.0 / scale,
            max_grad_norm: Some(1.0),
        };
        for _ in 0..3 {
            let rep = opt.step(&make(&random_grads(&mut r)), 1e-2, opts).unwrap();
            assert!(!rep.skipped);
            scaler.update(rep.skipped);
        }
        for (bad, bad_param) in [
            (f64::INFINITY, 2usize),
            (f64::NAN, 1),
            (f64::NEG_INFINITY, 0),
            (f64::NAN, 3),
        ] {
            let before = snapshot(&opt);
            let mut vals = random_grads(&mut r);
            vals[bad_param][7] = bad;
            let rep = opt.step(&make(&vals), 1e-2, opts).unwrap();
            assert!(rep.skipped, "{bad} in param {bad_param}: not skipped");
            assert!(!rep.grad_norm.is_finite() && rep.clip_coef == 1.0);
            assert_eq!(
                snapshot(&opt),
                before,
                "{bad} in param {bad_param}: state changed"
            );
            let s0 = scaler.scale();
            scaler.update(rep.skipped);
            assert_eq!(scaler.scale(), s0 / 2.0);
            println!(
                "{bad} in param {bad_param} ({}): skipped, scale {s0} -> {}",
                dtypes[bad_param],
                scaler.scale()
            );
        }
        assert_eq!(opt.step_count(), 3);
        // A clean step afterwards proceeds and counts.
        assert!(
            !opt.step(&make(&random_grads(&mut r)), 1e-2, opts)
                .unwrap()
                .skipped
        );
        assert_eq!(opt.step_count(), 4);
    }

    /// (v) Clipping: the norm is the hand-computed one (of the unscaled gradients), the
    /// coefficient is `max/(norm + 1e-6)`, and the update equals a step with the
    /// gradients pre-multiplied by it.
    #[test]
    fn clipping_uses_the_global_norm() {
        for dtype in [DType::F64, DType::F32] {
            let mk = || {
                let a = Tensor::from_vec_as(vec![0.1f64, 0.2], [2], dtype, &CPU).unwrap();
                let b = Tensor::from_vec_as(vec![-0.3f64], [1, 1], dtype, &CPU).unwrap();
                (a, b)
            };
            let (a1, b1) = mk();
            let (a2, b2) = mk();
            let cfg = AdamWConfig::default();
            let mut clipped = AdamW::new(vec![a1.clone(), b1.clone()], cfg).unwrap();
            let mut manual = AdamW::new(vec![a2.clone(), b2.clone()], cfg).unwrap();
            // grads (3, 4) and (12), scaled by 1024: unscaled norm √(9 + 16 + 144) = 13.
            let s = 1024.0;
            let (ga, gb) = (vec![3.0 * s, 4.0 * s], vec![12.0 * s]);
            let grads = grads_of(&[
                (
                    &a1,
                    Tensor::from_vec_as(ga.clone(), [2], dtype, &CPU).unwrap(),
                ),
                (
                    &b1,
                    Tensor::from_vec_as(gb.clone(), [1, 1], dtype, &CPU).unwrap(),
                ),
            ]);
            let rep = clipped
                .step(
                    &grads,
                    1e-2,
                    StepOptions {
                        grad_scale_inv: 1.0 / s,
                        max_grad_norm: Some(1.0),
                    },
                )
                .unwrap();
            assert_eq!(rep.grad_norm, 13.0);
            assert_eq!(rep.clip_coef, 1.0 / (13.0 + 1e-6));
            // The same step with the gradients clipped by hand, in the compute type (the
            // optimizer multiplies by grad_mul = (1/1024)·coef rounded to T).
            let coef = rep.clip_coef / s;
            let pre = |v: &[f64], p: &Tensor| -> Tensor {
                match dtype {
                    DType::F32 => Tensor::from_vec(
                        v.iter()
                            .map(|x| *x as f32 * coef as f32)
                            .collect::<Vec<f32>>(),
                        p.shape().clone(),
                        &CPU,
                    )
                    .unwrap(),
                    _ => Tensor::from_vec(
                        v.iter().map(|x| x * coef).collect::<Vec<f64>>(),
                        p.shape().clone(),
                        &CPU,
                    )
                    .unwrap(),
                }
            };
            let grads2 = grads_of(&[(&a2, pre(&ga, &a2)), (&b2, pre(&gb, &b2))]);
            let rep2 = manual.step(&grads2, 1e-2, StepOptions::default()).unwrap();
            assert!((rep2.grad_norm - 1.0).abs() < 1e-6 && rep2.clip_coef == 1.0);
            assert_eq!(
                a1.to_vec_f64().unwrap(),
                a2.to_vec_f64().unwrap(),
                "{dtype}"
            );
            assert_eq!(
                b1.to_vec_f64().unwrap(),
                b2.to_vec_f64().unwrap(),
                "{dtype}"
            );
            if dtype == DType::F64 {
                assert_eq!(moments_f64(&clipped, 0), moments_f64(&manual, 0));
                // m = (1 − β₁)·g_clipped after one step.
                let (m, _) = moments_f64(&clipped, 1);
                let want = (1.0 - 0.9) * (12.0 * s * coef);
                assert!((m[0] - want).abs() < 1e-15, "{} vs {want}", m[0]);
            }
            // A large max norm does not clip.
            let rep3 = clipped
                .step(
                    &grads,
                    1e-2,
                    StepOptions {
                        grad_scale_inv: 1.0 / s,
                        max_grad_norm: Some(100.0),
                    },
                )
                .unwrap();
            assert_eq!((rep3.grad_norm, rep3.clip_coef), (13.0, 1.0));
            println!(
                "{dtype}: norm {} clip_coef {}",
                rep.grad_norm, rep.clip_coef
            );
        }
    }

    /// (vi) Stochastic rounding through the optimizer: the parameter is always one of the
    /// two bf16 neighbours of the master, the same seed gives the same bits, another seed
    /// different ones, and the rounding is unbiased on average.
    #[test]
    fn stochastic_rounding_in_the_optimizer() {
        let n = 4096;
        let run = |seed: u64| -> (Vec<bf16>, Vec<f32>) {
            let p = Tensor::from_vec(vec![bf16::from_f32(1.0); n], [n], &CPU).unwrap();
            let cfg = AdamWConfig {
                weight_decay: 0.0,
                rounding: Rounding::Stochastic { seed },
                ..Default::default()
            };
            let mut opt = AdamW::new(vec![p.clone()], cfg).unwrap();
            for _ in 0..3 {
                let g = Tensor::from_vec(vec![bf16::from_f32(1.0); n], [n], &CPU).unwrap();
                opt.step(&grads_of(&[(&p, g)]), 1e-3, StepOptions::default())
                    .unwrap();
            }
            let (_, _, master) = moments_f32(&opt, 0);
            (p.to_vec().unwrap(), master.unwrap())
        };
        let (a, master) = run(1);
        let (b, _) = run(1);
        let (c, _) = run(2);
        assert_eq!(a, b, "same seed, same bits");
        assert_ne!(a, c, "another seed, other bits");
        // master ≈ 1 − 3e-3: between 0.99609375 and 1.0 (bf16 ulp 2^-8 below 1).
        let (lo, hi) = (0.99609375f64, 1.0f64);
        let w = master[0] as f64;
        assert!(master.iter().all(|&x| x == master[0]) && lo < w && w < hi);
        assert!(a.iter().all(|x| x.to_f64() == lo || x.to_f64() == hi));
        let mean = a.iter().map(|x| x.to_f64()).sum::<f64>() / n as f64;
        let frac = (w - lo) / (hi - lo);
        let se = (hi - lo) * (frac * (1.0 - frac) / n as f64).sqrt();
        println!(
            "stochastic bf16: master {w}, mean of {n} params {mean} (err {:.2e}, 5σ {:.2e}); nearest would give {hi}",
            (mean - w).abs(),
            5.0 * se
        );
        assert!((mean - w).abs() < 5.0 * se);
        // Element i of parameter 0 at step 3 used exactly these random bits.
        let key = stream_key(1, 3, 0);
        for (i, x) in a.iter().enumerate().take(64) {
            assert_eq!(
                *x,
                crate::optim::rounding::round_bf16_stochastic(
                    master[i],
                    stream_bits(key, i as u64)
                )
            );
        }
    }

    /// (viii) State memory: 8 bytes per element for f32, 12 for bf16/f16 (+ master), 16 for f64.
    #[test]
    fn state_bytes_by_dtype() {
        let n = 1000;
        for (dtype, per) in [
            (DType::F32, 8),
            (DType::BF16, 12),
            (DType::F16, 12),
            (DType::F64, 16),
        ] {
            let p = Tensor::zeros([n], dtype, &CPU).unwrap();
            let opt = AdamW::new(vec![p], AdamWConfig::default()).unwrap();
            assert_eq!(opt.state_bytes(), per * n, "{dtype}");
        }
        let ps = vec![
            Tensor::zeros([10, 10], DType::F32, &CPU).unwrap(),
            Tensor::zeros([7], DType::BF16, &CPU).unwrap(),
        ];
        assert_eq!(
            AdamW::new(ps, AdamWConfig::default())
                .unwrap()
                .state_bytes(),
            800 + 84
        );
    }

    /// `load_state` refuses a state that does not fit, before changing anything, and
    /// takes one that fits over exactly (the next step equals the source's).
    #[test]
    fn load_state_checks_its_input() {
        let a = Tensor::from_vec(vec![1.0f32, 2.0], [2], &CPU).unwrap();
        let h = Tensor::from_vec(vec![bf16::ONE; 3], [3], &CPU).unwrap();
        let mut opt = AdamW::new(vec![a.clone(), h.clone()], AdamWConfig::default()).unwrap();
        let f32s = |n: usize| vec![0.5f32; n];
        let ok_a = ParamStateOwned::F32 {
            m: f32s(2),
            v: f32s(2),
            master: None,
        };
        let ok_h = ParamStateOwned::F32 {
            m: f32s(3),
            v: f32s(3),
            master: Some(f32s(3)),
        };
        let bad_cases = [
            (vec![ok_a.clone()], "1 parameter states for 2"),
            (
                vec![
                    ParamStateOwned::F32 {
                        m: f32s(3),
                        v: f32s(2),
                        master: None,
                    },
                    ok_h.clone(),
                ],
                "moments of 3 and 2",
            ),
            (
                vec![
                    ParamStateOwned::F32 {
                        m: f32s(2),
                        v: f32s(2),
                        master: Some(f32s(2)),
                    },
                    ok_h.clone(),
                ],
                "only bf16/f16",
            ),
            (
                vec![
                    ok_a.clone(),
                    ParamStateOwned::F32 {
                        m: f32s(3),
                        v: f32s(3),
                        master: None,
                    },
                ],
                "no master copy",
            ),
            (
                vec![
                    ParamStateOwned::F64 {
                        m: vec![0.0; 2],
                        v: vec![0.0; 2],
                    },
                    ok_h.clone(),
                ],
                "f64 moments",
            ),
        ];
        let before = snapshot(&opt);
        for (states, needle) in bad_cases {
            let e = opt.load_state(3, &states).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert_eq!(snapshot(&opt), before);
            assert_eq!(opt.step_count(), 0);
        }
        opt.load_state(3, &[ok_a.clone(), ok_h.clone()]).unwrap();
        assert_eq!(opt.step_count(), 3);
        assert_eq!(opt.state_to_host(0).unwrap(), Some(ok_a));
        assert_eq!(opt.state_to_host(1).unwrap(), Some(ok_h));
    }

    #[test]
    fn param_without_gradient_is_untouched() {
        let a = Tensor::from_vec(vec![1.0f32, 2.0], [2], &CPU).unwrap();
        let b = Tensor::from_vec(vec![f16::from_f32(3.0)], [1], &CPU).unwrap();
        let mut opt = AdamW::new(vec![a.clone(), b.clone()], AdamWConfig::default()).unwrap();
        let rep = opt
            .step(
                &grads_of(&[(&a, Tensor::from_vec(vec![1.0f32, 1.0], [2], &CPU).unwrap())]),
                0.1,
                StepOptions::default(),
            )
            .unwrap();
        assert_eq!(rep.grad_norm, 2f64.sqrt());
        assert_eq!(
            b.to_vec_f64().unwrap(),
            vec![3.0],
            "no grad: no update, no decay"
        );
        assert_ne!(a.to_vec_f64().unwrap(), vec![1.0, 2.0]);
        // An empty set of gradients is a (no-op) step that still counts.
        let rep = opt
            .step(&Gradients::default(), 0.1, StepOptions::default())
            .unwrap();
        assert_eq!(
            (rep.grad_norm, rep.skipped, opt.step_count()),
            (0.0, false, 2)
        );
    }

    #[test]
    fn tracked_params_and_tape_gradients() {
        // The optimizer holds untracked handles; gradients from a later tape match by id.
        let w = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], [1, 3], &CPU).unwrap();
        let x = Tensor::from_vec(vec![1.0f32, -1.0, 0.5], [3, 1], &CPU).unwrap();
        let tape = crate::Tape::new();
        let mut opt = AdamW::new(vec![w.track(&tape)], AdamWConfig::default()).unwrap();
        assert!(!opt.params()[0].requires_grad());
        let loss = crate::ops::matmul(&w.track(&tape), &x).unwrap();
        let grads = tape.backward(&loss).unwrap();
        opt.step(&grads, 0.1, StepOptions::default()).unwrap();
        let got = w.to_vec_f32().unwrap();
        assert!(got[0] < 1.0 && got[1] > 2.0 && got[2] < 3.0, "{got:?}");
    }

    #[test]
    fn gradient_aliasing_a_parameter_is_read_before_the_write() {
        // The gradient of `a` is `a` itself (same storage): no deadlock, and it is used
        // as it was before the step.
        let a = Tensor::from_vec(vec![1.0f64, -1.0], [2], &CPU).unwrap();
        let b = Tensor::from_vec(vec![1.0f64, -1.0], [2], &CPU).unwrap();
        let mut o1 = AdamW::new(vec![a.clone()], AdamWConfig::default()).unwrap();
        let mut o2 = AdamW::new(vec![b.clone()], AdamWConfig::default()).unwrap();
        o1.step(&grads_of(&[(&a, a.clone())]), 0.1, StepOptions::default())
            .unwrap();
        o2.step(
            &grads_of(&[(&b, b.deep_clone().unwrap())]),
            0.1,
            StepOptions::default(),
        )
        .unwrap();
        assert_eq!(a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    }

    #[test]
    fn errors() {
        let a = Tensor::from_vec(vec![1.0f32, 2.0], [2], &CPU).unwrap();
        let bf = Tensor::from_vec(vec![bf16::ONE], [1], &CPU).unwrap();
        let cfg = AdamWConfig::default();
        assert!(AdamW::new(vec![], cfg).is_err());
        assert!(
            AdamW::new(vec![a.clone(), a.clone()], cfg).is_err(),
            "duplicate"
        );
        assert!(
            AdamW::new(vec![a.clone(), a.track(&crate::Tape::new())], cfg).is_err(),
            "duplicate id"
        );
        for bad in [
            AdamWConfig { beta1: 1.0, ..cfg },
            AdamWConfig { beta2: -0.1, ..cfg },
            AdamWConfig { eps: 0.0, ..cfg },
            AdamWConfig {
                weight_decay: f64::NAN,
                ..cfg
            },
        ] {
            assert!(AdamW::new(vec![a.clone()], bad).is_err(), "{bad:?}");
        }
        let mut opt = AdamW::new(vec![a.clone(), bf.clone()], cfg).unwrap();
        let ok = grads_of(&[(&a, Tensor::from_vec(vec![1.0f32, 1.0], [2], &CPU).unwrap())]);
        assert!(opt.step(&ok, f64::NAN, StepOptions::default()).is_err());
        assert!(opt.step(&ok, -1.0, StepOptions::default()).is_err());
        assert!(
            opt.step(
                &ok,
                0.1,
                StepOptions {
                    grad_scale_inv: 0.0,
                    max_grad_norm: None
                }
            )
            .is_err()
        );
        assert!(
            opt.step(
                &ok,
                0.1,
                StepOptions {
                    grad_scale_inv: 1.0,
                    max_grad_norm: Some(0.0)
                }
            )
            .is_err()
        );
        // Wrong gradient dtypes are refused before anything changes.
        let before = snapshot(&opt);
        let wrong = grads_of(&[
            (&a, Tensor::from_vec(vec![1.0f32, 1.0], [2], &CPU).unwrap()),
            (&bf, Tensor::from_vec(vec![1.0f64], [1], &CPU).unwrap()),
        ]);
        assert!(matches!(
            opt.step(&wrong, 0.1, StepOptions::default()),
            Err(Error::DType { .. })
        ));
        let wrong = grads_of(&[(&a, Tensor::from_vec(vec![bf16::ONE; 2], [2], &CPU).unwrap())]);
        assert!(opt.step(&wrong, 0.1, StepOptions::default()).is_err());
        assert_eq!(snapshot(&opt), before);
    }
}
