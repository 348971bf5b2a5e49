// Grouped GEMMs over expert-contiguous rows on mma.sync (sm_80+); CPU twins and contract in
// ops/grouped.rs, launchers in ops/grouped_cuda.rs. Rows offsets[e]..offsets[e+1] belong to group e.
//   VARM (forward, dgrad): C[g] (m_e × N) = A[g] (m_e × K) · B_e       B_e = W[e] as [N,K] (K-major) or [K,N]
//   VARK (wgrad):          C[e] (P × Q)  = A[g]ᵀ · B[g], A [M,P], B [M,Q]  (reduction over the group's rows)
// Tensor-core path (bf16/f16, f32 accumulate): CTA tile 128×128×32, 8 warps (2×4) of 64×32,
// mma.sync m16n8k16, 4-stage cp.async pipeline, XOR-swizzled shared memory read by ldmatrix
// (.trans for M/N-major operands). FLOPs per tile step 2·128·128·32; smem 4 × 16 KB.

#include "grouped.cuh"

#define BN 128
#define BK 32
#define STAGES 4
#define THREADS 256

// Shared-memory element index of a tile. K-major tile [R][BK] (4 16-byte chunks per row, chunk
// XOR (row/2)%4); M/N-major tile [BK][128] (16 chunks per row, chunk XOR k%8). Both make the 8
// row addresses of every ldmatrix 8×8 load hit 8 distinct 16-byte bank groups.
__device__ __forceinline__ int kmaj_idx(int r, int k) { return r * BK + ((((k >> 3) ^ (r >> 1)) & 3) << 3) + (k & 7); }
__device__ __forceinline__ int mnmaj_idx(int k, int m) { return k * 128 + ((((m >> 3) ^ k) & 7) | ((m >> 3) & 8)) * 8 + (m & 7); }

// One CTA computes a BM×BN tile of C = op(A)·op(B) over Kdim.
//   A(m,k) = A_KMAJ ? A[m·lda + k] : A[k·lda + m]   valid m < Mv, k < Kdim
//   B(k,n) = B_KMAJ ? B[n·ldb + k] : B[k·ldb + n]   valid n < Nv
// Requires: the contiguous dimension of each operand a multiple of 8 and 16-byte aligned rows.
template <typename T, typename TO, bool A_KMAJ, bool B_KMAJ, bool ACC = false>
__device__ __forceinline__ void tile_gemm(TO* __restrict__ C, int ldc, const T* __restrict__ A, int lda,
                                          const T* __restrict__ B, int ldb, int m0, int n0, int Mv, int Nv, int Kdim,
                                          unsigned short* smem, float* sumsq = nullptr) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    unsigned short* As = smem;                       // STAGES × 128·32
    unsigned short* Bs = smem + STAGES * BM * BK;    // STAGES × 128·32
    const int nk = (Kdim + BK - 1) / BK;

    auto load = [&](int stage, int kt) {
        const int k0 = kt * BK;
        unsigned short* as = As + stage * BM * BK;
        unsigned short* bs = Bs + stage * BN * BK;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            int c = tid + i * THREADS;  // 512 chunks of 8 elements per operand tile
            if (A_KMAJ) {
                int r = c >> 2, kc = (c & 3) << 3;
                bool ok = (m0 + r < Mv) && (k0 + kc < Kdim);
                const T* src = ok ? A + (int64_t)(m0 + r) * lda + k0 + kc : A;
                cp_async16(smem_addr(as + kmaj_idx(r, kc)), src, ok);
            } else {
                int kr = c >> 4, mc = (c & 15) << 3;
                bool ok = (k0 + kr < Kdim) && (m0 + mc < Mv);
                const T* src = ok ? A + (int64_t)(k0 + kr) * lda + m0 + mc : A;
                cp_async16(smem_addr(as + mnmaj_idx(kr, mc)), src, ok);
            }
            if (B_KMAJ) {
                int r = c >> 2, kc = (c & 3) << 3;
                bool ok = (n0 + r < Nv) && (k0 + kc < Kdim);
                const T* src = ok ? B + (int64_t)(n0 + r) * ldb + k0 + kc : B;
                cp_async16(smem_addr(bs + kmaj_idx(r, kc)), src, ok);
            } else {
                int kr = c >> 4, nc = (c & 15) << 3;
                bool ok = (k0 + kr < Kdim) && (n0 + nc < Nv);
                const T* src = ok ? B + (int64_t)(k0 + kr) * ldb + n0 + nc : B;
                cp_async16(smem_addr(bs + mnmaj_idx(kr, nc)), src, ok);
            }
        }
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nk) load(s, s);
        cp_async_commit();
    }
    const int q = lane >> 3, r8 = lane & 7;
    for (int kt = 0; kt < nk; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        int pf = kt + STAGES - 1;
        if (pf < nk) load(pf % STAGES, pf);
        cp_async_commit();
        const unsigned short* as = As + (kt % STAGES) * BM * BK;
        const unsigned short* bs = Bs + (kt % STAGES) * BN * BK;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[4][4], bfr[2][4];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                if (A_KMAJ) ldsm_x4(af[mi], smem_addr(as + kmaj_idx(wm + mi * 16 + r8 + (q & 1) * 8, kk + (q >> 1) * 8)));
                else ldsm_x4_t(af[mi], smem_addr(as + mnmaj_idx(kk + r8 + (q >> 1) * 8, wm + mi * 16 + (q & 1) * 8)));
            }
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                if (B_KMAJ) ldsm_x4(bfr[nj], smem_addr(bs + kmaj_idx(wn + nj * 16 + r8 + (q >> 1) * 8, kk + (q & 1) * 8)));
                else ldsm_x4_t(bfr[nj], smem_addr(bs + mnmaj_idx(kk + r8 + (q & 1) * 8, wn + nj * 16 + (q >> 1) * 8)));
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) Mma<T>::run(acc[mi][ni], af[mi], &bfr[ni >> 1][(ni & 1) * 2]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at row g + 8. With `sumsq`, the squares
    // of the values written are summed into it (one atomic per warp).
    const int g = lane >> 2, t4 = lane & 3;
    float ss = 0.f;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                int m = m0 + wm + mi * 16 + g + h * 8;
                int n = n0 + wn + ni * 8 + t4 * 2;
                if (m < Mv && n < Nv) {
                    TO* dst = C + (int64_t)m * ldc + n;
                    const float v0 = acc[mi][ni][h * 2] + (ACC ? to_float(dst[0]) : 0.f);
                    dst[0] = from_float<TO>(v0);
                    ss += v0 * v0;
                    if (n + 1 < Nv) {
                        const float v1 = acc[mi][ni][h * 2 + 1] + (ACC ? to_float(dst[1]) : 0.f);
                        dst[1] = from_float<TO>(v1);
                        ss += v1 * v1;
                    }
                }
            }
    if (sumsq) {
        ss = warp_sum(ss);
        if (lane == 0) atomicAdd(sumsq, ss);
    }
}

