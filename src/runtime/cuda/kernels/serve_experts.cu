// The served decode path's experts: SwiGLU experts straight from the router's slots
// (moe_serve_up_*, moe_serve_down_*), with the RMSNorm and the combine weights folded in
// (moe_serve_up_norm_*). Launchers in ops/grouped_cuda.rs; CPU twins ops::moe_serve_swiglu,
// ops::moe_serve_swiglu_norm.
#include "gemv.cuh"
#include "router_warp.cuh"

// ---- Served decode MoE (a few tokens, dropless routing): the experts straight from the router's
// slots, with no dispatch, gather, activation or combine kernels. Slots are [k, T] (slot j·T + t
// is token t's j-th choice, expert ids[slot], combine weight wts[slot]). Twin: ops::moe_serve_swiglu
// (CPU), checked against the dispatch path. Memory-bound: each slot reads its expert's rows once.
//   moe_serve_up_cC:   a [k·T, F] = silu(x[t]·W1[e][f]ᵀ) · (x[t]·W1[e][F + f]ᵀ), W1 [E, 2F, K];
//                      grid (ceil(F / C), k·T): C gate and C up rows per block, K split across
//                      the block's threads (16-byte vectors).
//   moe_serve_down_uUdD: y [T, N] = Σ_j wts[j·T + t] · a[j·T + t]·W2[e]ᵀ, W2 [E, N, F];
//                      grid (ceil(N / D), T): warps take (choice, part of F) items, lanes split
//                      the part, U vectors per lane and row in flight.
// g and u are rounded to T before the activation, as the unfused path stores them. An expert id
// outside [0, E) contributes nothing (its a row is zero). Weights are read evict-first
// (ld_stream).
__device__ __forceinline__ float serve_silu(float g) { return g / (1.f + expf(-g)); }

