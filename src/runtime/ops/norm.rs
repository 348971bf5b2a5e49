//! RMSNorm: y = x · rstd · w with rstd = 1/sqrt(mean(x²) + eps), per row of the last dim.
//! Backward reuses the forward's `rstd`. Kernel: `cuda/kernels/norm.cu`.
//! Forward bytes: rows × cols × (read + write) + cols (weights); backward adds dy and dx.

use rayon::prelude::*;

use super::{cuda_dev, dptr, kname, same_device};
use crate::runtime::cuda::kernels;
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

fn check(op: &'static str, x: &Tensor, w: &Tensor) -> Result<(usize, usize)> {
    same_device(op, &[x, w])?;
    x.expect_float(op)?;
    let (rows, cols) = x.rows_cols();
    if w.numel() != cols || w.dtype() != x.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "weight {:?} {} does not fit x {:?} {}",
                w.shape(),
                w.dtype(),
                x.shape(),
                x.dtype()
            ),
        ));
    }
    Ok((rows, cols))
}

fn block_for(cols: usize) -> u32 {
    (cols.div_ceil(4).next_power_of_two()).clamp(32, 1024) as u32
}

/// Threads per row of the register-resident `_v8` norm kernels (one 8-element chunk per thread
/// up to `max_threads`, then up to 4 per thread), or None when they do not apply. `max_threads`
/// keeps threads × registers within the SM's 64K (the backward holds 4 arrays of 4 chunks).
fn v8_block(cols: usize, ts: &[&Tensor], max_threads: usize) -> Option<u32> {
    if !super::rows_v8(cols, ts) || cols > 32 * max_threads {
        return None;
    }
    Some((cols / 8).next_multiple_of(32).clamp(32, max_threads) as u32)
}

/// (y, rstd): y like x, rstd [rows] f32 (kept for the backward).
pub fn rmsnorm(x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = check("rmsnorm", x, w)?;
    let rshape = &x.shape()[..x.rank().saturating_sub(1)];
    match x.device() {
        Device::Cpu => {
            let (xv, wv) = (x.cpu_f32()?, w.cpu_f32()?);
            let mut y = vec![0.0f32; rows * cols];
            let mut rstd = vec![0.0f32; rows];
            if cols > 0 {
                y.par_chunks_mut(cols)
                    .zip(rstd.par_iter_mut())
                    .zip(xv.par_chunks(cols))
                    .for_each(|((yr, rs), xr)| {
                        let ms =
                            xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / cols as f64;
                        let r = (1.0 / (ms + eps as f64).sqrt()) as f32;
                        *rs = r;
                        for ((yi, &xi), &wi) in yr.iter_mut().zip(xr).zip(wv.iter()) {
                            *yi = xi * r * wi;
                        }
                    });
            }
            Ok((
                cpu_from_f32(y, x.shape(), x.dtype())?,
                Tensor::from_vec(rstd, rshape)?,
            ))
        }
        Device::Cuda(_) => {
            let y = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
            let rstd = Tensor::uninit(rshape, DType::F32, x.device())?;
            if rows > 0 && cols <= 256 && super::rows_v8(cols, &[&y, x, w]) {
                // Short rows (per-head q/k norms): one warp per row, 8 rows per block.
                cuda_dev(x)?
                    .launch(
                        &kernels::NORM,
                        &kname("rmsnorm_fwd_w8", x),
                        (rows.div_ceil(8) as u32, 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&y))
                    .ptr(dptr(&rstd))
                    .ptr(dptr(x))
                    .ptr(dptr(w))
                    .usize_as_i32(rows)?
                    .usize_as_i32(cols)?
                    .f32(eps)
                    .run()?;
            } else if rows > 0 {
                let (name, block) = match v8_block(cols, &[&y, x, w], 1024) {
                    Some(b) if 8 * b as usize >= cols => (kname("rmsnorm_fwd_v8c1", x), b),
                    Some(b) => (kname("rmsnorm_fwd_v8", x), b),
                    None => (kname("rmsnorm_fwd", x), block_for(cols)),
                };
                cuda_dev(x)?
                    .launch(&kernels::NORM, &name, (rows as u32, 1, 1), (block, 1, 1), 0)?
                    .ptr(dptr(&y))
                    .ptr(dptr(&rstd))
                    .ptr(dptr(x))
                    .ptr(dptr(w))
                    .usize_as_i32(cols)?
                    .f32(eps)
                    .run()?;
            }
            Ok((y, rstd))
        }
    }
}

