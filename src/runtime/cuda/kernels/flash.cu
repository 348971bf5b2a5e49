// Fused causal attention (the FlashAttention-2 scheme) for training and prefill; CPU twin and
// contract in ops/flash.rs. The S×S scores never reach global memory.
//   forward:  o = softmax(scale·q·kᵀ + mask)·v per (batch, head), lse = log Σ_j exp(scale·q·kⱼ)
//   backward: D = rowsum(do∘o); per key block, for every query block that sees it:
//             P = exp(scale·q·kᵀ − lse), dv += Pᵀ·do, dS = P∘(do·vᵀ − D),
//             dk += scale·dSᵀ·q, dq += scale·dS·k (f32 atomics into a zeroed buffer)
// Layouts: q, o, do [B, S, H, HD] rows; k, v rows at element strides (batch, row, head) so both
// [B, L, Hkv, HD] and a KV cache [B, Hkv, Lc, HD] are read in place; lse, D [B, H, S] f32.
// Query i sits at position start + i and sees keys j <= start + i (and start + i − j < window
// when window > 0). GQA: head h reads KV head h / g.
// Tiles: 64 queries × 64 keys per step, 4 warps of 16 rows, mma.sync m16n8k16 bf16/f16 with f32
// accumulators; operands staged by cp.async (double-buffered) in XOR-swizzled shared memory and
// read by ldmatrix. Softmax in the exp2 domain (scale·log2 e folded into the scores).

#define FA_B 64
#define FA_THREADS 128
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

// Element index in a [rows][HD] tile: 16-byte chunk c of row r sits at c ^ (r & 7), so the 8
// row addresses of every ldmatrix 8×8 load (plain or .trans) hit distinct bank groups.
template <int HD> __device__ __forceinline__ int fa_idx(int r, int c) {
    return r * HD + (((((c >> 3) ^ r) & 7) | ((c >> 3) & ~7)) << 3) + (c & 7);
}

// cp.async of a 64-row tile: row r from g + r·stride (rows >= valid are zero-filled).
template <typename T, int HD>
__device__ __forceinline__ void fa_load(unsigned short* s, const T* g, int64_t stride, int valid, const T* any) {
    constexpr int CH = HD / 8;
#pragma unroll
    for (int i = 0; i < FA_B * CH / FA_THREADS; ++i) {
        const int c = threadIdx.x + i * FA_THREADS;
        const int r = c / CH, col = (c % CH) * 8;
        const bool ok = r < valid;
        cp_async16(smem_addr(s + fa_idx<HD>(r, col)), ok ? g + (int64_t)r * stride + col : any, ok);
    }
}

__device__ __forceinline__ bool fa_visible(int qpos, int kpos, int window) {
    return kpos <= qpos && (window <= 0 || qpos - kpos < window);
}

// Four consecutive f32 added into global memory (one vector reduction on sm_90).
__device__ __forceinline__ void fa_red4(float* p, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
    atomicAdd(p + 2, c);
    atomicAdd(p + 3, d);
#endif
}