// NORM (moe_serve_up_norm, after o_route): the rows are the new residual normed, h = x·r·g with
// r = rsqrt(mean(x²) + eps). Each block sums x² beside its dot products, which take x ⊙ g and are
// scaled by r at the end (no separate norm pass); token t's first block (slot t, column block 0)
// also writes the token's combine weights from z (logits r·z) by the softmax rule
// (warp_softmax_weights) into wts [k, T].
template <typename T> struct ServeNorm {
    const T* g;
    float eps;
    const float* z;
    float* wts;
    int k, wnorm;
    float wadd, wclamp, wscale;
};
template <int COLS, typename T, bool NORM = false>
__device__ __forceinline__ void moe_serve_up(T* a, const T* x, const T* w1, const int* ids, int E, int ntok, int F,
                                             int K, ServeNorm<T> nm = {}) {
    PDL_ENTRY();
    constexpr int VEC = 16 / sizeof(T), R = 2 * COLS;
    __shared__ float red[8][R + NORM];
    const int slot = blockIdx.y, t = slot % ntok, e = ids[slot];
    const int f0 = blockIdx.x * COLS, nc = min(COLS, F - f0);
    const bool ok = e >= 0 && e < E;
    // (The norming kernel goes on with a bad id: its first blocks write the combine weights.)
    if (!NORM && !ok) {
        if (threadIdx.x < nc) a[(int64_t)slot * F + f0 + threadIdx.x] = from_float<T>(0.f);
        return;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kv = K / VEC;
    const T* wg = w1 + ((int64_t)(ok ? e : 0) * 2 * F + f0) * K;  // gate rows f0..; up rows F + f0..
    const T* xr = x + (int64_t)t * K;
    float acc[R], ss = 0.f;
#pragma unroll
    for (int c = 0; c < R; ++c) acc[c] = 0.f;
    for (int v = threadIdx.x; v < kv; v += blockDim.x) {
        uint4 wr[R];
#pragma unroll
        for (int c = 0; c < R; ++c) {
            const int col = c % COLS;
            const int64_t row = (c < COLS ? 0 : F) + col;
            wr[c] = (!NORM || ok) && col < nc ? ld_stream(reinterpret_cast<const uint4*>(wg + row * K + v * VEC))
                                              : make_uint4(0, 0, 0, 0);
        }
        float xf[VEC];
        unpack16<T>(*reinterpret_cast<const uint4*>(xr + v * VEC), xf);
        if (NORM) {
            float gf[VEC];
            unpack16<T>(*reinterpret_cast<const uint4*>(nm.g + v * VEC), gf);
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss += xf[j] * xf[j], xf[j] *= gf[j];
        }
#pragma unroll
        for (int c = 0; c < R; ++c) dot16<T>(&acc[c], wr[c], xf);
    }
#pragma unroll
    for (int c = 0; c < R; ++c) {
        const float s = warp_sum(acc[c]);
        if (lane == 0) red[warp][c] = s;
    }
    if (NORM) {
        ss = warp_sum(ss);
        if (lane == 0) red[warp][R] = ss;
    }
    __syncthreads();
    if (warp != 0) return;
    float rinv = 1.f;
    if (NORM) {
        float t2 = 0.f;
#pragma unroll
        for (int q = 0; q < 8; ++q) t2 += red[q][R];
        rinv = rsqrtf(t2 / K + nm.eps);
    }
    if (lane < nc) {
        float g = 0.f, u = 0.f;
#pragma unroll
        for (int q = 0; q < 8; ++q) g += red[q][lane], u += red[q][COLS + lane];
        if (NORM) g *= rinv, u *= rinv;
        g = to_float(from_float<T>(g)), u = to_float(from_float<T>(u));
        a[(int64_t)slot * F + f0 + lane] = ok ? from_float<T>(serve_silu(g) * u) : from_float<T>(0.f);
    }
    if (NORM && blockIdx.x == 0 && slot < ntok)
        warp_softmax_weights(nm.z + (int64_t)t * E, E, rinv, ids + t, nm.k, nm.wnorm, nm.wadd, nm.wclamp, nm.wscale,
                             nm.wts + t, ntok);
}

template <int U, int C, typename T>
__device__ __forceinline__ void moe_serve_down(T* y, const T* a, const T* w2, const int* ids, const float* wts,
                                               int E, int ntok, int k, int N, int F) {
    PDL_ENTRY();
    constexpr int VEC = 16 / sizeof(T);
    __shared__ float red[8][C];
    const int t = blockIdx.y, n0 = blockIdx.x * C, nc = min(C, N - n0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, fv = F / VEC;
    float acc[C];
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] = 0.f;
    // Work items (choice j, part of F): with fewer than 8 choices each is split in P parts so
    // that all 8 warps read (Mixtral's top-2: 4 warps per expert).
    const int P = k < 8 ? 8 / k : 1;
    for (int q = warp; q < k * P; q += 8) {
        const int j = q / P, pp = q - j * P;
        const int slot = j * ntok + t, e = ids[slot];
        if (e < 0 || e >= E) continue;
        const float wt = wts[slot];
        const T* wb = w2 + ((int64_t)e * N + n0) * F;
        const T* ar = a + (int64_t)slot * F;
        const int vlo = (int)((int64_t)pp * fv / P), vhi = (int)((int64_t)(pp + 1) * fv / P);
        float part[C];
#pragma unroll
        for (int c = 0; c < C; ++c) part[c] = 0.f;
        for (int v0 = vlo + lane; v0 < vhi; v0 += 32 * U) {
            uint4 wr[U][C], av[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = v0 + 32 * u;
                const bool in = v < vhi;
#pragma unroll
                for (int c = 0; c < C; ++c)
                    wr[u][c] = in && c < nc ? ld_stream(reinterpret_cast<const uint4*>(wb + (int64_t)c * F + v * VEC))
                                            : make_uint4(0, 0, 0, 0);
                av[u] = in ? *reinterpret_cast<const uint4*>(ar + v * VEC) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float af[VEC];
                unpack16<T>(av[u], af);
#pragma unroll
                for (int c = 0; c < C; ++c) dot16<T>(&part[c], wr[u][c], af);
            }
        }
#pragma unroll
        for (int c = 0; c < C; ++c) acc[c] += wt * part[c];
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const float s = warp_sum(acc[c]);
        if (lane == 0) red[warp][c] = s;
    }
    __syncthreads();
    if (threadIdx.x < nc) {
        float s = 0.f;
#pragma unroll
        for (int q = 0; q < 8; ++q) s += red[q][threadIdx.x];
        y[(int64_t)t * N + n0 + threadIdx.x] = from_float<T>(s);
    }
}
#define MOE_SERVE_UP(SUFFIX, T, C)                                                                      \
    extern "C" __global__ void __launch_bounds__(256) moe_serve_up_c##C##_##SUFFIX(                     \
        T* a, const T* x, const T* w1, const int* ids, int E, int ntok, int F, int K) {                 \
        moe_serve_up<C, T>(a, x, w1, ids, E, ntok, F, K);                                               \
    }
