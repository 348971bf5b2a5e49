//! `TrainConfig`: the TOML file of a training run, five tables:
//!   [model]       the network (`model::NativeSpec`: sizes, MoE layer pattern, router, losses)
//!   [train]       steps, batch, sequence length, accumulation, seed, device, dtype, NaN policy
//!   [data]        `source = "synthetic"` (built-in tasks) or `"shards"` (`dir = ...`)
//!   [optimizer]   AdamW, schedule, weight-decay exclusions, clipping
//!   [checkpoint]  how often to save, how many to keep, HF export at the end
//! Every field has a default; all defaults together are the default job (`moe train` with no
//! arguments): a 4-layer d128 MoE (8 experts, top-2) on the synthetic tasks, a few minutes on two
//! CPU cores. `validate` names the field, the value and the constraint.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::checkpoint::CheckpointConfig;
use super::data::DataConfig;
use super::optimizer::OptimizerConfig;
use super::{Error, Result};
use crate::model::{ModelConfig, NativeMoe, NativeSpec, QkNorm};
use crate::moe::{ExpertKind, MoeConfig, RouterKind};
use crate::runtime::{DType, Device};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "default_model")]
    pub model: NativeSpec,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

/// What to do when a step's loss or gradient norm is NaN or infinite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    /// Skip the update (gradients dropped) and go on; the step is marked in metrics.jsonl.
    Skip,
    /// Save a checkpoint of the last good state and stop with an error.
    #[default]
    Stop,
}

/// `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "d_steps")]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_seq")]
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    #[serde(default)]
    pub seed: u64,
    /// auto | cpu | cuda | cuda:N
    #[serde(default = "d_device")]
    pub device: String,
    /// Parameter and activation dtype (default: bf16 on a GPU, f32 on the CPU); the optimizer
    /// keeps f32 masters either way.
    #[serde(default)]
    pub dtype: Option<DType>,
    #[serde(default = "d_log")]
    pub log_every: u64,
    #[serde(default)]
    pub on_nan: NanPolicy,
    /// Re-run each block's forward in the backward instead of keeping its activations.
    #[serde(default)]
    pub recompute: bool,
    /// Held-out prompts per task scored (and a few printed) at the end of a synthetic run.
    #[serde(default = "d_eval")]
    pub eval_per_task: usize,
    /// The routed experts' weight-gradient buffers (most of an MoE model's gradient bytes): f32
    /// (default) or the parameters' dtype (bf16 / f16: half the memory and half the bytes the
    /// grouped GEMMs write; each micro-batch's gradient, and the sum over micro-batches, is then
    /// rounded to it, as PyTorch's `.grad` of bf16 parameters is). Every other gradient stays f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_grad_dtype: Option<DType>,
    /// Write every step's tokens per expert of each MoE layer to `routing.jsonl` in the run
    /// directory (`routing-from-step-N.jsonl` when resuming): the trace `moe simulate` reads.
    #[serde(default)]
    pub trace_routing: bool,
}

fn d_steps() -> u64 {
    600
}
fn d_batch() -> usize {
    32
}
fn d_seq() -> usize {
    64
}
fn d_one() -> usize {
    1
}
fn d_device() -> String {
    "auto".into()
}
fn d_log() -> u64 {
    50
}
fn d_eval() -> usize {
    20
}

impl TrainSection {
    /// The routed experts' gradient dtype for parameters of `dtype`: `expert_grad_dtype`, f32
    /// by default; anything but f32 or `dtype` is an error naming the field.
    pub fn expert_grads(&self, dtype: DType) -> Result<DType> {
        match self.expert_grad_dtype {
            None => Ok(DType::F32),
            Some(d) if d == DType::F32 || d == dtype => Ok(d),
            Some(d) => Err(Error::Config(format!(
                "train.expert_grad_dtype = {d}: must be f32 or the parameters' dtype ({dtype}; \
                 train.dtype, else bf16 on a GPU and f32 on the CPU)"
            ))),
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            steps: d_steps(),
            batch_size: d_batch(),
            seq_len: d_seq(),
            grad_accum: d_one(),
            seed: 0,
            device: d_device(),
            dtype: None,
            log_every: d_log(),
            on_nan: NanPolicy::default(),
            recompute: false,
            eval_per_task: d_eval(),
            expert_grad_dtype: None,
            trace_routing: false,
        }
    }
}

/// The default job's model: 4 layers, d 128, 4 heads, every layer MoE with 8 SwiGLU experts of
/// 256 hidden units, softmax top-2 router, load-balancing loss 0.01, z-loss 0.001; byte vocab.
pub fn default_model() -> NativeSpec {
    NativeSpec {
        vocab_size: super::synthetic::VOCAB,
        d_model: 128,
        n_layers: 4,
        n_heads: 4,
        n_kv_heads: None,
        head_dim: None,
        max_seq_len: 256,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        qkv_bias: false,
        qk_norm: QkNorm::None,
        ffn_dim: 512,
        moe: Some(NativeMoe {
            every: 1,
            first_dense: 0,
            experts: vec![8],
            layer: MoeConfig {
                d_model: 0,
                n_experts: 0,
                top_k: 2,
                ffn_dim: 256,
                expert: ExpertKind::SwiGlu,
                expert_bias: false,
                router: RouterKind::Softmax { renormalize: true },
                shared: None,
                residual: None,
                aux_loss_coeff: 0.01,
                z_loss_coeff: 0.001,
            },
        }),
        init_std: 0.02,
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: default_model(),
            train: TrainSection::default(),
            data: DataConfig::default(),
            optimizer: OptimizerConfig::default(),
            checkpoint: CheckpointConfig::default(),
        }
    }
}

