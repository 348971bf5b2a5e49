//! Errors of the training layer. Each names the file, field or step concerned, what was found
//! and what was expected; the CLI adds context and prints them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An invalid configuration value: "section.field = value: constraint".
    #[error("invalid config: {0}")]
    Config(String),
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// A step's loss or gradient norm was NaN or infinite and `train.on_nan = "stop"`.
    #[error(
        "step {step}: {what} is not finite; stopped (on_nan = \"stop\"). The last good state is \
         saved in {}; resume from it with --resume, or set train.on_nan = \"skip\"",
        saved.display()
    )]
    NonFinite {
        step: u64,
        what: String,
        saved: PathBuf,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
