//! The `moe` command line. Each subcommand's arguments and work live in its module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moe",
    version,
    about = "Train and serve Mixture-of-Experts transformers on CPU and NVIDIA GPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an MoE language model (no arguments: the default job on the synthetic tasks).
    Train(moe::train::TrainArgs),
    /// Generate text from a Hugging Face model directory (streams to stdout; --json for ids).
    Generate(moe::infer::GenerateArgs),
    /// Chat with a model interactively (its chat template applied).
    Chat(moe::infer::ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API with continuous batching.
    Serve(moe::serve::ServeArgs),
    /// Measure kernels and layers on a device (prints a table; see BENCHMARKS.md).
    Bench(moe::bench::BenchArgs),
    /// Prepare training data: `moe data prepare FILES --out DIR` tokenizes text into shards.
    Data(moe::train::DataArgs),
    /// Predict step time, load balance, drops and memory per GPU of expert placements (static,
    /// capacity, rebalance, swift) on 8-256 GPUs from a routing trace and a cost file.
    Simulate(moe::simulate::SimulateArgs),
    /// Start N worker processes of this binary on this host with torchrun's environment
    /// (`moe launch --nproc 4 -- train --config run.toml`); a failing rank stops the others.
    Launch(moe::dist::launch::LaunchArgs),
    /// Compile the CUDA kernels for GPU archs into the kernel cache ($MOE_CACHE_DIR or
    /// ~/.cache/moe): NVRTC only, no GPU needed, so a deployment pays the compile beforehand.
    Kernels {
        /// Target archs: sm_90a (Hopper), sm_80 (Ampere), sm_89, ...
        #[arg(long, value_delimiter = ',', default_value = "sm_90a")]
        arch: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => moe::train::run_train(args),
        Command::Generate(args) => moe::infer::run_generate(args),
        Command::Chat(args) => moe::infer::run_chat(args),
        Command::Serve(args) => moe::serve::run(args),
        Command::Bench(args) => moe::bench::run(args),
        Command::Data(args) => moe::train::run_data(args),
        Command::Simulate(args) => moe::simulate::run(args),
        Command::Launch(args) => moe::dist::launch::run_launch(&args).map_err(Into::into),
        Command::Kernels { arch } => precompile(&arch),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn precompile(archs: &[String]) -> anyhow::Result<()> {
    use moe::runtime::cuda;
    for arch in archs {
        let digits = arch.strip_prefix("sm_").map(|d| d.trim_end_matches('a'));
        anyhow::ensure!(
            digits.is_some_and(|d| d.len() >= 2 && d.bytes().all(|b| b.is_ascii_digit())),
            "--arch {arch:?}: expected sm_<major><minor>[a], e.g. sm_90a or sm_80"
        );
    }
    for arch in archs {
        let t = std::time::Instant::now();
        for (name, cached, s) in cuda::precompile(arch)? {
            let how = if cached { "cached" } else { "compiled" };
            println!("{arch} {name:<16} {how:<8} {s:6.1} s");
        }
        println!(
            "{arch}: all kernel families in {} ({:.1} s)",
            cuda::cache_dir().display(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
