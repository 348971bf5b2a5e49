//! The inference pass: `forward_infer` appends tokens to a KV cache and returns logits — prefill
//! in passes of at most `PREFILL_TOKENS` rows, or one decode step (through the cache's graphs,
//! graphs.rs) — each running the blocks by its step plan (plan.rs) in `run_blocks`.

use super::attention::AttnIn;
use super::kv_cache::{step_positions, DecodeInputs, KvCache};
use super::plan::{FfnPlan, LayerPlan, StepPlan};
use super::{Attention, Ffn, FfnWeights, Model, ModelError, Result, Span};
use crate::moe::{self, ExpertKind};
use crate::runtime::ops::{self, Matmul};
use crate::runtime::{DType, Tensor};

/// Most rows one prefill pass runs (as vLLM's `max_num_batched_tokens`).
pub const PREFILL_TOKENS: usize = 8192;

/// Bytes of f32 attention scores one prefill span may materialise ([heads, len, keys]).
const SPAN_SCORE_BYTES: usize = 1 << 30;

/// Splits every sequence's new tokens (`new_lens[i]` after `cached[i]` already in the cache) into
/// passes of at most `budget` rows, sequences in order, a sequence split across passes where it
/// does not fit (its later pieces attend over the cache). A piece is also kept short enough that
/// its [heads, len, keys] f32 scores stay under 1 GiB (keys: len from position 0, else the
/// cache's `max_len`).
pub fn plan_prefill(
    new_lens: &[usize],
    cached: &[usize],
    budget: usize,
    heads: usize,
    max_len: usize,
) -> Vec<Vec<Span>> {
    let budget = budget.max(1);
    let mut passes: Vec<Vec<Span>> = Vec::new();
    let mut cur: Vec<Span> = Vec::new();
    let mut used = 0;
    for (seq, (&n, &c)) in new_lens.iter().zip(cached).enumerate() {
        let mut done = 0;
        while done < n {
            if used == budget {
                passes.push(std::mem::take(&mut cur));
                used = 0;
            }
            let start = c + done;
            let mut len = (n - done).min(budget - used);
            let per_row = 4 * heads.max(1);
            let keys = |len: usize| if start == 0 { len } else { max_len };
            while len > 1 && per_row * len * keys(len) > SPAN_SCORE_BYTES {
                len = len.div_ceil(2);
            }
            cur.push(Span {
                seq,
                start,
                off: used,
                len,
            });
            used += len;
            done += len;
        }
    }
    if !cur.is_empty() {
        passes.push(cur);
    }
    passes
}

