// Grouped GEMMs over expert-contiguous rows; CPU twins and contract in ops/grouped.rs.
// Rows offsets[e]..offsets[e+1] belong to group e; offsets live on the device (no host sync).
//   VARM (forward, dgrad): C[g] (m_e × N) = A[g] (m_e × K) · B_e       B_e = W[e] as [N,K] (K-major) or [K,N]
//   VARK (wgrad):          C[e] (P × Q)  = A[g]ᵀ · B[g], A [M,P], B [M,Q]  (reduction over the group's rows)
// Tensor-core path (bf16/f16, f32 accumulate): CTA tile 128×128×32, 8 warps (2×4) of 64×32,
// mma.sync m16n8k16, 4-stage cp.async pipeline, XOR-swizzled shared memory read by ldmatrix
// (.trans for M/N-major operands). FLOPs per tile step 2·128·128·32; smem 4 × 16 KB.
// SIMT fallback (f32, or shapes not multiples of 8): one thread per output element.

#define BM 128
#define BN 128
#define BK 32
#define STAGES 4
#define THREADS 256

// Shared-memory element index of a tile. K-major tile [R][BK] (4 16-byte chunks per row, chunk
// XOR (row/2)%4); M/N-major tile [BK][128] (16 chunks per row, chunk XOR k%8). Both make the 8
// row addresses of every ldmatrix 8×8 load hit 8 distinct 16-byte bank groups.
__device__ __forceinline__ int kmaj_idx(int r, int k) { return r * BK + ((((k >> 3) ^ (r >> 1)) & 3) << 3) + (k & 7); }
__device__ __forceinline__ int mnmaj_idx(int k, int m) { return k * 128 + ((((m >> 3) ^ k) & 7) | ((m >> 3) & 8)) * 8 + (m & 7); }

// Which group a tile belongs to: the largest g with prefix[g] <= x (prefix has E+1 entries).
__device__ __forceinline__ int find_group(const int* prefix, int E, int x) {
    int lo = 0, hi = E;
    while (hi - lo > 1) {
        int mid = (lo + hi) >> 1;
        if (prefix[mid] <= x) lo = mid; else hi = mid;
    }
    return lo;
}

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

// Rows past offsets[E] belong to no group: zero them (grid-stride from offsets[E]·N).
// Called by the `nblocks` CTAs that have no tile, `b` being this one's index among them.
template <typename T>
__device__ void zero_tail(T* C, const int* offsets, int E, int M, int N, int b, int nblocks) {
    int64_t start = (int64_t)offsets[E] * N, end = (int64_t)M * N;
    for (int64_t i = start + b * (int64_t)blockDim.x + threadIdx.x; i < end; i += (int64_t)nblocks * blockDim.x)
        C[i] = from_float<T>(0.f);
}

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

// ---- Hopper (sm_90a) path: wgmma.mma_async from shared memory, CTA tile 128×256×64, two
// consumer warpgroups of 64×256 (128 f32 accumulators per thread), 4-stage cp.async pipeline into
// 128-byte-swizzled tiles (the layout wgmma descriptors and TMA's SWIZZLE_128B share: 16-byte
// chunk c of 128-byte line l stored at chunk c ^ (l % 8), atoms of 8 lines = 1024 B).
//   K-major operand tile  [R][64 k]              line = one row's 64 k values
//   MN-major operand tile [R/64][64 k][64 m|n]   line = 64 consecutive m (or n) at one k
// Descriptors: K-major SBO = 1024 (next 8 rows), k16 step = +32 B; MN-major LBO = 8 KB (next 64
// m/n), SBO = 1024 (next 8 k), k16 step = +2 KB.
#define WBM 128
#define WBN 256
#define WBK 64
#define WSTAGES 4
#define WTHREADS 256
#define W_A_BYTES (WBM * WBK * 2)
#define W_B_BYTES (WBN * WBK * 2)
#define W_STAGE_BYTES (W_A_BYTES + W_B_BYTES)
// Tiles of consecutive m-tiles walked column by column (L2 reuse of both operands).
#define W_SWIZZLE 8

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
           (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

template <int TA, int TB> __device__ __forceinline__ void wgmma_n256(float* d, uint64_t da, uint64_t db, bf16_t) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, 1, 1, 1, %130, %131;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}
template <int TA, int TB> __device__ __forceinline__ void wgmma_n256(float* d, uint64_t da, uint64_t db, f16_t) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, 1, 1, 1, %130, %131;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}

template <int TA, int TB> __device__ __forceinline__ void wgmma_n128(float* d, uint64_t da, uint64_t db, bf16_t) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1, 1, 1, %66, %67;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}
template <int TA, int TB> __device__ __forceinline__ void wgmma_n128(float* d, uint64_t da, uint64_t db, f16_t) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1, 1, 1, %66, %67;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}

// One operand's 64-wide k slice into a swizzled stage buffer at shared address `s`.
//   KMAJ: G(r, k) = G[r·ld + k]   else G(r, k) = G[k·ld + r];  valid r < Rv, k < Kdim
// GATHER (K-major only): the operand's rows are rows of G given per chunk in `gi`
// (wg_gather_rows; negative = a zero row): the MoE experts read x through the dispatch
// permutation instead of a gathered copy.
template <typename T, bool KMAJ, int R, int NT = WTHREADS> struct WgChunks {
    static constexpr int N = R * WBK / 8 / NT;
};
template <typename T, bool KMAJ, int R, bool GATHER = false, int NT = WTHREADS>
__device__ __forceinline__ void wg_load(uint32_t s, const T* __restrict__ G, int ld, int r0, int Rv, int k0, int Kdim,
                                        int tid, const int* gi = nullptr) {
    static_assert(!GATHER || KMAJ, "rows are gathered only for K-major operands");
    constexpr int CHUNKS = R * WBK / 8;
#pragma unroll
    for (int i = 0; i < CHUNKS / NT; ++i) {
        const int c = tid + i * NT;
        if (KMAJ) {
            const int r = c >> 3, kc = c & 7;
            bool ok = (r0 + r < Rv) && (k0 + kc * 8 < Kdim);
            int64_t pr = r0 + r;
            if (GATHER) {
                pr = gi[i];
                ok = ok && pr >= 0;
            }
            const T* src = ok ? G + pr * ld + k0 + kc * 8 : G;
            cp_async16(s + r * 128 + ((kc ^ (r & 7)) << 4), src, ok);
        } else {
            const int kr = c / (R / 8), rc = c % (R / 8);
            const bool ok = (k0 + kr < Kdim) && (r0 + rc * 8 < Rv);
            const T* src = ok ? G + (int64_t)(k0 + kr) * ld + r0 + rc * 8 : G;
            cp_async16(s + (rc >> 3) * (WBK * 128) + kr * 128 + (((rc & 7) ^ (kr & 7)) << 4), src, ok);
        }
    }
}

// The source rows of this thread's chunks of a gathered K-major operand (see wg_load): chunk
// row r0 + r mapped through rows[·], −1 past Rv or outside [0, lim); fixed over the k loop, so
// looked up once per tile.
template <typename T, int R, int NT = WTHREADS>
__device__ __forceinline__ void wg_gather_rows(int (&gi)[WgChunks<T, true, R, NT>::N], const int* __restrict__ rows,
                                               int lim, int r0, int Rv, int tid) {
#pragma unroll
    for (int i = 0; i < WgChunks<T, true, R, NT>::N; ++i) {
        const int j = r0 + ((tid + i * NT) >> 3);
        const int v = j < Rv ? rows[j] : -1;
        gi[i] = v < lim ? v : -1;
    }
}

// 16 bytes of TO <-> floats (V = 16 / sizeof(TO) of them) for the staged epilogue.
template <typename TO> struct Vec16;
template <> struct Vec16<float> {
    static constexpr int V = 4;
    static __device__ __forceinline__ void load(const float* p, float* v) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    }
    static __device__ __forceinline__ void store(float* p, const float* v) {
        float4 q;
        q.x = v[0], q.y = v[1], q.z = v[2], q.w = v[3];
        *reinterpret_cast<float4*>(p) = q;
    }
};
template <typename H> struct Vec16Half {
    static constexpr int V = 8;
    static __device__ __forceinline__ void load(const H* p, float* v) {
        const uint4 q = *reinterpret_cast<const uint4*>(p);
        const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            H lo, hi;
            lo.v = (unsigned short)(w[i] & 0xffffu);
            hi.v = (unsigned short)(w[i] >> 16);
            v[2 * i] = to_float(lo), v[2 * i + 1] = to_float(hi);
        }
    }
    static __device__ __forceinline__ void store(H* p, const float* v) {
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            w[i] = (uint32_t)from_float<H>(v[2 * i]).v | ((uint32_t)from_float<H>(v[2 * i + 1]).v << 16);
        uint4 q;
        q.x = w[0], q.y = w[1], q.z = w[2], q.w = w[3];
        *reinterpret_cast<uint4*>(p) = q;
    }
};
template <> struct Vec16<bf16_t> : Vec16Half<bf16_t> {};
template <> struct Vec16<f16_t> : Vec16Half<f16_t> {};

// A thread's part of its warp's 16 accumulator rows (a 64×256 wgmma fragment per warpgroup:
// acc[4i + 2h + j] is row 8h + lane/4, column 8i + 2·(lane%4) + j) stored as f32 into staging
// shared memory from `base` (its first element), rows LDS floats apart.
template <int LDS> __device__ __forceinline__ void stage_fragment(uint32_t base, const float* acc) {
#pragma unroll
    for (int i = 0; i < 32; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(base + (8 * h * LDS + 8 * i) * 4),
                         "f"(acc[4 * i + 2 * h]), "f"(acc[4 * i + 2 * h + 1])
                         : "memory");
}

