// Small-M (decode) pieces shared by gemv.cu, serve_router.cu and serve_experts.cu.
#pragma once

// Small-M VARM for B_e = W[e] as [N,K] (decode: a few rows per expert), and the plain small-M
// x·Wᵀ (offsets == nullptr: one group of M rows). Memory-bound: every active expert's weights are
// read once per chunk of ROWS rows with 16-byte loads. Block (8-column block, e) of 256 threads
// splits K: thread t takes 16-byte vectors t, t+256, ... of the 8 weight rows (8 independent
// loads in flight) and of the chunk's x rows, accumulates ROWS × 8 dot products, then a warp
// reduction and a reduction over the 8 warps in shared memory. Empty groups exit at once.
// Requires K % (16 / sizeof(T)) == 0 (the host checks).
#define SM_COLS 8
// The grid's y index counts non-empty groups (the host launches min(E, M) of them, so no block
// exists for the many experts a decode step does not touch); warp 0 finds the y-th non-empty
// group with ballots over the offsets, and blocks past the last one exit.
__device__ __forceinline__ int nth_nonempty_group(const int* offsets, int E, int n) {
    __shared__ int found;
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        int f = -1;
        for (int base = 0; base < E && f < 0; base += 32) {
            const int g = base + lane;
            const bool ne = g < E && offsets[g + 1] > offsets[g];
            unsigned m = __ballot_sync(0xffffffffu, ne);
            const int c = __popc(m);
            if (n < c) {
                for (int i = 0; i < n; ++i) m &= m - 1;
                f = base + __ffs(m) - 1;
            } else {
                n -= c;
            }
        }
        if (lane == 0) found = f;
    }
    __syncthreads();
    return found;
}

// 16-byte vectors of T: a dot product with 8 (or 4) f32 values, and unpacked to f32.
template <typename T>
__device__ __forceinline__ void dot16(float* acc, const uint4& w, const float* xf) {
    const T* wt = reinterpret_cast<const T*>(&w);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 16 / (int)sizeof(T); ++j) s += to_float(wt[j]) * xf[j];
    *acc += s;
}
template <typename T> __device__ __forceinline__ void unpack16(const uint4& v, float* f) {
    const T* t = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < 16 / (int)sizeof(T); ++j) f[j] = to_float(t[j]);
}
// One 16-byte vector of a residual add folded into a norm's products: xr = x + a (rounded to T,
// as add_rmsnorm stores it, in place), its squares added to ss, and xr ⊙ g into xf.
template <typename T>
__device__ __forceinline__ void addnorm_vec16(uint4& xr, const uint4 a, const float* gf, float& ss, float* xf) {
    const T* at = reinterpret_cast<const T*>(&a);
    T* st = reinterpret_cast<T*>(&xr);
#pragma unroll
    for (int j = 0; j < 16 / (int)sizeof(T); ++j) {
        st[j] = from_float<T>(to_float(st[j]) + to_float(at[j]));
        const float f = to_float(st[j]);
        ss += f * f;
        xf[j] = f * gf[j];
    }
}

