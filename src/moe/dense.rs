//! A dense MLP, forward and backward: SwiGLU (w1 = [gate | up] [2F, d], w2 [d, F]) or a plain
//! MLP with an activation (w1 [F, d], w2 [d, F]), optional biases. Used for shared experts, the
//! residual MLP of PR-MoE, and the dense FFN layers of the model. x: [T, d] -> [T, d].
//! The backward reuses the forward's x, h (pre-activation) and a (activation output).

use super::config::ExpertKind;
use crate::param_set;
use crate::runtime::ops::{self, Matmul};
use crate::runtime::{DType, Device, Result, Tensor};

pub struct DenseMlp {
    pub w1: Tensor,
    pub b1: Option<Tensor>,
    pub w2: Tensor,
    pub b2: Option<Tensor>,
}
param_set!(DenseMlp { t w1, opt b1, t w2, opt b2 });

/// Gradients of a `DenseMlp` (f32, same names).
pub type DenseMlpGrads = DenseMlp;

pub struct DenseSaved {
    h: Tensor,
    a: Tensor,
}

impl DenseMlp {
    /// Normal(0, std) projections (w2 with `out_std`), zero biases when `bias`.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        kind: ExpertKind,
        d: usize,
        ffn: usize,
        bias: bool,
        std: f32,
        out_std: f32,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<DenseMlp> {
        let h1 = match kind {
            ExpertKind::SwiGlu => 2 * ffn,
            ExpertKind::Mlp(_) => ffn,
        };
        Ok(DenseMlp {
            w1: Tensor::randn(&[h1, d], std, seed, dtype, device)?,
            b1: if bias {
                Some(Tensor::zeros(&[h1], dtype, device)?)
            } else {
                None
            },
            w2: Tensor::randn(&[d, ffn], out_std, seed ^ 0x5eed, dtype, device)?,
            b2: if bias {
                Some(Tensor::zeros(&[d], dtype, device)?)
            } else {
                None
            },
        })
    }

    /// f32 zeros shaped like these weights (a gradient accumulator).
    pub fn zeros_like(&self) -> Result<DenseMlpGrads> {
        let z = |t: &Tensor| Tensor::zeros(t.shape(), DType::F32, t.device());
        Ok(DenseMlp {
            w1: z(&self.w1)?,
            b1: self.b1.as_ref().map(z).transpose()?,
            w2: z(&self.w2)?,
            b2: self.b2.as_ref().map(z).transpose()?,
        })
    }

    /// y [T, d]; `save` keeps what the backward needs.
    pub fn forward(
        &self,
        kind: ExpertKind,
        x: &Tensor,
        save: bool,
    ) -> Result<(Tensor, Option<DenseSaved>)> {
        let h = ops::linear(x, &self.w1, self.b1.as_ref())?;
        let a = match kind {
            ExpertKind::SwiGlu => ops::swiglu(&h)?,
            ExpertKind::Mlp(act) => ops::activation(&h, act)?,
        };
        let y = ops::linear(&a, &self.w2, self.b2.as_ref())?;
        Ok((
            y,
            if save {
                Some(DenseSaved { h, a })
            } else {
                None
            },
        ))
    }

    /// dx, accumulating weight gradients (f32) into `grads`.
    pub fn backward(
        &self,
        kind: ExpertKind,
        x: &Tensor,
        saved: &DenseSaved,
        dy: &Tensor,
        grads: &mut DenseMlpGrads,
    ) -> Result<Tensor> {
        let acc = Matmul {
            trans_a: true,
            out_dtype: Some(DType::F32),
            ..Default::default()
        };
        // y = a·w2ᵀ + b2
        ops::matmul_into(&mut grads.w2, dy, &saved.a, acc, 1.0)?;
        if let Some(db) = &mut grads.b2 {
            ops::add_assign(db, &ops::sum_rows(dy)?)?;
        }
        let da = ops::matmul(dy, &self.w2, Matmul::default())?;
        let dh = match kind {
            ExpertKind::SwiGlu => ops::swiglu_backward(&saved.h, &da)?,
            ExpertKind::Mlp(act) => ops::activation_backward(&saved.h, &da, act)?,
        };
        // h = x·w1ᵀ + b1
        ops::matmul_into(&mut grads.w1, &dh, x, acc, 1.0)?;
        if let Some(db) = &mut grads.b1 {
            ops::add_assign(db, &ops::sum_rows(&dh)?)?;
        }
        ops::matmul(&dh, &self.w1, Matmul::default())
    }
}