// V staged f32 values from shared address `saddr` into v; with ACC, plus the V values at d (the
// read half of a read-add-write epilogue).
template <int V, bool ACC, typename TO>
__device__ __forceinline__ void staged_read_acc(float* v, uint32_t saddr, const TO* d) {
#pragma unroll
    for (int q = 0; q < V; q += 4)
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                     : "=f"(v[q]), "=f"(v[q + 1]), "=f"(v[q + 2]), "=f"(v[q + 3])
                     : "r"(saddr + q * 4)
                     : "memory");
    if (ACC) {
        float old[V];
        Vec16<TO>::load(d, old);
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] += old[q];
    }
}

// One CTA: a WBM×WBN tile of C = op(A)·op(B) over Kdim (operand conventions as tile_gemm).
// AG: A's rows are gathered through `grows` (glim rows in the source, see wg_load).
template <typename T, typename TO, bool A_KMAJ, bool B_KMAJ, bool ACC = false, bool AG = false>
__device__ __forceinline__ void wg_tile(TO* __restrict__ C, int ldc, const T* __restrict__ A, int lda,
                                        const T* __restrict__ B, int ldb, int m0, int n0, int Mv, int Nv, int Kdim,
                                        uint32_t smem, float* sumsq = nullptr, const int* __restrict__ grows = nullptr,
                                        int glim = 0) {
    const int tid = threadIdx.x, wg = tid >> 7;
    const int nk = (Kdim + WBK - 1) / WBK;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;
    // Gathered A rows (K-major): fixed for the tile, looked up once.
    static_assert(!AG || A_KMAJ, "A is gathered by rows only when K-major");
    int ga[WgChunks<T, A_KMAJ, WBM>::N];
    if constexpr (AG) wg_gather_rows<T, WBM>(ga, grows, glim, m0, Mv, tid);

#pragma unroll
    for (int s = 0; s < WSTAGES - 1; ++s) {
        if (s < nk) {
            const uint32_t st = smem + s * W_STAGE_BYTES;
            wg_load<T, A_KMAJ, WBM, AG>(st, A, lda, m0, Mv, s * WBK, Kdim, tid, ga);
            wg_load<T, B_KMAJ, WBN>(st + W_A_BYTES, B, ldb, n0, Nv, s * WBK, Kdim, tid);
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
        cp_async_wait<WSTAGES - 2>();
        fence_proxy_async();  // cp.async wrote through the generic proxy; wgmma reads via the async one
        __syncthreads();
        const uint32_t sa = smem + (kt % WSTAGES) * W_STAGE_BYTES, sb = sa + W_A_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < WBK / 16; ++ks) {
            const uint64_t da = A_KMAJ ? wg_desc(sa + wg * 64 * 128 + ks * 32, 16, 1024)
                                       : wg_desc(sa + wg * WBK * 128 + ks * 2048, WBK * 128, 1024);
            const uint64_t db = B_KMAJ ? wg_desc(sb + ks * 32, 16, 1024) : wg_desc(sb + ks * 2048, WBK * 128, 1024);
            wgmma_n256<A_KMAJ ? 0 : 1, B_KMAJ ? 0 : 1>(acc, da, db, T{});
        }
        wgmma_commit();
        wgmma_wait<1>();  // this warpgroup's previous k step is done ...
        __syncthreads();  // ... and everyone's: its stage can be refilled
        const int pf = kt + WSTAGES - 1;
        if (pf < nk) {
            const uint32_t st = smem + (pf % WSTAGES) * W_STAGE_BYTES;
            wg_load<T, A_KMAJ, WBM, AG>(st, A, lda, m0, Mv, pf * WBK, Kdim, tid, ga);
            wg_load<T, B_KMAJ, WBN>(st + W_A_BYTES, B, ldb, n0, Nv, pf * WBK, Kdim, tid);
        }
        cp_async_commit();
    }
    wgmma_wait<0>();
    cp_async_wait<0>();

    // Epilogue through shared memory (the stage ring is free now): fragments go to a padded f32
    // tile, then every thread moves 16-byte row chunks (coalesced; with ACC a read-add-write).
    // Fragment layout (per warp as mma.sync m16n8): d[4i + 2h + j] at row 16·warp + lane/4 + 8h,
    // column 8i + 2·(lane%4) + j of the warpgroup's 64×256 block.
    constexpr int LDS = WBN + 8;  // staged row stride in floats: 8 rows of a fragment store hit distinct banks
    __syncthreads();              // both warpgroups' last wgmma have read their stages
    {
        const int warp = (tid >> 5) & 3, lane = tid & 31;
        stage_fragment<LDS>(smem + ((wg * 64 + warp * 16 + (lane >> 2)) * LDS + 2 * (lane & 3)) * 4, acc);
    }
    __syncthreads();
    // Batches of 8 chunks per thread: all loads (shared, and global with ACC) issued before any
    // store, so a read-add-write epilogue keeps 8 global loads in flight per thread.
    // With `sumsq`, the squares of the values written are summed into it (one atomic per warp;
    // every thread runs the same number of batches).
    constexpr int V = Vec16<TO>::V, CPR = WBN / V, EB = 8;
    float ss = 0.f;
    for (int c0 = tid; c0 < WBM * CPR; c0 += WTHREADS * EB) {
        float v[EB][V];
        TO* dst[EB];
        bool ok[EB];
#pragma unroll
        for (int b = 0; b < EB; ++b) {
            const int c = c0 + b * WTHREADS;
            const int r = c / CPR, col = (c - r * CPR) * V;
            const int m = m0 + r, n = n0 + col;
            ok[b] = c < WBM * CPR && m < Mv && n < Nv;
            dst[b] = C + (int64_t)m * ldc + n;
            if (!ok[b]) continue;
            staged_read_acc<V, ACC>(v[b], smem + (r * LDS + col) * 4, dst[b]);
        }
#pragma unroll
        for (int b = 0; b < EB; ++b)
            if (ok[b]) {
                Vec16<TO>::store(dst[b], v[b]);
#pragma unroll
                for (int q = 0; q < V; ++q) ss += v[b][q] * v[b][q];
            }
    }
    if (sumsq) {
        ss = warp_sum(ss);
        if ((tid & 31) == 0) atomicAdd(sumsq, ss);
    }
}

__device__ __forceinline__ uint32_t wg_smem_base(const void* smem) { return (smem_addr(smem) + 1023u) & ~1023u; }

// VARM on Hopper: as GG_VARM with 128×256 tiles; tile_prefix counted in WBM-row tiles. Tiles run
// in column strips W_SWIZZLE m-tiles tall (a strip may span groups; each CTA finds its own).
// AG: A is x [xrows, K] read through `rows` (the MoE experts' dispatch permutation, [M] i32):
// y = x[rows]·W[e]ᵀ. (B = x[rows] in the weight gradient was slower than gathering first:
// BENCHMARKS NOTES.)
template <typename T, bool B_KMAJ, bool AG>
__device__ __forceinline__ void wg_varm(T* y, const T* x, const T* w, const int* offsets, const int* tile_prefix,
                                        const int* rows, int xrows, int E, int M, int N, int K, uint32_t smem) {
    const int ntn = (N + WBN - 1) / WBN, total = tile_prefix[E];
    const int bid = blockIdx.x;
    if (bid >= total * ntn) {
        const int first = total * ntn;
        zero_tail<T>(y, offsets, E, M, N, bid - first, gridDim.x - first);
        return;
    }
    const int strip = bid / (W_SWIZZLE * ntn), in = bid - strip * (W_SWIZZLE * ntn);
    const int h = min(W_SWIZZLE, total - strip * W_SWIZZLE);
    const int nt = in / h, mt = strip * W_SWIZZLE + (in - nt * h);
    const int e = find_group(tile_prefix, E, mt);
    const int row0 = offsets[e], rws = offsets[e + 1] - row0;
    const int m0 = (mt - tile_prefix[e]) * WBM;
    const T* we = w + (int64_t)e * N * K;
    wg_tile<T, T, true, B_KMAJ, false, AG>(y + (int64_t)row0 * N, N, AG ? x : x + (int64_t)row0 * K, K, we,
                                           B_KMAJ ? K : N, m0, nt * WBN, rws, N, K, smem, nullptr,
                                           AG ? rows + row0 : nullptr, xrows);
}
#define WG_VARM(NAME, T, B_KMAJ, NTHREADS)                                                              \
    extern "C" __global__ void __launch_bounds__(NTHREADS, 1) NAME(T* y, const T* x, const T* w,       \
                                                                    const int* offsets, const int* tile_prefix, \
                                                                    int E, int M, int N, int K) {       \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        wg_varm<T, B_KMAJ, false>(y, x, w, offsets, tile_prefix, nullptr, 0, E, M, N, K, wg_smem_base(wsmem)); \
    }
#define WG_VARM_G(NAME, T, NTHREADS)                                                                    \
    extern "C" __global__ void __launch_bounds__(NTHREADS, 1) NAME(T* y, const T* x, const T* w,       \
                                                                    const int* offsets, const int* tile_prefix, \
                                                                    const int* rows, int xrows, int E, int M, \
                                                                    int N, int K) {                     \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        wg_varm<T, true, true>(y, x, w, offsets, tile_prefix, rows, xrows, E, M, N, K, wg_smem_base(wsmem)); \
    }

