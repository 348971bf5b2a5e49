//! Ops as functions over tensors, one file per family. Each file holds the op's checks, its CPU
//! twin and its CUDA launcher a few lines apart; the kernels sit in `../cuda/kernels/<family>.cu`.
//!
//! Conventions: shapes are row-major; "rows" are all leading dimensions flattened, "cols" the last
//! one. Floating ops accept f32/bf16/f16 and compute in f32; ids, offsets and positions are i32.

mod adamw;
mod attention;
mod cast;
mod elementwise;
mod embedding;
mod flash;
mod grouped;
pub(crate) mod grouped_cuda;
mod index;
mod loss;
mod matmul;
mod norm;
mod reduce;
mod rope;
mod softmax;

pub use adamw::{adamw_step, AdamW};
pub use attention::{
    attention_decode, attention_decode_step, kv_write, qk_rope_kv_write, QkNormSpec,
};
pub use cast::cast;
pub use elementwise::{
    activation, activation_backward, add, add_assign, add_bias, add_scaled, clamp, mul, row_dot,
    scale, scale_rows, swiglu, swiglu_backward, Activation,
};
pub use embedding::{embedding, embedding_backward};
pub use flash::{flash_attention, flash_attention_backward, flash_supported, FlashSpec, KvLayout};
pub use grouped::{
    add_rmsnorm_router_topk, grouped_matmul, grouped_matmul_gather, grouped_matmul_tn,
    grouped_matmul_tn_gather_into, grouped_matmul_tn_into, moe_serve_swiglu, moe_serve_swiglu_norm,
    o_router_topk, router_fold, router_topk, SoftmaxTopK,
};
pub use index::{
    argsort_stable, gather_rows, histogram, scatter_add_rows, slice_rows, topk, transpose_12,
    write_rows,
};
pub use loss::{cross_entropy, cross_entropy_backward};
pub use matmul::{add_rmsnorm_linear_qkv, linear, linear_qkv, matmul, matmul_into, Matmul};
pub use norm::{add_rmsnorm, rmsnorm, rmsnorm_backward, rmsnorm_backward_acc};
pub use reduce::{
    argmax_row, argmax_rows, argmax_rows_advance, sum_all, sum_rows, sum_squares, sum_squares_many,
};
pub use rope::{rope, rope_backward, RopeTable};
pub use softmax::{log_softmax, softmax, softmax_backward, Softmax};

use super::{Device, Error, Result, Tensor};

/// The device all `ts` share, or an error naming `op`.
pub(crate) fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts[0].device();
    for t in &ts[1..] {
        if t.device() != d {
            return Err(Error::DeviceMismatch {
                op,
                a: d,
                b: t.device(),
            });
        }
    }
    Ok(d)
}

pub(crate) fn cuda_dev(t: &Tensor) -> Result<std::sync::Arc<super::cuda::CudaDevice>> {
    t.cuda_storage()
        .map(|s| s.device().clone())
        .ok_or_else(|| Error::Invalid("expected a CUDA tensor".into()))
}

/// Raw device address of a CUDA tensor (0 for a CPU tensor, which callers never pass).
pub(crate) fn dptr(t: &Tensor) -> u64 {
    t.cuda_storage().map(|s| s.ptr()).unwrap_or(0)
}

/// Whether the `_v8` variant of a row kernel applies: rows of `d` elements, a multiple of 8, and
/// every tensor 16-byte aligned (each thread then moves 8 elements with 16-byte accesses).
/// The `v8` setting off takes the one-element kernels everywhere.
pub(crate) fn rows_v8(d: usize, ts: &[&Tensor]) -> bool {
    crate::runtime::KernelSettings::read(|s| s.v8)
        && d % 8 == 0
        && ts.iter().all(|t| dptr(t) % 16 == 0)
}

/// Kernel name for a floating dtype: `base_f32`, `base_bf16`, `base_f16`.
pub(crate) fn kname(base: &str, t: &Tensor) -> String {
    format!("{base}_{}", t.dtype().name())
}
