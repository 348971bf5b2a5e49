//! The MoE layer with expert parallelism: world = DP × EP, EP rank r holds global experts
//! [r·E/ep, (r+1)·E/ep) (w1 [E/ep, H1, d], w2 [E/ep, d, F]), the router and everything else
//! replicated. Forward on this rank's tokens x [T, d]: route and dispatch as the single-process
//! layer (`train.rs`, all E experts) → the kept rows [n, d] in dispatch order, which is sorted by
//! destination rank then local expert → `dist::exchange` within the EP group → this rank's experts
//! (the same grouped GEMMs, `experts.rs`, reading the received rows in expert-major order) → rows
//! travel back → the single-process combine. The backward sends dy rows the same way and dx rows
//! back; expert weight gradients stay local.
//!
//! Capacity (switch routers with `drop_tokens`) is DeepSpeed's: per expert, from the local batch,
//! so each rank keeps at most `capacity(T)` slots per expert and an expert computes at most
//! ep · capacity(T) rows. The aux and z losses are those of the local batch, as in DeepSpeed.
//! Gradients: `reduce_gradients` sums non-expert gradients over the world and expert gradients
//! over the data-parallel group of their EP rank.

use std::ops::Range;

use super::dispatch::Dispatch;
use super::experts::{self, ExpertBiasGrads, ExpertSaved};
use super::train::{self, Mode, MoeSaved, MoeStats};
use super::{MoeConfig, MoeGrads, MoeWeights};
use crate::dist::exchange::{exchange, ExchangePlan};
use crate::dist::{self, Group, ReduceOp};
use crate::runtime::ops;
use crate::runtime::{Error, ParamSet, Result, Tensor};

/// The process groups of a DP × EP world: EP groups are runs of `ep_size` consecutive world ranks
/// (`[0, 1], [2, 3]` for 2 × 2), DP groups the ranks with the same EP rank (`[0, 2], [1, 3]`).
pub struct ParallelGroups {
    pub world: Group,
    /// The ranks that share out one copy of the experts; the token exchange runs here.
    pub ep: Group,
    /// The ranks holding the same experts; expert gradients are reduced here.
    pub dp: Group,
}

impl ParallelGroups {
    /// Splits `world` (every rank calls this with the same `ep_size`); `ep_size` must divide the
    /// world size.
    pub fn new(world: Group, ep_size: usize) -> Result<ParallelGroups> {
        let n = world.size();
        if ep_size == 0 || n % ep_size != 0 {
            return Err(Error::Invalid(format!(
                "parallel.ep_size = {ep_size} does not divide the world size {n}"
            )));
        }
        let dp_size = n / ep_size;
        let ep_layout: Vec<Vec<usize>> = (0..dp_size)
            .map(|g| (g * ep_size..(g + 1) * ep_size).collect())
            .collect();
        let dp_layout: Vec<Vec<usize>> = (0..ep_size)
            .map(|r| (0..dp_size).map(|g| g * ep_size + r).collect())
            .collect();
        let ep = world.split(&ep_layout).map_err(comm)?;
        let dp = world.split(&dp_layout).map_err(comm)?;
        Ok(ParallelGroups { world, ep, dp })
    }
}

/// The global experts EP rank `rank` of `size` holds; `size` must divide `n_experts`.
pub fn local_experts(n_experts: usize, rank: usize, size: usize) -> Result<Range<usize>> {
    if size == 0 || n_experts % size != 0 || rank >= size {
        return Err(Error::Invalid(format!(
            "expert parallelism: {n_experts} experts cannot be split over ep_size = {size} \
             (rank {rank}); ep_size must divide the expert count"
        )));
    }
    let k = n_experts / size;
    Ok(rank * k..(rank + 1) * k)
}

/// Keeps only the routed experts (w1, b1, w2, b2) that EP rank `rank` of `size` holds, in place:
/// a full layer's weights (or gradients) become this rank's.
pub fn keep_local_experts(w: &mut MoeWeights, rank: usize, size: usize) -> Result<()> {
    let n = w.w1.dim(0);
    let r = local_experts(n, rank, size)?;
    for t in [
        Some(&mut w.w1),
        w.b1.as_mut(),
        Some(&mut w.w2),
        w.b2.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        *t = ops::slice_rows(t, r.start, r.len())?;
    }
    Ok(())
}

/// The training (or evaluation) forward of one MoE layer with its experts spread over `ep`:
/// x [T, d] is this rank's tokens, `w` holds this rank's experts (`keep_local_experts`); y [T, d]
/// equals the single-process layer's on these tokens. Every member of `ep` calls it together.
pub fn ep_forward(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    mode: Mode,
    layer: &str,
    ep: &Group,
) -> Result<(Tensor, Option<MoeSaved>, MoeStats)> {
    train::moe_forward_placed(cfg, w, x, mode, layer, false, Some(ep))
}

