//! Fused causal attention (FlashAttention-2 scheme), forward and backward: the S×L scores are
//! never written to memory; the forward keeps per-row log-sum-exps for the backward, which
//! recomputes the probabilities tile by tile.
//!   forward:  o = softmax(scale·q·kᵀ + causal/window mask)·v,  lse = log Σ_j exp(scale·q·kⱼ)
//!   backward: D = rowsum(do∘o), P = exp(scale·q·kᵀ − lse), dv = Pᵀ·do, dS = P∘(do·vᵀ − D),
//!             dq = scale·dS·k, dk = scale·dSᵀ·q
//! q, o, do are [B, S, H, hd] (the projections' own row layout: no transposes); k, v are
//! [B, L, Hkv, hd] or, for a prefill continuing a cached sequence, a cache [B, Hkv, Lc, hd] of
//! which the first `keys` rows are read. Query i sits at position start + i and sees keys
//! j <= start + i (and start + i − j < window). GQA: head h reads KV head h / (H / Hkv).
//! FLOPs (causal, start 0): forward 2·B·H·S²·hd, backward 5·B·H·S²·hd (half the full S×S).
//! Kernels: `cuda/kernels/flash.cu` (bf16/f16, hd 64 or 128, mma.sync tiles of 64×64); the
//! CPU twin below computes the same quantities row by row in f32. Callers fall back to the
//! materialised path (matmul + softmax) where `flash_supported` says no.

use rayon::prelude::*;

use super::{cuda_dev, dptr, same_device};
use crate::runtime::cuda::kernels;
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

/// How k and v are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvLayout {
    /// [B, L, Hkv, hd]: rows as the projections write them.
    Tokens,
    /// [B, Hkv, Lc, hd]: a KV cache; the first `keys` positions are read.
    Heads,
}

/// The mask and scale of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct FlashSpec {
    pub scale: f32,
    /// Position of query 0 (keys before it are earlier tokens of the same sequence).
    pub start: usize,
    /// Sliding window: query p sees keys j with p − j < window.
    pub window: Option<usize>,
}

const TILE: usize = 64;

/// The kernels' grids put the batch in y and the 64-row blocks in z (at most 65535 each).
fn grid_fits(op: &str, b: usize, rows: usize) -> Result<()> {
    if b > 65535 || rows.div_ceil(TILE) > 65535 {
        return Err(Error::Invalid(format!(
            "{op}: batch {b} / {rows} rows exceed the CUDA kernel's grid (at most 65535 sequences \
             and 65535 blocks of {TILE} rows)"
        )));
    }
    Ok(())
}

/// Whether the CUDA kernels take these tensors (and the `flash` setting is on): bf16/f16 on a
/// GPU, head dim 64 or 128, 16-byte aligned.
pub fn flash_supported(ts: &[&Tensor], head_dim: usize) -> bool {
    crate::runtime::KernelSettings::read(|s| s.flash)
        && matches!(head_dim, 64 | 128)
        && ts.iter().all(|t| {
            matches!(t.device(), Device::Cuda(_))
                && matches!(t.dtype(), DType::BF16 | DType::F16)
                && dptr(t) % 16 == 0
        })
}

/// Geometry shared by the forward and backward.
#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    s: usize,
    h: usize,
    hkv: usize,
    hd: usize,
    /// Keys read.
    l: usize,
    /// Element strides of k/v: batch, row (key), head.
    kv: (usize, usize, usize),
}

impl Geom {
    fn group(&self) -> usize {
        self.h / self.hkv
    }
    fn kv_off(&self, b: usize, j: usize, hk: usize) -> usize {
        b * self.kv.0 + j * self.kv.1 + hk * self.kv.2
    }
    /// Keys visible to query i: lo..hi.
    fn visible(&self, i: usize, spec: &FlashSpec) -> (usize, usize) {
        let p = spec.start + i;
        let lo = spec.window.map_or(0, |w| (p + 1).saturating_sub(w));
        (lo, (p + 1).min(self.l))
    }
}

