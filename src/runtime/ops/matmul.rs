//! Matrix products. `matmul` covers plain, transposed and batched products (a batch of A against
//! a batch of B, or against one shared B); `linear` is `x·Wᵀ (+ b)` over any leading dims.
//! CPU: the `gemm` crate on f32 (bf16/f16 widened). CUDA: cuBLAS with f32 accumulation.
//! FLOPs per call: 2·batch·M·N·K.

use super::{cuda_dev, dptr, same_device};
use crate::runtime::cuda::{blas_gemm, kernels, GemmArgs, GemmOperand};
use crate::runtime::{cpu_from_f32, DType, Device, Error, KernelSettings, Result, Tensor};

/// How to multiply: `out = alpha · op(a) · op(b)`, with `op` transposing the last two dims when
/// the flag is set. `out_dtype` defaults to `a`'s dtype (bf16 operands may produce f32, e.g. for
/// weight gradients accumulated in f32).
#[derive(Copy, Clone, Debug)]
pub struct Matmul {
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub out_dtype: Option<DType>,
}

impl Default for Matmul {
    fn default() -> Self {
        Matmul {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            out_dtype: None,
        }
    }
}

impl Matmul {
    pub fn nt() -> Self {
        Matmul {
            trans_b: true,
            ..Default::default()
        }
    }
    pub fn tn() -> Self {
        Matmul {
            trans_a: true,
            ..Default::default()
        }
    }
}

struct Dims {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    b_batched: bool,
    out_shape: Vec<usize>,
}

fn dims(a: &Tensor, b: &Tensor, spec: &Matmul) -> Result<Dims> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::shape(
            "matmul",
            format!(
                "operands need >= 2 dims, got {:?} and {:?}",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let (ar, ac) = (a.dim(-2), a.dim(-1));
    let (br, bc) = (b.dim(-2), b.dim(-1));
    let (m, k) = if spec.trans_a { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if spec.trans_b { (bc, br) } else { (br, bc) };
    if k != kb {
        return Err(Error::shape(
            "matmul",
            format!(
                "inner dims differ: {:?}{} · {:?}{}",
                a.shape(),
                if spec.trans_a { "ᵀ" } else { "" },
                b.shape(),
                if spec.trans_b { "ᵀ" } else { "" }
            ),
        ));
    }
    let a_batch = &a.shape()[..a.rank() - 2];
    let b_batch = &b.shape()[..b.rank() - 2];
    let b_batched = !b_batch.is_empty();
    if b_batched && a_batch != b_batch {
        return Err(Error::shape(
            "matmul",
            format!("batch dims differ: {:?} vs {:?}", a.shape(), b.shape()),
        ));
    }
    let mut out_shape = a_batch.to_vec();
    out_shape.extend([m, n]);
    let batch: usize = a_batch.iter().product();
    // Against one shared B, an untransposed A's batch folds into M: one large GEMM.
    if !b_batched && !spec.trans_a {
        return Ok(Dims {
            batch: 1,
            m: batch * m,
            n,
            k,
            b_batched,
            out_shape,
        });
    }
    Ok(Dims {
        batch,
        m,
        n,
        k,
        b_batched,
        out_shape,
    })
}

/// `alpha · op(a) · op(b)` as a new tensor.
pub fn matmul(a: &Tensor, b: &Tensor, spec: Matmul) -> Result<Tensor> {
    let d = dims(a, b, &spec)?;
    let dtype = spec.out_dtype.unwrap_or(a.dtype());
    let mut out = Tensor::uninit(&d.out_shape, dtype, a.device())?;
    run(&mut out, a, b, &spec, &d, 0.0)?;
    Ok(out)
}

/// `out = alpha · op(a) · op(b) + beta · out` (beta = 1 accumulates, e.g. weight gradients).
pub fn matmul_into(
    out: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
    spec: Matmul,
    beta: f32,
) -> Result<()> {
    let d = dims(a, b, &spec)?;
    out.expect_shape("matmul_into", "out", &d.out_shape)?;
    run(out, a, b, &spec, &d, beta)
}

/// `x·Wᵀ (+ bias)`: x [.., K], w [N, K], bias [N] -> [.., N].
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if w.rank() != 2 || x.dim(-1) != w.dim(1) {
        return Err(Error::shape(
            "linear",
            format!(
                "x {:?} does not fit weight {:?} ([out, in])",
                x.shape(),
                w.shape()
            ),
        ));
    }
    let y = matmul(x, w, Matmul::nt())?;
    match bias {
        Some(b) => super::add_bias(&y, b),
        None => Ok(y),
    }
}

/// The q, k and v projections of the same rows: (x·Wqᵀ + bq, x·Wkᵀ + bk, x·Wvᵀ + bv) with Wk and
/// Wv of one shape. On CUDA with a few 16-bit rows (decode) the three GEMVs are one launch; the
/// CPU twin (and every other case) is three `linear` calls.
#[allow(clippy::too_many_arguments)]
pub fn linear_qkv(
    x: &Tensor,
    wq: &Tensor,
    bq: Option<&Tensor>,
    wk: &Tensor,
    bk: Option<&Tensor>,
    wv: &Tensor,
    bv: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !qkv_fused(x, wq, wk, wv) {
        return Ok((linear(x, wq, bq)?, linear(x, wk, bk)?, linear(x, wv, bv)?));
    }
    same_device("linear_qkv", &[x, wq, wk, wv])?;
    let (yq, yk, yv) = qkv_launch(x, wq, wk, wv, None)?;
    qkv_bias((yq, yk, yv), bq, bk, bv)
}

/// The residual add + RMSNorm of the rows (`add_rmsnorm` on a copy of x: x + a, normed by g)
/// and then `linear_qkv` of them; on CUDA, where the three GEMVs are one launch, each of its
/// blocks norms the rows itself (the first writes the new residual): no add_rmsnorm kernel.
/// Returns (new residual, q, k, v); x is not modified. Ok(None) where the fused kernel does not
/// apply on CUDA (the caller norms, then projects).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn add_rmsnorm_linear_qkv(
    x: &Tensor,
    a: &Tensor,
    g: &Tensor,
    eps: f32,
    wq: &Tensor,
    bq: Option<&Tensor>,
    wk: &Tensor,
    bk: Option<&Tensor>,
    wv: &Tensor,
    bv: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor, Tensor, Tensor)>> {
    let op = "add_rmsnorm_linear_qkv";
    same_device(op, &[x, a, g, wq, wk, wv])?;
    super::norm::check_folded_addnorm(op, x, a, g)?;
    if !x.device().is_cuda() {
        let mut xn = x.try_clone()?;
        let h = super::add_rmsnorm(&mut xn, a, g, eps)?;
        let (q, k, v) = linear_qkv(&h, wq, bq, wk, bk, wv, bv)?;
        return Ok(Some((xn, q, k, v)));
    }
    if !qkv_fused(x, wq, wk, wv) || g.rank() != 1 || g.dim(0) != x.dim(1) {
        return Ok(None);
    }
    let xn = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
    let (yq, yk, yv) = qkv_launch(x, wq, wk, wv, Some((a, g, eps, &xn)))?;
    let (q, k, v) = qkv_bias((yq, yk, yv), bq, bk, bv)?;
    Ok(Some((xn, q, k, v)))
}

