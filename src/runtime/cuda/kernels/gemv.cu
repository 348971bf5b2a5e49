// Decode GEMVs (a few rows): the small-M grouped x·W[e]ᵀ on CUDA cores (gg_small_nt_r*) and on
// tensor cores (gg_mma_small_*), the dense x·Wᵀ (gemv_nt_r*), and the attention's q/k/v projection
// in one launch, with the residual add + RMSNorm folded in (gemv3_*). Shared pieces in gemv.cuh;
// launchers in ops/grouped_cuda.rs and ops/matmul.rs; CPU twins in ops/grouped.rs, ops/matmul.rs.
#include "gemv.cuh"

// Three projections of the same rows in one launch (decode q, k, v): the grid's column blocks
// cover Nq, then Nk, then Nv = Nk outputs (gg_small_nt each, NORM / LNORM as there).
template <int R, typename T, bool NORM, bool LNORM>
__device__ __forceinline__ void gemv3(T* yq, T* yk, T* yv, const T* x, const T* wq, const T* wk, const T* wv,
                                      int M, int Nq, int Nk, int K, AddNorm<T> an) {
    const int bq = (Nq + SM_COLS - 1) / SM_COLS, bk = (Nk + SM_COLS - 1) / SM_COLS;
    const int bx = blockIdx.x;
    if (bx < bq) {
        gg_small_nt<R, T, T, NORM, LNORM>(yq, x, wq, nullptr, 0, M, Nq, K, bx, an);
    } else if (bx < bq + bk) {
        gg_small_nt<R, T, T, NORM, LNORM>(yk, x, wk, nullptr, 0, M, Nk, K, bx - bq, an);
    } else {
        gg_small_nt<R, T, T, NORM, LNORM>(yv, x, wv, nullptr, 0, M, Nk, K, bx - bq - bk, an);
    }
}
#define GG_SMALL_R(SUFFIX, T, R)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) gg_small_nt_r##R##_##SUFFIX(T* y, const T* x, const T* w, \
                                                                                 const int* offsets, int E, int N, int K) { \
        gg_small_nt<R, T, T>(y, x, w, offsets, E, 0, N, K, blockIdx.x);                                             \
    }
#define GG_SMALL(SUFFIX, T) GG_SMALL_R(SUFFIX, T, 1) GG_SMALL_R(SUFFIX, T, 2) GG_SMALL_R(SUFFIX, T, 4) GG_SMALL_R(SUFFIX, T, 8)
INSTANTIATE_FLOAT_TYPES(GG_SMALL)

// The dense GEMVs and the q/k/v projections take 16-bit rows only (ops/matmul.rs: matmul's
// decode path, qkv_fused).
#define GEMV_R(SUFFIX, T, R)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) gemv_nt_r##R##_##SUFFIX(T* y, const T* x, const T* w, int M, \
                                                                             int N, int K) {            \
        gg_small_nt<R, T, T>(y, x, w, nullptr, 0, M, N, K, blockIdx.x);                                                \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) gemv_nt_r##R##_##SUFFIX##_f32(float* y, const T* x, const T* w, \
                                                                                   int M, int N, int K) { \
        gg_small_nt<R, T, float>(y, x, w, nullptr, 0, M, N, K, blockIdx.x);                                            \
    }                                                                                                   \
    /* Three projections of the same rows in one launch (decode q, k, v; gemv3). */                \
    extern "C" __global__ void __launch_bounds__(256) gemv3_nt_r##R##_##SUFFIX(T* yq, T* yk, T* yv, const T* x, \
                                                                              const T* wq, const T* wk, \
                                                                              const T* wv, int M, int Nq, \
                                                                              int Nk, int K) {           \
        gemv3<R, T, false, false>(yq, yk, yv, x, wq, wk, wv, M, Nq, Nk, K, AddNorm<T>{});              \
    }
// The same with the norm folded into the products (LNORM; x_out the new residual): up to 4 rows
// (QKV_FOLD_ROWS).
#define GEMV3_ADDNORMF(SUFFIX, T, R)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) gemv3_addnormf_r##R##_##SUFFIX(                   \
        T* yq, T* yk, T* yv, const T* x, const T* wq, const T* wk, const T* wv, int M, int Nq, int Nk,   \
        int K, const T* a, const T* g, float eps, T* x_out) {                                            \
        gemv3<R, T, false, true>(yq, yk, yv, x, wq, wk, wv, M, Nq, Nk, K, AddNorm<T>{a, g, eps, x_out, nullptr}); \
    }
