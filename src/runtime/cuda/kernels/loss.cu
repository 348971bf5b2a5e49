// Cross-entropy forward/backward; twins in ops/loss.rs. One 1024-thread block per token row.
// The forward uses an online max/sum (one pass) per thread, merged across the block.

// Merges the threads' running (max m, sum s of exp(x − m)) into the row's log-sum-exp and writes
// it with the row's loss (0 for an ignored or out-of-range target).
template <typename T>
__device__ __forceinline__ void xent_finish(float* loss, float* lse_out, const T* lr, const int* targets,
                                            int64_t row, int v, int ignore, float m, float s, float* scratch) {
    const float gm = block_max(m, scratch);
    const float gs = block_sum(m == NEG_INF ? 0.f : s * expf(m - gm), scratch);
    if (threadIdx.x == 0) {
        const float lse = gm + logf(gs);
        const int y = targets[row];
        lse_out[row] = lse;
        loss[row] = (y == ignore || y < 0 || y >= v) ? 0.f : lse - to_float(lr[y]);
    }
}

#define XENT(SUFFIX, T)                                                                                 \
    extern "C" __global__ void cross_entropy_fwd_##SUFFIX(float* loss, float* lse_out, const T* logits, \
                                                          const int* targets, int v, int ignore) {      \
        __shared__ float scratch[32];                                                                   \
        const int64_t row = blockIdx.x;                                                                 \
        const T* lr = logits + row * v;                                                                 \
        float m = NEG_INF, s = 0.f;                                                                     \
        for (int i = threadIdx.x; i < v; i += blockDim.x) {                                             \
            float x = to_float(lr[i]);                                                                  \
            if (x > m) { s = s * expf(m - x) + 1.f; m = x; } else { s += expf(x - m); }                 \
        }                                                                                               \
        xent_finish(loss, lse_out, lr, targets, row, v, ignore, m, s, scratch);                         \
    }                                                                                                   \
    extern "C" __global__ void cross_entropy_bwd_##SUFFIX(T* dlogits, const T* logits, const int* targets, \
                                                          const float* lse, int v, int ignore, float scale) { \
        const int64_t row = blockIdx.x;                                                                 \
        const int y = targets[row];                                                                     \
        const bool skip = (y == ignore || y < 0 || y >= v);                                             \
        const float l = lse[row];                                                                       \
        for (int i = threadIdx.x; i < v; i += blockDim.x) {                                             \
            float g = skip ? 0.f : expf(to_float(logits[row * v + i]) - l) * scale;                     \
            if (!skip && i == y) g -= scale;                                                            \
            dlogits[row * v + i] = from_float<T>(g);                                                    \
        }                                                                                               \
    }

INSTANTIATE_FLOAT_TYPES(XENT)

// 8-wide variants (v a multiple of 8, 16-byte aligned rows): each thread reads 16-byte chunks,
// rescales its running sum once per chunk (by the chunk's max) instead of once per element.
#define XENT_V8(SUFFIX, T)                                                                              \
    extern "C" __global__ void cross_entropy_fwd_v8_##SUFFIX(float* loss, float* lse_out, const T* logits, \
                                                             const int* targets, int v, int ignore) {   \
        __shared__ float scratch[32];                                                                   \
        const int64_t row = blockIdx.x;                                                                 \
        const T* lr = logits + row * v;                                                                 \
        float m = NEG_INF, s = 0.f;                                                                     \
        for (int c = threadIdx.x; c < (v >> 3); c += blockDim.x) {                                      \
            float x[8];                                                                                 \
            load8(lr + 8 * c, x);                                                                       \
            float mx = x[0];                                                                            \
            _Pragma("unroll") for (int q = 1; q < 8; ++q) mx = fmaxf(mx, x[q]);                         \
            if (mx == NEG_INF) continue;                                                                \
            if (mx > m) { s *= expf(m - mx); m = mx; }                                                  \
            float t = 0.f;                                                                              \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) t += expf(x[q] - m);                          \
            s += t;                                                                                     \
        }                                                                                               \
        xent_finish(loss, lse_out, lr, targets, row, v, ignore, m, s, scratch);                         \
    }                                                                                                   \
    extern "C" __global__ void cross_entropy_bwd_v8_##SUFFIX(T* dlogits, const T* logits, const int* targets, \
                                                             const float* lse, int v, int ignore, float scale) { \
        const int64_t row = blockIdx.x;                                                                 \
        const int y = targets[row];                                                                     \
        const bool skip = (y == ignore || y < 0 || y >= v);                                             \
        const float l = lse[row];                                                                       \
        for (int c = threadIdx.x; c < (v >> 3); c += blockDim.x) {                                      \
            float g[8];                                                                                 \
            load8(logits + row * v + 8 * c, g);                                                         \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) {                                             \
                g[q] = skip ? 0.f : expf(g[q] - l) * scale;                                             \
                if (!skip && 8 * c + q == y) g[q] -= scale;                                             \
            }                                                                                           \
            store8(dlogits + row * v + 8 * c, g);                                                       \
        }                                                                                               \
    }
INSTANTIATE_FLOAT_TYPES(XENT_V8)
