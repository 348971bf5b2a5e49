//! Step plans: which kernels each block runs for a step of a given shape, decided once — a decode
//! plan per KV cache (model × batch × dtype × device × kernel settings, made at its first decode
//! step and kept with its graphs), a prefill plan per pass — and run as decided by
//! `Model::run_blocks` (infer.rs), with no per-step fall-backs. `MOE_LOG=info` prints a decode
//! plan when it is made (`StepPlan`'s `Display`: one row per run of identical blocks).
//!
//! Where the coming pieces plug in: a paged KV cache is a new `AttnKind` (its kernels read a
//! block table); expert placement across ranks and offloaded experts are new `MoeServePlan`
//! variants (an exchange step around the local experts; a lookup in the expert store — GPU slot,
//! copy or CPU compute), decided here from the placement and the store, run by the same loop.

use std::fmt;

use super::{Ffn, FfnWeights, Model, Result};
use crate::moe::{MoeServePlan, ServeInput};
use crate::runtime::{DType, KernelSettings};

/// How a block's q/k/v projection gets its rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QkvInput {
    /// Rows already normed (the first block; prefill; decode without folded norms).
    Normed,
    /// The previous block's residual add + RMSNorm done inside the q/k/v GEMV launch
    /// (`ops::add_rmsnorm_linear_qkv`).
    AddNormFused,
    /// The previous block's residual add + RMSNorm as its own kernel, then `ops::linear_qkv`.
    AddNormKernel,
}

/// How a block's attention runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttnKind {
    /// Decode: q/k norm, RoPE and the K/V write inside the attention kernel
    /// (`ops::attention_decode_step`).
    DecodeFused,
    /// Decode: `ops::qk_rope_kv_write`, then `ops::attention_decode`.
    DecodeRopeThenAttend,
    /// Prefill spans (`Attention::prefill`).
    Prefill,
}

/// A block's FFN.
pub enum FfnPlan {
    Dense,
    Moe(MoeServePlan),
}

/// The kernels one block runs.
pub struct LayerPlan {
    pub qkv: QkvInput,
    pub attention: AttnKind,
    pub ffn: FfnPlan,
    /// The block's output add + RMSNorm is left to the next block's q/k/v launch.
    pub out_folded: bool,
}

impl LayerPlan {
    /// Whether the attention hands the MoE its context before the o projection.
    pub fn attention_projects(&self) -> bool {
        !matches!(&self.ffn, FfnPlan::Moe(p) if p.takes_context())
    }
}

/// The kernels of one step of `rows` rows, block by block.
pub struct StepPlan {
    pub rows: usize,
    pub dtype: DType,
    pub layers: Vec<LayerPlan>,
}

impl Model {
    /// The plan of a decode step of `batch` sequences under `s`: with `s.fold_norms` each
    /// residual add + RMSNorm goes into the next kernel (q/k/v GEMV, router, experts) where one
    /// takes it. MoE layers that fold their router through the o projection compute the folded
    /// router here (`ops::router_fold`).
    pub fn decode_plan(&self, batch: usize, s: &KernelSettings) -> Result<StepPlan> {
        let c = &self.config;
        let half = self.dtype.size_in_bytes() == 2;
        let cuda = self.device.is_cuda();
        let one_launch_qkv = cuda && (1..=8).contains(&batch) && half && c.d_model % 8 == 0;
        let attention = if cuda
            && s.attn_h128
            && s.attn_fused_rope
            && c.head_dim == 128
            && matches!(self.dtype, DType::BF16 | DType::F16)
            && c.n_heads % c.n_kv_heads == 0
        {
            AttnKind::DecodeFused
        } else {
            AttnKind::DecodeRopeThenAttend
        };
        let n = self.params.blocks.len();
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            let blk = &self.params.blocks[i];
            let qkv = match (i, s.fold_norms) {
                (0, _) | (_, false) => QkvInput::Normed,
                _ if one_launch_qkv => QkvInput::AddNormFused,
                _ => QkvInput::AddNormKernel,
            };
            let input = if s.fold_norms {
                ServeInput::OProj {
                    wo: &blk.attn.o,
                    norm: &blk.ffn_norm,
                }
            } else {
                ServeInput::Normed
            };
            layers.push(LayerPlan {
                qkv,
                attention,
                ffn: self.ffn_plan(i, batch, input, s)?,
                out_folded: s.fold_norms && i + 1 < n,
            });
        }
        Ok(StepPlan {
            rows: batch,
            dtype: self.dtype,
            layers,
        })
    }

    /// The plan of a prefill pass of `rows` rows: normed inputs, each MoE by its row count.
    pub fn prefill_plan(&self, rows: usize, s: &KernelSettings) -> Result<StepPlan> {
        let layers = (0..self.params.blocks.len())
            .map(|i| {
                Ok(LayerPlan {
                    qkv: QkvInput::Normed,
                    attention: AttnKind::Prefill,
                    ffn: self.ffn_plan(i, rows, ServeInput::Normed, s)?,
                    out_folded: false,
                })
            })
            .collect::<Result<_>>()?;
        Ok(StepPlan {
            rows,
            dtype: self.dtype,
            layers,
        })
    }

    fn ffn_plan(
        &self,
        i: usize,
        rows: usize,
        input: ServeInput<'_>,
        s: &KernelSettings,
    ) -> Result<FfnPlan> {
        Ok(
            match (&self.params.blocks[i].ffn, &self.config.layers[i].ffn) {
                (FfnWeights::Moe(w), Ffn::Moe(mc)) => {
                    FfnPlan::Moe(MoeServePlan::new(mc, w, rows, input, s)?)
                }
                _ => FfnPlan::Dense,
            },
        )
    }
}

