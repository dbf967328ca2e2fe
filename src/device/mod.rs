//! Devices: where a tensor's storage lives and which backend runs its ops.

use std::fmt;

/// A compute device.
///
/// `Cpu` is the reference backend, always present. `Cuda` runs the hand-written kernels
/// on an NVIDIA GPU and `Sim` runs the same `kernels/*.cu` on the CPU through the
/// simulator; both arrive with the kernel toolchain and, until then, creating a tensor
/// on them returns [`crate::Error::DeviceUnavailable`].
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