// VARK on Hopper: grid (ceil(P/WBM)·ceil(Q/WBN), E). Accumulating into an empty group's
// gradient leaves it as it is (unless its squares are summed): those blocks exit.
#define WG_VARK(NAME, T, TO, ACC, TILE, NTHREADS)                                                       \
    extern "C" __global__ void __launch_bounds__(NTHREADS, 1) NAME(TO* out, const T* a, const T* b,    \
                                                                    const int* offsets, int P, int Q,   \
                                                                    float* sumsq) {                     \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        const int e = blockIdx.y;                                                                       \
        const int ntq = (Q + WBN - 1) / WBN;                                                            \
        const int pt = blockIdx.x / ntq, qt = blockIdx.x - pt * ntq;                                    \
        const int row0 = offsets[e], rows = offsets[e + 1] - row0;                                      \
        if (ACC && rows == 0 && !sumsq) return;                                                         \
        TILE<T, TO, false, false, ACC>(out + (int64_t)e * P * Q, Q, a + (int64_t)row0 * P, P, b + (int64_t)row0 * Q, Q, \
                                     pt * WBM, qt * WBN, P, Q, rows, wg_smem_base(wsmem), sumsq);       \
    }

#else
// Other archs: the launcher never picks these (they exist so every arch has the same symbols).
#define WG_VARM(NAME, T, B_KMAJ, NTHREADS)                                                              \
    extern "C" __global__ void NAME(T*, const T*, const T*, const int*, const int*, int, int, int, int) { __trap(); }
#define WG_VARK(NAME, T, TO, ACC, TILE, NTHREADS)                                                       \
    extern "C" __global__ void NAME(TO*, const T*, const T*, const int*, int, int, float*) { __trap(); }
#define WG_VARM_G(NAME, T, NTHREADS)                                                                    \
    extern "C" __global__ void NAME(T*, const T*, const T*, const int*, const int*, const int*, int, int, int, int, \
                                    int) { __trap(); }
#endif