// VARM: y[M, N] rows of group e = x[rows of e] · op(W[e]); grid.x = (ceil(M/BM) + E) · n_tiles,
// blocks past the real tile count zero the tail rows instead.
#define GG_VARM(NAME, T, B_KMAJ)                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(T* y, const T* x, const T* w,          \
                                                               const int* offsets, const int* tile_prefix, \
                                                               int E, int M, int N, int K) {            \
        extern __shared__ unsigned short smem[];                                                        \
        const int ntn = (N + BN - 1) / BN;                                                              \
        const int mt = blockIdx.x / ntn, nt = blockIdx.x - mt * ntn;                                    \
        if (mt >= tile_prefix[E]) {                                                                     \
            const int first = tile_prefix[E] * ntn;                                                     \
            zero_tail<T>(y, offsets, E, M, N, blockIdx.x - first, gridDim.x - first);                   \
            return;                                                                                     \
        }                                                                                               \
        const int e = find_group(tile_prefix, E, mt);                                                   \
        const int row0 = offsets[e], rows = offsets[e + 1] - row0;                                      \
        const int m0 = (mt - tile_prefix[e]) * BM;                                                      \
        const T* we = w + (int64_t)e * N * K;                                                           \
        tile_gemm<T, T, true, B_KMAJ>(y + (int64_t)row0 * N, N, x + (int64_t)row0 * K, K, we, B_KMAJ ? K : N, m0, \
                                   nt * BN, rows, N, K, smem);                                          \
    }
GG_VARM(gg_nt_bf16, bf16_t, true)
GG_VARM(gg_nn_bf16, bf16_t, false)
GG_VARM(gg_nt_f16, f16_t, true)
GG_VARM(gg_nn_f16, f16_t, false)

// VARK: out[e] (P × Q) = a[rows of e]ᵀ · b[rows of e] (ACC: out[e] += ...); grid (ceil(P/BM)·ceil(Q/BN), E).
#define GG_VARK(NAME, T, TO, ACC)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(TO* out, const T* a, const T* b,        \
                                                               const int* offsets, int P, int Q, float* sumsq) { \
        extern __shared__ unsigned short smem[];                                                        \
        const int e = blockIdx.y;                                                                       \
        const int ntq = (Q + BN - 1) / BN;                                                              \
        const int pt = blockIdx.x / ntq, qt = blockIdx.x - pt * ntq;                                    \
        const int row0 = offsets[e], rows = offsets[e + 1] - row0;                                      \
        tile_gemm<T, TO, false, false, ACC>(out + (int64_t)e * P * Q, Q, a + (int64_t)row0 * P, P, b + (int64_t)row0 * Q, Q, \
                             pt * BM, qt * BN, P, Q, rows, smem, sumsq);                                \
    }

GG_VARK(gg_tn_bf16_f32, bf16_t, float, false)
GG_VARK(gg_tn_bf16_bf16, bf16_t, bf16_t, false)
GG_VARK(gg_tn_f16_f32, f16_t, float, false)
GG_VARK(gg_tn_f16_f16, f16_t, f16_t, false)
GG_VARK(gg_tn_bf16_f32_acc, bf16_t, float, true)
GG_VARK(gg_tn_bf16_bf16_acc, bf16_t, bf16_t, true)
GG_VARK(gg_tn_f16_f32_acc, f16_t, float, true)
GG_VARK(gg_tn_f16_f16_acc, f16_t, f16_t, true)
