//! Model configuration: one resolved `ModelConfig` (every layer's FFN — dense or MoE with its own
//! `MoeConfig` — and attention window spelled out) built from a Hugging Face config.json
//! (`from_hf_dir`) or a native TOML spec (`NativeSpec`, used for training). Errors name the file,
//! the field, the value and what was expected.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::moe::{ExpertKind, MoeConfig, RouterKind, SharedExperts};
use crate::runtime::ops::Activation;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    /// Our own training configs (exported as Mixtral or Qwen3-MoE when the layout allows).
    Native,
}

pub const SUPPORTED: &[(&str, Arch)] = &[
    ("LlamaForCausalLM", Arch::Llama),
    ("Qwen2ForCausalLM", Arch::Qwen2),
    ("Qwen3ForCausalLM", Arch::Qwen3),
    ("MixtralForCausalLM", Arch::Mixtral),
    ("Qwen2MoeForCausalLM", Arch::Qwen2Moe),
    ("Qwen3MoeForCausalLM", Arch::Qwen3Moe),
    ("OlmoeForCausalLM", Arch::Olmoe),
];

/// Where q/k RMSNorm applies: none, per head over head_dim (Qwen3), or over the whole projection
/// width (OLMoE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    #[default]
    None,
    PerHead,
    Full,
}

/// RoPE frequency scaling, as transformers' rope init functions define it; serialized as HF's
/// `rope_parameters` (less `rope_theta`), which is how `save_hf` exports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    #[default]
    #[serde(rename = "default")]
    None,
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ffn {
    Dense { ffn_dim: usize },
    Moe(MoeConfig),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerConfig {
    pub ffn: Ffn,
    /// Sliding-window attention width for this layer (None: full causal attention).
    pub sliding_window: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub max_seq_len: usize,
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    #[serde(default = "one")]
    pub partial_rotary_factor: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    #[serde(default)]
    pub qk_norm: QkNorm,
    /// Clamp q, k, v projections to ±clip (OLMoE `clip_qkv`).
    #[serde(default)]
    pub clip_qkv: Option<f32>,
    /// Activation of the dense MLPs (SwiGLU gate).
    pub hidden_act: Activation,
    pub layers: Vec<LayerConfig>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Std of the normal init (HF `initializer_range`).
    #[serde(default = "init_std")]
    pub init_std: f32,
}

fn one() -> f64 {
    1.0
}
fn init_std() -> f32 {
    0.02
}

/// A config-file problem: which file, which field, what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct ConfigError {
    pub file: String,
    pub msg: String,
}

impl ModelConfig {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Check every value; errors name the field, the value and the constraint.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |f: &str, v: String, want: &str| Err(format!("{f} = {v}: {want}"));
        for (f, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("max_seq_len", self.max_seq_len),
        ] {
            if v == 0 {
                return bad(f, "0".into(), "must be > 0");
            }
        }
        if self.layers.is_empty() {
            return bad("n_layers", "0".into(), "must be > 0");
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(
                "n_kv_heads",
                self.n_kv_heads.to_string(),
                &format!("must divide n_heads = {}", self.n_heads),
            );
        }
        if self.head_dim % 2 != 0 || self.head_dim > 256 {
            return bad(
                "head_dim",
                self.head_dim.to_string(),
                "must be even and <= 256",
            );
        }
        let rot = self.rotary_dim();
        if rot == 0 || rot % 2 != 0 || rot > self.head_dim {
            return bad(
                "partial_rotary_factor",
                self.partial_rotary_factor.to_string(),
                "must give an even rotary dim in 2..=head_dim",
            );
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(
                "rope_theta",
                self.rope_theta.to_string(),
                "must be a finite value > 0",
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad(
                "rms_norm_eps",
                self.rms_norm_eps.to_string(),
                "must be in (0, 1)",
            );
        }
        for (i, l) in self.layers.iter().enumerate() {
            match &l.ffn {
                Ffn::Dense { ffn_dim } if *ffn_dim == 0 => {
                    return bad(&format!("layers[{i}].ffn_dim"), "0".into(), "must be > 0")
                }
                Ffn::Dense { .. } => {}
                Ffn::Moe(m) => {
                    if m.d_model != self.d_model {
                        return bad(
                            &format!("layers[{i}].moe.d_model"),
                            m.d_model.to_string(),
                            &format!("must equal d_model = {}", self.d_model),
                        );
                    }
                    m.validate().map_err(|e| format!("layers[{i}]: {e}"))?;
                }
            }
            if l.sliding_window == Some(0) {
                return bad(
                    &format!("layers[{i}].sliding_window"),
                    "0".into(),
                    "must be > 0 when set",
                );
            }
        }
        if let Some(c) = self.clip_qkv {
            if !(c > 0.0 && c.is_finite()) {
                return bad("clip_qkv", c.to_string(), "must be a finite value > 0");
            }
        }
        Ok(())
    }

