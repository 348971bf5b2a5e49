//! The kernel families (`kernels/*.cu`), one `KernelSource` each; `ALL` lets a test compile every
//! family with NVRTC on a machine that has the compiler but no GPU.

use super::KernelSource;

pub const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    src: include_str!("kernels/attention.cu"),
};
pub const CAST: KernelSource = KernelSource {
    name: "cast",
    src: include_str!("kernels/cast.cu"),
};
pub const ELEMENTWISE: KernelSource = KernelSource {
    name: "elementwise",
    src: include_str!("kernels/elementwise.cu"),
};
pub const EMBEDDING: KernelSource = KernelSource {
    name: "embedding",
    src: include_str!("kernels/embedding.cu"),
};
pub const FLASH: KernelSource = KernelSource {
    name: "flash",
    src: include_str!("kernels/flash.cu"),
};
pub const GROUPED_GEMM: KernelSource = KernelSource {
    name: "grouped_gemm",
    src: include_str!("kernels/grouped_gemm.cu"),
};
pub const INDEX: KernelSource = KernelSource {
    name: "index",
    src: include_str!("kernels/index.cu"),
};
pub const LOSS: KernelSource = KernelSource {
    name: "loss",
    src: include_str!("kernels/loss.cu"),
};
pub const MOE_DISPATCH: KernelSource = KernelSource {
    name: "moe_dispatch",
    src: include_str!("kernels/moe_dispatch.cu"),
};
pub const MOE_ROUTER: KernelSource = KernelSource {
    name: "moe_router",
    src: include_str!("kernels/moe_router.cu"),
};
pub const NORM: KernelSource = KernelSource {
    name: "norm",
    src: include_str!("kernels/norm.cu"),
};
pub const OPTIMIZER: KernelSource = KernelSource {
    name: "optimizer",
    src: include_str!("kernels/optimizer.cu"),
};
pub const REDUCE: KernelSource = KernelSource {
    name: "reduce",
    src: include_str!("kernels/reduce.cu"),
};
pub const ROPE: KernelSource = KernelSource {
    name: "rope",
    src: include_str!("kernels/rope.cu"),
};
pub const SOFTMAX: KernelSource = KernelSource {
    name: "softmax",
    src: include_str!("kernels/softmax.cu"),
};

pub const ALL: &[&KernelSource] = &[
    &ATTENTION,
    &CAST,
    &ELEMENTWISE,
    &EMBEDDING,
    &FLASH,
    &GROUPED_GEMM,
    &INDEX,
    &LOSS,
    &MOE_DISPATCH,
    &MOE_ROUTER,
    &NORM,
    &OPTIMIZER,
    &REDUCE,
    &ROPE,
    &SOFTMAX,
];
