//! Grouped GEMMs over expert-contiguous rows (the MoE experts): rows offsets[e]..offsets[e+1] of
//! x belong to group e. `offsets` [E+1] i32 may live on the device: the CUDA path reads group
//! sizes in the kernel, with no host synchronisation.
//!   grouped_matmul:    y[g] = x[g] · W[e]ᵀ   (w [E, N, K], Linear layout)   or x[g] · W[e] (w [E, K, N])
//!   grouped_matmul_tn: out[e] = a[g]ᵀ · b[g] (a [M, P], b [M, Q] -> [E, P, Q]; weight gradients)
//! FLOPs: 2·M·N·K (resp. 2·M·P·Q). Rows past offsets[E] are written as zeros.

use rayon::prelude::*;

use super::{cuda_dev, same_device};
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

fn check_offsets(op: &'static str, offsets: &Tensor, m: usize) -> Result<usize> {
    offsets.expect_dtype(op, DType::I32)?;
    if offsets.rank() != 1 || offsets.numel() < 2 {
        return Err(Error::shape(
            op,
            format!(
                "offsets must be [E+1] with E >= 1, got {:?}",
                offsets.shape()
            ),
        ));
    }
    if offsets.device() == Device::Cpu {
        let o = offsets.as_slice::<i32>()?;
        if o[0] != 0
            || o.windows(2).any(|w| w[1] < w[0])
            || *o.last().expect("len >= 2") as usize > m
        {
            return Err(Error::Invalid(format!(
                "{op}: offsets must rise from 0 to at most {m} rows, got {o:?}"
            )));
        }
    }
    Ok(offsets.numel() - 1)
}

/// Host copy of the offsets (the CPU path only).
fn host_offsets(offsets: &Tensor) -> Result<Vec<usize>> {
    Ok(offsets
        .as_slice::<i32>()?
        .iter()
        .map(|&o| o as usize)
        .collect())
}

/// y [M, N] = per group e: x[rows of e] · op(w[e]).
pub fn grouped_matmul(x: &Tensor, w: &Tensor, offsets: &Tensor, trans_w: bool) -> Result<Tensor> {
    let op = "grouped_matmul";
    same_device(op, &[x, w, offsets])?;
    x.expect_float(op)?;
    if x.rank() != 2 || w.rank() != 3 || x.dtype() != w.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "x must be [M, K] and w [E, ·, ·] of one dtype; got {:?} {} and {:?} {}",
                x.shape(),
                x.dtype(),
                w.shape(),
                w.dtype()
            ),
        ));
    }
    let (m, k) = (x.dim(0), x.dim(1));
    let e = check_offsets(op, offsets, m)?;
    let (we, wk, n) = if trans_w {
        (w.dim(0), w.dim(2), w.dim(1))
    } else {
        (w.dim(0), w.dim(1), w.dim(2))
    };
    if we != e || wk != k {
        return Err(Error::shape(
            op,
            format!(
                "w {:?} (trans_w = {trans_w}) does not fit x {:?} with {e} groups",
                w.shape(),
                x.shape()
            ),
        ));
    }
    match x.device() {
        Device::Cpu => {
            let off = host_offsets(offsets)?;
            let (xv, wv) = (x.cpu_f32()?, w.cpu_f32()?);
            let mut y = vec![0.0f32; m * n];
            // Split y into the groups' row ranges so experts run in parallel.
            let mut parts: Vec<(usize, &mut [f32])> = Vec::with_capacity(e);
            let mut rest: &mut [f32] = &mut y;
            for g in 0..e {
                let (head, tail) = rest.split_at_mut((off[g + 1] - off[g]) * n);
                parts.push((g, head));
                rest = tail;
            }
            let inner = if e >= rayon::current_num_threads() {
                1
            } else {
                rayon::current_num_threads()
            };
            parts.into_par_iter().for_each(|(g, yg)| {
                let rows = off[g + 1] - off[g];
                if rows == 0 || n == 0 {
                    return;
                }
                let xg = &xv[off[g] * k..];
                let wg = &wv[g * k * n..];
                let (w_rs, w_cs) = if trans_w {
                    (1, k as isize)
                } else {
                    (n as isize, 1)
                };
                unsafe {
                    gemm::gemm(
                        rows,
                        n,
                        k,
                        yg.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        xg.as_ptr(),
                        1,
                        k as isize,
                        wg.as_ptr(),
                        w_cs,
                        w_rs,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        if inner > 1 {
                            gemm::Parallelism::Rayon(inner)
                        } else {
                            gemm::Parallelism::None
                        },
                    );
                }
            });
            cpu_from_f32(y, &[m, n], x.dtype())
        }
        Device::Cuda(_) => {
            super::grouped_cuda::grouped_matmul(&cuda_dev(x)?, x, w, offsets, trans_w, n)
        }
    }
}

