//! Dispatch and combine. Slots are slot-major (slot j of token t is flat index f = j·T + t).
//!   dispatch: counts → (capacity: rank slots within each expert, first choices before second,
//!   token order or a random order (RTS); drop ranks ≥ capacity) → stable sort of kept slots by
//!   expert → perm [N] (flat slot at each expert-ordered row), offsets [E+1], and the maps
//!   pos [k,T] (row of each slot, −1 when dropped) and tok [N] (token of each row, −1 past the
//!   kept rows).
//!   combine: y[t] = Σ_j w[j,t] · y_perm[pos[j,t]] — a gather per token (deterministic, no
//!   atomics); with w = None it is the un-permute-and-sum that gives dx from dx_perm.
//! CUDA kernels: runtime/cuda/kernels/moe_dispatch.cu; CPU twins are the `Device::Cpu` arms.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::{MoeConfig, RouterKind};
use crate::runtime::cuda::{grid_1d, kernels};
use crate::runtime::ops::{self, cuda_dev, dptr, kname, rows_v8};
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

pub struct Dispatch {
    /// [N = k·T] flat slot index at each expert-ordered row (dropped slots last).
    pub perm: Tensor,
    /// [k, T] row of each slot in the permuted order, −1 when dropped.
    pub pos: Tensor,
    /// [N] token of each permuted row, −1 for rows past offsets[E].
    pub tok: Tensor,
    /// [E + 1] first row of each expert.
    pub offsets: Tensor,
    /// [E] slots routed to each expert before capacity.
    pub counts: Tensor,
    /// [E] rows each expert computes (after capacity).
    pub kept: Tensor,
}

impl Dispatch {
    /// [E] f32 slots dropped by capacity per expert (device tensor; no sync).
    pub fn dropped(&self) -> Result<Tensor> {
        let mut c = super::router::counts_f32(&self.counts)?;
        ops::add_scaled(&mut c, &super::router::counts_f32(&self.kept)?, -1.0)?;
        Ok(c)
    }
}

/// Plan the permutation for slot-major `ids` [k, T]. `rts_seed` orders tokens randomly within each
/// slot for random token selection (capacity routers with `use_rts`, training only).
pub fn dispatch(cfg: &MoeConfig, ids: &Tensor, rts_seed: Option<u64>) -> Result<Dispatch> {
    let op = "dispatch";
    ids.expect_dtype(op, DType::I32)?;
    let (k, t) = (ids.dim(0), ids.dim(1));
    let e = cfg.n_experts;
    let dev = ids.device();
    if cfg.capacity(t).is_none() && dev.is_cuda() && k * t <= SMALL_SLOTS && e < SMALL_SLOTS {
        return dispatch_small(ids, e);
    }
    let counts = ops::histogram(ids, e)?;
    let use_rts =
        matches!(cfg.router, RouterKind::Switch { use_rts: true, .. }) && rts_seed.is_some();
    let final_ids = match cfg.capacity(t) {
        None => None,
        Some(cap) => {
            // Priority order: slot-major, tokens in order or in a seeded random order π.
            let pi: Option<(Tensor, Tensor)> = if use_rts {
                let mut p: Vec<i32> = (0..t as i32).collect();
                p.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
                    rts_seed.unwrap_or(0),
                ));
                let mut inv = vec![0i32; t];
                for (i, &v) in p.iter().enumerate() {
                    inv[v as usize] = i as i32;
                }
                Some((
                    Tensor::from_slice(&p, &[t], dev)?,
                    Tensor::from_slice(&inv, &[t], dev)?,
                ))
            } else {
                None
            };
            let ids_o = match &pi {
                Some((p, _)) => permute_slots(ids, p)?,
                None => ids.try_clone()?,
            };
            let perm_o = ops::argsort_stable(&ids_o, e)?;
            let offs_o = offsets_from_counts(&counts)?;
            Some(capacity_mask(
                &ids_o,
                &perm_o,
                &offs_o,
                pi.as_ref().map(|(_, inv)| inv),
                cap,
                k,
                t,
            )?)
        }
    };
    let sort_ids = final_ids.as_ref().unwrap_or(ids);
    let perm = ops::argsort_stable(sort_ids, e)?;
    let kept = match &final_ids {
        Some(f) => ops::histogram(f, e)?,
        None => counts.try_clone()?,
    };
    let offsets = offsets_from_counts(&kept)?;
    let (pos, tok) = perm_maps(&perm, &offsets, k, t)?;
    Ok(Dispatch {
        perm,
        pos,
        tok,
        offsets,
        counts,
        kept,
    })
}

