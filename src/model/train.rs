//! The training pass: forward over [B, S] tokens with the LM head fused into the cross-entropy
//! (its gradient computed in the forward), and the backward through the blocks in reverse with
//! what the forward saved (or, with `recompute`, each block re-run from its input).

use super::attention::AttnSaved;
use super::{Ffn, FfnWeights, Grads, Model, ModelError, Result};
use crate::moe::{self, DenseSaved, ExpertKind, MoeSaved};
use crate::runtime::ops::{self, Matmul};
use crate::runtime::{DType, Tensor};

/// Options of one training forward.
#[derive(Clone, Copy, Debug)]
pub struct TrainOpts {
    /// Keep only block inputs; re-run each block in the backward.
    pub recompute: bool,
    /// Seed of the MoE noisy gates / random token selection for this step.
    pub seed: u64,
    /// Factor applied to the loss gradient (e.g. 1 / gradient-accumulation steps).
    pub loss_scale: f32,
}

impl Default for TrainOpts {
    fn default() -> Self {
        TrainOpts {
            recompute: false,
            seed: 0,
            loss_scale: 1.0,
        }
    }
}

pub struct StepOutput {
    /// [1] f32 mean cross-entropy over the non-ignored targets.
    pub loss: Tensor,
    /// [1] f32 sum over MoE layers of the aux / z losses (already times their coefficients).
    pub aux_loss: Tensor,
    pub z_loss: Tensor,
    /// Per MoE layer (layer index, [E] i32 tokens routed, [E] f32 dropped).
    pub expert_load: Vec<(usize, Tensor, Tensor)>,
}

enum FfnSaved {
    Dense(DenseSaved),
    Moe(MoeSaved),
}

enum BlockSaved {
    Full {
        h1: Tensor,
        rstd1: Tensor,
        attn: AttnSaved,
        x_mid: Tensor,
        h2: Tensor,
        rstd2: Tensor,
        ffn: FfnSaved,
    },
    Input,
}

/// What `backward` needs from `forward_train`.
pub struct Saved {
    b: usize,
    s: usize,
    tokens: Tensor,
    pos: Tensor,
    opts: TrainOpts,
    inputs: Vec<Tensor>,
    blocks: Vec<BlockSaved>,
    x_last: Tensor,
    rstd_f: Tensor,
    dx_f: Tensor,
    dhead: Tensor,
}

impl Model {
    /// Block i's FFN in training: (output, saved, MoE stats).
    fn ffn_train(
        &self,
        i: usize,
        h: &Tensor,
        seed: u64,
    ) -> Result<(Tensor, FfnSaved, Option<moe::MoeStats>)> {
        let missing = || ModelError::Invalid("training forward saved nothing".into());
        match (&self.params.blocks[i].ffn, &self.config.layers[i].ffn) {
            (FfnWeights::Dense(m), _) => {
                let (y, s) = m.forward(ExpertKind::SwiGlu, h, true)?;
                Ok((y, FfnSaved::Dense(s.ok_or_else(missing)?), None))
            }
            (FfnWeights::Moe(w), Ffn::Moe(mc)) => {
                let mode = moe::Mode::Train { seed };
                let (y, s, st) =
                    moe::moe_forward_named(mc, w, h, mode, &format!("blocks.{i}.ffn"), false)?;
                Ok((y, FfnSaved::Moe(s.ok_or_else(missing)?), Some(st)))
            }
            (FfnWeights::Moe(_), Ffn::Dense { .. }) => Err(ModelError::Invalid(format!(
                "layer {i}: MoE weights for a dense layer"
            ))),
        }
    }

    /// One block in training mode: (output, saved, MoE stats).
    fn block_train(
        &self,
        i: usize,
        x: &Tensor,
        b: usize,
        s: usize,
        pos: &Tensor,
        seed: u64,
    ) -> Result<(Tensor, BlockSaved, Option<moe::MoeStats>)> {
        let blk = &self.params.blocks[i];
        let (h1, rstd1) = ops::rmsnorm(x, &blk.attn_norm, self.eps())?;
        let (a, attn) = blk
            .attn
            .forward_train(&self.shape(i), &h1, b, s, &self.rope, pos)?;
        let x_mid = ops::add(x, &a)?;
        let (h2, rstd2) = ops::rmsnorm(&x_mid, &blk.ffn_norm, self.eps())?;
        let (f, ffn, stats) = self.ffn_train(i, &h2, seed.wrapping_add(i as u64 * 7919))?;
        let y = ops::add(&x_mid, &f)?;
        Ok((
            y,
            BlockSaved::Full {
                h1,
                rstd1,
                attn,
                x_mid,
                h2,
                rstd2,
                ffn,
            },
            stats,
        ))
    }

