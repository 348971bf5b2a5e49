// Attention over the KV cache; twins in ops/attention.rs.

// Keys per block of the split-KV decode kernels (a multiple of 32): the host's grid has
// ceil(L / DECODE_CHUNK) splits (ops/attention.rs's DECODE_CHUNK).
#define DECODE_CHUNK 128

// Merge head bh's split partials (pb = its splits × (hd + 2) floats): out = Σ_sp acc_sp ·
// e^(m_sp − M) / Σ_sp s_sp · e^(m_sp − M). The partials are read through L2 (__ldcg): in the
// fused path other blocks wrote them during this kernel.
template <typename T>
__device__ __forceinline__ void decode_combine(T* out, const float* pb, int splits, int hd, int bh) {
    float gm = NEG_INF;
    for (int sp = 0; sp < splits; ++sp) gm = fmaxf(gm, __ldcg(pb + sp * (hd + 2) + hd));
    float z = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
        const float ms = __ldcg(pb + sp * (hd + 2) + hd);
        if (ms != NEG_INF) z += __ldcg(pb + sp * (hd + 2) + hd + 1) * expf(ms - gm);
    }
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float a = 0.f;
        for (int sp = 0; sp < splits; ++sp) {
            const float ms = __ldcg(pb + sp * (hd + 2) + hd);
            if (ms != NEG_INF) a += __ldcg(pb + sp * (hd + 2) + c) * expf(ms - gm);
        }
        out[(int64_t)bh * hd + c] = from_float<T>(z > 0.f ? a / z : 0.f);
    }
}