/// Most slots (k·T) and experts the one-block dropless plan takes (decode-sized batches).
const SMALL_SLOTS: usize = 1024;

/// The dropless plan in one kernel launch (CUDA, k·T <= 1024): the same tensors as histogram +
/// argsort_stable + offsets_from_counts + perm_maps (the CPU path is its twin).
fn dispatch_small(ids: &Tensor, e: usize) -> Result<Dispatch> {
    let (k, t) = (ids.dim(0), ids.dim(1));
    let n = k * t;
    let dev = ids.device();
    let counts = Tensor::uninit(&[e], DType::I32, dev)?;
    let offsets = Tensor::uninit(&[e + 1], DType::I32, dev)?;
    let perm = Tensor::uninit(&[n], DType::I32, dev)?;
    let pos = Tensor::uninit(&[k, t], DType::I32, dev)?;
    let tok = Tensor::uninit(&[n], DType::I32, dev)?;
    cuda_dev(ids)?
        .launch(
            &kernels::MOE_DISPATCH,
            "dispatch_small",
            (1, 1, 1),
            (256, 1, 1),
            (4 * (n + e + 1)) as u32,
        )?
        .ptr(dptr(&counts))
        .ptr(dptr(&offsets))
        .ptr(dptr(&perm))
        .ptr(dptr(&pos))
        .ptr(dptr(&tok))
        .ptr(dptr(ids))
        .usize_as_i32(e)?
        .usize_as_i32(t)?
        .usize_as_i32(n)?
        .run()?;
    Ok(Dispatch {
        perm,
        pos,
        tok,
        offsets,
        kept: counts.try_clone()?,
        counts,
    })
}

/// [E+1] exclusive prefix sums of counts [E].
pub(crate) fn offsets_from_counts(counts: &Tensor) -> Result<Tensor> {
    let e = counts.numel();
    match counts.device() {
        Device::Cpu => {
            let c = counts.as_slice::<i32>()?;
            let mut o = vec![0i32; e + 1];
            for i in 0..e {
                o[i + 1] = o[i] + c[i];
            }
            Tensor::from_vec(o, &[e + 1])
        }
        Device::Cuda(_) => {
            let o = Tensor::uninit(&[e + 1], DType::I32, counts.device())?;
            cuda_dev(counts)?
                .launch(
                    &kernels::MOE_DISPATCH,
                    "offsets_from_counts",
                    (1, 1, 1),
                    (1024, 1, 1),
                    0,
                )?
                .ptr(dptr(&o))
                .ptr(dptr(counts))
                .usize_as_i32(e)?
                .run()?;
            Ok(o)
        }
    }
}

/// ids_o[j·T + π(t)] = ids[j·T + t].
fn permute_slots(ids: &Tensor, pi: &Tensor) -> Result<Tensor> {
    let (k, t) = (ids.dim(0), ids.dim(1));
    match ids.device() {
        Device::Cpu => {
            let (iv, p) = (ids.as_slice::<i32>()?, pi.as_slice::<i32>()?);
            let mut o = vec![0i32; k * t];
            for j in 0..k {
                for ti in 0..t {
                    o[j * t + p[ti] as usize] = iv[j * t + ti];
                }
            }
            Tensor::from_vec(o, &[k, t])
        }
        Device::Cuda(_) => {
            let o = Tensor::uninit(&[k, t], DType::I32, ids.device())?;
            let n = k * t;
            cuda_dev(ids)?
                .launch(
                    &kernels::MOE_DISPATCH,
                    "permute_slots",
                    (grid_1d(n, 256), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&o))
                .ptr(dptr(ids))
                .ptr(dptr(pi))
                .usize_as_i32(t)?
                .usize_as_i32(n)?
                .run()?;
            Ok(o)
        }
    }
}

