// MoE dispatch / combine; CPU twins in src/moe/dispatch.rs. Slots are slot-major: f = j·T + t.
// Bytes: the combine reads k rows of d per token and writes one (k·d + d elements per token).

// [E+1] exclusive prefix sums of counts [E]; one block of 1024 threads, tile by tile.
extern "C" __global__ void offsets_from_counts(int* off, const int* counts, int E) {
    __shared__ int wsum[32];
    __shared__ int carry;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    for (int t0 = 0; t0 < E; t0 += blockDim.x) {
        int i = t0 + threadIdx.x;
        int v = i < E ? counts[i] : 0, x = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) { int y = __shfl_up_sync(0xffffffffu, x, o); if (lane >= o) x += y; }
        if (lane == 31) wsum[warp] = x;
        __syncthreads();
        if (warp == 0) {
            int s = wsum[lane];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) { int y = __shfl_up_sync(0xffffffffu, s, o); if (lane >= o) s += y; }
            wsum[lane] = s;
        }
        __syncthreads();
        int before = carry + (warp > 0 ? wsum[warp - 1] : 0) + x - v;
        if (i < E) off[i] = before;
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) carry = before + v;
        __syncthreads();
    }
    if (threadIdx.x == 0) off[E] = carry;
}

// ids_o[j·T + π(t)] = ids[j·T + t]
extern "C" __global__ void permute_slots(int* out, const int* ids, const int* pi, int T, int n) {
    int f = blockIdx.x * blockDim.x + threadIdx.x;
    if (f >= n) return;
    int j = f / T, t = f - j * T;
    out[j * T + pi[t]] = ids[f];
}

// For each priority-ordered row p: rank within its expert; slots at rank >= cap are dropped (−1).
// Writes in the original slot order (π⁻¹ maps priority positions back; null = identity).
extern "C" __global__ void capacity_mask(int* out, const int* ids_o, const int* perm_o, const int* offs_o,
                                         const int* pi_inv, int cap, int T, int n) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n) return;
    int o = perm_o[p];
    int e = ids_o[o];
    int f = pi_inv ? (o / T) * T + pi_inv[o % T] : o;
    if (e < 0) { out[f] = -1; return; }
    out[f] = (p - offs_o[e]) < cap ? e : -1;
}

// pos[perm[p]] = p and tok[p] = perm[p] % T for the kept rows p < offsets[E]; −1 otherwise.
extern "C" __global__ void perm_maps(int* pos, int* tok, const int* perm, const int* offsets, int E, int T, int n) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n) return;
    int f = perm[p];
    bool valid = p < offsets[E];
    pos[f] = valid ? p : -1;
    tok[p] = valid ? f % T : -1;
}

// The whole dropless plan in one block for small n = k·T (decode): counts [E], offsets [E+1],
// perm [n] (stable by expert, ids outside 0..E last in slot order), pos [n] and tok [n] exactly as
// histogram + argsort_stable + offsets_from_counts + perm_maps give them. Shared memory: ids [n]
// and E+1 bins. Each slot's rank among equal ids before it is counted directly (n <= 1024).
extern "C" __global__ void dispatch_small(int* counts, int* offsets, int* perm, int* pos, int* tok,
                                          const int* ids, int E, int T, int n) {
    extern __shared__ int sm[];
    int* key = sm;           // [n]
    int* bins = sm + n;      // [E + 1] counts, then starts
    for (int i = threadIdx.x; i <= E; i += blockDim.x) bins[i] = 0;
    __syncthreads();
    for (int f = threadIdx.x; f < n; f += blockDim.x) {
        int e = ids[f];
        int kk = (e >= 0 && e < E) ? e : E;
        key[f] = kk;
        atomicAdd(&bins[kk], 1);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < E; i += blockDim.x) counts[i] = bins[i];
    __syncthreads();
    // Exclusive scan of E + 1 bins by warp 0: each lane sums a contiguous run, then a shuffle scan.
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x, nb = E + 1, per = (nb + 31) / 32;
        int lo = min(lane * per, nb), hi = min(lo + per, nb), s = 0;
        for (int i = lo; i < hi; ++i) s += bins[i];
        int x = s;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) { int y = __shfl_up_sync(0xffffffffu, x, o); if (lane >= o) x += y; }
        int run = x - s;
        for (int i = lo; i < hi; ++i) { int c = bins[i]; bins[i] = run; run += c; }
    }
    __syncthreads();
    for (int i = threadIdx.x; i <= E; i += blockDim.x) offsets[i] = bins[i];
    const int valid = bins[E];
    for (int f = threadIdx.x; f < n; f += blockDim.x) {
        int kk = key[f], rank = 0;
        for (int g = 0; g < f; ++g) rank += key[g] == kk;
        int p = bins[kk] + rank;
        perm[p] = f;
        bool ok = p < valid;
        pos[f] = ok ? p : -1;
        tok[p] = ok ? f % T : -1;
    }
}