/// `grouped_matmul(gather_rows(x, rows), w, offsets, true)`: the MoE experts' first GEMM over the
/// dispatch permutation (`rows` [M] i32 into x [R, K]; an index outside [0, R) reads as a zero
/// row). The rows are gathered first on every device: on Hopper, gather + the TMA kernels beat a
/// cp.async kernel reading through the permutation (BENCHMARKS NOTES: Mixtral forward 9.48 vs
/// 11.97 ms).
pub fn grouped_matmul_gather(
    x: &Tensor,
    rows: &Tensor,
    w: &Tensor,
    offsets: &Tensor,
) -> Result<Tensor> {
    let op = "grouped_matmul_gather";
    same_device(op, &[x, rows, w, offsets])?;
    rows.expect_dtype(op, DType::I32)?;
    x.expect_float(op)?;
    grouped_matmul(&super::gather_rows(x, rows)?, w, offsets, true)
}

/// The SwiGLU experts of a few served tokens straight from the router's slots (no dispatch):
/// y [T, N] = Σ_j weights[j, t] · (silu(g) ⊙ u)·W2[e]ᵀ with e = ids[j, t], [g | u] =
/// x[t]·W1[e]ᵀ; x [T, K], W1 [E, 2F, K], W2 [E, N, F], ids [k, T] i32 and weights [k, T] f32 as
/// the router writes them. g, u and the activation are rounded to x's dtype as the dispatch path
/// stores them; an id outside [0, E) is an error on the CPU and contributes nothing on the GPU
/// (the router never writes one). Bytes: each slot reads its expert's 3·F·K weights once, so it
/// pays when a step's slots rarely share an expert (k·T well below E).
pub fn moe_serve_swiglu(
    x: &Tensor,
    w1: &Tensor,
    w2: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    let op = "moe_serve_swiglu";
    same_device(op, &[x, w1, w2, ids, weights])?;
    let (e, f, n, k) = serve_shapes(op, x, w1, w2, ids)?;
    weights.expect_dtype(op, DType::F32)?;
    if weights.shape() != ids.shape() {
        return Err(Error::shape(
            op,
            format!(
                "weights {:?} for ids [k, T] {:?}",
                weights.shape(),
                ids.shape()
            ),
        ));
    }
    let t = x.dim(0);
    match x.device() {
        Device::Cpu => {
            let y = serve_swiglu_cpu(&x.cpu_f32()?, x.dtype(), w1, w2, ids, weights)?;
            cpu_from_f32(y, &[t, n], x.dtype())
        }
        Device::Cuda(_) => super::grouped_cuda::moe_serve_swiglu(
            &cuda_dev(x)?,
            x,
            w1,
            w2,
            ids,
            weights,
            (e, f, n, k),
        ),
    }
}

/// The served experts' shapes: x [T, K], W1 [E, 2F, K], W2 [E, N, F] of x's dtype, ids [k, T]
/// i32; returns (E, F, N, k).
fn serve_shapes(
    op: &'static str,
    x: &Tensor,
    w1: &Tensor,
    w2: &Tensor,
    ids: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    x.expect_float(op)?;
    ids.expect_dtype(op, DType::I32)?;
    let ok = x.rank() == 2 && w1.rank() == 3 && w2.rank() == 3 && ids.rank() == 2;
    if !ok
        || w1.dim(2) != x.dim(1)
        || w1.dim(1) % 2 != 0
        || w2.dim(0) != w1.dim(0)
        || w2.dim(2) != w1.dim(1) / 2
        || ids.dim(1) != x.dim(0)
        || w1.dtype() != x.dtype()
        || w2.dtype() != x.dtype()
    {
        return Err(Error::shape(
            op,
            format!(
                "x [T, K] {:?} {}, w1 [E, 2F, K] {:?} {}, w2 [E, N, F] {:?} {}, ids [k, T] {:?}",
                x.shape(),
                x.dtype(),
                w1.shape(),
                w1.dtype(),
                w2.shape(),
                w2.dtype(),
                ids.shape(),
            ),
        ));
    }
    Ok((w1.dim(0), w2.dim(2), w2.dim(1), ids.dim(0)))
}

/// `moe_serve_swiglu` on the CPU for rows xv [T, K] (f32 values; g, u and the activation rounded
/// to `dt`): y [T, N] f32. Shapes checked by the caller.
fn serve_swiglu_cpu(
    xv: &[f32],
    dt: DType,
    w1: &Tensor,
    w2: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
) -> Result<Vec<f32>> {
    let (e, f, n, k, kd) = (w1.dim(0), w2.dim(2), w2.dim(1), ids.dim(0), w1.dim(2));
    let t = ids.dim(1);
    let (w1v, w2v) = (w1.cpu_f32()?, w2.cpu_f32()?);
    let (iv, wv) = (ids.as_slice::<i32>()?, weights.as_slice::<f32>()?);
    if let Some(&bad) = iv.iter().find(|&&i| i < 0 || i as usize >= e) {
        return Err(Error::Invalid(format!(
            "moe_serve_swiglu: expert id {bad} outside 0..{e}"
        )));
    }
    let round = |v: f32| -> f32 {
        match dt {
            DType::BF16 => half::bf16::from_f32(v).to_f32(),
            DType::F16 => half::f16::from_f32(v).to_f32(),
            _ => v,
        }
    };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f32>();
    let mut y = vec![0f32; t * n];
    y.par_chunks_mut(n.max(1)).enumerate().for_each(|(ti, yr)| {
        let xr = &xv[ti * kd..][..kd];
        for j in 0..k {
            let (ex, wt) = (iv[j * t + ti] as usize, wv[j * t + ti]);
            let a: Vec<f32> = (0..f)
                .map(|fi| {
                    let row = |r: usize| &w1v[(ex * 2 * f + r) * kd..][..kd];
                    let (g, u) = (round(dot(row(fi), xr)), round(dot(row(f + fi), xr)));
                    round(super::Activation::Silu.f(g) * u)
                })
                .collect();
            for (ni, yv) in yr.iter_mut().enumerate() {
                *yv += wt * dot(&w2v[(ex * n + ni) * f..][..f], &a);
            }
        }
    });
    Ok(y)
}

