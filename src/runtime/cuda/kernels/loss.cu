// Cross-entropy forward/backward; twins in ops/loss.rs. One 1024-thread block per token row.
// The forward uses an online max/sum (one pass) per thread, merged across the block.
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
        float gm = block_max(m, scratch);                                                               \
        float gs = block_sum(m == NEG_INF ? 0.f : s * expf(m - gm), scratch);                           \
        if (threadIdx.x == 0) {                                                                         \
            float lse = gm + logf(gs);                                                                  \
            int y = targets[row];                                                                       \
            lse_out[row] = lse;                                                                         \
            loss[row] = (y == ignore || y < 0 || y >= v) ? 0.f : lse - to_float(lr[y]);                 \
        }                                                                                               \
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