    /// Training forward: tokens and targets [B, S] i32 on the model's device (targets −100 are
    /// ignored; `n_valid` counts the others). Computes the loss and, fused with it, the LM head's
    /// gradient, so `backward` only walks the blocks.
    pub fn forward_train(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        n_valid: usize,
        opts: &TrainOpts,
    ) -> Result<(StepOutput, Saved)> {
        let (b, s) = (tokens.dim(0), tokens.dim(-1));
        if tokens.rank() != 2 || targets.shape() != tokens.shape() {
            return Err(ModelError::Invalid(format!(
                "tokens {:?} and targets {:?} must both be [batch, seq]",
                tokens.shape(),
                targets.shape()
            )));
        }
        if s > self.config.max_seq_len {
            return Err(ModelError::Invalid(format!(
                "sequence length {s} exceeds max_seq_len = {}",
                self.config.max_seq_len
            )));
        }
        let t = b * s;
        let dev = self.device;
        let pos: Vec<i32> = (0..t).map(|i| (i % s) as i32).collect();
        let pos = Tensor::from_slice(&pos, &[t], dev)?;
        let ids = tokens.try_clone()?.reshape(&[t])?;
        let mut x = ops::embedding(&ids, &self.params.embed)?;
        let mut inputs = Vec::new();
        let mut blocks = Vec::new();
        let mut aux = Tensor::zeros(&[1], DType::F32, dev)?;
        let mut z = Tensor::zeros(&[1], DType::F32, dev)?;
        let mut load = Vec::new();
        for i in 0..self.config.n_layers() {
            let (y, sv, st) = self.block_train(i, &x, b, s, &pos, opts.seed)?;
            if let Some(st) = st {
                ops::add_assign(&mut aux, &st.aux_loss)?;
                ops::add_assign(&mut z, &st.z_loss)?;
                load.push((i, st.tokens_per_expert, st.dropped));
            }
            if opts.recompute {
                inputs.push(x);
                blocks.push(BlockSaved::Input);
            } else {
                inputs.push(x);
                blocks.push(sv);
            }
            x = y;
        }
        let (xf, rstd_f) = ops::rmsnorm(&x, &self.params.norm, self.eps())?;
        // LM head + cross-entropy in row chunks of <= 256 MiB of f32 logits. Every chunk adds
        // its head gradient into the f32 [V, d] accumulator (a read and a write of V·d·4 bytes:
        // 412 MB at OLMoE's vocab), so chunks are as large as the memory budget allows.
        let v = self.config.vocab_size;
        let chunk = ((256 << 20) / (4 * v)).clamp(1, t.max(1));
        let tg = targets.try_clone()?.reshape(&[t])?;
        let mut losses = Tensor::zeros(&[t], DType::F32, dev)?;
        let mut dx_f = Tensor::zeros(&[t, self.config.d_model], self.dtype, dev)?;
        let mut dhead = Tensor::zeros(&[v, self.config.d_model], DType::F32, dev)?;
        let scale = opts.loss_scale / n_valid.max(1) as f32;
        let mut r0 = 0;
        while r0 < t {
            let n = chunk.min(t - r0);
            let xc = ops::slice_rows(&xf, r0, n)?;
            let tc = ops::slice_rows(&tg, r0, n)?;
            let logits = ops::linear(&xc, self.head(), None)?;
            let (lc, lse) = ops::cross_entropy(&logits, &tc, -100)?;
            ops::write_rows(&mut losses, r0, &lc)?;
            let dl = ops::cross_entropy_backward(&logits, &tc, &lse, -100, scale)?;
            ops::matmul_into(
                &mut dhead,
                &dl,
                &xc,
                Matmul {
                    trans_a: true,
                    out_dtype: Some(DType::F32),
                    ..Default::default()
                },
                1.0,
            )?;
            ops::write_rows(
                &mut dx_f,
                r0,
                &ops::matmul(&dl, self.head(), Matmul::default())?,
            )?;
            r0 += n;
        }
        let loss = ops::scale(&ops::sum_all(&losses)?, 1.0 / n_valid.max(1) as f32)?;
        let out = StepOutput {
            loss,
            aux_loss: aux,
            z_loss: z,
            expert_load: load,
        };
        let saved = Saved {
            b,
            s,
            tokens: ids,
            pos,
            opts: *opts,
            inputs,
            blocks,
            x_last: x,
            rstd_f,
            dx_f,
            dhead,
        };
        Ok((out, saved))
    }

