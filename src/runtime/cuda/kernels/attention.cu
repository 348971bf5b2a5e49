// Attention over the KV cache; twins in ops/attention.rs.

#define ATTN(SUFFIX, T)                                                                                 \
    extern "C" __global__ void kv_write_##SUFFIX(T* cache, const T* src, const int* batch, const int* pos, int n, \
                                                 int hkv, int L, int hd, int B) {                       \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= (int64_t)n * hkv * hd) return;                                                         \
        int c = i % hd;                                                                                 \
        int64_t t = i / hd;                                                                             \
        int h = t % hkv, r = t / hkv;                                                                   \
        int b = batch[r], p = pos[r];                                                                   \
        if (b < 0 || b >= B || p < 0 || p >= L) return;                                                 \
        cache[(((int64_t)b * hkv + h) * L + p) * hd + c] = src[i];                                      \
    }                                                                                                   \
    /* Split-KV decode (flash-decoding). Block (bh, sp) takes keys [sp*chunk, (sp+1)*chunk) of   \
       sequence b's visible range; warp w takes keys w, w+4, ...; each lane owns hd/32 output dims; \
       online softmax per warp, merged across the 4 warps in shared memory. The block writes its    \
       unnormalised partial (acc[hd], max, sum) to part[(bh*splits + sp)*(hd+2)]; a block with no   \
       keys writes max = -inf. attention_decode_combine merges the splits. */                      \
    extern "C" __global__ void attention_decode_##SUFFIX(float* part, const T* q, const T* kc, const T* vc, \
                                                         const int* lens, int H, int hkv, int L, int hd, \
                                                         float scale, int window, int chunk) {            \
        __shared__ float qs[256];                                                                       \
        __shared__ float wm[4], ws[4];                                                                  \
        __shared__ float wacc[4][256];                                                                  \
        const int bh = blockIdx.x, sp = blockIdx.y, splits = gridDim.y, b = bh / H, h = bh % H;         \
        const int kvh = h / (H / hkv);                                                                  \
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;                                     \
        for (int c = threadIdx.x; c < hd; c += blockDim.x) qs[c] = to_float(q[(int64_t)bh * hd + c]);   \
        __syncthreads();                                                                                \
        const int n = min(lens[b], L);                                                                  \
        const int first = window > 0 ? max(0, n - window) : 0;                                          \
        const int lo = max(first, sp * chunk), hi = min(n, (sp + 1) * chunk);                           \
        const T* kb = kc + ((int64_t)b * hkv + kvh) * L * hd;                                           \
        const T* vb = vc + ((int64_t)b * hkv + kvh) * L * hd;                                           \
        float m = NEG_INF, s = 0.f, acc[8];                                                             \
        _Pragma("unroll") for (int i = 0; i < 8; ++i) acc[i] = 0.f;                                     \
        for (int j = lo + warp; j < hi; j += 4) {                                                       \
            float d = 0.f;                                                                              \
            _Pragma("unroll") for (int i = 0; i < 8; ++i) {                                             \
                int c = lane + 32 * i;                                                                  \
                if (c < hd) d += qs[c] * to_float(kb[(int64_t)j * hd + c]);                             \
            }                                                                                           \
            d = warp_sum(d) * scale;                                                                    \
            float mn = fmaxf(m, d), corr = expf(m - mn), p = expf(d - mn);                              \
            s = s * corr + p;                                                                           \
            _Pragma("unroll") for (int i = 0; i < 8; ++i) {                                             \
                int c = lane + 32 * i;                                                                  \
                acc[i] = acc[i] * corr + (c < hd ? p * to_float(vb[(int64_t)j * hd + c]) : 0.f);        \
            }                                                                                           \
            m = mn;                                                                                     \
        }                                                                                               \
        if (lane == 0) { wm[warp] = m; ws[warp] = s; }                                                  \
        _Pragma("unroll") for (int i = 0; i < 8; ++i) {                                                 \
            int c = lane + 32 * i;                                                                      \
            if (c < hd) wacc[warp][c] = acc[i];                                                         \
        }                                                                                               \
        __syncthreads();                                                                                \
        float gm = fmaxf(fmaxf(wm[0], wm[1]), fmaxf(wm[2], wm[3]));                                     \
        float* o = part + ((int64_t)bh * splits + sp) * (hd + 2);                                       \
        if (gm == NEG_INF) {                                                                            \
            if (threadIdx.x == 0) { o[hd] = NEG_INF; o[hd + 1] = 0.f; }                                 \
            return;                                                                                     \
        }                                                                                               \
        float z = 0.f;                                                                                  \
        _Pragma("unroll") for (int w = 0; w < 4; ++w) z += wm[w] == NEG_INF ? 0.f : ws[w] * expf(wm[w] - gm); \
        for (int c = threadIdx.x; c < hd; c += blockDim.x) {                                            \
            float a = 0.f;                                                                              \
            _Pragma("unroll") for (int w = 0; w < 4; ++w)                                               \
                if (wm[w] != NEG_INF) a += wacc[w][c] * expf(wm[w] - gm);                               \
            o[c] = a;                                                                                   \
        }                                                                                               \
        if (threadIdx.x == 0) { o[hd] = gm; o[hd + 1] = z; }                                            \
    }                                                                                                   \
    /* One block per (b, h): out = Σ_sp acc_sp · e^(m_sp − M) / Σ_sp s_sp · e^(m_sp − M). */         \
    extern "C" __global__ void attention_decode_combine_##SUFFIX(T* out, const float* part, int splits, int hd) { \
        const int bh = blockIdx.x;                                                                      \
        const float* pb = part + (int64_t)bh * splits * (hd + 2);                                       \
        float gm = NEG_INF;                                                                             \
        for (int sp = 0; sp < splits; ++sp) gm = fmaxf(gm, pb[sp * (hd + 2) + hd]);                     \
        float z = 0.f;                                                                                  \
        for (int sp = 0; sp < splits; ++sp) {                                                           \
            float ms = pb[sp * (hd + 2) + hd];                                                          \
            if (ms != NEG_INF) z += pb[sp * (hd + 2) + hd + 1] * expf(ms - gm);                         \
        }                                                                                               \
        for (int c = threadIdx.x; c < hd; c += blockDim.x) {                                            \
            float a = 0.f;                                                                              \
            for (int sp = 0; sp < splits; ++sp) {                                                       \
                float ms = pb[sp * (hd + 2) + hd];                                                      \
                if (ms != NEG_INF) a += pb[sp * (hd + 2) + c] * expf(ms - gm);                          \
            }                                                                                           \
            out[(int64_t)bh * hd + c] = from_float<T>(z > 0.f ? a / z : 0.f);                           \
        }                                                                                               \
    }

INSTANTIATE_FLOAT_TYPES(ATTN)