/// The k largest of a row, ties to the lower index (-1 past the row's length).
fn top_k_ids(row: &[f32], k: usize) -> Vec<i32> {
    let mut ids: Vec<i32> = Vec::with_capacity(k);
    for _ in 0..k {
        let best = (0..row.len()).filter(|&i| !ids.contains(&(i as i32))).fold(
            None,
            |b: Option<usize>, i| match b {
                Some(j) if row[j] >= row[i] => Some(j),
                _ => Some(i),
            },
        );
        ids.push(best.map_or(-1, |i| i as i32));
    }
    ids
}

/// A softmax router's top-k rule as `router_topk` applies it: the k largest logits (ties to the
/// lower index), gate g = softmax probability, combine weight scale·g / D with
/// D = max(Σ g + add, clamp_min) when `normalize`, else D = 1.
#[derive(Clone, Debug)]
pub struct SoftmaxTopK {
    pub k: usize,
    pub normalize: bool,
    pub add: f32,
    pub clamp_min: f32,
    pub scale: f32,
}

impl SoftmaxTopK {
    /// Experts the GPU's one-warp routing takes at most (8 logits per lane).
    pub const MAX_EXPERTS: usize = 256;
    /// Rows one fused router launch takes at most (one warp each).
    pub const MAX_ROWS: usize = 8;

    /// One row's (ids, combine weights) by the rule (the CPU twin of the kernel's routing).
    fn route_row(&self, row: &[f32]) -> (Vec<i32>, Vec<f32>) {
        let ids = top_k_ids(row, self.k);
        let w = self.weights(row, &ids);
        (ids, w)
    }

    /// The combine weights of chosen experts `ids` of a row of logits.
    fn weights(&self, row: &[f32], ids: &[i32]) -> Vec<f32> {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
        let g: Vec<f32> = ids
            .iter()
            .map(|&i| usize::try_from(i).map_or(0.0, |i| (row[i] - lse).exp()))
            .collect();
        let d = if self.normalize {
            (g.iter().sum::<f32>() + self.add).max(self.clamp_min)
        } else {
            1.0
        };
        g.iter().map(|&v| self.scale * v / d).collect()
    }
}

/// A served step's router in one launch: logits [T, E] f32 = x·Wᵀ (x [T, K], W [E, K]) and
/// the softmax top-k by `rule` — expert ids [k, T] i32 and combine weights [k, T] f32, slot-major
/// as `moe_serve_swiglu` takes them. On the GPU (T <= 8 rows of a 16-bit type, K % 8 == 0,
/// E <= 256) the GEMV's last block routes, so no route kernel runs; Ok(None) where that kernel
/// does not apply on the GPU (the caller routes the general way). The CPU computes it always.
pub fn router_topk(
    x: &Tensor,
    w: &Tensor,
    rule: &SoftmaxTopK,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    same_device("router_topk", &[x, w])?;
    let fits = router_topk_fits(x, w, rule)?;
    let (t, e) = (x.dim(0), w.dim(0));
    match x.device() {
        Device::Cpu => {
            let logits = super::matmul(
                x,
                w,
                super::Matmul {
                    trans_b: true,
                    out_dtype: Some(DType::F32),
                    ..Default::default()
                },
            )?;
            let lv = logits.as_slice::<f32>()?;
            let (mut ids, mut wts) = (vec![0i32; rule.k * t], vec![0f32; rule.k * t]);
            for ti in 0..t {
                let (ri, rw) = rule.route_row(&lv[ti * e..(ti + 1) * e]);
                for j in 0..rule.k {
                    ids[j * t + ti] = ri[j];
                    wts[j * t + ti] = rw[j];
                }
            }
            let ids = Tensor::from_vec(ids, &[rule.k, t])?;
            let wts = Tensor::from_vec(wts, &[rule.k, t])?;
            Ok(Some((logits, ids, wts)))
        }
        Device::Cuda(_) => {
            if !fits {
                return Ok(None);
            }
            super::grouped_cuda::router_topk(&cuda_dev(x)?, x, w, rule)
        }
    }
}