// ldmatrix lane addresses. Every x4 load here reads rows R0 + lrow (R0 a multiple of 16) and
// 16-byte chunks C0 + lchunk (C0 even) with lrow = r8 + 8·bitA and lchunk = bitB of the lane's
// quarter; under the fa_idx swizzle its byte address is R0·rowbytes + (lane_off ^ (C0 << 4)),
// lane_off fixed per thread. Two lane patterns occur:
//   OA: lrow = r8 + 8·(qd & 1), lchunk = qd >> 1  (A operands; B operands read with .trans)
//   OB: lrow = r8 + 8·(qd >> 1), lchunk = qd & 1  (B operands stored [n][k]; A read with .trans)
__device__ __forceinline__ uint32_t fa_lane_off(int rowbytes, int lrow, int lchunk, int r8) {
    return (uint32_t)(lrow * rowbytes + ((lchunk ^ r8) << 4));
}
__device__ __forceinline__ uint32_t fa_at(uint32_t tile, int r0_bytes, uint32_t lane_off, int c0) {
    return tile + r0_bytes + (lane_off ^ ((uint32_t)c0 << 4));
}
__device__ __forceinline__ float fa_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Forward: grid (H, B, ceil(S/64)), 128 threads, smem 5 tiles of [64][HD] 16-bit values.
template <typename T, int HD>
__device__ __forceinline__ void fa_fwd(T* __restrict__ o, float* __restrict__ lse, const T* __restrict__ q,
                                       const T* __restrict__ k, const T* __restrict__ v, int S, int L, int H, int g,
                                       int start, int window, float scale, int64_t kv_b, int64_t kv_s, int64_t kv_h,
                                       unsigned short* smem) {
    constexpr int RB = HD * 2, TILE_B = FA_B * RB;  // bytes per row, per tile
    unsigned short* sQ = smem;  // [64][HD], then 2 K and 2 V tiles
    const uint32_t aQ = smem_addr(sQ), aK = aQ + TILE_B, aV = aQ + 3 * TILE_B;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int qd = lane >> 3, r8 = lane & 7, gr = lane >> 2, t4 = lane & 3;
    const uint32_t OA = fa_lane_off(RB, r8 + (qd & 1) * 8, qd >> 1, r8);
    const uint32_t OB = fa_lane_off(RB, r8 + (qd >> 1) * 8, qd & 1, r8);
    // The block index is the grid's slowest dimension, counted from the last query block: every
    // (head, batch) pair's longest rows (most keys) start first and the short causal blocks fill
    // the tail (longest-first over the whole grid, not per head).
    const int m0 = (gridDim.z - 1 - blockIdx.z) * FA_B, h = blockIdx.x, b = blockIdx.y, hk = h / g;
    const int64_t q_s = (int64_t)H * HD;
    const T* qg = q + ((int64_t)b * S + m0) * q_s + (int64_t)h * HD;
    const T* kg = k + b * kv_b + hk * kv_h;
    const T* vg = v + b * kv_b + hk * kv_h;
    const int kmax = min(L - 1, start + min(m0 + FA_B, S) - 1);
    const int kmin = window > 0 ? max(0, start + m0 - window + 1) : 0;
    const int j0 = kmin / FA_B, j1 = kmax / FA_B;

    fa_load<T, HD>(sQ, qg, q_s, S - m0, q);
    fa_load<T, HD>(sQ + FA_B * HD, kg + (int64_t)j0 * FA_B * kv_s, kv_s, L - j0 * FA_B, k);
    fa_load<T, HD>(sQ + 3 * FA_B * HD, vg + (int64_t)j0 * FA_B * kv_s, kv_s, L - j0 * FA_B, v);
    cp_async_commit();

    const float sl2 = scale * FA_LOG2E;
    float acc[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};  // max of raw scores, partial sums
    uint32_t qf[HD / 16][4];
    const int qlo = start + m0 + warp * 16;  // position of this warp's first row
    const int qrow = qlo + gr;

    for (int j = j0; j <= j1; ++j) {
        const int buf = (j - j0) & 1;
        if (j < j1) {
            const int n1 = (j + 1) * FA_B;
            fa_load<T, HD>(sQ + (1 + (buf ^ 1)) * FA_B * HD, kg + (int64_t)n1 * kv_s, kv_s, L - n1, k);
            fa_load<T, HD>(sQ + (3 + (buf ^ 1)) * FA_B * HD, vg + (int64_t)n1 * kv_s, kv_s, L - n1, v);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (j == j0) {
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) ldsm_x4(qf[kk], fa_at(aQ, warp * 16 * RB, OA, 2 * kk));
        }
        const uint32_t kb = aK + buf * TILE_B, vb = aV + buf * TILE_B;
        float s[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        // S = Q·Kᵀ; fragments of step kk + 1 requested before the mmas of step kk (asm volatile
        // keeps program order, so the loads are issued early by hand).
        {
            uint32_t bf[2][4][4];
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) ldsm_x4(bf[0][nj], fa_at(kb, nj * 16 * RB, OB, 0));
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                if (kk + 1 < HD / 16) {
#pragma unroll
                    for (int nj = 0; nj < 4; ++nj) ldsm_x4(bf[(kk + 1) & 1][nj], fa_at(kb, nj * 16 * RB, OB, 2 * (kk + 1)));
                }
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) {
                    Mma<T>::run(s[2 * nj], qf[kk], bf[kk & 1][nj]);
                    Mma<T>::run(s[2 * nj + 1], qf[kk], bf[kk & 1][nj] + 2);
                }
            }
        }
        // Mask (only blocks crossing the diagonal, the window edge or the last key), then the
        // online softmax; a row's 64 columns live in the 4 threads of a quad.
        const int k0 = j * FA_B;
        if (k0 + FA_B - 1 > qlo || k0 + FA_B > L || (window > 0 && qlo + 15 - k0 >= window)) {
#pragma unroll
            for (int ni = 0; ni < 8; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int kp = k0 + ni * 8 + t4 * 2 + (e & 1);
                    if (!(kp < L && fa_visible(qrow + (e >> 1) * 8, kp, window))) s[ni][e] = NEG_INF;
                }
        }
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float mx = mrow[hr];
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) mx = fmaxf(mx, fmaxf(s[ni][2 * hr], s[ni][2 * hr + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float ref = mx == NEG_INF ? 0.f : mx * sl2;
            const float alpha = fa_ex2(mrow[hr] * sl2 - ref);
            mrow[hr] = mx;
            float sum = 0.f;
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                s[ni][2 * hr] = fa_ex2(fmaf(s[ni][2 * hr], sl2, -ref));
                s[ni][2 * hr + 1] = fa_ex2(fmaf(s[ni][2 * hr + 1], sl2, -ref));
                sum += s[ni][2 * hr] + s[ni][2 * hr + 1];
            }
            lrow[hr] = lrow[hr] * alpha + sum;
#pragma unroll
            for (int nd = 0; nd < HD / 8; ++nd) acc[nd][2 * hr] *= alpha, acc[nd][2 * hr + 1] *= alpha;
        }
        // o += P·V: the score accumulators are the A fragments of P (16 keys per k step); steps
        // of 16 keys × 64 columns (4 fragments), the next step's fragments requested first.
        {
            constexpr int NG = HD / 64, STEPS = 4 * NG;
            uint32_t bf[2][4][4];
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) ldsm_x4_t(bf[0][jj], fa_at(vb, 0, OA, 2 * jj));
#pragma unroll
            for (int st = 0; st < STEPS; ++st) {
                const int kk = st / NG, c0 = (st % NG) * 8;  // c0 in 8-column fragments
                if (st + 1 < STEPS) {
                    const int k1 = (st + 1) / NG, c1 = ((st + 1) % NG) * 8;
#pragma unroll
                    for (int jj = 0; jj < 4; ++jj)
                        ldsm_x4_t(bf[(st + 1) & 1][jj], fa_at(vb, k1 * 16 * RB, OA, c1 + 2 * jj));
                }
                const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                       pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                       pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) {
                    Mma<T>::run(acc[c0 + 2 * jj], a, bf[st & 1][jj]);
                    Mma<T>::run(acc[c0 + 2 * jj + 1], a, bf[st & 1][jj] + 2);
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    // Normalise, write lse, stage o through sQ for 16-byte stores.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        float l = lrow[hr];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int r = warp * 16 + gr + hr * 8;
        if (t4 == 0 && m0 + r < S)
            lse[((int64_t)b * H + h) * S + m0 + r] = l > 0.f ? (mrow[hr] * sl2 + log2f(l)) * FA_LN2 : NEG_INF;
#pragma unroll
        for (int nd = 0; nd < HD / 8; ++nd)
            *reinterpret_cast<uint32_t*>(sQ + fa_idx<HD>(r, nd * 8 + t4 * 2)) =
                pack2<T>(acc[nd][2 * hr] * inv, acc[nd][2 * hr + 1] * inv);
    }
    __syncthreads();
    T* og = o + ((int64_t)b * S + m0) * q_s + (int64_t)h * HD;
    constexpr int CH = HD / 8;
#pragma unroll
    for (int i = 0; i < FA_B * CH / FA_THREADS; ++i) {
        const int c = threadIdx.x + i * FA_THREADS;
        const int r = c / CH, col = (c % CH) * 8;
        if (m0 + r < S)
            *reinterpret_cast<uint4*>(og + (int64_t)r * q_s + col) = *reinterpret_cast<const uint4*>(sQ + fa_idx<HD>(r, col));
    }
}

