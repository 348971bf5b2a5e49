//! cuBLAS GEMMs for row-major tensors: bf16/f16 operands with f32 accumulation (f32 or same-type
//! output), or f32 throughout (no TF32, so f32 parity with the CPU stays ~1e-6). cuBLAS is
//! column-major, so a row-major C[M,N] = op(A)[M,K]·op(B)[K,N] is issued as the column-major
//! C^T[N,M] = op(B)^T·op(A)^T: swap the operands, keep each one's transpose flag.

use std::sync::Arc;

use cudarc::cublas::sys as bsys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::CudaDevice;
use crate::runtime::{DType, Error, Result};

pub(crate) struct BlasHandle {
    handle: bsys::cublasHandle_t,
    _workspace: CudaSlice<u8>,
}

// cuBLAS handles may move between threads; the device's Mutex serialises their use.
unsafe impl Send for BlasHandle {}

/// cuBLAS wants >= 32 MiB of workspace on Hopper for its fastest kernels.
const WORKSPACE_BYTES: usize = 32 << 20;

impl BlasHandle {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<BlasHandle> {
        if !unsafe { bsys::is_culib_present() } {
            return Err(Error::Cuda {
                op: "cublas",
                msg: "libcublas.so not found".into(),
            });
        }
        let handle =
            cudarc::cublas::result::create_handle().map_err(|e| Error::cuda("cublas", e))?;
        let workspace =
            unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(|e| Error::cuda("cublas", e))?;
        let (wptr, _) = workspace.device_ptr(stream);
        unsafe {
            cudarc::cublas::result::set_stream(handle, stream.cu_stream() as _)
                .map_err(|e| Error::cuda("cublas", e))?;
            bsys::cublasSetWorkspace_v2(handle, wptr as *mut _, WORKSPACE_BYTES)
                .result()
                .map_err(|e| Error::cuda("cublas", e))?;
        }
        Ok(BlasHandle {
            handle,
            _workspace: workspace,
        })
    }
}

impl Drop for BlasHandle {
    fn drop(&mut self) {
        unsafe {
            let _ = cudarc::cublas::result::destroy_handle(self.handle);
        }
    }
}

/// One operand of a row-major GEMM: address, dtype, leading dimension (elements between rows
/// as stored), stride between batch entries (elements; 0 broadcasts), and whether it is used
/// transposed.
#[derive(Copy, Clone, Debug)]
pub(crate) struct GemmOperand {
    pub ptr: u64,
    pub dtype: DType,
    pub ld: usize,
    pub batch_stride: usize,
    pub trans: bool,
}

/// C = alpha·op(A)·op(B) + beta·C over `batch` entries; row-major [M,K]·[K,N] -> [M,N].
#[derive(Copy, Clone, Debug)]
pub(crate) struct GemmArgs {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub a: GemmOperand,
    pub b: GemmOperand,
    pub c: GemmOperand,
    pub alpha: f32,
    pub beta: f32,
}

fn cuda_type(dt: DType) -> Result<bsys::cudaDataType> {
    Ok(match dt {
        DType::F32 => bsys::cudaDataType::CUDA_R_32F,
        DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
        DType::F16 => bsys::cudaDataType::CUDA_R_16F,
        DType::I32 => return Err(Error::dtype("matmul", dt, "f32, bf16 or f16")),
    })
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Invalid(format!(
            "matmul: {what} = {v} exceeds cuBLAS's 32-bit limit"
        ))
    })
}

/// Issue one (strided-batched) GEMM on the device's compute stream.
pub(crate) fn gemm_bf16_or_f32(dev: &CudaDevice, g: &GemmArgs) -> Result<()> {
    let name = format!("cublas {}x{}x{} b{}", g.m, g.n, g.k, g.batch);
    super::profile::timed(&name, &dev.stream.clone(), || gemm_now(dev, g))
}

fn gemm_now(dev: &CudaDevice, g: &GemmArgs) -> Result<()> {
    if g.a.dtype != g.b.dtype {
        return Err(Error::Invalid(format!(
            "matmul: operand dtypes differ ({} vs {})",
            g.a.dtype, g.b.dtype
        )));
    }
    if g.a.dtype == DType::F32 && g.c.dtype != DType::F32 {
        return Err(Error::dtype(
            "matmul",
            g.c.dtype,
            "f32 output for f32 operands",
        ));
    }
    let op = |t: bool| {
        if t {
            bsys::cublasOperation_t::CUBLAS_OP_T
        } else {
            bsys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (g.alpha, g.beta);
    dev.ctx
        .bind_to_thread()
        .map_err(|e| Error::cuda("bind", e))?;
    dev.with_blas(|h| {
        unsafe {
            bsys::cublasGemmStridedBatchedEx(
                h.handle,
                op(g.b.trans),
                op(g.a.trans),
                int(g.n, "N")?,
                int(g.m, "M")?,
                int(g.k, "K")?,
                &alpha as *const f32 as *const _,
                g.b.ptr as *const _,
                cuda_type(g.b.dtype)?,
                int(g.b.ld, "ldb")?,
                g.b.batch_stride as i64,
                g.a.ptr as *const _,
                cuda_type(g.a.dtype)?,
                int(g.a.ld, "lda")?,
                g.a.batch_stride as i64,
                &beta as *const f32 as *const _,
                g.c.ptr as *mut _,
                cuda_type(g.c.dtype)?,
                int(g.c.ld, "ldc")?,
                g.c.batch_stride as i64,
                int(g.batch, "batch")?,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .result()
        }
        .map_err(|e| Error::Cuda {
            op: "matmul",
            msg: format!("cublasGemmStridedBatchedEx {g:?}: {e}"),
        })
    })
}
