//! AdamW on f32 master weights, exactly as torch.optim.AdamW computes it:
//!   p ← p − lr·wd·p;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
//!   p ← p − (lr / (1−β1ᵗ)) · m / (sqrt(v) / sqrt(1−β2ᵗ) + eps)
//! with g = grad · grad_scale (gradient clipping folds into grad_scale). Optionally writes a
//! low-precision copy of the updated weights (bf16 params for the forward). Kernel:
//! `cuda/kernels/optimizer.cu`. Bytes: 4 × 4 reads + 3 × 4 writes per parameter (+ the copy).

use rayon::prelude::*;

use super::{cuda_dev, dptr, same_device};
use crate::runtime::cuda::{grid_1d, kernels};
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

#[derive(Copy, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// One AdamW step (`step` counts from 1) on `param` (f32) with moments `m`, `v` (f32).
pub fn adamw_step(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    hp: &AdamW,
    step: u64,
    grad_scale: f32,
    low_precision_copy: Option<&mut Tensor>,
) -> Result<()> {
    let op = "adamw_step";
    same_device(op, &[param, grad, m, v])?;
    for (t, what) in [(&*param, "param"), (&*m, "m"), (&*v, "v")] {
        t.expect_dtype(op, DType::F32)
            .map_err(|_| Error::Invalid(format!("{op}: {what} must be f32, is {}", t.dtype())))?;
    }
    grad.expect_float(op)?;
    let n = param.numel();
    if grad.numel() != n || m.numel() != n || v.numel() != n {
        return Err(Error::shape(
            op,
            format!(
                "param {:?}, grad {:?}, m {:?}, v {:?} differ",
                param.shape(),
                grad.shape(),
                m.shape(),
                v.shape()
            ),
        ));
    }
    if step == 0 {
        return Err(Error::Invalid(format!("{op}: step counts from 1")));
    }
    if let Some(c) = &low_precision_copy {
        if c.numel() != n || c.device() != param.device() || !c.dtype().is_float() {
            return Err(Error::shape(
                op,
                format!(
                    "copy {:?} {} does not fit param {:?}",
                    c.shape(),
                    c.dtype(),
                    param.shape()
                ),
            ));
        }
    }
    let bc1 = 1.0 - (hp.beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(step as i32);
    let step_size = (hp.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    match param.device() {
        Device::Cpu => {
            let g = grad.cpu_f32()?.into_owned();
            let mv = m.as_mut_slice::<f32>()?;
            let vv = v.as_mut_slice::<f32>()?;
            let pv = param.as_mut_slice::<f32>()?;
            pv.par_iter_mut()
                .zip(mv.par_iter_mut())
                .zip(vv.par_iter_mut())
                .zip(g.par_iter())
                .for_each(|(((p, m), v), &g)| {
                    let g = g * grad_scale;
                    *p -= hp.lr * hp.weight_decay * *p;
                    *m = hp.beta1 * *m + (1.0 - hp.beta1) * g;
                    *v = hp.beta2 * *v + (1.0 - hp.beta2) * g * g;
                    let denom = v.sqrt() / bc2_sqrt + hp.eps;
                    *p -= step_size * *m / denom;
                });
            if let Some(c) = low_precision_copy {
                let shape = c.shape().to_vec();
                *c = cpu_from_f32(pv.to_vec(), &shape, c.dtype())?;
            }
            Ok(())
        }
        Device::Cuda(_) => {
            let (copy_ptr, copy_kind) = match &low_precision_copy {
                Some(c) => (
                    dptr(c),
                    match c.dtype() {
                        DType::BF16 => 1,
                        DType::F16 => 2,
                        _ => 3,
                    },
                ),
                None => (0, 0),
            };
            // 4 elements per thread when every buffer allows 16-byte f32 accesses.
            let v4 = n % 4 == 0
                && [dptr(param), dptr(m), dptr(v), dptr(grad), copy_ptr]
                    .iter()
                    .all(|p| p % 16 == 0);
            let (name, units) = if v4 {
                (format!("adamw_v4_{}", grad.dtype().name()), n / 4)
            } else {
                (format!("adamw_{}", grad.dtype().name()), n)
            };
            cuda_dev(param)?
                .launch(
                    &kernels::OPTIMIZER,
                    &name,
                    (grid_1d(units, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(param))
                .ptr(dptr(m))
                .ptr(dptr(v))
                .ptr(dptr(grad))
                .ptr(copy_ptr)
                .i32(copy_kind)
                .i64(units as i64)
                .f32(hp.lr)
                .f32(hp.beta1)
                .f32(hp.beta2)
                .f32(hp.eps)
                .f32(hp.weight_decay)
                .f32(step_size)
                .f32(bc2_sqrt)
                .f32(grad_scale)
                .run()
        }
    }
}