#define WG_FAMILY(P, TILE, NTHREADS)                                                                    \
    WG_VARM(P##_nt_bf16, bf16_t, true, NTHREADS)                                                        \
    WG_VARM(P##_nn_bf16, bf16_t, false, NTHREADS)                                                       \
    WG_VARM(P##_nt_f16, f16_t, true, NTHREADS)                                                          \
    WG_VARM(P##_nn_f16, f16_t, false, NTHREADS)                                                         \
    WG_VARK(P##_tn_bf16_f32, bf16_t, float, false, TILE, NTHREADS)                                      \
    WG_VARK(P##_tn_bf16_bf16, bf16_t, bf16_t, false, TILE, NTHREADS)                                    \
    WG_VARK(P##_tn_f16_f32, f16_t, float, false, TILE, NTHREADS)                                        \
    WG_VARK(P##_tn_f16_f16, f16_t, f16_t, false, TILE, NTHREADS)                                        \
    WG_VARK(P##_tn_bf16_f32_acc, bf16_t, float, true, TILE, NTHREADS)                                   \
    WG_VARK(P##_tn_bf16_bf16_acc, bf16_t, bf16_t, true, TILE, NTHREADS)                                 \
    WG_VARK(P##_tn_f16_f32_acc, f16_t, float, true, TILE, NTHREADS)                                     \
    WG_VARK(P##_tn_f16_f16_acc, f16_t, f16_t, true, TILE, NTHREADS)                                     \
    WG_VARM_G(P##_ntg_bf16, bf16_t, NTHREADS)                                                           \
    WG_VARM_G(P##_ntg_f16, f16_t, NTHREADS)
WG_FAMILY(wg, wg_tile, WTHREADS)

// ---- Hopper TMA + warp-specialised persistent VARM (forward and dgrad, un-gathered A).
// 384 threads: warps 0-7 are two consumer warpgroups (64×256 of the 128×256 tile each, as
// wg_tile; setmaxnreg gives them 232 registers), warps 8-11 the producer warpgroup (40
// registers) whose first lane issues the TMA loads (cp.async.bulk.tensor into the
// same 128-byte-swizzled stage layout wg_tile's cp.async writes). Stage s has a full barrier (the
// producer's expect_tx; the TMA completes it) and an empty barrier (one arrive per consumer warp
// once its wgmma stopped reading the stage). CTAs loop over tiles (grid = SMs), so the producer
// loads the next tile's stages while the consumers run the epilogue (registers straight to
// global: no smem staging, the ring belongs to the producer).
// Tensor maps (host: grouped_cuda.rs): A = x [Mx, K] box {64, 128}; B K-major = w as [E·N, K]
// box {64, 256}; B N-major = w as [E·K, N] box {64, 64} (4 per stage; needs K % 64 == 0 so a
// k slice never crosses into the next expert). Out-of-range rows and k read as zeros.
#define TT_THREADS 384
#define TT_CONSUMERS 256
struct __align__(64) TmaMap {
    unsigned long long v[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TmaMap* map, int c0, int c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

// The stage ring's barriers at `bars`: full[s] at bars + 8s (one arrive: the producer's
// expect_tx), empty[s] at bars + 8(S + s) (one arrive per consumer warp: ARRIVES), then EXTRA
// more with ARRIVES arrives each at bars + 8(2S + i).
template <int S = WSTAGES, int ARRIVES = TT_CONSUMERS / 32, int EXTRA = 0>
__device__ __forceinline__ void tt_init_barriers(uint32_t bars) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(bars + 8 * s, 1);
            mbar_init(bars + 8 * (S + s), ARRIVES);
        }
        for (int i = 0; i < EXTRA; ++i) mbar_init(bars + 8 * (2 * S + i), ARRIVES);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
}

// Tile t of the VARM schedule (as wg_varm: column strips `sw` m-tiles tall).
struct TtTile {
    int e, row0, rws, m0, n0;
};
__device__ __forceinline__ TtTile tt_tile(int t, int total, int ntn, const int* offsets, const int* tile_prefix, int E,
                                          int sw) {
    const int strip = t / (sw * ntn), in = t - strip * (sw * ntn);
    const int h = min(sw, total - strip * sw);
    const int nt = in / h, mt = strip * sw + (in - nt * h);
    TtTile r;
    r.e = find_group(tile_prefix, E, mt);
    r.row0 = offsets[r.e];
    r.rws = offsets[r.e + 1] - r.row0;
    r.m0 = (mt - tile_prefix[r.e]) * WBM;
    r.n0 = nt * WBN;
    return r;
}

template <typename T, bool B_KMAJ>
__device__ __forceinline__ void tt_varm(T* y, const TmaMap* ta, const TmaMap* tb, const int* offsets,
                                        const int* tile_prefix, int E, int M, int N, int K, int sw, uint32_t smem) {
    const int ntn = (N + WBN - 1) / WBN, total = tile_prefix[E], ntiles = total * ntn;
    const int nk = (K + WBK - 1) / WBK;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const uint32_t bars = smem + WSTAGES * W_STAGE_BYTES;
    tt_init_barriers(bars);
    if (warp >= TT_CONSUMERS / 32) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (warp == TT_CONSUMERS / 32 && lane == 0) {
            int it = 0;
            for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
                const TtTile tl = tt_tile(t, total, ntn, offsets, tile_prefix, E, sw);
                for (int kt = 0; kt < nk; ++kt, ++it) {
                    const int s = it % WSTAGES;
                    const uint32_t full = bars + 8 * s, st = smem + s * W_STAGE_BYTES;
                    mbar_wait(bars + 8 * (WSTAGES + s), ((it / WSTAGES) & 1) ^ 1);
                    mbar_expect_tx(full, W_STAGE_BYTES);
                    tma_load_2d(st, ta, kt * WBK, tl.row0 + tl.m0, full);
                    if (B_KMAJ) {
                        tma_load_2d(st + W_A_BYTES, tb, kt * WBK, tl.e * N + tl.n0, full);
                    } else {
#pragma unroll
                        for (int j = 0; j < WBN / 64; ++j)
                            tma_load_2d(st + W_A_BYTES + j * (WBK * 128), tb, tl.n0 + j * 64, tl.e * K + kt * WBK,
                                        full);
                    }
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int wg = warp >> 2;
        int it = 0;
        for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
            const TtTile tl = tt_tile(t, total, ntn, offsets, tile_prefix, E, sw);
            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.f;
            for (int kt = 0; kt < nk; ++kt, ++it) {
                const int s = it % WSTAGES;
                mbar_wait(bars + 8 * s, (it / WSTAGES) & 1);
                const uint32_t sa = smem + s * W_STAGE_BYTES, sb = sa + W_A_BYTES;
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < WBK / 16; ++ks) {
                    const uint64_t da = wg_desc(sa + wg * 64 * 128 + ks * 32, 16, 1024);
                    const uint64_t db =
                        B_KMAJ ? wg_desc(sb + ks * 32, 16, 1024) : wg_desc(sb + ks * 2048, WBK * 128, 1024);
                    wgmma_n256<0, B_KMAJ ? 0 : 1>(acc, da, db, T{});
                }
                wgmma_commit();
                wgmma_wait<1>();  // the previous stage's wgmma are done: release it
                if (kt > 0 && lane == 0) mbar_arrive(bars + 8 * (WSTAGES + (it - 1) % WSTAGES));
            }
            wgmma_wait<0>();
            if (nk > 0 && lane == 0) mbar_arrive(bars + 8 * (WSTAGES + (it - 1) % WSTAGES));
            // Epilogue: fragment d[4i + 2h + j] at row 16·warp + lane/4 + 8h, column 8i + 2·(lane%4) + j
            // of the warpgroup's 64×256 block; pairs of columns stored as one 4-byte word.
            const int r = wg * 64 + (warp & 3) * 16 + (lane >> 2);
            T* yb = y + (int64_t)(tl.row0 + tl.m0) * N + tl.n0 + 2 * (lane & 3);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int rr = r + 8 * h;
                if (tl.m0 + rr >= tl.rws) continue;
                T* yr = yb + (int64_t)rr * N;
#pragma unroll
                for (int i = 0; i < 32; ++i) {
                    const int c = tl.n0 + 8 * i + 2 * (lane & 3);
                    if (c < N) {
                        const uint32_t wv = (uint32_t)from_float<T>(acc[4 * i + 2 * h]).v |
                                            ((uint32_t)from_float<T>(acc[4 * i + 2 * h + 1]).v << 16);
                        *reinterpret_cast<uint32_t*>(yr + 8 * i) = wv;
                    }
                }
            }
        }
    }
    zero_tail<T>(y, offsets, E, M, N, blockIdx.x, gridDim.x);
}
// The weight gradient's f32 tile out through TMA: 4 passes of 32 rows (tile rows 32j..32j+31:
// warps 2(j%2), 2(j%2)+1 of warpgroup j/2 write their fragments into a staging buffer as 8 boxes
// of 32 rows × 32 columns, 128-byte lines swizzled as SWIZZLE_128B reads them), then one thread
// stores the boxes (ACC: adds them in L2, cp.reduce.async.bulk .add) through `to`, a 3-D map
// over out [E, P, Q] (rows past P and columns past Q are clipped by the TMA unit). The staging
// is only waited for (read by the TMA unit) when it is about to be written again, so the last
// pass drains while the next tile's main loop runs. Without ACC the squares of the values go
// to `ss`. (Staging 2 or 4 passes at once with a ring of 3 or 2 stages was slower: NOTES.)
// One pass's fragments into the staging as the TMA store's boxes of 32 rows × 128 bytes (4 KB
// each: 32 f32 or 64 16-bit values a row, 128-byte lines swizzled as SWIZZLE_128B reads them):
// `a` is the warp's m64 accumulator block, its rows 16·(warp % 2) + lane / 4 (+ 8) the staging
// rows (warp and lane: the caller's). With SUMS the squares of the values (f32, before a 16-bit
// TO rounds them, as the CPU twin sums them) inside P × Q (tile row p, column q0 + ..) go to `ss`.
template <int COLS, bool SUMS, typename TO = float>
__device__ __forceinline__ void tt_stage_pass(const float* a, uint32_t stg, int warp, int lane, int p, int q0, int P,
                                              int Q, float& ss) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int R = (warp & 1) * 16 + (lane >> 2) + 8 * h;  // staging row
        const bool prow = p + R < P;
#pragma unroll
        for (int i = 0; i < COLS / 8; ++i) {
            const float x = a[4 * i + 2 * h], y = a[4 * i + 2 * h + 1];
            if constexpr (sizeof(TO) == 4) {
                const int chunk = 2 * (i & 3) + ((lane & 3) >> 1);
                const uint32_t addr = stg + (i >> 2) * 4096 + R * 128 + ((chunk ^ (R & 7)) << 4) + (lane & 1) * 8;
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(x), "f"(y) : "memory");
            } else {
                // Columns 8i + 2·(lane % 4), + 1: box i / 8, 16-byte chunk i % 8, bytes 4·(lane % 4).
                const uint32_t addr = stg + (i >> 3) * 4096 + R * 128 + (((i & 7) ^ (R & 7)) << 4) + (lane & 3) * 4;
                const uint32_t v = (uint32_t)from_float<TO>(x).v | ((uint32_t)from_float<TO>(y).v << 16);
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
            }
            if (SUMS && prow && q0 + 8 * i + 2 * (lane & 3) < Q) ss += x * x + y * y;
        }
    }
}

// NT = 128, COLS = 128: one warpgroup stores its own 128 × 128 tile (two m64 accumulator
// halves, 4 passes of 4 boxes) with its own staging, named barrier 2 + warpgroup and first
// thread (the ping-pong kernel). A 16-bit TO (NT = 128 only: `to` maps out as 16-bit with boxes
// of 32 rows × 64 columns) takes 8 KB a pass, so passes alternate between the staging's halves and
// a pass waits only for the one before the last (the TMA unit reading one half while the warps
// fill the other).
template <bool ACC, int NT = TT_CONSUMERS, int COLS = WBN, typename TO = float>
__device__ __forceinline__ void tt_store_tma(const float (&acc)[128], const TmaMap* to, uint32_t stg, int e, int p0,
                                             int q0, int P, int Q, float& ss) {
    static_assert((NT == TT_CONSUMERS && COLS == WBN && sizeof(TO) == 4) || (NT == 128 && COLS == 128),
                  "tile shapes");
    constexpr int BOXC = 128 / sizeof(TO), NBUF = sizeof(TO) == 4 ? 1 : 2;  // columns a box; staging buffers
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
    const int bar = NT == TT_CONSUMERS ? 1 : 2 + wg, lead = tid % NT == 0;
    // Unrolled for the accumulator halves (register indices must be constants).
#pragma unroll(COLS == 128 ? 4 : 1)
    for (int pass = 0; pass < 4; ++pass) {
        // Tile rows 32·pass..: the m64 block pass / 2 (a warpgroup's, or an accumulator half),
        // its warps 2·(pass % 2) and 2·(pass % 2) + 1.
        const int mb = pass >> 1;
        const bool mine = (pass & 1) == ((warp & 3) >> 1) && (NT == 128 || mb == wg);
        const float* a = acc + (COLS == 128 ? 64 * mb : 0);
        const uint32_t buf = stg + (pass % NBUF) * (32 * COLS * sizeof(TO));
        if (lead) asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(NBUF - 1) : "memory");
        asm volatile("bar.sync %0, %1;" ::"r"(bar), "n"(NT) : "memory");
        if (mine) {
            tt_stage_pass<COLS, !ACC, TO>(a, buf, warp, lane, p0 + pass * 32, q0, P, Q, ss);
            fence_proxy_async();  // generic-proxy writes, read by the TMA unit
        }
        asm volatile("bar.sync %0, %1;" ::"r"(bar), "n"(NT) : "memory");
        if (lead) {
#pragma unroll 1
            for (int b = 0; b < COLS / BOXC && q0 + BOXC * b < Q; ++b) {
                if (ACC)
                    asm volatile(
                        "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.bulk_group [%0, {%1, %2, %3}], [%4];" ::"l"(
                            reinterpret_cast<uint64_t>(to)),
                        "r"(q0 + BOXC * b), "r"(p0 + pass * 32), "r"(e), "r"(buf + b * 4096)
                        : "memory");
                else
                    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];" ::"l"(
                                     reinterpret_cast<uint64_t>(to)),
                                 "r"(q0 + BOXC * b), "r"(p0 + pass * 32), "r"(e), "r"(buf + b * 4096)
                                 : "memory");
            }
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        }
    }
}

// Lines valid..63 of a stage's `subs` 64-line sub-tiles (contiguous, 8 KB each) set to zero by
// the NT threads of named barrier `bar` (`t` = thread within them): a group's last k slice holds
// the next group's rows, which must not reach the sums (a line is one row's 64 values, so the
// swizzle does not matter).
template <int NT>
__device__ __forceinline__ void tt_zero_lines(uint32_t sa, int subs, int valid, int t, int bar) {
    const int per_tile = (WBK - valid) * 8;
    for (int c = t; c < subs * per_tile; c += NT) {
        const int sub = c / per_tile, rest = c - sub * per_tile;
        const uint32_t addr = sa + sub * (WBK * 128) + (valid + (rest >> 3)) * 128 + (rest & 7) * 16;
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(addr), "r"(0) : "memory");
    }
    fence_proxy_async();
    asm volatile("bar.sync %0, %1;" ::"r"(bar), "n"(NT) : "memory");
}

// Tile t of a VARK schedule over E groups of ntp × ntq tiles of BM_ × BN_ (p × q): group by
// group, each in column strips W_SWIZZLE p-tiles tall (as VARM).
template <int BM_, int BN_>
__device__ __forceinline__ void tt_vark_tile(int t, int ntp, int ntq, int& e, int& p0, int& q0) {
    const int per = ntp * ntq;
    e = t / per;
    const int in = t - e * per;
    const int strip = in / (W_SWIZZLE * ntq), r = in - strip * (W_SWIZZLE * ntq);
    const int h = min(W_SWIZZLE, ntp - strip * W_SWIZZLE);
    const int qt = r / h, pt = strip * W_SWIZZLE + (r - qt * h);
    p0 = pt * BM_, q0 = qt * BN_;
}

// The VARK producer (one thread): for each of this CTA's tiles, one stage per 64 rows of its
// group, A's BM_ / 64 and B's BN_ / 64 MN-major boxes of {64 p|q, 64 rows}, into a ring of S
// stages (full[s] at bars + 8s, empty[s] at bars + 8(S + s)).
template <int BM_, int BN_, int S>
__device__ __forceinline__ void tt_vark_produce(const TmaMap* ta, const TmaMap* tb, const int* offsets, int E, int P,
                                                int Q, uint32_t smem, uint32_t bars) {
    constexpr int A_BYTES = BM_ * WBK * 2, BYTES = (BM_ + BN_) * WBK * 2;
    const int ntp = (P + BM_ - 1) / BM_, ntq = (Q + BN_ - 1) / BN_, ntiles = E * ntp * ntq;
    int it = 0;
    for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
        int e, p0, q0;
        tt_vark_tile<BM_, BN_>(t, ntp, ntq, e, p0, q0);
        const int row0 = offsets[e], nk = (offsets[e + 1] - row0 + WBK - 1) / WBK;
        for (int kt = 0; kt < nk; ++kt, ++it) {
            const int s = it % S;
            const uint32_t full = bars + 8 * s, st = smem + s * BYTES;
            mbar_wait(bars + 8 * (S + s), ((it / S) & 1) ^ 1);
            mbar_expect_tx(full, BYTES);
            const int k0 = row0 + kt * WBK;
#pragma unroll
            for (int j = 0; j < BM_ / 64; ++j) tma_load_2d(st + j * (WBK * 128), ta, p0 + j * 64, k0, full);
#pragma unroll
            for (int j = 0; j < BN_ / 64; ++j) tma_load_2d(st + A_BYTES + j * (WBK * 128), tb, q0 + j * 64, k0, full);
        }
    }
}

// VARK (weight gradients) with TMA: out[e] (P × Q) = a[rows of e]ᵀ · b[rows of e], a [M, P] and
// b [M, Q] read as MN-major boxes of {64 p|q, 64 rows} (2 for A, 4 for B per stage). A group's
// rows start anywhere, so its last k slice may hold the next group's rows: the consumers zero
// those lines of every sub-tile (a line is one row's 64 values, so the swizzle does not matter)
// before their wgmma. Persistent: tiles (e, p-tile, q-tile) walked e by e in strips as VARM.
// ACC adds into out; with `sumsq` the squares of the values written are summed into it.
template <typename T, typename TO, bool ACC>
__device__ __forceinline__ void tt_vark(TO* out, const TmaMap* ta, const TmaMap* tb, const TmaMap* to,
                                        const int* offsets, int E, int P, int Q, float* sumsq, uint32_t smem) {
    const int ntp = (P + WBM - 1) / WBM, ntq = (Q + WBN - 1) / WBN, per = ntp * ntq, ntiles = E * per;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // Shared memory: the stage ring, the epilogue's staging (1024-aligned for the TMA store's
    // swizzle), the barriers.
    constexpr int STAGING = 32 * (WBN + 8) * 4;
    const uint32_t stg = smem + WSTAGES * W_STAGE_BYTES, bars = stg + STAGING;
    // f32 gradients leave through TMA: stored, or added in L2 with ACC (cp.reduce.async.bulk), so
    // the consumers never wait on global memory; ACC with `sumsq` needs the sums, so it reads.
    const bool tma_out = sizeof(TO) == 4 && !(ACC && sumsq);
    tt_init_barriers(bars);
    if (warp >= TT_CONSUMERS / 32) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (warp == TT_CONSUMERS / 32 && lane == 0)
            tt_vark_produce<WBM, WBN, WSTAGES>(ta, tb, offsets, E, P, Q, smem, bars);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int wg = warp >> 2;
        int it = 0;
        float ss = 0.f;
        for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
            int e, p0, q0;
            tt_vark_tile<WBM, WBN>(t, ntp, ntq, e, p0, q0);
            const int row0 = offsets[e], rws = offsets[e + 1] - row0, nk = (rws + WBK - 1) / WBK;
            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.f;
            for (int kt = 0; kt < nk; ++kt, ++it) {
                const int s = it % WSTAGES;
                mbar_wait(bars + 8 * s, (it / WSTAGES) & 1);
                const uint32_t sa = smem + s * W_STAGE_BYTES, sb = sa + W_A_BYTES;
                const int valid = rws - kt * WBK;
                // Lines valid..63 of the 6 sub-tiles (A's 2, B's 4) read as zeros.
                if (valid < WBK) tt_zero_lines<TT_CONSUMERS>(sa, W_STAGE_BYTES / (WBK * 128), valid, tid, 1);
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < WBK / 16; ++ks) {
                    const uint64_t da = wg_desc(sa + wg * WBK * 128 + ks * 2048, WBK * 128, 1024);
                    const uint64_t db = wg_desc(sb + ks * 2048, WBK * 128, 1024);
                    wgmma_n256<1, 1>(acc, da, db, T{});
                }
                wgmma_commit();
                wgmma_wait<1>();
                if (kt > 0 && lane == 0) mbar_arrive(bars + 8 * (WSTAGES + (it - 1) % WSTAGES));
            }
            wgmma_wait<0>();
            if (nk > 0 && lane == 0) mbar_arrive(bars + 8 * (WSTAGES + (it - 1) % WSTAGES));
            if (tma_out) {
                if (!(ACC && nk == 0)) tt_store_tma<ACC>(acc, to, stg, e, p0, q0, P, Q, ss);
                continue;
            }
            // Epilogue staged through shared memory past the ring (the ring is the producer's,
            // already filling for the next tile): 4 passes of 32 rows (warp j of each warpgroup
            // in pass j, fragment layout as wg_tile's), each moved as coalesced 16-byte row chunks
            // with all of a thread's loads (and ACC's global reads) issued before its stores.
            constexpr int LDS = WBN + 8, V = Vec16<TO>::V, CPR = WBN / V, EB = 32 * CPR / TT_CONSUMERS;
#pragma unroll 1
            for (int pass = 0; pass < 4; ++pass) {
                if ((warp & 3) == pass)
                    stage_fragment<LDS>(stg + ((wg * 16 + (lane >> 2)) * LDS + 2 * (lane & 3)) * 4, acc);
                asm volatile("bar.sync 1, %0;" ::"n"(TT_CONSUMERS) : "memory");
                float v[EB][V];
                // Chunk b of this thread: staged row sr = tid / CPR + b · (256 / CPR), column col.
                const int sr0 = tid / CPR, col = (tid - sr0 * CPR) * V, q = q0 + col;
                TO* const dst0 = out + ((int64_t)e * P + p0 + pass * 16) * Q + q;
                auto prow = [&](int b) {
                    const int sr = sr0 + b * (TT_CONSUMERS / CPR);
                    return (sr >> 4) * 64 + (sr & 15);
                };
#pragma unroll
                for (int b = 0; b < EB; ++b) {
                    const int sr = sr0 + b * (TT_CONSUMERS / CPR), pr = prow(b);
                    if (p0 + pass * 16 + pr >= P || q >= Q) continue;
                    staged_read_acc<V, ACC>(v[b], stg + (sr * LDS + col) * 4, dst0 + (int64_t)pr * Q);
                }
#pragma unroll
                for (int b = 0; b < EB; ++b)
                    if (p0 + pass * 16 + prow(b) < P && q < Q) {
                        Vec16<TO>::store(dst0 + (int64_t)prow(b) * Q, v[b]);
#pragma unroll
                        for (int u = 0; u < V; ++u) ss += v[b][u] * v[b][u];
                    }
                asm volatile("bar.sync 1, %0;" ::"n"(TT_CONSUMERS) : "memory");
            }
        }
        if (sumsq) {
            ss = warp_sum(ss);
            if (lane == 0) atomicAdd(sumsq, ss);
        }
        if (tma_out && tid == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
}
// The ping-pong kernel's other accumulating epilogue, through loads and stores instead of the
// L2's reduce-adds (a different unit: MOE_GG_PP_LDG mixes the two): one warpgroup's 128 × 128 f32
// tile in 4 passes of 32 rows staged as tt_store_tma's boxes, then each warp adds whole 512-byte
// row pieces, 8 rows' old values loaded (16 bytes a lane) before any is stored. Q % 4 == 0.
__device__ __forceinline__ void tt_add_ldg(const float (&acc)[128], float* out, uint32_t stg, int e, int p0, int q0,
                                           int P, int Q) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2, lt = tid & 127;
    const bool qok = q0 + 4 * lane < Q;
#pragma unroll
    for (int pass = 0; pass < 4; ++pass) {
        const float* a = acc + 64 * (pass >> 1);
        asm volatile("bar.sync %0, 128;" ::"r"(2 + wg) : "memory");  // the last pass's reads are done
        float no_sums = 0.f;
        if ((pass & 1) == ((warp & 3) >> 1)) tt_stage_pass<128, false>(a, stg, warp, lane, 0, q0, P, Q, no_sums);
        asm volatile("bar.sync %0, 128;" ::"r"(2 + wg) : "memory");
        // Row R = lt / 32 + 4i of the pass, 16-byte column chunk `lane` (box lane / 8).
        float* const base = out + ((int64_t)e * P + p0 + pass * 32) * Q + q0 + 4 * lane;
        float4 old[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int R = (lt >> 5) + 4 * i;
            old[i] = qok && p0 + pass * 32 + R < P ? *reinterpret_cast<const float4*>(base + (int64_t)R * Q)
                                                   : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int R = (lt >> 5) + 4 * i;
            if (!qok || p0 + pass * 32 + R >= P) continue;
            const uint32_t addr = stg + (lane >> 3) * 4096 + R * 128 + (((lane & 7) ^ (R & 7)) << 4);
            float4 v;
            asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                         : "r"(addr));
            v.x += old[i].x, v.y += old[i].y, v.z += old[i].z, v.w += old[i].w;
            *reinterpret_cast<float4*>(base + (int64_t)R * Q) = v;
        }
    }
}