impl LayerPlan {
    fn columns(&self) -> [&'static str; 5] {
        let qkv = match self.qkv {
            QkvInput::Normed => "q/k/v",
            QkvInput::AddNormFused => "add+norm+q/k/v",
            QkvInput::AddNormKernel => "add+norm, q/k/v",
        };
        let attention = match self.attention {
            AttnKind::DecodeFused => "norm+rope+kv+attend",
            AttnKind::DecodeRopeThenAttend => "rope+kv, attend",
            AttnKind::Prefill => "prefill",
        };
        let (router, experts) = match &self.ffn {
            FfnPlan::Dense => ("-", "dense MLP"),
            FfnPlan::Moe(p) => p.labels(),
        };
        let out = if self.out_folded {
            "into next q/k/v"
        } else {
            "add+norm"
        };
        [qkv, attention, router, experts, out]
    }
}

impl fmt::Display for StepPlan {
    /// A table, one row per run of consecutive blocks with the same kernels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = ["q/k/v", "attention", "router", "experts", "output"];
        writeln!(
            f,
            "{:<8} {:<16} {:<20} {:<28} {:<24} {}",
            "blocks", head[0], head[1], head[2], head[3], head[4]
        )?;
        let rows: Vec<[&str; 5]> = self.layers.iter().map(LayerPlan::columns).collect();
        let mut i = 0;
        while i < rows.len() {
            let j = (i..rows.len()).take_while(|&j| rows[j] == rows[i]).count() + i;
            let span = if j - i == 1 {
                format!("{i}")
            } else {
                format!("{i}-{}", j - 1)
            };
            let r = rows[i];
            writeln!(
                f,
                "{span:<8} {:<16} {:<20} {:<28} {:<24} {}",
                r[0], r[1], r[2], r[3], r[4]
            )?;
            i = j;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Device;

    fn fixture(name: &str) -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
        Model::load_hf(&dir.join(name), Device::Cpu, None).unwrap()
    }

    /// On the CPU every block runs the twins: the add + norm as its own op, two-op attention,
    /// router GEMM + route + grouped experts; the table has one row per run of equal blocks.
    #[test]
    fn cpu_plans_take_the_twins_and_print_one_row_per_run() {
        // Three blocks: a dense one (mlp_only_layers = [0]), then two MoE ones.
        let m = fixture("qwen3_moe_renorm");
        let s = KernelSettings::default();
        let p = m.decode_plan(2, &s).unwrap();
        let qkv: Vec<QkvInput> = p.layers.iter().map(|l| l.qkv).collect();
        use QkvInput::{AddNormKernel, Normed};
        assert_eq!(qkv, [Normed, AddNormKernel, AddNormKernel]);
        let folded: Vec<bool> = p.layers.iter().map(|l| l.out_folded).collect();
        assert_eq!(folded, [true, true, false]);
        for l in &p.layers {
            assert_eq!(l.attention, AttnKind::DecodeRopeThenAttend);
            assert!(l.attention_projects());
        }
        assert!(matches!(p.layers[0].ffn, FfnPlan::Dense));
        for l in &p.layers[1..] {
            assert!(matches!(l.ffn, FfnPlan::Moe(MoeServePlan::RouteGrouped)));
        }
        let table = p.to_string();
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(table.lines().nth(1).unwrap().starts_with("0 "), "{table}");
        let unfolded = KernelSettings {
            fold_norms: false,
            ..s.clone()
        };
        let table = m.decode_plan(2, &unfolded).unwrap().to_string();
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(table.lines().nth(2).unwrap().starts_with("1-2 "), "{table}");
        let p = m.prefill_plan(40, &s).unwrap();
        assert!(p
            .layers
            .iter()
            .all(|l| l.qkv == Normed && l.attention == AttnKind::Prefill && !l.out_folded));
    }

    /// Folding the norms changes where the CPU's add + norm runs, not what it computes: decode
    /// logits are bit-identical with and without, and the cache keeps the plan it decoded by.
    #[test]
    fn cpu_decode_is_the_same_with_and_without_folded_norms() {
        let m = fixture("qwen2_moe_shared");
        let prompts = vec![vec![1u32, 5, 9], vec![3, 4]];
        let run = |s: KernelSettings| {
            s.scoped(|| {
                let mut cache = m.new_kv_cache(2, 16).unwrap();
                m.forward_infer(&prompts, &mut cache, false).unwrap();
                let mut out = Vec::new();
                for step in 0..3u32 {
                    let feed = vec![vec![7 + step], vec![11 + step]];
                    out.push(
                        m.forward_infer(&feed, &mut cache, false)
                            .unwrap()
                            .to_f32_vec()
                            .unwrap(),
                    );
                }
                let folded = cache.decode_plan().unwrap().layers[0].out_folded;
                (out, folded)
            })
        };
        let s = KernelSettings::default();
        let (a, fa) = run(s.clone());
        let (b, fb) = run(KernelSettings {
            fold_norms: false,
            ..s
        });
        assert_eq!((fa, fb), (true, false));
        assert_eq!(a, b);
    }
}
