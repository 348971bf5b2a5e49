//! The runtime: `Tensor` (shape, dtype, device) and the ops an MoE transformer needs, as plain
//! functions over tensors. Each op checks its inputs, then runs its CPU twin (rayon + the `gemm`
//! crate, f32 math for bf16/f16 data; the reference) or its CUDA kernel (`cuda/kernels/*.cu`,
//! NVRTC-compiled) on the tensors' device. Outputs are fresh tensors on the same device.

pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod ops;
pub mod params;
pub mod settings;
mod tensor;

pub use device::Device;
pub use dtype::{DType, Element, FloatElement};
pub use error::{Error, Result};
pub use params::ParamSet;
pub use settings::KernelSettings;
pub use tensor::{set_poison_outputs, Tensor};

pub(crate) use tensor::cpu_from_f32;
