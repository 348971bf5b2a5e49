//! Hugging Face checkpoints ↔ `Params`. Tensor names, per architecture (prefix model.layers.{i}):
//!   input_layernorm / post_attention_layernorm → attn_norm / ffn_norm
//!   self_attn.{q,k,v,o}_proj.weight (+ q/k/v bias), self_attn.{q,k}_norm → attn.*
//!   dense: mlp.{gate,up}_proj → w1 = [gate | up] rows, mlp.down_proj → w2
//!   Mixtral: block_sparse_moe.gate → router; experts.{e}.w1 (gate), w3 (up) → w1[e], w2 → w2[e]
//!   Qwen2-MoE / Qwen3-MoE / OLMoE: mlp.gate → router; mlp.experts.{e}.{gate,up,down}_proj;
//!   Qwen2-MoE: mlp.shared_expert.{gate,up,down}_proj, mlp.shared_expert_gate → shared.*
//! plus model.embed_tokens, model.norm, lm_head (absent when tied). Per-expert tensors are stacked
//! on the target device into [E, 2F, d] / [E, d, F] (stacked by global expert id).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::config::{Arch, Ffn, ModelConfig, QkNorm};
use super::weights::{self, Checkpoint};
use super::{Attention, Block, FfnWeights, Model, ModelError, Params, Result};
use crate::moe::{DenseMlp, MoeWeights, RouterKind, SharedWeights};
use crate::runtime::ops;
use crate::runtime::{DType, Device, Tensor};

/// Rows of several checkpoint tensors stacked into one [Σ rows, cols] tensor on the device.
fn stack(
    ck: &Checkpoint,
    parts: &[(String, Vec<usize>)],
    out: &[usize],
    dtype: DType,
    device: Device,
) -> Result<Tensor> {
    let cols = *out.last().expect("rank >= 1");
    let rows: usize = out.iter().product::<usize>() / cols;
    let mut t = Tensor::uninit(&[rows, cols], dtype, device)?;
    let mut at = 0;
    for (name, shape) in parts {
        let p = ck.load(name, shape, dtype, device)?;
        let n = p.numel() / cols;
        ops::write_rows(&mut t, at, &p.reshape(&[n, cols])?)?;
        at += n;
    }
    Ok(t.reshape(out)?)
}