// VARK ping-pong (f32 gradients out through TMA; the default, MOE_GG_PINGPONG=0 takes tt_vark):
// each consumer warpgroup owns every other tile of the CTA's list, 128 × 128 (p × q: two m64n128
// accumulator chains), so one warpgroup's f32 epilogue (a read-add-write in L2) runs while the
// other's main loop keeps the tensor cores busy (accumulating, the L2's reduce rate bounds it
// still: BENCHMARKS NOTES). Stages hold A's two 64 × 64 boxes and B's two (32 KB; ring of 6);
// each warpgroup has its own 16 KB staging. The ring is filled in tile order and each warpgroup skips the other's
// positions, so main loops are ordered: tile j's starts only after tile j − 1's was issued
// (done[w], one arrive per warp), which also keeps a full barrier's parity from aliasing (every
// position before ours has been filled by then).
#define PP_BM 128
#define PP_BN 128
#define PP_STAGES 6
#define PP_A_BYTES (PP_BM * WBK * 2)
#define PP_STAGE_BYTES (PP_A_BYTES + PP_BN * WBK * 2)
#define PP_STAGING (32 * PP_BN * 4)
// ACC with ldg_every = n > 0: every n-th tile of a warpgroup adds through tt_add_ldg (f32 TO only).
// A 16-bit TO: the gradient in the operands' type (`to` maps it as such), stored or added by TMA.
template <typename T, typename TO, bool ACC>
__device__ __forceinline__ void tt_vark_pp(TO* out, const TmaMap* ta, const TmaMap* tb, const TmaMap* to,
                                           const int* offsets, int E, int P, int Q, float* sumsq, int ldg_every,
                                           uint32_t smem) {
    const int ntp = (P + PP_BM - 1) / PP_BM, ntq = (Q + PP_BN - 1) / PP_BN, per = ntp * ntq, ntiles = E * per;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // Shared memory: the ring, two stagings (1024-aligned for the TMA store's swizzle), barriers:
    // full[s] at bars + 8s, empty[s] at bars + 8(S + s) (one arrive per warp of a warpgroup),
    // done[w] at bars + 8(2S + w).
    const uint32_t stg = smem + PP_STAGES * PP_STAGE_BYTES, bars = stg + 2 * PP_STAGING;
    const uint32_t done = bars + 8 * (2 * PP_STAGES);
    tt_init_barriers<PP_STAGES, 4, 2>(bars);
    if (warp >= TT_CONSUMERS / 32) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (warp == TT_CONSUMERS / 32 && lane == 0)
            tt_vark_produce<PP_BM, PP_BN, PP_STAGES>(ta, tb, offsets, E, P, Q, smem, bars);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int wg = warp >> 2;
        int it = 0, n = 0;  // ring position; this warpgroup's tiles so far
        float ss = 0.f;
        for (int t = blockIdx.x, j = 0; t < ntiles; t += gridDim.x, ++j) {
            int e, p0, q0;
            tt_vark_tile<PP_BM, PP_BN>(t, ntp, ntq, e, p0, q0);
            const int row0 = offsets[e], rws = offsets[e + 1] - row0, nk = (rws + WBK - 1) / WBK;
            if ((j & 1) != wg) {
                it += nk;
                continue;
            }
            // Tile j − 1 (the other warpgroup's: its n-th for warpgroup 1, its (n−1)-th for 0).
            if (j > 0) mbar_wait(done + 8 * (wg ^ 1), (wg ? n : n - 1) & 1);
            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.f;
            for (int kt = 0; kt < nk; ++kt, ++it) {
                const int s = it % PP_STAGES;
                mbar_wait(bars + 8 * s, (it / PP_STAGES) & 1);
                const uint32_t sa = smem + s * PP_STAGE_BYTES, sb = sa + PP_A_BYTES;
                const int valid = rws - kt * WBK;
                // Lines valid..63 of the 4 sub-tiles (A's 2, B's 2) read as zeros.
                if (valid < WBK) tt_zero_lines<128>(sa, PP_STAGE_BYTES / (WBK * 128), valid, tid & 127, 2 + wg);
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < WBK / 16; ++ks) {
                    const uint64_t db = wg_desc(sb + ks * 2048, WBK * 128, 1024);
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        wgmma_n128<1, 1>(acc + 64 * h, wg_desc(sa + h * (WBK * 128) + ks * 2048, WBK * 128, 1024), db,
                                         T{});
                }
                wgmma_commit();
                wgmma_wait<1>();
                if (kt > 0 && lane == 0) mbar_arrive(bars + 8 * (PP_STAGES + (it - 1) % PP_STAGES));
            }
            if (lane == 0) mbar_arrive(done + 8 * wg);  // the next tile's main loop may start
            wgmma_wait<0>();
            if (nk > 0 && lane == 0) mbar_arrive(bars + 8 * (PP_STAGES + (it - 1) % PP_STAGES));
            ++n;
            if (sizeof(TO) == 4 && ACC && ldg_every > 0 && n % ldg_every == 0) {
                if constexpr (sizeof(TO) == 4)
                    if (nk > 0) tt_add_ldg(acc, out, stg + wg * PP_STAGING, e, p0, q0, P, Q);
            } else if (!(ACC && nk == 0)) {
                tt_store_tma<ACC, 128, PP_BN, TO>(acc, to, stg + wg * PP_STAGING, e, p0, q0, P, Q, ss);
            }
        }
        if (sumsq) {
            ss = warp_sum(ss);
            if (lane == 0) atomicAdd(sumsq, ss);
        }
        if ((tid & 127) == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
}
#define TT_VARK_PP(NAME, T, TO, ACC)                                                                    \
    extern "C" __global__ void __launch_bounds__(TT_THREADS, 1)                                         \
        NAME(TO* out, const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb,              \
             const __grid_constant__ TmaMap to, const int* offsets, int E, int P, int Q, float* sumsq,   \
             int ldg_every) {                                                                           \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        tt_vark_pp<T, TO, ACC>(out, &ta, &tb, &to, offsets, E, P, Q, sumsq, ldg_every, wg_smem_base(wsmem)); \
    }
