//! The MoE block: router → dispatch → experts → combine, plus shared experts and the PR-MoE
//! residual MLP; forward and backward. x: [T, d] (f32 on CPU, bf16/f32 on GPU) -> y: [T, d].
//! The backward reuses the saved routing, permutation and expert activations (`MoeSaved`).

use super::config::{ExpertKind, MoeConfig, NoisyGate, RouterKind};
use super::dense::{DenseMlp, DenseSaved};
use super::dispatch::{self, Dispatch};
use super::experts::{self, ExpertSaved};
use super::router::{self, Routing};
use crate::param_set;
use crate::runtime::ops::{self, Activation, Matmul};
use crate::runtime::{DType, Device, Error, KernelSettings, Result, Tensor};

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

/// Training (with a seed for the noisy gates / random token selection) or inference.
#[derive(Copy, Clone, Debug)]
pub enum Mode {
    Train {
        seed: u64,
    },
    /// Inference with the statistics (tokens per expert, drops) computed.
    Infer,
    /// Inference whose caller reads no statistics (generation, serving): none are computed,
    /// and on the GPU a step of a few tokens with dropless routing runs its SwiGLU experts
    /// straight from the router's slots (`ops::moe_serve_swiglu`: two kernels instead of
    /// dispatch, gather, grouped GEMMs, activation and combine).
    Serve,
}

/// Per-step statistics, all device tensors (reading them is the caller's choice).
pub struct MoeStats {
    /// [1] f32 load-balancing loss (times aux_loss_coeff).
    pub aux_loss: Tensor,
    /// [1] f32 router z-loss (times z_loss_coeff).
    pub z_loss: Tensor,
    /// [E] i32 slots routed to each expert (before capacity).
    pub tokens_per_expert: Tensor,
    /// [E] f32 slots dropped by capacity per expert.
    pub dropped: Tensor,
}

pub struct MoeSaved {
    router_in: Option<Tensor>,
    jitter: Option<Tensor>,
    logits: Tensor,
    routing: Routing,
    dispatch: Dispatch,
    weights: Tensor,
    experts: ExpertSaved,
    y_perm: Tensor,
    /// (MLP activations, shared output ys, gate (logit, σ(logit)))
    shared: Option<(DenseSaved, Tensor, Option<(Tensor, Tensor)>)>,
    /// (MLP activations, y_moe − y_mlp, coefficient logit z, c0 = σ(z))
    residual: Option<(DenseSaved, Tensor, Tensor, Tensor)>,
}

/// y [T, d] for x [T, d]; in training also what the backward needs.
pub fn moe_forward(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    mode: Mode,
) -> Result<(Tensor, Option<MoeSaved>, MoeStats)> {
    let (y, saved, stats) = moe_forward_named(cfg, w, x, mode, "moe", false)?;
    let stats = stats.ok_or_else(|| {
        Error::Invalid(
            "moe_forward: Mode::Serve computes no statistics (use moe_forward_named)".into(),
        )
    })?;
    Ok((y, saved, stats))
}

/// `moe_forward` with a layer name for errors; `check_finite` reads the router logits back to
/// report NaN/Inf by layer (a device sync: off on the hot path, on in debugging and tests).
/// The statistics are None in `Mode::Serve`.
pub fn moe_forward_named(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    mode: Mode,
    layer: &str,
    check_finite: bool,
) -> Result<(Tensor, Option<MoeSaved>, Option<MoeStats>)> {
    moe_forward_inner(cfg, w, x, mode, layer, check_finite, None)
}

/// A served step whose input is still a residual add + RMSNorm (decode): the router GEMV norms
/// the rows itself and picks the experts in the same launch (`ops::add_rmsnorm_router_topk`).
/// Returns (new residual x + a, MoE output), or None where that path does not apply (the
/// caller runs `add_rmsnorm` and `moe_forward_named`); `x` is not modified.
pub fn moe_forward_served_addnorm(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    a: &Tensor,
    norm: &Tensor,
    eps: f32,
    layer: &str,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(rule) = fused_router_rule(cfg, w, x) else {
        return Ok(None);
    };
    let Some((xn, h, logits, ids, wts)) =
        ops::add_rmsnorm_router_topk(x, a, norm, eps, &w.router, &rule)?
    else {
        return Ok(None);
    };
    let (y, _, _) = moe_forward_inner(
        cfg,
        w,
        &h,
        Mode::Serve,
        layer,
        false,
        Some((logits, ids, wts)),
    )?;
    Ok(Some((xn, y)))
}