    /// Accumulates f32 gradients of (loss + aux + z) · loss_scale into `g`.
    pub fn backward(&self, saved: Saved, g: &mut Grads) -> Result<()> {
        self.backward_with(saved, g, false, None)
    }

    /// `backward` for the first micro-batch of a step into `Params::grad_buffers`: the same
    /// gradients, with the routed experts' weight gradients written instead of accumulated.
    pub fn backward_first(&self, saved: Saved, g: &mut Grads) -> Result<()> {
        self.backward_with(saved, g, true, None)
    }

    /// `backward` (`backward_first` when `experts_fresh`); with `expert_sumsq` ([1] f32) the
    /// squared L2 norm of the routed experts' weight gradients as this backward leaves them is
    /// added into it by the GEMMs that write them (their share of the global norm without reading
    /// them again; `Params::routed_expert_weights` lists the tensors it covers).
    pub fn backward_with(
        &self,
        saved: Saved,
        g: &mut Grads,
        experts_fresh: bool,
        mut expert_sumsq: Option<&mut Tensor>,
    ) -> Result<()> {
        let Saved {
            b,
            s,
            tokens,
            pos,
            opts,
            inputs,
            blocks,
            x_last,
            rstd_f,
            dx_f,
            dhead,
        } = saved;
        match g.lm_head.as_mut() {
            Some(h) => ops::add_assign(h, &dhead)?,
            None => ops::add_assign(&mut g.embed, &dhead)?,
        }
        let (mut dx, dnorm) = ops::rmsnorm_backward(&x_last, &self.params.norm, &rstd_f, &dx_f)?;
        ops::add_assign(&mut g.norm, &dnorm)?;
        drop(x_last);
        for (i, (x, sv)) in inputs.into_iter().zip(blocks).enumerate().rev() {
            let sv = match sv {
                BlockSaved::Input => self.block_train(i, &x, b, s, &pos, opts.seed)?.1,
                full => full,
            };
            let BlockSaved::Full {
                h1,
                rstd1,
                attn,
                x_mid,
                h2,
                rstd2,
                ffn,
            } = sv
            else {
                unreachable!("recomputed above")
            };
            let blk = &self.params.blocks[i];
            let gb = &mut g.blocks[i];
            // y = x_mid + ffn(norm(x_mid))
            let dh2 = match (&blk.ffn, ffn, &mut gb.ffn, &self.config.layers[i].ffn) {
                (FfnWeights::Dense(m), FfnSaved::Dense(fs), FfnWeights::Dense(gm), _) => {
                    m.backward(ExpertKind::SwiGlu, &h2, &fs, &dx, gm)?
                }
                (FfnWeights::Moe(w), FfnSaved::Moe(ms), FfnWeights::Moe(gm), Ffn::Moe(mc)) => {
                    moe::moe_backward_into(
                        mc,
                        w,
                        &h2,
                        &ms,
                        &dx,
                        opts.loss_scale,
                        gm,
                        experts_fresh,
                        expert_sumsq.as_deref_mut(),
                    )?
                }
                _ => {
                    return Err(ModelError::Invalid(format!(
                        "layer {i}: saved activations do not match the layer kind"
                    )))
                }
            };
            let dw2 = ops::rmsnorm_backward_acc(&x_mid, &blk.ffn_norm, &rstd2, &dh2, &mut dx)?;
            ops::add_assign(&mut gb.ffn_norm, &dw2)?;
            // x_mid = x + attn(norm(x))
            let dh1 = blk.attn.backward(
                &self.shape(i),
                &h1,
                b,
                s,
                &self.rope,
                &pos,
                &attn,
                &dx,
                &mut gb.attn,
            )?;
            let dw1 = ops::rmsnorm_backward_acc(&x, &blk.attn_norm, &rstd1, &dh1, &mut dx)?;
            ops::add_assign(&mut gb.attn_norm, &dw1)?;
        }
        ops::embedding_backward(&tokens, &dx, &mut g.embed)?;
        Ok(())
    }
}
