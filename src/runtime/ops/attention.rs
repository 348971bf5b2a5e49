//! Attention over a KV cache (inference). The cache of one layer is [B, Hkv, L, hd] per K and V.
//!   kv_write:         cache[b_i, :, p_i, :] = new[i] for tokens i (new [N, Hkv, hd]).
//!   attention_decode: one query per sequence, q [B, H, hd] against keys 0..lens[b] (the last
//!                     `window` of them with sliding-window attention); GQA maps head h to KV head
//!                     h / (H / Hkv). Bytes: the cached K and V rows read once; FLOPs 4·B·H·len·hd.
//! Kernels: `cuda/kernels/attention.cu` (one block per (b, h), 4 warps splitting the keys with an
//! online softmax, merged at the end).

use rayon::prelude::*;

use super::RopeTable;
use super::{cuda_dev, dptr, kname, same_device};
use crate::runtime::cuda::{grid_1d, kernels};
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

/// Writes rows of `new` [N, Hkv, hd] into `cache` [B, Hkv, L, hd] at (batch[i], pos[i]).
pub fn kv_write(cache: &mut Tensor, new: &Tensor, batch: &Tensor, pos: &Tensor) -> Result<()> {
    let op = "kv_write";
    same_device(op, &[cache, new, batch, pos])?;
    batch.expect_dtype(op, DType::I32)?;
    pos.expect_dtype(op, DType::I32)?;
    if cache.rank() != 4
        || new.rank() != 3
        || new.dim(1) != cache.dim(1)
        || new.dim(2) != cache.dim(3)
        || cache.dtype() != new.dtype()
    {
        return Err(Error::shape(
            op,
            format!(
                "new {:?} {} does not fit cache {:?} {}",
                new.shape(),
                new.dtype(),
                cache.shape(),
                cache.dtype()
            ),
        ));
    }
    let (b, hkv, l, hd) = (cache.dim(0), cache.dim(1), cache.dim(2), cache.dim(3));
    let n = new.dim(0);
    if batch.numel() != n || pos.numel() != n {
        return Err(Error::shape(
            op,
            format!("{n} rows need {n} batch indices and positions"),
        ));
    }
    match cache.device() {
        Device::Cpu => {
            let (bv, pv) = (
                batch.as_slice::<i32>()?.to_vec(),
                pos.as_slice::<i32>()?.to_vec(),
            );
            if let Some(i) = (0..n)
                .find(|&i| bv[i] < 0 || bv[i] as usize >= b || pv[i] < 0 || pv[i] as usize >= l)
            {
                return Err(Error::Invalid(format!(
                    "{op}: row {i} targets sequence {} position {} outside the cache ({b} × {l})",
                    bv[i], pv[i]
                )));
            }
            let src = new.cpu_f32()?.into_owned();
            let mut dst = cache.cpu_f32()?.into_owned();
            for i in 0..n {
                for h in 0..hkv {
                    let d0 = ((bv[i] as usize * hkv + h) * l + pv[i] as usize) * hd;
                    dst[d0..d0 + hd]
                        .copy_from_slice(&src[(i * hkv + h) * hd..(i * hkv + h + 1) * hd]);
                }
            }
            *cache = cpu_from_f32(dst, &[b, hkv, l, hd], cache.dtype())?;
            Ok(())
        }
        Device::Cuda(_) => {
            let total = n * hkv * hd;
            if total == 0 {
                return Ok(());
            }
            cuda_dev(cache)?
                .launch(
                    &kernels::ATTENTION,
                    &kname("kv_write", new),
                    (grid_1d(total, 256), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(cache))
                .ptr(dptr(new))
                .ptr(dptr(batch))
                .ptr(dptr(pos))
                .usize_as_i32(n)?
                .usize_as_i32(hkv)?
                .usize_as_i32(l)?
                .usize_as_i32(hd)?
                .usize_as_i32(b)?
                .run()
        }
    }
}

/// q/k RMSNorm weights for `qk_rope_kv_write`: per head (weights [hd]) or over the full
/// projection width (weights [H·hd] and [Hkv·hd]).
pub struct QkNormSpec<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub per_head: bool,
    pub eps: f32,
}

