//! Reductions to f32: column sums over all rows (bias / norm-weight gradients), the sum of all
//! elements, and the sum of squares (gradient-norm clipping). On CUDA every reduction is two
//! deterministic passes (per-block partials, then one block), so results stay on the device with
//! no host sync. Kernels: `cuda/kernels/reduce.cu`. Bytes: one read of x.

use rayon::prelude::*;

use super::{cuda_dev, dptr, kname, same_device};
use crate::runtime::cuda::{kernels, CudaDevice};
use crate::runtime::{DType, Device, Error, Result, Tensor};

/// Σ over rows: x [.., C] -> [C] f32.
pub fn sum_rows(x: &Tensor) -> Result<Tensor> {
    x.expect_float("sum_rows")?;
    let (rows, cols) = x.rows_cols();
    match x.device() {
        Device::Cpu => {
            let v = x.cpu_f32()?;
            let out = if cols == 0 {
                vec![]
            } else {
                // Fixed row groups summed in order: the same bits for any thread count.
                let partials: Vec<Vec<f64>> = v
                    .par_chunks(64 * cols)
                    .map(|g| {
                        let mut acc = vec![0.0f64; cols];
                        for r in g.chunks(cols) {
                            acc.iter_mut().zip(r).for_each(|(a, &b)| *a += b as f64);
                        }
                        acc
                    })
                    .collect();
                let mut acc = vec![0.0f64; cols];
                for p in &partials {
                    acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                }
                acc.into_iter().map(|s| s as f32).collect()
            };
            Tensor::from_vec(out, &[cols])
        }
        Device::Cuda(_) => {
            let dev = cuda_dev(x)?;
            let out = Tensor::uninit(&[cols], DType::F32, x.device())?;
            if cols == 0 {
                return Ok(out);
            }
            // Pass 1: grid (column tiles of 32) × (row groups) -> partial [groups, C]; pass 2
            // sums the groups. One group when rows are few.
            let groups = rows.div_ceil(64).clamp(1, 128);
            let partial = Tensor::uninit(&[groups, cols], DType::F32, x.device())?;
            let tiles = cols.div_ceil(32) as u32;
            dev.launch(
                &kernels::REDUCE,
                &kname("col_sum", x),
                (tiles, groups as u32, 1),
                (32, 8, 1),
                0,
            )?
            .ptr(dptr(&partial))
            .ptr(dptr(x))
            .usize_as_i32(rows)?
            .usize_as_i32(cols)?
            .run()?;
            dev.launch(
                &kernels::REDUCE,
                "col_sum_f32",
                (tiles, 1, 1),
                (32, 8, 1),
                0,
            )?
            .ptr(dptr(&out))
            .ptr(dptr(&partial))
            .usize_as_i32(groups)?
            .usize_as_i32(cols)?
            .run()?;
            Ok(out)
        }
    }
}

fn total(x: &Tensor, squares: bool) -> Result<Tensor> {
    x.expect_float("sum")?;
    match x.device() {
        Device::Cpu => {
            let v = x.cpu_f32()?;
            // Fixed chunks summed in order: the result does not depend on thread scheduling
            // (a resumed training run must reproduce gradient norms bit for bit).
            let partial: Vec<f64> = v
                .par_chunks(1 << 14)
                .map(|c| {
                    if squares {
                        c.iter().map(|&a| (a as f64) * (a as f64)).sum()
                    } else {
                        c.iter().map(|&a| a as f64).sum()
                    }
                })
                .collect();
            let s: f64 = partial.iter().sum();
            Tensor::from_vec(vec![s as f32], &[1])
        }
        Device::Cuda(_) => {
            let dev = cuda_dev(x)?;
            let n = x.numel();
            let (name, units) = if super::rows_v8(n, &[x]) {
                (kname("block_sums_v8", x), n / 8)
            } else {
                (kname("block_sums", x), n)
            };
            let blocks = units.div_ceil(1024).clamp(1, 1024);
            let partial = Tensor::uninit(&[blocks], DType::F32, x.device())?;
            dev.launch(
                &kernels::REDUCE,
                &name,
                (blocks as u32, 1, 1),
                (1024, 1, 1),
                0,
            )?
            .ptr(dptr(&partial))
            .ptr(dptr(x))
            .i64(units as i64)
            .i32(squares as i32)
            .run()?;
            sum_partials(&dev, &partial)
        }
    }
}

