//! Dtype conversion between f32 / bf16 / f16 (round to nearest even). Kernel: `cuda/kernels/cast.cu`.
//! Bytes per call: n × (source + destination size).

use rayon::prelude::*;

use super::{cuda_dev, dptr};
use crate::runtime::cuda::{grid_1d, kernels};
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

/// `x` stored as `dtype` (a copy, also when the dtype is unchanged).
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return x.try_clone();
    }
    if !x.dtype().is_float() || !dtype.is_float() {
        return Err(Error::Invalid(format!(
            "cast: {} -> {dtype} is not supported (floating types only)",
            x.dtype()
        )));
    }
    match x.device() {
        Device::Cpu => {
            let v: Vec<f32> = match x.dtype() {
                DType::F32 => x.as_slice::<f32>()?.to_vec(),
                DType::BF16 => x
                    .as_slice::<half::bf16>()?
                    .par_iter()
                    .map(|v| v.to_f32())
                    .collect(),
                DType::F16 => x
                    .as_slice::<half::f16>()?
                    .par_iter()
                    .map(|v| v.to_f32())
                    .collect(),
                DType::I32 => unreachable!("checked above"),
            };
            cpu_from_f32(v, x.shape(), dtype)
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(x.shape(), dtype, x.device())?;
            let n = x.numel();
            let name = format!("cast_{}_{}", x.dtype().name(), dtype.name());
            cuda_dev(x)?
                .launch(
                    &kernels::CAST,
                    &name,
                    (grid_1d(n, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(x))
                .i64(n as i64)
                .run()?;
            Ok(out)
        }
    }
}
