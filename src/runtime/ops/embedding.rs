//! Token embedding: a row gather from the table, and its gradient, a scatter-add of dy rows into
//! an f32 table gradient. Kernels: `cuda/kernels/embedding.cu`. Bytes: T·d·(read + write).
//! The CUDA backward uses f32 atomics, so its sums may differ from the CPU's in the last bits.

use super::{cuda_dev, dptr, kname, same_device};
use crate::runtime::cuda::{grid_1d, kernels};
use crate::runtime::{DType, Device, Error, Result, Tensor};

fn check_ids(op: &'static str, ids: &Tensor, vocab: usize) -> Result<()> {
    ids.expect_dtype(op, DType::I32)?;
    if ids.device() == Device::Cpu {
        if let Some(&bad) = ids
            .as_slice::<i32>()?
            .iter()
            .find(|&&i| i < 0 || i as usize >= vocab)
        {
            return Err(Error::Invalid(format!(
                "{op}: token id {bad} is outside the vocabulary (0..{vocab})"
            )));
        }
    }
    Ok(())
}

/// table [V, d] rows at ids [..] -> [.., d]. On CUDA an out-of-range id yields a zero row (ids
/// are checked on the host by the tokenizer/data path before they reach the GPU).
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let op = "embedding";
    same_device(op, &[ids, table])?;
    table.expect_float(op)?;
    if table.rank() != 2 {
        return Err(Error::shape(
            op,
            format!("table must be [vocab, d], got {:?}", table.shape()),
        ));
    }
    let (v, d) = (table.dim(0), table.dim(1));
    check_ids(op, ids, v)?;
    let mut shape = ids.shape().to_vec();
    shape.push(d);
    match ids.device() {
        Device::Cpu => {
            let idx = ids.as_slice::<i32>()?;
            let rows: Vec<i32> = idx.to_vec();
            let idx_t = Tensor::from_vec(rows, &[idx.len()])?;
            super::gather_rows(table, &idx_t)?.reshape(&shape)
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&shape, table.dtype(), table.device())?;
            let n = ids.numel() * d;
            cuda_dev(table)?
                .launch(
                    &kernels::EMBEDDING,
                    &kname("embedding_fwd", table),
                    (grid_1d(n, 256), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(ids))
                .ptr(dptr(table))
                .i64(n as i64)
                .usize_as_i32(d)?
                .usize_as_i32(v)?
                .run()?;
            Ok(out)
        }
    }
}

/// dtable[ids[t]] += dy[t] for every token; dtable [V, d] f32, dy [.., d].
pub fn embedding_backward(ids: &Tensor, dy: &Tensor, dtable: &mut Tensor) -> Result<()> {
    let op = "embedding_backward";
    same_device(op, &[ids, dy, dtable])?;
    dtable.expect_dtype(op, DType::F32)?;
    dy.expect_float(op)?;
    let (v, d) = (dtable.dim(0), dtable.dim(-1));
    check_ids(op, ids, v)?;
    if dy.numel() != ids.numel() * d {
        return Err(Error::shape(
            op,
            format!(
                "dy {:?} does not fit ids {:?} and d = {d}",
                dy.shape(),
                ids.shape()
            ),
        ));
    }
    match ids.device() {
        Device::Cpu => {
            let rows = dy.rows_cols().0;
            let dy2 = dy.try_clone()?.reshape(&[rows, d])?;
            super::scatter_add_rows(dtable, ids, &dy2, None)
        }
        Device::Cuda(_) => {
            let n = ids.numel() * d;
            cuda_dev(dy)?
                .launch(
                    &kernels::EMBEDDING,
                    &kname("embedding_bwd", dy),
                    (grid_1d(n, 256), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(dtable))
                .ptr(dptr(ids))
                .ptr(dptr(dy))
                .i64(n as i64)
                .usize_as_i32(d)?
                .usize_as_i32(v)?
                .run()
        }
    }
}