#define TT_VARK(NAME, T, TO, ACC)                                                                       \
    extern "C" __global__ void __launch_bounds__(TT_THREADS, 1)                                         \
        NAME(TO* out, const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb,              \
             const __grid_constant__ TmaMap to, const int* offsets, int E, int P, int Q, float* sumsq) {  \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        tt_vark<T, TO, ACC>(out, &ta, &tb, &to, offsets, E, P, Q, sumsq, wg_smem_base(wsmem));          \
    }
#define TT_VARM(NAME, T, B_KMAJ)                                                                        \
    extern "C" __global__ void __launch_bounds__(TT_THREADS, 1)                                         \
        NAME(T* y, const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb, const int* offsets, \
             const int* tile_prefix, int E, int M, int N, int K, int sw) {                              \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        tt_varm<T, B_KMAJ>(y, &ta, &tb, offsets, tile_prefix, E, M, N, K, sw, wg_smem_base(wsmem));     \
    }
#else
#define TT_VARM(NAME, T, B_KMAJ)                                                                        \
    extern "C" __global__ void NAME(T*, const __grid_constant__ TmaMap, const __grid_constant__ TmaMap, \
                                    const int*, const int*, int, int, int, int, int) { __trap(); }
#define TT_VARK_PP(NAME, T, TO, ACC)                                                                    \
    extern "C" __global__ void NAME(TO*, const __grid_constant__ TmaMap, const __grid_constant__ TmaMap, \
                                    const __grid_constant__ TmaMap, const int*, int, int, int, float*, int) { __trap(); }
#define TT_VARK(NAME, T, TO, ACC)                                                                       \
    extern "C" __global__ void NAME(TO*, const __grid_constant__ TmaMap, const __grid_constant__ TmaMap, \
                                    const __grid_constant__ TmaMap, const int*, int, int, int, float*) { __trap(); }
#endif
TT_VARK(tt_tn_bf16_f32, bf16_t, float, false)
TT_VARK(tt_tn_bf16_bf16, bf16_t, bf16_t, false)
TT_VARK(tt_tn_f16_f32, f16_t, float, false)
TT_VARK(tt_tn_f16_f16, f16_t, f16_t, false)
TT_VARK(tt_tn_bf16_f32_acc, bf16_t, float, true)
TT_VARK(tt_tn_bf16_bf16_acc, bf16_t, bf16_t, true)
TT_VARK(tt_tn_f16_f32_acc, f16_t, float, true)
TT_VARK(tt_tn_f16_f16_acc, f16_t, f16_t, true)
TT_VARK_PP(tt_tn_bf16_f32_pp, bf16_t, float, false)
TT_VARK_PP(tt_tn_f16_f32_pp, f16_t, float, false)
TT_VARK_PP(tt_tn_bf16_f32_acc_pp, bf16_t, float, true)
TT_VARK_PP(tt_tn_f16_f32_acc_pp, f16_t, float, true)
TT_VARK_PP(tt_tn_bf16_bf16_pp, bf16_t, bf16_t, false)
TT_VARK_PP(tt_tn_f16_f16_pp, f16_t, f16_t, false)
TT_VARK_PP(tt_tn_bf16_bf16_acc_pp, bf16_t, bf16_t, true)
TT_VARK_PP(tt_tn_f16_f16_acc_pp, f16_t, f16_t, true)
TT_VARM(tt_nt_bf16, bf16_t, true)
TT_VARM(tt_nn_bf16, bf16_t, false)
TT_VARM(tt_nt_f16, f16_t, true)
TT_VARM(tt_nn_f16, f16_t, false)

// ---- SIMT fallback: one thread per output element (f32 inputs or unaligned shapes).
template <typename T>
__device__ __forceinline__ void simt_varm(T* y, const T* x, const T* w, const int* offsets, int E, int M, int N,
                                          int K, int trans_w) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)M * N; i += (int64_t)gridDim.x * blockDim.x) {
        int r = i / N, n = i - (int64_t)r * N;
        if (r >= offsets[E]) { y[i] = from_float<T>(0.f); continue; }
        int e = find_group(offsets, E, r);
        const T* we = w + (int64_t)e * N * K;
        float s = 0.f;
        for (int k = 0; k < K; ++k)
            s += to_float(x[(int64_t)r * K + k]) * to_float(trans_w ? we[(int64_t)n * K + k] : we[(int64_t)k * N + n]);
        y[i] = from_float<T>(s);
    }
}
template <typename T, typename TO>
__device__ __forceinline__ void simt_vark(TO* out, const T* a, const T* b, const int* offsets, int E, int P, int Q,
                                          int accumulate) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)E * P * Q; i += (int64_t)gridDim.x * blockDim.x) {
        int e = i / ((int64_t)P * Q);
        int64_t pq = i - (int64_t)e * P * Q;
        int p = pq / Q, q = pq - (int64_t)p * Q;
        float s = 0.f;
        for (int r = offsets[e]; r < offsets[e + 1]; ++r) s += to_float(a[(int64_t)r * P + p]) * to_float(b[(int64_t)r * Q + q]);
        out[i] = from_float<TO>(s + (accumulate ? to_float(out[i]) : 0.f));
    }
}
#define GG_SIMT(SUFFIX, T)                                                                              \
    extern "C" __global__ void gg_simt_varm_##SUFFIX(T* y, const T* x, const T* w, const int* offsets, int E, \
                                                     int M, int N, int K, int trans_w) {                \
        simt_varm<T>(y, x, w, offsets, E, M, N, K, trans_w);                                            \
    }                                                                                                   \
    extern "C" __global__ void gg_simt_vark_##SUFFIX##_f32(float* out, const T* a, const T* b, const int* offsets, \
                                                           int E, int P, int Q, int accumulate) {       \
        simt_vark<T, float>(out, a, b, offsets, E, P, Q, accumulate);                                   \
    }                                                                                                   \
    extern "C" __global__ void gg_simt_vark_##SUFFIX##_same(T* out, const T* a, const T* b, const int* offsets, \
                                                            int E, int P, int Q, int accumulate) {      \
        simt_vark<T, T>(out, a, b, offsets, E, P, Q, accumulate);                                       \
    }
