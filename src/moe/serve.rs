//! The MoE layer when serving (prefill and decode): no statistics, nothing saved, and for steps
//! of a few rows on a GPU the fused decode kernels. Which kernels a block runs is decided once
//! per step shape (`MoeServePlan::new`, held by the model's decode and prefill plans) and run by
//! `moe_serve` / `moe_serve_block` as decided, without fall-backs. x [T, d] → y [T, d]; the CPU
//! twins are the ops' CPU branches; training is `train.rs`.

use super::config::{ExpertKind, MoeConfig, RouterKind};
use super::dispatch;
use super::experts;
use super::router;
use super::train::{check_input, router_logits};
use super::weights::MoeWeights;
use crate::runtime::ops::{self, SoftmaxTopK};
use crate::runtime::{Device, Error, KernelSettings, Result, Tensor};

/// Where a served block's MoE input stands when the MoE starts (what its kernels may fold in).
#[derive(Clone, Copy)]
pub enum ServeInput<'a> {
    /// Rows already normed (prefill; decode without folded norms).
    Normed,
    /// A residual add + RMSNorm still to do (decode): x + a, normed by the block's ffn norm.
    AddNorm,
    /// The attention context before its o projection `wo`, then the add + RMSNorm by `norm`
    /// (decode).
    OProj { wo: &'a Tensor, norm: &'a Tensor },
}

/// The kernels one served MoE block runs for a step shape, most fused first.
pub enum MoeServePlan {
    /// The o projection and the router — folded through the RMSNorm and o projection (`fold`,
    /// from `ops::router_fold`) — in one launch (`ops::o_router_topk`), then the experts slot by
    /// slot with the add + RMSNorm and combine weights in their first kernel
    /// (`ops::moe_serve_swiglu_norm`). Needs `ServeInput::OProj`.
    OProjRouterSlots { rule: SoftmaxTopK, fold: Tensor },
    /// Add + RMSNorm, router GEMV and top-k in one launch (`ops::add_rmsnorm_router_topk`), then
    /// `ops::moe_serve_swiglu`. Needs `ServeInput::AddNorm`.
    AddNormRouterSlots(SoftmaxTopK),
    /// Router GEMV and top-k in one launch (`ops::router_topk`), then `ops::moe_serve_swiglu`.
    RouterSlots(SoftmaxTopK),
    /// Router GEMM, route kernel (its dropless combine weights), then `ops::moe_serve_swiglu`.
    RouteSlots,
    /// Router GEMM, route, dispatch, grouped GEMMs, combine.
    RouteGrouped,
}