struct Names {
    moe: &'static str,
    router: &'static str,
    expert: [&'static str; 3], // gate, up, down
}

fn names(arch: Arch) -> Names {
    match arch {
        Arch::Mixtral => Names {
            moe: "block_sparse_moe",
            router: "gate",
            expert: ["w1", "w3", "w2"],
        },
        _ => Names {
            moe: "mlp",
            router: "gate",
            expert: ["gate_proj", "up_proj", "down_proj"],
        },
    }
}

pub(super) fn load(dir: &Path, device: Device, dtype: Option<DType>) -> Result<Model> {
    let config = ModelConfig::from_hf_dir(dir)?;
    let ck = Checkpoint::open(dir)?;
    let dtype = match dtype {
        Some(d) => d,
        None if device.is_cuda() => ck.float_dtype().unwrap_or(DType::BF16),
        None => DType::F32,
    };
    let c = &config;
    let (d, hd) = (c.d_model, c.head_dim);
    let (hq, hk) = (c.n_heads * hd, c.n_kv_heads * hd);
    let ld = |n: &str, s: &[usize]| ck.load(n, s, dtype, device);
    let nm = names(c.arch);
    let mut blocks = Vec::with_capacity(c.n_layers());
    for (i, l) in c.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let opt = |n: String, s: &[usize], on: bool| -> Result<Option<Tensor>> {
            if on {
                Ok(Some(ld(&n, s)?))
            } else {
                Ok(None)
            }
        };
        let (qn, kn) = match c.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(ld(&format!("{p}.self_attn.q_norm.weight"), &[hd])?),
                Some(ld(&format!("{p}.self_attn.k_norm.weight"), &[hd])?),
            ),
            QkNorm::Full => (
                Some(ld(&format!("{p}.self_attn.q_norm.weight"), &[hq])?),
                Some(ld(&format!("{p}.self_attn.k_norm.weight"), &[hk])?),
            ),
        };
        let attn = Attention {
            q: ld(&format!("{p}.self_attn.q_proj.weight"), &[hq, d])?,
            k: ld(&format!("{p}.self_attn.k_proj.weight"), &[hk, d])?,
            v: ld(&format!("{p}.self_attn.v_proj.weight"), &[hk, d])?,
            o: ld(&format!("{p}.self_attn.o_proj.weight"), &[d, hq])?,
            q_bias: opt(format!("{p}.self_attn.q_proj.bias"), &[hq], c.qkv_bias)?,
            k_bias: opt(format!("{p}.self_attn.k_proj.bias"), &[hk], c.qkv_bias)?,
            v_bias: opt(format!("{p}.self_attn.v_proj.bias"), &[hk], c.qkv_bias)?,
            q_norm: qn,
            k_norm: kn,
        };
        let dense = |f: usize, pre: &str| -> Result<DenseMlp> {
            Ok(DenseMlp {
                w1: stack(
                    &ck,
                    &[
                        (format!("{pre}.gate_proj.weight"), vec![f, d]),
                        (format!("{pre}.up_proj.weight"), vec![f, d]),
                    ],
                    &[2 * f, d],
                    dtype,
                    device,
                )?,
                b1: None,
                w2: ld(&format!("{pre}.down_proj.weight"), &[d, f])?,
                b2: None,
            })
        };
        let ffn = match &l.ffn {
            Ffn::Dense { ffn_dim } => FfnWeights::Dense(dense(*ffn_dim, &format!("{p}.mlp"))?),
            Ffn::Moe(m) => {
                let (e, f) = (m.n_experts, m.ffn_dim);
                let pre = format!("{p}.{}", nm.moe);
                let mut gu = Vec::with_capacity(2 * e);
                let mut dn = Vec::with_capacity(e);
                for x in 0..e {
                    gu.push((
                        format!("{pre}.experts.{x}.{}.weight", nm.expert[0]),
                        vec![f, d],
                    ));
                    gu.push((
                        format!("{pre}.experts.{x}.{}.weight", nm.expert[1]),
                        vec![f, d],
                    ));
                    dn.push((
                        format!("{pre}.experts.{x}.{}.weight", nm.expert[2]),
                        vec![d, f],
                    ));
                }
                let shared = match &m.shared {
                    Some(s) => Some(SharedWeights {
                        mlp: dense(s.ffn_dim * s.count, &format!("{pre}.shared_expert"))?,
                        gate: if s.gated {
                            Some(ld(&format!("{pre}.shared_expert_gate.weight"), &[1, d])?)
                        } else {
                            None
                        },
                    }),
                    None => None,
                };
                FfnWeights::Moe(MoeWeights {
                    router: ld(&format!("{pre}.{}.weight", nm.router), &[e, d])?,
                    router_bias: None,
                    w1: stack(&ck, &gu, &[e, 2 * f, d], dtype, device)?,
                    b1: None,
                    w2: stack(&ck, &dn, &[e, d, f], dtype, device)?,
                    b2: None,
                    shared,
                    residual: None,
                })
            }
        };
        blocks.push(Block {
            attn_norm: ld(&format!("{p}.input_layernorm.weight"), &[d])?,
            attn,
            ffn_norm: ld(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
            ffn,
        });
    }
    let v = c.vocab_size;
    let lm_head = if c.tie_word_embeddings {
        None
    } else if ck.contains("lm_head.weight") {
        Some(ld("lm_head.weight", &[v, d])?)
    } else {
        return Err(ModelError::Missing {
            name: "lm_head.weight".into(),
            files: format!("{} (tie_word_embeddings is false)", dir.display()),
        });
    };
    let params = Params {
        embed: ld("model.embed_tokens.weight", &[v, d])?,
        blocks,
        norm: ld("model.norm.weight", &[d])?,
        lm_head,
    };
    Model::from_params(config, params, device, dtype)
}

/// The architecture a model is exported as, or why it cannot be.
fn export_arch(c: &ModelConfig) -> Result<Arch> {
    if c.arch != Arch::Native {
        return Ok(c.arch);
    }
    let why = |m: &str| {
        Err(ModelError::Invalid(format!(
            "cannot export to a Hugging Face architecture: {m}"
        )))
    };
    let mut sizes = None;
    for l in &c.layers {
        if let Ffn::Moe(m) = &l.ffn {
            if m.shared.is_some()
                || m.residual.is_some()
                || m.expert_bias
                || m.expert != crate::moe::ExpertKind::SwiGlu
            {
                return why("shared/residual experts, expert biases and non-SwiGLU experts have no Mixtral / Qwen3-MoE layout");
            }
            if !matches!(m.router, RouterKind::Softmax { .. }) {
                return why("only the softmax top-k router maps to Mixtral / Qwen3-MoE");
            }
            let s = (
                m.n_experts,
                m.top_k,
                m.ffn_dim,
                matches!(m.router, RouterKind::Softmax { renormalize: true }),
            );
            if sizes.is_some_and(|x| x != s) {
                return why("MoE layers differ in expert count, top-k, size or renormalisation (a PR-MoE pyramid)");
            }
            sizes = Some(s);
        }
    }
    if c.qkv_bias {
        return why("q/k/v biases are not part of Mixtral / Qwen3-MoE");
    }
    match c.qk_norm {
        QkNorm::PerHead if sizes.is_some() => Ok(Arch::Qwen3Moe),
        QkNorm::None if sizes.is_some_and(|s| s.3) && !c.layers.iter().any(|l| matches!(l.ffn, Ffn::Dense { .. })) => Ok(Arch::Mixtral),
        QkNorm::None => why("Mixtral needs every layer to be MoE with renormalised top-k; Qwen3-MoE needs per-head q/k norm"),
        _ => why("q/k norm over the full width is OLMoE's, which this exporter does not write"),
    }
}

