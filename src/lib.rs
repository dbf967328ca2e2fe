//! # lorafuse
//!
//! Hand-written CUDA kernels for LoRA fine-tuning, a small tape-based autograd, and a
//! GPT-2-style transformer that trains end to end — checked against an exact CPU
//! reference. This crate is that reference plus the engine around it:
//!
//! - [`Tensor`]: shaped, typed storage on a [`Device`] (f32, f64, bf16, f16);
//! - [`Tape`]: records each op's backward next to its forward; frozen weights and
//!   inference record nothing;
//! - [`ops`]: every op of the model with forward and backward, including the fused
//!   LoRA linear [`ops::lora_linear`];
//! - [`lora`]: PEFT-compatible adapters (r, α, rsLoRA, targets, merge/unmerge);
//! - [`model`]: GPT-2 with GPT-2's parameter names and safetensors layout;
//! - [`optim`]: mixed-precision AdamW, loss scaling, clipping, schedules;
//! - [`data`]: the synthetic tasks of the demo, and [`demo`] its training loop;
//! - [`study`]: the LoRA paper's §7 analyses (`lorafuse study`);
//! - [`text`]: GPT-2's tokenizer, text datasets, packing and the resumable batch cursor.
//!
//! ```
//! use lorafuse::{ops, Device, DType, Tape, Tensor};
//! // y = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ with a frozen W0: only A and B get gradients.
//! let d = Device::Cpu;
//! let mut rng = rand::rng();
//! let x = Tensor::randn(1.0, [4, 8], DType::F32, &d, &mut rng)?;
//! let w0 = Tensor::randn(1.0, [6, 8], DType::F32, &d, &mut rng)?;
//! let tape = Tape::new();
//! let a = Tensor::randn(0.1, [2, 8], DType::F32, &d, &mut rng)?.track(&tape);
//! let b = Tensor::zeros([6, 2], DType::F32, &d)?.track(&tape);
//! let term = ops::LoraTerm { a: &a, b: &b, scale: 2.0, out_range: 0..6 };
//! let y = ops::lora_linear(&x, None, &w0, None, &[term])?;
//! let grads = tape.backward_with(&y, Tensor::ones_like(&y)?)?;
//! assert!(grads.get(&a).is_some() && grads.get(&b).is_some() && grads.get(&w0).is_none());
//! # Ok::<(), lorafuse::Error>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod demo;
pub mod device;
mod dtype;
mod error;
pub mod lora;
mod math;
pub mod model;
pub mod ops;
pub mod optim;
mod shape;
pub mod storage;
pub mod study;
mod tape;
mod tensor;
pub mod testing;
pub mod text;
pub mod train;

/// The README's examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use device::{Device, MemoryStats};
pub use dtype::{DType, Element, Real};
pub use error::{Error, Result};
pub use shape::Shape;
pub use tape::{Gradients, Tape};
pub use tensor::{Tensor, TensorId};
