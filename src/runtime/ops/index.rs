//! Index ops: top-k over the last dim, histogram and stable counting sort of ids (the MoE
//! dispatch's "which rows go to which expert"), row gather / weighted scatter-add (permute and
//! unpermute), row slicing and writing (KV cache), and the [A,B,C,D] -> [A,C,B,D] transpose
//! (attention head layout). Kernels: `cuda/kernels/index.cu`.

use rayon::prelude::*;

use super::{cuda_dev, dptr, kname, same_device};
use crate::runtime::cuda::{grid_1d, kernels};
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

/// Largest number of columns `topk` handles on CUDA (one row lives in shared memory).
pub const TOPK_MAX_COLS: usize = 4096;
/// Largest number of bins `argsort_stable` handles on CUDA (per-warp counters in shared memory).
pub const SORT_MAX_BINS: usize = 1024;

/// (values [.., k] like x, indices [.., k] i32): the k largest per row, descending; equal values
/// keep the lower index first. NaN counts as smaller than every number.
pub fn topk(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let op = "topk";
    x.expect_float(op)?;
    let (rows, cols) = x.rows_cols();
    if k == 0 || k > cols {
        return Err(Error::Invalid(format!(
            "{op}: k = {k} must be in 1..={cols} (the last dim of {:?})",
            x.shape()
        )));
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = k;
    match x.device() {
        Device::Cpu => {
            let v = x.cpu_f32()?;
            let mut vals = vec![0.0f32; rows * k];
            let mut idx = vec![0i32; rows * k];
            vals.par_chunks_mut(k)
                .zip(idx.par_chunks_mut(k))
                .zip(v.par_chunks(cols))
                .for_each(|((ov, oi), row)| {
                    let key = |i: usize| {
                        if row[i].is_nan() {
                            f32::NEG_INFINITY
                        } else {
                            row[i]
                        }
                    };
                    let mut order: Vec<usize> = (0..cols).collect();
                    // Stable sort: ties keep ascending index order.
                    order.sort_by(|&a, &b| {
                        key(b)
                            .partial_cmp(&key(a))
                            .unwrap_or(std::cmp::Ordering::Equal)
                    });
                    for j in 0..k {
                        ov[j] = row[order[j]];
                        oi[j] = order[j] as i32;
                    }
                });
            Ok((
                cpu_from_f32(vals, &shape, x.dtype())?,
                Tensor::from_vec(idx, &shape)?,
            ))
        }
        Device::Cuda(_) => {
            if cols > TOPK_MAX_COLS {
                return Err(Error::Invalid(format!(
                    "{op}: {cols} columns exceed the CUDA kernel's {TOPK_MAX_COLS}"
                )));
            }
            let vals = Tensor::uninit(&shape, x.dtype(), x.device())?;
            let idx = Tensor::uninit(&shape, DType::I32, x.device())?;
            if rows > 0 {
                let block = (cols.next_power_of_two()).clamp(32, 256) as u32;
                cuda_dev(x)?
                    .launch(
                        &kernels::INDEX,
                        &kname("topk", x),
                        (rows as u32, 1, 1),
                        (block, 1, 1),
                        (cols * 5) as u32,
                    )?
                    .ptr(dptr(&vals))
                    .ptr(dptr(&idx))
                    .ptr(dptr(x))
                    .usize_as_i32(cols)?
                    .usize_as_i32(k)?
                    .run()?;
            }
            Ok((vals, idx))
        }
    }
}

/// counts [bins] i32 of ids in 0..bins (ids outside are not counted).
pub fn histogram(ids: &Tensor, bins: usize) -> Result<Tensor> {
    let op = "histogram";
    ids.expect_dtype(op, DType::I32)?;
    match ids.device() {
        Device::Cpu => {
            let mut c = vec![0i32; bins];
            for &i in ids.as_slice::<i32>()? {
                if i >= 0 && (i as usize) < bins {
                    c[i as usize] += 1;
                }
            }
            Tensor::from_vec(c, &[bins])
        }
        Device::Cuda(_) => {
            let counts = Tensor::zeros(&[bins], DType::I32, ids.device())?;
            let n = ids.numel();
            if n > 0 && bins > 0 {
                cuda_dev(ids)?
                    .launch(
                        &kernels::INDEX,
                        "histogram",
                        (grid_1d(n, 256).min(1024), 1, 1),
                        (256, 1, 1),
                        (bins * 4) as u32,
                    )?
                    .ptr(dptr(&counts))
                    .ptr(dptr(ids))
                    .usize_as_i32(n)?
                    .usize_as_i32(bins)?
                    .run()?;
            }
            Ok(counts)
        }
    }
}

/// perm [N] i32 ordering ids [N] by bin, stable (equal ids keep their order); ids outside 0..bins
/// go last, also in order. `ids[perm[j]]` is non-decreasing over the valid ones.
pub fn argsort_stable(ids: &Tensor, bins: usize) -> Result<Tensor> {
    let op = "argsort_stable";
    ids.expect_dtype(op, DType::I32)?;
    let n = ids.numel();
    match ids.device() {
        Device::Cpu => {
            let v = ids.as_slice::<i32>()?;
            let key = |i: i32| {
                if i >= 0 && (i as usize) < bins {
                    i as usize
                } else {
                    bins
                }
            };
            let mut start = vec![0usize; bins + 2];
            for &i in v {
                start[key(i) + 1] += 1;
            }
            for b in 0..=bins {
                start[b + 1] += start[b];
            }
            let mut perm = vec![0i32; n];
            for (j, &i) in v.iter().enumerate() {
                let b = key(i);
                perm[start[b]] = j as i32;
                start[b] += 1;
            }
            Tensor::from_vec(perm, &[n])
        }
        Device::Cuda(_) => {
            if bins + 1 > SORT_MAX_BINS {
                return Err(Error::Invalid(format!(
                    "{op}: {bins} bins exceed the CUDA kernel's {}",
                    SORT_MAX_BINS - 1
                )));
            }
            let perm = Tensor::uninit(&[n], DType::I32, ids.device())?;
            if n == 0 {
                return Ok(perm);
            }
            // Chunks of 1024 ids: count per (chunk, bin), scan in bin-major order, then place
            // each id at its chunk's base for its bin plus its rank among equal ids before it.
            const CHUNK: usize = 1024;
            let chunks = n.div_ceil(CHUNK);
            let nb = bins + 1;
            let counts = Tensor::uninit(&[nb, chunks], DType::I32, ids.device())?;
            let dev = cuda_dev(ids)?;
            let smem = (32 * nb * 4) as u32;
            dev.launch(
                &kernels::INDEX,
                "sort_count",
                (chunks as u32, 1, 1),
                (CHUNK as u32, 1, 1),
                smem,
            )?
            .ptr(dptr(&counts))
            .ptr(dptr(ids))
            .usize_as_i32(n)?
            .usize_as_i32(bins)?
            .usize_as_i32(chunks)?
            .run()?;
            dev.launch(
                &kernels::INDEX,
                "exclusive_scan_i32",
                (1, 1, 1),
                (1024, 1, 1),
                0,
            )?
            .ptr(dptr(&counts))
            .usize_as_i32(nb * chunks)?
            .run()?;
            dev.launch(
                &kernels::INDEX,
                "sort_scatter",
                (chunks as u32, 1, 1),
                (CHUNK as u32, 1, 1),
                smem,
            )?
            .ptr(dptr(&perm))
            .ptr(dptr(&counts))
            .ptr(dptr(ids))
            .usize_as_i32(n)?
            .usize_as_i32(bins)?
            .usize_as_i32(chunks)?
            .run()?;
            Ok(perm)
        }
    }
}

/// x [R, d] rows at idx [N] -> [N, d]; an index outside 0..R gives a zero row.
pub fn gather_rows(x: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let op = "gather_rows";
    same_device(op, &[x, idx])?;
    idx.expect_dtype(op, DType::I32)?;
    x.expect_float(op)?;
    if x.rank() != 2 {
        return Err(Error::shape(
            op,
            format!("x must be [rows, d], got {:?}", x.shape()),
        ));
    }
    let (r, d) = (x.dim(0), x.dim(1));
    let n = idx.numel();
    match x.device() {
        Device::Cpu => {
            let (xv, iv) = (x.cpu_f32()?, idx.as_slice::<i32>()?);
            let mut out = vec![0.0f32; n * d];
            if d > 0 {
                out.par_chunks_mut(d)
                    .zip(iv.par_iter())
                    .for_each(|(o, &i)| {
                        if i >= 0 && (i as usize) < r {
                            o.copy_from_slice(&xv[i as usize * d..(i as usize + 1) * d]);
                        }
                    });
            }
            cpu_from_f32(out, &[n, d], x.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&[n, d], x.dtype(), x.device())?;
            let total = n * d;
            if total > 0 {
                let v8 = super::rows_v8(d, &[&out, x]);
                let (name, units) = if v8 {
                    (kname("gather_rows_v8", x), total / 8)
                } else {
                    (kname("gather_rows", x), total)
                };
                cuda_dev(x)?
                    .launch(
                        &kernels::INDEX,
                        &name,
                        (grid_1d(units, 256), 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&out))
                    .ptr(dptr(x))
                    .ptr(dptr(idx))
                    .i64(units as i64)
                    .usize_as_i32(d)?
                    .usize_as_i32(r)?
                    .run()?;
            }
            Ok(out)
        }
    }
}

/// dst[idx[i]] += w[i] · src[i] for every i (w = 1 without weights); dst [R, d] f32, src [N, d],
/// weights [N] f32. Indices outside 0..R are skipped. The CUDA version uses f32 atomics.
pub fn scatter_add_rows(
    dst: &mut Tensor,
    idx: &Tensor,
    src: &Tensor,
    weights: Option<&Tensor>,
) -> Result<()> {
    let op = "scatter_add_rows";
    same_device(op, &[dst, idx, src])?;
    dst.expect_dtype(op, DType::F32)?;
    idx.expect_dtype(op, DType::I32)?;
    src.expect_float(op)?;
    let (r, d) = (dst.dim(0), dst.dim(-1));
    let n = idx.numel();
    if dst.rank() != 2 || src.numel() != n * d {
        return Err(Error::shape(
            op,
            format!(
                "dst {:?}, idx {:?}, src {:?} do not fit",
                dst.shape(),
                idx.shape(),
                src.shape()
            ),
        ));
    }
    if let Some(w) = weights {
        same_device(op, &[dst, w])?;
        w.expect_dtype(op, DType::F32)?;
        if w.numel() != n {
            return Err(Error::shape(
                op,
                format!("{} weights for {n} rows", w.numel()),
            ));
        }
    }
    match dst.device() {
        Device::Cpu => {
            let iv = idx.as_slice::<i32>()?.to_vec();
            let sv = src.cpu_f32()?.into_owned();
            let wv = match weights {
                Some(w) => Some(w.as_slice::<f32>()?.to_vec()),
                None => None,
            };
            let dv = dst.as_mut_slice::<f32>()?;
            if d == 0 {
                return Ok(());
            }
            // Parallel over column blocks so threads never touch the same element; rows in order.
            const COLS: usize = 64;
            let mut col_blocks: Vec<(usize, Vec<f32>)> =
                (0..d).step_by(COLS).map(|c| (c, Vec::new())).collect();
            col_blocks.par_iter_mut().for_each(|(c0, acc)| {
                let c1 = (*c0 + COLS).min(d);
                let w = c1 - *c0;
                *acc = vec![0.0f32; r * w];
                for (i, &row) in iv.iter().enumerate() {
                    if row < 0 || row as usize >= r {
                        continue;
                    }
                    let s = wv.as_ref().map_or(1.0, |wv| wv[i]);
                    let a = &mut acc[row as usize * w..(row as usize + 1) * w];
                    for (aj, &x) in a.iter_mut().zip(&sv[i * d + *c0..i * d + c1]) {
                        *aj += s * x;
                    }
                }
            });
            for (c0, acc) in col_blocks {
                let w = acc.len() / r.max(1);
                for row in 0..r {
                    for j in 0..w {
                        dv[row * d + c0 + j] += acc[row * w + j];
                    }
                }
            }
            Ok(())
        }
        Device::Cuda(_) => {
            let total = n * d;
            if total == 0 {
                return Ok(());
            }
            let wptr = weights.map(dptr).unwrap_or(0);
            cuda_dev(dst)?
                .launch(
                    &kernels::INDEX,
                    &kname("scatter_add_rows", src),
                    (grid_1d(total, 256), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(dst))
                .ptr(dptr(idx))
                .ptr(dptr(src))
                .ptr(wptr)
                .i64(total as i64)
                .usize_as_i32(d)?
                .usize_as_i32(r)?
                .run()
        }
    }
}

/// Rows start..start+len of x along its first dim (a copy).
pub fn slice_rows(x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let op = "slice_rows";
    if x.rank() == 0 || start + len > x.dim(0) {
        return Err(Error::shape(
            op,
            format!("rows {start}..{} of {:?}", start + len, x.shape()),
        ));
    }
    let row_elems = x.numel() / x.dim(0).max(1);
    let mut shape = x.shape().to_vec();
    shape[0] = len;
    match x.device() {
        Device::Cpu => {
            let es = x.dtype().size_in_bytes();
            let bytes: &[u8] = match x.dtype() {
                DType::F32 => bytemuck::cast_slice(x.as_slice::<f32>()?),
                DType::BF16 => bytemuck::cast_slice(x.as_slice::<half::bf16>()?),
                DType::F16 => bytemuck::cast_slice(x.as_slice::<half::f16>()?),
                DType::I32 => bytemuck::cast_slice(x.as_slice::<i32>()?),
            };
            Tensor::from_bytes(
                &bytes[start * row_elems * es..(start + len) * row_elems * es],
                &shape,
                x.dtype(),
            )
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&shape, x.dtype(), x.device())?;
            let es = x.dtype().size_in_bytes();
            let src = x.cuda_storage().expect("device checked");
            src.copy_to(
                out.cuda_storage().expect("same device"),
                start * row_elems * es,
                0,
                len * row_elems * es,
            )?;
            Ok(out)
        }
    }
}

/// dst[start..start + src.dim(0)] = src along the first dim (same trailing shape and dtype).
pub fn write_rows(dst: &mut Tensor, start: usize, src: &Tensor) -> Result<()> {
    let op = "write_rows";
    same_device(op, &[dst, src])?;
    if dst.dtype() != src.dtype()
        || dst.rank() != src.rank()
        || dst.shape()[1..] != src.shape()[1..]
        || start + src.dim(0) > dst.dim(0)
    {
        return Err(Error::shape(
            op,
            format!(
                "cannot write {:?} {} at row {start} of {:?} {}",
                src.shape(),
                src.dtype(),
                dst.shape(),
                dst.dtype()
            ),
        ));
    }
    let row_elems = dst.numel() / dst.dim(0).max(1);
    let es = dst.dtype().size_in_bytes();
    match dst.device() {
        Device::Cpu => {
            fn copy<T: crate::runtime::Element>(
                dst: &mut Tensor,
                src: &Tensor,
                at: usize,
            ) -> Result<()> {
                let s = src.as_slice::<T>()?;
                dst.as_mut_slice::<T>()?[at..at + s.len()].copy_from_slice(s);
                Ok(())
            }
            let at = start * row_elems;
            match dst.dtype() {
                DType::F32 => copy::<f32>(dst, src, at),
                DType::BF16 => copy::<half::bf16>(dst, src, at),
                DType::F16 => copy::<half::f16>(dst, src, at),
                DType::I32 => copy::<i32>(dst, src, at),
            }
        }
        Device::Cuda(_) => {
            let s = src.cuda_storage().expect("device checked");
            s.copy_to(
                dst.cuda_storage().expect("device checked"),
                0,
                start * row_elems * es,
                src.numel() * es,
            )
        }
    }
}

/// x [A, B, C, D] -> [A, C, B, D].
pub fn transpose_12(x: &Tensor) -> Result<Tensor> {
    let op = "transpose_12";
    if x.rank() != 4 {
        return Err(Error::shape(
            op,
            format!("x must be 4-d, got {:?}", x.shape()),
        ));
    }
    let (a, b, c, d) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let shape = [a, c, b, d];
    match x.device() {
        Device::Cpu => {
            x.expect_float(op)?;
            let v = x.cpu_f32()?;
            let mut out = vec![0.0f32; x.numel()];
            if d > 0 && b > 0 && c > 0 {
                out.par_chunks_mut(b * d).enumerate().for_each(|(ac, o)| {
                    let (ai, ci) = (ac / c, ac % c);
                    for bi in 0..b {
                        let src = ((ai * b + bi) * c + ci) * d;
                        o[bi * d..(bi + 1) * d].copy_from_slice(&v[src..src + d]);
                    }
                });
            }
            cpu_from_f32(out, &shape, x.dtype())
        }
        Device::Cuda(_) => {
            x.expect_float(op)?;
            let out = Tensor::uninit(&shape, x.dtype(), x.device())?;
            let n = x.numel();
            if n > 0 {
                let (name, units) = if super::rows_v8(d, &[&out, x]) {
                    (kname("transpose_12_v8", x), n / 8)
                } else {
                    (kname("transpose_12", x), n)
                };
                cuda_dev(x)?
                    .launch(
                        &kernels::INDEX,
                        &name,
                        (grid_1d(units, 256), 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&out))
                    .ptr(dptr(x))
                    .i64(units as i64)
                    .usize_as_i32(b)?
                    .usize_as_i32(c)?
                    .usize_as_i32(d)?
                    .run()?;
            }
            Ok(out)
        }
    }
}
