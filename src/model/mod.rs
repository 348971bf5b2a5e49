//! The decoder-only transformer: embedding → blocks (RMSNorm → attention → residual → RMSNorm →
//! dense MLP or MoE → residual) → RMSNorm → LM head, for Llama / Qwen2 / Qwen3 / Mixtral /
//! Qwen2-MoE / Qwen3-MoE / OLMoE checkpoints (`hf`) and native training configs. Forward and
//! backward are hand-written per layer (`attention`, `crate::moe`); training fuses the LM head with
//! the cross-entropy in row chunks and computes their gradient in the forward pass.
//!
//! Activation memory per block without recompute (T = B·S tokens, bf16 on GPU): x, the norms'
//! outputs, q/k/v/context (≈ 4·T·H·hd), attention probabilities (H·S·T; with the fused attention
//! on CUDA only their log-sum-exp, H·T), and the FFN's hidden
//! activations (dense: 3·T·F; MoE: h, a, y_perm ≈ T·k·(d + 3F); x is read through the dispatch
//! permutation, not kept, on Hopper). With `recompute` only
//! each block's input (T·d) is kept and the block is re-run in the backward.
//!
//! Files by concern: `params` (the tensors), `train` (training pass), `kv_cache`, `plan` (which
//! kernels an inference step runs, decided once), `infer` (prefill and decode by a plan),
//! `graphs` (decode steps as CUDA graphs, the greedy chain).

mod attention;
pub mod config;
mod graphs;
mod hf;
mod infer;
mod kv_cache;
mod params;
pub mod plan;
mod train;
mod weights;

pub use attention::{Attention, AttnShape, Span};
pub use config::{Arch, Ffn, LayerConfig, ModelConfig, NativeMoe, NativeSpec, QkNorm, RopeScaling};
pub use graphs::GREEDY_IN_FLIGHT;
pub use infer::{plan_prefill, PREFILL_TOKENS};
pub use kv_cache::KvCache;
pub use params::{Block, FfnWeights, Grads, Params};
pub use plan::StepPlan;
pub use train::{Saved, StepOutput, TrainOpts};
pub use weights::{save as save_safetensors, Checkpoint};

use std::path::{Path, PathBuf};

use crate::moe::{DenseMlp, ExpertKind, MoeWeights};
use crate::runtime::ops::RopeTable;
use crate::runtime::{DType, Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("{path}: tensor `{name}` {msg}")]
    Tensor {
        path: String,
        name: String,
        msg: String,
    },
    #[error("tensor `{name}` is missing from the checkpoint ({files})")]
    Missing { name: String, files: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
}