// The residual add + RMSNorm folded into a decode GEMV's input (the *_addnorm kernels): each
// block computes s = x + a and h = s · rsqrt(mean(s²) + eps) · g for the M rows itself, each
// rounded to T as add_rmsnorm writes them, into shared memory (dynamic, M·K·sizeof(T) bytes),
// and multiplies h. The writer block (blockIdx.x == 0) also stores s to x_out — the new residual,
// never x itself, which other blocks are still reading — and h to h_out when non-null.
template <typename T> struct AddNorm {
    const T* a;
    const T* g;
    float eps;
    T* x_out;
    T* h_out;
};
template <int ROWS, typename T>
__device__ __forceinline__ void addnorm_rows(T* hs, const T* x, const AddNorm<T>& an, int M, int K) {
    constexpr int VEC = 16 / sizeof(T);
    __shared__ float part[8][ROWS];
    __shared__ float rinv[ROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kv = K / VEC;
    const bool writer = blockIdx.x == 0;
    float ss[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) ss[r] = 0.f;
    for (int v = threadIdx.x; v < kv; v += blockDim.x)
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            if (r < M) {
                const int64_t o = (int64_t)r * K + v * VEC;
                const uint4 xu = *reinterpret_cast<const uint4*>(x + o), au = *reinterpret_cast<const uint4*>(an.a + o);
                const T* xt = reinterpret_cast<const T*>(&xu);
                const T* at = reinterpret_cast<const T*>(&au);
                uint4 su;
                T* st = reinterpret_cast<T*>(&su);
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    st[j] = from_float<T>(to_float(xt[j]) + to_float(at[j]));
                    const float f = to_float(st[j]);
                    ss[r] += f * f;
                }
                *reinterpret_cast<uint4*>(hs + o) = su;
                if (writer) *reinterpret_cast<uint4*>(an.x_out + o) = su;
            }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const float t = warp_sum(ss[r]);
        if (lane == 0) part[warp][r] = t;
    }
    __syncthreads();
    if (threadIdx.x < ROWS) {
        float t = 0.f;
#pragma unroll
        for (int q = 0; q < 8; ++q) t += part[q][threadIdx.x];
        rinv[threadIdx.x] = rsqrtf(t / K + an.eps);
    }
    __syncthreads();
    for (int v = threadIdx.x; v < kv; v += blockDim.x) {
        const uint4 gu = *reinterpret_cast<const uint4*>(an.g + v * VEC);
        const T* gt = reinterpret_cast<const T*>(&gu);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            if (r < M) {
                const int64_t o = (int64_t)r * K + v * VEC;
                uint4 hu = *reinterpret_cast<const uint4*>(hs + o);
                T* ht = reinterpret_cast<T*>(&hu);
#pragma unroll
                for (int j = 0; j < VEC; ++j) ht[j] = from_float<T>(to_float(ht[j]) * rinv[r] * to_float(gt[j]));
                *reinterpret_cast<uint4*>(hs + o) = hu;
                if (writer && an.h_out) *reinterpret_cast<uint4*>(an.h_out + o) = hu;
            }
    }
    __syncthreads();
}

