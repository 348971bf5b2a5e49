//! Command-line arguments of `moe data prepare` (and `moe train`, in `trainer.rs`'s terms).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::prepare::{prepare, TextTokenizer};

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
