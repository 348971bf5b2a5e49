//! Inference: `moe generate` and `moe chat` over a Hugging Face model directory (or our own
//! exports). Tokenizer, chat template and generation defaults come from the directory; the
//! model runs with a per-layer KV cache (prefill, then one decode step per token).

mod cli;
pub mod generate;
pub mod sampler;
pub mod text;

use std::path::PathBuf;

pub(crate) use cli::{chat_prompt, eos_ids, open_model};
pub use cli::{run_chat, run_generate, ChatArgs, GenerateArgs};
pub use generate::{generate, Finish, GenOptions, GenTiming, Generation, Progress};
pub use sampler::{Sampler, SamplingParams};
pub use text::{utc_now, GenerationDefaults, Message, StreamDecoder, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