    pub fn rotary_dim(&self) -> usize {
        ((self.head_dim as f64 * self.partial_rotary_factor) as usize) & !1
    }

    pub fn is_moe(&self) -> bool {
        self.layers.iter().any(|l| matches!(l.ffn, Ffn::Moe(_)))
    }

    /// Parameters in total and active per token (routed experts counted top_k times; the
    /// embedding counted once, and the LM head again when untied).
    pub fn param_counts(&self) -> (u64, u64) {
        let d = self.d_model as u64;
        let (h, kv, hd) = (
            self.n_heads as u64,
            self.n_kv_heads as u64,
            self.head_dim as u64,
        );
        let attn = d * h * hd * 2 + d * kv * hd * 2 + 2 * d;
        let emb = self.vocab_size as u64 * d;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        let (mut total, mut active) = (emb + head + d, emb + head + d);
        for l in &self.layers {
            total += attn;
            active += attn;
            match &l.ffn {
                Ffn::Dense { ffn_dim } => {
                    total += 3 * d * *ffn_dim as u64;
                    active += 3 * d * *ffn_dim as u64;
                }
                Ffn::Moe(m) => {
                    let per = (m.first_proj_dim() + m.ffn_dim) as u64 * d;
                    let extra = m
                        .shared
                        .as_ref()
                        .map_or(0, |s| 3 * d * (s.ffn_dim * s.count) as u64)
                        + m.residual.as_ref().map_or(0, |r| 3 * d * r.ffn_dim as u64);
                    total += per * m.n_experts as u64 + extra + d * m.n_experts as u64;
                    active += per * m.top_k as u64 + extra + d * m.n_experts as u64;
                }
            }
        }
        (total, active)
    }

