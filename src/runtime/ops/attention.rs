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
use crate::runtime::{cpu_from_f32, DType, Device, Error, KernelSettings, Result, Tensor};

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
#[derive(Clone, Copy)]
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
    if seqs.numel() != q.dim(0) {
        return Err(Error::shape(
            op,
            format!("seqs {:?} for {} rows", seqs.shape(), q.dim(0)),
        ));
    }
    let (bsz, hkv, hd) = check_rope_step(op, q, k, v, &norm, table, pos, cache_k, cache_v, heads)?;
    let rot = table.rot_dim();
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
    let (mode, qw, kw, eps) = norm_args(&norm);
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

/// The shape checks shared by qk_rope_kv_write and attention_decode_step: (B, Hkv, hd).
#[allow(clippy::too_many_arguments)]
fn check_rope_step(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    norm: &Option<QkNormSpec<'_>>,
    table: &RopeTable,
    pos: &Tensor,
    cache_k: &Tensor,
    cache_v: &Tensor,
    heads: usize,
) -> Result<(usize, usize, usize)> {
    let (bsz, hkv, hd) = (q.dim(0), cache_k.dim(1), cache_k.dim(3));
    if q.rank() != 2
        || q.dim(1) != heads * hd
        || k.shape() != [bsz, hkv * hd]
        || v.shape() != [bsz, hkv * hd]
        || cache_v.shape() != cache_k.shape()
        || pos.numel() != bsz
        || [k.dtype(), v.dtype(), cache_k.dtype(), cache_v.dtype()]
            .iter()
            .any(|&d| d != q.dtype())
    {
        return Err(Error::shape(
            op,
            format!(
                "q {:?}, k {:?}, v {:?} ({heads} heads), pos {:?} do not fit the cache {:?} {}",
                q.shape(),
                k.shape(),
                v.shape(),
                pos.shape(),
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
    if let Some(n) = norm {
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
    Ok((bsz, hkv, hd))
}

/// `qk_rope_kv_write` then `attention_decode` for a decode step whose row b is sequence b's
/// one new token (q [B, H·hd], k, v [B, Hkv·hd] raw projections; caches [B, Hkv, L, hd]): on
/// CUDA for head_dim 128 in 16-bit types one kernel — each attention block norms, clips and
/// rotates its head's q itself, and the blocks whose key range holds pos[b] write the new K and
/// V rows before reading them (no qk_rope_kv kernel). Returns the context [B, H, hd], or
/// Ok(None) where it does not apply (the caller runs the two ops: the twin).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    norm: Option<QkNormSpec<'_>>,
    clip: Option<f32>,
    table: &RopeTable,
    pos: &Tensor,
    cache_k: &mut Tensor,
    cache_v: &mut Tensor,
    lens: &Tensor,
    heads: usize,
    scale: f32,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let op = "attention_decode_step";
    same_device(op, &[q, k, v, pos, cache_k, cache_v, lens, &table.cos])?;
    let (bsz, hkv, hd) = check_rope_step(op, q, k, v, &norm, table, pos, cache_k, cache_v, heads)?;
    lens.expect_dtype(op, DType::I32)?;
    pos.expect_dtype(op, DType::I32)?;
    let settings = KernelSettings::current();
    let applies = q.device().is_cuda()
        && h128(&settings, q.dtype(), hd)
        && settings.attn_fused_rope
        && cache_k.dim(0) == bsz
        && lens.numel() == bsz
        && heads % hkv == 0;
    if !applies {
        return Ok(None);
    }
    let rope = RopeArgs {
        k,
        v,
        norm,
        clip,
        table,
        pos,
    };
    let win = window.unwrap_or(0);
    Ok(Some(decode_cuda(
        q,
        cache_k,
        cache_v,
        lens,
        scale,
        win,
        (bsz, heads, hd),
        Some(rope),
    )?))
}

/// Keys per block of the CUDA decode kernel (split-KV; a multiple of 32): the grid's splits.
/// The kernels hold the same value (attention.cu's DECODE_CHUNK).
const DECODE_CHUNK: usize = 128;

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
        Device::Cuda(_) => decode_cuda(q, k_cache, v_cache, lens, scale, win, (b, h, hd), None),
    }
}

/// What attention_decode_rope_h128 takes beyond attention_decode's arguments: the raw k, v
/// projections, the q/k norm, the clip, the RoPE table and the positions.
struct RopeArgs<'a> {
    k: &'a Tensor,
    v: &'a Tensor,
    norm: Option<QkNormSpec<'a>>,
    clip: Option<f32>,
    table: &'a RopeTable,
    pos: &'a Tensor,
}

/// attention_decode on CUDA (shapes checked by the caller); with `rope`, q is the raw projection
/// [B, H·128] and the kernel does qk_rope_kv's work first (attention_decode_step).
#[allow(clippy::too_many_arguments)]
fn decode_cuda(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    lens: &Tensor,
    scale: f32,
    win: usize,
    (b, h, hd): (usize, usize, usize),
    rope: Option<RopeArgs<'_>>,
) -> Result<Tensor> {
    let (hkv, l) = (k_cache.dim(1), k_cache.dim(2));
    let out = Tensor::uninit(&[b, h, hd], q.dtype(), q.device())?;
    if b * h == 0 {
        return Ok(out);
    }
    // Split the cache into chunks of DECODE_CHUNK keys: enough blocks to fill the GPU at batch
    // 1 (the grid depends only on the cache size, never on lengths held on the device).
    let splits = l.div_ceil(DECODE_CHUNK).max(1);
    let part = Tensor::uninit(&[b * h * splits * (hd + 2)], DType::F32, q.device())?;
    let dev = cuda_dev(q)?;
    let settings = KernelSettings::current();
    // head_dim 128 in a 16-bit type: the variant with one load round per 32 keys.
    let name = match (&rope, h128(&settings, q.dtype(), hd)) {
        (Some(_), _) => "attention_decode_rope_h128",
        (None, true) => "attention_decode_h128",
        (None, false) => "attention_decode",
    };
    // The last split block of each head merges the head's partials (no combine kernel) when
    // the device's arrival counters cover b·h heads; else (or with `attn_combine_kernel`) the
    // separate kernel does.
    let counters = if settings.attn_combine_kernel || b * h > crate::runtime::cuda::ARRIVAL_COUNTERS
    {
        None
    } else {
        dev.arrival_counters()?
    };
    let launch = dev
        .launch(
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
        .ptr(dptr(&out))
        .ptr(counters.unwrap_or(0));
    match rope {
        Some(r) => {
            let (mode, qw, kw, eps) = norm_args(&r.norm);
            launch
                .ptr(dptr(r.k))
                .ptr(dptr(r.v))
                .ptr(qw)
                .ptr(kw)
                .i32(mode)
                .f32(eps)
                .f32(r.clip.unwrap_or(0.0))
                .ptr(dptr(&r.table.cos))
                .ptr(dptr(&r.table.sin))
                .ptr(dptr(r.pos))
                .usize_as_i32(r.table.rot_dim() / 2)?
                .usize_as_i32(r.table.max_positions())?
                .run()?
        }
        None => launch.run()?,
    }
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
    Ok(out)
}

/// Whether decode attention takes the head-dim-128 kernels (16-bit types; `attn_h128` off keeps
/// the general kernel).
fn h128(s: &KernelSettings, dt: DType, hd: usize) -> bool {
    s.attn_h128 && hd == 128 && matches!(dt, DType::BF16 | DType::F16)
}

/// The q/k norm as kernel arguments: (mode 0 none, 1 per head, 2 full width; q weight; k
/// weight; eps).
fn norm_args(norm: &Option<QkNormSpec<'_>>) -> (i32, u64, u64, f32) {
    match norm {
        None => (0, 0, 0, 0.0),
        Some(n) => (if n.per_head { 1 } else { 2 }, dptr(n.q), dptr(n.k), n.eps),
    }
}
