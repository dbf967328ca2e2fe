//! Dynamic loss scaling for f16 training, and the whole mixed-precision step.

use super::adamw::cuda::LossScaleState;
use super::adamw::{AdamW, StepOptions, StepReport};
use crate::device::{Backend, DeviceBuffer};
use crate::storage::{CpuStorage, DeviceStorage, Storage};
use crate::{DType, Device, Error, Gradients, Result, Tape, Tensor};

/// Dynamic loss scaling (the policy of `torch.cuda.amp.GradScaler`).
///
/// f16 has 5 exponent bits: gradients below ~6e-8 flush to zero. Multiplying the loss by
/// a large scale `S` before backward shifts every gradient up by `S`; the optimizer
/// divides it out again (`grad_scale_inv = 1/S`). Too large a scale overflows to inf,
/// which [`AdamW::step`] detects and skips, and the scaler then halves `S`:
///
/// - start at `2^16`;
/// - [`update`](Self::update)`(true)` (an overflow): halve the scale (never below 1)
///   and restart the count of clean steps;
/// - [`update`](Self::update)`(false)`: count a clean step; after `growth_interval`
///   (2000) consecutive clean steps, double the scale and restart the count.
///
/// bf16 has f32's exponent range and needs no loss scaling.
///
/// ```
/// use lorafuse::optim::DynamicLossScaler;
/// let mut s = DynamicLossScaler::with_settings(1024.0, 2)?;
/// s.update(true);
/// assert_eq!(s.scale(), 512.0);
/// s.update(false);
/// s.update(false);
/// assert_eq!(s.scale(), 1024.0);
/// # Ok::<(), lorafuse::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicLossScaler {
    scale: f64,
    growth_interval: u32,
    clean_steps: u32,
    overflows: u64,
}

impl Default for DynamicLossScaler {
    fn default() -> Self {
        DynamicLossScaler::new()
    }
}

impl DynamicLossScaler {
    /// The initial scale, `2^16`.
    pub const DEFAULT_INIT_SCALE: f64 = 65536.0;
    /// Clean steps before the scale doubles.
    pub const DEFAULT_GROWTH_INTERVAL: u32 = 2000;

    /// A scaler starting at `2^16`, growing after 2000 clean steps.
    pub fn new() -> Self {
        DynamicLossScaler {
            scale: Self::DEFAULT_INIT_SCALE,
            growth_interval: Self::DEFAULT_GROWTH_INTERVAL,
            clean_steps: 0,
            overflows: 0,
        }
    }

    /// A scaler with another initial scale (finite, `≥ 1`) and growth interval (`≥ 1`).
    pub fn with_settings(init_scale: f64, growth_interval: u32) -> Result<Self> {
        if !(init_scale >= 1.0 && init_scale.is_finite()) {
            return Err(Error::invalid(format!(
                "loss scaler: initial scale {init_scale} must be finite and >= 1"
            )));
        }
        if growth_interval == 0 {
            return Err(Error::invalid("loss scaler: growth interval must be >= 1"));
        }
        Ok(DynamicLossScaler {
            scale: init_scale,
            growth_interval,
            ..Self::new()
        })
    }

    /// A scaler in a given state, e.g. one read back from a training checkpoint: the
    /// values of [`scale`](Self::scale), [`growth_interval`](Self::growth_interval),
    /// [`clean_steps`](Self::clean_steps) and [`overflows`](Self::overflows).
    ///
    /// Errors: a scale that is not finite and `≥ 1`, a growth interval of 0, or
    /// `clean_steps ≥ growth_interval` (the scale would already have grown).
    ///
    /// ```
    /// use lorafuse::optim::DynamicLossScaler;
    /// let mut s = DynamicLossScaler::new();
    /// s.update(true);
    /// s.update(false);
    /// let back = DynamicLossScaler::from_parts(s.scale(), s.growth_interval(), s.clean_steps(), s.overflows())?;
    /// assert_eq!(back, s);
    /// assert!(DynamicLossScaler::from_parts(1024.0, 4, 4, 0).is_err());
    /// # Ok::<(), lorafuse::Error>(())
    /// ```
    pub fn from_parts(
        scale: f64,
        growth_interval: u32,
        clean_steps: u32,
        overflows: u64,
    ) -> Result<Self> {
        let s = Self::with_settings(scale, growth_interval)?;
        if clean_steps >= growth_interval {
            return Err(Error::invalid(format!(
                "loss scaler: {clean_steps} clean steps with a growth interval of {growth_interval} (the scale would have grown)"
            )));
        }
        Ok(DynamicLossScaler {
            clean_steps,
            overflows,
            ..s
        })
    }