impl ModelError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> ModelError {
        ModelError::File {
            path: path.display().to_string(),
            msg: e.to_string(),
        }
    }
    pub(crate) fn file(path: &Path, msg: impl Into<String>) -> ModelError {
        ModelError::File {
            path: path.display().to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn tensor(path: &Path, name: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Tensor {
            path: path.display().to_string(),
            name: name.to_string(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub struct Model {
    pub config: ModelConfig,
    pub params: Params,
    pub device: Device,
    pub dtype: DType,
    rope: RopeTable,
    /// Caches handed back with `recycle_kv_cache`, with their recorded decode steps, for the
    /// next `pooled_kv_cache` of the same batch and length bucket.
    cache_pool: std::sync::Mutex<Vec<KvCache>>,
}

impl Model {
    pub fn shape(&self, layer: usize) -> AttnShape {
        let c = &self.config;
        AttnShape {
            heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            qk_norm: c.qk_norm,
            eps: c.rms_norm_eps as f32,
            window: c.layers[layer].sliding_window,
            clip: c.clip_qkv,
        }
    }

    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Wrap `params` (already on `device` in `dtype`) after checking their shapes.
    pub fn from_params(
        config: ModelConfig,
        params: Params,
        device: Device,
        dtype: DType,
    ) -> Result<Model> {
        config.validate().map_err(ModelError::Invalid)?;
        let (inv, att) = config.rope_inv_freq(config.max_seq_len);
        let rope = RopeTable::new(&inv, config.max_seq_len, att, device)?;
        let m = Model {
            config,
            params,
            device,
            dtype,
            rope,
            cache_pool: std::sync::Mutex::new(Vec::new()),
        };
        m.check_shapes()?;
        Ok(m)
    }

    fn check_shapes(&self) -> Result<()> {
        let c = &self.config;
        let (d, v) = (c.d_model, c.vocab_size);
        let want = |name: &str, t: &Tensor, s: &[usize]| -> Result<()> {
            if t.shape() != s {
                return Err(ModelError::Invalid(format!(
                    "parameter {name} has shape {:?}, expected {s:?}",
                    t.shape()
                )));
            }
            Ok(())
        };
        want("embed", &self.params.embed, &[v, d])?;
        if let Some(h) = &self.params.lm_head {
            want("lm_head", h, &[v, d])?;
        }
        if self.params.blocks.len() != c.n_layers() {
            return Err(ModelError::Invalid(format!(
                "{} blocks for {} layers",
                self.params.blocks.len(),
                c.n_layers()
            )));
        }
        for (i, (b, l)) in self.params.blocks.iter().zip(&c.layers).enumerate() {
            if let (FfnWeights::Moe(w), Ffn::Moe(mc)) = (&b.ffn, &l.ffn) {
                w.check(mc, &format!("blocks.{i}.ffn"))?;
            }
        }
        Ok(())
    }

    /// A randomly initialised model (GPT-2 style: N(0, init_std), output projections scaled by
    /// 1/sqrt(2·layers), norms one).
    pub fn init(config: ModelConfig, seed: u64, device: Device, dtype: DType) -> Result<Model> {
        config.validate().map_err(ModelError::Invalid)?;
        let c = &config;
        let std = c.init_std;
        let out_std = std / (2.0 * c.n_layers() as f32).sqrt();
        let d = c.d_model;
        let mut blocks = Vec::with_capacity(c.n_layers());
        for (i, l) in c.layers.iter().enumerate() {
            let s = seed.wrapping_mul(1000).wrapping_add(i as u64 * 17 + 1);
            let sh = AttnShape {
                heads: c.n_heads,
                kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                qk_norm: c.qk_norm,
                eps: c.rms_norm_eps as f32,
                window: l.sliding_window,
                clip: c.clip_qkv,
            };
            let ffn = match &l.ffn {
                Ffn::Dense { ffn_dim } => FfnWeights::Dense(DenseMlp::init(
                    ExpertKind::SwiGlu,
                    d,
                    *ffn_dim,
                    false,
                    std,
                    out_std,
                    s ^ 0xf0,
                    dtype,
                    device,
                )?),
                Ffn::Moe(m) => {
                    FfnWeights::Moe(MoeWeights::init(m, std, out_std, s ^ 0xf1, dtype, device)?)
                }
            };
            blocks.push(Block {
                attn_norm: Tensor::full(&[d], 1.0, dtype, device)?,
                attn: Attention::init(&sh, d, c.qkv_bias, std, out_std, s, dtype, device)?,
                ffn_norm: Tensor::full(&[d], 1.0, dtype, device)?,
                ffn,
            });
        }
        let params = Params {
            embed: Tensor::randn(&[c.vocab_size, d], std, seed ^ 0xe0, dtype, device)?,
            blocks,
            norm: Tensor::full(&[d], 1.0, dtype, device)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(Tensor::randn(
                    &[c.vocab_size, d],
                    std,
                    seed ^ 0xe1,
                    dtype,
                    device,
                )?)
            },
        };
        Model::from_params(config, params, device, dtype)
    }

    pub fn load_hf(dir: &Path, device: Device, dtype: Option<DType>) -> Result<Model> {
        hf::load(dir, device, dtype)
    }

    /// Write config.json + model.safetensors in the HF layout (Mixtral, Qwen3-MoE, or the
    /// checkpoint's own architecture) into `dir`, atomically.
    pub fn save_hf(&self, dir: &Path) -> Result<PathBuf> {
        hf::save(self, dir)
    }

    /// `params` — this model's weights or gradients — under Hugging Face tensor names (the
    /// layout `save_hf` writes).
    pub fn hf_named(&self, params: &Params) -> Result<std::collections::BTreeMap<String, Tensor>> {
        Ok(hf::hf_tensors(&self.config, params)?.1)
    }

    fn head(&self) -> &Tensor {
        self.params.lm_head.as_ref().unwrap_or(&self.params.embed)
    }

    /// (total, active-per-token) parameter counts.
    pub fn param_counts(&self) -> (u64, u64) {
        self.config.param_counts()
    }
}