/// Whether a block's router can be folded through the RMSNorm and o projection before it
/// (`ops::router_fold`) for `moe_forward_served_oroute`: a softmax router without selection bias
/// (a bias or a sigmoid score does not commute with the norm's positive factor) and no shared or
/// residual part; `MOE_ROUTER_FOLD=0` says no (A/B comparisons).
pub fn router_foldable(cfg: &MoeConfig, w: &MoeWeights) -> bool {
    KernelSettings::current().router_fold
        && matches!(cfg.router, RouterKind::Softmax { .. })
        && w.router_bias.is_none()
        && w.shared.is_none()
        && w.residual.is_none()
}

/// The router rule `moe_forward_served_oroute` runs this block with for rows like x (GPU, a
/// foldable router, slot-wise experts, at most 8 rows of a 16-bit type), or None where that path
/// does not apply.
pub fn served_oroute_rule(cfg: &MoeConfig, w: &MoeWeights, x: &Tensor) -> Option<ops::SoftmaxTopK> {
    let fits = x.dim(0) <= ops::SoftmaxTopK::MAX_ROWS
        && x.dtype().size_in_bytes() == 2
        && cfg.n_experts <= ops::SoftmaxTopK::MAX_EXPERTS;
    if !(fits && router_foldable(cfg, w)) {
        return None;
    }
    fused_router_rule(cfg, w, x)
}

/// A served step's MoE block from the attention's context before its o projection (decode),
/// routed by `rule` (`served_oroute_rule`): the o projection and the router (folded through the
/// RMSNorm and o projection: `fold` from `ops::router_fold`) in one launch, then the experts
/// with the residual add + RMSNorm and the combine weights folded into their first kernel
/// (`ops::o_router_topk`, `ops::moe_serve_swiglu_norm`): three kernels from attention to MoE
/// output instead of four, and the router's latency beside the o projection's instead of after
/// it. Returns (new residual x + ctx·Woᵀ, MoE output), or None where the launch is not possible
/// (the caller projects and takes `moe_forward_served_addnorm`); `x` is not modified.
#[allow(clippy::too_many_arguments)]
pub fn moe_forward_served_oroute(
    rule: &ops::SoftmaxTopK,
    w: &MoeWeights,
    fold: &Tensor,
    x: &Tensor,
    ctx: &Tensor,
    wo: &Tensor,
    norm: &Tensor,
    eps: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some((s, z, ids)) = ops::o_router_topk(ctx, wo, x, fold, rule.k)? else {
        return Ok(None);
    };
    let y = ops::moe_serve_swiglu_norm(&s, norm, eps, &z, &ids, rule, &w.w1, &w.w2)?;
    Ok(Some((s, y)))
}

/// The one-kernel router's rule for a served step (the caller's to know) of a softmax router
/// without selection bias whose experts take the slot-wise kernels; None otherwise.
fn fused_router_rule(cfg: &MoeConfig, w: &MoeWeights, x: &Tensor) -> Option<ops::SoftmaxTopK> {
    match cfg.router {
        RouterKind::Softmax { renormalize }
            if serve_slotwise(cfg, w, x) && w.router_bias.is_none() && fused_router() =>
        {
            let r = router::weight_rule(cfg);
            Some(ops::SoftmaxTopK {
                k: cfg.top_k,
                normalize: renormalize,
                add: r.add,
                clamp_min: r.clamp_min,
                scale: r.scale,
            })
        }
        _ => None,
    }
}

