//! What the Hopper (sm_90a) launchers share — `lora_matmul/wgmma.rs` (the GEMM) and
//! `attention/wgmma.rs` (the attention forward): the public on/off switch each has, what the
//! backend offers them ([`Target`]), and whether a kernel runs ([`choose`]).

use crate::device::Backend;
use crate::{Error, Result};
use std::sync::atomic::{AtomicU8, Ordering};

/// An automatic Hopper path's switch: on unless the environment variable `env` is `0` at the
/// first read, or as [`Switch::set`] last set it.
pub(crate) struct Switch {
    /// 0 = not read yet, 1 = on, 2 = off.
    state: AtomicU8,
    env: &'static str,
}

impl Switch {
    /// A switch read from `env` at its first use.
    pub(crate) const fn new(env: &'static str) -> Switch {
        Switch {
            state: AtomicU8::new(0),
            env,
        }
    }

    /// Whether the path is on.
    pub(crate) fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            0 => {
                let on = std::env::var(self.env).as_deref() != Ok("0");
                // Another thread's `set` wins over the environment.
                let _ = self.state.compare_exchange(
                    0,
                    if on { 1 } else { 2 },
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                self.state.load(Ordering::Relaxed) == 1
            }
            v => v == 1,
        }
    }

    /// Turns the path on or off for the launches after it.
    pub(crate) fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

/// Whether `device` can run `kernel` from its sm_90a cubin: a CUDA GPU of compute capability
/// 9.0 whose module loaded from it (built by nvcc). False on the CPU and the simulator; an
/// error when the GPU cannot be used.
pub(crate) fn available(device: &crate::Device, kernel: &str) -> Result<bool> {
    match device {
        crate::Device::Cuda(_) => Backend::of(*device)?.runs_arch_specific_cubin(kernel),
        _ => Ok(false),
    }
}

/// What the backend offers a Hopper kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The simulator: it runs the kernel when a test forces it; automatic dispatch never
    /// picks it there (the sm_80 kernels are what the other tests check).
    Simulator,
    /// A GPU; `sm90a` when the module loaded from its `sm_90a` cubin (compute capability
    /// exactly 9.0 and nvcc at build time).
    Gpu { sm90a: bool },
}

impl Target {
    /// The target `backend` offers `kernel`. A module that fails to load is an error when
    /// the kernel is `forced`; the automatic path then keeps the sm_80 kernels, which load
    /// on their own.
    pub(crate) fn of(backend: &Backend, kernel: &str, forced: bool) -> Result<Target> {
        Ok(match backend {
            Backend::Sim => Target::Simulator,
            Backend::Cuda(_) => Target::Gpu {
                sm90a: match backend.runs_arch_specific_cubin(kernel) {
                    Ok(sm90a) => sm90a,
                    Err(e) if forced => return Err(e),
                    Err(_) => false,
                },
            },
        })
    }
}

/// Whether a launch runs on the Hopper kernel (`what`, for errors) of `op`: when `forced`,
/// always (an error where the GPU cannot run it, or `why_not` says the operands do not
/// qualify); otherwise on a GPU with the sm_90a cubin when they qualify and the switch is on
/// (`disabled` when off).
pub(crate) fn choose(
    op: &'static str,
    what: &str,
    forced: bool,
    target: Target,
    why_not: Option<&str>,
    disabled: bool,
) -> Result<bool> {
    let unsupported = |msg: String| Error::Unsupported { op, msg };
    if forced {
        if let Target::Gpu { sm90a: false } = target {
            return Err(unsupported(format!(
                "the {what} needs a compute-capability 9.0 GPU and its sm_90a cubin (built by nvcc)"
            )));
        }
        return match why_not {
            Some(why) => Err(unsupported(format!("the {what} cannot take it: {why}"))),
            None => Ok(true),
        };
    }
    Ok(target == (Target::Gpu { sm90a: true }) && why_not.is_none() && !disabled)
}

#[cfg(test)]
mod tests {
    /// A public switch's getter and setter.
    type Accessors = (fn() -> bool, fn(bool));

    /// The public switches: each off, then on again (the state other tests see is restored).
    #[test]
    fn the_public_switches_round_trip() {
        let switches: [Accessors; 2] = [
            (crate::ops::hopper_gemm, crate::ops::set_hopper_gemm),
            (
                crate::ops::hopper_attention,
                crate::ops::set_hopper_attention,
            ),
        ];
        for (get, set) in switches {
            let before = get();
            set(false);
            assert!(!get());
            set(true);
            assert!(get());
            set(before);
        }
    }
}