/// `params` (weights or gradients of a model with config `c`) under their HF names, plus what
/// config.json needs: (tensors, dense layer indices, (experts, top-k, expert ffn, renormalise), dense ffn).
#[allow(clippy::type_complexity)]
pub(super) fn hf_tensors(
    c: &ModelConfig,
    params: &Params,
) -> Result<(
    Arch,
    BTreeMap<String, Tensor>,
    Vec<usize>,
    (usize, usize, usize, bool),
    usize,
)> {
    let arch = export_arch(c)?;
    let nm = names(arch);
    let mut owned: BTreeMap<String, Tensor> = BTreeMap::new();
    let split_rows = |t: &Tensor, parts: &[usize]| -> Result<Vec<Tensor>> {
        let cols = t.dim(-1);
        let flat = t.try_clone()?.reshape(&[t.numel() / cols, cols])?;
        let mut out = Vec::new();
        let mut at = 0;
        for &n in parts {
            out.push(ops::slice_rows(&flat, at, n)?);
            at += n;
        }
        Ok(out)
    };
    owned.insert(
        "model.embed_tokens.weight".into(),
        params.embed.try_clone()?,
    );
    owned.insert("model.norm.weight".into(), params.norm.try_clone()?);
    if let Some(h) = &params.lm_head {
        owned.insert("lm_head.weight".into(), h.try_clone()?);
    }
    let mut dense_layers = vec![];
    let (mut moe_e, mut moe_k, mut moe_f, mut renorm, mut dense_f) = (0, 0, 0, true, 0);
    for (i, (b, l)) in params.blocks.iter().zip(&c.layers).enumerate() {
        let p = format!("model.layers.{i}");
        owned.insert(
            format!("{p}.input_layernorm.weight"),
            b.attn_norm.try_clone()?,
        );
        owned.insert(
            format!("{p}.post_attention_layernorm.weight"),
            b.ffn_norm.try_clone()?,
        );
        let a = &b.attn;
        for (n, t) in [
            ("q_proj.weight", &a.q),
            ("k_proj.weight", &a.k),
            ("v_proj.weight", &a.v),
            ("o_proj.weight", &a.o),
        ] {
            owned.insert(format!("{p}.self_attn.{n}"), t.try_clone()?);
        }
        for (n, t) in [
            ("q_proj.bias", &a.q_bias),
            ("k_proj.bias", &a.k_bias),
            ("v_proj.bias", &a.v_bias),
            ("q_norm.weight", &a.q_norm),
            ("k_norm.weight", &a.k_norm),
        ] {
            if let Some(t) = t {
                owned.insert(format!("{p}.self_attn.{n}"), t.try_clone()?);
            }
        }
        match (&b.ffn, &l.ffn) {
            (FfnWeights::Dense(mlp), Ffn::Dense { ffn_dim }) => {
                dense_layers.push(i);
                dense_f = *ffn_dim;
                let gu = split_rows(&mlp.w1, &[*ffn_dim, *ffn_dim])?;
                owned.insert(format!("{p}.mlp.gate_proj.weight"), gu[0].try_clone()?);
                owned.insert(format!("{p}.mlp.up_proj.weight"), gu[1].try_clone()?);
                owned.insert(format!("{p}.mlp.down_proj.weight"), mlp.w2.try_clone()?);
            }
            (FfnWeights::Moe(w), Ffn::Moe(mc)) => {
                let (e, f, d) = (mc.n_experts, mc.ffn_dim, c.d_model);
                (moe_e, moe_k, moe_f) = (e, mc.top_k, f);
                renorm = matches!(mc.router, RouterKind::Softmax { renormalize: true });
                let pre = format!("{p}.{}", nm.moe);
                owned.insert(format!("{pre}.{}.weight", nm.router), w.router.try_clone()?);
                let gu = split_rows(&w.w1, &vec![f; 2 * e])?;
                let dn = split_rows(&w.w2, &vec![d; e])?;
                for x in 0..e {
                    owned.insert(
                        format!("{pre}.experts.{x}.{}.weight", nm.expert[0]),
                        gu[2 * x].try_clone()?,
                    );
                    owned.insert(
                        format!("{pre}.experts.{x}.{}.weight", nm.expert[1]),
                        gu[2 * x + 1].try_clone()?,
                    );
                    owned.insert(
                        format!("{pre}.experts.{x}.{}.weight", nm.expert[2]),
                        dn[x].try_clone()?,
                    );
                }
                if let (Some(s), Some(sc)) = (&w.shared, &mc.shared) {
                    let sf = sc.ffn_dim * sc.count;
                    let gu = split_rows(&s.mlp.w1, &[sf, sf])?;
                    owned.insert(
                        format!("{pre}.shared_expert.gate_proj.weight"),
                        gu[0].try_clone()?,
                    );
                    owned.insert(
                        format!("{pre}.shared_expert.up_proj.weight"),
                        gu[1].try_clone()?,
                    );
                    owned.insert(
                        format!("{pre}.shared_expert.down_proj.weight"),
                        s.mlp.w2.try_clone()?,
                    );
                    if let Some(g) = &s.gate {
                        owned.insert(format!("{pre}.shared_expert_gate.weight"), g.try_clone()?);
                    }
                }
            }
            _ => {
                return Err(ModelError::Invalid(format!(
                    "layer {i}: weights do not match the layer kind"
                )))
            }
        }
    }
    Ok((
        arch,
        owned,
        dense_layers,
        (moe_e, moe_k, moe_f, renorm),
        dense_f,
    ))
}

