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
    /// Measure kernels and layers on a device (prints a table; see BENCHMARKS.md).
    Bench(moe::bench::BenchArgs),
    /// Prepare training data: `moe data prepare FILES --out DIR` tokenizes text into shards.
    Data(moe::train::DataArgs),
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
        Command::Bench(args) => moe::bench::run(args),
        Command::Data(args) => moe::train::run_data(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
