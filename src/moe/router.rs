//! Routers: logits [T,E] (f32) → chosen experts `ids` and their raw gate values `gates`, both
//! slot-major [k,T] (slot j of token t at j·T + t, so first choices queue before second choices
//! for capacity), plus what the losses and the backward need (logsumexp [T], softmax probs
//! [T,E], the aux-loss counts). The final combine weights depend on which slots survived
//! capacity (`combine_weights`). CUDA kernels: runtime/cuda/kernels/moe_router.cu, one block per
//! token; the CPU twins are the functions named `*_cpu` below.

use rayon::prelude::*;

use super::config::{MoeConfig, NoisyGate, RouterKind};
use crate::runtime::cuda::kernels;
use crate::runtime::ops::{self, cuda_dev, dptr};
use crate::runtime::{DType, Device, Error, Result, Tensor};

/// The router's output for one batch of tokens.
pub struct Routing {
    /// [k, T] i32 expert of each slot.
    pub ids: Tensor,
    /// [k, T] f32 raw gate of each slot: softmax prob (softmax, switch) or sigmoid score.
    pub gates: Tensor,
    /// [T] f32 logsumexp of each token's logits (z-loss).
    pub lse: Tensor,
    /// [T, E] f32 softmax probabilities (softmax and switch routers; aux loss).
    pub probs: Option<Tensor>,
    /// [E] i32 the counts the aux loss uses: all slots (softmax, HF convention) or first
    /// choices only (switch, DeepSpeed convention). Training only (None in inference).
    pub aux_counts: Option<Tensor>,
    /// [k, T] f32 combine weights written by the CUDA route kernel in dropless inference (the
    /// same values `combine_weights` gives when every slot is kept); None otherwise.
    pub weights: Option<Tensor>,
}

impl Routing {
    fn aux_counts(&self) -> Result<&Tensor> {
        self.aux_counts.as_ref().ok_or_else(|| {
            Error::Invalid("MoE aux-loss counts are computed by training routes only".into())
        })
    }
}

/// How combine weights come from gates: w_j = scale · g_j · kept_j / D with
/// D = max(Σ_i g_i · kept_i + add, clamp_min) when `normalize`, else D = 1.
#[derive(Copy, Clone, Debug)]
pub(crate) struct WeightRule {
    pub normalize: bool,
    pub add: f32,
    pub clamp_min: f32,
    pub scale: f32,
}

pub(crate) fn weight_rule(cfg: &MoeConfig) -> WeightRule {
    match &cfg.router {
        RouterKind::Softmax { renormalize } => WeightRule {
            normalize: *renormalize,
            add: 0.0,
            clamp_min: 0.0,
            scale: 1.0,
        },
        RouterKind::Sigmoid {
            renormalize,
            routed_scaling_factor,
            ..
        } => WeightRule {
            normalize: *renormalize,
            add: 1e-20,
            clamp_min: 0.0,
            scale: *routed_scaling_factor,
        },
        // DeepSpeed top2gating: denom = (g1 + g2).clamp(min=finfo.eps); top-1 keeps the raw gate.
        RouterKind::Switch { .. } => WeightRule {
            normalize: cfg.top_k == 2,
            add: 0.0,
            clamp_min: f32::EPSILON,
            scale: 1.0,
        },
    }
}

fn kind_code(cfg: &MoeConfig) -> i32 {
    match cfg.router {
        RouterKind::Softmax { .. } => 0,
        RouterKind::Sigmoid { .. } => 1,
        RouterKind::Switch { .. } => 2,
    }
}

/// Uniform (0,1) from a counter (splitmix64), identical on CPU and GPU: the noise of the noisy
/// gates is a pure function of (seed, stream, index).
#[inline]
pub(crate) fn uniform(seed: u64, stream: u64, idx: u64) -> f32 {
    let mut z =
        seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 + 0.5) * (1.0 / (1u64 << 24) as f32)
}

#[inline]
fn gumbel(seed: u64, stream: u64, idx: u64) -> f32 {
    -(-uniform(seed, stream, idx).ln()).ln()
}