// The same with the residual add + RMSNorm before it (addnorm_rows; x_out the new residual): 5 to
// 8 rows.
#define GEMV3_ADDNORM(SUFFIX, T, R)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) gemv3_addnorm_r##R##_##SUFFIX(                    \
        T* yq, T* yk, T* yv, const T* x, const T* wq, const T* wk, const T* wv, int M, int Nq, int Nk,   \
        int K, const T* a, const T* g, float eps, T* x_out) {                                            \
        gemv3<R, T, true, false>(yq, yk, yv, x, wq, wk, wv, M, Nq, Nk, K, AddNorm<T>{a, g, eps, x_out, nullptr}); \
    }
#define GEMV(SUFFIX, T)                                                                                 \
    GEMV_R(SUFFIX, T, 1) GEMV_R(SUFFIX, T, 2) GEMV_R(SUFFIX, T, 4) GEMV_R(SUFFIX, T, 8)                 \
    GEMV3_ADDNORMF(SUFFIX, T, 1) GEMV3_ADDNORMF(SUFFIX, T, 2) GEMV3_ADDNORMF(SUFFIX, T, 4)              \
    GEMV3_ADDNORM(SUFFIX, T, 8)
GEMV(bf16, bf16_t)
GEMV(f16, f16_t)

// Small-M on tensor cores (16-bit types; bf16/f16 only): the same contract as gg_small_nt, for a
// few to a few dozen rows per group (batched decode: ~4 rows per expert at 32 tokens of top-8 over
// 64 experts). The weights are mma.sync's A operand (16 output columns per warp), up to 8·TT rows
// of x its B operand (n = 8 per tile), so each weight byte is read once per 8·TT rows and the
// multiply is free. No shared memory for operands: lane (g, q) loads 16 bytes at k offset 8q of
// weight rows n0+g and n0+g+8 and of x row g, and those 8 k values serve two m16n8k16 steps — k
// is permuted the same way for both operands (step 0 takes k 8q..8q+3 as the fragment's logical
// 2q, 2q+1, 2q+8, 2q+9; step 1 takes 8q+4..8q+7), which leaves the dot products unchanged.
// Block: 4 warps; KS of them split one 16-column tile's K (32-wide chunks c ≡ warp mod KS, their
// partial sums added in shared memory), so a block covers 16·4/KS columns: KS = 1 for many groups
// (each warp streams its 16 rows whole) up to 4 (each warp a quarter of K; fastest measured).
// (One group — a dense x·Wᵀ of 9..64 rows — ran ~1.8× slower than cuBLAS: not used there.)
// Grid (ceil(N / (64 / KS)), groups) as gg_small_nt. Requires K % 32 == 0 (the host checks).
// MMA_U chunks per warp are in flight (8 with one or two row tiles, 4 with four).
template <int NU, int TT, typename T>
__device__ __forceinline__ void mma_small_steps(float (&acc)[TT][4], const T* wa, const T* wb,
                                                const T* const (&xr)[TT], const bool (&xok)[TT], int k0,
                                                int kstride) {
    uint4 va[NU], vb[NU], vx[TT][NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) {
        va[u] = __ldg(reinterpret_cast<const uint4*>(wa + k0 + kstride * u));
        vb[u] = __ldg(reinterpret_cast<const uint4*>(wb + k0 + kstride * u));
#pragma unroll
        for (int t = 0; t < TT; ++t) vx[t][u] = *reinterpret_cast<const uint4*>(xr[t] + k0 + kstride * u);
    }
#pragma unroll
    for (int u = 0; u < NU; ++u)
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            const uint4 xv = xok[t] ? vx[t][u] : make_uint4(0, 0, 0, 0);
            const uint32_t a0[4] = {va[u].x, vb[u].x, va[u].y, vb[u].y};
            const uint32_t b0[2] = {xv.x, xv.y};
            Mma<T>::run(acc[t], a0, b0);
            const uint32_t a1[4] = {va[u].z, vb[u].z, va[u].w, vb[u].w};
            const uint32_t b1[2] = {xv.z, xv.w};
            Mma<T>::run(acc[t], a1, b1);
        }
}
template <int TT, int KS, typename T, typename TO, int MMA_U = (TT >= 4 ? 4 : 8)>
__device__ __forceinline__ void gg_mma_small(TO* y, const T* x, const T* w, const int* offsets, int E, int M,
                                             int N, int K) {
    PDL_ENTRY();
    __shared__ float red[KS > 1 ? 4 : 1][TT][4][32];
    const int e = offsets ? nth_nonempty_group(offsets, E, blockIdx.y) : 0;
    if (e < 0) return;
    const int r0 = offsets ? offsets[e] : 0, r1 = offsets ? offsets[e + 1] : M;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int kw = warp % KS;  // this warp's share of K
    const int n0 = blockIdx.x * (64 / KS) + (warp / KS) * 16;
    // Whole block leaves together (the K split synchronises below).
    if (r0 >= r1 || blockIdx.x * (64 / KS) >= N) return;
    const int na = n0 + g, nb = n0 + g + 8;
    const T* wa = w + ((int64_t)e * N + min(na, N - 1)) * K + 8 * q + 32 * kw;
    const T* wb = w + ((int64_t)e * N + min(nb, N - 1)) * K + 8 * q + 32 * kw;
    const int kmine = K - 32 * kw;  // k extent from this warp's first chunk
    for (int m0 = r0; m0 < r1; m0 += 8 * TT) {
        float acc[TT][4];
        const T* xr[TT];
        bool xok[TT];
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            const int row = m0 + 8 * t + g;
            xok[t] = row < r1;
            xr[t] = x + (int64_t)(xok[t] ? row : r0) * K + 8 * q + 32 * kw;
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;
        }
        int k0 = 0;
        for (; k0 + 32 * KS * (MMA_U - 1) < kmine; k0 += 32 * KS * MMA_U)
            mma_small_steps<MMA_U, TT, T>(acc, wa, wb, xr, xok, k0, 32 * KS);
        // The rest in at most three rounds (4, 2, 1 chunks).
        if (MMA_U > 4 && k0 + 32 * KS * 3 < kmine) {
            mma_small_steps<4, TT, T>(acc, wa, wb, xr, xok, k0, 32 * KS);
            k0 += 32 * KS * 4;
        }
        if (k0 + 32 * KS < kmine) {
            mma_small_steps<2, TT, T>(acc, wa, wb, xr, xok, k0, 32 * KS);
            k0 += 32 * KS * 2;
        }
        if (k0 < kmine) mma_small_steps<1, TT, T>(acc, wa, wb, xr, xok, k0, 32 * KS);
        if (KS > 1) {
            // Partial sums of the KS warps of each column tile added by its first warp.
#pragma unroll
            for (int t = 0; t < TT; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) red[warp][t][i][lane] = acc[t][i];
            __syncthreads();
            if (kw == 0)
#pragma unroll
                for (int t = 0; t < TT; ++t)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
#pragma unroll
                        for (int s = 1; s < KS; ++s) acc[t][i] += red[warp + s][t][i][lane];
            __syncthreads();
        }
        // Accumulator (i, j): output column n0 + g + 8·(i / 2), row m0 + 8t + 2q + (i % 2).
        if (kw == 0)
#pragma unroll
            for (int t = 0; t < TT; ++t)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int row = m0 + 8 * t + 2 * q + j;
                    if (row >= r1) continue;
                    if (na < N) y[(int64_t)row * N + na] = from_float<TO>(acc[t][j]);
                    if (nb < N) y[(int64_t)row * N + nb] = from_float<TO>(acc[t][2 + j]);
                }
    }
}
#define GG_MMA_SMALL_T(SUFFIX, T, TT, KS)                                                               \
    extern "C" __global__ void __launch_bounds__(128) gg_mma_small_t##TT##_k##KS##_##SUFFIX(            \
        T* y, const T* x, const T* w, const int* offsets, int E, int N, int K) {                        \
        gg_mma_small<TT, KS, T, T>(y, x, w, offsets, E, 0, N, K);                                       \
    }