/// A decode step's attention inputs after the projections, q [B, H·hd] and k, v [B, Hkv·hd]:
/// optional q/k RMSNorm, optional clamp of q, k (after the norm) and v to ±clip (OLMoE
/// `clip_qkv`), RoPE at `pos` [B], K and V written into the caches [Bc, Hkv, L, hd] at
/// (`seqs`, `pos`). Returns q [B, H, hd]. One kernel on CUDA; the CPU twin (and the fallback for
/// heads wider than 256) is rmsnorm + clamp + rope + kv_write.
#[allow(clippy::too_many_arguments)]
pub fn qk_rope_kv_write(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    norm: Option<QkNormSpec>,
    clip: Option<f32>,
    table: &RopeTable,
    pos: &Tensor,
    seqs: &Tensor,
    cache_k: &mut Tensor,
    cache_v: &mut Tensor,
    heads: usize,
) -> Result<Tensor> {
    let op = "qk_rope_kv_write";
    same_device(op, &[q, k, v, pos, seqs, cache_k, cache_v, &table.cos])?;
    let (bsz, hkv, hd) = (q.dim(0), cache_k.dim(1), cache_k.dim(3));
    if q.rank() != 2
        || q.dim(1) != heads * hd
        || k.shape() != [bsz, hkv * hd]
        || v.shape() != [bsz, hkv * hd]
        || cache_v.shape() != cache_k.shape()
        || pos.numel() != bsz
        || seqs.numel() != bsz
        || [k.dtype(), v.dtype(), cache_k.dtype(), cache_v.dtype()]
            .iter()
            .any(|&d| d != q.dtype())
    {
        return Err(Error::shape(
            op,
            format!(
                "q {:?}, k {:?}, v {:?} ({heads} heads), pos {:?}, seqs {:?} do not fit the cache {:?} {}",
                q.shape(),
                k.shape(),
                v.shape(),
                pos.shape(),
                seqs.shape(),
                cache_k.shape(),
                cache_k.dtype()
            ),
        ));
    }
    let rot = table.rot_dim();
    if rot > hd || rot == 0 {
        return Err(Error::shape(
            op,
            format!("rotary dim {rot} does not fit head dim {hd}"),
        ));
    }
    if let Some(n) = &norm {
        let (wq, wk) = if n.per_head {
            (hd, hd)
        } else {
            (heads * hd, hkv * hd)
        };
        if n.q.numel() != wq || n.k.numel() != wk || n.q.dtype() != q.dtype() {
            return Err(Error::shape(
                op,
                format!(
                    "q/k norm weights {:?} / {:?} are not [{wq}] / [{wk}] {}",
                    n.q.shape(),
                    n.k.shape(),
                    q.dtype()
                ),
            ));
        }
    }
    if q.device() == Device::Cpu || hd > 256 {
        let normed = |x: &Tensor, w: Option<&Tensor>, h: usize| -> Result<Tensor> {
            let x = x.try_clone()?;
            match (w, norm.as_ref().map(|n| (n.per_head, n.eps))) {
                (Some(w), Some((true, eps))) => {
                    Ok(super::rmsnorm(&x.reshape(&[bsz, h, hd])?, w, eps)?.0)
                }
                (Some(w), Some((false, eps))) => {
                    super::rmsnorm(&x, w, eps)?.0.reshape(&[bsz, h, hd])
                }
                _ => x.reshape(&[bsz, h, hd]),
            }
        };
        let clipped = |x: Tensor| -> Result<Tensor> {
            match clip {
                Some(c) => super::clamp(&x, c),
                None => Ok(x),
            }
        };
        let qn = clipped(normed(q, norm.as_ref().map(|n| n.q), heads)?)?;
        let kn = clipped(normed(k, norm.as_ref().map(|n| n.k), hkv)?)?;
        let qr = super::rope(&qn, table, pos)?;
        kv_write(cache_k, &super::rope(&kn, table, pos)?, seqs, pos)?;
        kv_write(
            cache_v,
            &clipped(v.try_clone()?.reshape(&[bsz, hkv, hd])?)?,
            seqs,
            pos,
        )?;
        return Ok(qr);
    }
    let out = Tensor::uninit(&[bsz, heads, hd], q.dtype(), q.device())?;
    if bsz == 0 {
        return Ok(out);
    }
    let (mode, qw, kw, eps) = match &norm {
        None => (0, 0, 0, 0.0),
        Some(n) => (if n.per_head { 1 } else { 2 }, dptr(n.q), dptr(n.k), n.eps),
    };
    cuda_dev(q)?
        .launch(
            &kernels::ATTENTION,
            &kname("qk_rope_kv", q),
            (bsz as u32, (heads + hkv) as u32, 1),
            (128, 1, 1),
            0,
        )?
        .pdl()
        .ptr(dptr(&out))
        .ptr(dptr(cache_k))
        .ptr(dptr(cache_v))
        .ptr(dptr(q))
        .ptr(dptr(k))
        .ptr(dptr(v))
        .ptr(qw)
        .ptr(kw)
        .i32(mode)
        .f32(eps)
        .f32(clip.unwrap_or(0.0))
        .ptr(dptr(&table.cos))
        .ptr(dptr(&table.sin))
        .ptr(dptr(pos))
        .ptr(dptr(seqs))
        .usize_as_i32(heads)?
        .usize_as_i32(hkv)?
        .usize_as_i32(hd)?
        .usize_as_i32(rot / 2)?
        .usize_as_i32(table.max_positions())?
        .usize_as_i32(cache_k.dim(2))?
        .usize_as_i32(cache_k.dim(0))?
        .run()?;
    Ok(out)
}