// After a split block wrote its partial: with `counters` (zeroed i32, one per (b, h)), the last of
// head bh's split blocks to arrive merges all of them into out (no combine kernel) and resets the
// counter to zero for the next call. Without counters, attention_decode_combine runs after.
template <typename T>
__device__ __forceinline__ void decode_finish(T* out, int* counters, const float* part, int splits, int hd,
                                              int bh) {
    if (!counters) return;
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counters + bh, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    decode_combine<T>(out, part + (int64_t)bh * splits * (hd + 2), splits, hd, bh);
    if (threadIdx.x == 0) counters[bh] = 0;
}

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
    /* Split-KV decode (flash-decoding). Block (bh, sp) takes keys [sp*DECODE_CHUNK, (sp+1)*DECODE_CHUNK) of \
       sequence b's visible range; warp w takes the 32-key groups w, w+4, ... of it with one key  \
       per lane for the scores (16-byte loads of the key row when hd allows), then one online-     \
       softmax update per group and the V rows accumulated with each lane owning hd/32 dims; the   \
       4 warps merge in shared memory. The block writes its unnormalised partial (acc[hd], max,    \
       sum) to part[(bh*splits + sp)*(hd+2)]; a block with no keys writes max = -inf.              \
       attention_decode_combine merges the splits, or with counters the last block (decode_finish). */ \
    extern "C" __global__ void attention_decode_##SUFFIX(float* part, const T* q, const T* kc, const T* vc, \
                                                         const int* lens, int H, int hkv, int L, int hd, \
                                                         float scale, int window, T* out,                \
                                                         int* counters) {                                \
        PDL_ENTRY();                                                                                    \
        constexpr int VEC = 16 / sizeof(T);                                                             \
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
        const int lo = max(first, sp * DECODE_CHUNK), hi = min(n, (sp + 1) * DECODE_CHUNK);             \
        const T* kb = kc + ((int64_t)b * hkv + kvh) * L * hd;                                           \
        const T* vb = vc + ((int64_t)b * hkv + kvh) * L * hd;                                           \
        const bool vec = hd % VEC == 0;                                                                 \
        float m = NEG_INF, s = 0.f, acc[8];                                                             \
        _Pragma("unroll") for (int i = 0; i < 8; ++i) acc[i] = 0.f;                                     \
        for (int j0 = lo + 32 * warp; j0 < hi; j0 += 128) {                                             \
            const int j = j0 + lane;                                                                    \
            float d = NEG_INF;                                                                          \
            if (j < hi) {                                                                               \
                const T* kr = kb + (int64_t)j * hd;                                                     \
                float a = 0.f;                                                                          \
                if (vec) {                                                                              \
                    /* 8 row vectors in flight per lane, then their dot products */                     \
                    for (int c0 = 0; c0 < hd; c0 += 8 * VEC) {                                          \
                        uint4 u[8];                                                                     \
                        _Pragma("unroll") for (int x = 0; x < 8; ++x)                                   \
                            u[x] = c0 + x * VEC < hd ? *reinterpret_cast<const uint4*>(kr + c0 + x * VEC) \
                                                     : make_uint4(0, 0, 0, 0);                          \
                        _Pragma("unroll") for (int x = 0; x < 8; ++x) {                                 \
                            const T* ut = reinterpret_cast<const T*>(&u[x]);                            \
                            if (c0 + x * VEC < hd)                                                      \
                                _Pragma("unroll") for (int e = 0; e < VEC; ++e)                         \
                                    a += qs[c0 + x * VEC + e] * to_float(ut[e]);                        \
                        }                                                                               \
                    }                                                                                   \
                } else {                                                                                \
                    for (int c = 0; c < hd; ++c) a += qs[c] * to_float(kr[c]);                          \
                }                                                                                       \
                d = a * scale;                                                                          \
            }                                                                                           \
            const float mn = fmaxf(m, warp_max(d));                                                     \
            const float corr = expf(m - mn), p = j < hi ? expf(d - mn) : 0.f;                           \
            s = s * corr + warp_sum(p);                                                                 \
            _Pragma("unroll") for (int i = 0; i < 8; ++i) acc[i] *= corr;                               \
            const int cnt = min(32, hi - j0);                                                           \
            /* V rows 8 keys at a time: all their loads issued before the accumulation */               \
            for (int jj0 = 0; jj0 < cnt; jj0 += 8) {                                                    \
                T vv[8][8];                                                                             \
                _Pragma("unroll") for (int u = 0; u < 8; ++u) {                                         \
                    const T* vr = vb + (int64_t)(j0 + jj0 + u) * hd;                                    \
                    _Pragma("unroll") for (int i = 0; i < 8; ++i) {                                     \
                        const int c = lane + 32 * i;                                                    \
                        vv[u][i] = (jj0 + u < cnt && c < hd) ? vr[c] : from_float<T>(0.f);              \
                    }                                                                                   \
                }                                                                                       \
                _Pragma("unroll") for (int u = 0; u < 8; ++u) {                                         \
                    const float pj = __shfl_sync(0xffffffffu, p, (jj0 + u) & 31);                       \
                    _Pragma("unroll") for (int i = 0; i < 8; ++i) acc[i] += pj * to_float(vv[u][i]);    \
                }                                                                                       \
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
        } else {                                                                                        \
            float z = 0.f;                                                                              \
            _Pragma("unroll") for (int w = 0; w < 4; ++w) z += wm[w] == NEG_INF ? 0.f : ws[w] * expf(wm[w] - gm); \
            for (int c = threadIdx.x; c < hd; c += blockDim.x) {                                        \
                float a = 0.f;                                                                          \
                _Pragma("unroll") for (int w = 0; w < 4; ++w)                                           \
                    if (wm[w] != NEG_INF) a += wacc[w][c] * expf(wm[w] - gm);                           \
                o[c] = a;                                                                               \
            }                                                                                           \
            if (threadIdx.x == 0) { o[hd] = gm; o[hd + 1] = z; }                                        \
        }                                                                                               \
        decode_finish<T>(out, counters, part, splits, hd, bh);                                          \
    }                                                                                                   \
    /* One block per (b, h): decode_combine. */                                                      \
    extern "C" __global__ void attention_decode_combine_##SUFFIX(T* out, const float* part, int splits, int hd) { \
        PDL_ENTRY();                                                                                    \
        decode_combine<T>(out, part + (int64_t)blockIdx.x * splits * (hd + 2), splits, hd, blockIdx.x); \
    }

INSTANTIATE_FLOAT_TYPES(ATTN)