/// ids with the slots past capacity replaced by −1, in the original (unpermuted) slot order.
fn capacity_mask(
    ids_o: &Tensor,
    perm_o: &Tensor,
    offs_o: &Tensor,
    pi_inv: Option<&Tensor>,
    cap: usize,
    k: usize,
    t: usize,
) -> Result<Tensor> {
    let n = k * t;
    match ids_o.device() {
        Device::Cpu => {
            let (iv, pv, ov) = (
                ids_o.as_slice::<i32>()?,
                perm_o.as_slice::<i32>()?,
                offs_o.as_slice::<i32>()?,
            );
            let inv = match pi_inv {
                Some(x) => Some(x.as_slice::<i32>()?),
                None => None,
            };
            let mut out = vec![-1i32; n];
            for (p, &o) in pv.iter().enumerate() {
                let e = iv[o as usize];
                if e < 0 {
                    continue;
                }
                let rank = p as i32 - ov[e as usize];
                let o = o as usize;
                let f = match inv {
                    Some(inv) => (o / t) * t + inv[o % t] as usize,
                    None => o,
                };
                out[f] = if (rank as usize) < cap { e } else { -1 };
            }
            Tensor::from_vec(out, &[k, t])
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&[k, t], DType::I32, ids_o.device())?;
            cuda_dev(ids_o)?
                .launch(
                    &kernels::MOE_DISPATCH,
                    "capacity_mask",
                    (grid_1d(n, 256), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(ids_o))
                .ptr(dptr(perm_o))
                .ptr(dptr(offs_o))
                .ptr(pi_inv.map(dptr).unwrap_or(0))
                .usize_as_i32(cap.min(i32::MAX as usize))?
                .usize_as_i32(t)?
                .usize_as_i32(n)?
                .run()?;
            Ok(out)
        }
    }
}

/// (pos [k,T], tok [N]) from perm and the kept rows offsets[E].
fn perm_maps(perm: &Tensor, offsets: &Tensor, k: usize, t: usize) -> Result<(Tensor, Tensor)> {
    let n = k * t;
    let e = offsets.numel() - 1;
    match perm.device() {
        Device::Cpu => {
            let (pv, ov) = (perm.as_slice::<i32>()?, offsets.as_slice::<i32>()?);
            let valid = ov[e] as usize;
            let mut pos = vec![-1i32; n];
            let mut tok = vec![-1i32; n];
            for (p, &f) in pv.iter().enumerate() {
                if p < valid {
                    pos[f as usize] = p as i32;
                    tok[p] = f % t as i32;
                }
            }
            Ok((
                Tensor::from_vec(pos, &[k, t])?,
                Tensor::from_vec(tok, &[n])?,
            ))
        }
        Device::Cuda(_) => {
            let pos = Tensor::uninit(&[k, t], DType::I32, perm.device())?;
            let tok = Tensor::uninit(&[n], DType::I32, perm.device())?;
            if n > 0 {
                cuda_dev(perm)?
                    .launch(
                        &kernels::MOE_DISPATCH,
                        "perm_maps",
                        (grid_1d(n, 256), 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&pos))
                    .ptr(dptr(&tok))
                    .ptr(dptr(perm))
                    .ptr(dptr(offsets))
                    .usize_as_i32(e)?
                    .usize_as_i32(t)?
                    .usize_as_i32(n)?
                    .run()?;
            }
            Ok((pos, tok))
        }
    }
}