/// The backward of `ep_forward` (same group): dx [T, d]; gradients accumulate into `grads`
/// (this rank's experts; router and shared parts for this rank's tokens only, see
/// `reduce_gradients`).
#[allow(clippy::too_many_arguments)]
pub fn ep_backward(
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    saved: &MoeSaved,
    dy: &Tensor,
    loss_scale: f32,
    grads: &mut MoeGrads,
    ep: &Group,
) -> Result<Tensor> {
    train::moe_backward_placed(
        cfg,
        w,
        x,
        saved,
        dy,
        loss_scale,
        grads,
        false,
        None,
        Some(ep),
    )
}

/// Sums (or averages, `op`) one layer's gradients across the ranks that computed them: the
/// replicated parameters (router, shared experts, residual MLP) over the world, the routed
/// experts (w1, b1, w2, b2) over `groups.dp`.
pub fn reduce_gradients(grads: &mut MoeGrads, groups: &ParallelGroups, op: ReduceOp) -> Result<()> {
    let mut failed = None;
    grads.visit_mut("", &mut |name, t| {
        if failed.is_some() {
            return;
        }
        let group = match name {
            "w1" | "b1" | "w2" | "b2" => &groups.dp,
            _ => &groups.world,
        };
        match group.all_reduce(t, op) {
            Ok(r) => *t = r,
            Err(e) => failed = Some(format!("gradient {name}: {e}")),
        }
    });
    match failed {
        Some(msg) => Err(Error::Invalid(msg)),
        None => Ok(()),
    }
}

/// What the expert-parallel exchange keeps for the backward (beside the experts' activations).
pub(crate) struct EpSaved {
    plan: ExchangePlan,
    /// [M, d] rows received, in source order.
    received: Tensor,
    /// [M] i32: received row at each expert-major position; and its inverse.
    order: Tensor,
    inverse: Tensor,
    /// [E/ep + 1] first expert-major row of each local expert.
    offsets: Tensor,
    /// [k·T] i32 0, 1, ..: pads the n returned rows to the dispatch's k·T (zero rows past n).
    pad: Tensor,
    /// Rows this rank sent (kept slots).
    sent: usize,
}

/// The routed experts' part of the forward: y_perm [k·T, d] in dispatch order (zero rows past the
/// kept ones) and the experts' activations, as `experts::forward` gives without expert
/// parallelism, and the exchange for the backward.
pub(crate) fn experts_forward(
    ep: &Group,
    cfg: &MoeConfig,
    w: &MoeWeights,
    x: &Tensor,
    disp: &Dispatch,
) -> Result<(Tensor, ExpertSaved, EpSaved)> {
    let local = local_experts(cfg.n_experts, ep.rank(), ep.size())?;
    if w.w1.dim(0) != local.len() || w.w2.dim(0) != local.len() {
        return Err(Error::shape(
            "expert_parallel",
            format!(
                "w1 {:?} / w2 {:?}: EP rank {} of {} holds experts {local:?}, expected {} experts \
                 (keep_local_experts)",
                w.w1.shape(),
                w.w2.shape(),
                ep.rank(),
                ep.size(),
                local.len()
            ),
        ));
    }
    let dev = x.device();
    // Kept rows per global expert = rows per (destination rank, local expert): experts are
    // numbered rank-major, so the dispatch order is already the send order.
    let kept: Vec<usize> = disp
        .kept
        .to_vec::<i32>()?
        .into_iter()
        .map(|c| c as usize)
        .collect();
    let sent: usize = kept.iter().sum();
    let slots = disp.tok.numel();
    let mut tok = disp.tok.to_vec::<i32>()?;
    tok.truncate(sent);
    let rows = ops::gather_rows(x, &Tensor::from_slice(&tok, &[sent], dev)?)?;
    let (received, plan) = exchange(ep, &rows, &kept).map_err(comm)?;
    let (order, per_expert) = plan.expert_major_order();
    let mut inverse = vec![0i32; order.len()];
    for (p, &r) in order.iter().enumerate() {
        inverse[r] = p as i32;
    }
    let order: Vec<i32> = order.into_iter().map(|r| r as i32).collect();
    let mut offsets = vec![0i32; per_expert.len() + 1];
    for (e, &c) in per_expert.iter().enumerate() {
        offsets[e + 1] = offsets[e] + c as i32;
    }
    let m = order.len();
    let order = Tensor::from_slice(&order, &[m], dev)?;
    let inverse = Tensor::from_slice(&inverse, &[m], dev)?;
    let offsets = Tensor::from_slice(&offsets, &[per_expert.len() + 1], dev)?;
    let pad: Vec<i32> = (0..slots as i32).collect();
    let pad = Tensor::from_slice(&pad, &[slots], dev)?;
    let (y_local, ex) = experts::forward(cfg, w, &received, &order, &offsets)?;
    let y_sent = plan
        .reverse(ep, &ops::gather_rows(&y_local, &inverse)?)
        .map_err(comm)?;
    let y_perm = ops::gather_rows(&y_sent, &pad)?;
    Ok((
        y_perm,
        ex,
        EpSaved {
            plan,
            received,
            order,
            inverse,
            offsets,
            pad,
            sent,
        },
    ))
}