#define FA_FWD(TN, T, HD)                                                                                    \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                \
        flash_fwd_##TN##_##HD(T* o, float* lse, const T* q, const T* k, const T* v, int S, int L, int H, int g, \
                              int start, int window, float scale, int64_t kv_b, int64_t kv_s, int64_t kv_h) {  \
        extern __shared__ __align__(128) unsigned short fa_smem[];                                          \
        fa_fwd<T, HD>(o, lse, q, k, v, S, L, H, g, start, window, scale, kv_b, kv_s, kv_h, fa_smem);       \
    }
FA_FWD(bf16, bf16_t, 64)
FA_FWD(bf16, bf16_t, 128)
FA_FWD(f16, f16_t, 64)
FA_FWD(f16, f16_t, 128)

// D[b, h, i] = Σ_d do[b, i, h, d]·o[b, i, h, d]: one warp per (b, i, h), rows = B·S·H.
template <typename T>
__device__ __forceinline__ void fa_bwd_dot(float* D, const T* o, const T* dO, int S, int H, int hd, int rows) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* a = o + (int64_t)row * hd;
    const T* c = dO + (int64_t)row * hd;
    float acc = 0.f;
    for (int d = lane * 8; d < hd; d += 256) {
        float x[8], y[8];
        load8(a + d, x);
        load8(c + d, y);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc += x[i] * y[i];
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        const int h = row % H, i = (row / H) % S, b = row / (H * S);
        D[((int64_t)b * H + h) * S + i] = acc;
    }
}