/// Route `logits` [T, E] f32. `bias` [E] f32 steers the sigmoid router's selection. `noise_seed`
/// is Some in training: it enables the switch router's noisy gates and the aux-loss counts.
pub fn route(
    cfg: &MoeConfig,
    logits: &Tensor,
    bias: Option<&Tensor>,
    noise_seed: Option<u64>,
) -> Result<Routing> {
    let op = "route";
    logits.expect_dtype(op, DType::F32)?;
    let (t, e) = logits.rows_cols();
    if e != cfg.n_experts || logits.rank() != 2 {
        return Err(Error::shape(
            op,
            format!(
                "logits {:?} do not match {} experts",
                logits.shape(),
                cfg.n_experts
            ),
        ));
    }
    if let Some(b) = bias {
        b.expect_dtype(op, DType::F32)?;
        if b.numel() != e || b.device() != logits.device() {
            return Err(Error::shape(
                op,
                format!(
                    "selection bias {:?} on {} for {e} experts on {}",
                    b.shape(),
                    b.device(),
                    logits.device()
                ),
            ));
        }
    }
    let k = cfg.top_k;
    let (n_group, topk_group) = match cfg.router {
        RouterKind::Sigmoid {
            n_group,
            topk_group,
            ..
        } => (n_group, topk_group),
        _ => (1, 1),
    };
    let (noise1, noise2) = match (&cfg.router, noise_seed) {
        (
            RouterKind::Switch {
                noisy_gate_policy,
                second_expert_noise,
                ..
            },
            Some(_),
        ) => (
            *noisy_gate_policy == NoisyGate::Rsample,
            *second_expert_noise && k == 2,
        ),
        _ => (false, false),
    };
    let seed = noise_seed.unwrap_or(0);
    let softmaxish = !matches!(cfg.router, RouterKind::Sigmoid { .. });
    let dev = logits.device();
    let (ids, gates, lse, probs, weights) = match dev {
        Device::Cpu => {
            let lv = logits.as_slice::<f32>()?;
            let bv = match bias {
                Some(b) => Some(b.as_slice::<f32>()?.to_vec()),
                None => None,
            };
            let rows: Vec<(Vec<i32>, Vec<f32>, f32, Vec<f32>)> = (0..t)
                .into_par_iter()
                .map(|ti| {
                    let row = &lv[ti * e..(ti + 1) * e];
                    route_row_cpu(
                        cfg,
                        row,
                        bv.as_deref(),
                        ti,
                        n_group,
                        topk_group,
                        noise1,
                        noise2,
                        seed,
                    )
                })
                .collect();
            let mut ids = vec![0i32; k * t];
            let mut gates = vec![0f32; k * t];
            let mut lse = vec![0f32; t];
            let mut probs = vec![0f32; if softmaxish { t * e } else { 0 }];
            for (ti, (ri, rg, rl, rp)) in rows.into_iter().enumerate() {
                for j in 0..k {
                    ids[j * t + ti] = ri[j];
                    gates[j * t + ti] = rg[j];
                }
                lse[ti] = rl;
                if softmaxish {
                    probs[ti * e..(ti + 1) * e].copy_from_slice(&rp);
                }
            }
            (
                Tensor::from_vec(ids, &[k, t])?,
                Tensor::from_vec(gates, &[k, t])?,
                Tensor::from_vec(lse, &[t])?,
                // As on CUDA: probabilities only in training (the aux loss reads them).
                if softmaxish && noise_seed.is_some() {
                    Some(Tensor::from_vec(probs, &[t, e])?)
                } else {
                    None
                },
                None,
            )
        }
        Device::Cuda(_) => {
            let ids = Tensor::uninit(&[k, t], DType::I32, dev)?;
            let gates = Tensor::uninit(&[k, t], DType::F32, dev)?;
            let lse = Tensor::uninit(&[t], DType::F32, dev)?;
            // Probabilities only feed the aux loss (training); inference gets the combine
            // weights from the same kernel when no slot can be dropped.
            let probs = if softmaxish && noise_seed.is_some() {
                Some(Tensor::uninit(&[t, e], DType::F32, dev)?)
            } else {
                None
            };
            let fused_weights = noise_seed.is_none() && cfg.capacity(t).is_none();
            let weights = if fused_weights {
                Some(Tensor::uninit(&[k, t], DType::F32, dev)?)
            } else {
                None
            };
            let r = weight_rule(cfg);
            if t > 0 {
                let block = (e.next_power_of_two()).clamp(32, 256) as u32;
                let smem = (e * 4 + e + n_group * 4 + n_group) as u32;
                cuda_dev(logits)?
                    .launch(
                        &kernels::MOE_ROUTER,
                        "route",
                        (t as u32, 1, 1),
                        (block, 1, 1),
                        smem,
                    )?
                    .pdl()
                    .ptr(dptr(&ids))
                    .ptr(dptr(&gates))
                    .ptr(dptr(&lse))
                    .ptr(probs.as_ref().map(dptr).unwrap_or(0))
                    .ptr(dptr(logits))
                    .ptr(bias.map(dptr).unwrap_or(0))
                    .i32(kind_code(cfg))
                    .usize_as_i32(t)?
                    .usize_as_i32(e)?
                    .usize_as_i32(k)?
                    .usize_as_i32(n_group)?
                    .usize_as_i32(topk_group)?
                    .i32(noise1 as i32)
                    .i32(noise2 as i32)
                    .i64(seed as i64)
                    .ptr(weights.as_ref().map(dptr).unwrap_or(0))
                    .i32(r.normalize as i32)
                    .f32(r.add)
                    .f32(r.clamp_min)
                    .f32(r.scale)
                    .run()?;
            }
            (ids, gates, lse, probs, weights)
        }
    };
    let aux_counts = match (&cfg.router, noise_seed) {
        (_, None) => None,
        (RouterKind::Switch { .. }, Some(_)) => {
            Some(ops::histogram(&ops::slice_rows(&ids, 0, 1)?, e)?)
        }
        (_, Some(_)) => Some(ops::histogram(&ids, e)?),
    };
    Ok(Routing {
        ids,
        gates,
        lse,
        probs,
        aux_counts,
        weights,
    })
}