INSTANTIATE_FLOAT_TYPES(GG_SIMT)

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
    }                                                                                                   \
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
    }                                                                                                   \
    /* The same with the norm folded into the products (LNORM; x_out the new residual). */           \
    extern "C" __global__ void __launch_bounds__(256) gemv3_addnormf_r##R##_##SUFFIX(                   \
        T* yq, T* yk, T* yv, const T* x, const T* wq, const T* wk, const T* wv, int M, int Nq, int Nk,   \
        int K, const T* a, const T* g, float eps, T* x_out) {                                            \
        gemv3<R, T, false, true>(yq, yk, yv, x, wq, wk, wv, M, Nq, Nk, K, AddNorm<T>{a, g, eps, x_out, nullptr}); \
    }                                                                                                   \
    /* The same with the residual add + RMSNorm before it (addnorm_rows; x_out the new residual). */ \
    extern "C" __global__ void __launch_bounds__(256) gemv3_addnorm_r##R##_##SUFFIX(                    \
        T* yq, T* yk, T* yv, const T* x, const T* wq, const T* wk, const T* wv, int M, int Nq, int Nk,   \
        int K, const T* a, const T* g, float eps, T* x_out) {                                            \
        gemv3<R, T, true, false>(yq, yk, yv, x, wq, wk, wv, M, Nq, Nk, K, AddNorm<T>{a, g, eps, x_out, nullptr}); \
    }
#define GG_SMALL(SUFFIX, T) GG_SMALL_R(SUFFIX, T, 1) GG_SMALL_R(SUFFIX, T, 2) GG_SMALL_R(SUFFIX, T, 4) GG_SMALL_R(SUFFIX, T, 8)
INSTANTIATE_FLOAT_TYPES(GG_SMALL)

// A softmax router's choice for one token by one warp (E <= 256 logits, k <= 32): the route
// kernel's rule for softmax routers without noise — largest logit first, ties to the lower index,
// gate exp(l − lse), combine weight scale·g / max(Σg + add, clamp) when normalising, else scale·g.
// Writes ids[j·stride] and wts[j·stride] for j < k. Logits are read through L2 (other blocks of
// the calling kernel wrote them).
#define ROUTE_WARP_MAX_E 256
// A row of E <= 256 logits, times `scale`, spread over a warp: lane's values at lane + 32q, -inf
// past E (read through L2: other blocks wrote them).
__device__ __forceinline__ void warp_row_load(const float* row, int E, float scale, float (&v)[ROUTE_WARP_MAX_E / 32]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int q = 0; q < ROUTE_WARP_MAX_E / 32; ++q) {
        const int i = lane + 32 * q;
        v[q] = i < E ? scale * __ldcg(row + i) : NEG_INF;
    }
}
// warp_row_load, returning the row's log-sum-exp.
__device__ __forceinline__ float warp_row_lse(const float* row, int E, float scale, float (&v)[ROUTE_WARP_MAX_E / 32]) {
    const int lane = threadIdx.x & 31;
    warp_row_load(row, E, scale, v);
    float m = NEG_INF;
#pragma unroll
    for (int q = 0; q < ROUTE_WARP_MAX_E / 32; ++q) m = fmaxf(m, v[q]);
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < ROUTE_WARP_MAX_E / 32; ++q)
        if (lane + 32 * q < E) s += expf(v[q] - m);
    return m + logf(warp_sum(s));
}
// One round of a warp's top-k over warp_row_load's values: the largest not yet taken (ties to the
// lower index), the same on every lane, then marked taken.
__device__ __forceinline__ ValIdx warp_pick(const float (&v)[ROUTE_WARP_MAX_E / 32], int E, unsigned& taken) {
    const int lane = threadIdx.x & 31;
    ValIdx b = {NEG_INF, -1};
#pragma unroll
    for (int q = 0; q < ROUTE_WARP_MAX_E / 32; ++q) {
        const int i = lane + 32 * q;
        if (i < E && !((taken >> q) & 1u)) b = better(b, ValIdx{v[q], i});
    }
    b = warp_best(b);
    if (b.i >= 0 && (b.i & 31) == lane) taken |= 1u << (b.i >> 5);
    return b;
}
// A softmax router's choice for one token by one warp (E <= 256 logits, k <= 32): the route
// kernel's rule for softmax routers without noise — largest logit first, ties to the lower index,
// gate exp(l − lse), combine weight scale·g / max(Σg + add, clamp) when normalising, else scale·g.
// Writes ids[j·stride] and wts[j·stride] for j < k.
__device__ __forceinline__ void warp_softmax_topk(const float* row, int E, int k, int wnorm, float wadd,
                                                  float wclamp, float wscale, int* ids, float* wts, int stride) {
    const int lane = threadIdx.x & 31;
    float v[ROUTE_WARP_MAX_E / 32];
    const float lse = warp_row_lse(row, E, 1.f, v);
    unsigned taken = 0;
    float gsum = 0.f, my_g = 0.f;
    int my_id = -1;
    for (int j = 0; j < k; ++j) {
        const ValIdx b = warp_pick(v, E, taken);
        const float g = b.i >= 0 ? expf(b.v - lse) : 0.f;
        gsum += g;
        if (lane == j) my_g = g, my_id = b.i;
    }
    const float d = wnorm ? fmaxf(gsum + wadd, wclamp) : 1.f;
    if (lane < k) {
        ids[(int64_t)lane * stride] = my_id;
        wts[(int64_t)lane * stride] = wscale * my_g / d;
    }
}
// warp_softmax_topk's combine weights for experts already chosen (ids[j·stride], j < k) of a row
// whose logits are scale·row: gates summed in choice order as warp_softmax_topk sums them.
__device__ __forceinline__ void warp_softmax_weights(const float* row, int E, float scale, const int* ids, int k,
                                                     int wnorm, float wadd, float wclamp, float wscale, float* wts,
                                                     int stride) {
    const int lane = threadIdx.x & 31;
    float v[ROUTE_WARP_MAX_E / 32];
    const float lse = warp_row_lse(row, E, scale, v);
    const int id = lane < k ? ids[(int64_t)lane * stride] : -1;
    const float g = id >= 0 && id < E ? expf(scale * __ldcg(row + id) - lse) : 0.f;
    float gsum = 0.f;
    for (int j = 0; j < k; ++j) gsum += __shfl_sync(0xffffffffu, g, j);
    const float d = wnorm ? fmaxf(gsum + wadd, wclamp) : 1.f;
    if (lane < k) wts[(int64_t)lane * stride] = wscale * g / d;
}

// Router logits and softmax top-k in one launch (decode, M <= 8 rows): the blocks compute logits
// [M, E] f32 = x·Wᵀ as gemv_nt does; the last block to finish (arrival counter) routes row r with
// warp r (warp_softmax_topk) into ids / wts [k, M] and resets the counter to zero. Replaces the
// router GEMV + route kernel pair of a served step. Twin: ops::router_topk (CPU).
// The _addnorm variant takes the rows as residual x + a, RMSNorm weight g (addnorm_rows): it
// also writes the new residual x_out and the normed rows h_out (the experts' input).
template <int R, typename T, bool NORM>
__device__ __forceinline__ void router_topk(float* logits, int* ids, float* wts, const T* x, const T* w, int M,
                                            int E, int K, int k, int wnorm, float wadd, float wclamp, float wscale,
                                            int* counter, AddNorm<T> an) {
    gg_small_nt<R, T, float, NORM>(logits, x, w, nullptr, 0, M, E, K, blockIdx.x, an);
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int warp = threadIdx.x >> 5;
    if (warp < M)
        warp_softmax_topk(logits + (int64_t)warp * E, E, k, wnorm, wadd, wclamp, wscale, ids + warp, wts + warp, M);
    if (threadIdx.x == 0) *counter = 0;
}
#define ROUTER_TOPK_R(SUFFIX, T, R)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) router_topk_r##R##_##SUFFIX(                      \
        float* logits, int* ids, float* wts, const T* x, const T* w, int M, int E, int K, int k,         \
        int wnorm, float wadd, float wclamp, float wscale, int* counter) {                               \
        router_topk<R, T, false>(logits, ids, wts, x, w, M, E, K, k, wnorm, wadd, wclamp, wscale, counter, \
                                 AddNorm<T>{});                                                         \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) router_topk_addnorm_r##R##_##SUFFIX(              \
        float* logits, int* ids, float* wts, const T* x, const T* w, int M, int E, int K, int k,         \
        int wnorm, float wadd, float wclamp, float wscale, int* counter, const T* a, const T* g,         \
        float eps, T* x_out, T* h_out) {                                                                \
        router_topk<R, T, true>(logits, ids, wts, x, w, M, E, K, k, wnorm, wadd, wclamp, wscale, counter, \
                                AddNorm<T>{a, g, eps, x_out, h_out});                                   \
    }