// Row of expert g for row r: the largest g with offsets[g] <= r (binary search over E+1).
__device__ __forceinline__ int group_of(const int* offsets, int E, int r) {
    int lo = 0, hi = E;  // offsets[lo] <= r < offsets[hi]
    while (hi - lo > 1) {
        int mid = (lo + hi) >> 1;
        if (offsets[mid] <= r) lo = mid; else hi = mid;
    }
    return lo;
}

// combine / uncombine moving 8 elements per thread (d a multiple of 8, 16-byte aligned rows).
#define DISPATCH_V8(SUFFIX, T_)                                                                         \
    extern "C" __global__ void combine_v8_##SUFFIX(T_* y, const T_* yp, const int* pos, const float* w, int T, \
                                                   int k, int d) {                                      \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        const int d8 = d >> 3;                                                                          \
        if (i >= (int64_t)T * d8) return;                                                               \
        const int t = i / d8, c = (int)(i - (int64_t)t * d8) << 3;                                      \
        float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};                                          \
        for (int j = 0; j < k; ++j) {                                                                   \
            const int p = pos[j * T + t];                                                               \
            if (p < 0) continue;                                                                        \
            const float wj = w ? w[j * T + t] : 1.f;                                                    \
            float v[8];                                                                                 \
            load8(yp + (int64_t)p * d + c, v);                                                          \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) s[q] += wj * v[q];                            \
        }                                                                                               \
        store8(y + (int64_t)t * d + c, s);                                                              \
    }                                                                                                   \
    extern "C" __global__ void uncombine_v8_##SUFFIX(T_* dyp, const T_* dy, const int* perm, const int* tok, \
                                                     const float* w, int n, int d) {                    \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        const int d8 = d >> 3;                                                                          \
        if (i >= (int64_t)n * d8) return;                                                               \
        const int p = i / d8, c = (int)(i - (int64_t)p * d8) << 3;                                      \
        const int t = tok[p];                                                                           \
        if (t < 0) {                                                                                    \
            zero8(dyp + (int64_t)p * d + c);                                                            \
            return;                                                                                     \
        }                                                                                               \
        const float s = w[perm[p]];                                                                     \
        float v[8];                                                                                     \
        load8(dy + (int64_t)t * d + c, v);                                                              \
        _Pragma("unroll") for (int q = 0; q < 8; ++q) v[q] *= s;                                        \
        store8(dyp + (int64_t)p * d + c, v);                                                            \
    }                                                                                                   \
    /* uncombine_v8 and combine_dw in one pass over the expert-order rows (dy read once): one       \
       warp per row p; dw of dropped slots (no row) is left as it was (zeroed by the caller). */    \
    extern "C" __global__ void uncombine_dw_v8_##SUFFIX(T_* dyp, float* dw, const T_* dy, const T_* yp,   \
                                                        const int* perm, const int* tok, const float* w, \
                                                        int n, int d) {                                 \
        const int64_t p = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;                        \
        const int lane = threadIdx.x & 31;                                                              \
        if (p >= n) return;                                                                             \
        const int t = tok[p];                                                                           \
        if (t < 0) {                                                                                    \
            for (int c = lane * 8; c < d; c += 256) zero8(dyp + p * d + c);                             \
            return;                                                                                     \
        }                                                                                               \
        const int f = perm[p];                                                                          \
        const float sc = w[f];                                                                          \
        float s = 0.f;                                                                                  \
        for (int c = lane * 8; c < d; c += 256) {                                                       \
            float a[8], b[8];                                                                           \
            load8(dy + (int64_t)t * d + c, a);                                                          \
            load8(yp + p * d + c, b);                                                                   \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) {                                             \
                s += a[q] * b[q];                                                                       \
                a[q] *= sc;                                                                             \
            }                                                                                           \
            store8(dyp + p * d + c, a);                                                                 \
        }                                                                                               \
        s = warp_sum(s);                                                                                \
        if (lane == 0) dw[f] = s;                                                                       \
    }