/// One token's routing (the CPU twin of the `route` kernel): (ids, gates, lse, probs).
#[allow(clippy::too_many_arguments)]
fn route_row_cpu(
    cfg: &MoeConfig,
    row: &[f32],
    bias: Option<&[f32]>,
    ti: usize,
    n_group: usize,
    topk_group: usize,
    noise1: bool,
    noise2: bool,
    seed: u64,
) -> (Vec<i32>, Vec<f32>, f32, Vec<f32>) {
    let e = row.len();
    let k = cfg.top_k;
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let s: f32 = row.iter().map(|&x| (x - m).exp()).sum();
    let lse = m + s.ln();
    let probs: Vec<f32> = row.iter().map(|&x| (x - lse).exp()).collect();
    // Largest value wins, ties to the lower index (as the CUDA kernel and torch.topk on
    // distinct values).
    let argmax_of = |n: usize, v: &dyn Fn(usize) -> f32, skip: &[i32]| -> usize {
        let mut best = usize::MAX;
        let mut bv = f32::NEG_INFINITY;
        for i in 0..n {
            if skip.contains(&(i as i32)) {
                continue;
            }
            let x = v(i);
            if best == usize::MAX || x > bv {
                best = i;
                bv = x;
            }
        }
        best
    };
    let argmax = |v: &dyn Fn(usize) -> f32, skip: &[i32]| argmax_of(e, v, skip);
    let mut ids = Vec::with_capacity(k);
    let mut gates = Vec::with_capacity(k);
    match cfg.router {
        RouterKind::Softmax { .. } => {
            // Selecting on logits equals selecting on probabilities (exp is monotone).
            for _ in 0..k {
                let i = argmax(&|i| row[i], &ids);
                ids.push(i as i32);
                gates.push(probs[i]);
            }
        }
        RouterKind::Switch { .. } => {
            let base = (ti * e) as u64;
            let i1 = if noise1 {
                argmax(&|i| row[i] + gumbel(seed, 1, base + i as u64), &[])
            } else {
                argmax(&|i| row[i], &[])
            };
            ids.push(i1 as i32);
            gates.push(probs[i1]);
            if k == 2 {
                let i2 = if noise2 {
                    argmax(&|i| row[i] + gumbel(seed, 2, base + i as u64), &ids)
                } else {
                    argmax(&|i| row[i], &ids)
                };
                ids.push(i2 as i32);
                gates.push(probs[i2]);
            }
        }
        RouterKind::Sigmoid { .. } => {
            let scores: Vec<f32> = row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
            let mut choice: Vec<f32> = (0..e)
                .map(|i| scores[i] + bias.map_or(0.0, |b| b[i]))
                .collect();
            if n_group > 1 {
                let per = e / n_group;
                let group_score: Vec<f32> = (0..n_group)
                    .map(|g| {
                        let mut v: Vec<f32> = choice[g * per..(g + 1) * per].to_vec();
                        v.sort_by(|a, b| b.total_cmp(a));
                        v[0] + v[1]
                    })
                    .collect();
                let mut keep: Vec<i32> = Vec::with_capacity(topk_group);
                for _ in 0..topk_group {
                    let g = argmax_of(n_group, &|g| group_score[g], &keep);
                    keep.push(g as i32);
                }
                // As HF DeepSeek-V3: experts of unselected groups get choice score 0.
                for (i, c) in choice.iter_mut().enumerate() {
                    if !keep.contains(&((i / per) as i32)) {
                        *c = 0.0;
                    }
                }
            }
            for _ in 0..k {
                let i = argmax(&|i| choice[i], &ids);
                ids.push(i as i32);
                gates.push(scores[i]);
            }
        }
    }
    (ids, gates, lse, probs)
}