/// Fields that may change when a run is resumed (everything else must match the checkpoint).
pub const RESUMABLE_CHANGES: &[&str] = &[
    "train.steps",
    "train.trace_routing",
    "train.device",
    "train.log_every",
    "train.on_nan",
    "train.eval_per_task",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.export_hf",
];

impl TrainConfig {
    /// Parses a TOML file (unknown fields are errors).
    pub fn load(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Data {
                path: path.to_path_buf(),
                msg,
            },
            e => e,
        })
    }

    pub fn parse(text: &str) -> Result<TrainConfig> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    pub fn to_toml(&self) -> String {
        // Plain data with string keys: serialisation cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks every section and returns the resolved model config.
    pub fn validate(&self) -> Result<ModelConfig> {
        let model = self.model.resolve().map_err(Error::Config)?;
        let t = &self.train;
        let bad = |f: &str, v: String, want: String| {
            Err(Error::Config(format!("train.{f} = {v}: {want}")))
        };
        if t.steps == 0 {
            return bad("steps", "0".into(), "must be >= 1".into());
        }
        if t.batch_size == 0 {
            return bad("batch_size", "0".into(), "must be >= 1".into());
        }
        if t.grad_accum == 0 {
            return bad("grad_accum", "0".into(), "must be >= 1".into());
        }
        if t.log_every == 0 {
            return bad("log_every", "0".into(), "must be >= 1".into());
        }
        if t.seq_len < 2 || t.seq_len > model.max_seq_len {
            return bad(
                "seq_len",
                t.seq_len.to_string(),
                format!("must be in 2..=model.max_seq_len ({})", model.max_seq_len),
            );
        }
        if let Some(d) = t.dtype {
            if !d.is_float() {
                return bad("dtype", d.to_string(), "must be f32, bf16 or f16".into());
            }
        }
        Device::parse(&t.device)
            .map_err(|e| Error::Config(format!("train.device = {:?}: {e}", t.device)))?;
        if let DataConfig::Synthetic(s) = &self.data {
            s.validate(t.seq_len).map_err(Error::Config)?;
        }
        self.optimizer.validate().map_err(Error::Config)?;
        self.checkpoint.validate().map_err(Error::Config)?;
        Ok(model)
    }

    /// The config as JSON with the dtype resolved for `device` (what a checkpoint records and a
    /// resume compares).
    pub fn resolved_json(&self, dtype: DType) -> serde_json::Value {
        let mut c = self.clone();
        c.train.dtype = Some(dtype);
        serde_json::to_value(&c).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_default_job_and_round_trip() {
        let c = TrainConfig::parse("").unwrap();
        assert_eq!(c, TrainConfig::default());
        let m = c.validate().unwrap();
        assert_eq!(m.n_layers(), 4);
        assert!(m.is_moe());
        assert_eq!(TrainConfig::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn partial_tables_keep_other_defaults() {
        let c = TrainConfig::parse(
            "[train]\nsteps = 10\n[data]\nsource = \"shards\"\ndir = \"data/x\"\n[optimizer]\nlr = 1e-3\n",
        )
        .unwrap();
        assert_eq!(c.train.steps, 10);
        assert_eq!(c.train.batch_size, d_batch());
        assert_eq!(c.optimizer.lr, 1e-3);
        assert!(matches!(c.data, DataConfig::Shards(_)));
    }

    #[test]
    fn bad_values_name_field_value_and_constraint() {
        let e = |toml: &str| {
            TrainConfig::parse(toml)
                .and_then(|c| c.validate().map(drop))
                .unwrap_err()
                .to_string()
        };
        assert!(e("[train]\nbatch_size = 0").contains("train.batch_size = 0: must be >= 1"));
        let s = e("[train]\nseq_len = 4096");
        assert!(
            s.contains("train.seq_len = 4096") && s.contains("model.max_seq_len (256)"),
            "{s}"
        );
        let s = e("[optimizer]\nlr = -1.0");
        assert!(s.contains("optimizer.lr = -1"), "{s}");
        let s = e("[train]\ndevice = \"tpu\"");
        assert!(s.contains("train.device = \"tpu\""), "{s}");
        let s = e("[train]\nbatch = 3");
        assert!(s.contains("unknown field `batch`"), "{s}");
        let mut c = TrainConfig::default();
        c.model.moe.as_mut().unwrap().layer.top_k = 9;
        let s = c.validate().unwrap_err().to_string();
        assert!(s.contains("top_k = 9"), "{s}");
        let s = e("[data]\nsource = \"synthetic\"\nmax_len = 40");
        assert!(
            s.contains("train.seq_len = 64") && s.contains("data.max_len = 40"),
            "{s}"
        );
    }
}
