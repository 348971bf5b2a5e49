//! One MoE layer's parameters: router [E, d], routed experts (w1 [E, H1, d], w2 [E, d, F], optional
//! biases), shared experts and the PR-MoE residual MLP; their seeded init, gradient buffers and
//! shape check, and the shared/residual parts' forward (the same in training, `train.rs`, and in
//! serving, `serve.rs`).

use super::config::{ExpertKind, MoeConfig, RouterKind};
use super::dense::{DenseMlp, DenseSaved};
use crate::param_set;
use crate::runtime::ops::{self, Activation, Matmul};
use crate::runtime::{DType, Device, Error, Result, Tensor};

/// One MoE layer's weights (Linear layout [out, in]).
pub struct MoeWeights {
    /// Router [E, d].
    pub router: Tensor,
    /// Selection bias [E] f32 (sigmoid router; updated by `update_router_bias`, not by gradients).
    pub router_bias: Option<Tensor>,
    /// First expert projection [E, H1, d]: SwiGLU [gate | up] (H1 = 2F) or fc1 (H1 = F).
    pub w1: Tensor,
    pub b1: Option<Tensor>,
    /// Second expert projection [E, d, F].
    pub w2: Tensor,
    pub b2: Option<Tensor>,
    pub shared: Option<SharedWeights>,
    pub residual: Option<ResidualWeights>,
}

pub struct SharedWeights {
    pub mlp: DenseMlp,
    /// [1, d] sigmoid gate (Qwen2-MoE `shared_expert_gate`).
    pub gate: Option<Tensor>,
}

pub struct ResidualWeights {
    pub mlp: DenseMlp,
    /// Mixing coefficient logits: coef = softmax(x · coefᵀ + coef_bias) over 2 ([2, d], [2]).
    pub coef: Tensor,
    pub coef_bias: Tensor,
}

param_set!(SharedWeights { set mlp, opt gate });
param_set!(ResidualWeights { set mlp, t coef, t coef_bias });
// router_bias is state, not a trained parameter: checkpoints save it through `visit_state`.
param_set!(MoeWeights { t router, t w1, opt b1, t w2, opt b2, opt_set shared, opt_set residual });

/// f32 gradients with the same names as `MoeWeights` (no router_bias).
pub type MoeGrads = MoeWeights;