#define ROUTER_TOPK(SUFFIX, T) ROUTER_TOPK_R(SUFFIX, T, 1) ROUTER_TOPK_R(SUFFIX, T, 2) ROUTER_TOPK_R(SUFFIX, T, 4) ROUTER_TOPK_R(SUFFIX, T, 8)
ROUTER_TOPK(bf16, bf16_t)
ROUTER_TOPK(f16, f16_t)

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
#define MOE_SERVE(SUFFIX, T)                                                                            \
    MOE_SERVE_UP(SUFFIX, T, 2) MOE_SERVE_UP(SUFFIX, T, 4) MOE_SERVE_UP(SUFFIX, T, 8)                    \
    MOE_SERVE_DOWN(SUFFIX, T, 1, 8) MOE_SERVE_DOWN(SUFFIX, T, 2, 8) MOE_SERVE_DOWN(SUFFIX, T, 2, 4)     \
    MOE_SERVE_DOWN(SUFFIX, T, 4, 4)
INSTANTIATE_FLOAT_TYPES(MOE_SERVE)

// ---- Served decode, MoE blocks: the o projection and the router in one launch. The router reads
// h = RMSNorm(x + o)·g with o = c·Woᵀ (c the attention's context [M, C], x the residual [M, D]).
// Its logits are r·z with r = rsqrt(mean((x + o)²) + eps) > 0 per row and z = [x | c]·Wfᵀ,
// Wf = [W ⊙ g | (W ⊙ g)·Wo] [E, D + C] (ops::router_fold, once per layer), so the top k of z are
// the router's and need only what the attention wrote: the router runs beside the o projection
// instead of after it. r and the combine weights come in moe_serve_up_norm, which norms the
// rows anyway. Twins: ops::o_router_topk, ops::moe_serve_swiglu_norm (CPU).
//   o_route_rR: grid ceil(E / 4)·S router blocks, then ceil(D / 8) o-projection blocks (gemv_nt,
//               writing the new residual s = x + o, o rounded to T first, as add_rmsnorm would).
//               A router block computes 4 experts' partial logits over one of the S slices of
//               K = D + C (16-byte vectors; the host's S = ceil((D + C) / 8·256) for 16-bit
//               types gives one vector per thread, so no thread waits on a second round of
//               loads) into zp [S, M, E]; the last router block to arrive sums the slices in
//               order into z [M, E] f32, picks each row's top k (largest first, ties to the
//               lower index) into ids [k, M] and resets the counter.
#define OR_RC 4
template <int R, typename T>
__device__ __forceinline__ void o_route(T* s_out, float* z, float* zp, int* ids, const T* ctx, const T* x,
                                        const T* wo, const T* wf, int M, int D, int C, int E, int k, int S, int* counter) {
    constexpr int VEC = 16 / sizeof(T);
    const int K = D + C, dv = D / VEC, kv = K / VEC, nr = (E + OR_RC - 1) / OR_RC * S;
    if ((int)blockIdx.x >= nr) {
        gg_small_nt<R, T, T>(s_out, ctx, wo, nullptr, 0, M, D, C, blockIdx.x - nr, AddNorm<T>{}, x);
        return;
    }
    PDL_ENTRY();
    __shared__ float red[8][R][OR_RC];
    __shared__ int last;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sl = blockIdx.x % S, e0 = blockIdx.x / S * OR_RC, ne = min(OR_RC, E - e0);
    const int per = (kv + S - 1) / S, vend = min(kv, (sl + 1) * per);
    const T* wb = wf + (int64_t)e0 * K;
    float acc[R][OR_RC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < OR_RC; ++c) acc[r][c] = 0.f;
    for (int v = sl * per + threadIdx.x; v < vend; v += blockDim.x) {
        uint4 wr[OR_RC];
#pragma unroll
        for (int c = 0; c < OR_RC; ++c)
            wr[c] = c < ne ? ld_stream(reinterpret_cast<const uint4*>(wb + (int64_t)c * K + v * VEC))
                           : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (r < M) {
                const T* src = v < dv ? x + (int64_t)r * D + v * VEC : ctx + (int64_t)r * C + (v - dv) * VEC;
                float xf[VEC];
                unpack16<T>(*reinterpret_cast<const uint4*>(src), xf);
#pragma unroll
                for (int c = 0; c < OR_RC; ++c) dot16<T>(&acc[r][c], wr[c], xf);
            }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < OR_RC; ++c) {
            const float s = warp_sum(acc[r][c]);
            if (lane == 0) red[warp][r][c] = s;
        }
    __syncthreads();
    if (threadIdx.x < R * OR_RC) {
        const int r = threadIdx.x / OR_RC, c = threadIdx.x % OR_RC;
        if (r < M && c < ne) {
            float s = 0.f;
#pragma unroll
            for (int q = 0; q < 8; ++q) s += red[q][r][c];
            zp[((int64_t)sl * M + r) * E + e0 + c] = s;
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1) == nr - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // z = the slices' sum, in slice order (the same for whichever block arrives last).
    for (int q = threadIdx.x; q < M * E; q += blockDim.x) {
        float sum = 0.f;
        for (int j = 0; j < S; ++j) sum += __ldcg(zp + (int64_t)j * M * E + q);
        z[q] = sum;
    }
    __syncthreads();
    if (M * E <= (int)blockDim.x) {
        // Every logit's rank at once (one per thread): the number of logits before it in the
        // order above (larger, or equal at a lower index; NaN taken as -inf so that the ranks
        // are a permutation); ranks below k are the choices.
        __shared__ float zs[R][ROUTE_WARP_MAX_E];
        const int r = threadIdx.x / E, i = threadIdx.x - r * E;
        float mine = NEG_INF;
        if (r < M) {
            mine = z[(int64_t)r * E + i];
            mine = mine != mine ? NEG_INF : mine;
            zs[r][i] = mine;
        }
        __syncthreads();
        if (r < M) {
            int rank = 0;
#pragma unroll 4
            for (int j = 0; j < E; ++j) {
                const float o = zs[r][j];
                rank += o > mine || (o == mine && j < i);
            }
            if (rank < k) ids[(int64_t)rank * M + r] = i;
        }
    } else if (warp < M) {
        float v[ROUTE_WARP_MAX_E / 32];
        warp_row_load(z + (int64_t)warp * E, E, 1.f, v);
        unsigned taken = 0;
        int my_id = -1;
        for (int j = 0; j < k; ++j) {
            const ValIdx b = warp_pick(v, E, taken);
            if (lane == j) my_id = b.i;
        }
        if (lane < k) ids[(int64_t)lane * M + warp] = my_id;
    }
    if (threadIdx.x == 0) *counter = 0;
}
#define O_ROUTE_R(SUFFIX, T, R)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) o_route_r##R##_##SUFFIX(                          \
        T* s_out, float* z, float* zp, int* ids, const T* ctx, const T* x, const T* wo, const T* wf,     \
        int M, int D, int C, int E, int k, int S, int* counter) {                                       \
        o_route<R, T>(s_out, z, zp, ids, ctx, x, wo, wf, M, D, C, E, k, S, counter);                    \
    }
#define O_ROUTE(SUFFIX, T) O_ROUTE_R(SUFFIX, T, 1) O_ROUTE_R(SUFFIX, T, 2) O_ROUTE_R(SUFFIX, T, 4) O_ROUTE_R(SUFFIX, T, 8)
O_ROUTE(bf16, bf16_t)
O_ROUTE(f16, f16_t)

#define MOE_SERVE_UP_NORM(SUFFIX, T, C)                                                                 \
    extern "C" __global__ void __launch_bounds__(256) moe_serve_up_norm_c##C##_##SUFFIX(                \
        T* a, const T* s_in, const T* gn, float eps, const float* z, float* wts, int wnorm, float wadd,    \
        float wclamp, float wscale, const T* w1, const int* ids, int E, int ntok, int k, int F, int K) {   \
        moe_serve_up<C, T, true>(a, s_in, w1, ids, E, ntok, F, K,                                       \
                                 ServeNorm<T>{gn, eps, z, wts, k, wnorm, wadd, wclamp, wscale});         \
    }
#define MOE_SERVE_NORM(SUFFIX, T) MOE_SERVE_UP_NORM(SUFFIX, T, 2) MOE_SERVE_UP_NORM(SUFFIX, T, 4) MOE_SERVE_UP_NORM(SUFFIX, T, 8)
MOE_SERVE_NORM(bf16, bf16_t)
MOE_SERVE_NORM(f16, f16_t)

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
#define MOE_SERVE_UP_NORM_LOOPS(SUFFIX, T)                                                              \
    MOE_SERVE_UP_NORM_LOOP(SUFFIX, T, 2, 1) MOE_SERVE_UP_NORM_LOOP(SUFFIX, T, 4, 1)                     \
    MOE_SERVE_UP_NORM_LOOP(SUFFIX, T, 2, 2) MOE_SERVE_UP_NORM_LOOP(SUFFIX, T, 4, 2)
MOE_SERVE_UP_NORM_LOOPS(bf16, bf16_t)
MOE_SERVE_UP_NORM_LOOPS(f16, f16_t)

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
#define GEMV3_LOOPS(SUFFIX, T) \
    GEMV3_LOOP(SUFFIX, T, 4, 1) GEMV3_LOOP(SUFFIX, T, 8, 1) GEMV3_LOOP(SUFFIX, T, 4, 2) GEMV3_LOOP(SUFFIX, T, 8, 2)
GEMV3_LOOPS(bf16, bf16_t)
GEMV3_LOOPS(f16, f16_t)
