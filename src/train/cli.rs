//! Command-line arguments of `moe data prepare` (and `moe train`, in `trainer.rs`'s terms).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use super::checkpoint;
use super::config::{NanPolicy, TrainConfig};
use super::prepare::{prepare, TextTokenizer};
use super::trainer::Trainer;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    which: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize text files into binary token shards for `moe train` ([data] source = "shards").
    Prepare(PrepareArgs),
}

#[derive(Args)]
struct PrepareArgs {
    /// Text files, or directories whose files (recursively) are read; each file is one document.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Directory for the shards (created; must not already hold shards).
    #[arg(long)]
    out: PathBuf,
    /// A HF tokenizer.json, or `bytes` for the byte-level tokenizer (vocab 257, 256 = end of
    /// document).
    #[arg(long, default_value = "bytes")]
    tokenizer: String,
    /// The end-of-document token (default: the first of <|endoftext|>, </s>, <|end_of_text|>,
    /// <eos> the vocabulary has).
    #[arg(long)]
    eos_token: Option<String>,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: usize,
}

pub fn run_data(args: DataArgs) -> anyhow::Result<()> {
    match args.which {
        DataCommand::Prepare(a) => {
            let tok = TextTokenizer::load(&a.tokenizer, a.eos_token.as_deref())
                .context("loading the tokenizer")?;
            if tok.eos_id().is_none() {
                eprintln!(
                    "note: the tokenizer has no end-of-document token; documents are concatenated \
                     (name one with --eos-token)"
                );
            }
            let r = prepare(&a.inputs, &tok, &a.out, a.shard_tokens)?;
            println!(
                "{} documents, {} tokens (vocab {}) -> {} shard(s) in {}",
                r.documents,
                r.tokens,
                tok.vocab_size(),
                r.shards.len(),
                a.out.display()
            );
            Ok(())
        }
    }
}

/// `moe train`: with no arguments, the default job (a small MoE on the synthetic tasks).
#[derive(Args)]
pub struct TrainArgs {
    /// TOML config with tables [model] [train] [data] [optimizer] [checkpoint]; fields left out
    /// keep the default job's values (print them with --print-config).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Run directory for checkpoints, metrics, plots and the HF export (default:
    /// runs/<UTC date-time>; when resuming, the run's own directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue a run: a checkpoint (RUN/checkpoints/step-N) or a run directory (its newest
    /// checkpoint). Without --config the checkpoint's config is used.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Overrides train.steps (the total, counting steps already done when resuming).
    #[arg(long)]
    steps: Option<u64>,
    /// Overrides train.device: auto | cpu | cuda | cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Overrides train.dtype: f32 | bf16 | f16.
    #[arg(long)]
    dtype: Option<String>,
    /// Overrides train.expert_grad_dtype: f32 | bf16 | f16 (the latter two: the parameters').
    #[arg(long)]
    expert_grad_dtype: Option<String>,
    /// Overrides train.seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Overrides train.on_nan.
    #[arg(long, value_enum)]
    on_nan: Option<NanPolicy>,
    /// Sets train.trace_routing: every step's tokens per expert of each MoE layer go to
    /// RUN/routing.jsonl (`moe simulate --trace` reads it).
    #[arg(long)]
    trace_routing: bool,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// No progress bar or log lines (errors and the final summary still print).
    #[arg(long, short)]
    quiet: bool,
}

/// `runs/YYYYMMDD-HHMMSS` (UTC).
fn default_run_dir() -> PathBuf {
    let (y, m, d, hh, mm, ss) = crate::infer::utc_now();
    PathBuf::from("runs").join(format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}"))
}

pub fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    // The checkpoint to resume from, and the run directory it belongs to.
    let resume = match &a.resume {
        None => None,
        Some(p) if p.join("state.json").exists() => Some(p.clone()),
        Some(p) => {
            let dir = if p.join("checkpoints").is_dir() {
                p.join("checkpoints")
            } else {
                p.clone()
            };
            Some(checkpoint::latest(&dir)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "--resume {}: no checkpoint there (expected RUN/checkpoints/step-N or a step-N \
                     directory)",
                    p.display()
                )
            })?)
        }
    };
    let mut cfg = match (&a.config, &resume) {
        (Some(path), _) => TrainConfig::load(path)?,
        (None, Some(ck)) => TrainConfig::load(&ck.join("config.toml"))?,
        (None, None) => TrainConfig::default(),
    };
    if let Some(s) = a.steps {
        cfg.train.steps = s;
    }
    if let Some(d) = &a.device {
        cfg.train.device = d.clone();
    }
    if let Some(d) = &a.dtype {
        cfg.train.dtype = Some(d.parse().map_err(|e| anyhow::anyhow!("--dtype {d}: {e}"))?);
    }
    if let Some(d) = &a.expert_grad_dtype {
        cfg.train.expert_grad_dtype = Some(
            d.parse()
                .map_err(|e| anyhow::anyhow!("--expert-grad-dtype {d}: {e}"))?,
        );
    }
    if let Some(s) = a.seed {
        cfg.train.seed = s;
    }
    if let Some(p) = a.on_nan {
        cfg.train.on_nan = p;
    }
    if a.trace_routing {
        cfg.train.trace_routing = true;
    }
    if a.print_config {
        cfg.validate()?;
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let run_dir = match (&a.out, &resume) {
        (Some(o), _) => o.clone(),
        (None, Some(ck)) => ck
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"))
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(default_run_dir),
        (None, None) => default_run_dir(),
    };
    let mut trainer = match &resume {
        Some(ck) => {
            let t = Trainer::resume(cfg, ck, &run_dir)?;
            eprintln!("resuming {} at step {}", ck.display(), t.state.step);
            t
        }
        None => {
            if let Some(last) = checkpoint::latest(&run_dir.join("checkpoints"))? {
                anyhow::bail!(
                    "{} already holds a run (checkpoint {}); continue it with --resume {} or \
                     choose another --out",
                    run_dir.display(),
                    last.display(),
                    run_dir.display()
                );
            }
            Trainer::new(cfg, &run_dir)?
        }
    };
    trainer.verbose = !a.quiet;
    let s = trainer.run()?;
    println!(
        "done: {} steps, final loss {:.4}, {:.0} tokens/s, MFU {:.2}%; run directory {}",
        s.steps,
        s.final_loss,
        s.tokens_per_s,
        100.0 * s.mfu,
        run_dir.display()
    );
    Ok(())
}