fn geometry(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: KvLayout,
    keys: usize,
    spec: &FlashSpec,
) -> Result<Geom> {
    same_device(op, &[q, k, v])?;
    q.expect_float(op)?;
    let bad = |msg: String| Err(Error::shape(op, msg));
    if q.rank() != 4 || k.rank() != 4 || k.shape() != v.shape() {
        return bad(format!(
            "q {:?} must be [B, S, H, hd] and k {:?}, v {:?} rank 4 of one shape",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return bad(format!(
            "q {}, k {}, v {} must share a dtype",
            q.dtype(),
            k.dtype(),
            v.dtype()
        ));
    }
    let (b, s, h, hd) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let (hkv, cap, kv) = match layout {
        KvLayout::Tokens => (
            k.dim(2),
            k.dim(1),
            (k.dim(1) * k.dim(2) * hd, k.dim(2) * hd, hd),
        ),
        KvLayout::Heads => (
            k.dim(1),
            k.dim(2),
            (k.dim(1) * k.dim(2) * hd, hd, k.dim(2) * hd),
        ),
    };
    if k.dim(0) != b || k.dim(3) != hd || hkv == 0 || h % hkv != 0 {
        return bad(format!(
            "q {:?} ({h} heads, head dim {hd}) does not fit k {:?} ({layout:?}): batch, head dim and a KV head count dividing the heads must agree",
            q.shape(),
            k.shape()
        ));
    }
    if keys > cap || keys < spec.start + s || keys == 0 {
        return bad(format!(
            "{keys} keys for queries at positions {}..{} in a k/v of {cap} rows (need start + S <= keys <= rows, keys >= 1)",
            spec.start,
            spec.start + s
        ));
    }
    if spec.window == Some(0) {
        return bad("window 0 masks every key".into());
    }
    Ok(Geom {
        b,
        s,
        h,
        hkv,
        hd,
        l: keys,
        kv,
    })
}

fn window_arg(spec: &FlashSpec) -> Result<i32> {
    i32::try_from(spec.window.unwrap_or(0))
        .map_err(|_| Error::Invalid("attention window does not fit 32 bits".into()))
}

/// (o [B, S, H, hd], lse [B, H, S] f32).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: KvLayout,
    keys: usize,
    spec: FlashSpec,
) -> Result<(Tensor, Tensor)> {
    let op = "flash_attention";
    let g = geometry(op, q, k, v, layout, keys, &spec)?;
    let (b, s, h, hd) = (g.b, g.s, g.h, g.hd);
    match q.device() {
        Device::Cpu => {
            let (qv, kv, vv) = (q.cpu_f32()?, k.cpu_f32()?, v.cpu_f32()?);
            let mut o = vec![0f32; b * s * h * hd];
            let mut lse_rows = vec![0f32; b * s * h];
            o.par_chunks_mut(hd)
                .zip(lse_rows.par_iter_mut())
                .enumerate()
                .for_each(|(row, (orow, lse))| {
                    let (bi, i, hi) = (row / (s * h), (row / h) % s, row % h);
                    let hk = hi / g.group();
                    let qr = &qv[row * hd..(row + 1) * hd];
                    let (lo, hi_k) = g.visible(i, &spec);
                    let scores: Vec<f32> = (lo..hi_k)
                        .map(|j| {
                            let kr = &kv[g.kv_off(bi, j, hk)..][..hd];
                            spec.scale * qr.iter().zip(kr).map(|(a, c)| a * c).sum::<f32>()
                        })
                        .collect();
                    let m = scores.iter().fold(f32::NEG_INFINITY, |a, &c| a.max(c));
                    let e: Vec<f32> = scores.iter().map(|&x| (x - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for (p, j) in e.iter().zip(lo..hi_k) {
                        let vr = &vv[g.kv_off(bi, j, hk)..][..hd];
                        for (oc, &vc) in orow.iter_mut().zip(vr) {
                            *oc += p / z * vc;
                        }
                    }
                    *lse = m + z.ln();
                });
            // [B, S, H] → [B, H, S]
            let mut lse = vec![0f32; b * h * s];
            for bi in 0..b {
                for i in 0..s {
                    for hi in 0..h {
                        lse[(bi * h + hi) * s + i] = lse_rows[(bi * s + i) * h + hi];
                    }
                }
            }
            Ok((
                cpu_from_f32(o, &[b, s, h, hd], q.dtype())?,
                cpu_from_f32(lse, &[b, h, s], DType::F32)?,
            ))
        }
        Device::Cuda(_) => {
            if !flash_supported(&[q, k, v], hd) {
                return Err(Error::Invalid(format!(
                    "{op}: the CUDA kernel takes bf16/f16 with head dim 64 or 128 (got {} / {hd})",
                    q.dtype()
                )));
            }
            grid_fits(op, b, s)?;
            let o = Tensor::uninit(q.shape(), q.dtype(), q.device())?;
            let lse = Tensor::uninit(&[b, h, s], DType::F32, q.device())?;
            if b * s * h == 0 {
                return Ok((o, lse));
            }
            let smem = (5 * TILE * hd * 2) as u32;
            cuda_dev(q)?
                .launch(
                    &kernels::FLASH,
                    &format!("flash_fwd_{}_{hd}", q.dtype().name()),
                    (h as u32, b as u32, s.div_ceil(TILE) as u32),
                    (128, 1, 1),
                    smem,
                )?
                .ptr(dptr(&o))
                .ptr(dptr(&lse))
                .ptr(dptr(q))
                .ptr(dptr(k))
                .ptr(dptr(v))
                .usize_as_i32(s)?
                .usize_as_i32(g.l)?
                .usize_as_i32(h)?
                .usize_as_i32(g.group())?
                .usize_as_i32(spec.start)?
                .i32(window_arg(&spec)?)
                .f32(spec.scale)
                .i64(g.kv.0 as i64)
                .i64(g.kv.1 as i64)
                .i64(g.kv.2 as i64)
                .run()?;
            Ok((o, lse))
        }
    }
}

/// Gradients (dq [B, S, H, hd], dk, dv [B, L, Hkv, hd]) of `flash_attention` over k, v in the
/// `Tokens` layout (all L rows are keys, L >= start + S), given its output `o`, `lse` and
/// d_o = ∂loss/∂o (o and d_o may be shaped [B·S, H·hd]: they are read in q's layout).
pub fn flash_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    spec: FlashSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "flash_attention_backward";
    let g = geometry(op, q, k, v, KvLayout::Tokens, k.dim(1), &spec)?;
    let (b, s, h, hd, hkv, l) = (g.b, g.s, g.h, g.hd, g.hkv, g.l);
    same_device(op, &[q, o, lse, d_o])?;
    if o.numel() != q.numel() || d_o.numel() != q.numel() || lse.shape() != [b, h, s] {
        return Err(Error::shape(
            op,
            format!(
                "o {:?} and do {:?} must hold q's {:?} elements (read in its layout), lse {:?} must be [{b}, {h}, {s}]",
                o.shape(),
                d_o.shape(),
                q.shape(),
                lse.shape()
            ),
        ));
    }
    lse.expect_dtype(op, DType::F32)?;
    if o.dtype() != q.dtype() || d_o.dtype() != q.dtype() {
        return Err(Error::Invalid(format!(
            "{op}: o {} and do {} must be {}",
            o.dtype(),
            d_o.dtype(),
            q.dtype()
        )));
    }
    match q.device() {
        Device::Cpu => {
            let (qv, kv, vv) = (q.cpu_f32()?, k.cpu_f32()?, v.cpu_f32()?);
            let (ov, dov, lv) = (o.cpu_f32()?, d_o.cpu_f32()?, lse.cpu_f32()?);
            let gr = g.group();
            let row = |bi: usize, i: usize, hi: usize| ((bi * s + i) * h + hi) * hd;
            // One task per (batch, KV head): dk, dv of its keys and dq of its g query heads.
            let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * hkv)
                .into_par_iter()
                .map(|task| {
                    let (bi, hk) = (task / hkv, task % hkv);
                    let (mut dk, mut dv) = (vec![0f32; l * hd], vec![0f32; l * hd]);
                    let mut dq = vec![0f32; gr * s * hd];
                    for hh in 0..gr {
                        let hi = hk * gr + hh;
                        for i in 0..s {
                            let (qr, dor) =
                                (&qv[row(bi, i, hi)..][..hd], &dov[row(bi, i, hi)..][..hd]);
                            let dd: f32 = dor
                                .iter()
                                .zip(&ov[row(bi, i, hi)..][..hd])
                                .map(|(a, c)| a * c)
                                .sum();
                            let lse_i = lv[(bi * h + hi) * s + i];
                            let (lo, hi_k) = g.visible(i, &spec);
                            let dqr = &mut dq[(hh * s + i) * hd..][..hd];
                            for j in lo..hi_k {
                                let (kr, vr) = (
                                    &kv[g.kv_off(bi, j, hk)..][..hd],
                                    &vv[g.kv_off(bi, j, hk)..][..hd],
                                );
                                let sc: f32 = qr.iter().zip(kr).map(|(a, c)| a * c).sum();
                                let p = (spec.scale * sc - lse_i).exp();
                                let dp: f32 = dor.iter().zip(vr).map(|(a, c)| a * c).sum();
                                let ds = p * (dp - dd) * spec.scale;
                                for c in 0..hd {
                                    dv[j * hd + c] += p * dor[c];
                                    dk[j * hd + c] += ds * qr[c];
                                    dqr[c] += ds * kr[c];
                                }
                            }
                        }
                    }
                    (dk, dv, dq)
                })
                .collect();
            let mut dq = vec![0f32; b * s * h * hd];
            let (mut dk, mut dv) = (vec![0f32; b * l * hkv * hd], vec![0f32; b * l * hkv * hd]);
            for (task, (pk, pv, pq)) in parts.into_iter().enumerate() {
                let (bi, hk) = (task / hkv, task % hkv);
                for j in 0..l {
                    let at = ((bi * l + j) * hkv + hk) * hd;
                    dk[at..at + hd].copy_from_slice(&pk[j * hd..(j + 1) * hd]);
                    dv[at..at + hd].copy_from_slice(&pv[j * hd..(j + 1) * hd]);
                }
                for hh in 0..gr {
                    for i in 0..s {
                        let at = row(bi, i, hk * gr + hh);
                        dq[at..at + hd].copy_from_slice(&pq[(hh * s + i) * hd..][..hd]);
                    }
                }
            }
            Ok((
                cpu_from_f32(dq, q.shape(), q.dtype())?,
                cpu_from_f32(dk, k.shape(), q.dtype())?,
                cpu_from_f32(dv, v.shape(), q.dtype())?,
            ))
        }
        Device::Cuda(_) => {
            if !flash_supported(&[q, k, v, o, d_o], hd) {
                return Err(Error::Invalid(format!(
                    "{op}: the CUDA kernel takes bf16/f16 with head dim 64 or 128 (got {} / {hd})",
                    q.dtype()
                )));
            }
            let rows = b * s * h;
            if rows == 0 {
                return Ok((
                    Tensor::zeros(q.shape(), q.dtype(), q.device())?,
                    Tensor::zeros(k.shape(), k.dtype(), k.device())?,
                    Tensor::zeros(v.shape(), v.dtype(), v.device())?,
                ));
            }
            let dev = cuda_dev(q)?;
            let dk = Tensor::uninit(k.shape(), k.dtype(), k.device())?;
            let dv = Tensor::uninit(v.shape(), v.dtype(), v.device())?;
            grid_fits(op, b, s.max(l))?;
            let dq_acc = Tensor::zeros(q.shape(), DType::F32, q.device())?;
            {
                let dsum = Tensor::uninit(&[b, h, s], DType::F32, q.device())?;
                dev.launch(
                    &kernels::FLASH,
                    &format!("flash_bwd_dot_{}", q.dtype().name()),
                    (rows.div_ceil(4) as u32, 1, 1),
                    (128, 1, 1),
                    0,
                )?
                .ptr(dptr(&dsum))
                .ptr(dptr(o))
                .ptr(dptr(d_o))
                .usize_as_i32(s)?
                .usize_as_i32(h)?
                .usize_as_i32(hd)?
                .usize_as_i32(rows)?
                .run()?;
                let smem = (6 * TILE * hd * 2 + TILE * TILE * 2 + 4 * TILE * 4) as u32;
                dev.launch(
                    &kernels::FLASH,
                    &format!("flash_bwd_{}_{hd}", q.dtype().name()),
                    (hkv as u32, b as u32, l.div_ceil(TILE) as u32),
                    (128, 1, 1),
                    smem,
                )?
                .ptr(dptr(&dq_acc))
                .ptr(dptr(&dk))
                .ptr(dptr(&dv))
                .ptr(dptr(q))
                .ptr(dptr(k))
                .ptr(dptr(v))
                .ptr(dptr(d_o))
                .ptr(dptr(lse))
                .ptr(dptr(&dsum))
                .usize_as_i32(s)?
                .usize_as_i32(l)?
                .usize_as_i32(h)?
                .usize_as_i32(g.group())?
                .usize_as_i32(spec.start)?
                .i32(window_arg(&spec)?)
                .f32(spec.scale)
                .run()?;
            }
            Ok((super::cast(&dq_acc, q.dtype())?, dk, dv))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ops::{self, Matmul, Softmax};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    /// The scores materialised with the matmul and softmax ops (the non-fused path).
    fn materialised(q: &Tensor, k: &Tensor, v: &Tensor, spec: FlashSpec) -> Vec<f32> {
        let (b, s, h, hd) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
        let (l, hkv) = (k.dim(1), k.dim(2));
        let q_t = ops::transpose_12(q)
            .unwrap()
            .reshape(&[b, hkv, h / hkv * s, hd])
            .unwrap();
        let (k_t, v_t) = (ops::transpose_12(k).unwrap(), ops::transpose_12(v).unwrap());
        let scores = ops::matmul(
            &q_t,
            &k_t,
            Matmul {
                trans_b: true,
                alpha: spec.scale,
                ..Default::default()
            },
        )
        .unwrap();
        let probs = ops::softmax(
            &scores,
            Softmax {
                scale: 1.0,
                causal: Some((s, spec.start)),
                window: spec.window,
            },
        )
        .unwrap();
        assert_eq!(scores.dim(3), l);
        let ctx = ops::matmul(&probs, &v_t, Matmul::default())
            .unwrap()
            .reshape(&[b, h, s, hd])
            .unwrap();
        ops::transpose_12(&ctx).unwrap().to_f32_vec().unwrap()
    }

    #[test]
    fn cpu_forward_matches_materialised_attention() {
        // GQA 6 heads over 2 KV heads, a window, queries continuing at position 3 of 12 keys.
        for (window, start) in [(None, 0usize), (Some(4usize), 0), (None, 3), (Some(5), 3)] {
            let (b, s, h, hkv, hd) = (2, 9, 6, 2, 8);
            let l = start + s;
            let spec = FlashSpec {
                scale: 0.4,
                start,
                window,
            };
            let q = randn(&[b, s, h, hd], 1);
            let k = randn(&[b, l, hkv, hd], 2);
            let v = randn(&[b, l, hkv, hd], 3);
            let (o, lse) = flash_attention(&q, &k, &v, KvLayout::Tokens, l, spec).unwrap();
            let want = materialised(&q, &k, &v, spec);
            let got = o.to_f32_vec().unwrap();
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "o[{i}] {x} vs {y} ({spec:?})"
                );
            }
            // lse by hand in f64 over the visible keys.
            let (qv, kv, lv) = (
                q.to_f32_vec().unwrap(),
                k.to_f32_vec().unwrap(),
                lse.to_f32_vec().unwrap(),
            );
            for bi in 0..b {
                for hi in 0..h {
                    for i in 0..s {
                        let p = start + i;
                        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
                        let z: f64 = (lo..=p)
                            .map(|j| {
                                let dot: f64 = (0..hd)
                                    .map(|c| {
                                        qv[((bi * s + i) * h + hi) * hd + c] as f64
                                            * kv[((bi * l + j) * hkv + hi / 3) * hd + c] as f64
                                    })
                                    .sum();
                                (spec.scale as f64 * dot).exp()
                            })
                            .sum();
                        let got = lv[(bi * h + hi) * s + i] as f64;
                        assert!(
                            (got - z.ln()).abs() < 1e-5 * (1.0 + got.abs()),
                            "lse {got} vs {}",
                            z.ln()
                        );
                    }
                }
            }
            // The same keys as a head-major cache with spare rows give the same output.
            let cache = |t: &Tensor| {
                let t = ops::transpose_12(t).unwrap().to_f32_vec().unwrap();
                let mut c = vec![7.0f32; b * hkv * (l + 4) * hd];
                for bh in 0..b * hkv {
                    c[bh * (l + 4) * hd..][..l * hd].copy_from_slice(&t[bh * l * hd..][..l * hd]);
                }
                Tensor::from_f32(&c, &[b, hkv, l + 4, hd], DType::F32, Device::Cpu).unwrap()
            };
            let (o2, _) =
                flash_attention(&q, &cache(&k), &cache(&v), KvLayout::Heads, l, spec).unwrap();
            assert_eq!(o2.to_f32_vec().unwrap(), got);
        }
    }

    #[test]
    fn cpu_backward_matches_finite_differences() {
        let (b, s, h, hkv, hd) = (2, 7, 4, 2, 8);
        for window in [None, Some(3usize)] {
            let spec = FlashSpec {
                scale: 0.35,
                start: 0,
                window,
            };
            let q = randn(&[b, s, h, hd], 11);
            let k = randn(&[b, s, hkv, hd], 12);
            let v = randn(&[b, s, hkv, hd], 13);
            let w = randn(&[b, s, h, hd], 14);
            let wv = w.to_f32_vec().unwrap();
            let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
                let (o, _) = flash_attention(q, k, v, KvLayout::Tokens, s, spec).unwrap();
                o.to_f32_vec()
                    .unwrap()
                    .iter()
                    .zip(&wv)
                    .map(|(a, c)| (a * c) as f64)
                    .sum()
            };
            let (o, lse) = flash_attention(&q, &k, &v, KvLayout::Tokens, s, spec).unwrap();
            let grads = flash_attention_backward(&q, &k, &v, &o, &lse, &w, spec).unwrap();
            let inputs = [&q, &k, &v];
            for (which, g) in [&grads.0, &grads.1, &grads.2].into_iter().enumerate() {
                let gv = g.to_f32_vec().unwrap();
                let base = inputs[which].to_f32_vec().unwrap();
                let gmax = gv.iter().fold(0f32, |a, &x| a.max(x.abs()));
                assert!(gmax > 1e-2, "gradient {which} is ~zero");
                let eps = 3e-3f32;
                for i in 0..base.len() {
                    let shifted = |d: f32| {
                        let mut x = base.clone();
                        x[i] += d;
                        let t =
                            Tensor::from_f32(&x, inputs[which].shape(), DType::F32, Device::Cpu)
                                .unwrap();
                        let mut args = [
                            q.try_clone().unwrap(),
                            k.try_clone().unwrap(),
                            v.try_clone().unwrap(),
                        ];
                        args[which] = t;
                        loss(&args[0], &args[1], &args[2])
                    };
                    let fd = ((shifted(eps) - shifted(-eps)) / (2.0 * eps as f64)) as f32;
                    assert!(
                        (fd - gv[i]).abs() <= 5e-3 * gmax,
                        "d{}[{i}] analytic {} vs finite difference {fd} (window {window:?})",
                        ["q", "k", "v"][which],
                        gv[i]
                    );
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let q = randn(&[1, 4, 4, 8], 1);
        let k = randn(&[1, 4, 3, 8], 2);
        let spec = FlashSpec {
            scale: 1.0,
            start: 0,
            window: None,
        };
        let e = flash_attention(&q, &k, &k, KvLayout::Tokens, 4, spec).unwrap_err();
        assert!(e.to_string().contains("KV head"), "{e}");
        let k = randn(&[1, 4, 2, 8], 2);
        let e = flash_attention(&q, &k, &k, KvLayout::Tokens, 3, spec).unwrap_err();
        assert!(e.to_string().contains("keys"), "{e}");
        let e = flash_attention(
            &q,
            &k,
            &k,
            KvLayout::Tokens,
            4,
            FlashSpec {
                window: Some(0),
                ..spec
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
    }
}
