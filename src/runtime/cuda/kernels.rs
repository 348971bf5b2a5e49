//! The kernel families (`kernels/*.cu`), one `KernelSource` each, compiled and cached on their own
//! at first use; the headers (`kernels/*.cuh`) they share. `ALL` lets `moe kernels` and a test
//! compile every family with NVRTC on a machine that has the compiler but no GPU.

use super::{KernelHeader, KernelSource};

const fn family(
    name: &'static str,
    src: &'static str,
    headers: &'static [KernelHeader],
) -> KernelSource {
    KernelSource { name, src, headers }
}

/// Offsets, group search and tail zeroing of the grouped GEMMs.
const GROUPED_H: KernelHeader = KernelHeader {
    name: "grouped.cuh",
    src: include_str!("kernels/grouped.cuh"),
};
/// The small-M (decode) GEMV pieces.
const GEMV_H: KernelHeader = KernelHeader {
    name: "gemv.cuh",
    src: include_str!("kernels/gemv.cuh"),
};
/// A softmax router's per-warp top-k and weights.
const ROUTER_WARP_H: KernelHeader = KernelHeader {
    name: "router_warp.cuh",
    src: include_str!("kernels/router_warp.cuh"),
};

pub const ATTENTION: KernelSource = family("attention", include_str!("kernels/attention.cu"), &[]);
pub const CAST: KernelSource = family("cast", include_str!("kernels/cast.cu"), &[]);
pub const ELEMENTWISE: KernelSource =
    family("elementwise", include_str!("kernels/elementwise.cu"), &[]);
pub const EMBEDDING: KernelSource = family("embedding", include_str!("kernels/embedding.cu"), &[]);
pub const FLASH: KernelSource = family("flash", include_str!("kernels/flash.cu"), &[]);
/// Decode GEMVs: small-M grouped and dense x·Wᵀ, the attention's q/k/v projection.
pub const GEMV: KernelSource = family("gemv", include_str!("kernels/gemv.cu"), &[GEMV_H]);
/// The tiled grouped GEMMs on mma.sync (sm_80+).
pub const GROUPED_MMA: KernelSource = family(
    "grouped_mma",
    include_str!("kernels/grouped_mma.cu"),
    &[GROUPED_H],
);
/// The tiled grouped GEMMs' tile schedule (`gg_tile_prefix`).
pub const GROUPED_SCHEDULE: KernelSource = family(
    "grouped_schedule",
    include_str!("kernels/grouped_schedule.cu"),
    &[GROUPED_H],
);
/// The grouped GEMMs' SIMT fallback (f32, unaligned shapes).
pub const GROUPED_SIMT: KernelSource = family(
    "grouped_simt",
    include_str!("kernels/grouped_simt.cu"),
    &[GROUPED_H],
);
/// The Hopper grouped GEMMs: wgmma (cp.async) and TMA warp-specialised.
pub const GROUPED_WGMMA: KernelSource = family(
    "grouped_wgmma",
    include_str!("kernels/grouped_wgmma.cu"),
    &[GROUPED_H],
);
pub const INDEX: KernelSource = family("index", include_str!("kernels/index.cu"), &[]);
pub const LOSS: KernelSource = family("loss", include_str!("kernels/loss.cu"), &[]);
pub const MOE_DISPATCH: KernelSource =
    family("moe_dispatch", include_str!("kernels/moe_dispatch.cu"), &[]);
pub const MOE_ROUTER: KernelSource =
    family("moe_router", include_str!("kernels/moe_router.cu"), &[]);
pub const NORM: KernelSource = family("norm", include_str!("kernels/norm.cu"), &[]);
pub const OPTIMIZER: KernelSource = family("optimizer", include_str!("kernels/optimizer.cu"), &[]);
pub const REDUCE: KernelSource = family("reduce", include_str!("kernels/reduce.cu"), &[]);
pub const ROPE: KernelSource = family("rope", include_str!("kernels/rope.cu"), &[]);
/// The served decode path's experts (moe_serve_*).
pub const SERVE_EXPERTS: KernelSource = family(
    "serve_experts",
    include_str!("kernels/serve_experts.cu"),
    &[GEMV_H, ROUTER_WARP_H],
);
/// The served decode path's routers (router_topk_*, o_route_*).
pub const SERVE_ROUTER: KernelSource = family(
    "serve_router",
    include_str!("kernels/serve_router.cu"),
    &[GEMV_H, ROUTER_WARP_H],
);
pub const SOFTMAX: KernelSource = family("softmax", include_str!("kernels/softmax.cu"), &[]);

/// The tiled grouped-GEMM family of a kernel name prefix (`ops::grouped_cuda`'s "wg" for the
/// Hopper kernels, "gg" for mma.sync).
pub fn grouped_tiled(prefix: &str) -> &'static KernelSource {
    if prefix.starts_with("wg") {
        &GROUPED_WGMMA
    } else {
        &GROUPED_MMA
    }
}

pub const ALL: &[&KernelSource] = &[
    &ATTENTION,
    &CAST,
    &ELEMENTWISE,
    &EMBEDDING,
    &FLASH,
    &GEMV,
    &GROUPED_MMA,
    &GROUPED_SCHEDULE,
    &GROUPED_SIMT,
    &GROUPED_WGMMA,
    &INDEX,
    &LOSS,
    &MOE_DISPATCH,
    &MOE_ROUTER,
    &NORM,
    &OPTIMIZER,
    &REDUCE,
    &ROPE,
    &SERVE_EXPERTS,
    &SERVE_ROUTER,
    &SOFTMAX,
];