#define MOE_SERVE_DOWN(SUFFIX, T, U, D)                                                                 \
    extern "C" __global__ void __launch_bounds__(256) moe_serve_down_u##U##d##D##_##SUFFIX(             \
        T* y, const T* a, const T* w2, const int* ids, const float* wts, int E, int ntok, int k, int N, int F) { \
        moe_serve_down<U, D, T>(y, a, w2, ids, wts, E, ntok, k, N, F);                                  \
    }
// The shapes ops/grouped_cuda.rs launches (SERVE_UP_COLS, SERVE_DOWN_UNROLL / SERVE_DOWN_COLS).
#define MOE_SERVE(SUFFIX, T) MOE_SERVE_UP(SUFFIX, T, 4) MOE_SERVE_DOWN(SUFFIX, T, 4, 4)
INSTANTIATE_FLOAT_TYPES(MOE_SERVE)

#define MOE_SERVE_UP_NORM(SUFFIX, T, C)                                                                 \
    extern "C" __global__ void __launch_bounds__(256) moe_serve_up_norm_c##C##_##SUFFIX(                \
        T* a, const T* s_in, const T* gn, float eps, const float* z, float* wts, int wnorm, float wadd,    \
        float wclamp, float wscale, const T* w1, const int* ids, int E, int ntok, int k, int F, int K) {   \
        moe_serve_up<C, T, true>(a, s_in, w1, ids, E, ntok, F, K,                                       \
                                 ServeNorm<T>{gn, eps, z, wts, k, wnorm, wadd, wclamp, wscale});         \
    }
// 8 columns (SERVE_NORM_COLS).
MOE_SERVE_UP_NORM(bf16, bf16_t, 8)
MOE_SERVE_UP_NORM(f16, f16_t, 8)

