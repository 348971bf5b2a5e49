// Shared by the grouped-GEMM families (grouped_mma.cu, grouped_wgmma.cu, grouped_simt.cu,
// grouped_schedule.cu); CPU twins and contract in ops/grouped.rs. Rows offsets[e]..offsets[e+1]
// belong to group e; offsets live on the device (no host sync).
#pragma once

// Rows per m-tile of the tiled VARM kernels (mma.sync, wgmma and TMA alike): tile_prefix's unit.
#define BM 128

// Which group a tile belongs to: the largest g with prefix[g] <= x (prefix has E+1 entries).
__device__ __forceinline__ int find_group(const int* prefix, int E, int x) {
    int lo = 0, hi = E;
    while (hi - lo > 1) {
        int mid = (lo + hi) >> 1;
        if (prefix[mid] <= x) lo = mid; else hi = mid;
    }
    return lo;
}

// Rows past offsets[E] belong to no group: zero them (grid-stride from offsets[E]·N).
// Called by the `nblocks` CTAs that have no tile, `b` being this one's index among them.
template <typename T>
__device__ void zero_tail(T* C, const int* offsets, int E, int M, int N, int b, int nblocks) {
    int64_t start = (int64_t)offsets[E] * N, end = (int64_t)M * N;
    for (int64_t i = start + b * (int64_t)blockDim.x + threadIdx.x; i < end; i += (int64_t)nblocks * blockDim.x)
        C[i] = from_float<T>(0.f);
}
