//! Softmax over the last dim, optionally scaled and causally masked (attention scores), its
//! backward, and log-softmax. Kernel: `cuda/kernels/softmax.cu`, one block per row, three passes
//! over a row that stays in L1 (max, sum, write). Bytes: rows × cols × (read + write).

use rayon::prelude::*;

use super::{cuda_dev, dptr, kname, same_device};
use crate::runtime::cuda::kernels;
use crate::runtime::{cpu_from_f32, Device, Error, Result, Tensor};

/// softmax(scale · x) along the last dim. With `causal = Some((q_len, offset))`, row r of the
/// [.., M, N] scores is query position p = `offset + r % q_len` and keys after it are masked
/// (rows of several heads sharing a KV head can be stacked: M = group × q_len). With a causal
/// mask, `window = Some(w)` also masks keys j <= p − w (sliding-window attention: the w most
/// recent positions, the query's own included).
#[derive(Copy, Clone, Debug)]
pub struct Softmax {
    pub scale: f32,
    pub causal: Option<(usize, usize)>,
    pub window: Option<usize>,
}

impl Default for Softmax {
    fn default() -> Self {
        Softmax {
            scale: 1.0,
            causal: None,
            window: None,
        }
    }
}

fn block_for(cols: usize) -> u32 {
    (cols.div_ceil(4).next_power_of_two()).clamp(32, 1024) as u32
}

/// Threads per row for the register-resident `_v8` softmax kernels (4 chunks of 8 elements per
/// thread), or None when they do not apply (cols not a multiple of 8, misaligned, or more than
/// `max_threads` × 32: the backward's 80 registers per thread allow 512 threads, not 1024).
fn v8_block(cols: usize, ts: &[&Tensor], max_threads: usize) -> Option<u32> {
    if !super::rows_v8(cols, ts) || cols > 32 * max_threads {
        return None;
    }
    Some(
        (cols / 8)
            .div_ceil(4)
            .next_multiple_of(32)
            .clamp(32, max_threads) as u32,
    )
}

