//! `moe bench`: timed runs of kernels and layers on one device. Timings use CUDA events on the
//! GPU (warm-up first, median of repeats) and a monotonic clock on the CPU. Results are printed
//! as a table with the achieved rate beside the device ceiling; BENCHMARKS.md records them.

mod ops;
mod timer;

pub use timer::{median_ms, Timer};

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
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.which {
        Which::Ops(a) => ops::run(a),
    }
}
