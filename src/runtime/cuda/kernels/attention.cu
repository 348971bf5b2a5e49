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

// Decode step after the q/k/v projections, in one block per token: optional q/k RMSNorm (mode 0
// none, 1 per head over hd, 2 over the full width), each value rounded to T as the rmsnorm kernel
// writes it; rotate-half RoPE at pos[t] (zeros outside the table, pass-through dims past 2·half);
// q written to qo [n, H, hd]; K and V written into the caches [B, hkv, L, hd] at (seqs[t], pos[t])
// (skipped outside the cache, as kv_write does). Dynamic shared memory: (H + hkv)·hd floats.
// Twins: rmsnorm + rope + kv_write (ops/attention.rs). Bytes: (H + 2·hkv)·hd·2·sizeof(T) per token.
#define QK_ROPE_KV(SUFFIX, T)                                                                           \
    extern "C" __global__ void qk_rope_kv_##SUFFIX(T* qo, T* kc, T* vc, const T* q, const T* k,        \
                                                   const T* v, const T* qw, const T* kw, int mode,      \
                                                   float eps, const float* cos_t, const float* sin_t,   \
                                                   const int* pos, const int* seqs, int H, int hkv,     \
                                                   int hd, int half, int max_pos, int L, int B) {       \
        extern __shared__ float xs[];                                                                   \
        __shared__ float scratch[32];                                                                   \
        const int64_t t = blockIdx.x;                                                                   \
        const int nq = H * hd, nk = hkv * hd, n = nq + nk;                                              \
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;           \
        for (int i = threadIdx.x; i < n; i += blockDim.x)                                               \
            xs[i] = i < nq ? to_float(q[t * nq + i]) : to_float(k[t * nk + i - nq]);                    \
        __syncthreads();                                                                                \
        if (mode == 2) {                                                                                \
            float sq = 0.f, sk = 0.f;                                                                   \
            for (int i = threadIdx.x; i < nq; i += blockDim.x) sq += xs[i] * xs[i];                     \
            for (int i = nq + threadIdx.x; i < n; i += blockDim.x) sk += xs[i] * xs[i];                 \
            sq = block_sum(sq, scratch);                                                                \
            sk = block_sum(sk, scratch);                                                                \
            const float rq = rsqrtf(sq / nq + eps), rk = rsqrtf(sk / nk + eps);                         \
            for (int i = threadIdx.x; i < n; i += blockDim.x) {                                         \
                float w = i < nq ? to_float(qw[i]) : to_float(kw[i - nq]);                              \
                xs[i] = to_float(from_float<T>(xs[i] * (i < nq ? rq : rk) * w));                        \
            }                                                                                           \
        } else if (mode == 1) {                                                                         \
            for (int hh = warp; hh < H + hkv; hh += nwarps) {                                           \
                float* xr = xs + hh * hd;                                                               \
                float s = 0.f;                                                                          \
                for (int c = lane; c < hd; c += 32) s += xr[c] * xr[c];                                 \
                s = warp_sum(s);                                                                        \
                const float r = rsqrtf(s / hd + eps);                                                   \
                const T* w = hh < H ? qw : kw;                                                          \
                for (int c = lane; c < hd; c += 32) xr[c] = to_float(from_float<T>(xr[c] * r * to_float(w[c]))); \
            }                                                                                           \
        }                                                                                               \
        __syncthreads();                                                                                \
        const int p = pos[t], b = seqs[t];                                                              \
        const bool in_table = p >= 0 && p < max_pos;                                                    \
        const bool in_cache = b >= 0 && b < B && p >= 0 && p < L;                                       \
        for (int idx = threadIdx.x; idx < (H + hkv) * half; idx += blockDim.x) {                        \
            const int hh = idx / half, i = idx - hh * half;                                             \
            const float a = xs[hh * hd + i], bb = xs[hh * hd + i + half];                               \
            float o1 = 0.f, o2 = 0.f;                                                                   \
            if (in_table) {                                                                             \
                const float c = cos_t[(int64_t)p * half + i], sn = sin_t[(int64_t)p * half + i];        \
                o1 = a * c - bb * sn;                                                                   \
                o2 = bb * c + a * sn;                                                                   \
            }                                                                                           \
            T* dst = hh < H ? qo + (t * H + hh) * hd                                                    \
                            : (in_cache ? kc + (((int64_t)b * hkv + (hh - H)) * L + p) * hd : nullptr); \
            if (dst) { dst[i] = from_float<T>(o1); dst[i + half] = from_float<T>(o2); }                 \
        }                                                                                               \
        if (2 * half < hd) {                                                                            \
            for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {                                   \
                const int hh = idx / hd, c = idx - hh * hd;                                             \
                if (c < 2 * half) continue;                                                             \
                if (hh < H) qo[t * nq + idx] = from_float<T>(xs[idx]);                                  \
                else if (in_cache) kc[(((int64_t)b * hkv + (hh - H)) * L + p) * hd + c] = from_float<T>(xs[idx]); \
            }                                                                                           \
        }                                                                                               \
        if (in_cache)                                                                                   \
            for (int idx = threadIdx.x; idx < nk; idx += blockDim.x) {                                  \
                const int kh = idx / hd, c = idx - kh * hd;                                             \
                vc[(((int64_t)b * hkv + kh) * L + p) * hd + c] = v[t * nk + idx];                       \
            }                                                                                           \
    }

INSTANTIATE_FLOAT_TYPES(QK_ROPE_KV)