/// Final combine weights w [k, T] f32 from the gates and which slots were kept (pos >= 0).
pub(crate) fn combine_weights(cfg: &MoeConfig, gates: &Tensor, pos: &Tensor) -> Result<Tensor> {
    let (k, t) = (gates.dim(0), gates.dim(1));
    let r = weight_rule(cfg);
    match gates.device() {
        Device::Cpu => {
            let (g, p) = (gates.as_slice::<f32>()?, pos.as_slice::<i32>()?);
            let mut w = vec![0f32; k * t];
            for ti in 0..t {
                let kept = |j: usize| if p[j * t + ti] >= 0 { 1.0 } else { 0.0 };
                let d = if r.normalize {
                    ((0..k).map(|j| g[j * t + ti] * kept(j)).sum::<f32>() + r.add).max(r.clamp_min)
                } else {
                    1.0
                };
                for j in 0..k {
                    w[j * t + ti] = r.scale * g[j * t + ti] * kept(j) / d;
                }
            }
            Tensor::from_vec(w, &[k, t])
        }
        Device::Cuda(_) => {
            let w = Tensor::uninit(&[k, t], DType::F32, gates.device())?;
            if t > 0 {
                cuda_dev(gates)?
                    .launch(
                        &kernels::MOE_ROUTER,
                        "combine_weights",
                        (crate::runtime::cuda::grid_1d(t, 128), 1, 1),
                        (128, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&w))
                    .ptr(dptr(gates))
                    .ptr(dptr(pos))
                    .usize_as_i32(t)?
                    .usize_as_i32(k)?
                    .i32(r.normalize as i32)
                    .f32(r.add)
                    .f32(r.clamp_min)
                    .f32(r.scale)
                    .run()?;
            }
            Ok(w)
        }
    }
}