#define FA_DOT(TN, T)                                                                                     \
    extern "C" __global__ void flash_bwd_dot_##TN(float* D, const T* o, const T* dO, int S, int H, int hd, int rows) { \
        fa_bwd_dot<T>(D, o, dO, S, H, hd, rows);                                                          \
    }
FA_DOT(bf16, bf16_t)
FA_DOT(f16, f16_t)

// Backward: grid (Hkv, B, ceil(L/64)), 128 threads; each warp owns 16 keys of the block and
// keeps their dk, dv in registers over the g heads of the group and every query block that
// sees the keys. k, v, dk, dv [B, L, Hkv, HD]; dq_acc [B, S, H, HD] f32, zeroed by the caller.
// smem: K, V, 2 × Q, 2 × dO tiles of [64][HD], dSᵀ [64][64], 2 × 64 lse and D.
template <typename T, int HD>
__device__ __forceinline__ void fa_bwd(float* __restrict__ dq_acc, T* __restrict__ dk, T* __restrict__ dv,
                                       const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                       const T* __restrict__ dO, const float* __restrict__ lse,
                                       const float* __restrict__ Dg, int S, int L, int H, int g, int start,
                                       int window, float scale, unsigned short* smem) {
    constexpr int RB = HD * 2, TILE_B = FA_B * RB, RB64 = FA_B * 2;
    unsigned short* sK = smem;
    unsigned short* sQ = sK + 2 * FA_B * HD;   // 2 buffers (after K and V)
    unsigned short* sdO = sQ + 2 * FA_B * HD;  // 2 buffers
    unsigned short* sdS = sdO + 2 * FA_B * HD; // [64 keys][64 queries]
    float* sL = reinterpret_cast<float*>(sdS + FA_B * FA_B);  // 2 × 64 (lse · log2 e)
    float* sD = sL + 2 * FA_B;                                 // 2 × 64
    const uint32_t aK = smem_addr(sK), aV = aK + TILE_B, aQ = aK + 2 * TILE_B, adO = aK + 4 * TILE_B,
                   adS = aK + 6 * TILE_B;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int qd = lane >> 3, r8 = lane & 7, gr = lane >> 2, t4 = lane & 3;
    const uint32_t OA = fa_lane_off(RB, r8 + (qd & 1) * 8, qd >> 1, r8);
    const uint32_t OB = fa_lane_off(RB, r8 + (qd >> 1) * 8, qd & 1, r8);
    const uint32_t OB64 = fa_lane_off(RB64, r8 + (qd >> 1) * 8, qd & 1, r8);
    // Key block in the slowest grid dimension: the first key blocks (seen by the most query
    // blocks under the causal mask) of every (head, batch) start first.
    const int n0 = blockIdx.z * FA_B, hk = blockIdx.x, b = blockIdx.y, Hkv = H / g;
    const int64_t kv_s = (int64_t)Hkv * HD, q_s = (int64_t)H * HD;
    const T* kg = k + ((int64_t)b * L + n0) * kv_s + (int64_t)hk * HD;
    const T* vg = v + ((int64_t)b * L + n0) * kv_s + (int64_t)hk * HD;
    // Query rows that see a key of this block: start + i >= n0 and start + i − (n0 + 63) < window.
    const int i_lo = max(0, n0 - start);
    const int i_hi = window > 0 ? min(S, n0 + FA_B - 1 + window - start) : S;
    const int ib0 = i_lo / FA_B, nib = i_hi > i_lo ? (i_hi - 1) / FA_B - ib0 + 1 : 0;
    const int iters = g * nib;

    auto load_q = [&](int t, int buf) {
        const int hh = hk * g + t / nib, m0 = (ib0 + t % nib) * FA_B;
        const int64_t off = ((int64_t)b * S + m0) * q_s + (int64_t)hh * HD;
        fa_load<T, HD>(sQ + buf * FA_B * HD, q + off, q_s, S - m0, q);
        fa_load<T, HD>(sdO + buf * FA_B * HD, dO + off, q_s, S - m0, dO);
    };
    fa_load<T, HD>(sK, kg, kv_s, L - n0, k);
    fa_load<T, HD>(sK + FA_B * HD, vg, kv_s, L - n0, v);
    if (iters > 0) load_q(0, 0);
    cp_async_commit();

    const float sl2 = scale * FA_LOG2E;
    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[i][e] = dva[i][e] = 0.f;
    const int klo = n0 + warp * 16;  // this warp's first key
    const int krow = klo + gr;

    for (int t = 0; t < iters; ++t) {
        const int buf = t & 1, hh = hk * g + t / nib, m0 = (ib0 + t % nib) * FA_B;
        if (t + 1 < iters) load_q(t + 1, buf ^ 1);
        cp_async_commit();
        if (tid < FA_B) {
            const int i = m0 + tid;
            sL[buf * FA_B + tid] = i < S ? lse[((int64_t)b * H + hh) * S + i] * FA_LOG2E : POS_INF;
        } else {
            const int i = m0 + tid - FA_B;
            sD[buf * FA_B + tid - FA_B] = i < S ? Dg[((int64_t)b * H + hh) * S + i] : 0.f;
        }
        cp_async_wait<1>();
        __syncthreads();
        const uint32_t qs = aQ + buf * TILE_B, ds = adO + buf * TILE_B;
        const float* lb = sL + buf * FA_B;
        const float* db = sD + buf * FA_B;

        // Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ (16 keys × 64 queries per warp); per 16-column step all
        // 10 fragments are requested, then the 16 mmas.
        float st[8][4], dp[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[i][e] = dp[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            uint32_t ak[4], av[4], bq[4][4], bo[4][4];
            ldsm_x4(ak, fa_at(aK, warp * 16 * RB, OA, 2 * kk));
            ldsm_x4(av, fa_at(aV, warp * 16 * RB, OA, 2 * kk));
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
                ldsm_x4(bq[nj], fa_at(qs, nj * 16 * RB, OB, 2 * kk));
                ldsm_x4(bo[nj], fa_at(ds, nj * 16 * RB, OB, 2 * kk));
            }
#pragma unroll
            for (int nj = 0; nj < 4; ++nj) {
                Mma<T>::run(st[2 * nj], ak, bq[nj]);
                Mma<T>::run(st[2 * nj + 1], ak, bq[nj] + 2);
                Mma<T>::run(dp[2 * nj], av, bo[nj]);
                Mma<T>::run(dp[2 * nj + 1], av, bo[nj] + 2);
            }
        }
        // Pᵀ = exp2(Sᵀ·scale·log2 e − lse·log2 e) where visible, dSᵀ = Pᵀ∘(dPᵀ − D). The mask
        // is evaluated only for blocks crossing the diagonal, the window edge or a tail.
        const bool masked = klo + 15 > start + m0 || m0 + FA_B > S || klo + 16 > L ||
                            (window > 0 && start + m0 + FA_B - 1 - klo >= window);
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = ni * 8 + t4 * 2 + (e & 1), kp = krow + (e >> 1) * 8;
                float p = fa_ex2(fmaf(st[ni][e], sl2, -lb[c]));
                if (masked && !(m0 + c < S && kp < L && fa_visible(start + m0 + c, kp, window))) p = 0.f;
                st[ni][e] = p;
                dp[ni][e] = p * (dp[ni][e] - db[c]);
            }
        // dv += Pᵀ·dO and dk += dSᵀ·Q: accumulators reused as A fragments (16 queries per k
        // step); dSᵀ also goes to shared memory for dq.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t ap[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                              pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]), pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
            uint32_t as[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                              pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]), pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int n4 = 0; n4 < HD / 16; n4 += 4) {
                uint32_t bo[4][4], bq[4][4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    ldsm_x4_t(bo[j], fa_at(ds, kk * 16 * RB, OA, 2 * (n4 + j)));
                    ldsm_x4_t(bq[j], fa_at(qs, kk * 16 * RB, OA, 2 * (n4 + j)));
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int nj = n4 + j;
                    Mma<T>::run(dva[2 * nj], ap, bo[j]);
                    Mma<T>::run(dva[2 * nj + 1], ap, bo[j] + 2);
                    Mma<T>::run(dka[2 * nj], as, bq[j]);
                    Mma<T>::run(dka[2 * nj + 1], as, bq[j] + 2);
                }
            }
            const int r = warp * 16 + gr, c = kk * 16 + t4 * 2;
            *reinterpret_cast<uint32_t*>(sdS + fa_idx<FA_B>(r, c)) = as[0];
            *reinterpret_cast<uint32_t*>(sdS + fa_idx<FA_B>(r + 8, c)) = as[1];
            *reinterpret_cast<uint32_t*>(sdS + fa_idx<FA_B>(r, c + 8)) = as[2];
            *reinterpret_cast<uint32_t*>(sdS + fa_idx<FA_B>(r + 8, c + 8)) = as[3];
        }
        __syncthreads();
        // dq[16 queries of this warp, HD] = dS·K = (dSᵀ)ᵀ·K, added into dq_acc.
        float dqa[HD / 8][4];
