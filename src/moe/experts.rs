//! The routed experts over expert-contiguous rows: grouped GEMMs (runtime::ops::grouped_*) with
//! the activation between them. x [T, d] read through the dispatch permutation `rows` [N]
//! (x_perm = x[rows]: not materialised by the forward on Hopper; the backward gathers it for the
//! weight gradient), offsets [E+1] -> y_perm [N, d].
//!   SwiGLU: h = x·W1[e]ᵀ (+b1) [N, 2F]; a = silu(h_gate) ⊙ h_up [N, F]; y = a·W2[e]ᵀ (+b2)
//!   MLP:    h = x·W1[e]ᵀ (+b1) [N, F];  a = act(h);                      y = a·W2[e]ᵀ (+b2)
//! FLOPs: 2·N·d·(H1 + F) forward (H1 = 2F or F); twice that backward.

use super::config::{ExpertKind, MoeConfig};
use super::dispatch::{add_group_bias, group_bias_grad};
use super::weights::MoeWeights;
use crate::runtime::ops;
use crate::runtime::{Result, Tensor};

pub(crate) struct ExpertSaved {
    pub h: Tensor,
    pub a: Tensor,
}

/// Bias gradients of the experts (the weight gradients go straight into the caller's accumulators).
pub(crate) struct ExpertBiasGrads {
    pub b1: Option<Tensor>,
    pub b2: Option<Tensor>,
}

#[allow(clippy::too_many_arguments)]
/// The experts of `w` (w1, b1, w2, b2; the router and shared parts are not read).
pub(crate) fn forward(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    rows: &Tensor,
    offsets: &Tensor,
) -> Result<(Tensor, ExpertSaved)> {
    let mut h = ops::grouped_matmul_gather(x, rows, &w.w1, offsets)?;
    if let Some(b) = &w.b1 {
        h = add_group_bias(&h, b, offsets)?;
    }
    let a = match cfg.expert {
        ExpertKind::SwiGlu => ops::swiglu(&h)?,
        ExpertKind::Mlp(act) => ops::activation(&h, act)?,
    };
    let mut y = ops::grouped_matmul(&a, &w.w2, offsets, true)?;
    if let Some(b) = &w.b2 {
        y = add_group_bias(&y, b, offsets)?;
    }
    Ok((y, ExpertSaved { h, a }))
}

/// dx_perm and the bias gradients; dW1 and dW2 are added into `gw1`, `gw2` (the layer's
/// gradient accumulators) by the grouped GEMM itself, or written over them when `fresh` (their
/// contents are then never read: they may be uninitialised). With `sumsq`, the squares of both
/// gradients' new values are added into it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    rows: &Tensor,
    saved: &ExpertSaved,
    offsets: &Tensor,
    dy_perm: &Tensor,
    gw1: &mut Tensor,
    gw2: &mut Tensor,
    fresh: bool,
    mut sumsq: Option<&mut Tensor>,
) -> Result<(Tensor, ExpertBiasGrads)> {
    let mut wgrad = |g: &mut Tensor, a: &Tensor, b: &Tensor| {
        ops::grouped_matmul_tn_into(g, a, b, offsets, !fresh, sumsq.as_deref_mut())
    };
    wgrad(gw2, dy_perm, &saved.a)?; // [E, d, F]
    let has_bias = w.b1.is_some();
    let db2 = if has_bias {
        Some(group_bias_grad(dy_perm, offsets)?)
    } else {
        None
    };
    let da = ops::grouped_matmul(dy_perm, &w.w2, offsets, false)?; // dy · W2[e]: [N, F]
    let dh = match cfg.expert {
        ExpertKind::SwiGlu => ops::swiglu_backward(&saved.h, &da)?,
        ExpertKind::Mlp(act) => ops::activation_backward(&saved.h, &da, act)?,
    };
    // [E, H1, d] from x's rows in dispatch order
    ops::grouped_matmul_tn_gather_into(gw1, &dh, x, rows, offsets, !fresh, sumsq)?;
    let db1 = if has_bias {
        Some(group_bias_grad(&dh, offsets)?)
    } else {
        None
    };
    let dx = ops::grouped_matmul(&dh, &w.w1, offsets, false)?; // dh · W1[e]: [N, d]
    Ok((dx, ExpertBiasGrads { b1: db1, b2: db2 }))
}