pub fn softmax(x: &Tensor, spec: Softmax) -> Result<Tensor> {
    x.expect_float("softmax")?;
    let (rows, cols) = x.rows_cols();
    let (q_len, offset) = spec.causal.unwrap_or((0, 0));
    if spec.causal.is_some() && q_len == 0 {
        return Err(Error::Invalid(
            "softmax: causal mask needs q_len > 0".into(),
        ));
    }
    if spec.window.is_some() && spec.causal.is_none() || spec.window == Some(0) {
        return Err(Error::Invalid(
            "softmax: a sliding window needs a causal mask and a width > 0".into(),
        ));
    }
    let window = spec.window.unwrap_or(0);
    match x.device() {
        Device::Cpu => {
            let v = x.cpu_f32()?;
            let mut out = vec![0.0f32; rows * cols];
            if cols > 0 {
                out.par_chunks_mut(cols)
                    .zip(v.par_chunks(cols))
                    .enumerate()
                    .for_each(|(r, (o, xr))| {
                        let limit = if q_len > 0 {
                            (offset + r % q_len + 1).min(cols)
                        } else {
                            cols
                        };
                        let first = if window > 0 {
                            (offset + r % q_len + 1).saturating_sub(window).min(limit)
                        } else {
                            0
                        };
                        let mut m = f32::NEG_INFINITY;
                        for &xi in &xr[first..limit] {
                            m = m.max(xi * spec.scale);
                        }
                        let mut s = 0.0f32;
                        for (oi, &xi) in o[first..limit].iter_mut().zip(&xr[first..limit]) {
                            *oi = (xi * spec.scale - m).exp();
                            s += *oi;
                        }
                        let inv = 1.0 / s;
                        o[first..limit].iter_mut().for_each(|oi| *oi *= inv);
                        o[..first].iter_mut().for_each(|oi| *oi = 0.0);
                        o[limit..].iter_mut().for_each(|oi| *oi = 0.0);
                    });
            }
            cpu_from_f32(out, x.shape(), x.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
            if rows == 0 {
                return Ok(out);
            }
            let (name, block) = match v8_block(cols, &[&out, x], 1024) {
                Some(b) => (kname("softmax_fwd_v8", x), b),
                None => (kname("softmax_fwd", x), block_for(cols)),
            };
            cuda_dev(x)?
                .launch(
                    &kernels::SOFTMAX,
                    &name,
                    (rows as u32, 1, 1),
                    (block, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(x))
                .usize_as_i32(cols)?
                .f32(spec.scale)
                .usize_as_i32(q_len)?
                .usize_as_i32(offset)?
                .usize_as_i32(window)?
                .run()?;
            Ok(out)
        }
    }
}

/// dx = scale · y ⊙ (dy − Σ dy ⊙ y) for y = softmax(scale · x).
pub fn softmax_backward(y: &Tensor, dy: &Tensor, scale: f32) -> Result<Tensor> {
    same_device("softmax_backward", &[y, dy])?;
    y.expect_float("softmax_backward")?;
    if y.shape() != dy.shape() || y.dtype() != dy.dtype() {
        return Err(Error::shape(
            "softmax_backward",
            format!("y {:?} vs dy {:?}", y.shape(), dy.shape()),
        ));
    }
    let (rows, cols) = y.rows_cols();
    match y.device() {
        Device::Cpu => {
            let (yv, dv) = (y.cpu_f32()?, dy.cpu_f32()?);
            let mut out = vec![0.0f32; rows * cols];
            if cols > 0 {
                out.par_chunks_mut(cols)
                    .zip(yv.par_chunks(cols).zip(dv.par_chunks(cols)))
                    .for_each(|(o, (yr, dr))| {
                        let dot: f32 = yr.iter().zip(dr).map(|(a, b)| a * b).sum();
                        for i in 0..cols {
                            o[i] = scale * yr[i] * (dr[i] - dot);
                        }
                    });
            }
            cpu_from_f32(out, y.shape(), y.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(y.shape(), y.dtype(), y.device())?;
            if rows == 0 {
                return Ok(out);
            }
            let (name, block) = match v8_block(cols, &[&out, y, dy], 512) {
                Some(b) => (kname("softmax_bwd_v8", y), b),
                None => (kname("softmax_bwd", y), block_for(cols)),
            };
            cuda_dev(y)?
                .launch(
                    &kernels::SOFTMAX,
                    &name,
                    (rows as u32, 1, 1),
                    (block, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(y))
                .ptr(dptr(dy))
                .usize_as_i32(cols)?
                .f32(scale)
                .run()?;
            Ok(out)
        }
    }
}

/// log softmax(x) along the last dim.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    x.expect_float("log_softmax")?;
    let (rows, cols) = x.rows_cols();
    match x.device() {
        Device::Cpu => {
            let v = x.cpu_f32()?;
            let mut out = vec![0.0f32; rows * cols];
            if cols > 0 {
                out.par_chunks_mut(cols)
                    .zip(v.par_chunks(cols))
                    .for_each(|(o, xr)| {
                        let m = xr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                        let lse = m + xr.iter().map(|&xi| (xi - m).exp()).sum::<f32>().ln();
                        for (oi, &xi) in o.iter_mut().zip(xr) {
                            *oi = xi - lse;
                        }
                    });
            }
            cpu_from_f32(out, x.shape(), x.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
            if rows == 0 {
                return Ok(out);
            }
            cuda_dev(x)?
                .launch(
                    &kernels::SOFTMAX,
                    &kname("log_softmax_fwd", x),
                    (rows as u32, 1, 1),
                    (block_for(cols), 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(x))
                .usize_as_i32(cols)?
                .run()?;
            Ok(out)
        }
    }
}