/// Residual add and RMSNorm in one pass (inference): x += a, then returns rmsnorm(x, w) (no rstd).
/// The CPU twin is `add_assign` followed by `rmsnorm`.
pub fn add_rmsnorm(x: &mut Tensor, a: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let op = "add_rmsnorm";
    let (rows, cols) = check(op, x, w)?;
    same_device(op, &[x, a])?;
    if a.shape() != x.shape() || a.dtype() != x.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "a {:?} {} does not match x {:?} {}",
                a.shape(),
                a.dtype(),
                x.shape(),
                x.dtype()
            ),
        ));
    }
    match x.device() {
        Device::Cpu => {
            super::add_assign(x, a)?;
            Ok(rmsnorm(x, w, eps)?.0)
        }
        Device::Cuda(_) => {
            let y = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
            if rows > 0 {
                cuda_dev(x)?
                    .launch(
                        &kernels::NORM,
                        &kname("add_rmsnorm", x),
                        (rows as u32, 1, 1),
                        (block_for(cols), 1, 1),
                        0,
                    )?
                    .pdl()
                    .ptr(dptr(&y))
                    .ptr(dptr(x))
                    .ptr(dptr(a))
                    .ptr(dptr(w))
                    .usize_as_i32(cols)?
                    .f32(eps)
                    .run()?;
            }
            Ok(y)
        }
    }
}

/// The shape checks of a residual add + RMSNorm folded into another op (the `add_rmsnorm_*`
/// ops): a like x, the norm weight of x's dtype.
pub(crate) fn check_folded_addnorm(
    op: &'static str,
    x: &Tensor,
    a: &Tensor,
    g: &Tensor,
) -> Result<()> {
    if a.shape() != x.shape() || a.dtype() != x.dtype() || g.dtype() != x.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "a {:?} {} and norm weight {}: x is {:?} {}",
                a.shape(),
                a.dtype(),
                g.dtype(),
                x.shape(),
                x.dtype()
            ),
        ));
    }
    Ok(())
}

/// (dx like x, dw [cols] f32) given dy and the forward's x, w, rstd.
pub fn rmsnorm_backward(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (dx, dw) = backward(x, w, rstd, dy, None)?;
    Ok((dx.expect("dx without acc"), dw))
}

/// `rmsnorm_backward` whose dx is added into `acc` (the residual stream's gradient: one pass
/// instead of dx written, then read and added); returns dw. Each element of `acc` becomes
/// acc + dx rounded once to its dtype.
pub fn rmsnorm_backward_acc(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    acc: &mut Tensor,
) -> Result<Tensor> {
    if acc.shape() != x.shape() || acc.dtype() != x.dtype() || acc.device() != x.device() {
        return Err(Error::shape(
            "rmsnorm_backward_acc",
            format!(
                "acc {:?} {} does not fit x {:?} {}",
                acc.shape(),
                acc.dtype(),
                x.shape(),
                x.dtype()
            ),
        ));
    }
    Ok(backward(x, w, rstd, dy, Some(acc))?.1)
}