impl MoeWeights {
    /// Seeded init: projections Normal(0, std), output projections Normal(0, out_std), zero
    /// biases, zero selection bias.
    pub fn init(
        cfg: &MoeConfig,
        std: f32,
        out_std: f32,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<MoeWeights> {
        cfg.validate().map_err(Error::Invalid)?;
        let (e, d, f, h1) = (
            cfg.n_experts,
            cfg.d_model,
            cfg.ffn_dim,
            cfg.first_proj_dim(),
        );
        let bias = |shape: &[usize]| -> Result<Option<Tensor>> {
            if cfg.expert_bias {
                Ok(Some(Tensor::zeros(shape, dtype, device)?))
            } else {
                Ok(None)
            }
        };
        let shared = match &cfg.shared {
            Some(s) => Some(SharedWeights {
                mlp: DenseMlp::init(
                    ExpertKind::SwiGlu,
                    d,
                    s.ffn_dim * s.count,
                    false,
                    std,
                    out_std,
                    seed ^ 0x51,
                    dtype,
                    device,
                )?,
                gate: if s.gated {
                    Some(Tensor::randn(&[1, d], std, seed ^ 0x52, dtype, device)?)
                } else {
                    None
                },
            }),
            None => None,
        };
        let residual = match &cfg.residual {
            Some(r) => Some(ResidualWeights {
                mlp: DenseMlp::init(
                    cfg.expert,
                    d,
                    r.ffn_dim,
                    cfg.expert_bias,
                    std,
                    out_std,
                    seed ^ 0x53,
                    dtype,
                    device,
                )?,
                coef: Tensor::randn(&[2, d], std, seed ^ 0x54, dtype, device)?,
                coef_bias: Tensor::zeros(&[2], dtype, device)?,
            }),
            None => None,
        };
        Ok(MoeWeights {
            router: Tensor::randn(&[e, d], std, seed ^ 0x55, dtype, device)?,
            router_bias: match cfg.router {
                RouterKind::Sigmoid { .. } => Some(Tensor::zeros(&[e], DType::F32, device)?),
                _ => None,
            },
            w1: Tensor::randn(&[e, h1, d], std, seed ^ 0x56, dtype, device)?,
            b1: bias(&[e, h1])?,
            w2: Tensor::randn(&[e, d, f], out_std, seed ^ 0x57, dtype, device)?,
            b2: bias(&[e, d])?,
            shared,
            residual,
        })
    }

    /// f32 zeros with this layer's parameter shapes (gradient accumulator).
    pub fn zeros_like(&self) -> Result<MoeGrads> {
        self.zeros_as(DType::F32)
    }

    /// Zeros of `dtype` with this layer's parameter shapes.
    pub fn zeros_as(&self, dtype: DType) -> Result<MoeGrads> {
        self.grads_as(dtype, dtype, true)
    }

    /// Gradient buffers of `dtype`, the routed experts' w1 and w2 of `expert_dtype` (f32 or the
    /// weights' dtype: what the grouped GEMMs write); zeros, except w1 and w2 when
    /// `!zero_experts` (left unwritten for a backward that writes them: `moe_backward_into`).
    pub(crate) fn grads_as(
        &self,
        dtype: DType,
        expert_dtype: DType,
        zero_experts: bool,
    ) -> Result<MoeGrads> {
        let z = |t: &Tensor| Tensor::zeros(t.shape(), dtype, t.device());
        let experts = |t: &Tensor| {
            if zero_experts {
                Tensor::zeros(t.shape(), expert_dtype, t.device())
            } else {
                Tensor::uninit(t.shape(), expert_dtype, t.device())
            }
        };
        Ok(MoeWeights {
            router: z(&self.router)?,
            router_bias: None,
            w1: experts(&self.w1)?,
            b1: self.b1.as_ref().map(z).transpose()?,
            w2: experts(&self.w2)?,
            b2: self.b2.as_ref().map(z).transpose()?,
            shared: match &self.shared {
                Some(s) => Some(SharedWeights {
                    mlp: s.mlp.zeros_like()?,
                    gate: s.gate.as_ref().map(z).transpose()?,
                }),
                None => None,
            },
            residual: match &self.residual {
                Some(r) => Some(ResidualWeights {
                    mlp: r.mlp.zeros_like()?,
                    coef: z(&r.coef)?,
                    coef_bias: z(&r.coef_bias)?,
                }),
                None => None,
            },
        })
    }

    /// Check shapes against `cfg`; the error names the tensor and both shapes.
    pub fn check(&self, cfg: &MoeConfig, layer: &str) -> Result<()> {
        let (e, d, f, h1) = (
            cfg.n_experts,
            cfg.d_model,
            cfg.ffn_dim,
            cfg.first_proj_dim(),
        );
        let want = |name: &str, t: &Tensor, shape: &[usize]| -> Result<()> {
            if t.shape() != shape {
                return Err(Error::shape(
                    "moe",
                    format!(
                        "{layer}.{name} has shape {:?}, expected {shape:?}",
                        t.shape()
                    ),
                ));
            }
            Ok(())
        };
        want("router", &self.router, &[e, d])?;
        want("w1", &self.w1, &[e, h1, d])?;
        want("w2", &self.w2, &[e, d, f])?;
        if cfg.expert_bias != (self.b1.is_some() && self.b2.is_some()) {
            return Err(Error::Invalid(format!(
                "{layer}: expert_bias = {} but expert biases are {}",
                cfg.expert_bias,
                if self.b1.is_some() {
                    "present"
                } else {
                    "absent"
                }
            )));
        }
        if cfg.shared.is_some() != self.shared.is_some()
            || cfg.residual.is_some() != self.residual.is_some()
        {
            return Err(Error::Invalid(format!(
                "{layer}: shared/residual weights do not match the config"
            )));
        }
        Ok(())
    }
}

/// What the shared experts' backward reuses: (MLP activations, shared output ys, gate (logit,
/// σ(logit))).
pub(crate) type SharedSaved = (DenseSaved, Tensor, Option<(Tensor, Tensor)>);
/// What the residual mix's backward reuses: (MLP activations, y_moe − y_mlp, coefficient logit
/// z, c0 = σ(z)).
pub(crate) type ResidualSaved = (DenseSaved, Tensor, Tensor, Tensor);

impl SharedWeights {
    /// y += ys · σ(x·gateᵀ) (no gate: y += ys), ys the shared experts' SwiGLU output of x; with
    /// `save` what the backward needs.
    pub(crate) fn add_into(
        &self,
        x: &Tensor,
        y: &mut Tensor,
        save: bool,
    ) -> Result<Option<SharedSaved>> {
        let (ys, s) = self.mlp.forward(ExpertKind::SwiGlu, x, save)?;
        let gate = match &self.gate {
            Some(g) => {
                let gl = ops::matmul(
                    x,
                    g,
                    Matmul {
                        trans_b: true,
                        out_dtype: Some(DType::F32),
                        ..Default::default()
                    },
                )?
                .reshape(&[x.dim(0)])?;
                let gs = ops::activation(&gl, Activation::Sigmoid)?;
                Some((gl, gs))
            }
            None => None,
        };
        let contrib = match &gate {
            Some((_, g)) => ops::scale_rows(&ys, g)?,
            None => ys.try_clone()?,
        };
        ops::add_assign(y, &contrib)?;
        Ok(s.map(|s| (s, ys, gate)))
    }
}

impl ResidualWeights {
    /// PR-MoE: y ← y_mlp + c0 · (y − y_mlp), c0 = σ(z), z = x·(coef₀ − coef₁)ᵀ + (b₀ − b₁), y_mlp
    /// the residual MLP's output of x; with `save` what the backward needs.
    pub(crate) fn mix_into(
        &self,
        kind: ExpertKind,
        x: &Tensor,
        y: &mut Tensor,
        save: bool,
    ) -> Result<Option<ResidualSaved>> {
        let (ym, s) = self.mlp.forward(kind, x, save)?;
        let z = self.coef_logit(x)?;
        let c0 = ops::activation(&z, Activation::Sigmoid)?;
        let mut diff = y.try_clone()?;
        ops::add_scaled(&mut diff, &ym, -1.0)?;
        let mut out = ym;
        ops::add_assign(&mut out, &ops::scale_rows(&diff, &c0)?)?;
        *y = out;
        Ok(s.map(|s| (s, diff, z, c0)))
    }

    /// z [T] f32 = x·(coef₀ − coef₁)ᵀ + (b₀ − b₁): the 2-way softmax as a sigmoid.
    fn coef_logit(&self, x: &Tensor) -> Result<Tensor> {
        let mut wd = ops::slice_rows(&self.coef, 0, 1)?;
        ops::add_scaled(&mut wd, &ops::slice_rows(&self.coef, 1, 1)?, -1.0)?;
        let z = ops::matmul(
            x,
            &wd,
            Matmul {
                trans_b: true,
                out_dtype: Some(DType::F32),
                ..Default::default()
            },
        )?
        .reshape(&[x.dim(0)])?;
        let b = ops::cast(&self.coef_bias, DType::F32)?;
        let mut bd = ops::slice_rows(&b, 0, 1)?;
        ops::add_scaled(&mut bd, &ops::slice_rows(&b, 1, 1)?, -1.0)?;
        ops::add_bias(&z.reshape(&[x.dim(0), 1])?, &bd)?.reshape(&[x.dim(0)])
    }
}