/// y [T, d] = Σ_j w[j,t] · y_perm[pos[j,t]] (w = 1 when None; dropped slots contribute 0).
pub fn combine(y_perm: &Tensor, pos: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    let op = "combine";
    y_perm.expect_float(op)?;
    let (k, t) = (pos.dim(0), pos.dim(1));
    let d = y_perm.dim(1);
    if y_perm.dim(0) != k * t {
        return Err(Error::shape(
            op,
            format!(
                "y_perm {:?} does not have k·T = {} rows",
                y_perm.shape(),
                k * t
            ),
        ));
    }
    match y_perm.device() {
        Device::Cpu => {
            let yv = y_perm.cpu_f32()?;
            let pv = pos.as_slice::<i32>()?;
            let wv = match w {
                Some(w) => Some(w.as_slice::<f32>()?),
                None => None,
            };
            let mut out = vec![0f32; t * d];
            use rayon::prelude::*;
            out.par_chunks_mut(d.max(1))
                .enumerate()
                .for_each(|(ti, o)| {
                    for j in 0..k {
                        let p = pv[j * t + ti];
                        if p < 0 {
                            continue;
                        }
                        let s = wv.map_or(1.0, |w| w[j * t + ti]);
                        for (oc, &yc) in o.iter_mut().zip(&yv[p as usize * d..(p as usize + 1) * d])
                        {
                            *oc += s * yc;
                        }
                    }
                });
            cpu_from_f32(out, &[t, d], y_perm.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&[t, d], y_perm.dtype(), y_perm.device())?;
            let n = t * d;
            if n > 0 {
                let (name, units) = if rows_v8(d, &[&out, y_perm]) {
                    (kname("combine_v8", y_perm), n / 8)
                } else {
                    (kname("combine", y_perm), n)
                };
                cuda_dev(y_perm)?
                    .launch(
                        &kernels::MOE_DISPATCH,
                        &name,
                        (grid_1d(units, 256), 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&out))
                    .ptr(dptr(y_perm))
                    .ptr(dptr(pos))
                    .ptr(w.map(dptr).unwrap_or(0))
                    .usize_as_i32(t)?
                    .usize_as_i32(k)?
                    .usize_as_i32(d)?
                    .run()?;
            }
            Ok(out)
        }
    }
}

/// Backward of `combine` with weights: (dy_perm [N,d] like y_perm, dw [k,T] f32).
/// dy_perm[p] = w[perm[p]] · dy[tok[p]]; dw[j,t] = ⟨dy[t], y_perm[pos[j,t]]⟩.
pub fn combine_backward(
    dy: &Tensor,
    y_perm: &Tensor,
    d: &Dispatch,
    w: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (k, t) = (d.pos.dim(0), d.pos.dim(1));
    let dm = dy.dim(1);
    let n = k * t;
    match dy.device() {
        Device::Cpu => {
            let (dyv, yv) = (dy.cpu_f32()?, y_perm.cpu_f32()?);
            let (perm, tok, pos, wv) = (
                d.perm.as_slice::<i32>()?,
                d.tok.as_slice::<i32>()?,
                d.pos.as_slice::<i32>()?,
                w.as_slice::<f32>()?,
            );
            let mut dyp = vec![0f32; n * dm];
            for p in 0..n {
                let ti = tok[p];
                if ti < 0 {
                    continue;
                }
                let s = wv[perm[p] as usize];
                for c in 0..dm {
                    dyp[p * dm + c] = s * dyv[ti as usize * dm + c];
                }
            }
            let mut dw = vec![0f32; n];
            for f in 0..n {
                let p = pos[f];
                if p < 0 {
                    continue;
                }
                let ti = f % t;
                dw[f] = (0..dm)
                    .map(|c| dyv[ti * dm + c] * yv[p as usize * dm + c])
                    .sum();
            }
            Ok((
                cpu_from_f32(dyp, &[n, dm], dy.dtype())?,
                Tensor::from_vec(dw, &[k, t])?,
            ))
        }
        Device::Cuda(_) => {
            let dev = cuda_dev(dy)?;
            let dyp = Tensor::uninit(&[n, dm], dy.dtype(), dy.device())?;
            if n * dm == 0 {
                return Ok((dyp, Tensor::zeros(&[k, t], DType::F32, dy.device())?));
            }
            if rows_v8(dm, &[&dyp, dy, y_perm]) {
                // One pass, one warp per expert-order row: dy read once for both outputs;
                // dropped slots have no row, so dw starts zeroed.
                let dw = Tensor::zeros(&[k, t], DType::F32, dy.device())?;
                dev.launch(
                    &kernels::MOE_DISPATCH,
                    &kname("uncombine_dw_v8", dy),
                    (grid_1d(n * 32, 256), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&dyp))
                .ptr(dptr(&dw))
                .ptr(dptr(dy))
                .ptr(dptr(y_perm))
                .ptr(dptr(&d.perm))
                .ptr(dptr(&d.tok))
                .ptr(dptr(w))
                .usize_as_i32(n)?
                .usize_as_i32(dm)?
                .run()?;
                return Ok((dyp, dw));
            }
            // Unaligned rows: the scatter (8-wide where dy allows), then one warp per slot.
            let dw = Tensor::uninit(&[k, t], DType::F32, dy.device())?;
            let (name, units) = if rows_v8(dm, &[&dyp, dy]) {
                (kname("uncombine_v8", dy), n * dm / 8)
            } else {
                (kname("uncombine", dy), n * dm)
            };
            dev.launch(
                &kernels::MOE_DISPATCH,
                &name,
                (grid_1d(units, 256), 1, 1),
                (256, 1, 1),
                0,
            )?
            .ptr(dptr(&dyp))
            .ptr(dptr(dy))
            .ptr(dptr(&d.perm))
            .ptr(dptr(&d.tok))
            .ptr(dptr(w))
            .usize_as_i32(n)?
            .usize_as_i32(dm)?
            .run()?;
            dev.launch(
                &kernels::MOE_DISPATCH,
                &kname("combine_dw", dy),
                (grid_1d(n * 32, 256), 1, 1),
                (256, 1, 1),
                0,
            )?
            .ptr(dptr(&dw))
            .ptr(dptr(dy))
            .ptr(dptr(y_perm))
            .ptr(dptr(&d.pos))
            .usize_as_i32(t)?
            .usize_as_i32(n)?
            .usize_as_i32(dm)?
            .run()?;
            Ok((dyp, dw))
        }
    }
}

