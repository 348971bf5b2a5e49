//! MoE layer configuration, named as DeepSpeed / Megatron / HF name the same options.
//! `validate` names the field, the value and the constraint for anything out of range.

use serde::{Deserialize, Serialize};

use crate::runtime::ops::Activation;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    pub d_model: usize,
    pub n_experts: usize,
    pub top_k: usize,
    /// Hidden size of each routed expert.
    pub ffn_dim: usize,
    #[serde(default)]
    pub expert: ExpertKind,
    /// Biases on the expert projections (GPT-MoE style).
    #[serde(default)]
    pub expert_bias: bool,
    #[serde(default)]
    pub router: RouterKind,
    #[serde(default)]
    pub shared: Option<SharedExperts>,
    #[serde(default)]
    pub residual: Option<ResidualMoe>,
    /// Load-balancing loss weight (HF `router_aux_loss_coef`, Megatron `aux_loss_coeff`).
    #[serde(default)]
    pub aux_loss_coeff: f32,
    /// Router z-loss weight (ST-MoE, Megatron `z_loss_coeff`).
    #[serde(default)]
    pub z_loss_coeff: f32,
}

/// What one expert computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertKind {
    /// down(silu(gate(x)) ⊙ up(x)) (Mixtral, Qwen, OLMoE, DeepSeek).
    #[default]
    #[serde(rename = "swiglu")]
    SwiGlu,
    /// fc2(act(fc1(x))) (GPT-MoE, DeepSpeed-MoE).
    Mlp(Activation),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RouterKind {
    /// softmax(logits) → top-k; `renormalize` divides the k weights by their sum
    /// (Mixtral / Qwen3-MoE: true; Qwen2-MoE / OLMoE `norm_topk_prob = false`). Dropless.
    Softmax {
        #[serde(default = "yes")]
        renormalize: bool,
    },
    /// sigmoid(logits) + per-expert selection bias, group-limited top-k (DeepSeek-V3):
    /// the bias only steers selection; weights are the unbiased scores, optionally renormalised,
    /// times `routed_scaling_factor`. `bias_update_rate` drives aux-loss-free balancing.
    Sigmoid {
        #[serde(default = "one")]
        n_group: usize,
        #[serde(default = "one")]
        topk_group: usize,
        #[serde(default = "yes")]
        renormalize: bool,
        #[serde(default = "one_f")]
        routed_scaling_factor: f32,
        #[serde(default)]
        bias_update_rate: f32,
    },
    /// GShard / Switch top-1 or top-2 gating with expert capacity (DeepSpeed-MoE `TopKGate`):
    /// capacity = max(ceil(k·T/E · capacity_factor), min_capacity) rows per expert; first choices
    /// queue before second choices; tokens past capacity are dropped (their expert output is
    /// zero and the block's residual carries them) when `drop_tokens`, else capacity is unbounded.
    Switch {
        #[serde(default = "one_f")]
        capacity_factor: f32,
        #[serde(default = "four")]
        min_capacity: usize,
        #[serde(default = "yes")]
        drop_tokens: bool,
        /// Random token selection: which tokens an over-full expert keeps is random, not by order.
        #[serde(default)]
        use_rts: bool,
        #[serde(default)]
        noisy_gate_policy: NoisyGate,
        /// Top-2: pick the second expert with Gumbel noise on the logits during training
        /// (DeepSpeed's top2gating does).
        #[serde(default = "yes")]
        second_expert_noise: bool,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoisyGate {
    #[default]
    None,
    /// Multiply the router input by U(1 − 0.01, 1 + 0.01) during training.
    Jitter,
    /// Add Gumbel noise to the logits before picking the first expert during training.
    Rsample,
}

impl Default for RouterKind {
    fn default() -> Self {
        RouterKind::Softmax { renormalize: true }
    }
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn one_f() -> f32 {
    1.0
}

/// Always-on experts beside the routed ones (Qwen2-MoE `shared_expert`, DeepSeek
/// `n_shared_experts`): one SwiGLU MLP of `count × ffn_dim` hidden units, optionally scaled per
/// token by sigmoid(x · w_gate) (Qwen2-MoE `shared_expert_gate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedExperts {
    pub ffn_dim: usize,
    #[serde(default = "one")]
    pub count: usize,
    #[serde(default)]
    pub gated: bool,
}

/// Residual MoE (DeepSpeed PR-MoE): a dense MLP runs beside the experts and the two outputs are
/// mixed per token by softmax(x · W_c + b_c) over 2 coefficients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidualMoe {
    pub ffn_dim: usize,
}

impl MoeConfig {
    /// Check every value; the error names the field, the value and what was expected.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |field: &str, v: String, want: &str| Err(format!("moe.{field} = {v}: {want}"));
        if self.d_model == 0 {
            return bad("d_model", "0".into(), "must be > 0");
        }
        if self.n_experts == 0 {
            return bad("n_experts", "0".into(), "must be > 0");
        }
        if self.n_experts > 1024 {
            return bad(
                "n_experts",
                self.n_experts.to_string(),
                "at most 1024 experts per layer are supported",
            );
        }
        if self.top_k == 0 || self.top_k > self.n_experts {
            return bad(
                "top_k",
                self.top_k.to_string(),
                &format!("must be in 1..={} (n_experts)", self.n_experts),
            );
        }
        if self.top_k > 32 {
            return bad(
                "top_k",
                self.top_k.to_string(),
                "at most 32 experts per token are supported",
            );
        }
        if self.ffn_dim == 0 {
            return bad("ffn_dim", "0".into(), "must be > 0");
        }
        if !(self.aux_loss_coeff >= 0.0 && self.aux_loss_coeff.is_finite()) {
            return bad(
                "aux_loss_coeff",
                self.aux_loss_coeff.to_string(),
                "must be a finite value >= 0",
            );
        }
        if !(self.z_loss_coeff >= 0.0 && self.z_loss_coeff.is_finite()) {
            return bad(
                "z_loss_coeff",
                self.z_loss_coeff.to_string(),
                "must be a finite value >= 0",
            );
        }
        match &self.router {
            RouterKind::Softmax { .. } => {}
            RouterKind::Sigmoid {
                n_group,
                topk_group,
                routed_scaling_factor,
                bias_update_rate,
                ..
            } => {
                if *n_group == 0 || self.n_experts % n_group != 0 {
                    return bad(
                        "router.n_group",
                        n_group.to_string(),
                        &format!("must divide n_experts = {}", self.n_experts),
                    );
                }
                if *topk_group == 0 || topk_group > n_group {
                    return bad(
                        "router.topk_group",
                        topk_group.to_string(),
                        &format!("must be in 1..={n_group} (n_group)"),
                    );
                }
                let per_group = self.n_experts / n_group;
                if *n_group > 1 && per_group < 2 {
                    return bad(
                        "router.n_group",
                        n_group.to_string(),
                        "groups need >= 2 experts (group score = sum of its top-2)",
                    );
                }
                if self.top_k > topk_group * per_group {
                    return bad(
                        "top_k",
                        self.top_k.to_string(),
                        &format!(
                            "must be <= topk_group × experts per group = {}",
                            topk_group * per_group
                        ),
                    );
                }
                if !(routed_scaling_factor.is_finite() && *routed_scaling_factor > 0.0) {
                    return bad(
                        "router.routed_scaling_factor",
                        routed_scaling_factor.to_string(),
                        "must be a finite value > 0",
                    );
                }
                if !(bias_update_rate.is_finite() && *bias_update_rate >= 0.0) {
                    return bad(
                        "router.bias_update_rate",
                        bias_update_rate.to_string(),
                        "must be a finite value >= 0",
                    );
                }
                if self.aux_loss_coeff > 0.0 {
                    return bad(
                        "aux_loss_coeff",
                        self.aux_loss_coeff.to_string(),
                        "must be 0 with the sigmoid router (it balances through the selection bias)",
                    );
                }
            }
            RouterKind::Switch {
                capacity_factor, ..
            } => {
                if self.top_k > 2 {
                    return bad(
                        "top_k",
                        self.top_k.to_string(),
                        "switch/GShard gating is top-1 or top-2",
                    );
                }
                if !(capacity_factor.is_finite() && *capacity_factor > 0.0) {
                    return bad(
                        "router.capacity_factor",
                        capacity_factor.to_string(),
                        "must be a finite value > 0",
                    );
                }
            }
        }
        if let Some(s) = &self.shared {
            if s.ffn_dim == 0 || s.count == 0 {
                return bad("shared", format!("{s:?}"), "ffn_dim and count must be > 0");
            }
        }
        if let Some(r) = &self.residual {
            if r.ffn_dim == 0 {
                return bad("residual.ffn_dim", "0".into(), "must be > 0");
            }
        }
        Ok(())
    }

    /// Rows each expert may take for `tokens` tokens (`None`: unbounded, dropless).
    pub fn capacity(&self, tokens: usize) -> Option<usize> {
        match &self.router {
            RouterKind::Switch {
                capacity_factor,
                min_capacity,
                drop_tokens: true,
                ..
            } => {
                let c = ((self.top_k * tokens) as f64 / self.n_experts as f64
                    * *capacity_factor as f64)
                    .ceil() as usize;
                Some(c.max(*min_capacity))
            }
            _ => None,
        }
    }

    /// Width of the first expert projection: 2F for SwiGLU ([gate | up]), F for a plain MLP.
    pub fn first_proj_dim(&self) -> usize {
        match self.expert {
            ExpertKind::SwiGlu => 2 * self.ffn_dim,
            ExpertKind::Mlp(_) => self.ffn_dim,
        }
    }
}