/// `moe_forward_named` with, optionally, the router's (logits, ids, combine weights) already
/// computed for a served step (they must come from `fused_router_rule`'s kernels).
fn moe_forward_inner(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    mode: Mode,
    layer: &str,
    check_finite: bool,
    routed_already: Option<(Tensor, Tensor, Tensor)>,
) -> Result<(Tensor, Option<MoeSaved>, Option<MoeStats>)> {
    if x.rank() != 2 || x.dim(1) != cfg.d_model {
        return Err(Error::shape(
            "moe",
            format!(
                "{layer}: input {:?} is not [tokens, {}]",
                x.shape(),
                cfg.d_model
            ),
        ));
    }
    let t = x.dim(0);
    let dev = x.device();
    let train_seed = match mode {
        Mode::Train { seed } => Some(seed),
        Mode::Infer | Mode::Serve => None,
    };
    let serve = matches!(mode, Mode::Serve);
    // Jitter (DeepSpeed multiplicative_jitter): router input × U(0.99, 1.01) in training.
    let jitter = match (&cfg.router, train_seed) {
        (
            RouterKind::Switch {
                noisy_gate_policy: NoisyGate::Jitter,
                ..
            },
            Some(seed),
        ) => {
            let n = x.numel();
            let m: Vec<f32> = (0..n)
                .map(|i| 0.99 + 0.02 * router::uniform(seed, 3, i as u64))
                .collect();
            Some(Tensor::from_f32(&m, x.shape(), x.dtype(), dev)?)
        }
        _ => None,
    };
    let router_in = match &jitter {
        Some(m) => Some(ops::mul(x, m)?),
        None => None,
    };
    let rx = router_in.as_ref().unwrap_or(x);
    // A served step of a plain softmax router: the router GEMV's last block picks the experts
    // (ops::router_topk), so no route kernel runs.
    let fused = match routed_already {
        Some(r) => Some(r),
        None => match fused_router_rule(cfg, w, x) {
            Some(rule) if serve => ops::router_topk(x, &w.router, &rule)?,
            _ => None,
        },
    };
    let (logits, routing, served) = match fused {
        Some((logits, ids, wts)) => {
            if check_finite {
                router::check_finite(layer, &logits)?;
            }
            let y = ops::moe_serve_swiglu(x, &w.w1, &w.w2, &ids, &wts)?;
            (logits, None, Some(y))
        }
        None => {
            let logits = ops::matmul(
                rx,
                &w.router,
                Matmul {
                    trans_b: true,
                    out_dtype: Some(DType::F32),
                    ..Default::default()
                },
            )?;
            if check_finite {
                router::check_finite(layer, &logits)?;
            }
            let routing = router::route(cfg, &logits, w.router_bias.as_ref(), train_seed)?;
            let served = match &routing.weights {
                Some(wts) if serve && serve_slotwise(cfg, w, x) => {
                    Some(ops::moe_serve_swiglu(x, &w.w1, &w.w2, &routing.ids, wts)?)
                }
                _ => None,
            };
            (logits, Some(routing), served)
        }
    };
    let (mut y, routed) = match served {
        Some(y) => (y, None),
        None => {
            let routing = routing.expect("routing: computed whenever the slots are not served");
            let disp = dispatch::dispatch(cfg, &routing.ids, train_seed.map(|s| s ^ 0x7275_7473))?;
            // The route kernel's dropless weights are used in place; others are computed here.
            let weights = match &routing.weights {
                Some(_) => None,
                None => Some(router::combine_weights(cfg, &routing.gates, &disp.pos)?),
            };
            let (y_perm, ex) = experts::forward(
                cfg,
                &w.w1,
                w.b1.as_ref(),
                &w.w2,
                w.b2.as_ref(),
                x,
                &disp.tok,
                &disp.offsets,
            )?;
            let y = dispatch::combine(
                &y_perm,
                &disp.pos,
                weights.as_ref().or(routing.weights.as_ref()),
            )?;
            (y, Some((routing, disp, weights, y_perm, ex)))
        }
    };
    let save = train_seed.is_some();

    let mut shared_saved = None;
    if let (Some(sw), Some(_)) = (&w.shared, &cfg.shared) {
        let (ys, s) = sw.mlp.forward(ExpertKind::SwiGlu, x, save)?;
        let gate = match &sw.gate {
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
                .reshape(&[t])?;
                let gs = ops::activation(&gl, Activation::Sigmoid)?;
                Some((gl, gs))
            }
            None => None,
        };
        let contrib = match &gate {
            Some((_, g)) => ops::scale_rows(&ys, g)?,
            None => ys.try_clone()?,
        };
        ops::add_assign(&mut y, &contrib)?;
        if let Some(s) = s {
            shared_saved = Some((s, ys, gate));
        }
    }
    let mut residual_saved = None;
    if let (Some(rw), Some(_)) = (&w.residual, &cfg.residual) {
        // y = y_mlp + c0 · (y_moe − y_mlp), c0 = σ(z), z = x·(coef₀ − coef₁)ᵀ + (b₀ − b₁).
        let (ym, s) = rw.mlp.forward(cfg.expert, x, save)?;
        let z = coef_logit(x, rw)?;
        let c0 = ops::activation(&z, Activation::Sigmoid)?;
        let mut diff = y.try_clone()?;
        ops::add_scaled(&mut diff, &ym, -1.0)?;
        let mut out = ym.try_clone()?;
        ops::add_assign(&mut out, &ops::scale_rows(&diff, &c0)?)?;
        y = out;
        if let Some(s) = s {
            residual_saved = Some((s, diff, z, c0));
        }
    }
    // Inference skips what only training reads: the losses (zero) and, for dropless routers,
    // the drop counts (zero); serving skips the statistics altogether.
    let stats = match &routed {
        Some((routing, disp, ..)) if !serve => {
            let dev = x.device();
            let (aux_loss, z_loss) = if save {
                router::losses(cfg, routing)?
            } else {
                (
                    Tensor::zeros(&[1], DType::F32, dev)?,
                    Tensor::zeros(&[1], DType::F32, dev)?,
                )
            };
            let dropped = if save || matches!(cfg.router, RouterKind::Switch { .. }) {
                disp.dropped()?
            } else {
                Tensor::zeros(&[cfg.n_experts], DType::F32, dev)?
            };
            Some(MoeStats {
                aux_loss,
                z_loss,
                tokens_per_expert: disp.counts.try_clone()?,
                dropped,
            })
        }
        _ => None,
    };
    let saved = match routed {
        Some((routing, dispatch, weights, y_perm, experts)) if save => Some(MoeSaved {
            // Training routes never carry the route kernel's weights; copy them if one did.
            weights: match weights {
                Some(t) => t,
                None => routing
                    .weights
                    .as_ref()
                    .expect("combine weights: computed or from the route")
                    .try_clone()?,
            },
            router_in,
            jitter,
            logits,
            routing,
            dispatch,
            experts,
            y_perm,
            shared: shared_saved,
            residual: residual_saved,
        }),
        _ => None,
    };
    Ok((y, saved, stats))
}