INSTANTIATE_FLOAT_TYPES(DISPATCH_V8)

#define DISPATCH(SUFFIX, T_)                                                                            \
    /* y[t, c] = Σ_j w[j,t] · yp[pos[j,t], c]; w null = 1. One thread per output element. */            \
    extern "C" __global__ void combine_##SUFFIX(T_* y, const T_* yp, const int* pos, const float* w, int T, \
                                                int k, int d) {                                         \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= (int64_t)T * d) return;                                                                \
        int t = i / d, c = i - (int64_t)t * d;                                                          \
        float s = 0.f;                                                                                  \
        for (int j = 0; j < k; ++j) {                                                                   \
            int p = pos[j * T + t];                                                                     \
            if (p >= 0) s += (w ? w[j * T + t] : 1.f) * to_float(yp[(int64_t)p * d + c]);              \
        }                                                                                               \
        y[i] = from_float<T_>(s);                                                                       \
    }                                                                                                   \
    /* dyp[p, c] = w[perm[p]] · dy[tok[p], c] (0 past the kept rows). */                               \
    extern "C" __global__ void uncombine_##SUFFIX(T_* dyp, const T_* dy, const int* perm, const int* tok, \
                                                  const float* w, int n, int d) {                       \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= (int64_t)n * d) return;                                                                \
        int p = i / d, c = i - (int64_t)p * d;                                                          \
        int t = tok[p];                                                                                 \
        dyp[i] = t < 0 ? from_float<T_>(0.f) : from_float<T_>(w[perm[p]] * to_float(dy[(int64_t)t * d + c])); \
    }                                                                                                   \
    /* dw[f] = <dy[f % T], yp[pos[f]]>; one warp per slot. */                                          \
    extern "C" __global__ void combine_dw_##SUFFIX(float* dw, const T_* dy, const T_* yp, const int* pos, int T, \
                                                   int n, int d) {                                      \
        int64_t gw = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;                             \
        int lane = threadIdx.x & 31;                                                                    \
        if (gw >= n) return;                                                                            \
        int f = gw, p = pos[f], t = f % T;                                                              \
        float s = 0.f;                                                                                  \
        if (p >= 0)                                                                                     \
            for (int c = lane; c < d; c += 32) s += to_float(dy[(int64_t)t * d + c]) * to_float(yp[(int64_t)p * d + c]); \
        s = warp_sum(s);                                                                                \
        if (lane == 0) dw[f] = s;                                                                       \
    }                                                                                                   \
    extern "C" __global__ void add_group_bias_##SUFFIX(T_* h, const T_* b, const int* offsets, int E, int n, \
                                                       int C) {                                         \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= (int64_t)n * C) return;                                                                \
        int r = i / C, c = i - (int64_t)r * C;                                                          \
        if (r >= offsets[E]) return;                                                                    \
        int g = group_of(offsets, E, r);                                                                \
        h[i] = from_float<T_>(to_float(h[i]) + to_float(b[(int64_t)g * C + c]));                        \
    }                                                                                                   \
    /* db[g, c] = Σ rows of group g; block (32 columns × 8 row lanes), grid (column tiles, E). */      \
    extern "C" __global__ void group_bias_grad_##SUFFIX(float* db, const T_* dh, const int* offsets, int C) { \
        __shared__ float acc[8][33];                                                                    \
        int g = blockIdx.y, c = blockIdx.x * 32 + threadIdx.x;                                          \
        float s = 0.f;                                                                                  \
        if (c < C)                                                                                      \
            for (int r = offsets[g] + threadIdx.y; r < offsets[g + 1]; r += 8) s += to_float(dh[(int64_t)r * C + c]); \
        acc[threadIdx.y][threadIdx.x] = s;                                                              \
        __syncthreads();                                                                                \
        if (threadIdx.y == 0 && c < C) {                                                                \
            float t = 0.f;                                                                              \
            for (int j = 0; j < 8; ++j) t += acc[j][threadIdx.x];                                       \
            db[(int64_t)g * C + c] = t;                                                                 \
        }                                                                                               \
    }

INSTANTIATE_FLOAT_TYPES(DISPATCH)
