//! Self-attention, forward and backward, plus the KV-cache inference path.
//! x [T = B·S, d] → q [T, H·hd], k, v [T, Hkv·hd] (+ bias) → q/k RMSNorm (per head or over the
//! full width) → RoPE → [B, H, S, hd]; GQA stacks the g = H/Hkv query heads of one KV head along
//! M so scores are one batched GEMM [B, Hkv, g·S, S] → causal (sliding-window) softmax → · V →
//! [T, H·hd] → o projection. The backward reuses q, k, v after RoPE, the probabilities and the
//! context (and the pre-norm q/k with their rstd when q/k norm is on).

use super::config::QkNorm;
use super::plan::{AttnKind, LayerPlan, QkvInput};
use crate::param_set;
use crate::runtime::ops::{self, FlashSpec, KvLayout, Matmul, RopeTable, Softmax};
use crate::runtime::{DType, Device, Error, Result, Tensor};

pub struct Attention {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}
param_set!(Attention { t q, t k, t v, t o, opt q_bias, opt k_bias, opt v_bias, opt q_norm, opt k_norm });

/// A block's attention input in inference: rows already normed, or (decode) a residual add +
/// RMSNorm still to do — x += a, normed by g — which the q/k/v projection folds in where it can
/// (`ops::add_rmsnorm_linear_qkv`). Either way x holds the new residual afterwards.
pub(crate) enum AttnIn<'a> {
    Normed(Tensor),
    AddNorm {
        x: &'a mut Tensor,
        a: Tensor,
        g: &'a Tensor,
        eps: f32,
    },
}

impl AttnIn<'_> {
    /// The normed rows (a pending add is done here, in place).
    pub(crate) fn resolve(self) -> Result<Tensor> {
        match self {
            AttnIn::Normed(h) => Ok(h),
            AttnIn::AddNorm { x, a, g, eps } => ops::add_rmsnorm(x, &a, g, eps),
        }
    }
}

/// The static shape of a layer's attention.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub qk_norm: QkNorm,
    pub eps: f32,
    pub window: Option<usize>,
    /// OLMoE `clip_qkv` (inference only): q and k clamped to ±clip after their norms, v after
    /// its projection.
    pub clip: Option<f32>,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    fn flash(&self, start: usize) -> FlashSpec {
        FlashSpec {
            scale: self.scale(),
            start,
            window: self.window,
        }
    }
}

/// A piece of one sequence's new tokens inside a prefill pass: cache row `seq`, positions
/// start..start+len, rows off..off+len of the pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub seq: usize,
    pub start: usize,
    pub off: usize,
    pub len: usize,
}

/// Causal (sliding-window) attention of q_t [B, Hkv, g·S, hd] (the g query heads of a KV head
/// stacked along M) over k_t, v_t [B, Hkv, L, hd], queries at positions start..start+S:
/// (probabilities [B, Hkv, g·S, L], context [B·S, H·hd]).
fn attend(
    sh: &AttnShape,
    q_t: &Tensor,
    k_t: &Tensor,
    v_t: &Tensor,
    b: usize,
    s: usize,
    start: usize,
) -> Result<(Tensor, Tensor)> {
    let (h, hd) = (sh.heads, sh.head_dim);
    let scores = ops::matmul(
        q_t,
        k_t,
        Matmul {
            trans_b: true,
            alpha: sh.scale(),
            ..Default::default()
        },
    )?;
    let probs = ops::softmax(
        &scores,
        Softmax {
            scale: 1.0,
            causal: Some((s, start)),
            window: sh.window,
        },
    )?;
    let ctx = ops::matmul(&probs, v_t, Matmul::default())?.reshape(&[b, h, s, hd])?;
    let ctx = ops::transpose_12(&ctx)?.reshape(&[b * s, h * hd])?;
    Ok((probs, ctx))
}

/// What the attention core keeps for its backward.
enum CoreSaved {
    /// Fused kernels: q, k, v after RoPE in their row layouts ([B, S, H, hd], [B, S, Hkv, hd])
    /// and the per-row log-sum-exps; probabilities are recomputed.
    Flash {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        lse: Tensor,
    },
    /// Scores materialised: head-major q, k, v and the probabilities [B, Hkv, g·S, S].
    Materialised {
        q_t: Tensor,
        k_t: Tensor,
        v_t: Tensor,
        probs: Tensor,
    },
}