/// (aux, z) losses as [1] f32 tensors on the logits' device, already times their coefficients:
/// aux = coeff · E · Σ_e (c_e / T) · mean_t p[t,e]; z = coeff · mean_t lse_t².
pub(crate) fn losses(cfg: &MoeConfig, routing: &Routing) -> Result<(Tensor, Tensor)> {
    let t = routing.lse.numel();
    let dev = routing.lse.device();
    let tf = t.max(1) as f32;
    let z = ops::scale(&ops::sum_squares(&routing.lse)?, cfg.z_loss_coeff / tf)?;
    let aux = match (&routing.probs, cfg.aux_loss_coeff > 0.0) {
        (Some(p), true) => {
            let colsum = ops::sum_rows(p)?; // [E] = T · mean_t p
            let counts = counts_f32(routing.aux_counts()?)?;
            let dot = ops::sum_all(&ops::mul(&colsum, &counts)?)?;
            ops::scale(&dot, cfg.aux_loss_coeff * cfg.n_experts as f32 / (tf * tf))?
        }
        _ => Tensor::zeros(&[1], DType::F32, dev)?,
    };
    Ok((aux, z))
}

pub(crate) fn counts_f32(c: &Tensor) -> Result<Tensor> {
    match c.device() {
        Device::Cpu => Tensor::from_vec(
            c.as_slice::<i32>()?.iter().map(|&x| x as f32).collect(),
            c.shape(),
        ),
        Device::Cuda(_) => {
            let out = Tensor::uninit(c.shape(), DType::F32, c.device())?;
            let n = c.numel();
            cuda_dev(c)?
                .launch(
                    &kernels::MOE_ROUTER,
                    "i32_to_f32",
                    (crate::runtime::cuda::grid_1d(n, 256), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(c))
                .usize_as_i32(n)?
                .run()?;
            Ok(out)
        }
    }
}

/// dlogits [T, E] f32 given dw [k, T] (gradient of the combine weights), through the weight
/// rule and the router's scoring, plus the aux and z losses' gradients (weight 1 each: the
/// coefficients are in the loss). Selection is treated as constant.
pub(crate) fn route_backward(
    cfg: &MoeConfig,
    logits: &Tensor,
    routing: &Routing,
    w: &Tensor,
    dw: &Tensor,
    pos: &Tensor,
) -> Result<Tensor> {
    let (t, e) = logits.rows_cols();
    let k = cfg.top_k;
    let r = weight_rule(cfg);
    let sigmoid = matches!(cfg.router, RouterKind::Sigmoid { .. });
    let aux_coef = if routing.probs.is_some() {
        cfg.aux_loss_coeff
    } else {
        0.0
    };
    match logits.device() {
        Device::Cpu => {
            let lv = logits.as_slice::<f32>()?;
            let (ids, g, wv, dv, p) = (
                routing.ids.as_slice::<i32>()?,
                routing.gates.as_slice::<f32>()?,
                w.as_slice::<f32>()?,
                dw.as_slice::<f32>()?,
                pos.as_slice::<i32>()?,
            );
            let lse = routing.lse.as_slice::<f32>()?;
            let counts = routing.aux_counts()?.as_slice::<i32>()?;
            let mut out = vec![0f32; t * e];
            let tf = t as f32;
            out.par_chunks_mut(e.max(1))
                .enumerate()
                .for_each(|(ti, o)| {
                    let kept = |j: usize| if p[j * t + ti] >= 0 { 1.0f32 } else { 0.0 };
                    // d gate_j from d w_j (see WeightRule).
                    let dg: Vec<f32> = if r.normalize {
                        let d = ((0..k).map(|j| g[j * t + ti] * kept(j)).sum::<f32>() + r.add)
                            .max(r.clamp_min);
                        let clamped = (0..k).map(|j| g[j * t + ti] * kept(j)).sum::<f32>() + r.add
                            < r.clamp_min;
                        let dot: f32 = if clamped {
                            0.0
                        } else {
                            (0..k).map(|j| dv[j * t + ti] * wv[j * t + ti]).sum()
                        };
                        (0..k)
                            .map(|j| kept(j) / d * (r.scale * dv[j * t + ti] - dot))
                            .collect()
                    } else {
                        (0..k).map(|j| r.scale * kept(j) * dv[j * t + ti]).collect()
                    };
                    let row = &lv[ti * e..(ti + 1) * e];
                    let probs: Vec<f32> = row.iter().map(|&x| (x - lse[ti]).exp()).collect();
                    if sigmoid {
                        for j in 0..k {
                            let i = ids[j * t + ti] as usize;
                            let s = 1.0 / (1.0 + (-row[i]).exp());
                            o[i] += dg[j] * s * (1.0 - s);
                        }
                    } else {
                        let mut dp: Vec<f32> = (0..e)
                            .map(|i| aux_coef * e as f32 * counts[i] as f32 / (tf * tf))
                            .collect();
                        for j in 0..k {
                            dp[ids[j * t + ti] as usize] += dg[j];
                        }
                        let dot: f32 = probs.iter().zip(&dp).map(|(a, b)| a * b).sum();
                        for i in 0..e {
                            o[i] += probs[i] * (dp[i] - dot);
                        }
                    }
                    let zc = cfg.z_loss_coeff * 2.0 * lse[ti] / tf;
                    for i in 0..e {
                        o[i] += zc * probs[i];
                    }
                });
            Tensor::from_vec(out, &[t, e])
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&[t, e], DType::F32, logits.device())?;
            if t > 0 {
                let block = (e.next_power_of_two()).clamp(32, 256) as u32;
                cuda_dev(logits)?
                    .launch(
                        &kernels::MOE_ROUTER,
                        "route_backward",
                        (t as u32, 1, 1),
                        (block, 1, 1),
                        (e * 4) as u32,
                    )?
                    .ptr(dptr(&out))
                    .ptr(dptr(logits))
                    .ptr(dptr(&routing.lse))
                    .ptr(dptr(&routing.ids))
                    .ptr(dptr(&routing.gates))
                    .ptr(dptr(w))
                    .ptr(dptr(dw))
                    .ptr(dptr(pos))
                    .ptr(dptr(routing.aux_counts()?))
                    .usize_as_i32(t)?
                    .usize_as_i32(e)?
                    .usize_as_i32(k)?
                    .i32(sigmoid as i32)
                    .i32(r.normalize as i32)
                    .f32(r.add)
                    .f32(r.clamp_min)
                    .f32(r.scale)
                    .f32(aux_coef)
                    .f32(cfg.z_loss_coeff)
                    .run()?;
            }
            Ok(out)
        }
    }
}