/// Keys per block of the CUDA decode kernel (split-KV).
const DECODE_CHUNK: usize = 128;

/// Keys per split: DECODE_CHUNK, or `MOE_DECODE_CHUNK` (a multiple of 32) for tuning runs.
fn decode_chunk() -> usize {
    static CHUNK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CHUNK.get_or_init(|| {
        std::env::var("MOE_DECODE_CHUNK")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&c| c >= 32 && c % 32 == 0)
            .unwrap_or(DECODE_CHUNK)
    })
}

/// o [B, H, hd] = softmax(scale · q·Kᵀ) · V over each sequence's cached keys.
pub fn attention_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    lens: &Tensor,
    scale: f32,
    window: Option<usize>,
) -> Result<Tensor> {
    let op = "attention_decode";
    same_device(op, &[q, k_cache, v_cache, lens])?;
    lens.expect_dtype(op, DType::I32)?;
    q.expect_float(op)?;
    if q.rank() != 3
        || k_cache.rank() != 4
        || k_cache.shape() != v_cache.shape()
        || q.dim(0) != k_cache.dim(0)
        || q.dim(2) != k_cache.dim(3)
    {
        return Err(Error::shape(
            op,
            format!(
                "q {:?} does not fit caches {:?} / {:?}",
                q.shape(),
                k_cache.shape(),
                v_cache.shape()
            ),
        ));
    }
    let (b, h, hd) = (q.dim(0), q.dim(1), q.dim(2));
    let (hkv, l) = (k_cache.dim(1), k_cache.dim(2));
    if h % hkv != 0 || lens.numel() != b || hd > 256 {
        return Err(Error::shape(op, format!("{h} heads over {hkv} KV heads, {} lengths for {b} sequences, head dim {hd} (<= 256)", lens.numel())));
    }
    let group = h / hkv;
    let win = window.unwrap_or(0);
    match q.device() {
        Device::Cpu => {
            let lv = lens.as_slice::<i32>()?;
            if let Some(&bad) = lv.iter().find(|&&x| x < 1 || x as usize > l) {
                return Err(Error::Invalid(format!(
                    "{op}: sequence length {bad} outside 1..={l}"
                )));
            }
            let (qv, kv, vv) = (q.cpu_f32()?, k_cache.cpu_f32()?, v_cache.cpu_f32()?);
            let mut out = vec![0f32; b * h * hd];
            out.par_chunks_mut(hd).enumerate().for_each(|(bh, o)| {
                let (bi, hi) = (bh / h, bh % h);
                let kvh = hi / group;
                let n = lv[bi] as usize;
                let first = if win > 0 { n.saturating_sub(win) } else { 0 };
                let qr = &qv[bh * hd..(bh + 1) * hd];
                let base = (bi * hkv + kvh) * l * hd;
                let scores: Vec<f32> = (first..n)
                    .map(|j| {
                        scale
                            * qr.iter()
                                .zip(&kv[base + j * hd..base + (j + 1) * hd])
                                .map(|(a, c)| a * c)
                                .sum::<f32>()
                    })
                    .collect();
                let m = scores.iter().fold(f32::NEG_INFINITY, |a, &c| a.max(c));
                let e: Vec<f32> = scores.iter().map(|&s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (jj, j) in (first..n).enumerate() {
                    let p = e[jj] / z;
                    for (oc, &vc) in o.iter_mut().zip(&vv[base + j * hd..base + (j + 1) * hd]) {
                        *oc += p * vc;
                    }
                }
            });
            cpu_from_f32(out, &[b, h, hd], q.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&[b, h, hd], q.dtype(), q.device())?;
            if b * h > 0 {
                // Split the cache into chunks of DECODE_CHUNK keys: enough blocks to fill the GPU
                // at batch 1 (the grid depends only on the cache size, never on lengths held on
                // the device).
                let chunk = decode_chunk();
                let splits = l.div_ceil(chunk).max(1);
                let part = Tensor::uninit(&[b * h * splits * (hd + 2)], DType::F32, q.device())?;
                let dev = cuda_dev(q)?;
                // head_dim 128 in a 16-bit type: the variant with one load round per 32 keys
                // (`MOE_ATTN_H128=0` keeps the general kernel, A/B comparisons).
                static H128_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                let off = *H128_OFF
                    .get_or_init(|| std::env::var("MOE_ATTN_H128").is_ok_and(|v| v == "0"));
                let h128 = !off && hd == 128 && matches!(q.dtype(), DType::BF16 | DType::F16);
                let name = if h128 {
                    "attention_decode_h128"
                } else {
                    "attention_decode"
                };
                // The last split block of each head merges the head's partials (no combine
                // kernel) when the device's arrival counters cover b·h heads;
                // `MOE_ATTN_COMBINE_KERNEL=1` keeps the separate kernel (A/B comparisons).
                static SEPARATE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                let separate = *SEPARATE.get_or_init(|| {
                    std::env::var("MOE_ATTN_COMBINE_KERNEL").is_ok_and(|v| v == "1")
                });
                let counters = if separate || b * h > crate::runtime::cuda::ARRIVAL_COUNTERS {
                    None
                } else {
                    dev.arrival_counters()?
                };
                dev.launch(
                    &kernels::ATTENTION,
                    &kname(name, q),
                    ((b * h) as u32, splits as u32, 1),
                    (128, 1, 1),
                    0,
                )?
                .pdl()
                .ptr(dptr(&part))
                .ptr(dptr(q))
                .ptr(dptr(k_cache))
                .ptr(dptr(v_cache))
                .ptr(dptr(lens))
                .usize_as_i32(h)?
                .usize_as_i32(hkv)?
                .usize_as_i32(l)?
                .usize_as_i32(hd)?
                .f32(scale)
                .usize_as_i32(win)?
                .usize_as_i32(chunk)?
                .ptr(dptr(&out))
                .ptr(counters.unwrap_or(0))
                .run()?;
                if counters.is_none() {
                    dev.launch(
                        &kernels::ATTENTION,
                        &kname("attention_decode_combine", q),
                        ((b * h) as u32, 1, 1),
                        (128, 1, 1),
                        0,
                    )?
                    .pdl()
                    .ptr(dptr(&out))
                    .ptr(dptr(&part))
                    .usize_as_i32(splits)?
                    .usize_as_i32(hd)?
                    .run()?;
                }
            }
            Ok(out)
        }
    }
}