    /// The current scale `S`: seed the backward with it ([`Tape::backward_scaled`]).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `1/S`, the [`StepOptions::grad_scale_inv`] of the step.
    pub fn inv_scale(&self) -> f64 {
        1.0 / self.scale
    }

    /// Clean steps counted since the last change of the scale.
    pub fn clean_steps(&self) -> u32 {
        self.clean_steps
    }

    /// The growth interval.
    pub fn growth_interval(&self) -> u32 {
        self.growth_interval
    }

    /// Overflows seen so far (steps skipped for a non-finite gradient).
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Records the outcome of a step ([`StepReport::skipped`]): backs off on an overflow,
    /// grows after `growth_interval` clean steps.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale = (self.scale * 0.5).max(1.0);
            self.clean_steps = 0;
            self.overflows += 1;
        } else {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        }
    }
}

/// A [`DynamicLossScaler`] kept on a `Sim` or `Cuda` device, so that an f16 training step
/// never waits for the host: the scale `S` seeds the backward from device memory
/// ([`DeviceLossScaler::backward`]), and [`AdamW::step_deferred_scaled`] reads `1/S`
/// there, skips the step on an inf/NaN gradient and updates `S` with exactly
/// [`DynamicLossScaler::update`]'s policy — all in the optimizer's kernels, with no
/// device-to-host copy. [`DeviceLossScaler::to_host`] reads the state back when asked.
///
/// ```
/// use lorafuse::optim::{AdamW, AdamWConfig, DeviceLossScaler, DynamicLossScaler};
/// use lorafuse::{ops, DType, Device, Tape, Tensor};
/// let d = Device::Sim;
/// let w = Tensor::from_vec_as(vec![0.5f32, -1.0, 2.0], [1, 3], DType::F16, &d)?;
/// let x = Tensor::from_vec_as(vec![1.0f32, 0.5, 0.25], [3, 1], DType::F16, &d)?;
/// let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default())?;
/// let mut scaler = DeviceLossScaler::new(&DynamicLossScaler::new(), &d)?;
/// for _ in 0..2 {
///     let tape = Tape::new();
///     let loss = ops::cast(&ops::matmul(&w.track(&tape), &x)?, DType::F32)?;
///     let grads = scaler.backward(&tape, &loss)?;
///     opt.step_deferred_scaled(&grads, 1e-2, Some(1.0), &mut scaler)?;
/// }
/// // As with the host scaler: 2^16·x overflows f16, the first step is skipped and the
/// // scale halves; the second, with 2^15, is applied.
/// let s = scaler.to_host()?;
/// assert_eq!((s.scale(), s.overflows(), s.clean_steps()), (32768.0, 1, 1));
/// assert_eq!(opt.step_count(), 1);
/// # Ok::<(), lorafuse::Error>(())
/// ```
pub struct DeviceLossScaler {
    backend: Backend,
    device: Device,
    /// A [`LossScaleState`].
    state: DeviceBuffer,
    /// One f32, `(f32)S`: the seed of the next backward (written by the optimizer's
    /// finish kernel after each step).
    seed: DeviceStorage,
}

impl std::fmt::Debug for DeviceLossScaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceLossScaler({})", self.device)
    }
}

