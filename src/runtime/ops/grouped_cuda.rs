//! CUDA launchers for the grouped GEMMs (kernels in `cuda/kernels/grouped_gemm.cu`); the CPU twins
//! and the contract are in `grouped.rs`.

use std::sync::Arc;

use crate::runtime::cuda::CudaDevice;
use crate::runtime::{DType, Error, Result, Tensor};

pub(crate) fn grouped_matmul(
    _dev: &Arc<CudaDevice>,
    _x: &Tensor,
    _w: &Tensor,
    _offsets: &Tensor,
    _trans_w: bool,
    _n: usize,
) -> Result<Tensor> {
    Err(Error::Invalid(
        "grouped_matmul: the CUDA kernel is being written (runtime/ops/grouped_cuda.rs)".into(),
    ))
}

pub(crate) fn grouped_matmul_tn(
    _dev: &Arc<CudaDevice>,
    _a: &Tensor,
    _b: &Tensor,
    _offsets: &Tensor,
    _out_dtype: DType,
) -> Result<Tensor> {
    Err(Error::Invalid(
        "grouped_matmul_tn: the CUDA kernel is being written (runtime/ops/grouped_cuda.rs)".into(),
    ))
}