/// Whether linear_qkv's one-launch GEMV applies: CUDA, 1..=8 rows of a 16-bit type, K % 8 == 0,
/// Wk and Wv of one shape, all of x's dtype.
fn qkv_fused(x: &Tensor, wq: &Tensor, wk: &Tensor, wv: &Tensor) -> bool {
    let k = x.dim(-1);
    let m = x.numel() / k.max(1);
    x.device().is_cuda()
        && x.rank() == 2
        && (1..=8).contains(&m)
        && x.dtype().size_in_bytes() == 2
        && k % 8 == 0
        && wq.rank() == 2
        && wq.dim(1) == k
        && wk.shape() == wv.shape()
        && wk.rank() == 2
        && wk.dim(1) == k
        && [wq.dtype(), wk.dtype(), wv.dtype()]
            .iter()
            .all(|&d| d == x.dtype())
}

/// Rows up to which the q/k/v GEMV folds the RMSNorm into its products (gemv3_addnormf: the
/// rows' factor applied after the dot products, no norm pass; 79 registers against 104 at one
/// row, but more than the norm pass at 8) rather than norming the rows first (gemv3_addnorm;
/// BENCHMARKS 2026-12-01 ninth session, with the router fold).
const QKV_FOLD_ROWS: usize = 4;

/// The one-row folded q/k/v GEMV as a streaming loop (gemv3_addnormf_loop: one wave of blocks,
/// each looping over column groups with the next group's weights in flight): 4 blocks per SM,
/// 4-column groups (BENCHMARKS, 2026-12-01 tenth session: OLMoE batch-1 step 1.005 / 1.008 ->
/// 0.997 / 0.998 ms, Qwen3 1.469 -> 1.452; 5 blocks per SM the same, 8 columns 1.013 / 1.479).
const QKV_LOOP: (usize, usize) = (4, 4);