impl DeviceLossScaler {
    /// A device copy of `scaler` (its scale, counts and growth interval) on `device`.
    ///
    /// Errors: `device` is the CPU (use [`DynamicLossScaler`] there) or is unavailable.
    pub fn new(scaler: &DynamicLossScaler, device: &Device) -> Result<Self> {
        if *device == Device::Cpu {
            return Err(Error::invalid(
                "DeviceLossScaler: the CPU has no device memory; use DynamicLossScaler",
            ));
        }
        let backend = Backend::of(*device)?;
        let host = LossScaleState {
            scale: scaler.scale,
            overflows: scaler.overflows,
            clean_steps: scaler.clean_steps,
            growth_interval: scaler.growth_interval,
        };
        let mut state = backend.alloc(std::mem::size_of::<LossScaleState>())?;
        backend.write(bytemuck::bytes_of(&host), &mut state)?;
        let seed = DeviceStorage::upload(&CpuStorage::F32(vec![scaler.scale as f32]), *device)?;
        Ok(DeviceLossScaler {
            backend,
            device: *device,
            state,
            seed,
        })
    }

    /// The device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The backward seed for `loss`: a device copy of `S` with the loss's shape, queued
    /// (nothing waits). Errors: a loss that is not one f32 element on this device (an f16
    /// loss cannot hold the default scale `2^16`; compute the loss in f32).
    pub fn seed_for(&self, loss: &Tensor) -> Result<Tensor> {
        const OP: &str = "DeviceLossScaler";
        if loss.elem_count() != 1 {
            return Err(Error::shape(
                OP,
                format!("the loss must have one element, got {}", loss.shape()),
            ));
        }
        if loss.dtype() != DType::F32 {
            return Err(Error::DType {
                op: OP,
                lhs: DType::F32,
                rhs: loss.dtype(),
            });
        }
        if loss.device() != self.device {
            return Err(Error::Device {
                op: OP,
                lhs: self.device,
                rhs: loss.device(),
            });
        }
        self.seed_shaped(loss.shape().clone())
    }

    /// The seed as a scalar (shape `[]`, the shape of a mean loss): a device copy of `S`,
    /// queued; e.g. for [`crate::ops::cross_entropy_fused`], which needs the seed before
    /// the forward.
    pub fn seed(&self) -> Result<Tensor> {
        self.seed_shaped(crate::Shape::from(()))
    }

    /// A device copy of the seed under `shape` (one element), queued.
    fn seed_shaped(&self, shape: crate::Shape) -> Result<Tensor> {
        let mut seed = DeviceStorage::alloc(DType::F32, 1, self.device)?;
        self.seed.copy_to(&mut seed)?;
        Tensor::from_storage(Storage::Device(seed), shape)
    }

    /// Backward from `loss` seeded with `S` ([`Tape::backward_with`] and
    /// [`DeviceLossScaler::seed_for`]): every gradient is `S ×` its true value.
    pub fn backward(&self, tape: &Tape, loss: &Tensor) -> Result<Gradients> {
        tape.backward_with(loss, self.seed_for(loss)?)
    }

    /// The state as a host [`DynamicLossScaler`]: waits for the queued steps and reads it
    /// back (one device-to-host copy).
    pub fn to_host(&self) -> Result<DynamicLossScaler> {
        let mut s = LossScaleState::default();
        self.backend
            .read(&self.state, bytemuck::bytes_of_mut(&mut s))?;
        Ok(DynamicLossScaler {
            scale: s.scale,
            growth_interval: s.growth_interval,
            clean_steps: s.clean_steps,
            overflows: s.overflows,
        })
    }

    /// The device addresses of the state and the seed, for the optimizer's kernels
    /// (`&mut`: the kernels write both).
    pub(crate) fn kernel_args(&mut self) -> (u64, u64) {
        (self.state.device_ptr(), self.seed.device_ptr())
    }
}

