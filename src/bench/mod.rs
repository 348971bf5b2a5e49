//! `moe bench`: timed runs of kernels and layers on one device. Timings use CUDA events on the
//! GPU (warm-up first, median of repeats) and a monotonic clock on the CPU. Results are printed
//! as a table with the achieved rate beside the device ceiling; BENCHMARKS.md records them.

mod decode_ops;
pub mod generate;
mod moe_layer;
mod ops;
mod timer;
pub mod train;

pub use timer::{median_ms, Timer};

use crate::runtime::{DType, Device, Result, Tensor};

/// Random Normal(0, std²) values for benchmarks: a 4M-element random block repeated to fill the
/// shape (fast for billions of elements; the values only need to be non-trivial).
pub fn random_tensor(
    shape: &[usize],
    std: f32,
    seed: u64,
    dtype: DType,
    device: Device,
) -> Result<Tensor> {
    const BLOCK: usize = 1 << 22;
    let n: usize = shape.iter().product();
    if n <= BLOCK {
        return Tensor::randn(shape, std, seed, dtype, device);
    }
    let block = Tensor::randn(&[BLOCK], std, seed, dtype, device)?;
    let mut out = Tensor::uninit(&[n], dtype, device)?;
    let mut at = 0;
    while at < n {
        let len = BLOCK.min(n - at);
        let part = if len == BLOCK {
            block.try_clone()?
        } else {
            crate::runtime::ops::slice_rows(&block, 0, len)?
        };
        crate::runtime::ops::write_rows(&mut out, at, &part)?;
        at += len;
    }
    out.reshape(shape)
}

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand)]
enum Which {
    /// A large bf16 GEMM (TFLOP/s) and large elementwise ops (GB/s) against the device ceilings.
    Ops(ops::OpsArgs),
    /// The MoE layer forward and forward+backward (bf16 on GPU) on the standard shapes.
    MoeLayer(moe_layer::MoeLayerArgs),
    /// The kernels of a batch-1 decode step, each timed inside a CUDA graph.
    DecodeOps(decode_ops::DecodeOpsArgs),
    /// Prefill and decode tokens/s of a model directory vs the HBM roofline.
    Generate(generate::GenerateBenchArgs),
    /// Training step tokens/s and MFU of an OLMoE-shaped model (phases timed).
    Train(train::TrainBenchArgs),
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.which {
        Which::Ops(a) => ops::run(a),
        Which::MoeLayer(a) => moe_layer::run(a),
        Which::DecodeOps(a) => decode_ops::run(a),
        Which::Generate(a) => generate::run(a),
        Which::Train(a) => train::run(a),
    }
}
