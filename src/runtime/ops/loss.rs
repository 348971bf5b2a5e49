//! Cross-entropy over the vocabulary, per token: loss[t] = logsumexp(logits[t]) − logits[t, y[t]],
//! 0 where y[t] == ignore_index. The backward is (softmax − onehot) · scale from the saved lse.
//! Kernels: `cuda/kernels/loss.cu`, one block per row. Bytes: forward T·V·sizeof(T) (two passes
//! over a row, the second from L2), backward T·V·(read + write).

use rayon::prelude::*;

use super::{cuda_dev, dptr, kname, same_device};
use crate::runtime::cuda::kernels;
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

fn check(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    same_device(op, &[logits, targets])?;
    logits.expect_float(op)?;
    targets.expect_dtype(op, DType::I32)?;
    let (rows, v) = logits.rows_cols();
    if targets.numel() != rows {
        return Err(Error::shape(
            op,
            format!(
                "{} targets for {rows} rows of logits {:?}",
                targets.numel(),
                logits.shape()
            ),
        ));
    }
    Ok((rows, v))
}

/// (loss [T] f32, lse [T] f32). Targets outside 0..V other than `ignore_index` are an error on
/// the CPU; on CUDA they are treated as ignored.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i32,
) -> Result<(Tensor, Tensor)> {
    let op = "cross_entropy";
    let (rows, v) = check(op, logits, targets)?;
    match logits.device() {
        Device::Cpu => {
            let (lv, tv) = (logits.cpu_f32()?, targets.as_slice::<i32>()?);
            if let Some(&bad) = tv
                .iter()
                .find(|&&y| y != ignore_index && (y < 0 || y as usize >= v))
            {
                return Err(Error::Invalid(format!(
                    "{op}: target {bad} outside the vocabulary (0..{v})"
                )));
            }
            let (loss, lse): (Vec<f32>, Vec<f32>) = lv
                .par_chunks(v.max(1))
                .zip(tv.par_iter())
                .map(|(row, &y)| {
                    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
                    let lse = m + s.ln() as f32;
                    let loss = if y == ignore_index {
                        0.0
                    } else {
                        lse - row[y as usize]
                    };
                    (loss, lse)
                })
                .unzip();
            Ok((
                Tensor::from_vec(loss, &[rows])?,
                Tensor::from_vec(lse, &[rows])?,
            ))
        }
        Device::Cuda(_) => {
            let loss = Tensor::uninit(&[rows], DType::F32, logits.device())?;
            let lse = Tensor::uninit(&[rows], DType::F32, logits.device())?;
            if rows > 0 {
                let base = if super::rows_v8(v, &[logits]) {
                    "cross_entropy_fwd_v8"
                } else {
                    "cross_entropy_fwd"
                };
                cuda_dev(logits)?
                    .launch(
                        &kernels::LOSS,
                        &kname(base, logits),
                        (rows as u32, 1, 1),
                        (1024, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&loss))
                    .ptr(dptr(&lse))
                    .ptr(dptr(logits))
                    .ptr(dptr(targets))
                    .usize_as_i32(v)?
                    .i32(ignore_index)
                    .run()?;
            }
            Ok((loss, lse))
        }
    }
}

/// dlogits = (softmax(logits) − onehot(y)) · scale (zero rows where y == ignore_index).
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    ignore_index: i32,
    scale: f32,
) -> Result<Tensor> {
    let op = "cross_entropy_backward";
    let (rows, v) = check(op, logits, targets)?;
    same_device(op, &[logits, lse])?;
    lse.expect_dtype(op, DType::F32)?;
    match logits.device() {
        Device::Cpu => {
            let (lv, tv, sv) = (
                logits.cpu_f32()?,
                targets.as_slice::<i32>()?,
                lse.as_slice::<f32>()?,
            );
            let mut out = vec![0.0f32; rows * v];
            if v > 0 {
                out.par_chunks_mut(v)
                    .zip(lv.par_chunks(v))
                    .zip(tv.par_iter().zip(sv.par_iter()))
                    .for_each(|((o, row), (&y, &l))| {
                        if y == ignore_index {
                            return;
                        }
                        for (oi, &x) in o.iter_mut().zip(row) {
                            *oi = (x - l).exp() * scale;
                        }
                        if y >= 0 && (y as usize) < v {
                            o[y as usize] -= scale;
                        }
                    });
            }
            cpu_from_f32(out, logits.shape(), logits.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(logits.shape(), logits.dtype(), logits.device())?;
            if rows > 0 {
                let base = if super::rows_v8(v, &[&out, logits]) {
                    "cross_entropy_bwd_v8"
                } else {
                    "cross_entropy_bwd"
                };
                cuda_dev(logits)?
                    .launch(
                        &kernels::LOSS,
                        &kname(base, logits),
                        (rows as u32, 1, 1),
                        (1024, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&out))
                    .ptr(dptr(logits))
                    .ptr(dptr(targets))
                    .ptr(dptr(lse))
                    .usize_as_i32(v)?
                    .i32(ignore_index)
                    .f32(scale)
                    .run()?;
            }
            Ok(out)
        }
    }
}
