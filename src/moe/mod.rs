//! The MoE layer, forward and backward, on CPU and CUDA:
//! x [T, d] → router logits [T, E] → top-k ids/gates ([k, T], slot-major) → counts → stable sort
//! by expert (capacity drops for switch gating) → the permutation (rows of x in expert order,
//! [k·T]) with offsets [E+1] → grouped GEMMs reading x through it (SwiGLU or MLP experts; on
//! other GPUs than Hopper and on CPU the rows are gathered first) → weighted gather-combine → y [T, d]
//! (+ shared experts, + PR-MoE residual MLP). The backward walks the same path with the saved
//! permutation. No host synchronisation on the CUDA path: counts, offsets and statistics stay on
//! the device. `config` names options as DeepSpeed / Megatron / HF do.
//!
//! API: `MoeConfig`, `MoeWeights` (+ `MoeGrads`, same names, f32); training (`train.rs`):
//! `moe_forward` → (y, `MoeSaved`, `MoeStats`), `moe_backward`, `update_router_bias`; serving
//! (`serve.rs`): `MoeServePlan` decided once per step shape, `moe_serve` / `moe_serve_block`;
//! `DenseMlp` is the dense FFN shared with the model; expert parallelism (`expert_parallel.rs`):
//! `ParallelGroups`, `keep_local_experts`, `ep_forward` / `ep_backward`, `reduce_gradients`.

mod config;
mod dense;
mod dispatch;
mod expert_parallel;
mod experts;
mod router;
mod serve;
mod train;
mod weights;

pub use config::{ExpertKind, MoeConfig, NoisyGate, ResidualMoe, RouterKind, SharedExperts};
pub use dense::{DenseMlp, DenseMlpGrads, DenseSaved};
pub use dispatch::{combine, combine_backward, dispatch, Dispatch};
pub use expert_parallel::{
    ep_backward, ep_forward, keep_local_experts, local_experts, reduce_gradients, ParallelGroups,
};
pub use router::{check_finite, route, update_router_bias, Routing};
pub use serve::{moe_serve, moe_serve_block, MoeServePlan, ServeInput};
pub use train::{
    moe_backward, moe_backward_into, moe_forward, moe_forward_named, Mode, MoeSaved, MoeStats,
};
pub use weights::{MoeGrads, MoeWeights, ResidualWeights, SharedWeights};