/// One mixed-precision training step, the full f16 recipe (it works unchanged for f32
/// and bf16, where a scale of 1 would do):
///
/// 1. keep the trainable parameters in f16 and let [`AdamW`] hold their f32 master
///    copies and moments (it does so for every bf16/f16 parameter);
/// 2. compute the loss in **f32** (e.g. cross-entropy on f32 logits, or
///    [`crate::ops::cast`] the last f16 activation): the seed of the backward is the loss
///    scale in the loss's dtype, and `2^16` does not fit in f16 (max 65504);
/// 3. backward seeded with the scale `S` ([`Tape::backward_scaled`]): every gradient is
///    `S ×` its true value, lifting small f16 gradients above f16's underflow;
/// 4. [`AdamW::step`] with `grad_scale_inv = 1/S`: it computes the norm of the
///    *unscaled* gradients, skips the whole step (changing nothing) if any gradient
///    overflowed to inf/NaN, clips to `max_grad_norm`, and updates the f32 masters,
///    rounding them into the f16 parameters;
/// 5. [`DynamicLossScaler::update`] with `report.skipped`: halve `S` after an overflow,
///    double it after 2000 clean steps.
///
/// This function does steps 3–5 and returns the optimizer's report; it consumes the
/// tape's recorded ops. Errors: a loss that is not one element, not on `tape`, or an f16
/// loss while the scale exceeds f16's range; any error of [`AdamW::step`] (the scaler is
/// then left unchanged).
///
/// ```
/// use lorafuse::optim::{scaled_backward_step, AdamW, AdamWConfig, DynamicLossScaler};
/// use lorafuse::{ops, DType, Device, Tape, Tensor};
/// let d = Device::Cpu;
/// let w = Tensor::from_vec_as(vec![0.5f32, -1.0, 2.0], [1, 3], DType::F16, &d)?;
/// let x = Tensor::from_vec_as(vec![1.0f32, 0.5, 0.25], [3, 1], DType::F16, &d)?;
/// let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default())?;
/// let mut scaler = DynamicLossScaler::new();
/// let tape = Tape::new();
/// let loss = ops::cast(&ops::matmul(&w.track(&tape), &x)?, DType::F32)?; // f32 loss
/// let report = scaled_backward_step(&tape, &loss, &mut opt, &mut scaler, 1e-2, Some(1.0))?;
/// // d loss/dw = x = (1, 0.5, 0.25): times 2^16 that overflows f16 (max 65504), so the
/// // step is skipped and the scale halves. The next try, with 2^15, fits.
/// assert!(report.skipped && scaler.scale() == 32768.0 && opt.step_count() == 0);
/// let tape = Tape::new();
/// let loss = ops::cast(&ops::matmul(&w.track(&tape), &x)?, DType::F32)?;
/// let report = scaled_backward_step(&tape, &loss, &mut opt, &mut scaler, 1e-2, Some(1.0))?;
/// assert!(!report.skipped && opt.step_count() == 1);
/// assert_eq!(report.grad_norm, 1.3125f64.sqrt()); // |x|, unscaled
/// # Ok::<(), lorafuse::Error>(())
/// ```
pub fn scaled_backward_step(
    tape: &Tape,
    loss: &Tensor,
    opt: &mut AdamW,
    scaler: &mut DynamicLossScaler,
    lr: f64,
    max_grad_norm: Option<f64>,
) -> Result<StepReport> {
    let scale = scaler.scale();
    if loss.dtype() == DType::F16 && scale > 65504.0 {
        return Err(Error::invalid(format!(
            "scaled_backward_step: the loss is f16 and the loss scale {scale} does not fit in f16; compute the loss in f32"
        )));
    }
    let grads = tape.backward_scaled(loss, scale)?;
    let report = opt.step(
        &grads,
        lr,
        StepOptions {
            grad_scale_inv: scaler.inv_scale(),
            max_grad_norm,
        },
    )?;
    scaler.update(report.skipped);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::optim::AdamWConfig;

    #[test]
    fn backs_off_on_overflow_and_grows_after_the_interval() {
        let mut s = DynamicLossScaler::new();
        assert_eq!(s.scale(), 65536.0);
        s.update(true);
        assert_eq!((s.scale(), s.clean_steps(), s.overflows()), (32768.0, 0, 1));
        for i in 1..2000 {
            s.update(false);
            assert_eq!((s.scale(), s.clean_steps()), (32768.0, i));
        }
        s.update(false);
        assert_eq!(
            (s.scale(), s.clean_steps()),
            (65536.0, 0),
            "doubles after 2000 clean steps"
        );
        // An overflow restarts the count.
        for _ in 0..1999 {
            s.update(false);
        }
        s.update(true);
        assert_eq!((s.scale(), s.clean_steps()), (32768.0, 0));
        s.update(false);
        assert_eq!(s.scale(), 32768.0);
        // Never below 1.
        for _ in 0..40 {
            s.update(true);
        }
        assert_eq!(s.scale(), 1.0);
        assert_eq!(s.inv_scale(), 1.0);
    }

    #[test]
    fn settings_are_validated() {
        assert!(DynamicLossScaler::with_settings(0.5, 10).is_err());
        assert!(DynamicLossScaler::with_settings(f64::INFINITY, 10).is_err());
        assert!(DynamicLossScaler::with_settings(8.0, 0).is_err());
        let s = DynamicLossScaler::with_settings(8.0, 3).unwrap();
        assert_eq!((s.scale(), s.growth_interval()), (8.0, 3));
        assert_eq!(DynamicLossScaler::default(), DynamicLossScaler::new());
    }

    /// The f16 recipe end to end: an overflowing scale is skipped without changes and
    /// backs off; a fitting scale gives the same update as unscaled f32 gradients.
    #[test]
    fn f16_recipe_skips_overflow_and_unscales() {
        let d = Device::Cpu;
        let w = Tensor::from_vec_as(vec![0.5f32, -1.0, 2.0], [1, 3], DType::F16, &d).unwrap();
        let x = Tensor::from_vec_as(vec![1.0f32, 2.0, 3.0], [3, 1], DType::F16, &d).unwrap();
        let w_ref = w.deep_clone().unwrap();
        let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default()).unwrap();
        let mut ref_opt = AdamW::new(vec![w_ref.clone()], AdamWConfig::default()).unwrap();
        let mut scaler = DynamicLossScaler::new();
        let before = w.to_vec_f64().unwrap();
        let mut skipped = 0;
        loop {
            let tape = Tape::new();
            let loss = crate::ops::cast(
                &crate::ops::matmul(&w.track(&tape), &x).unwrap(),
                DType::F32,
            )
            .unwrap();
            let rep =
                scaled_backward_step(&tape, &loss, &mut opt, &mut scaler, 1e-2, None).unwrap();
            if !rep.skipped {
                break;
            }
            skipped += 1;
            assert_eq!(w.to_vec_f64().unwrap(), before);
        }
        // The gradient (1, 2, 3)·S fits in f16 (max 65504) from S = 2^14 on.
        assert_eq!(
            (skipped, scaler.scale(), scaler.overflows()),
            (2, 16384.0, 2)
        );
        // The reference: the exact gradient x, unscaled, in f16.
        let mut g = crate::Gradients::default();
        g.insert(
            &w_ref,
            Tensor::from_vec_as(vec![1.0f32, 2.0, 3.0], [1, 3], DType::F16, &d).unwrap(),
        )
        .unwrap();
        ref_opt.step(&g, 1e-2, StepOptions::default()).unwrap();
        assert_eq!(w.to_vec_f64().unwrap(), w_ref.to_vec_f64().unwrap());
        // An f16 loss with a scale past f16's range is refused.
        let tape = Tape::new();
        let loss16 = crate::ops::matmul(&w.track(&tape), &x).unwrap();
        let mut big = DynamicLossScaler::new();
        assert!(scaled_backward_step(&tape, &loss16, &mut opt, &mut big, 1e-2, None).is_err());
    }
}