impl Model {
    /// Appends `tokens[i]` to sequence i of the cache and returns f32 logits: [B, V] for the last
    /// new position of each sequence (sequences given no tokens get zeros), or with `all_logits`
    /// [Σ new tokens, V] for every new position in order.
    pub fn forward_infer(
        &self,
        tokens: &[Vec<u32>],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        let bsz = tokens.len();
        if bsz != cache.lens.len() {
            return Err(ModelError::Invalid(format!(
                "{bsz} token lists for a cache of {} sequences",
                cache.lens.len()
            )));
        }
        for (i, t) in tokens.iter().enumerate() {
            if cache.lens[i] + t.len() > cache.max_len {
                return Err(ModelError::Invalid(format!(
                    "sequence {i}: {} cached + {} new tokens exceed the context of {} positions",
                    cache.lens[i],
                    t.len(),
                    cache.max_len
                )));
            }
            if let Some(&bad) = t.iter().find(|&&id| id as usize >= self.config.vocab_size) {
                return Err(ModelError::Invalid(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
        }
        let v = self.config.vocab_size;
        let decode = !all_logits && bsz > 0 && tokens.iter().all(|t| t.len() == 1);
        if decode {
            let ids: Vec<i32> = tokens.iter().map(|t| t[0] as i32).collect();
            let (pos, lens) = step_positions(&cache.lens);
            let logits = if self.device.is_cuda() && cache.use_graphs {
                self.decode_graphed(cache, &ids, &pos, &lens)?
            } else {
                self.decode_state(cache)?;
                let KvCache { k, v, decode, .. } = cache;
                let st = decode.as_mut().expect("decode state was just created");
                st.chained = false;
                st.inputs.set(&ids, &pos, &lens)?;
                self.decode_body(&st.inputs, k, v, &st.plan)?
            };
            for l in cache.lens.iter_mut() {
                *l += 1;
            }
            return Ok(logits);
        }
        if let Some(st) = cache.decode.as_mut() {
            st.chained = false;
        }
        // Prefill in passes of at most PREFILL_TOKENS rows (chunked prefill: bounded activation
        // memory, and many prompts share each pass's GEMMs and expert groups).
        let new_lens: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        let max_heads = (0..self.config.n_layers())
            .map(|i| self.shape(i).heads)
            .max()
            .unwrap_or(1);
        let passes = plan_prefill(
            &new_lens,
            &cache.lens,
            cache.prefill_tokens,
            max_heads,
            cache.max_len,
        );
        let mut all_rows: Vec<Tensor> = Vec::new();
        let mut last: Vec<Option<Tensor>> = (0..bsz).map(|_| None).collect();
        for spans in passes {
            let n: usize = spans.iter().map(|s| s.len).sum();
            let (mut ids, mut pos, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
            for sp in &spans {
                let from = sp.start - cache.lens[sp.seq];
                ids.extend(
                    tokens[sp.seq][from..from + sp.len]
                        .iter()
                        .map(|&x| x as i32),
                );
                pos.extend((sp.start..sp.start + sp.len).map(|p| p as i32));
                seqs.extend(std::iter::repeat_n(sp.seq as i32, sp.len));
            }
            let dev = self.device;
            let ids = Tensor::from_slice(&ids, &[n], dev)?;
            let pos = Tensor::from_slice(&pos, &[n], dev)?;
            let seqs = Tensor::from_slice(&seqs, &[n], dev)?;
            let x = ops::embedding(&ids, &self.params.embed)?;
            let plan = self.prefill_plan(n, &cache.settings)?;
            let xf = self.run_blocks(x, &plan, |i, _, attn, inp| {
                attn.prefill(
                    &self.shape(i),
                    &inp.resolve()?,
                    &self.rope,
                    &mut cache.k[i],
                    &mut cache.v[i],
                    &spans,
                    &pos,
                    &seqs,
                )
            })?;
            // The rows whose logits are wanted: all of them, or each sequence's last new token.
            let ends: Vec<&Span> = spans
                .iter()
                .filter(|sp| sp.start + sp.len == cache.lens[sp.seq] + new_lens[sp.seq])
                .collect();
            let xs = if all_logits {
                xf
            } else {
                let idx: Vec<i32> = ends.iter().map(|sp| (sp.off + sp.len - 1) as i32).collect();
                if idx.is_empty() {
                    continue;
                }
                ops::gather_rows(&xf, &Tensor::from_slice(&idx, &[idx.len()], dev)?)?
            };
            let logits = self.logits(&xs)?;
            if all_logits {
                all_rows.push(logits);
            } else {
                for (r, sp) in ends.iter().enumerate() {
                    last[sp.seq] = Some(ops::slice_rows(&logits, r, 1)?);
                }
            }
        }
        for (l, n) in cache.lens.iter_mut().zip(&new_lens) {
            *l += n;
        }
        let rows: Vec<Tensor> = if all_logits {
            all_rows
        } else {
            last.into_iter()
                .map(|r| match r {
                    Some(r) => Ok(r),
                    None => Tensor::zeros(&[1, v], DType::F32, self.device),
                })
                .collect::<std::result::Result<_, _>>()?
        };
        let total: usize = rows.iter().map(|r| r.dim(0)).sum();
        let mut out = Tensor::uninit(&[total, v], DType::F32, self.device)?;
        let mut at = 0;
        for r in rows {
            ops::write_rows(&mut out, at, &r)?;
            at += r.dim(0);
        }
        Ok(out)
    }

    /// One decode step for every sequence by the cache's decode `plan`: logits [B, V] f32. Only
    /// stream-ordered device work (it is what a CUDA graph records).
    pub(super) fn decode_body(
        &self,
        inp: &DecodeInputs,
        cache_k: &mut [Tensor],
        cache_v: &mut [Tensor],
        plan: &StepPlan,
    ) -> Result<Tensor> {
        let x = ops::embedding(&inp.ids, &self.params.embed)?;
        let xf = self.run_blocks(x, plan, |i, lp, attn, input| {
            attn.decode(
                &self.shape(i),
                input,
                lp,
                &self.rope,
                &mut cache_k[i],
                &mut cache_v[i],
                &inp.pos,
                &inp.lens,
                &inp.seqs,
            )
        })?;
        self.logits(&xf)
    }

    /// The blocks in inference from embedded tokens `x` by `plan`, each residual add fused with
    /// the RMSNorm that follows it (the next block's, or the final norm after the last block), or
    /// left pending for the next block's q/k/v launch where the plan folds it; `attn(i, layer
    /// plan, attention, input)` runs block i's attention (its output, or the context before the
    /// o projection where the MoE takes it). Returns the final-normed rows.
    fn run_blocks(
        &self,
        mut x: Tensor,
        plan: &StepPlan,
        mut attn: impl FnMut(
            usize,
            &LayerPlan,
            &Attention,
            AttnIn<'_>,
        ) -> crate::runtime::Result<Tensor>,
    ) -> Result<Tensor> {
        /// What the next block's attention starts from.
        enum Next {
            Normed(Tensor),
            /// The previous block's output, not yet added to x (folded into the q/k/v launch).
            Pending(Tensor),
        }
        let eps = self.eps();
        let mut next = Next::Normed(match self.params.blocks.first() {
            Some(b) => ops::rmsnorm(&x, &b.attn_norm, eps)?.0,
            None => ops::rmsnorm(&x, &self.params.norm, eps)?.0,
        });
        for (i, (blk, lp)) in self.params.blocks.iter().zip(&plan.layers).enumerate() {
            let inp = match next {
                Next::Normed(h) => AttnIn::Normed(h),
                Next::Pending(f) => AttnIn::AddNorm {
                    x: &mut x,
                    a: f,
                    g: &blk.attn_norm,
                    eps,
                },
            };
            let a = attn(i, lp, &blk.attn, inp)?;
            let f = match (&blk.ffn, &self.config.layers[i].ffn, &lp.ffn) {
                (FfnWeights::Moe(w), Ffn::Moe(mc), FfnPlan::Moe(p)) => {
                    moe::moe_serve_block(mc, w, p, &mut x, &a, &blk.attn.o, &blk.ffn_norm, eps)?
                }
                (FfnWeights::Dense(m), _, FfnPlan::Dense) => {
                    let h = ops::add_rmsnorm(&mut x, &a, &blk.ffn_norm, eps)?;
                    m.forward(ExpertKind::SwiGlu, &h, false)?.0
                }
                _ => {
                    return Err(ModelError::Invalid(format!(
                        "block {i}: its plan is for another kind of FFN"
                    )))
                }
            };
            next = match self.params.blocks.get(i + 1) {
                Some(_) if lp.out_folded => Next::Pending(f),
                Some(b) => Next::Normed(ops::add_rmsnorm(&mut x, &f, &b.attn_norm, eps)?),
                None => Next::Normed(ops::add_rmsnorm(&mut x, &f, &self.params.norm, eps)?),
            };
        }
        match next {
            Next::Normed(h) => Ok(h),
            Next::Pending(_) => Err(ModelError::Invalid(
                "the plan leaves the last block's output add + norm pending".into(),
            )),
        }
    }

    /// f32 logits [rows, V] of final-normed rows.
    fn logits(&self, xf: &Tensor) -> Result<Tensor> {
        Ok(ops::matmul(
            xf,
            self.head(),
            Matmul {
                trans_b: true,
                out_dtype: Some(DType::F32),
                ..Default::default()
            },
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(passes: &[Vec<Span>], new_lens: &[usize], cached: &[usize], budget: usize) {
        let mut next: Vec<usize> = cached.to_vec();
        for p in passes {
            let mut off = 0;
            assert!(!p.is_empty());
            for sp in p {
                assert_eq!(sp.off, off, "{passes:?}");
                assert_eq!(sp.start, next[sp.seq], "{passes:?}");
                assert!(sp.len > 0);
                next[sp.seq] += sp.len;
                off += sp.len;
            }
            assert!(off <= budget, "{passes:?}");
        }
        for i in 0..new_lens.len() {
            assert_eq!(next[i], cached[i] + new_lens[i], "{passes:?}");
        }
    }

    #[test]
    fn prefill_plan_packs_sequences_and_splits_long_ones() {
        let (n, c) = ([5, 0, 7, 3], [0, 4, 2, 0]);
        let p = plan_prefill(&n, &c, 8, 4, 64);
        covers(&p, &n, &c, 8);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0],
            vec![
                Span {
                    seq: 0,
                    start: 0,
                    off: 0,
                    len: 5
                },
                Span {
                    seq: 2,
                    start: 2,
                    off: 5,
                    len: 3
                }
            ]
        );
        for (n, c, b) in [
            (vec![1], vec![0], 1),
            (vec![20, 20], vec![0, 3], 7),
            (vec![0, 0], vec![1, 2], 4),
        ] {
            covers(&plan_prefill(&n, &c, b, 2, 64), &n, &c, b);
        }
        assert!(plan_prefill(&[0, 0], &[0, 0], 4, 2, 8).is_empty());
        // 32 heads, 32k keys: pieces shrink so that [heads, len, keys] f32 stays under 1 GiB.
        let p = plan_prefill(&[32768], &[0], 1 << 20, 32, 32768);
        covers(&p, &[32768], &[0], 1 << 20);
        for sp in p.iter().flatten() {
            let keys = if sp.start == 0 { sp.len } else { 32768 };
            assert!(4 * 32 * sp.len * keys <= 1 << 30, "{sp:?}");
        }
    }
}