#pragma unroll
        for (int i = 0; i < HD / 8; ++i) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t a[4];
            ldsm_x4_t(a, fa_at(adS, kk * 16 * RB64, OB64, 2 * warp));
#pragma unroll
            for (int n4 = 0; n4 < HD / 16; n4 += 4) {
                uint32_t bk[4][4];
#pragma unroll
                for (int j = 0; j < 4; ++j) ldsm_x4_t(bk[j], fa_at(aK, kk * 16 * RB, OA, 2 * (n4 + j)));
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    Mma<T>::run(dqa[2 * (n4 + j)], a, bk[j]);
                    Mma<T>::run(dqa[2 * (n4 + j) + 1], a, bk[j] + 2);
                }
            }
        }
        // Lane pairs swap halves so each lane adds 4 consecutive floats: even lanes row gr,
        // odd lanes row gr + 8.
        {
            const bool odd = t4 & 1;
            const int i = m0 + warp * 16 + gr + (odd ? 8 : 0);
            float* dst = dq_acc + ((int64_t)b * S + i) * q_s + (int64_t)hh * HD + (t4 & 2) * 2;
#pragma unroll
            for (int nd = 0; nd < HD / 8; ++nd) {
                const float* c = dqa[nd];
                const float r0 = __shfl_xor_sync(0xffffffffu, odd ? c[0] : c[2], 1);
                const float r1 = __shfl_xor_sync(0xffffffffu, odd ? c[1] : c[3], 1);
                if (i < S) {
                    if (odd) fa_red4(dst + nd * 8, r0 * scale, r1 * scale, c[2] * scale, c[3] * scale);
                    else fa_red4(dst + nd * 8, c[0] * scale, c[1] * scale, r0 * scale, r1 * scale);
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    // dk (scaled) and dv of this warp's 16 keys.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int kp = krow + hr * 8;
        if (kp < L) {
            T* dkr = dk + ((int64_t)b * L + kp) * kv_s + (int64_t)hk * HD + t4 * 2;
            T* dvr = dv + ((int64_t)b * L + kp) * kv_s + (int64_t)hk * HD + t4 * 2;
#pragma unroll
            for (int nd = 0; nd < HD / 8; ++nd) {
                *reinterpret_cast<uint32_t*>(dkr + nd * 8) = pack2<T>(dka[nd][2 * hr] * scale, dka[nd][2 * hr + 1] * scale);
                *reinterpret_cast<uint32_t*>(dvr + nd * 8) = pack2<T>(dva[nd][2 * hr], dva[nd][2 * hr + 1]);
            }
        }
    }
}

#define FA_BWD(TN, T, HD)                                                                                    \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                                \
        flash_bwd_##TN##_##HD(float* dq_acc, T* dk, T* dv, const T* q, const T* k, const T* v, const T* dO,   \
                              const float* lse, const float* D, int S, int L, int H, int g, int start, int window, \
                              float scale) {                                                                 \
        extern __shared__ __align__(128) unsigned short fa_smem[];                                          \
        fa_bwd<T, HD>(dq_acc, dk, dv, q, k, v, dO, lse, D, S, L, H, g, start, window, scale, fa_smem);      \
    }
FA_BWD(bf16, bf16_t, 64)
FA_BWD(bf16, bf16_t, 128)
FA_BWD(f16, f16_t, 64)
FA_BWD(f16, f16_t, 128)