/// The rows of a residual add + RMSNorm (`add_rmsnorm` on a copy of x: x + a, normed by g),
/// then `router_topk` on them, in one launch on the GPU (each GEMV block norms the rows itself;
/// the first writes them out): (new residual x + a, normed rows h, logits, ids, weights). x is
/// not modified. Ok(None) where the fused kernel does not apply on the GPU.
#[allow(clippy::type_complexity)]
pub fn add_rmsnorm_router_topk(
    x: &Tensor,
    a: &Tensor,
    g: &Tensor,
    eps: f32,
    w: &Tensor,
    rule: &SoftmaxTopK,
) -> Result<Option<(Tensor, Tensor, Tensor, Tensor, Tensor)>> {
    let op = "add_rmsnorm_router_topk";
    same_device(op, &[x, a, g, w])?;
    super::norm::check_folded_addnorm(op, x, a, g)?;
    match x.device() {
        Device::Cpu => {
            let mut xn = x.try_clone()?;
            let h = super::add_rmsnorm(&mut xn, a, g, eps)?;
            Ok(router_topk(&h, w, rule)?.map(|(l, i, wt)| (xn, h, l, i, wt)))
        }
        Device::Cuda(_) => {
            if g.rank() != 1 || g.dim(0) != x.dim(1) || !router_topk_fits(x, w, rule)? {
                return Ok(None);
            }
            super::grouped_cuda::add_rmsnorm_router_topk(&cuda_dev(x)?, x, a, g, eps, w, rule)
        }
    }
}

/// A router folded through the RMSNorm and o projection before it, for `o_router_topk`:
/// Wf [E, D + C] = [W ⊙ g | (W ⊙ g)·Wo] in W's dtype (computed in f32), for router W [E, D],
/// RMSNorm weight g [D] and o projection Wo [D, C]. With h = RMSNorm(x + c·Woᵀ)·g the router's
/// logits h·Wᵀ are r·([x | c]·Wfᵀ), r = rsqrt(mean((x + c·Woᵀ)²) + eps) > 0 per row.
pub fn router_fold(w: &Tensor, g: &Tensor, wo: &Tensor) -> Result<Tensor> {
    let op = "router_fold";
    same_device(op, &[w, g, wo])?;
    w.expect_float(op)?;
    let (e, d) = (w.dim(0), w.dim(1));
    if w.rank() != 2 || g.shape() != [d] || wo.rank() != 2 || wo.dim(0) != d {
        return Err(Error::shape(
            op,
            format!(
                "router [E, D] {:?}, norm [D] {:?}, o projection [D, C] {:?}",
                w.shape(),
                g.shape(),
                wo.shape()
            ),
        ));
    }
    let c = wo.dim(1);
    let gv = g.to_f32_vec()?;
    let mut wg = w.to_f32_vec()?;
    for row in wg.chunks_mut(d.max(1)) {
        row.iter_mut().zip(&gv).for_each(|(v, s)| *v *= s);
    }
    let wg_t = Tensor::from_f32(&wg, &[e, d], DType::F32, w.device())?;
    let m = super::matmul(
        &wg_t,
        &super::cast(wo, DType::F32)?,
        super::Matmul::default(),
    )?
    .to_f32_vec()?;
    let mut out = Vec::with_capacity(e * (d + c));
    for r in 0..e {
        out.extend_from_slice(&wg[r * d..][..d]);
        out.extend_from_slice(&m[r * c..][..c]);
    }
    Tensor::from_f32(&out, &[e, d + c], w.dtype(), w.device())
}