/// Whether a served step takes `ops::moe_serve_swiglu`: GPU, SwiGLU experts without biases,
/// 16-byte rows, and few enough slots that they rarely share an expert (2·k·T <= E: each slot
/// reads its expert's weights itself, where the grouped kernels read each active expert once).
/// `MOE_NO_SERVE_SLOTS=1` keeps the dispatch path (A/B comparisons).
fn serve_slotwise(cfg: &MoeConfig, w: &MoeWeights, x: &Tensor) -> bool {
    let vec = 16 / x.dtype().size_in_bytes();
    KernelSettings::current().serve_slots
        && matches!(x.device(), Device::Cuda(_))
        && cfg.expert == ExpertKind::SwiGlu
        && w.b1.is_none()
        && w.b2.is_none()
        && 2 * cfg.top_k * x.dim(0) <= cfg.n_experts
        && cfg.d_model % vec == 0
        && w.w2.dim(2) % vec == 0
}

/// Whether a served softmax router runs as one kernel (`ops::router_topk`);
/// `MOE_FUSED_ROUTER=0` keeps the router GEMV + route kernel (A/B comparisons).
fn fused_router() -> bool {
    KernelSettings::current().fused_router
}

/// z [T] f32 = x·(coef₀ − coef₁)ᵀ + (b₀ − b₁): the 2-way softmax as a sigmoid.
fn coef_logit(x: &Tensor, rw: &ResidualWeights) -> Result<Tensor> {
    let mut wd = ops::slice_rows(&rw.coef, 0, 1)?;
    ops::add_scaled(&mut wd, &ops::slice_rows(&rw.coef, 1, 1)?, -1.0)?;
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
    let b = ops::cast(&rw.coef_bias, DType::F32)?;
    let mut bd = ops::slice_rows(&b, 0, 1)?;
    ops::add_scaled(&mut bd, &ops::slice_rows(&b, 1, 1)?, -1.0)?;
    ops::add_bias(&z.reshape(&[x.dim(0), 1])?, &bd)?.reshape(&[x.dim(0)])
}