impl MoeServePlan {
    /// The plan for steps of `rows` rows in the weights' dtype and device: the most fused kernels
    /// that `input` and the settings allow and that apply to the shapes. GPU conditions: slot-wise
    /// experts for SwiGLU experts without biases, 16-byte rows and 2·k·rows <= E (each slot reads
    /// its expert's weights itself, where the grouped kernels read each active expert once); the
    /// one-launch routers for a softmax router without selection bias over those slots, 1..=8
    /// rows of a 16-bit type, d % 8 == 0, E <= 256; the o-projection fold also needs no shared or
    /// residual part (a bias, a sigmoid score or another branch does not commute with the norm's
    /// positive factor) and C % 8 == 0.
    pub fn new(
        cfg: &MoeConfig,
        w: &MoeWeights,
        rows: usize,
        input: ServeInput<'_>,
        s: &KernelSettings,
    ) -> Result<MoeServePlan> {
        let (dt, dev) = (w.router.dtype(), w.router.device());
        let (d, e, k) = (cfg.d_model, cfg.n_experts, cfg.top_k);
        let vec = 16 / dt.size_in_bytes();
        let slots = s.serve_slots
            && dev.is_cuda()
            && cfg.expert == ExpertKind::SwiGlu
            && w.b1.is_none()
            && w.b2.is_none()
            && 2 * k * rows <= e
            && d % vec == 0
            && w.w2.dim(2) % vec == 0;
        let rule = match cfg.router {
            RouterKind::Softmax { renormalize }
                if slots && w.router_bias.is_none() && s.fused_router =>
            {
                let r = router::weight_rule(cfg);
                Some(SoftmaxTopK {
                    k,
                    normalize: renormalize,
                    add: r.add,
                    clamp_min: r.clamp_min,
                    scale: r.scale,
                })
            }
            _ => None,
        };
        let one_launch = (1..=SoftmaxTopK::MAX_ROWS).contains(&rows)
            && dt.size_in_bytes() == 2
            && d % 8 == 0
            && e <= SoftmaxTopK::MAX_EXPERTS;
        let foldable = s.router_fold && w.shared.is_none() && w.residual.is_none();
        let plan = match (rule, input) {
            (Some(rule), ServeInput::OProj { wo, norm })
                if one_launch && foldable && wo.dim(1) % 8 == 0 =>
            {
                MoeServePlan::OProjRouterSlots {
                    fold: ops::router_fold(&w.router, norm, wo)?,
                    rule,
                }
            }
            (Some(rule), ServeInput::AddNorm | ServeInput::OProj { .. }) if one_launch => {
                MoeServePlan::AddNormRouterSlots(rule)
            }
            (Some(rule), _) if one_launch => MoeServePlan::RouterSlots(rule),
            _ if slots && cfg.capacity(rows).is_none() => MoeServePlan::RouteSlots,
            _ => MoeServePlan::RouteGrouped,
        };
        if let (Some(_), Device::Cuda(o)) = (plan.rule(), dev) {
            // The one-launch routers' arrival counters, allocated now: not inside a graph capture.
            if crate::runtime::cuda::device(o)?
                .arrival_counters()?
                .is_none()
            {
                return Err(Error::Invalid(
                    "a served MoE plan is built outside a CUDA graph capture".into(),
                ));
            }
        }
        Ok(plan)
    }

    fn rule(&self) -> Option<&SoftmaxTopK> {
        match self {
            MoeServePlan::OProjRouterSlots { rule, .. }
            | MoeServePlan::AddNormRouterSlots(rule)
            | MoeServePlan::RouterSlots(rule) => Some(rule),
            MoeServePlan::RouteSlots | MoeServePlan::RouteGrouped => None,
        }
    }

    /// Whether the block's attention hands over its context before the o projection.
    pub fn takes_context(&self) -> bool {
        matches!(self, MoeServePlan::OProjRouterSlots { .. })
    }

    /// Whether the block's input add + RMSNorm is done by the MoE's first kernel.
    pub fn takes_addnorm(&self) -> bool {
        matches!(
            self,
            MoeServePlan::OProjRouterSlots { .. } | MoeServePlan::AddNormRouterSlots(_)
        )
    }

    /// (router, experts) in words, for the plan's table.
    pub fn labels(&self) -> (&'static str, &'static str) {
        match self {
            MoeServePlan::OProjRouterSlots { .. } => ("o-proj+folded router+top-k", "slots+norm"),
            MoeServePlan::AddNormRouterSlots(_) => ("add+norm+router+top-k", "slots"),
            MoeServePlan::RouterSlots(_) => ("router+top-k", "slots"),
            MoeServePlan::RouteSlots => ("router GEMM, route", "slots"),
            MoeServePlan::RouteGrouped => ("router GEMM, route", "dispatch, grouped GEMM"),
        }
    }
}

fn declined(op: &str) -> Error {
    Error::Invalid(format!(
        "moe serve: the plan chose {op} but it does not apply to these rows (plan and op disagree)"
    ))
}