/// The second pass of a CUDA reduction: the per-block partials [blocks] f32 summed in order by
/// one block into a [1] f32 tensor.
fn sum_partials(dev: &CudaDevice, partial: &Tensor) -> Result<Tensor> {
    let out = Tensor::uninit(&[1], DType::F32, partial.device())?;
    dev.launch(
        &kernels::REDUCE,
        "block_sums_f32",
        (1, 1, 1),
        (1024, 1, 1),
        0,
    )?
    .ptr(dptr(&out))
    .ptr(dptr(partial))
    .i64(partial.numel() as i64)
    .i32(0)
    .run()?;
    Ok(out)
}

/// Σ x as a [1] f32 tensor on x's device.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    total(x, false)
}

/// Σ x² as a [1] f32 tensor on x's device.
pub fn sum_squares(x: &Tensor) -> Result<Tensor> {
    total(x, true)
}

/// Σ over `xs` of Σ x², a [1] f32 tensor (the gradient norm over every parameter). On CPU the
/// per-tensor sums are added in order. On CUDA the tensors of the first one's dtype whose
/// lengths are multiples of 8 and that are 16-byte aligned go through one launch
/// (`multi_sumsq_v8`, per-block partials in a fixed order) instead of three per tensor; the
/// others are added one by one.
pub fn sum_squares_many(xs: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = xs.first() else {
        return Err(crate::runtime::Error::Invalid(
            "sum_squares_many of no tensors".into(),
        ));
    };
    let mut rest: Vec<&Tensor> = Vec::new();
    let mut acc: Option<Tensor> = None;
    if let Device::Cuda(_) = first.device() {
        let dt = first.dtype();
        let (mut table, mut blocks) = (Vec::<i64>::new(), 0usize);
        for &x in xs {
            x.expect_float("sum_squares_many")?;
            let n = x.numel();
            if x.device() == first.device() && x.dtype() == dt && n > 0 && super::rows_v8(n, &[x]) {
                table.extend([dptr(x) as i64, (n / 8) as i64, blocks as i64]);
                blocks += (n / 8).div_ceil(1024 * 8).clamp(1, 1024);
            } else {
                rest.push(x);
            }
        }
        if blocks > 0 {
            let dev = cuda_dev(first)?;
            let count = table.len() / 3;
            let words: Vec<i32> = table
                .iter()
                .flat_map(|&v| [v as u64 as u32 as i32, ((v as u64) >> 32) as u32 as i32])
                .collect();
            let t = Tensor::from_vec(words, &[6 * count])?.to_device(first.device())?;
            let partial = Tensor::uninit(&[blocks], DType::F32, first.device())?;
            dev.launch(
                &kernels::REDUCE,
                &kname("multi_sumsq_v8", first),
                (blocks as u32, 1, 1),
                (1024, 1, 1),
                0,
            )?
            .ptr(dptr(&partial))
            .ptr(dptr(&t))
            .usize_as_i32(count)?
            .run()?;
            acc = Some(sum_partials(&dev, &partial)?);
        }
    } else {
        rest.extend(xs.iter().copied());
    }
    for x in rest {
        let s = sum_squares(x)?;
        match &mut acc {
            Some(a) => super::add_assign(a, &s)?,
            None => acc = Some(s),
        }
    }
    Ok(acc.expect("at least one tensor"))
}

/// The first index of the row's largest value; NaN and -inf never win, a row without a finite or
/// +inf value gives 0 (greedy decoding's choice, like torch.argmax on ties).
pub fn argmax_row(x: &[f32]) -> usize {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &v) in x.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Greedy decoding's choice per row of x [rows, cols] (f32/bf16/f16): [rows] i32, `argmax_row`
/// of each row. On the GPU the step's logits need not leave the device.
pub fn argmax_rows(x: &Tensor) -> Result<Tensor> {
    x.expect_float("argmax_rows")?;
    let mut out = Tensor::uninit(&[x.rows_cols().0], DType::I32, x.device())?;
    argmax_into(x, &mut out, None)?;
    Ok(out)
}