/// The gemv3 launch (qkv_fused checked); with `addnorm` = (a, g, eps, new residual) the rows
/// are x + a normed by g (gemv3_addnorm).
fn qkv_launch(
    x: &Tensor,
    wq: &Tensor,
    wk: &Tensor,
    wv: &Tensor,
    addnorm: Option<(&Tensor, &Tensor, f32, &Tensor)>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (m, k) = (x.dim(0), x.dim(1));
    let (nq, nk) = (wq.dim(0), wk.dim(0));
    let yq = Tensor::uninit(&[m, nq], x.dtype(), x.device())?;
    let yk = Tensor::uninit(&[m, nk], x.dtype(), x.device())?;
    let yv = Tensor::uninit(&[m, nk], x.dtype(), x.device())?;
    let cols = super::grouped_cuda::SMALL_COLS;
    let mut blocks = nq.div_ceil(cols) + 2 * nk.div_ceil(cols);
    let (name, smem) = match addnorm {
        Some(_) if m <= QKV_FOLD_ROWS => ("gemv3_addnormf", 0),
        Some(_) => ("gemv3_addnorm", m * k * x.dtype().size_in_bytes()),
        None => ("gemv3_nt", 0),
    };
    let dev = cuda_dev(x)?;
    let mut kernel = format!(
        "{name}_r{}_{}",
        super::grouped_cuda::small_rows(m),
        x.dtype().name()
    );
    // One row and K within two 16-byte vectors per thread: the streaming loop.
    let (per_sm, c) = QKV_LOOP;
    let wave = match (KernelSettings::read(|s| s.qkv_loop), name, m) {
        (true, "gemv3_addnormf", 1) => super::grouped_cuda::loop_wave(&dev, per_sm, k, x.dtype()),
        _ => None,
    };
    if let Some((nv, wave)) = wave {
        let groups = nq.div_ceil(c) + 2 * nk.div_ceil(c);
        blocks = wave.clamp(1, groups);
        kernel = format!("gemv3_addnormf_loop_c{c}v{nv}_{}", x.dtype().name());
    }
    let launch = dev
        .launch(
            &kernels::GEMV,
            &kernel,
            (blocks as u32, 1, 1),
            (256, 1, 1),
            smem as u32,
        )?
        .pdl()
        .ptr(dptr(&yq))
        .ptr(dptr(&yk))
        .ptr(dptr(&yv))
        .ptr(dptr(x))
        .ptr(dptr(wq))
        .ptr(dptr(wk))
        .ptr(dptr(wv))
        .usize_as_i32(m)?
        .usize_as_i32(nq)?
        .usize_as_i32(nk)?
        .usize_as_i32(k)?;
    match addnorm {
        Some((a, g, eps, xn)) => launch
            .ptr(dptr(a))
            .ptr(dptr(g))
            .f32(eps)
            .ptr(dptr(xn))
            .run()?,
        None => launch.run()?,
    }
    Ok((yq, yk, yv))
}

fn qkv_bias(
    (yq, yk, yv): (Tensor, Tensor, Tensor),
    bq: Option<&Tensor>,
    bk: Option<&Tensor>,
    bv: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let bias = |y: Tensor, b: Option<&Tensor>| match b {
        Some(b) => super::add_bias(&y, b),
        None => Ok(y),
    };
    Ok((bias(yq, bq)?, bias(yk, bk)?, bias(yv, bv)?))
}