// moe_serve_up_norm as a streaming loop (moe_serve_up_norm_loop_cCvNV): block (bx, slot) takes
// the column groups bx, bx + gridDim.x, ... of its slot (C gate and C up rows each), with the
// next group's weights in flight while the current one is reduced, so a block pays the id load,
// the norm's sum of squares and its launch once (one wave of blocks, sized by the host) instead
// of per group. Same contract and the same arithmetic, in the same order, as moe_serve_up_norm.
// Requires K <= NV · 256 · (16 / sizeof(T)) (the host picks NV).
template <int COLS, int NV, typename T>
__device__ __forceinline__ void moe_serve_up_norm_loop(T* a, const T* x, const T* w1, const int* ids, int E, int ntok,
                                                       int F, int K, ServeNorm<T> nm) {
    PDL_ENTRY();
    constexpr int VEC = 16 / sizeof(T), R = 2 * COLS;
    __shared__ float red[2][8][R];
    __shared__ float red_ss[8];
    const int slot = blockIdx.y, t = slot % ntok, e = ids[slot];
    const bool ok = e >= 0 && e < E;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ng = (F + COLS - 1) / COLS;
    const T* we = w1 + (int64_t)(ok ? e : 0) * 2 * F * K + (int64_t)threadIdx.x * VEC;
    auto has_v = [&](int i) { return (int)threadIdx.x + 256 * i < K / VEC; };
    auto load = [&](uint4(&w)[NV][R], int gi) {
        const int f0 = gi * COLS, nc = min(COLS, F - f0);
#pragma unroll
        for (int i = 0; i < NV; ++i)
#pragma unroll
            for (int c = 0; c < R; ++c) {
                const int col = c % COLS;
                const int64_t row = (c < COLS ? 0 : F) + f0 + col;
                w[i][c] = ok && has_v(i) && gi < ng && col < nc
                              ? ld_stream(reinterpret_cast<const uint4*>(we + row * K + 256 * i * VEC))
                              : make_uint4(0, 0, 0, 0);
            }
    };
    uint4 cur[NV][R], nxt[NV][R];
    int gi = blockIdx.x;
    load(cur, gi);
    float xf[NV][VEC], ss = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        if (has_v(i)) {
            const int64_t v = threadIdx.x + 256 * i;
            unpack16<T>(*reinterpret_cast<const uint4*>(x + (int64_t)t * K + v * VEC), xf[i]);
            float gf[VEC];
            unpack16<T>(*reinterpret_cast<const uint4*>(nm.g + v * VEC), gf);
#pragma unroll
            for (int j = 0; j < VEC; ++j) ss += xf[i][j] * xf[i][j], xf[i][j] *= gf[j];
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) xf[i][j] = 0.f;
        }
    }
    const float rinv = loop_norm_factor(ss, red_ss, K, nm.eps);
    for (int it = 0; gi < ng; gi += gridDim.x, ++it) {
        load(nxt, gi + gridDim.x);
        loop_group_dots<R, NV, T>(cur, xf, red[it & 1]);
        const int f0 = gi * COLS, nc = min(COLS, F - f0);
        if (warp == 0 && lane < nc) {
            float g = 0.f, u = 0.f;
#pragma unroll
            for (int q = 0; q < 8; ++q) g += red[it & 1][q][lane], u += red[it & 1][q][COLS + lane];
            g *= rinv, u *= rinv;
            g = to_float(from_float<T>(g)), u = to_float(from_float<T>(u));
            a[(int64_t)slot * F + f0 + lane] = ok ? from_float<T>(serve_silu(g) * u) : from_float<T>(0.f);
        }
#pragma unroll
        for (int i = 0; i < NV; ++i)
#pragma unroll
            for (int c = 0; c < R; ++c) cur[i][c] = nxt[i][c];
    }
    if (warp == 0 && blockIdx.x == 0 && slot < ntok)
        warp_softmax_weights(nm.z + (int64_t)t * E, E, rinv, ids + t, nm.k, nm.wnorm, nm.wadd, nm.wclamp, nm.wscale,
                             nm.wts + t, ntok);
}
#define MOE_SERVE_UP_NORM_LOOP(SUFFIX, T, C, NV)                                                        \
    extern "C" __global__ void __launch_bounds__(256) moe_serve_up_norm_loop_c##C##v##NV##_##SUFFIX(    \
        T* a, const T* s_in, const T* gn, float eps, const float* z, float* wts, int wnorm, float wadd,    \
        float wclamp, float wscale, const T* w1, const int* ids, int E, int ntok, int k, int F, int K) {   \
        moe_serve_up_norm_loop<C, NV, T>(a, s_in, w1, ids, E, ntok, F, K,                               \
                                         ServeNorm<T>{gn, eps, z, wts, k, wnorm, wadd, wclamp, wscale}); \
    }
// 2-column groups (SERVE_UP_LOOP), one or two vectors per thread.
#define MOE_SERVE_UP_NORM_LOOPS(SUFFIX, T) \
    MOE_SERVE_UP_NORM_LOOP(SUFFIX, T, 2, 1) MOE_SERVE_UP_NORM_LOOP(SUFFIX, T, 2, 2)
MOE_SERVE_UP_NORM_LOOPS(bf16, bf16_t)
MOE_SERVE_UP_NORM_LOOPS(f16, f16_t)