/// y [T, d] for normed rows x [T, d] by `plan` (one that takes no pending add + RMSNorm).
pub fn moe_serve(
    cfg: &MoeConfig,
    w: &MoeWeights,
    plan: &MoeServePlan,
    x: &Tensor,
) -> Result<Tensor> {
    check_input(cfg, x, "moe")?;
    let y = match plan {
        MoeServePlan::RouterSlots(rule) => {
            let (_, ids, wts) =
                ops::router_topk(x, &w.router, rule)?.ok_or_else(|| declined("router_topk"))?;
            ops::moe_serve_swiglu(x, &w.w1, &w.w2, &ids, &wts)?
        }
        MoeServePlan::RouteSlots | MoeServePlan::RouteGrouped => {
            let logits = router_logits(x, w)?;
            let routing = router::route(cfg, &logits, w.router_bias.as_ref(), None)?;
            match (plan, &routing.weights) {
                (MoeServePlan::RouteSlots, Some(wts)) => {
                    ops::moe_serve_swiglu(x, &w.w1, &w.w2, &routing.ids, wts)?
                }
                (MoeServePlan::RouteSlots, None) => return Err(declined("dropless route weights")),
                _ => {
                    let disp = dispatch::dispatch(cfg, &routing.ids, None)?;
                    let computed = match &routing.weights {
                        Some(_) => None,
                        None => Some(router::combine_weights(cfg, &routing.gates, &disp.pos)?),
                    };
                    let (y_perm, _) = experts::forward(cfg, w, x, &disp.tok, &disp.offsets)?;
                    dispatch::combine(
                        &y_perm,
                        &disp.pos,
                        computed.as_ref().or(routing.weights.as_ref()),
                    )?
                }
            }
        }
        MoeServePlan::OProjRouterSlots { .. } | MoeServePlan::AddNormRouterSlots(_) => {
            return Err(Error::Invalid(
                "moe serve: this plan folds the block's add + RMSNorm (moe_serve_block)".into(),
            ))
        }
    };
    shared_and_residual(cfg, w, x, y)
}

/// A served block's MoE from its residual x [T, d] and attention output a — with
/// `OProjRouterSlots` the context [T, C] before the o projection `wo` — by `plan`: x becomes the
/// new residual (x + a, or x + a·woᵀ) and the MoE output of RMSNorm(x)·`norm` is returned.
#[allow(clippy::too_many_arguments)]
pub fn moe_serve_block(
    cfg: &MoeConfig,
    w: &MoeWeights,
    plan: &MoeServePlan,
    x: &mut Tensor,
    a: &Tensor,
    wo: &Tensor,
    norm: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    match plan {
        MoeServePlan::OProjRouterSlots { rule, fold } => {
            let (s, z, ids) = ops::o_router_topk(a, wo, x, fold, rule.k)?
                .ok_or_else(|| declined("o_router_topk"))?;
            let y = ops::moe_serve_swiglu_norm(&s, norm, eps, &z, &ids, rule, &w.w1, &w.w2)?;
            *x = s;
            Ok(y)
        }
        MoeServePlan::AddNormRouterSlots(rule) => {
            let (xn, h, _, ids, wts) =
                ops::add_rmsnorm_router_topk(x, a, norm, eps, &w.router, rule)?
                    .ok_or_else(|| declined("add_rmsnorm_router_topk"))?;
            check_input(cfg, &h, "moe")?;
            let y = ops::moe_serve_swiglu(&h, &w.w1, &w.w2, &ids, &wts)?;
            *x = xn;
            shared_and_residual(cfg, w, &h, y)
        }
        _ => {
            let h = ops::add_rmsnorm(x, a, norm, eps)?;
            moe_serve(cfg, w, plan, &h)
        }
    }
}

/// y plus the shared experts, mixed with the residual MLP.
fn shared_and_residual(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    mut y: Tensor,
) -> Result<Tensor> {
    if let (Some(sw), Some(_)) = (&w.shared, &cfg.shared) {
        sw.add_into(x, &mut y, false)?;
    }
    if let (Some(rw), Some(_)) = (&w.residual, &cfg.residual) {
        rw.mix_into(cfg.expert, x, &mut y, false)?;
    }
    Ok(y)
}