    /// RoPE inverse frequencies (rotary_dim / 2) and the cos/sin scaling factor, as transformers
    /// computes them. `seq_len` matters only for dynamic NTK scaling (beyond max_seq_len).
    pub fn rope_inv_freq(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let dim = self.rotary_dim();
        let mut base = self.rope_theta;
        if let RopeScaling::Dynamic { factor } = self.rope_scaling {
            let s = seq_len.max(self.max_seq_len) as f64;
            base *= ((factor * s / self.max_seq_len as f64) - (factor - 1.0))
                .powf(dim as f64 / (dim as f64 - 2.0));
        }
        // Like torch: exponents in f32, then the power and reciprocal in f32.
        let plain: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => (plain, 1.0),
            RopeScaling::Linear { factor } => {
                (plain.iter().map(|f| f / *factor as f32).collect(), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let (lw, hw) = (old / low_freq_factor, old / high_freq_factor);
                let f = plain
                    .iter()
                    .map(|&inv| {
                        let inv = inv as f64;
                        let wl = 2.0 * std::f64::consts::PI / inv;
                        let scaled = if wl > lw { inv / factor } else { inv };
                        if wl >= hw && wl <= lw {
                            let smooth =
                                (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect();
                (f, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let att = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                    (Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                    }
                    _ => get_mscale(*factor, 1.0),
                });
                let d = dim as f64;
                let corr = |rot: f64| {
                    d * ((*original_max_position_embeddings as f64)
                        / (rot * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * self.rope_theta.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let f = plain
                    .iter()
                    .enumerate()
                    .map(|(i, &inv)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
                        let extra = 1.0 - ramp;
                        let interp = inv / *factor as f32;
                        interp * (1.0 - extra) + inv * extra
                    })
                    .collect();
                (f, att as f32)
            }
        }
    }

    // ------------------------------------------------------------------ Hugging Face

    /// Read `dir/config.json` of a supported architecture.
    pub fn from_hf_dir(dir: &Path) -> Result<ModelConfig, ConfigError> {
        let path = dir.join("config.json");
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            file: file.clone(),
            msg: format!("cannot read: {e}"),
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ConfigError {
            file: file.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let c = Hf { v: &v, file: &file };
        c.parse()
    }
}

struct Hf<'a> {
    v: &'a Value,
    file: &'a str,
}

impl Hf<'_> {
    fn err(&self, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            msg: msg.into(),
        }
    }
    fn get(&self, k: &str) -> Option<&Value> {
        self.v.get(k).filter(|x| !x.is_null())
    }
    fn usize(&self, k: &str) -> Result<usize, ConfigError> {
        self.usize_opt(k)?
            .ok_or_else(|| self.err(format!("missing field `{k}`")))
    }
    fn usize_opt(&self, k: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(k) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{k}` = {x}: expected a non-negative integer"))),
        }
    }
    fn f64_or(&self, k: &str, d: f64) -> Result<f64, ConfigError> {
        match self.get(k) {
            None => Ok(d),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| self.err(format!("`{k}` = {x}: expected a number"))),
        }
    }
    fn bool_or(&self, k: &str, d: bool) -> Result<bool, ConfigError> {
        match self.get(k) {
            None => Ok(d),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| self.err(format!("`{k}` = {x}: expected true or false"))),
        }
    }
    fn ids(&self, k: &str) -> Result<Vec<u32>, ConfigError> {
        match self.get(k) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|n| n as u32)
                        .ok_or_else(|| self.err(format!("`{k}`: expected token ids")))
                })
                .collect(),
            Some(x) => x
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.err(format!("`{k}` = {x}: expected a token id"))),
        }
    }

    /// `num_experts`, or `num_local_experts` as transformers 5 writes it for some architectures.
    fn n_experts(&self) -> Result<usize, ConfigError> {
        match self.usize_opt("num_experts")? {
            Some(n) => Ok(n),
            None => self
                .usize_opt("num_local_experts")?
                .ok_or_else(|| self.err("missing field `num_experts` (or `num_local_experts`)")),
        }
    }

    fn arch(&self) -> Result<Arch, ConfigError> {
        let names: Vec<&str> = match self.get("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => vec![],
        };
        let supported = || {
            SUPPORTED
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        for n in &names {
            if let Some((_, a)) = SUPPORTED.iter().find(|(s, _)| s == n) {
                return Ok(*a);
            }
        }
        Err(self.err(format!(
            "unsupported architecture {names:?}; supported: {}",
            supported()
        )))
    }

    fn rope(&self) -> Result<(f64, RopeScaling, f64), ConfigError> {
        // transformers 5: rope_parameters {rope_type, rope_theta, ...}; 4.x: rope_theta + rope_scaling.
        let params = self
            .get("rope_parameters")
            .or_else(|| self.get("rope_scaling"));
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|x| x.as_f64())
            .unwrap_or(self.f64_or("rope_theta", 10000.0)?);
        let partial = params
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(|x| x.as_f64())
            .unwrap_or(self.f64_or("partial_rotary_factor", 1.0)?);
        let Some(p) = params else {
            return Ok((theta, RopeScaling::None, partial));
        };
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|x| x.as_str())
            .unwrap_or("default");
        let num = |k: &str| p.get(k).and_then(|x| x.as_f64());
        let need =
            |k: &str| num(k).ok_or_else(|| self.err(format!("rope scaling `{kind}` needs `{k}`")));
        let max_pos = self.usize_opt("max_position_embeddings")?.unwrap_or(2048);
        let omax = p
            .get("original_max_position_embeddings")
            .and_then(|x| x.as_u64())
            .map(|x| x as usize);
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: need("factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: need("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: omax.ok_or_else(|| {
                    self.err("rope scaling `llama3` needs `original_max_position_embeddings`")
                })?,
            },
            "yarn" => {
                let omax = omax.unwrap_or(max_pos);
                RopeScaling::Yarn {
                    factor: num("factor").unwrap_or(max_pos as f64 / omax as f64),
                    original_max_position_embeddings: omax,
                    beta_fast: num("beta_fast").unwrap_or(32.0),
                    beta_slow: num("beta_slow").unwrap_or(1.0),
                    mscale: num("mscale"),
                    mscale_all_dim: num("mscale_all_dim"),
                    attention_factor: num("attention_factor"),
                    truncate: p.get("truncate").and_then(|x| x.as_bool()).unwrap_or(true),
                }
            }
            other => {
                return Err(self.err(format!(
                    "rope type `{other}` is not supported (default, linear, dynamic, yarn, llama3)"
                )))
            }
        };
        Ok((theta, scaling, partial))
    }

    fn parse(&self) -> Result<ModelConfig, ConfigError> {
        let arch = self.arch()?;
        let d = self.usize("hidden_size")?;
        let n_layers = self.usize("num_hidden_layers")?;
        let n_heads = self.usize("num_attention_heads")?;
        let n_kv = self.usize_opt("num_key_value_heads")?.unwrap_or(n_heads);
        if n_heads == 0 {
            return Err(self.err("`num_attention_heads` = 0: must be > 0"));
        }
        let head_dim = self.usize_opt("head_dim")?.unwrap_or(d / n_heads);
        let act_name = self
            .get("hidden_act")
            .and_then(|x| x.as_str())
            .unwrap_or("silu");
        let act = Activation::from_hf(act_name).ok_or_else(|| self.err(format!("`hidden_act` = \"{act_name}\": supported are silu, gelu, gelu_new, gelu_pytorch_tanh")))?;
        if act != Activation::Silu {
            return Err(self.err(format!(
                "`hidden_act` = \"{act_name}\": these architectures use SwiGLU (silu) MLPs"
            )));
        }
        let (rope_theta, rope_scaling, partial) = self.rope()?;
        let inter = self.usize("intermediate_size")?;
        let aux = self.f64_or("router_aux_loss_coef", 0.0)? as f32;
        let windows = self.windows(arch, n_layers)?;
        let moe_cfg =
            |n_experts: usize, ffn: usize, renorm: bool, shared: Option<SharedExperts>| MoeConfig {
                d_model: d,
                n_experts,
                top_k: self
                    .usize_opt("num_experts_per_tok")
                    .ok()
                    .flatten()
                    .unwrap_or(2),
                ffn_dim: ffn,
                expert: ExpertKind::SwiGlu,
                expert_bias: false,
                router: RouterKind::Softmax {
                    renormalize: renorm,
                },
                shared,
                residual: None,
                aux_loss_coeff: aux,
                z_loss_coeff: 0.0,
            };
        let layers: Vec<Ffn> = match arch {
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => (0..n_layers)
                .map(|_| Ffn::Dense { ffn_dim: inter })
                .collect(),
            Arch::Mixtral => {
                let e = self.usize("num_local_experts")?;
                (0..n_layers)
                    .map(|_| Ffn::Moe(moe_cfg(e, inter, true, None)))
                    .collect()
            }
            Arch::Olmoe => {
                let e = self.n_experts()?;
                let renorm = self.bool_or("norm_topk_prob", false)?;
                (0..n_layers)
                    .map(|_| Ffn::Moe(moe_cfg(e, inter, renorm, None)))
                    .collect()
            }
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                let e = self.n_experts()?;
                let moe_ffn = self.usize("moe_intermediate_size")?;
                let renorm = self.bool_or("norm_topk_prob", false)?;
                let step = self.usize_opt("decoder_sparse_step")?.unwrap_or(1).max(1);
                let only: Vec<usize> = match self.get("mlp_only_layers") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(|x| x.as_u64().map(|n| n as usize))
                        .collect(),
                    _ => vec![],
                };
                let shared = if arch == Arch::Qwen2Moe {
                    self.usize_opt("shared_expert_intermediate_size")?
                        .filter(|&s| s > 0)
                        .map(|s| SharedExperts {
                            ffn_dim: s,
                            count: 1,
                            gated: true,
                        })
                } else {
                    None
                };
                (0..n_layers)
                    .map(|i| {
                        if !only.contains(&i) && e > 0 && (i + 1) % step == 0 {
                            Ffn::Moe(moe_cfg(e, moe_ffn, renorm, shared.clone()))
                        } else {
                            Ffn::Dense { ffn_dim: inter }
                        }
                    })
                    .collect()
            }
            Arch::Native => unreachable!("native configs are not read from config.json"),
        };
        let qkv_bias = match arch {
            Arch::Qwen2 | Arch::Qwen2Moe => self.bool_or("qkv_bias", true)?,
            _ => self.bool_or("attention_bias", false)?,
        };
        let qk_norm = match arch {
            Arch::Qwen3 | Arch::Qwen3Moe => QkNorm::PerHead,
            Arch::Olmoe => QkNorm::Full,
            _ => QkNorm::None,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: self.usize("vocab_size")?,
            d_model: d,
            n_heads,
            n_kv_heads: n_kv,
            head_dim,
            max_seq_len: self.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            rope_theta,
            rope_scaling,
            partial_rotary_factor: partial,
            rms_norm_eps: self.f64_or("rms_norm_eps", 1e-6)?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            qk_norm,
            clip_qkv: self
                .get("clip_qkv")
                .and_then(|x| x.as_f64())
                .map(|x| x as f32),
            hidden_act: act,
            layers: layers
                .into_iter()
                .zip(windows)
                .map(|(ffn, sliding_window)| LayerConfig {
                    ffn,
                    sliding_window,
                })
                .collect(),
            bos_token_id: self.ids("bos_token_id")?.first().copied(),
            eos_token_ids: self.ids("eos_token_id")?,
            pad_token_id: self.ids("pad_token_id")?.first().copied(),
            init_std: self.f64_or("initializer_range", 0.02)? as f32,
        };
        cfg.validate().map_err(|e| self.err(e))?;
        Ok(cfg)
    }

    /// Per-layer sliding windows: transformers 5 `layer_types`, else (Qwen2/3 4.x) layers at or
    /// past `max_window_layers` when `use_sliding_window`, else Mixtral's global `sliding_window`.
    fn windows(&self, arch: Arch, n: usize) -> Result<Vec<Option<usize>>, ConfigError> {
        let w = self.usize_opt("sliding_window")?.filter(|&w| w > 0);
        let qwen = matches!(
            arch,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen2Moe | Arch::Qwen3Moe
        );
        if qwen && !self.bool_or("use_sliding_window", false)? {
            return Ok(vec![None; n]);
        }
        if let Some(Value::Array(types)) = self.get("layer_types") {
            if types.len() != n {
                return Err(self.err(format!(
                    "`layer_types` has {} entries for {n} layers",
                    types.len()
                )));
            }
            return Ok(types
                .iter()
                .map(|t| {
                    if t.as_str() == Some("sliding_attention") {
                        w
                    } else {
                        None
                    }
                })
                .collect());
        }
        if qwen {
            let first = self.usize_opt("max_window_layers")?.unwrap_or(0);
            return Ok((0..n).map(|i| if i >= first { w } else { None }).collect());
        }
        Ok(vec![if arch == Arch::Mixtral { w } else { None }; n])
    }
}

// ---------------------------------------------------------------------- native TOML

/// The `[model]` table of a training config. MoE layers follow a pattern: every `every`-th layer
/// after the first `first_dense` ones; `experts` gives per-MoE-layer expert counts (one value for
/// all, or one per MoE layer: a PR-MoE pyramid).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeSpec {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_seq_len: usize,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub qkv_bias: bool,
    #[serde(default)]
    pub qk_norm: QkNorm,
    /// FFN size of the dense layers.
    pub ffn_dim: usize,
    #[serde(default)]
    pub moe: Option<NativeMoe>,
    #[serde(default = "init_std")]
    pub init_std: f32,
}

/// The MoE layers of a native model: which layers (`every`, from `first_dense` on), how many
/// experts each (`experts`: one count, or one per MoE layer), and the layer's options — the
/// fields of `MoeConfig` (declared there once) but `d_model` and `n_experts`, which
/// `NativeSpec::resolve` fills in. In TOML all of them are keys of `[model.moe]`; unknown keys
/// are errors, as elsewhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MoeTable", into = "MoeTable")]
pub struct NativeMoe {
    pub every: usize,
    pub first_dense: usize,
    pub experts: Vec<usize>,
    pub layer: MoeConfig,
}

/// `[model.moe]` as keys and values: how `NativeMoe` is read and written.
type MoeTable = serde_json::Map<String, Value>;

impl TryFrom<MoeTable> for NativeMoe {
    type Error = String;

    fn try_from(mut t: MoeTable) -> Result<NativeMoe, String> {
        for k in ["d_model", "n_experts"] {
            if t.contains_key(k) {
                return Err(format!(
                    "moe.{k}: set by the model (model.d_model, model.moe.experts), not here"
                ));
            }
        }
        let mut take = |k: &str, default: Option<Value>| -> Result<Value, String> {
            t.remove(k)
                .or(default)
                .ok_or_else(|| format!("missing field `{k}`"))
        };
        let num = |k: &str, v: Value| {
            serde_json::from_value::<usize>(v).map_err(|e| format!("moe.{k}: {e}"))
        };
        let every = num("every", take("every", Some(1.into()))?)?;
        let first_dense = num("first_dense", take("first_dense", Some(0.into()))?)?;
        let experts = serde_json::from_value(take("experts", None)?)
            .map_err(|e| format!("moe.experts: {e}"))?;
        t.insert("d_model".into(), 0.into());
        t.insert("n_experts".into(), 0.into());
        let layer = serde_json::from_value(Value::Object(t)).map_err(|e| e.to_string())?;
        Ok(NativeMoe {
            every,
            first_dense,
            experts,
            layer,
        })
    }
}

impl From<NativeMoe> for MoeTable {
    fn from(m: NativeMoe) -> MoeTable {
        let mut t = match serde_json::to_value(&m.layer) {
            Ok(Value::Object(t)) => t,
            _ => unreachable!("MoeConfig serializes as a map"),
        };
        // Options left out (None) are left out of the table too (TOML has no null).
        t.retain(|k, v| !v.is_null() && k != "d_model" && k != "n_experts");
        t.insert("every".into(), m.every.into());
        t.insert("first_dense".into(), m.first_dense.into());
        t.insert("experts".into(), m.experts.into());
        t
    }
}

fn theta() -> f64 {
    10000.0
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl NativeSpec {
    /// Resolve the pattern into per-layer configs and validate.
    pub fn resolve(&self) -> Result<ModelConfig, String> {
        let n_kv = self.n_kv_heads.unwrap_or(self.n_heads);
        if self.n_heads == 0 {
            return Err("model.n_heads = 0: must be > 0".into());
        }
        let head_dim = self.head_dim.unwrap_or(self.d_model / self.n_heads);
        let mut layers = Vec::with_capacity(self.n_layers);
        let moe_layers: Vec<usize> = match &self.moe {
            Some(m) => {
                if m.every == 0 {
                    return Err("model.moe.every = 0: must be >= 1".into());
                }
                (0..self.n_layers)
                    .filter(|&i| i >= m.first_dense && (i - m.first_dense) % m.every == 0)
                    .collect()
            }
            None => vec![],
        };
        if let Some(m) = &self.moe {
            if m.experts.is_empty() || (m.experts.len() != 1 && m.experts.len() != moe_layers.len())
            {
                return Err(format!(
                    "model.moe.experts = {:?}: give one count or one per MoE layer ({} MoE layers: {moe_layers:?})",
                    m.experts,
                    moe_layers.len()
                ));
            }
        }
        for i in 0..self.n_layers {
            let ffn = match (&self.moe, moe_layers.iter().position(|&l| l == i)) {
                (Some(m), Some(j)) => Ffn::Moe(MoeConfig {
                    d_model: self.d_model,
                    n_experts: if m.experts.len() == 1 {
                        m.experts[0]
                    } else {
                        m.experts[j]
                    },
                    ..m.layer.clone()
                }),
                _ => Ffn::Dense {
                    ffn_dim: self.ffn_dim,
                },
            };
            layers.push(LayerConfig {
                ffn,
                sliding_window: None,
            });
        }
        let cfg = ModelConfig {
            arch: Arch::Native,
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            n_heads: self.n_heads,
            n_kv_heads: n_kv,
            head_dim,
            max_seq_len: self.max_seq_len,
            rope_theta: self.rope_theta,
            rope_scaling: RopeScaling::None,
            partial_rotary_factor: 1.0,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.qkv_bias,
            qk_norm: self.qk_norm,
            clip_qkv: None,
            hidden_act: Activation::Silu,
            layers,
            bos_token_id: None,
            eos_token_ids: vec![],
            pad_token_id: None,
            init_std: self.init_std,
        };
        cfg.validate().map_err(|e| format!("model.{e}"))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scaling's serde form (what `save_hf` writes as `rope_parameters`) reads back through
    /// the HF parser as itself.
    #[test]
    fn rope_scaling_round_trips_through_hf_rope_parameters() {
        let all = [
            RopeScaling::None,
            RopeScaling::Linear { factor: 2.0 },
            RopeScaling::Dynamic { factor: 3.0 },
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 1024,
                beta_fast: 16.0,
                beta_slow: 2.0,
                mscale: Some(0.5),
                mscale_all_dim: None,
                attention_factor: Some(1.5),
                truncate: false,
            },
        ];
        for s in all {
            let mut p = serde_json::to_value(&s).unwrap();
            p["rope_theta"] = 5e5.into();
            let v = serde_json::json!({"max_position_embeddings": 4096, "rope_parameters": p});
            let (theta, got, _) = Hf {
                v: &v,
                file: "config.json",
            }
            .rope()
            .unwrap();
            assert_eq!((theta, &got), (5e5, &s), "{p}");
        }
    }

    #[test]
    fn native_moe_reads_the_layer_options_and_refuses_unknown_keys() {
        let text = "experts = [4]\ntop_k = 2\nffn_dim = 8\n[router]\nkind = \"softmax\"\n";
        let m: NativeMoe = toml::from_str(text).unwrap();
        assert_eq!((m.every, m.first_dense, &m.experts), (1, 0, &vec![4]));
        assert_eq!((m.layer.top_k, m.layer.ffn_dim), (2, 8));
        let back: NativeMoe = toml::from_str(&toml::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        for (bad, want) in [
            ("topk = 3", "unknown field `topk`"),
            ("d_model = 3", "moe.d_model: set by the model"),
            ("every = -1", "moe.every"),
        ] {
            let err = toml::from_str::<NativeMoe>(&format!("{bad}\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
        let err = toml::from_str::<NativeMoe>("top_k = 2\nffn_dim = 8")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `experts`"), "{err}");
    }
}