/// dx [T, d] for dy, accumulating f32 weight gradients into `grads`. `loss_scale` is the factor
/// the caller applied to the main loss (e.g. 1/accumulation steps); it scales the aux and z-loss
/// gradients the same way.
pub fn moe_backward(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    saved: &MoeSaved,
    dy: &Tensor,
    loss_scale: f32,
    grads: &mut MoeGrads,
) -> Result<Tensor> {
    moe_backward_into(cfg, w, x, saved, dy, loss_scale, grads, false, None)
}

/// `moe_backward`, except that with `experts_fresh` the routed experts' weight gradients
/// (`grads.w1`, `grads.w2`, the bulk of an MoE model's gradient bytes) are written instead of
/// added to, so their buffers need no zeroing and are never read (see `Params::grad_buffers`);
/// with `expert_sumsq` ([1] f32) the sum of their squared new values is added into it.
#[allow(clippy::too_many_arguments)]
pub fn moe_backward_into(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    saved: &MoeSaved,
    dy: &Tensor,
    loss_scale: f32,
    grads: &mut MoeGrads,
    experts_fresh: bool,
    expert_sumsq: Option<&mut Tensor>,
) -> Result<Tensor> {
    let acc = Matmul {
        trans_a: true,
        out_dtype: Some(DType::F32),
        ..Default::default()
    };
    // dx is the first contribution's tensor, the later ones added into it (no zeroed buffer).
    let mut dx: Option<Tensor> = None;
    let add = |dx: &mut Option<Tensor>, t: Tensor| -> Result<()> {
        match dx.as_mut() {
            Some(d) => ops::add_assign(d, &t),
            None => {
                *dx = Some(t);
                Ok(())
            }
        }
    };
    let mut dy_scaled: Option<Tensor> = None;
    if let (Some(rw), Some((s, diff, z, c0)), Some(rg)) =
        (&w.residual, &saved.residual, grads.residual.as_mut())
    {
        // y = y_mlp + c0·(y_moe − y_mlp): d y_moe = c0·dy, d y_mlp = (1 − c0)·dy, dc0 = ⟨dy, diff⟩.
        let dy_moe = ops::scale_rows(dy, c0)?;
        let mut dy_mlp = dy.try_clone()?;
        ops::add_scaled(&mut dy_mlp, &dy_moe, -1.0)?;
        dy_scaled = Some(dy_moe);
        add(
            &mut dx,
            rw.mlp.backward(cfg.expert, x, s, &dy_mlp, &mut rg.mlp)?,
        )?;
        let dz = ops::activation_backward(z, &ops::row_dot(dy, diff)?, Activation::Sigmoid)?;
        let dzx = ops::cast(&dz, x.dtype())?.reshape(&[x.dim(0), 1])?;
        // z = x·(coef₀ − coef₁)ᵀ + (b₀ − b₁): coef₀ gets +g, coef₁ gets −g.
        let gwd = ops::matmul(&dzx, x, acc)?; // [1, d]
        let gb = ops::sum_all(&dz)?;
        for (row, sign) in [(0usize, 1.0f32), (1, -1.0)] {
            let mut gr = ops::slice_rows(&rg.coef, row, 1)?;
            ops::add_scaled(&mut gr, &gwd, sign)?;
            ops::write_rows(&mut rg.coef, row, &gr)?;
            let mut gbr = ops::slice_rows(&rg.coef_bias, row, 1)?;
            ops::add_scaled(&mut gbr, &gb, sign)?;
            ops::write_rows(&mut rg.coef_bias, row, &gbr)?;
        }
        let mut wd = ops::slice_rows(&rw.coef, 0, 1)?;
        ops::add_scaled(&mut wd, &ops::slice_rows(&rw.coef, 1, 1)?, -1.0)?;
        add(&mut dx, ops::matmul(&dzx, &wd, Matmul::default())?)?;
    }
    let dy_moe = dy_scaled.as_ref().unwrap_or(dy);
    if let (Some(sw), Some((s, ys, gate)), Some(sg)) =
        (&w.shared, &saved.shared, grads.shared.as_mut())
    {
        let gated = match gate {
            Some((_, g)) => Some(ops::scale_rows(dy_moe, g)?),
            None => None,
        };
        add(
            &mut dx,
            sw.mlp.backward(
                ExpertKind::SwiGlu,
                x,
                s,
                gated.as_ref().unwrap_or(dy_moe),
                &mut sg.mlp,
            )?,
        )?;
        if let (Some((gl, _)), Some(gw), Some(gg)) = (gate, &sw.gate, sg.gate.as_mut()) {
            // contribution = σ(x·gᵀ)·ys: d logit = σ'(logit)·⟨dy, ys⟩.
            let dl = ops::activation_backward(gl, &ops::row_dot(dy_moe, ys)?, Activation::Sigmoid)?;
            let dlx = ops::cast(&dl, x.dtype())?.reshape(&[x.dim(0), 1])?;
            ops::matmul_into(gg, &dlx, x, acc, 1.0)?;
            add(&mut dx, ops::matmul(&dlx, gw, Matmul::default())?)?;
        }
    }
    // Routed experts.
    let d = &saved.dispatch;
    let (dy_perm, dweights) = dispatch::combine_backward(dy_moe, &saved.y_perm, d, &saved.weights)?;
    let (dx_perm, eg) = experts::backward(
        cfg,
        &w.w1,
        &w.w2,
        w.b1.is_some(),
        x,
        &d.tok,
        &saved.experts,
        &d.offsets,
        &dy_perm,
        &mut grads.w1,
        &mut grads.w2,
        experts_fresh,
        expert_sumsq,
    )?;
    if let (Some(g), Some(b)) = (grads.b1.as_mut(), eg.b1.as_ref()) {
        ops::add_assign(g, b)?;
    }
    if let (Some(g), Some(b)) = (grads.b2.as_mut(), eg.b2.as_ref()) {
        ops::add_assign(g, b)?;
    }
    add(&mut dx, dispatch::combine(&dx_perm, &d.pos, None)?)?;
    // Router: logits = rx·routerᵀ.
    let scaled = MoeConfig {
        aux_loss_coeff: cfg.aux_loss_coeff * loss_scale,
        z_loss_coeff: cfg.z_loss_coeff * loss_scale,
        ..cfg.clone()
    };
    let dlogits = router::route_backward(
        &scaled,
        &saved.logits,
        &saved.routing,
        &saved.weights,
        &dweights,
        &d.pos,
    )?;
    let dl = ops::cast(&dlogits, x.dtype())?;
    let rx = saved.router_in.as_ref().unwrap_or(x);
    ops::matmul_into(&mut grads.router, &dl, rx, acc, 1.0)?;
    let mut dx = dx.expect("the routed experts' contribution");
    match &saved.jitter {
        Some(m) => {
            let drx = ops::matmul(&dl, &w.router, Matmul::default())?;
            ops::add_assign(&mut dx, &ops::mul(&drx, m)?)?;
        }
        // The router GEMM accumulates into dx (beta = 1).
        None => ops::matmul_into(&mut dx, &dl, &w.router, Matmul::default(), 1.0)?,
    }
    Ok(dx)
}