// Decode step after the q/k/v projections. Block (t, hh) takes head hh of token t (q heads, then
// K heads): optional RMSNorm (mode 0 none, 1 per head over hd, 2 over the full q or k width, the
// sum recomputed by each block from the row), each value rounded to T as the rmsnorm kernel
// writes it; rotate-half RoPE at pos[t] (zeros outside the table, pass-through dims past 2·half);
// clip > 0: values clamped to ±clip after the norm (and V's; OLMoE clip_qkv);
// q heads written to qo [n, H, hd]; K heads (and their V) written into the caches [B, hkv, L, hd]
// at (seqs[t], pos[t]) (skipped outside the cache, as kv_write does). hd <= 256.
// Twins: rmsnorm + rope + kv_write (ops/attention.rs). Bytes: (H + 2·hkv)·hd·2·sizeof(T) per token.
#define QK_ROPE_KV(SUFFIX, T)                                                                           \
    extern "C" __global__ void qk_rope_kv_##SUFFIX(T* qo, T* kc, T* vc, const T* q, const T* k,        \
                                                   const T* v, const T* qw, const T* kw, int mode,      \
                                                   float eps, float clip, const float* cos_t,           \
                                                   const float* sin_t,                                  \
                                                   const int* pos, const int* seqs, int H, int hkv,     \
                                                   int hd, int half, int max_pos, int L, int B) {       \
        PDL_ENTRY();                                                                                    \
        __shared__ float xs[256];                                                                       \
        __shared__ float scratch[32];                                                                   \
        const int64_t t = blockIdx.x;                                                                   \
        const int hh = blockIdx.y;                                                                      \
        const bool isq = hh < H;                                                                        \
        const int kh = hh - H, width = isq ? H * hd : hkv * hd;                                         \
        const T* row = isq ? q + t * width : k + t * width;                                             \
        const int head = isq ? hh : kh;                                                                 \
        for (int c = threadIdx.x; c < hd; c += blockDim.x) xs[c] = to_float(row[(int64_t)head * hd + c]); \
        if (mode != 0) {                                                                                \
            float ss = 0.f;                                                                             \
            const int span = mode == 1 ? hd : width;                                                    \
            const T* base = mode == 1 ? row + (int64_t)head * hd : row;                                 \
            for (int i = threadIdx.x; i < span; i += blockDim.x) { float x = to_float(base[i]); ss += x * x; } \
            ss = block_sum(ss, scratch);                                                                \
            const float r = rsqrtf(ss / span + eps);                                                    \
            const T* w = (isq ? qw : kw) + (mode == 1 ? 0 : (int64_t)head * hd);                        \
            for (int c = threadIdx.x; c < hd; c += blockDim.x)                                          \
                xs[c] = to_float(from_float<T>(xs[c] * r * to_float(w[c])));                            \
        }                                                                                               \
        if (clip > 0.f)                                                                                 \
            for (int c = threadIdx.x; c < hd; c += blockDim.x)                                          \
                xs[c] = xs[c] > clip ? clip : (xs[c] < -clip ? -clip : xs[c]);                          \
        __syncthreads();                                                                                \
        const int p = pos[t], b = seqs[t];                                                              \
        const bool in_table = p >= 0 && p < max_pos;                                                    \
        const bool in_cache = b >= 0 && b < B && p >= 0 && p < L;                                       \
        T* dst = isq ? qo + (t * H + hh) * hd                                                           \
                     : (in_cache ? kc + (((int64_t)b * hkv + kh) * L + p) * hd : nullptr);              \
        if (dst) {                                                                                      \
            for (int i = threadIdx.x; i < half; i += blockDim.x) {                                      \
                const float a = xs[i], bb = xs[i + half];                                               \
                float o1 = 0.f, o2 = 0.f;                                                               \
                if (in_table) {                                                                         \
                    const float c = cos_t[(int64_t)p * half + i], sn = sin_t[(int64_t)p * half + i];    \
                    o1 = a * c - bb * sn;                                                               \
                    o2 = bb * c + a * sn;                                                               \
                }                                                                                       \
                dst[i] = from_float<T>(o1);                                                             \
                dst[i + half] = from_float<T>(o2);                                                      \
            }                                                                                           \
            for (int c = 2 * half + threadIdx.x; c < hd; c += blockDim.x) dst[c] = from_float<T>(xs[c]); \
        }                                                                                               \
        if (!isq && in_cache)                                                                           \
            for (int c = threadIdx.x; c < hd; c += blockDim.x) {                                        \
                const T x = v[t * width + (int64_t)kh * hd + c];                                        \
                const float f = to_float(x);                                                            \
                vc[(((int64_t)b * hkv + kh) * L + p) * hd + c] =                                        \
                    clip > 0.f && (f > clip || f < -clip) ? from_float<T>(f > 0.f ? clip : -clip) : x;  \
            }                                                                                           \
    }

INSTANTIATE_FLOAT_TYPES(QK_ROPE_KV)

