//! Optimisation: mixed-precision [`AdamW`], dynamic loss scaling for f16
//! ([`DynamicLossScaler`]), global gradient-norm clipping and the learning-rate schedule
//! [`WarmupCosine`].
//!
//! This is the CPU reference of the optimizer. A CUDA multi-tensor kernel mirrors it
//! element for element, so the per-element math is one small documented function
//! ([`adamw_element`]) fed with per-step scalars the host computes once in f64
//! ([`StepConstants`]); the stochastic rounding of the fp32 master weights into bf16/f16
//! parameters is a pure function of `(seed, step, parameter index, element index)`
//! ([`rounding`]).
//!
//! A training step:
//!
//! 1. `grads = tape.backward(&loss)?` (or `backward_scaled` with a loss scale, see
//!    [`scaled_backward_step`]);
//! 2. `report = opt.step(&grads, schedule.lr(opt.step_count()), StepOptions { .. })?`:
//!    one pass computes the global gradient norm and looks for inf/NaN; a step with a
//!    non-finite gradient changes nothing; otherwise the gradients are clipped to
//!    `max_grad_norm` and every parameter that has a gradient is updated in place.
//!
//! ```
//! use lorafuse::optim::{AdamW, AdamWConfig, StepOptions, WarmupCosine};
//! use lorafuse::{ops, Device, Tape, Tensor};
//! let d = Device::Cpu;
//! let w = Tensor::from_vec(vec![0.5f32, -1.0, 2.0], [1, 3], &d)?;
//! let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], [3, 1], &d)?;
//! let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default())?;
//! let schedule = WarmupCosine::new(1e-2, 1e-3, 2, 10)?;
//! for _ in 0..3 {
//!     let tape = Tape::new();
//!     let loss = ops::matmul(&w.track(&tape), &x)?; // [1, 1]: w·x
//!     let grads = tape.backward(&loss)?;
//!     let lr = schedule.lr(opt.step_count());
//!     let report = opt.step(&grads, lr, StepOptions { max_grad_norm: Some(1.0), ..Default::default() })?;
//!     assert!(!report.skipped);
//! }
//! assert_eq!(opt.step_count(), 3);
//! // Every weight moved against its gradient (x > 0).
//! assert!(w.to_vec_f32()?.iter().zip([0.5, -1.0, 2.0]).all(|(a, b)| *a < b));
//! # Ok::<(), lorafuse::Error>(())
//! ```

pub(crate) mod adamw;
mod loss_scale;
pub mod rounding;
mod schedule;

pub use adamw::{
    AdamW, AdamWConfig, ParamStateOwned, ParamStateRef, PendingStepReport, StepConstants,
    StepOptions, StepReport, adamw_element, pow_by_squaring,
};
pub use loss_scale::{DeviceLossScaler, DynamicLossScaler, scaled_backward_step};
pub use rounding::Rounding;
pub use schedule::WarmupCosine;