/// The routed experts' part of the backward: dy_perm [k·T, d] (dispatch order) → dx_perm
/// [k·T, d]; this rank's expert weight gradients go into `grads` (see `experts::backward`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn experts_backward(
    ep: &Group,
    cfg: &MoeConfig,
    w: &MoeWeights,
    saved: &EpSaved,
    ex: &ExpertSaved,
    dy_perm: &Tensor,
    grads: &mut MoeGrads,
    fresh: bool,
    sumsq: Option<&mut Tensor>,
) -> Result<(Tensor, ExpertBiasGrads)> {
    let dy_sent = ops::slice_rows(dy_perm, 0, saved.sent)?;
    let dy_received = saved.plan.forward(ep, &dy_sent).map_err(comm)?;
    let dy_local = ops::gather_rows(&dy_received, &saved.order)?;
    let (dx_local, eg) = experts::backward(
        cfg,
        w,
        &saved.received,
        &saved.order,
        ex,
        &saved.offsets,
        &dy_local,
        &mut grads.w1,
        &mut grads.w2,
        fresh,
        sumsq,
    )?;
    let dx_sent = saved
        .plan
        .reverse(ep, &ops::gather_rows(&dx_local, &saved.inverse)?)
        .map_err(comm)?;
    Ok((ops::gather_rows(&dx_sent, &saved.pad)?, eg))
}

fn comm(e: dist::Error) -> Error {
    Error::Invalid(format!("expert-parallel exchange: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{DType, Device};

    #[test]
    fn local_expert_ranges_and_bad_sizes() {
        assert_eq!(local_experts(8, 1, 4).unwrap(), 2..4);
        assert_eq!(local_experts(8, 0, 1).unwrap(), 0..8);
        let err = local_experts(8, 0, 3).unwrap_err().to_string();
        assert!(
            err.contains("8 experts cannot be split over ep_size = 3"),
            "{err}"
        );
        assert!(local_experts(8, 4, 4).is_err());
        assert!(ParallelGroups::new(Group::single(), 2)
            .err()
            .unwrap()
            .to_string()
            .contains("ep_size = 2 does not divide the world size 1"));
    }

    /// EP size 1 (world size 1): the exchange is a copy, each expert sees its rows in the
    /// single-process order, so y, dx and every gradient are bit-identical to `moe_forward`.
    #[test]
    fn ep_size_one_is_the_single_process_layer() {
        let cfg = MoeConfig {
            d_model: 8,
            n_experts: 4,
            top_k: 2,
            ffn_dim: 6,
            expert: Default::default(),
            expert_bias: false,
            router: Default::default(),
            shared: None,
            residual: None,
            aux_loss_coeff: 0.01,
            z_loss_coeff: 0.001,
        };
        let w = MoeWeights::init(&cfg, 0.3, 0.2, 3, DType::F32, Device::Cpu).unwrap();
        let x = Tensor::randn(&[6, 8], 1.0, 4, DType::F32, Device::Cpu).unwrap();
        let dy = Tensor::randn(&[6, 8], 1.0, 5, DType::F32, Device::Cpu).unwrap();
        let mode = Mode::Train { seed: 1 };
        let groups = ParallelGroups::new(Group::single(), 1).unwrap();
        let (y, s, _) = ep_forward(&cfg, &w, &x, mode, "ep", &groups.ep).unwrap();
        let mut g = w.zeros_like().unwrap();
        let dx = ep_backward(&cfg, &w, &x, &s.unwrap(), &dy, 1.0, &mut g, &groups.ep).unwrap();
        reduce_gradients(&mut g, &groups, ReduceOp::Sum).unwrap();
        let (ry, rs, _) = train::moe_forward(&cfg, &w, &x, mode).unwrap();
        let mut rg = w.zeros_like().unwrap();
        let rdx = train::moe_backward(&cfg, &w, &x, &rs.unwrap(), &dy, 1.0, &mut rg).unwrap();
        assert_eq!(y.to_f32_vec().unwrap(), ry.to_f32_vec().unwrap());
        assert_eq!(dx.to_f32_vec().unwrap(), rdx.to_f32_vec().unwrap());
        let mut want = Vec::new();
        rg.visit("", &mut |n, t| {
            want.push((n.to_string(), t.to_f32_vec().unwrap()))
        });
        let mut got = Vec::new();
        g.visit("", &mut |n, t| {
            got.push((n.to_string(), t.to_f32_vec().unwrap()))
        });
        assert_eq!(got, want);
        // A backward without the group for an EP forward is refused.
        let (_, s, _) = ep_forward(&cfg, &w, &x, mode, "ep", &groups.ep).unwrap();
        let err = train::moe_backward(&cfg, &w, &x, &s.unwrap(), &dy, 1.0, &mut g).unwrap_err();
        assert!(err.to_string().contains("pass the same group"), "{err}");
    }
}
