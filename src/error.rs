//! The crate's error type. Every fallible public function returns [`Result`].

use crate::{DType, Device, Shape};

/// Everything that can go wrong in lorafuse. Bad input is an error, never a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An op got tensors whose shapes do not fit together.
    #[error("{op}: shape mismatch: {msg}")]
    Shape {
        /// The op that refused its inputs.
        op: &'static str,
        /// What was expected and what came.
        msg: String,
    },
    /// An op got tensors of different dtypes where they must agree.
    #[error("{op}: dtype mismatch: {lhs:?} vs {rhs:?}")]
    DType {
        /// The op that refused its inputs.
        op: &'static str,
        /// The first dtype.
        lhs: DType,
        /// The dtype that disagreed with it.
        rhs: DType,
    },
    /// An op got tensors that live on different devices.
    #[error("{op}: device mismatch: {lhs} vs {rhs}")]
    Device {
        /// The op that refused its inputs.
        op: &'static str,
        /// The first device.
        lhs: Device,
        /// The device that disagreed with it.
        rhs: Device,
    },
    /// The requested device is not present or not built into this binary.
    #[error("device {device} unavailable: {reason}")]
    DeviceUnavailable {
        /// The device asked for.
        device: Device,
        /// Why it cannot be used.
        reason: String,
    },
    /// Tensors recorded on two different tapes were combined.
    #[error("{op}: inputs are recorded on different tapes")]
    TapeMismatch {
        /// The op that refused its inputs.
        op: &'static str,
    },
    /// A valid request that this backend or dtype does not support.
    #[error("{op}: unsupported: {msg}")]
    Unsupported {
        /// The op.
        op: &'static str,
        /// What is not supported.
        msg: String,
    },
    /// An argument outside its domain (a rank of 0, a probability of 1.5, a token id past the vocabulary, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A malformed or mismatched checkpoint, config or adapter file.
    #[error("format error in {path}: {msg}")]
    Format {
        /// The file (or a description of the source).
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A CUDA driver, NVRTC or cuBLAS call failed.
    #[error("CUDA: {call} failed: {msg}")]
    Cuda {
        /// The call (or step) that failed, e.g. `cuMemAlloc` or `load module elementwise`.
        call: &'static str,
        /// The driver's error, with any log.
        msg: String,
    },
    /// A kernel could not be launched or failed while running (on a GPU or the simulator).
    #[error("kernel {kernel}: {msg}")]
    Kernel {
        /// The kernel's symbol.
        kernel: String,
        /// What went wrong.
        msg: String,
    },
    /// An I/O error, with the path it concerns.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub(crate) fn unsupported(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Unsupported {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn format(path: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Checks that two shapes are equal.
    pub(crate) fn check_same_shape(op: &'static str, a: &Shape, b: &Shape) -> Result<()> {
        if a == b {
            Ok(())
        } else {
            Err(Error::shape(op, format!("{a} vs {b}")))
        }
    }
}
