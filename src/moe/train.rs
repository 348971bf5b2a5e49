//! The MoE layer's training forward and backward (and the evaluation forward: the same path with
//! the statistics, nothing saved). x [T, d] → router logits [T, E] (jittered input for
//! DeepSpeed's switch router) → route (noisy gates by the step's seed) → dispatch → grouped
//! experts → combine (+ shared experts, + residual MLP) → y [T, d]. The backward reuses the saved
//! routing, permutation and expert activations (`MoeSaved`). Serving is `serve.rs`.

use super::config::{MoeConfig, NoisyGate, RouterKind};
use super::dispatch::{self, Dispatch};
use super::expert_parallel::{self, EpSaved};
use super::experts::{self, ExpertSaved};
use super::router::{self, Routing};
use super::weights::{MoeGrads, MoeWeights, ResidualSaved, SharedSaved};
use super::ExpertKind;
use crate::dist::Group;
use crate::runtime::ops::{self, Activation, Matmul};
use crate::runtime::{DType, Error, Result, Tensor};

/// Training (with a seed for the noisy gates / random token selection) or evaluation.
#[derive(Copy, Clone, Debug)]
pub enum Mode {
    Train {
        seed: u64,
    },
    /// Inference with the statistics (tokens per expert, drops) computed; nothing saved.
    Infer,
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

/// What `moe_backward` reuses from the training forward.
pub struct MoeSaved {
    router_in: Option<Tensor>,
    jitter: Option<Tensor>,
    logits: Tensor,
    routing: Routing,
    dispatch: Dispatch,
    weights: Tensor,
    experts: ExpertSaved,
    /// The expert-parallel exchange (None: all experts on this process).
    exchange: Option<EpSaved>,
    y_perm: Tensor,
    shared: Option<SharedSaved>,
    residual: Option<ResidualSaved>,
}

/// y [T, d] for x [T, d], the statistics, and in training what the backward needs.
pub fn moe_forward(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    mode: Mode,
) -> Result<(Tensor, Option<MoeSaved>, MoeStats)> {
    moe_forward_named(cfg, w, x, mode, "moe", false)
}

/// `moe_forward` with a layer name for errors; `check_finite` reads the router logits back to
/// report NaN/Inf by layer (a device sync: off on the hot path, on in debugging and tests).
pub fn moe_forward_named(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    mode: Mode,
    layer: &str,
    check_finite: bool,
) -> Result<(Tensor, Option<MoeSaved>, MoeStats)> {
    moe_forward_placed(cfg, w, x, mode, layer, check_finite, None)
}

/// The training forward with the routed experts on this process (`ep` None) or spread over the
/// expert-parallel group `ep` (w holds this rank's experts; `expert_parallel::ep_forward`).
pub(crate) fn moe_forward_placed(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    mode: Mode,
    layer: &str,
    check_finite: bool,
    ep: Option<&Group>,
) -> Result<(Tensor, Option<MoeSaved>, MoeStats)> {
    check_input(cfg, x, layer)?;
    let dev = x.device();
    let train_seed = match mode {
        Mode::Train { seed } => Some(seed),
        Mode::Infer => None,
    };
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
    let logits = router_logits(router_in.as_ref().unwrap_or(x), w)?;
    if check_finite {
        router::check_finite(layer, &logits)?;
    }
    let routing = router::route(cfg, &logits, w.router_bias.as_ref(), train_seed)?;
    let disp = dispatch::dispatch(cfg, &routing.ids, train_seed.map(|s| s ^ 0x7275_7473))?;
    // The route kernel's dropless weights (inference) are used in place; others computed here.
    let computed = match &routing.weights {
        Some(_) => None,
        None => Some(router::combine_weights(cfg, &routing.gates, &disp.pos)?),
    };
    let (y_perm, ex, exchange) = match ep {
        None => {
            let (y_perm, ex) = experts::forward(cfg, w, x, &disp.tok, &disp.offsets)?;
            (y_perm, ex, None)
        }
        Some(g) => {
            let (y_perm, ex, exchange) = expert_parallel::experts_forward(g, cfg, w, x, &disp)?;
            (y_perm, ex, Some(exchange))
        }
    };
    let mut y = dispatch::combine(
        &y_perm,
        &disp.pos,
        computed.as_ref().or(routing.weights.as_ref()),
    )?;
    let save = train_seed.is_some();
    let shared = match (&w.shared, &cfg.shared) {
        (Some(sw), Some(_)) => sw.add_into(x, &mut y, save)?,
        _ => None,
    };
    let residual = match (&w.residual, &cfg.residual) {
        (Some(rw), Some(_)) => rw.mix_into(cfg.expert, x, &mut y, save)?,
        _ => None,
    };
    // Inference skips what only training reads: the losses (zero) and, for dropless routers,
    // the drop counts (zero).
    let (aux_loss, z_loss) = if save {
        router::losses(cfg, &routing)?
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
    let stats = MoeStats {
        aux_loss,
        z_loss,
        tokens_per_expert: disp.counts.try_clone()?,
        dropped,
    };
    let saved = if save {
        // Training routes never carry the route kernel's weights; copy them if one did.
        let weights = match computed {
            Some(t) => t,
            None => routing
                .weights
                .as_ref()
                .expect("combine weights: computed or from the route")
                .try_clone()?,
        };
        Some(MoeSaved {
            router_in,
            jitter,
            logits,
            routing,
            dispatch: disp,
            weights,
            experts: ex,
            exchange,
            y_perm,
            shared,
            residual,
        })
    } else {
        None
    };
    Ok((y, saved, stats))
}

/// x must be [tokens, d_model]; the error names the layer.
pub(crate) fn check_input(cfg: &MoeConfig, x: &Tensor, layer: &str) -> Result<()> {
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
    Ok(())
}

/// Router logits [T, E] f32 = x·routerᵀ.
pub(crate) fn router_logits(x: &Tensor, w: &MoeWeights) -> Result<Tensor> {
    ops::matmul(
        x,
        &w.router,
        Matmul {
            trans_b: true,
            out_dtype: Some(DType::F32),
            ..Default::default()
        },
    )
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
    moe_backward_placed(
        cfg,
        w,
        x,
        saved,
        dy,
        loss_scale,
        grads,
        experts_fresh,
        expert_sumsq,
        None,
    )
}

/// `moe_backward_into` for a forward made by `moe_forward_placed` with the same `ep`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_backward_placed(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    saved: &MoeSaved,
    dy: &Tensor,
    loss_scale: f32,
    grads: &mut MoeGrads,
    experts_fresh: bool,
    expert_sumsq: Option<&mut Tensor>,
    ep: Option<&Group>,
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
    let (dx_perm, eg) =
        match (&saved.exchange, ep) {
            (None, None) => experts::backward(
                cfg,
                w,
                x,
                &d.tok,
                &saved.experts,
                &d.offsets,
                &dy_perm,
                &mut grads.w1,
                &mut grads.w2,
                experts_fresh,
                expert_sumsq,
            )?,
            (Some(exchange), Some(g)) => expert_parallel::experts_backward(
                g,
                cfg,
                w,
                exchange,
                &saved.experts,
                &dy_perm,
                grads,
                experts_fresh,
                expert_sumsq,
            )?,
            _ => return Err(Error::Invalid(
                "moe backward: the forward ran with expert parallelism and the backward without \
                 (or the other way round); pass the same group to both"
                    .into(),
            )),
        };
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