// The decode step's q/k work folded into the attention kernel (attention_decode_rope_h128): q, k,
// v are the raw projections [B, H·128], [B, hkv·128] of token b = sequence b, normed (mode 0
// none, 1 per head, 2 over the full q or k width), clipped and rotated as qk_rope_kv does, each
// value rounded to T alike.
template <typename T> struct DecodeRope {
    const T* k;
    const T* v;
    const T* qw;
    const T* kw;
    int mode;
    float eps;
    float clip;
    const float* cos_t;
    const float* sin_t;
    const int* pos;
    int half;
    int max_pos;
};
// Head `head` of `row` (width values) through the norm, the clip and RoPE at position p: thread
// c (of 128) returns element c, rounded to T. xs is 128 floats of shared scratch.
template <typename T>
__device__ __forceinline__ float head_norm_rope(const T* row, int width, int head, const T* w,
                                                const DecodeRope<T>& r, int p, float* xs, float* scratch) {
    constexpr int HD = 128;
    const int c = threadIdx.x;
    // The norm weight and the RoPE table entries loaded beside the row, not after the reductions
    // (loads do not move across their barriers).
    const bool in_table = p >= 0 && p < r.max_pos;
    const float wv = r.mode != 0 ? to_float(w[(r.mode == 1 ? 0 : (int64_t)head * HD) + c]) : 0.f;
    const int ih = c < r.half ? c : c - r.half;
    const bool rot = c < 2 * r.half && in_table;
    const float cs = rot ? r.cos_t[(int64_t)p * r.half + ih] : 0.f;
    const float sn = rot ? r.sin_t[(int64_t)p * r.half + ih] : 0.f;
    float x = to_float(row[(int64_t)head * HD + c]);
    if (r.mode != 0) {
        float ss = 0.f;
        if (r.mode == 1) {
            ss = x * x;
        } else {
            for (int i = c; i < width; i += HD) {
                const float f = to_float(row[i]);
                ss += f * f;
            }
        }
        ss = block_sum(ss, scratch);
        const int span = r.mode == 1 ? HD : width;
        const float rs = rsqrtf(ss / span + r.eps);
        x = to_float(from_float<T>(x * rs * wv));
    }
    if (r.clip > 0.f) x = x > r.clip ? r.clip : (x < -r.clip ? -r.clip : x);
    __syncthreads();
    xs[c] = x;
    __syncthreads();
    float o = x;
    if (c < 2 * r.half) {
        const float a = xs[ih], bb = xs[ih + r.half];
        o = !in_table ? 0.f : (c < r.half ? a * cs - bb * sn : bb * cs + a * sn);
    }
    return to_float(from_float<T>(o));
}

// attention_decode for head_dim 128 and 16-bit types (the common case), same contract and
// partials. Every load of a warp's 32 keys is issued before any arithmetic — one memory round
// trip per 32 keys instead of one per 8-key batch: lane j loads key j's row (16 × 16 bytes) and
// 16 pieces of V, lane l taking dims 8·(l % 16) .. +8 of the rows whose parity is l / 16; after
// the online-softmax update each lane accumulates its 8 dims over its 16 rows, and the two row
// parities are summed with one shuffle.
// ROPE: q is the raw projection and the block does qk_rope_kv's work first (DecodeRope).
template <typename T, bool ROPE>
__device__ __forceinline__ void attention_decode_h128(float* part, const T* q, const T* kc, const T* vc,
                                                      const int* lens, int H, int hkv, int L, float scale,
                                                      int window, T* out, int* counters,
                                                      DecodeRope<T> rope) {
    PDL_ENTRY();
    constexpr int HD = 128;
    __shared__ float qs[HD];
    __shared__ float wm[4], ws[4];
    __shared__ float wacc[4][HD];
    const int bh = blockIdx.x, sp = blockIdx.y, b = bh / H, h = bh % H;
    const int kvh = h / (H / hkv);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int len_b = lens[b];  // loaded beside the prologue's, not after its barriers
    if (ROPE) {
        __shared__ float xs[HD], scratch[32];
        const int p = rope.pos[b];
        qs[threadIdx.x] = head_norm_rope<T>(q + (int64_t)b * H * HD, H * HD, h, rope.qw, rope, p, xs, scratch);
        // The blocks whose key range holds the new position write its K and V rows (the q heads
        // of one KV head write the same values) before reading them below.
        if (p >= 0 && p < L && p / DECODE_CHUNK == sp) {
            const float kx =
                head_norm_rope<T>(rope.k + (int64_t)b * hkv * HD, hkv * HD, kvh, rope.kw, rope, p, xs, scratch);
            const int64_t o = (((int64_t)b * hkv + kvh) * L + p) * HD + threadIdx.x;
            const_cast<T*>(kc)[o] = from_float<T>(kx);
            const T vx = rope.v[((int64_t)b * hkv + kvh) * HD + threadIdx.x];
            const float f = to_float(vx);
            const_cast<T*>(vc)[o] = rope.clip > 0.f && (f > rope.clip || f < -rope.clip)
                                        ? from_float<T>(f > 0.f ? rope.clip : -rope.clip)
                                        : vx;
        }
    } else {
        qs[threadIdx.x] = to_float(q[(int64_t)bh * HD + threadIdx.x]);
    }
    __syncthreads();
    const int n = min(len_b, L);
    const int first = window > 0 ? max(0, n - window) : 0;
    const int lo = max(first, sp * DECODE_CHUNK), hi = min(n, (sp + 1) * DECODE_CHUNK);
    const T* kb = kc + ((int64_t)b * hkv + kvh) * L * HD;
    const T* vb = vc + ((int64_t)b * hkv + kvh) * L * HD;
    const int par = lane >> 4, c8 = (lane & 15) * 8;
    float m = NEG_INF, s = 0.f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int j0 = lo + 32 * warp; j0 < hi; j0 += 128) {
        const int j = j0 + lane;
        const bool kok = j < hi;
        const uint4* kr = reinterpret_cast<const uint4*>(kb + (int64_t)(kok ? j : j0) * HD);
        uint4 ku[16], vu[16];
#pragma unroll
        for (int x = 0; x < 16; ++x) ku[x] = ld_stream(kr + x);
#pragma unroll
        for (int i = 0; i < 16; ++i)  // rows past hi read row hi − 1 (written) and get p = 0
            vu[i] = ld_stream(reinterpret_cast<const uint4*>(vb + (int64_t)min(j0 + 2 * i + par, hi - 1) * HD + c8));
        float a = 0.f;
#pragma unroll
        for (int x = 0; x < 16; ++x) {
            const T* kt = reinterpret_cast<const T*>(&ku[x]);
#pragma unroll
            for (int e = 0; e < 8; ++e) a += qs[8 * x + e] * to_float(kt[e]);
        }
        const float d = kok ? a * scale : NEG_INF;
        const float mn = fmaxf(m, warp_max(d));  // lane 0's key is valid: mn is finite
        const float corr = expf(m - mn), p = kok ? expf(d - mn) : 0.f;
        s = s * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] *= corr;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const float pj = __shfl_sync(0xffffffffu, p, 2 * i + par);
            const T* vt = reinterpret_cast<const T*>(&vu[i]);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += pj * to_float(vt[e]);
        }
        m = mn;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], 16);
    if (lane == 0) {
        wm[warp] = m;
        ws[warp] = s;
    }
    if (lane < 16)
