//! The model's trained tensors by block (`Params`; gradients share the type and names), their
//! zeroed or uninitialised gradient buffers, and the MoE selection biases (state, not trained).

use super::attention::Attention;
use crate::moe::{DenseMlp, MoeWeights};
use crate::param_set;
use crate::runtime::{DType, ParamSet, Tensor};

pub enum FfnWeights {
    Dense(DenseMlp),
    Moe(MoeWeights),
}

impl ParamSet for FfnWeights {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor)) {
        match self {
            FfnWeights::Dense(m) => m.visit(p, f),
            FfnWeights::Moe(m) => m.visit(p, f),
        }
    }
    fn visit_mut<'a>(&'a mut self, p: &str, f: &mut dyn FnMut(&str, &'a mut Tensor)) {
        match self {
            FfnWeights::Dense(m) => m.visit_mut(p, f),
            FfnWeights::Moe(m) => m.visit_mut(p, f),
        }
    }
}

pub struct Block {
    pub attn_norm: Tensor,
    pub attn: Attention,
    pub ffn_norm: Tensor,
    pub ffn: FfnWeights,
}
param_set!(Block { t attn_norm, set attn, t ffn_norm, set ffn });

/// All trained tensors (weights in the model dtype; gradients f32 with the same names).
pub struct Params {
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: Option<Tensor>,
}

impl ParamSet for Params {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor)) {
        f(&crate::runtime::params::join(p, "embed"), &self.embed);
        for (i, b) in self.blocks.iter().enumerate() {
            b.visit(&crate::runtime::params::join(p, &format!("blocks.{i}")), f);
        }
        f(&crate::runtime::params::join(p, "norm"), &self.norm);
        if let Some(h) = &self.lm_head {
            f(&crate::runtime::params::join(p, "lm_head"), h);
        }
    }
    fn visit_mut<'a>(&'a mut self, p: &str, f: &mut dyn FnMut(&str, &'a mut Tensor)) {
        f(&crate::runtime::params::join(p, "embed"), &mut self.embed);
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.visit_mut(&crate::runtime::params::join(p, &format!("blocks.{i}")), f);
        }
        f(&crate::runtime::params::join(p, "norm"), &mut self.norm);
        if let Some(h) = &mut self.lm_head {
            f(&crate::runtime::params::join(p, "lm_head"), h);
        }
    }
}

pub type Grads = Params;

impl Params {
    /// The routed experts' weights (w1 and w2 of every MoE layer): in a gradient set, the
    /// tensors whose squared norm `Model::backward_with` sums in the GEMM epilogues.
    pub fn routed_expert_weights(&self) -> Vec<&Tensor> {
        self.blocks
            .iter()
            .filter_map(|b| match &b.ffn {
                FfnWeights::Moe(m) => Some([&m.w1, &m.w2]),
                FfnWeights::Dense(_) => None,
            })
            .flatten()
            .collect()
    }

    /// Zeros of `dtype` shaped like every parameter (f32: a gradient accumulator).
    pub fn zeros_like(&self, dtype: DType) -> crate::runtime::Result<Params> {
        self.grads_like(dtype, dtype, true)
    }

    /// `zeros_like(f32)` except the routed experts' w1 and w2, which are zeros of `experts`
    /// (`train.expert_grad_dtype`).
    pub fn zero_grads(&self, experts: DType) -> crate::runtime::Result<Grads> {
        self.grads_like(DType::F32, experts, true)
    }

    /// Gradient buffers for one optimizer step: f32 zeros, except the routed experts' weight
    /// gradients (w1, w2 of every MoE layer), of dtype `experts` (f32, or the parameters' dtype
    /// to halve their bytes: `train.expert_grad_dtype`) and left unwritten — the step's first
    /// `Model::backward_first` writes them rather than adding, so neither a memset nor a read
    /// of those bytes (most of an MoE model's) is spent. Use `zero_grads` when no
    /// `backward_first` will run.
    pub fn grad_buffers(&self, experts: DType) -> crate::runtime::Result<Grads> {
        self.grads_like(DType::F32, experts, false)
    }

    fn grads_like(
        &self,
        dtype: DType,
        experts: DType,
        zero_experts: bool,
    ) -> crate::runtime::Result<Params> {
        let z = |t: &Tensor| Tensor::zeros(t.shape(), dtype, t.device());
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    attn_norm: z(&b.attn_norm)?,
                    attn: Attention {
                        q: z(&b.attn.q)?,
                        k: z(&b.attn.k)?,
                        v: z(&b.attn.v)?,
                        o: z(&b.attn.o)?,
                        q_bias: b.attn.q_bias.as_ref().map(z).transpose()?,
                        k_bias: b.attn.k_bias.as_ref().map(z).transpose()?,
                        v_bias: b.attn.v_bias.as_ref().map(z).transpose()?,
                        q_norm: b.attn.q_norm.as_ref().map(z).transpose()?,
                        k_norm: b.attn.k_norm.as_ref().map(z).transpose()?,
                    },
                    ffn_norm: z(&b.ffn_norm)?,
                    ffn: match &b.ffn {
                        FfnWeights::Dense(m) => FfnWeights::Dense(DenseMlp {
                            w1: z(&m.w1)?,
                            b1: m.b1.as_ref().map(z).transpose()?,
                            w2: z(&m.w2)?,
                            b2: m.b2.as_ref().map(z).transpose()?,
                        }),
                        FfnWeights::Moe(m) => {
                            FfnWeights::Moe(m.grads_as(dtype, experts, zero_experts)?)
                        }
                    },
                })
            })
            .collect::<crate::runtime::Result<Vec<_>>>()?;
        Ok(Params {
            embed: z(&self.embed)?,
            blocks,
            norm: z(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(z).transpose()?,
        })
    }

    /// The MoE selection biases (optimizer-free state, saved in checkpoints): (name, tensor).
    pub fn visit_state<'a>(&'a self, f: &mut dyn FnMut(&str, &'a Tensor)) {
        for (i, b) in self.blocks.iter().enumerate() {
            if let FfnWeights::Moe(m) = &b.ffn {
                if let Some(rb) = &m.router_bias {
                    f(&format!("blocks.{i}.ffn.router_bias"), rb);
                }
            }
        }
    }

    /// Mutable `visit_state`.
    pub fn visit_state_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            if let FfnWeights::Moe(m) = &mut b.ffn {
                if let Some(rb) = &mut m.router_bias {
                    f(&format!("blocks.{i}.ffn.router_bias"), rb);
                }
            }
        }
    }
}
