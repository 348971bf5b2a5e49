//! Training: `moe train` and `moe data prepare`.
//!
//! A run reads a `TrainConfig` (TOML: `[model]`, `[train]`, `[data]`, `[optimizer]`,
//! `[checkpoint]`; every field has the default job's value), draws micro-batches from token
//! shards or the synthetic task corpus, runs the model's forward and backward, and updates with
//! AdamW (f32 masters and moments, clipping, accumulation, warmup + decay). Checkpoints are
//! safetensors + a JSON sidecar written atomically; a resumed run continues bit-identically.

pub mod checkpoint;
mod cli;
pub mod config;
pub mod data;
mod error;
pub mod metrics;
pub mod optimizer;
pub mod plots;
pub mod prepare;
pub mod progress;
pub mod schedule;
pub mod synthetic;
pub mod trainer;

pub use cli::{run_data, run_train, DataArgs, TrainArgs};
pub use error::{Error, Result};