#pragma unroll
        for (int e = 0; e < 8; ++e) wacc[warp][c8 + e] = acc[e];
    __syncthreads();
    const float gm = fmaxf(fmaxf(wm[0], wm[1]), fmaxf(wm[2], wm[3]));
    float* o = part + ((int64_t)bh * gridDim.y + sp) * (HD + 2);
    if (gm == NEG_INF) {
        if (threadIdx.x == 0) {
            o[HD] = NEG_INF;
            o[HD + 1] = 0.f;
        }
    } else {
        float z = 0.f, a = 0.f;
#pragma unroll
        for (int w = 0; w < 4; ++w)
            if (wm[w] != NEG_INF) {
                const float f = expf(wm[w] - gm);
                z += ws[w] * f;
                a += wacc[w][threadIdx.x] * f;
            }
        o[threadIdx.x] = a;
        if (threadIdx.x == 0) {
            o[HD] = gm;
            o[HD + 1] = z;
        }
    }
    decode_finish<T>(out, counters, part, gridDim.y, HD, bh);
}
#define ATTN_H128(SUFFIX, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(128) attention_decode_h128_##SUFFIX(                   \
        float* part, const T* q, const T* kc, const T* vc, const int* lens, int H, int hkv, int L,       \
        int hd, float scale, int window, T* out, int* counters) {                                        \
        attention_decode_h128<T, false>(part, q, kc, vc, lens, H, hkv, L, scale, window, out,            \
                                        counters, DecodeRope<T>{});                                     \
    }                                                                                                   \
    /* q [B, H·128] raw, k/v raw projections; K/V of the new token written into kc/vc at pos[b]. */    \
    extern "C" __global__ void __launch_bounds__(128) attention_decode_rope_h128_##SUFFIX(              \
        float* part, const T* q, T* kc, T* vc, const int* lens, int H, int hkv, int L, int hd,           \
        float scale, int window, T* out, int* counters, const T* k, const T* v, const T* qw,             \
        const T* kw, int mode, float eps, float clip, const float* cos_t, const float* sin_t,            \
        const int* pos, int half, int max_pos) {                                                         \
        attention_decode_h128<T, true>(part, q, kc, vc, lens, H, hkv, L, scale, window, out,             \
                                       counters,                                                        \
                                       DecodeRope<T>{k, v, qw, kw, mode, eps, clip, cos_t, sin_t, pos,   \
                                                     half, max_pos});                                   \
    }
ATTN_H128(bf16, bf16_t)
ATTN_H128(f16, f16_t)