fn run(out: &mut Tensor, a: &Tensor, b: &Tensor, spec: &Matmul, d: &Dims, beta: f32) -> Result<()> {
    let dev = same_device("matmul", &[a, b, out])?;
    a.expect_float("matmul")?;
    if a.dtype() != b.dtype() {
        return Err(Error::Invalid(format!(
            "matmul: operand dtypes differ ({} vs {})",
            a.dtype(),
            b.dtype()
        )));
    }
    if d.batch == 0 || d.m == 0 || d.n == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => cpu_matmul(out, a, b, spec, d, beta),
        Device::Cuda(_) => {
            let ac = a.dim(-1);
            let (br, bc) = (b.dim(-2), b.dim(-1));
            let args = GemmArgs {
                m: d.m,
                n: d.n,
                k: d.k,
                batch: d.batch,
                a: GemmOperand {
                    ptr: dptr(a),
                    dtype: a.dtype(),
                    ld: ac,
                    batch_stride: d.m * d.k,
                    trans: spec.trans_a,
                },
                b: GemmOperand {
                    ptr: dptr(b),
                    dtype: b.dtype(),
                    ld: bc,
                    batch_stride: if d.b_batched { br * bc } else { 0 },
                    trans: spec.trans_b,
                },
                c: GemmOperand {
                    ptr: dptr(out),
                    dtype: out.dtype(),
                    ld: d.n,
                    batch_stride: d.m * d.n,
                    trans: false,
                },
                alpha: spec.alpha,
                beta,
            };
            if d.k == 0 {
                // cuBLAS leaves C untouched for K = 0; the product is then beta·C.
                return super::elementwise::scale_in_place(out, beta);
            }
            let elt = a.dtype().size_in_bytes();
            if d.m <= 8
                && d.batch == 1
                && !spec.trans_a
                && spec.trans_b
                && spec.alpha == 1.0
                && beta == 0.0
                && elt == 2
                && d.k % 8 == 0
                && (out.dtype() == a.dtype() || out.dtype() == DType::F32)
            {
                // A few rows (decode): a memory-bound GEMV reading the weights once with 16-byte
                // loads (grouped_cuda's small-M kernel with one group).
                let suffix = if out.dtype() == a.dtype() { "" } else { "_f32" };
                let rows = super::grouped_cuda::small_rows(d.m);
                return cuda_dev(a)?
                    .launch(
                        &kernels::GEMV,
                        &format!("gemv_nt_r{rows}_{}{suffix}", a.dtype().name()),
                        (d.n.div_ceil(super::grouped_cuda::SMALL_COLS) as u32, 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .pdl()
                    .ptr(dptr(out))
                    .ptr(dptr(a))
                    .ptr(dptr(b))
                    .usize_as_i32(d.m)?
                    .usize_as_i32(d.n)?
                    .usize_as_i32(d.k)?
                    .run();
            }
            blas_gemm(&*cuda_dev(a)?, &args)
        }
    }
}

fn cpu_matmul(
    out: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
    spec: &Matmul,
    d: &Dims,
    beta: f32,
) -> Result<()> {
    let av = a.cpu_f32()?;
    let bv = b.cpu_f32()?;
    let out_dtype = out.dtype();
    let mut ov: Vec<f32> = if beta != 0.0 {
        out.to_f32_vec()?
    } else {
        vec![0.0; d.batch * d.m * d.n]
    };
    let ac = a.dim(-1);
    let (br, bc) = (b.dim(-2), b.dim(-1));
    // Element strides of op(A)[i, p] and op(B)[p, j] in row-major storage.
    let (a_rs, a_cs) = if spec.trans_a {
        (1, ac as isize)
    } else {
        (ac as isize, 1)
    };
    let (b_rs, b_cs) = if spec.trans_b {
        (1, bc as isize)
    } else {
        (bc as isize, 1)
    };
    let threads = rayon::current_num_threads();
    for bi in 0..d.batch {
        let a_off = bi * d.m * d.k;
        let b_off = if d.b_batched { bi * br * bc } else { 0 };
        let o = &mut ov[bi * d.m * d.n..(bi + 1) * d.m * d.n];
        let par = if 2 * d.m * d.n * d.k > 1 << 16 && threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        unsafe {
            gemm::gemm(
                d.m,
                d.n,
                d.k,
                o.as_mut_ptr(),
                1,
                d.n as isize,
                beta != 0.0,
                av[a_off..].as_ptr(),
                a_cs,
                a_rs,
                bv[b_off..].as_ptr(),
                b_cs,
                b_rs,
                // gemm computes dst = alpha·dst + beta·lhs·rhs: its alpha is our beta.
                beta,
                spec.alpha,
                false,
                false,
                false,
                par,
            );
        }
    }
    let shape = out.shape().to_vec();
    *out = cpu_from_f32(ov, &shape, out_dtype)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let x = if ta { a[p * m + i] } else { a[i * k + p] };
                    let y = if tb { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += x as f64 * y as f64;
                }
            }
        }
        c.into_iter().map(|x| x as f32).collect()
    }

    #[test]
    fn matmul_all_transposes_match_naive() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 17 % 13) as f32 - 6.0) * 0.1)
            .collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let ash = if ta { [k, m] } else { [m, k] };
            let bsh = if tb { [n, k] } else { [k, n] };
            let at = Tensor::from_vec(a.clone(), &ash).unwrap();
            let bt = Tensor::from_vec(b.clone(), &bsh).unwrap();
            let c = matmul(
                &at,
                &bt,
                Matmul {
                    trans_a: ta,
                    trans_b: tb,
                    ..Default::default()
                },
            )
            .unwrap();
            let want = naive(&a, &b, m, n, k, ta, tb);
            for (x, y) in c.to_vec::<f32>().unwrap().iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "{ta} {tb}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn matmul_rejects_mismatched_inner_dims() {
        let a = Tensor::zeros(&[2, 3], DType::F32, Device::Cpu).unwrap();
        let b = Tensor::zeros(&[4, 2], DType::F32, Device::Cpu).unwrap();
        let err = matmul(&a, &b, Matmul::default()).unwrap_err().to_string();
        assert!(err.contains("inner dims differ"), "{err}");
    }
}