/// h [N, C] += b[e] on the rows of expert e (rows past offsets[E] untouched).
pub(crate) fn add_group_bias(h: &Tensor, b: &Tensor, offsets: &Tensor) -> Result<Tensor> {
    let (n, c) = (h.dim(0), h.dim(1));
    let e = offsets.numel() - 1;
    match h.device() {
        Device::Cpu => {
            let (hv, bv, ov) = (h.cpu_f32()?, b.cpu_f32()?, offsets.as_slice::<i32>()?);
            let mut out = hv.into_owned();
            for g in 0..e {
                for r in ov[g] as usize..ov[g + 1] as usize {
                    for j in 0..c {
                        out[r * c + j] += bv[g * c + j];
                    }
                }
            }
            cpu_from_f32(out, &[n, c], h.dtype())
        }
        Device::Cuda(_) => {
            let out = h.try_clone()?;
            if n * c > 0 {
                cuda_dev(h)?
                    .launch(
                        &kernels::MOE_DISPATCH,
                        &kname("add_group_bias", h),
                        (grid_1d(n * c, 256), 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&out))
                    .ptr(dptr(b))
                    .ptr(dptr(offsets))
                    .usize_as_i32(e)?
                    .usize_as_i32(n)?
                    .usize_as_i32(c)?
                    .run()?;
            }
            Ok(out)
        }
    }
}

/// db [E, C] f32 = per expert, the sum of its rows of dh [N, C].
pub(crate) fn group_bias_grad(dh: &Tensor, offsets: &Tensor) -> Result<Tensor> {
    let c = dh.dim(1);
    let e = offsets.numel() - 1;
    match dh.device() {
        Device::Cpu => {
            let (hv, ov) = (dh.cpu_f32()?, offsets.as_slice::<i32>()?);
            let mut out = vec![0f32; e * c];
            for g in 0..e {
                for r in ov[g] as usize..ov[g + 1] as usize {
                    for j in 0..c {
                        out[g * c + j] += hv[r * c + j];
                    }
                }
            }
            Tensor::from_vec(out, &[e, c])
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&[e, c], DType::F32, dh.device())?;
            if e * c > 0 {
                cuda_dev(dh)?
                    .launch(
                        &kernels::MOE_DISPATCH,
                        &kname("group_bias_grad", dh),
                        (c.div_ceil(32) as u32, e as u32, 1),
                        (32, 8, 1),
                        0,
                    )?
                    .ptr(dptr(&out))
                    .ptr(dptr(dh))
                    .ptr(dptr(offsets))
                    .usize_as_i32(c)?
                    .run()?;
            }
            Ok(out)
        }
    }
}