// resid (dense only): y = resid + x·Wᵀ, the product rounded to T before the add (a residual add
// as add_rmsnorm does it after a stored projection).
// NORM: the rows are x + an.a, normed (addnorm_rows; dense only, offsets == nullptr). The block's
// first round of weight loads is issued before the norm, so its latency hides under them.
// LNORM: the same rows with the norm folded into the products instead (no norm pass): each
// thread takes s = x + an.a (rounded to T; the writer block stores it to an.x_out) times g into
// its dot products and sums s² beside them; the outputs are scaled by r = rsqrt(mean(s²) + eps).
template <int ROWS, typename T, typename TO, bool NORM = false, bool LNORM = false>
__device__ __forceinline__ void gg_small_nt(TO* y, const T* x, const T* w, const int* offsets, int E, int M,
                                            int N, int K, int bx, AddNorm<T> an = {}, const T* resid = nullptr) {
    PDL_ENTRY();
    constexpr int VEC = 16 / sizeof(T);
    __shared__ float red[8][ROWS][SM_COLS];
    // (Without LNORM the norm sums are never used: the `LNORM ? … : 0` sizes and index masks below
    // keep that code in bounds.)
    __shared__ float red_ss[LNORM ? 8 : 1][ROWS];
    float ss[ROWS];
    _Pragma("unroll") for (int r = 0; r < ROWS; ++r) ss[r] = 0.f;
    const int e = offsets ? nth_nonempty_group(offsets, E, blockIdx.y) : 0;
    if (e < 0) return;
    const int r0 = offsets ? offsets[e] : 0, r1 = offsets ? offsets[e + 1] : M;
    if (r0 >= r1) return;
    const int n0 = bx * SM_COLS, ncols = min(SM_COLS, N - n0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, kv = K / VEC;
    const T* wb = w + ((int64_t)e * N + n0) * K;
    uint4 pre[SM_COLS];
    if (NORM) {
        extern __shared__ uint4 gemv_rows[];
        if ((int)threadIdx.x < kv)
            _Pragma("unroll") for (int c = 0; c < SM_COLS; ++c)
                pre[c] = c < ncols ? ld_stream(reinterpret_cast<const uint4*>(wb + (int64_t)c * K + threadIdx.x * VEC))
                                   : make_uint4(0, 0, 0, 0);
        T* hs = reinterpret_cast<T*>(gemv_rows);
        addnorm_rows<ROWS, T>(hs, x, an, M, K);
        x = hs;
    }
    for (int rc = r0; rc < r1; rc += ROWS) {
        const int rows = min(ROWS, r1 - rc);
        float acc[ROWS][SM_COLS];
        _Pragma("unroll") for (int r = 0; r < ROWS; ++r)
            _Pragma("unroll") for (int c = 0; c < SM_COLS; ++c) acc[r][c] = 0.f;
        for (int v = threadIdx.x; v < kv; v += blockDim.x) {
            uint4 wr[SM_COLS];
            const bool first = NORM && rc == r0 && v == (int)threadIdx.x;
            _Pragma("unroll") for (int c = 0; c < SM_COLS; ++c)
                wr[c] = first ? pre[c]
                        : c < ncols ? ld_stream(reinterpret_cast<const uint4*>(wb + (int64_t)c * K + v * VEC))
                                    : make_uint4(0, 0, 0, 0);
            float gf[VEC];
            if (LNORM) unpack16<T>(*reinterpret_cast<const uint4*>(an.g + v * VEC), gf);
            _Pragma("unroll") for (int r = 0; r < ROWS; ++r) {
                if (r < rows) {
                    const int64_t xo = (int64_t)(rc + r) * K + v * VEC;
                    uint4 xr = *reinterpret_cast<const uint4*>(x + xo);
                    float xf[VEC];
                    if (LNORM) {
                        addnorm_vec16<T>(xr, *reinterpret_cast<const uint4*>(an.a + xo), gf, ss[r], xf);
                        if (blockIdx.x == 0) *reinterpret_cast<uint4*>(an.x_out + xo) = xr;
                    } else {
                        unpack16<T>(xr, xf);
                    }
                    _Pragma("unroll") for (int c = 0; c < SM_COLS; ++c) dot16<T>(&acc[r][c], wr[c], xf);
                }
            }
        }
        _Pragma("unroll") for (int r = 0; r < ROWS; ++r)
            _Pragma("unroll") for (int c = 0; c < SM_COLS; ++c) {
                float s = warp_sum(acc[r][c]);
                if (lane == 0) red[warp][r][c] = s;
            }
        if (LNORM)
            _Pragma("unroll") for (int r = 0; r < ROWS; ++r) {
                const float t = warp_sum(ss[r]);
                if (lane == 0) red_ss[warp & (LNORM ? 7 : 0)][r] = t;
                ss[r] = 0.f;
            }
        __syncthreads();
        if (threadIdx.x < ROWS * SM_COLS) {
            const int r = threadIdx.x / SM_COLS, c = threadIdx.x % SM_COLS;
            if (r < rows && c < ncols) {
                float s = 0.f;
                _Pragma("unroll") for (int q = 0; q < 8; ++q) s += red[q][r][c];
                if (LNORM) {
                    float t = 0.f;
                    _Pragma("unroll") for (int q = 0; q < 8; ++q) t += red_ss[q & (LNORM ? 7 : 0)][r];
                    s *= rsqrtf(t / K + an.eps);
                }
                const int64_t at = (int64_t)(rc + r) * N + n0 + c;
                if (resid) s = to_float(resid[at]) + to_float(from_float<T>(s));
                y[at] = from_float<TO>(s);
            }
        }
        __syncthreads();
    }
}

// Pieces of the streaming-loop kernels (256 threads, NV 16-byte vectors per thread: thread t
// takes vectors t, t + 256, ...).
// The row's RMSNorm factor rsqrt(mean + eps) from each thread's sum of squares (same on all
// threads; red_ss: 8 floats of shared memory).
__device__ __forceinline__ float loop_norm_factor(float ss, float* red_ss, int K, float eps) {
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red_ss[threadIdx.x >> 5] = ss;
    __syncthreads();
    float t2 = 0.f;
#pragma unroll
    for (int q = 0; q < 8; ++q) t2 += red_ss[q];
    return rsqrtf(t2 / K + eps);
}
// One group's N dot products of the thread's weights with xf (its vectors in order), summed per
// warp into red[warp][c], then a barrier (the caller alternates two red buffers between groups).
template <int N, int NV, typename T>
__device__ __forceinline__ void loop_group_dots(const uint4 (&w)[NV][N], const float (&xf)[NV][16 / sizeof(T)],
                                                float (*red)[N]) {
    float acc[N];
#pragma unroll
    for (int c = 0; c < N; ++c) {
        acc[c] = 0.f;
#pragma unroll
        for (int i = 0; i < NV; ++i) dot16<T>(&acc[c], w[i][c], xf[i]);
    }
#pragma unroll
    for (int c = 0; c < N; ++c) {
        const float s = warp_sum(acc[c]);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5][c] = s;
    }
    __syncthreads();
}