/// A served MoE block's o projection and router in one launch (decode): the new residual
/// s [T, D] = x + c·Woᵀ (the product rounded to x's dtype before the add, as a stored projection
/// and `add_rmsnorm` give it) for the attention context c [T, C] and residual x [T, D], router
/// logits up to a positive per-row factor z [T, E] f32 = [x | c]·Wfᵀ with Wf from `router_fold`,
/// and each row's top k of z (largest first, ties to the lower index) as ids [k, T] i32 — the
/// router's choice for the rows RMSNorm(s) (`moe_serve_swiglu_norm` finishes the block). On the GPU (T <= 8 rows
/// of a 16-bit type, D and C multiples of 8, E <= 256) the router blocks run beside the
/// projection's; Ok(None) where that kernel does not apply on the GPU. The CPU computes it always.
#[allow(clippy::type_complexity)]
pub fn o_router_topk(
    ctx: &Tensor,
    wo: &Tensor,
    x: &Tensor,
    wf: &Tensor,
    k: usize,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let op = "o_router_topk";
    same_device(op, &[ctx, wo, x, wf])?;
    x.expect_float(op)?;
    let ok = ctx.rank() == 2 && wo.rank() == 2 && x.rank() == 2 && wf.rank() == 2;
    if !ok
        || ctx.dim(0) != x.dim(0)
        || wo.shape() != [x.dim(1), ctx.dim(1)]
        || wf.dim(1) != x.dim(1) + ctx.dim(1)
        || [ctx.dtype(), wo.dtype(), wf.dtype()] != [x.dtype(); 3]
    {
        return Err(Error::shape(
            op,
            format!(
                "context [T, C] {:?} {}, o projection [D, C] {:?} {}, residual [T, D] {:?} {}, \
                 folded router [E, D + C] {:?} {}",
                ctx.shape(),
                ctx.dtype(),
                wo.shape(),
                wo.dtype(),
                x.shape(),
                x.dtype(),
                wf.shape(),
                wf.dtype()
            ),
        ));
    }
    let (t, d, c, e) = (x.dim(0), x.dim(1), ctx.dim(1), wf.dim(0));
    if k == 0 || k > e.min(32) {
        return Err(Error::Invalid(format!(
            "{op}: top-{k} of {e} experts (needs 1 <= k <= min(E, 32))"
        )));
    }
    match x.device() {
        Device::Cpu => {
            let mut s = x.try_clone()?;
            super::add_assign(&mut s, &super::linear(ctx, wo, None)?)?;
            let (xv, cv, wv) = (x.cpu_f32()?, ctx.cpu_f32()?, wf.cpu_f32()?);
            let mut z = vec![0f32; t * e];
            z.par_chunks_mut(e.max(1)).enumerate().for_each(|(ti, zr)| {
                let (xr, cr) = (&xv[ti * d..][..d], &cv[ti * c..][..c]);
                for (ei, zv) in zr.iter_mut().enumerate() {
                    let w = &wv[ei * (d + c)..][..d + c];
                    let sx: f32 = w[..d].iter().zip(xr).map(|(p, q)| p * q).sum();
                    let sc: f32 = w[d..].iter().zip(cr).map(|(p, q)| p * q).sum();
                    *zv = sx + sc;
                }
            });
            let mut ids = vec![0i32; k * t];
            for ti in 0..t {
                for (j, id) in top_k_ids(&z[ti * e..][..e], k).into_iter().enumerate() {
                    ids[j * t + ti] = id;
                }
            }
            Ok(Some((
                s,
                Tensor::from_vec(z, &[t, e])?,
                Tensor::from_vec(ids, &[k, t])?,
            )))
        }
        Device::Cuda(_) => {
            let fits = (1..=SoftmaxTopK::MAX_ROWS).contains(&t)
                && x.dtype().size_in_bytes() == 2
                && d % 8 == 0
                && c % 8 == 0
                && e <= SoftmaxTopK::MAX_EXPERTS;
            if !fits {
                return Ok(None);
            }
            super::grouped_cuda::o_router_topk(&cuda_dev(x)?, ctx, wo, x, wf, k)
        }
    }
}

/// The rest of a served MoE block after `o_router_topk`: the rows h = s·r·g, RMSNorm of the new
/// residual s with r = rsqrt(mean(s²) + eps) (not rounded: the GPU folds r into the dot
/// products), combine weights by `rule` from the logits r·z for the chosen ids, and
/// `moe_serve_swiglu` of h. s [T, K]; g [K]; z [T, E] f32; ids [k, T] i32. Returns y [T, N].
#[allow(clippy::too_many_arguments)]
pub fn moe_serve_swiglu_norm(
    s: &Tensor,
    g: &Tensor,
    eps: f32,
    z: &Tensor,
    ids: &Tensor,
    rule: &SoftmaxTopK,
    w1: &Tensor,
    w2: &Tensor,
) -> Result<Tensor> {
    let op = "moe_serve_swiglu_norm";
    same_device(op, &[s, g, z, ids, w1, w2])?;
    let (e, f, n, k) = serve_shapes(op, s, w1, w2, ids)?;
    z.expect_dtype(op, DType::F32)?;
    let (t, kd) = (s.dim(0), s.dim(1));
    let vec = 16 / s.dtype().size_in_bytes();
    if g.shape() != [kd] || g.dtype() != s.dtype() || z.shape() != [t, e] || k != rule.k {
        return Err(Error::shape(
            op,
            format!(
                "rows [T, K] {:?}, norm [K] {:?} {}, z [T, E] {:?} for E {e}, ids [k, T] {:?} for \
                 top-{}",
                s.shape(),
                g.shape(),
                g.dtype(),
                z.shape(),
                ids.shape(),
                rule.k
            ),
        ));
    }
    match s.device() {
        Device::Cpu => {
            let (sv, gv, zv) = (s.cpu_f32()?, g.cpu_f32()?, z.as_slice::<f32>()?);
            let iv = ids.as_slice::<i32>()?;
            let mut h = vec![0f32; t * kd];
            let mut wts = vec![0f32; k * t];
            for ti in 0..t {
                let sr = &sv[ti * kd..][..kd];
                let r = 1.0 / (sr.iter().map(|v| v * v).sum::<f32>() / kd as f32 + eps).sqrt();
                for ((hv, x), gw) in h[ti * kd..][..kd].iter_mut().zip(sr).zip(gv.iter()) {
                    *hv = x * r * gw;
                }
                let logits: Vec<f32> = zv[ti * e..][..e].iter().map(|v| r * v).collect();
                let chosen: Vec<i32> = (0..k).map(|j| iv[j * t + ti]).collect();
                for (j, w) in rule.weights(&logits, &chosen).into_iter().enumerate() {
                    wts[j * t + ti] = w;
                }
            }
            let wts = Tensor::from_vec(wts, &[k, t])?;
            let y = serve_swiglu_cpu(&h, s.dtype(), w1, w2, ids, &wts)?;
            cpu_from_f32(y, &[t, n], s.dtype())
        }
        Device::Cuda(_) => {
            if kd % vec != 0 || f % vec != 0 || e > SoftmaxTopK::MAX_EXPERTS || k > 32 {
                return Err(Error::Invalid(format!(
                    "{op}: K {kd} and F {f} must be multiples of {vec}, E {e} <= {}, k {k} <= 32",
                    SoftmaxTopK::MAX_EXPERTS
                )));
            }
            if t == 0 {
                return Tensor::uninit(&[0, n], s.dtype(), s.device());
            }
            super::grouped_cuda::moe_serve_swiglu_norm(
                &cuda_dev(s)?,
                s,
                g,
                eps,
                z,
                ids,
                rule,
                w1,
                w2,
                (e, f, n),
            )
        }
    }
}