#define GG_MMA_SMALL_K(SUFFIX, T, KS) \
    GG_MMA_SMALL_T(SUFFIX, T, 1, KS) GG_MMA_SMALL_T(SUFFIX, T, 2, KS) GG_MMA_SMALL_T(SUFFIX, T, 4, KS)
#define GG_MMA_SMALL(SUFFIX, T) GG_MMA_SMALL_K(SUFFIX, T, 1) GG_MMA_SMALL_K(SUFFIX, T, 2) GG_MMA_SMALL_K(SUFFIX, T, 4)
GG_MMA_SMALL(bf16, bf16_t)
GG_MMA_SMALL(f16, f16_t)

// gemv3_addnormf for one row as a streaming loop (gemv3_addnormf_loop_cCvNV): the column groups
// of [q | k | v] (C columns each; q's groups, then k's, then v's) are dealt to the blocks in turn
// (block b takes groups b, b + gridDim.x, ...), with the next group's weights in flight while
// the current one is reduced; the row's s = x + a (rounded to T; block 0 stores it to x_out),
// its s ⊙ g and the norm factor are computed once per block. Same arithmetic, in the same order,
// as gemv3_addnormf at one row. Requires M == 1 and K <= NV · 256 · (16 / sizeof(T)) (the host
// picks NV).
template <int C, int NV, typename T>
__device__ __forceinline__ void gemv3_addnormf_loop(T* yq, T* yk, T* yv, const T* x, const T* wq, const T* wk,
                                                    const T* wv, int Nq, int Nk, int K, AddNorm<T> an) {
    PDL_ENTRY();
    constexpr int VEC = 16 / sizeof(T);
    __shared__ float red[2][8][C];
    __shared__ float red_ss[8];
    auto has_v = [&](int i) { return (int)threadIdx.x + 256 * i < K / VEC; };
    const int gq = (Nq + C - 1) / C, gk = (Nk + C - 1) / C, ng = gq + 2 * gk;
    // Group gi: its matrix, output, first column and column count.
    auto where = [&](int gi, const T*& w, T*& y, int& n0, int& nc) {
        const int m = gi < gq ? 0 : (gi < gq + gk ? 1 : 2);
        const int b = gi - (m == 0 ? 0 : (m == 1 ? gq : gq + gk));
        const int n = m == 0 ? Nq : Nk;
        w = m == 0 ? wq : (m == 1 ? wk : wv);
        y = m == 0 ? yq : (m == 1 ? yk : yv);
        n0 = b * C;
        nc = min(C, n - n0);
    };
    auto load = [&](uint4(&wr)[NV][C], int gi) {
        const T* w;
        T* y;
        int n0 = 0, nc = 0;
        if (gi < ng) where(gi, w, y, n0, nc);
#pragma unroll
        for (int i = 0; i < NV; ++i)
#pragma unroll
            for (int c = 0; c < C; ++c)
                wr[i][c] = has_v(i) && c < nc ? ld_stream(reinterpret_cast<const uint4*>(
                                                    w + (int64_t)(n0 + c) * K + (threadIdx.x + 256 * i) * VEC))
                                              : make_uint4(0, 0, 0, 0);
    };
    uint4 cur[NV][C], nxt[NV][C];
    int gi = blockIdx.x;
    load(cur, gi);
    float xf[NV][VEC], ss = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        if (has_v(i)) {
            const int64_t xo = (int64_t)(threadIdx.x + 256 * i) * VEC;
            uint4 xr = *reinterpret_cast<const uint4*>(x + xo);
            const uint4 au = *reinterpret_cast<const uint4*>(an.a + xo);
            float gf[VEC];
            unpack16<T>(*reinterpret_cast<const uint4*>(an.g + xo), gf);
            addnorm_vec16<T>(xr, au, gf, ss, xf[i]);
            if (blockIdx.x == 0) *reinterpret_cast<uint4*>(an.x_out + xo) = xr;
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) xf[i][j] = 0.f;
        }
    }
    const float rinv = loop_norm_factor(ss, red_ss, K, an.eps);
    for (int it = 0; gi < ng; gi += gridDim.x, ++it) {
        load(nxt, gi + gridDim.x);
        loop_group_dots<C, NV, T>(cur, xf, red[it & 1]);
        const T* w;
        T* y;
        int n0, nc;
        where(gi, w, y, n0, nc);
        if ((int)threadIdx.x < nc) {
            float s = 0.f;
#pragma unroll
            for (int q = 0; q < 8; ++q) s += red[it & 1][q][threadIdx.x];
            y[n0 + threadIdx.x] = from_float<T>(s * rinv);
        }
#pragma unroll
        for (int i = 0; i < NV; ++i)
#pragma unroll
            for (int c = 0; c < C; ++c) cur[i][c] = nxt[i][c];
    }
}
#define GEMV3_LOOP(SUFFIX, T, C, NV)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) gemv3_addnormf_loop_c##C##v##NV##_##SUFFIX(       \
        T* yq, T* yk, T* yv, const T* x, const T* wq, const T* wk, const T* wv, int M, int Nq, int Nk,   \
        int K, const T* a, const T* g, float eps, T* x_out) {                                            \
        gemv3_addnormf_loop<C, NV, T>(yq, yk, yv, x, wq, wk, wv, Nq, Nk, K,                             \
                                      AddNorm<T>{a, g, eps, x_out, nullptr});                           \
    }
// 4-column groups (QKV_LOOP), one or two vectors per thread.
#define GEMV3_LOOPS(SUFFIX, T) GEMV3_LOOP(SUFFIX, T, 4, 1) GEMV3_LOOP(SUFFIX, T, 4, 2)
GEMV3_LOOPS(bf16, bf16_t)
GEMV3_LOOPS(f16, f16_t)
