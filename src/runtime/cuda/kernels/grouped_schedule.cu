// The tiled grouped-GEMM kernels' schedule (grouped_mma.cu, grouped_wgmma.cu): per-group tile
// prefix sums over the device offsets. Launcher: ops/grouped_cuda.rs `tile_prefix`.
#include "grouped.cuh"

// tile_prefix[e] = Σ_{e' < e} ceil(rows_e' / BM) for the VARM scheduler: one block, warp
// scans of 32 groups, chunks of blockDim groups carried over (any E). The serial one-thread
// loop it replaces took ~14 µs at E = 64 (a dependent global load per group).
extern "C" __global__ void gg_tile_prefix(int* tile_prefix, const int* offsets, int E) {
    __shared__ int warp_incl[32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    int carry = 0;
    for (int base = 0; base < E; base += blockDim.x) {
        const int e = base + tid;
        const int t = e < E ? (offsets[e + 1] - offsets[e] + BM - 1) / BM : 0;
        int x = t;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == 31) warp_incl[warp] = x;
        __syncthreads();
        if (warp == 0) {
            int w = lane < nw ? warp_incl[lane] : 0;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, w, o);
                if (lane >= o) w += y;
            }
            if (lane < nw) warp_incl[lane] = w;
        }
        __syncthreads();
        if (e < E) tile_prefix[e] = carry + (warp > 0 ? warp_incl[warp - 1] : 0) + x - t;
        carry += warp_incl[nw - 1];
        __syncthreads();
    }
    if (tid == 0) tile_prefix[E] = carry;
}