/// `router_topk`'s checks; true where the GPU kernel applies (T <= 8 rows of a 16-bit type,
/// K % 8 == 0, E <= 256).
fn router_topk_fits(x: &Tensor, w: &Tensor, rule: &SoftmaxTopK) -> Result<bool> {
    let op = "router_topk";
    x.expect_float(op)?;
    if x.rank() != 2 || w.rank() != 2 || w.dim(1) != x.dim(1) || w.dtype() != x.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "x [T, K] {:?} {} and router [E, K] {:?} {}",
                x.shape(),
                x.dtype(),
                w.shape(),
                w.dtype()
            ),
        ));
    }
    let (t, kd, e) = (x.dim(0), x.dim(1), w.dim(0));
    if rule.k == 0 || rule.k > e.min(32) {
        return Err(Error::Invalid(format!(
            "{op}: top-{} of {e} experts (needs 1 <= k <= min(E, 32))",
            rule.k
        )));
    }
    Ok((1..=SoftmaxTopK::MAX_ROWS).contains(&t)
        && x.dtype().size_in_bytes() == 2
        && kd % 8 == 0
        && e <= SoftmaxTopK::MAX_EXPERTS)
}

/// `grouped_matmul_tn_into(out, a, gather_rows(b, b_rows), ..)`: the experts' first weight
/// gradient, x given with the dispatch permutation. The rows are gathered first on every
/// device: a wgmma kernel reading B through the permutation was slower than the gather plus
/// the plain kernel (BENCHMARKS NOTES), as in the forward (`grouped_matmul_gather`).
pub fn grouped_matmul_tn_gather_into(
    out: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
    b_rows: &Tensor,
    offsets: &Tensor,
    accumulate: bool,
    sumsq: Option<&mut Tensor>,
) -> Result<()> {
    grouped_matmul_tn_into(
        out,
        a,
        &super::gather_rows(b, b_rows)?,
        offsets,
        accumulate,
        sumsq,
    )
}

/// out [E, P, Q] = per group e: a[rows of e]ᵀ · b[rows of e]; zero for empty groups.
pub fn grouped_matmul_tn(
    a: &Tensor,
    b: &Tensor,
    offsets: &Tensor,
    out_dtype: DType,
) -> Result<Tensor> {
    let op = "grouped_matmul_tn";
    if !out_dtype.is_float() {
        return Err(Error::dtype(op, out_dtype, "a floating output dtype"));
    }
    let (e, p, q) = check_tn(op, a, b, offsets)?;
    match a.device() {
        Device::Cpu => cpu_from_f32(cpu_tn(a, b, offsets, e)?, &[e, p, q], out_dtype),
        Device::Cuda(_) => {
            let mut out = Tensor::uninit(&[e, p, q], out_dtype, a.device())?;
            super::grouped_cuda::grouped_matmul_tn_into(
                &cuda_dev(a)?,
                &mut out,
                a,
                b,
                offsets,
                false,
                None,
            )?;
            Ok(out)
        }
    }
}

/// out [E, P, Q] (+)= per group e: a[rows of e]ᵀ · b[rows of e], into an existing tensor: added
/// to it when `accumulate` (weight gradients straight into their accumulator: no [E, P, Q]
/// temporary, one read and one write of `out`), else written over it (never read: it may be
/// uninitialised). `out` is f32 or a's dtype. With `sumsq` ([1] f32), the sum of the squares of
/// the values written is added to it (a gradient's squared norm without reading it again; on
/// CUDA one atomic per warp in the GEMM's epilogue).
pub fn grouped_matmul_tn_into(
    out: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
    offsets: &Tensor,
    accumulate: bool,
    sumsq: Option<&mut Tensor>,
) -> Result<()> {
    let op = "grouped_matmul_tn_into";
    same_device(op, &[out, a])?;
    out.expect_float(op)?;
    let (e, p, q) = check_tn(op, a, b, offsets)?;
    if out.shape() != [e, p, q] {
        return Err(Error::shape(
            op,
            format!("out must be [{e}, {p}, {q}], got {:?}", out.shape()),
        ));
    }
    if let Some(s) = &sumsq {
        same_device(op, &[s, a])?;
        if s.dtype() != DType::F32 || s.numel() != 1 {
            return Err(Error::shape(
                op,
                format!("sumsq must be [1] f32, got {:?} {}", s.shape(), s.dtype()),
            ));
        }
    }
    match a.device() {
        Device::Cpu => {
            let mut v = cpu_tn(a, b, offsets, e)?;
            if accumulate {
                for (x, o) in v.iter_mut().zip(out.cpu_f32()?.iter()) {
                    *x += o;
                }
            }
            if let Some(s) = sumsq {
                let add: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
                let old = s.cpu_f32()?[0] as f64;
                *s = Tensor::from_vec(vec![(old + add) as f32], &[1])?;
            }
            *out = cpu_from_f32(v, &[e, p, q], out.dtype())?;
            Ok(())
        }
        Device::Cuda(_) => super::grouped_cuda::grouped_matmul_tn_into(
            &cuda_dev(a)?,
            out,
            a,
            b,
            offsets,
            accumulate,
            sumsq,
        ),
    }
}

