//! moe: train and serve Mixture-of-Experts transformers on CPU and NVIDIA GPUs.
//!
//! Layers, each using only those below it: `bench` (timed runs) over `runtime` (tensors, ops,
//! CPU and CUDA backends).

pub mod bench;
pub mod dist;
pub mod infer;
pub mod model;
pub mod moe;
pub mod placement;
pub mod runtime;
pub mod serve;
pub mod simulate;
pub mod train;