pub(super) fn save(m: &Model, dir: &Path) -> Result<PathBuf> {
    let c = &m.config;
    let (arch, owned, dense_layers, (moe_e, moe_k, moe_f, renorm), dense_f) =
        hf_tensors(c, &m.params)?;
    let (arch_name, model_type) = match arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Arch::Mixtral => ("MixtralForCausalLM", "mixtral"),
        Arch::Qwen2Moe => ("Qwen2MoeForCausalLM", "qwen2_moe"),
        Arch::Qwen3Moe => ("Qwen3MoeForCausalLM", "qwen3_moe"),
        Arch::Olmoe => ("OlmoeForCausalLM", "olmoe"),
        Arch::Native => unreachable!("resolved by export_arch"),
    };
    // transformers 5's rope_parameters: the scaling as serde writes it, plus the base.
    let mut rope = serde_json::to_value(&c.rope_scaling)
        .map_err(|e| ModelError::Invalid(format!("rope scaling: {e}")))?;
    rope["rope_theta"] = json!(c.rope_theta);
    let mut cfg = json!({
        "architectures": [arch_name],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers(),
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": c.init_std,
        "torch_dtype": match m.dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids.first(),
        "pad_token_id": c.pad_token_id,
    });
    let o = cfg.as_object_mut().expect("object literal");
    match arch {
        Arch::Mixtral => {
            o.insert("num_local_experts".into(), json!(moe_e));
            o.insert("num_experts_per_tok".into(), json!(moe_k));
            o.insert("intermediate_size".into(), json!(moe_f));
            o.insert(
                "sliding_window".into(),
                json!(c.layers.first().and_then(|l| l.sliding_window)),
            );
        }
        Arch::Qwen3Moe | Arch::Qwen2Moe => {
            o.insert("num_experts".into(), json!(moe_e));
            o.insert("num_experts_per_tok".into(), json!(moe_k));
            o.insert("moe_intermediate_size".into(), json!(moe_f));
            o.insert(
                "intermediate_size".into(),
                json!(if dense_f > 0 { dense_f } else { moe_f }),
            );
            o.insert("norm_topk_prob".into(), json!(renorm));
            o.insert("decoder_sparse_step".into(), json!(1));
            o.insert("mlp_only_layers".into(), json!(dense_layers));
            o.insert("attention_bias".into(), json!(c.qkv_bias));
        }
        _ => {
            o.insert(
                "intermediate_size".into(),
                json!(if dense_f > 0 { dense_f } else { moe_f }),
            );
            o.insert("attention_bias".into(), json!(c.qkv_bias));
        }
    }
    if arch == Arch::Olmoe || arch == Arch::Mixtral || arch == Arch::Qwen3Moe {
        o.insert("router_aux_loss_coef".into(), json!(0.0));
    }
    if arch == Arch::Olmoe {
        o.insert("num_experts".into(), json!(moe_e));
        o.insert("num_experts_per_tok".into(), json!(moe_k));
        o.insert("norm_topk_prob".into(), json!(renorm));
    }
    // Write into a fresh temp dir, then swap it in.
    let tmp = dir.with_extension("tmp-export");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let text =
        serde_json::to_string_pretty(&cfg).map_err(|e| ModelError::Invalid(e.to_string()))?;
    std::fs::write(tmp.join("config.json"), text).map_err(|e| ModelError::io(&tmp, e))?;
    let refs: BTreeMap<String, &Tensor> = owned.iter().map(|(k, v)| (k.clone(), v)).collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    weights::save(&tmp.join("model.safetensors"), &refs, Some(meta))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
    Ok(dir.to_path_buf())
}