/// (E, P, Q) of a grouped a ᵀ· b after checking shapes, dtypes and offsets.
fn check_tn(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    offsets: &Tensor,
) -> Result<(usize, usize, usize)> {
    same_device(op, &[a, b, offsets])?;
    a.expect_float(op)?;
    if a.rank() != 2 || b.rank() != 2 || a.dim(0) != b.dim(0) || a.dtype() != b.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "a [M, P] and b [M, Q] of one dtype expected; got {:?} {} and {:?} {}",
                a.shape(),
                a.dtype(),
                b.shape(),
                b.dtype()
            ),
        ));
    }
    let (m, p, q) = (a.dim(0), a.dim(1), b.dim(1));
    let e = check_offsets(op, offsets, m)?;
    Ok((e, p, q))
}

/// The CPU twin of the grouped aᵀ·b in f32, [E, P, Q] row-major.
fn cpu_tn(a: &Tensor, b: &Tensor, offsets: &Tensor, e: usize) -> Result<Vec<f32>> {
    let (p, q) = (a.dim(1), b.dim(1));
    let off = host_offsets(offsets)?;
    let (av, bv) = (a.cpu_f32()?, b.cpu_f32()?);
    let mut out = vec![0.0f32; e * p * q];
    let inner = if e >= rayon::current_num_threads() {
        1
    } else {
        rayon::current_num_threads()
    };
    out.par_chunks_mut((p * q).max(1))
        .enumerate()
        .take(e)
        .for_each(|(g, og)| {
            let rows = off[g + 1] - off[g];
            if rows == 0 || p == 0 || q == 0 {
                return;
            }
            let ag = &av[off[g] * p..];
            let bg = &bv[off[g] * q..];
            unsafe {
                gemm::gemm(
                    p,
                    q,
                    rows,
                    og.as_mut_ptr(),
                    1,
                    q as isize,
                    false,
                    ag.as_ptr(),
                    p as isize,
                    1,
                    bg.as_ptr(),
                    1,
                    q as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    if inner > 1 {
                        gemm::Parallelism::Rayon(inner)
                    } else {
                        gemm::Parallelism::None
                    },
                );
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ops::{matmul, slice_rows, Matmul};

    #[test]
    fn grouped_matches_per_group_matmul() {
        let (m, k, n, e) = (11, 6, 5, 3);
        let offs = [0i32, 4, 4, 9]; // an empty group; rows 9..11 belong to none
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let w: Vec<f32> = (0..e * n * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let xt = Tensor::from_vec(x, &[m, k]).unwrap();
        let wt = Tensor::from_vec(w, &[e, n, k]).unwrap();
        let ot = Tensor::from_vec(offs.to_vec(), &[e + 1]).unwrap();
        let y = grouped_matmul(&xt, &wt, &ot, true)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        for g in 0..e {
            let (r0, r1) = (offs[g] as usize, offs[g + 1] as usize);
            if r0 == r1 {
                continue;
            }
            let xg = slice_rows(&xt, r0, r1 - r0).unwrap();
            let wg = slice_rows(&wt, g, 1).unwrap().reshape(&[n, k]).unwrap();
            let want = matmul(&xg, &wg, Matmul::nt())
                .unwrap()
                .to_vec::<f32>()
                .unwrap();
            for (a, b) in y[r0 * n..r1 * n].iter().zip(&want) {
                assert!((a - b).abs() < 1e-5);
            }
        }
        assert!(
            y[9 * n..].iter().all(|&v| v == 0.0),
            "rows past the last group are zero"
        );
        let tn = grouped_matmul_tn(&xt, &xt, &ot, DType::F32).unwrap();
        assert_eq!(tn.shape(), &[e, k, k]);
        assert!(
            tn.to_vec::<f32>().unwrap()[k * k..2 * k * k]
                .iter()
                .all(|&v| v == 0.0),
            "empty group -> zeros"
        );
        // Accumulating adds the same product onto what is there.
        let base: Vec<f32> = (0..e * k * k).map(|i| i as f32 * 0.01).collect();
        let mut acc = Tensor::from_vec(base.clone(), &[e, k, k]).unwrap();
        grouped_matmul_tn_into(&mut acc, &xt, &xt, &ot, true, None).unwrap();
        let tn = tn.to_vec::<f32>().unwrap();
        for (i, v) in acc.to_vec::<f32>().unwrap().iter().enumerate() {
            assert!((v - base[i] - tn[i]).abs() < 1e-5, "element {i}");
        }
        // Without accumulate the product replaces what is there.
        let mut over = Tensor::from_vec(base.clone(), &[e, k, k]).unwrap();
        let mut ss = Tensor::from_vec(vec![0.5f32], &[1]).unwrap();
        grouped_matmul_tn_into(&mut over, &xt, &xt, &ot, false, Some(&mut ss)).unwrap();
        assert_eq!(over.to_vec::<f32>().unwrap(), tn);
        // sumsq: what was there plus the squares of the values written.
        let want = 0.5 + tn.iter().map(|x| (x * x) as f64).sum::<f64>();
        let got = ss.scalar_f32().unwrap() as f64;
        assert!((got - want).abs() < 1e-6 * want, "sumsq {got} vs {want}");
        let mut ss = Tensor::zeros(&[2], DType::F32, Device::Cpu).unwrap();
        let err = grouped_matmul_tn_into(&mut over, &xt, &xt, &ot, false, Some(&mut ss))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sumsq must be [1] f32"), "{err}");
        let mut wrong = Tensor::zeros(&[e, k, k + 1], DType::F32, Device::Cpu).unwrap();
        let err = grouped_matmul_tn_into(&mut wrong, &xt, &xt, &ot, true, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("out must be [3, 6, 6]"), "{err}");
    }

    #[test]
    fn bad_offsets_are_reported() {
        let x = Tensor::zeros(&[4, 2], DType::F32, Device::Cpu).unwrap();
        let w = Tensor::zeros(&[2, 3, 2], DType::F32, Device::Cpu).unwrap();
        let o = Tensor::from_vec(vec![0i32, 3, 2], &[3]).unwrap();
        let err = grouped_matmul(&x, &w, &o, true).unwrap_err().to_string();
        assert!(err.contains("offsets must rise"), "{err}");
    }

    /// The served experts from slots against the dispatch path (slots sorted by expert, grouped
    /// GEMMs with the activation, weighted sum per token), with tokens sharing an expert.
    #[test]
    fn moe_serve_matches_the_dispatch_path() {
        let (t, kd, f, n, e, k) = (3usize, 16usize, 12usize, 16usize, 5usize, 2usize);
        let ids: Vec<i32> = vec![4, 0, 4, 1, 2, 0]; // [k, T]: slot j·T + t
        let wts: Vec<f32> = vec![0.7, 0.4, 0.55, 0.3, 0.6, 0.45];
        for dt in [DType::F32, DType::BF16] {
            let x = Tensor::randn(&[t, kd], 1.0, 1, dt, Device::Cpu).unwrap();
            let w1 = Tensor::randn(&[e, 2 * f, kd], 0.3, 2, dt, Device::Cpu).unwrap();
            let w2 = Tensor::randn(&[e, n, f], 0.3, 3, dt, Device::Cpu).unwrap();
            let it = Tensor::from_vec(ids.clone(), &[k, t]).unwrap();
            let wt = Tensor::from_vec(wts.clone(), &[k, t]).unwrap();
            let y = moe_serve_swiglu(&x, &w1, &w2, &it, &wt)
                .unwrap()
                .cpu_f32()
                .unwrap()
                .into_owned();
            // Dispatch: slots in expert order, their tokens as gathered rows.
            let mut order: Vec<usize> = (0..k * t).collect();
            order.sort_by_key(|&s| ids[s]);
            let rows: Vec<i32> = order.iter().map(|&s| (s % t) as i32).collect();
            let mut offs = vec![0i32; e + 1];
            for &s in &order {
                offs[ids[s] as usize + 1] += 1;
            }
            for g in 0..e {
                offs[g + 1] += offs[g];
            }
            let rt = Tensor::from_vec(rows, &[k * t]).unwrap();
            let ot = Tensor::from_vec(offs, &[e + 1]).unwrap();
            let a =
                super::super::swiglu(&grouped_matmul_gather(&x, &rt, &w1, &ot).unwrap()).unwrap();
            let yp = grouped_matmul(&a, &w2, &ot, true)
                .unwrap()
                .cpu_f32()
                .unwrap()
                .into_owned();
            let mut want = vec![0f32; t * n];
            for (p, &s) in order.iter().enumerate() {
                for c in 0..n {
                    want[(s % t) * n + c] += wts[s] * yp[p * n + c];
                }
            }
            // bf16: the dispatch path also rounds each expert's output row before the sum.
            let tol = if dt == DType::F32 { 1e-5 } else { 2e-2 };
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= tol * (1.0 + b.abs()),
                    "{dt} y[{i}]: served {a} dispatch {b}"
                );
            }
        }
        let bad = Tensor::from_vec(vec![0i32, 5, 1, 2, 3, 4], &[k, t]).unwrap();
        let x = Tensor::zeros(&[t, kd], DType::F32, Device::Cpu).unwrap();
        let w1 = Tensor::zeros(&[e, 2 * f, kd], DType::F32, Device::Cpu).unwrap();
        let w2 = Tensor::zeros(&[e, n, f], DType::F32, Device::Cpu).unwrap();
        let wt = Tensor::from_vec(wts, &[k, t]).unwrap();
        let err = moe_serve_swiglu(&x, &w1, &w2, &bad, &wt)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expert id 5 outside 0..5"), "{err}");
    }
}