fn backward(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    acc: Option<&mut Tensor>,
) -> Result<(Option<Tensor>, Tensor)> {
    let op = "rmsnorm_backward";
    let (rows, cols) = check(op, x, w)?;
    same_device(op, &[x, rstd, dy])?;
    rstd.expect_dtype(op, DType::F32)?;
    if rstd.numel() != rows || dy.shape() != x.shape() || dy.dtype() != x.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "rstd {:?} / dy {:?} do not fit x {:?}",
                rstd.shape(),
                dy.shape(),
                x.shape()
            ),
        ));
    }
    match x.device() {
        Device::Cpu => {
            let (xv, wv, rv, dv) = (x.cpu_f32()?, w.cpu_f32()?, rstd.cpu_f32()?, dy.cpu_f32()?);
            let mut dx = vec![0.0f32; rows * cols];
            if cols == 0 {
                let dx = match acc {
                    Some(_) => None,
                    None => Some(cpu_from_f32(dx, x.shape(), x.dtype())?),
                };
                return Ok((dx, Tensor::zeros(&[0], DType::F32, Device::Cpu)?));
            }
            // dx = rstd·(w⊙dy) − x·rstd³·mean(x ⊙ w ⊙ dy); dw = Σ_rows dy ⊙ x ⊙ rstd.
            // dw is summed per fixed group of rows, then the groups in order: the same bits for
            // any thread count or scheduling (rayon's fold/reduce split points are not fixed).
            const GROUP: usize = 32;
            let partials: Vec<Vec<f32>> = dx
                .par_chunks_mut(GROUP * cols)
                .zip(
                    xv.par_chunks(GROUP * cols)
                        .zip(dv.par_chunks(GROUP * cols))
                        .zip(rv.par_chunks(GROUP)),
                )
                .map(|(dxg, ((xg, dg), rg))| {
                    let mut dw = vec![0.0f32; cols];
                    for (((dxr, xr), dr), &r) in dxg
                        .chunks_mut(cols)
                        .zip(xg.chunks(cols))
                        .zip(dg.chunks(cols))
                        .zip(rg)
                    {
                        let dot: f32 =
                            (0..cols).map(|i| xr[i] * wv[i] * dr[i]).sum::<f32>() / cols as f32;
                        for i in 0..cols {
                            dxr[i] = r * wv[i] * dr[i] - xr[i] * r * r * r * dot;
                            dw[i] += dr[i] * xr[i] * r;
                        }
                    }
                    dw
                })
                .collect();
            let mut dw = vec![0.0f32; cols];
            for p in &partials {
                dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            let dw = Tensor::from_vec(dw, &[cols])?;
            match acc {
                Some(a) => {
                    let mut av = a.cpu_f32()?.into_owned();
                    av.iter_mut().zip(&dx).for_each(|(a, d)| *a += d);
                    *a = cpu_from_f32(av, x.shape(), x.dtype())?;
                    Ok((None, dw))
                }
                None => Ok((Some(cpu_from_f32(dx, x.shape(), x.dtype())?), dw)),
            }
        }
        Device::Cuda(_) => {
            let dev = cuda_dev(x)?;
            let accumulate = acc.is_some();
            let mut own = None;
            let dx: &Tensor = match acc {
                Some(a) => a,
                None => own.insert(Tensor::uninit(x.shape(), x.dtype(), x.device())?),
            };
            // Each block walks rows blockIdx.x, +grid, ... and writes one partial dw row; the
            // partials are summed by sum_rows: deterministic, no atomics.
            // Short rows (per-head q/k norms): one warp per row, 8 warps per block, enough
            // blocks for 64 warps per SM, one partial row per warp.
            // Rows of at most 2048 with one 16-byte chunk per thread: a light kernel (56
            // registers), four resident blocks per SM so that several rows are in flight on each.
            let warp_rows = cols <= 256 && super::rows_v8(cols, &[dx, x, w, dy]);
            let one_chunk = !warp_rows && cols <= 8 * 256 && super::rows_v8(cols, &[dx, x, w, dy]);
            let (blocks, partial_rows) = if warp_rows {
                let b = rows.div_ceil(8 * 4).clamp(1, 8 * dev.sm_count());
                (b, b * 8)
            } else {
                let per_sm = if one_chunk { 4 } else { 2 };
                let b = rows.clamp(1, per_sm * dev.sm_count());
                (b, b)
            };
            let partial = Tensor::uninit(&[partial_rows, cols], DType::F32, x.device())?;
            if rows > 0 {
                let (name, block, smem) = if warp_rows {
                    (kname("rmsnorm_bwd_w8", x), 256, 0)
                } else {
                    match v8_block(cols, &[dx, &partial, x, w, dy], 256) {
                        Some(b) if one_chunk => (kname("rmsnorm_bwd_v8c1", x), b, 0),
                        Some(b) => (kname("rmsnorm_bwd_v8", x), b, 0),
                        None => (kname("rmsnorm_bwd", x), block_for(cols), (cols * 4) as u32),
                    }
                };
                dev.launch(
                    &kernels::NORM,
                    &name,
                    (blocks as u32, 1, 1),
                    (block, 1, 1),
                    smem,
                )?
                .ptr(dptr(dx))
                .ptr(dptr(&partial))
                .ptr(dptr(x))
                .ptr(dptr(w))
                .ptr(dptr(rstd))
                .ptr(dptr(dy))
                .usize_as_i32(rows)?
                .usize_as_i32(cols)?
                .i32(accumulate as i32)
                .run()?;
            } else {
                return Ok((own, Tensor::zeros(&[cols], DType::F32, x.device())?));
            }
            let dw = super::sum_rows(&partial)?;
            Ok((own, dw))
        }
    }
}