/// A greedy decode step's advance on the device: ids [R] = `argmax_rows(x)` (x [R, V] the step's
/// logits), and positions `pos` and lengths `lens` (i32 [R]) one further, so that the buffers a
/// recorded decode step reads already hold the next step's inputs (no host round trip between
/// chained steps).
pub fn argmax_rows_advance(
    x: &Tensor,
    ids: &mut Tensor,
    pos: &mut Tensor,
    lens: &mut Tensor,
) -> Result<()> {
    let op = "argmax_rows_advance";
    x.expect_float(op)?;
    same_device(op, &[x, ids, pos, lens])?;
    let rows = x.rows_cols().0;
    for (name, t) in [("ids", &*ids), ("pos", &*pos), ("lens", &*lens)] {
        t.expect_dtype(op, DType::I32)?;
        if t.shape() != [rows] {
            return Err(Error::shape(
                op,
                format!("{name} {:?} for {rows} rows of logits", t.shape()),
            ));
        }
    }
    argmax_into(x, ids, Some((pos, lens)))
}

/// `out` = the row arg-maxes of x; with `advance`, (pos, lens) each + 1 per row.
fn argmax_into(
    x: &Tensor,
    out: &mut Tensor,
    advance: Option<(&mut Tensor, &mut Tensor)>,
) -> Result<()> {
    let (rows, cols) = x.rows_cols();
    match x.device() {
        Device::Cpu => {
            let v = x.cpu_f32()?;
            out.as_mut_slice::<i32>()?
                .par_iter_mut()
                .enumerate()
                .for_each(|(r, o)| *o = argmax_row(&v[r * cols..(r + 1) * cols]) as i32);
            if let Some((pos, lens)) = advance {
                for t in [pos, lens] {
                    t.as_mut_slice::<i32>()?.iter_mut().for_each(|p| *p += 1);
                }
            }
            Ok(())
        }
        Device::Cuda(_) => {
            if rows == 0 {
                return Ok(());
            }
            let dev = cuda_dev(x)?;
            let pos_lens = advance.as_ref().map_or((0, 0), |(p, l)| (dptr(p), dptr(l)));
            // One pass: 2048 values per block, the last block of a row reduces its parts;
            // past the arrival counters, inside a first graph capture, or with
            // `argmax_two_pass`, two kernels.
            let two_pass = crate::runtime::KernelSettings::read(|s| s.argmax_two_pass);
            if let (Some(counters), true) = (
                dev.arrival_counters()?,
                rows < crate::runtime::cuda::ARRIVAL_COUNTERS && !two_pass,
            ) {
                let parts = cols.div_ceil(2048);
                let pv = Tensor::uninit(&[rows, parts], DType::F32, x.device())?;
                let pi = Tensor::uninit(&[rows, parts], DType::I32, x.device())?;
                // Whole 8-value loads where every row starts 16-byte aligned.
                let vec = cols % 8 == 0 && dptr(x) % 16 == 0;
                dev.launch(
                    &kernels::REDUCE,
                    &kname("argmax_onepass", x),
                    (parts as u32, rows as u32, 1),
                    (256, 1, 1),
                    0,
                )?
                .pdl()
                .ptr(dptr(out))
                .ptr(dptr(&pv))
                .ptr(dptr(&pi))
                .ptr(dptr(x))
                .usize_as_i32(cols)?
                .i32(vec as i32)
                .ptr(pos_lens.0)
                .ptr(pos_lens.1)
                .ptr(counters)
                .run()?;
                return Ok(());
            }
            // Parts per row: enough blocks to spread one row's read over the SMs at batch 1.
            let parts = cols.div_ceil(4096).clamp(1, 64);
            let pv = Tensor::uninit(&[rows, parts], DType::F32, x.device())?;
            let pi = Tensor::uninit(&[rows, parts], DType::I32, x.device())?;
            dev.launch(
                &kernels::REDUCE,
                &kname("argmax_part", x),
                (parts as u32, rows as u32, 1),
                (256, 1, 1),
                0,
            )?
            .ptr(dptr(&pv))
            .ptr(dptr(&pi))
            .ptr(dptr(x))
            .usize_as_i32(cols)?
            .run()?;
            dev.launch(
                &kernels::REDUCE,
                "argmax_final",
                (rows as u32, 1, 1),
                (64, 1, 1),
                0,
            )?
            .ptr(dptr(out))
            .ptr(dptr(&pv))
            .ptr(dptr(&pi))
            .usize_as_i32(parts)?
            .ptr(pos_lens.0)
            .ptr(pos_lens.1)
            .run()?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::runtime::{ops, DType, Device, Tensor};

    /// The CPU arg-max: first index on ties, NaN and -inf never win, 0 when nothing can.
    #[test]
    fn argmax_rows_follows_the_sampler() {
        let nan = f32::NAN;
        let ninf = f32::NEG_INFINITY;
        let rows: [[f32; 5]; 5] = [
            [0.5, 2.0, -1.0, 2.0, 1.0],
            [nan, -3.0, nan, -2.5, -2.5],
            [ninf, ninf, nan, ninf, nan],
            [f32::INFINITY, 1.0, f32::INFINITY, nan, 0.0],
            [-7.0, -8.0, -6.5, -9.0, -6.5],
        ];
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let got = ops::argmax_rows(&Tensor::from_vec(flat, &[5, 5]).unwrap())
            .unwrap()
            .to_vec::<i32>()
            .unwrap();
        assert_eq!(got, vec![1, 3, 0, 0, 2]);
        // The decode step's advance: the same ids into the given buffer, positions and lengths
        // one further; a buffer of the wrong length is named.
        let x = Tensor::from_vec(rows.iter().flatten().copied().collect(), &[5, 5]).unwrap();
        let mut ids = Tensor::from_vec(vec![-1i32; 5], &[5]).unwrap();
        let mut pos = Tensor::from_vec(vec![0i32, 3, 9, 1, 4], &[5]).unwrap();
        let mut lens = Tensor::from_vec(vec![1i32, 4, 10, 2, 5], &[5]).unwrap();
        ops::argmax_rows_advance(&x, &mut ids, &mut pos, &mut lens).unwrap();
        assert_eq!(ids.to_vec::<i32>().unwrap(), vec![1, 3, 0, 0, 2]);
        assert_eq!(pos.to_vec::<i32>().unwrap(), vec![1, 4, 10, 2, 5]);
        assert_eq!(lens.to_vec::<i32>().unwrap(), vec![2, 5, 11, 3, 6]);
        let mut short = Tensor::from_vec(vec![0i32; 4], &[4]).unwrap();
        let e = ops::argmax_rows_advance(&x, &mut ids, &mut short, &mut lens).unwrap_err();
        assert!(e.to_string().contains("pos [4]"), "{e}");
    }

    /// Column reductions (bias and norm-weight gradients) give the same bits under any thread
    /// count and schedule: training must be reproducible and resume bit-identically.
    #[test]
    fn column_reductions_do_not_depend_on_threads() {
        let (rows, cols) = (4099, 96);
        let x = Tensor::randn(&[rows, cols], 1.0, 1, DType::F32, Device::Cpu).unwrap();
        let w = Tensor::randn(&[cols], 1.0, 2, DType::F32, Device::Cpu).unwrap();
        let dy = Tensor::randn(&[rows, cols], 1.0, 3, DType::F32, Device::Cpu).unwrap();
        let run = || {
            let (_, rstd) = ops::rmsnorm(&x, &w, 1e-6).unwrap();
            let (_, dw) = ops::rmsnorm_backward(&x, &w, &rstd, &dy).unwrap();
            let s = ops::sum_rows(&dy).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.to_f32_vec()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            (bits(&dw), bits(&s))
        };
        let mut seen = Vec::new();
        for threads in [1, 2, 3, 5, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..4 {
                seen.push((threads, pool.install(run)));
            }
        }
        for (threads, r) in &seen[1..] {
            assert!(
                r.0 == seen[0].1 .0,
                "rmsnorm dw differs with {threads} threads"
            );
            assert!(
                r.1 == seen[0].1 .1,
                "sum_rows differs with {threads} threads"
            );
        }
    }
}