/// Aux-loss-free balancing (DeepSeek-V3): bias_e += rate · sign(mean load − load_e).
pub fn update_router_bias(
    cfg: &MoeConfig,
    bias: &mut Tensor,
    tokens_per_expert: &Tensor,
) -> Result<()> {
    let RouterKind::Sigmoid {
        bias_update_rate, ..
    } = cfg.router
    else {
        return Ok(());
    };
    bias.expect_dtype("update_router_bias", DType::F32)?;
    match bias.device() {
        Device::Cpu => {
            let c = tokens_per_expert.as_slice::<i32>()?;
            let mean = c.iter().map(|&x| x as f64).sum::<f64>() / c.len().max(1) as f64;
            for (b, &x) in bias.as_mut_slice::<f32>()?.iter_mut().zip(c) {
                let d = mean - x as f64;
                *b += bias_update_rate
                    * if d > 0.0 {
                        1.0
                    } else if d < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
            }
            Ok(())
        }
        Device::Cuda(_) => {
            let e = bias.numel();
            cuda_dev(bias)?
                .launch(
                    &kernels::MOE_ROUTER,
                    "update_bias",
                    (1, 1, 1),
                    (1024, 1, 1),
                    0,
                )?
                .ptr(dptr(bias))
                .ptr(dptr(tokens_per_expert))
                .usize_as_i32(e)?
                .f32(bias_update_rate)
                .run()
        }
    }
}

/// Error when any router logit is NaN/Inf (reads the logits to the host: a check the caller
/// opts into, since it synchronises the device).
pub fn check_finite(layer: &str, logits: &Tensor) -> Result<()> {
    let v = logits.to_f32_vec()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        let e = logits.dim(-1).max(1);
        return Err(Error::Invalid(format!(
            "{layer}: router logit of token {} expert {} is {} (non-finite activations reached the router)",
            i / e,
            i % e,
            v[i]
        )));
    }
    Ok(())
}
