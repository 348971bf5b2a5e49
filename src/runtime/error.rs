//! The runtime's error type: every op checks shapes, dtypes and devices and says what it found
//! and what it expected, instead of panicking.

use super::{DType, Device};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: dtype {got} is not supported here (expected {expected})")]
    DType {
        op: &'static str,
        got: DType,
        expected: String,
    },
    #[error("{op}: tensors live on different devices ({a} and {b})")]
    DeviceMismatch {
        op: &'static str,
        a: Device,
        b: Device,
    },
    #[error("unknown device '{0}': expected auto, cpu, cuda or cuda:N")]
    BadDevice(String),
    #[error("CUDA device requested ('{requested}') but none is usable: {reason}")]
    CudaUnavailable { requested: String, reason: String },
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: &'static str, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    pub fn dtype(op: &'static str, got: DType, expected: impl Into<String>) -> Self {
        Error::DType {
            op,
            got,
            expected: expected.into(),
        }
    }
    pub fn cuda(op: &'static str, err: impl std::fmt::Display) -> Self {
        Error::Cuda {
            op,
            msg: err.to_string(),
        }
    }
}