pub struct AttnSaved {
    q_pre: Option<(Tensor, Tensor)>,
    k_pre: Option<(Tensor, Tensor)>,
    core: CoreSaved,
    ctx: Tensor,
}

impl Attention {
    /// Seeded normal init; o with `out_std`; biases zero; norms one.
    pub fn init(
        sh: &AttnShape,
        d: usize,
        bias: bool,
        std: f32,
        out_std: f32,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Attention> {
        let (hq, hk) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
        let zeros = |n: usize| -> Result<Option<Tensor>> {
            if bias {
                Ok(Some(Tensor::zeros(&[n], dtype, device)?))
            } else {
                Ok(None)
            }
        };
        let (qn, kn) = match sh.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(Tensor::full(&[sh.head_dim], 1.0, dtype, device)?),
                Some(Tensor::full(&[sh.head_dim], 1.0, dtype, device)?),
            ),
            QkNorm::Full => (
                Some(Tensor::full(&[hq], 1.0, dtype, device)?),
                Some(Tensor::full(&[hk], 1.0, dtype, device)?),
            ),
        };
        Ok(Attention {
            q: Tensor::randn(&[hq, d], std, seed ^ 0xa1, dtype, device)?,
            k: Tensor::randn(&[hk, d], std, seed ^ 0xa2, dtype, device)?,
            v: Tensor::randn(&[hk, d], std, seed ^ 0xa3, dtype, device)?,
            o: Tensor::randn(&[d, hq], out_std, seed ^ 0xa4, dtype, device)?,
            q_bias: zeros(hq)?,
            k_bias: zeros(hk)?,
            v_bias: zeros(hk)?,
            q_norm: qn,
            k_norm: kn,
        })
    }

    /// Projections, q/k norm and RoPE: (q [T, H, hd], k [T, Hkv, hd], v [T, Hkv, hd], saved
    /// pre-norm q and k with their rstd).
    #[allow(clippy::type_complexity)]
    fn qkv(
        &self,
        sh: &AttnShape,
        x: &Tensor,
        rope: &RopeTable,
        pos: &Tensor,
        save: bool,
    ) -> Result<(
        Tensor,
        Tensor,
        Tensor,
        Option<(Tensor, Tensor)>,
        Option<(Tensor, Tensor)>,
    )> {
        let t = x.dim(0);
        let (h, hkv, hd) = (sh.heads, sh.kv_heads, sh.head_dim);
        if sh.clip.is_some() && save {
            return Err(Error::Invalid(
                "training a model with clip_qkv is not supported (its clamp has no backward here)"
                    .into(),
            ));
        }
        // OLMoE's clip_qkv clamps q and k after their norms (before RoPE) and v.
        let clip = |x: Tensor| -> Result<Tensor> {
            match sh.clip {
                Some(c) => ops::clamp(&x, c),
                None => Ok(x),
            }
        };
        let q = ops::linear(x, &self.q, self.q_bias.as_ref())?;
        let k = ops::linear(x, &self.k, self.k_bias.as_ref())?;
        let v = clip(ops::linear(x, &self.v, self.v_bias.as_ref())?)?.reshape(&[t, hkv, hd])?;
        let norm = |p: Tensor,
                    w: Option<&Tensor>,
                    heads: usize|
         -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
            let Some(w) = w else {
                return Ok((p.reshape(&[t, heads, hd])?, None));
            };
            let p = match sh.qk_norm {
                QkNorm::PerHead => p.reshape(&[t, heads, hd])?,
                _ => p,
            };
            let (y, rstd) = ops::rmsnorm(&p, w, sh.eps)?;
            Ok((
                y.reshape(&[t, heads, hd])?,
                if save { Some((p, rstd)) } else { None },
            ))
        };
        let (q, q_pre) = norm(q, self.q_norm.as_ref(), h)?;
        let (k, k_pre) = norm(k, self.k_norm.as_ref(), hkv)?;
        Ok((
            ops::rope(&clip(q)?, rope, pos)?,
            ops::rope(&clip(k)?, rope, pos)?,
            v,
            q_pre,
            k_pre,
        ))
    }

    /// Training forward over B sequences of S tokens (x [B·S, d], positions [B·S]).
    pub fn forward_train(
        &self,
        sh: &AttnShape,
        x: &Tensor,
        b: usize,
        s: usize,
        rope: &RopeTable,
        pos: &Tensor,
    ) -> Result<(Tensor, AttnSaved)> {
        let (h, hkv, hd, g) = (sh.heads, sh.kv_heads, sh.head_dim, sh.group());
        let (q, k, v, q_pre, k_pre) = self.qkv(sh, x, rope, pos, true)?;
        let (core, ctx) = if ops::flash_supported(&[&q, &k, &v], hd) {
            let q = q.reshape(&[b, s, h, hd])?;
            let k = k.reshape(&[b, s, hkv, hd])?;
            let v = v.reshape(&[b, s, hkv, hd])?;
            let (o, lse) = ops::flash_attention(&q, &k, &v, KvLayout::Tokens, s, sh.flash(0))?;
            (
                CoreSaved::Flash { q, k, v, lse },
                o.reshape(&[b * s, h * hd])?,
            )
        } else {
            let q_t =
                ops::transpose_12(&q.reshape(&[b, s, h, hd])?)?.reshape(&[b, hkv, g * s, hd])?;
            let k_t = ops::transpose_12(&k.reshape(&[b, s, hkv, hd])?)?;
            let v_t = ops::transpose_12(&v.reshape(&[b, s, hkv, hd])?)?;
            let (probs, ctx) = attend(sh, &q_t, &k_t, &v_t, b, s, 0)?;
            (
                CoreSaved::Materialised {
                    q_t,
                    k_t,
                    v_t,
                    probs,
                },
                ctx,
            )
        };
        let y = ops::linear(&ctx, &self.o, None)?;
        Ok((
            y,
            AttnSaved {
                q_pre,
                k_pre,
                core,
                ctx,
            },
        ))
    }

    /// dx for dy, accumulating f32 weight gradients into `g`.
    pub fn backward(
        &self,
        sh: &AttnShape,
        x: &Tensor,
        b: usize,
        s: usize,
        rope: &RopeTable,
        pos: &Tensor,
        sv: &AttnSaved,
        dy: &Tensor,
        g: &mut Attention,
    ) -> Result<Tensor> {
        let (h, hkv, hd, gr) = (sh.heads, sh.kv_heads, sh.head_dim, sh.group());
        let t = b * s;
        let acc = Matmul {
            trans_a: true,
            out_dtype: Some(DType::F32),
            ..Default::default()
        };
        ops::matmul_into(&mut g.o, dy, &sv.ctx, acc, 1.0)?;
        let dctx = ops::matmul(dy, &self.o, Matmul::default())?;
        let (dq, dk, dv) = match &sv.core {
            CoreSaved::Flash { q, k, v, lse } => {
                let (dq, dk, dv) =
                    ops::flash_attention_backward(q, k, v, &sv.ctx, lse, &dctx, sh.flash(0))?;
                (
                    dq.reshape(&[t, h, hd])?,
                    dk.reshape(&[t, hkv, hd])?,
                    dv.reshape(&[t, hkv * hd])?,
                )
            }
            CoreSaved::Materialised {
                q_t,
                k_t,
                v_t,
                probs,
            } => {
                let dctx = ops::transpose_12(&dctx.reshape(&[b, s, h, hd])?)?.reshape(&[
                    b,
                    hkv,
                    gr * s,
                    hd,
                ])?;
                let dprobs = ops::matmul(&dctx, v_t, Matmul::nt())?;
                let dv_t = ops::matmul(probs, &dctx, Matmul::tn())?;
                let dscores = ops::softmax_backward(probs, &dprobs, 1.0)?;
                let dq_t = ops::matmul(
                    &dscores,
                    k_t,
                    Matmul {
                        alpha: sh.scale(),
                        ..Default::default()
                    },
                )?;
                let dk_t = ops::matmul(
                    &dscores,
                    q_t,
                    Matmul {
                        trans_a: true,
                        alpha: sh.scale(),
                        ..Default::default()
                    },
                )?;
                (
                    ops::transpose_12(&dq_t.reshape(&[b, h, s, hd])?)?.reshape(&[t, h, hd])?,
                    ops::transpose_12(&dk_t)?.reshape(&[t, hkv, hd])?,
                    ops::transpose_12(&dv_t)?.reshape(&[t, hkv * hd])?,
                )
            }
        };
        let dq = ops::rope_backward(&dq, rope, pos)?;
        let dk = ops::rope_backward(&dk, rope, pos)?;
        let unnorm = |d: Tensor,
                      w: Option<&Tensor>,
                      pre: &Option<(Tensor, Tensor)>,
                      gw: Option<&mut Tensor>,
                      width: usize|
         -> Result<Tensor> {
            match (w, pre, gw) {
                (Some(w), Some((p, rstd)), Some(gw)) => {
                    let d = d.reshape(p.shape())?;
                    let (dp, dw) = ops::rmsnorm_backward(p, w, rstd, &d)?;
                    ops::add_assign(gw, &dw)?;
                    dp.reshape(&[t, width])
                }
                _ => d.reshape(&[t, width]),
            }
        };
        let dq = unnorm(
            dq,
            self.q_norm.as_ref(),
            &sv.q_pre,
            g.q_norm.as_mut(),
            h * hd,
        )?;
        let dk = unnorm(
            dk,
            self.k_norm.as_ref(),
            &sv.k_pre,
            g.k_norm.as_mut(),
            hkv * hd,
        )?;
        // dx = dq·Wq + dk·Wk + dv·Wv: the second and third GEMMs accumulate into the first's
        // output (beta = 1) instead of a zeroed buffer and three adds.
        let mut dx: Option<Tensor> = None;
        for (d, w, gw, gb) in [
            (&dq, &self.q, &mut g.q, g.q_bias.as_mut()),
            (&dk, &self.k, &mut g.k, g.k_bias.as_mut()),
            (&dv, &self.v, &mut g.v, g.v_bias.as_mut()),
        ] {
            ops::matmul_into(gw, d, x, acc, 1.0)?;
            if let Some(gb) = gb {
                ops::add_assign(gb, &ops::sum_rows(d)?)?;
            }
            match dx.as_mut() {
                Some(dx) => ops::matmul_into(dx, d, w, Matmul::default(), 1.0)?,
                None => dx = Some(ops::matmul(d, w, Matmul::default())?),
            }
        }
        dx.expect("three projections").reshape(x.shape())
    }

    /// Prefill of several sequences' new tokens in one pass: x [N, d] holds the spans' rows
    /// back to back, `pos` / `seqs` [N] i32 give each row's position and cache row. Projections
    /// run over all N rows at once; attention runs per span (from position 0 the span's own K/V
    /// are all the keys, a continuation attends over the cache). Writes K/V into the cache and
    /// returns [N, d].
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &self,
        sh: &AttnShape,
        x: &Tensor,
        rope: &RopeTable,
        cache_k: &mut Tensor,
        cache_v: &mut Tensor,
        spans: &[Span],
        pos: &Tensor,
        seqs: &Tensor,
    ) -> Result<Tensor> {
        let n = x.dim(0);
        let (h, hkv, hd, g) = (sh.heads, sh.kv_heads, sh.head_dim, sh.group());
        let (q, k, v, _, _) = self.qkv(sh, x, rope, pos, false)?;
        ops::kv_write(cache_k, &k, seqs, pos)?;
        ops::kv_write(cache_v, &v, seqs, pos)?;
        let mut ctx_all = Tensor::uninit(&[n, h * hd], x.dtype(), x.device())?;
        let flash = ops::flash_supported(&[&q, &k, &v, cache_k, cache_v], hd);
        for sp in spans {
            let s = sp.len;
            let q_s = ops::slice_rows(&q, sp.off, s)?;
            if flash {
                // Fused: a fresh sequence attends over its own rows, a continuation over the
                // cache (head-major, positions 0..start + s).
                let q4 = q_s.reshape(&[1, s, h, hd])?;
                let (o, _) = if sp.start == 0 {
                    let k_s = ops::slice_rows(&k, sp.off, s)?.reshape(&[1, s, hkv, hd])?;
                    let v_s = ops::slice_rows(&v, sp.off, s)?.reshape(&[1, s, hkv, hd])?;
                    ops::flash_attention(&q4, &k_s, &v_s, KvLayout::Tokens, s, sh.flash(0))?
                } else {
                    let k_c = ops::slice_rows(cache_k, sp.seq, 1)?;
                    let v_c = ops::slice_rows(cache_v, sp.seq, 1)?;
                    ops::flash_attention(
                        &q4,
                        &k_c,
                        &v_c,
                        KvLayout::Heads,
                        sp.start + s,
                        sh.flash(sp.start),
                    )?
                };
                ops::write_rows(&mut ctx_all, sp.off, &o.reshape(&[s, h * hd])?)?;
                continue;
            }
            let q_t =
                ops::transpose_12(&q_s.reshape(&[1, s, h, hd])?)?.reshape(&[1, hkv, g * s, hd])?;
            let (k_t, v_t) = if sp.start == 0 {
                let k_s = ops::slice_rows(&k, sp.off, s)?;
                let v_s = ops::slice_rows(&v, sp.off, s)?;
                (
                    ops::transpose_12(&k_s.reshape(&[1, s, hkv, hd])?)?,
                    ops::transpose_12(&v_s.reshape(&[1, s, hkv, hd])?)?,
                )
            } else {
                (
                    ops::slice_rows(cache_k, sp.seq, 1)?,
                    ops::slice_rows(cache_v, sp.seq, 1)?,
                )
            };
            let (_, ctx) = attend(sh, &q_t, &k_t, &v_t, 1, s, sp.start)?;
            ops::write_rows(&mut ctx_all, sp.off, &ctx)?;
        }
        ops::linear(&ctx_all, &self.o, None)
    }

    /// One new token per sequence (row b of the input is sequence b's) at positions `pos` [B]
    /// (the tokens already cached), by the block's decode plan `lp`: appends K/V and attends over
    /// `lens`. Returns [B, d], or the context before the o projection, [B, H·hd], where the plan's
    /// MoE takes it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode(
        &self,
        sh: &AttnShape,
        inp: AttnIn<'_>,
        lp: &LayerPlan,
        rope: &RopeTable,
        cache_k: &mut Tensor,
        cache_v: &mut Tensor,
        pos: &Tensor,
        lens: &Tensor,
        seqs: &Tensor,
    ) -> Result<Tensor> {
        let (h, hd) = (sh.heads, sh.head_dim);
        let declined = |op: &str| {
            Error::Invalid(format!(
                "attention: the decode plan chose {op} but it does not apply (plan and op disagree)"
            ))
        };
        let norm = match (&self.q_norm, &self.k_norm) {
            (Some(q), Some(k)) => Some(ops::QkNormSpec {
                q,
                k,
                per_head: sh.qk_norm == QkNorm::PerHead,
                eps: sh.eps,
            }),
            (None, None) => None,
            _ => {
                return Err(Error::Invalid(
                    "attention has a q norm without a k norm (or the reverse)".into(),
                ))
            }
        };
        let (bq, bk, bv) = (
            self.q_bias.as_ref(),
            self.k_bias.as_ref(),
            self.v_bias.as_ref(),
        );
        let (q, k, v) = match inp {
            AttnIn::AddNorm { x, a, g, eps } if lp.qkv == QkvInput::AddNormFused => {
                let (xn, q, k, v) = ops::add_rmsnorm_linear_qkv(
                    x, &a, g, eps, &self.q, bq, &self.k, bk, &self.v, bv,
                )?
                .ok_or_else(|| declined("add_rmsnorm_linear_qkv"))?;
                *x = xn;
                (q, k, v)
            }
            inp => ops::linear_qkv(&inp.resolve()?, &self.q, bq, &self.k, bk, &self.v, bv)?,
        };
        let bsz = q.dim(0);
        // Row b is sequence b's new token (seqs is 0..B in a decode step).
        let ctx = match lp.attention {
            AttnKind::DecodeFused => ops::attention_decode_step(
                &q,
                &k,
                &v,
                norm,
                sh.clip,
                rope,
                pos,
                cache_k,
                cache_v,
                lens,
                h,
                sh.scale(),
                sh.window,
            )?
            .ok_or_else(|| declined("attention_decode_step"))?,
            AttnKind::DecodeRopeThenAttend | AttnKind::Prefill => {
                let q = ops::qk_rope_kv_write(
                    &q, &k, &v, norm, sh.clip, rope, pos, seqs, cache_k, cache_v, h,
                )?;
                ops::attention_decode(&q, cache_k, cache_v, lens, sh.scale(), sh.window)?
            }
        };
        let ctx = ctx.reshape(&[bsz, h * hd])?;
        if !lp.attention_projects() {
            return Ok(ctx);
        }
        ops::linear(&ctx, &self.o, None)
    }
}
