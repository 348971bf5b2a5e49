// Row softmax family; twins in ops/softmax.rs. One block per row; the row is read three times
// (max, sum, write) but stays in L1/L2, so DRAM bytes ≈ rows × cols × (read + write).

// Row r is query position p = offset + r % q_len when q_len > 0; keys after p get probability 0,
// and with window > 0 so do keys j <= p - window.
#define SOFTMAX(SUFFIX, T)                                                                              \
    extern "C" __global__ void softmax_fwd_##SUFFIX(T* out, const T* x, int cols, float scale, int q_len, \
                                                    int offset, int window) {                           \
        __shared__ float scratch[32];                                                                   \
        const int64_t row = blockIdx.x;                                                                 \
        const T* xr = x + row * cols;                                                                   \
        T* orow = out + row * cols;                                                                     \
        int limit = q_len > 0 ? min(cols, offset + (int)(row % q_len) + 1) : cols;                      \
        int first = window > 0 ? min(limit, max(0, offset + (int)(row % q_len) + 1 - window)) : 0;      \
        float m = NEG_INF;                                                                              \
        for (int i = first + threadIdx.x; i < limit; i += blockDim.x) m = fmaxf(m, to_float(xr[i]) * scale); \
        m = block_max(m, scratch);                                                                      \
        float s = 0.f;                                                                                  \
        for (int i = first + threadIdx.x; i < limit; i += blockDim.x) s += expf(to_float(xr[i]) * scale - m); \
        s = block_sum(s, scratch);                                                                      \
        float inv = 1.f / s;                                                                            \
        for (int i = threadIdx.x; i < cols; i += blockDim.x)                                            \
            orow[i] = from_float<T>(i >= first && i < limit ? expf(to_float(xr[i]) * scale - m) * inv : 0.f); \
    }                                                                                                   \
    extern "C" __global__ void softmax_bwd_##SUFFIX(T* dx, const T* y, const T* dy, int cols, float scale) { \
        __shared__ float scratch[32];                                                                   \
        const int64_t row = blockIdx.x;                                                                 \
        const T* yr = y + row * cols;                                                               \
        const T* dr = dy + row * cols;                                                                  \
        float dot = 0.f;                                                                                \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) dot += to_float(yr[i]) * to_float(dr[i]); \
        dot = block_sum(dot, scratch);                                                                  \
        for (int i = threadIdx.x; i < cols; i += blockDim.x)                                            \
            dx[row * cols + i] = from_float<T>(scale * to_float(yr[i]) * (to_float(dr[i]) - dot));      \
    }                                                                                                   \
    extern "C" __global__ void log_softmax_fwd_##SUFFIX(T* out, const T* x, int cols) {                 \
        __shared__ float scratch[32];                                                                   \
        const int64_t row = blockIdx.x;                                                                 \
        const T* xr = x + row * cols;                                                                   \
        float m = NEG_INF;                                                                              \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, to_float(xr[i]));            \
        m = block_max(m, scratch);                                                                      \
        float s = 0.f;                                                                                  \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) s += expf(to_float(xr[i]) - m);           \
        s = block_sum(s, scratch);                                                                      \
        float lse = m + logf(s);                                                                        \
        for (int i = threadIdx.x; i < cols; i += blockDim.x)                                            \
            out[row * cols + i] = from_float<T>(to_float(xr[i]) - lse);                                 \
    }

INSTANTIATE_FLOAT_TYPES(SOFTMAX)

// Register-resident rows (cols a multiple of 8, ≤ 32·blockDim, 16-byte aligned): each thread
// holds up to SM_CH chunks of 8 elements, so the row is read from memory once; masked chunks
// (past the causal limit or before the window) are not read at all.
#define SM_CH 4
#define SOFTMAX_V8(SUFFIX, T)                                                                           \
    extern "C" __global__ void softmax_fwd_v8_##SUFFIX(T* out, const T* x, int cols, float scale, int q_len, \
                                                       int offset, int window) {                        \
        __shared__ float scratch[32];                                                                   \
        const int64_t row = blockIdx.x;                                                                 \
        const T* xr = x + row * cols;                                                                   \
        T* orow = out + row * cols;                                                                     \
        const int limit = q_len > 0 ? min(cols, offset + (int)(row % q_len) + 1) : cols;                \
        const int first = window > 0 ? min(limit, max(0, offset + (int)(row % q_len) + 1 - window)) : 0; \
        const int nch = cols >> 3;                                                                      \
        float v[SM_CH][8];                                                                              \
        float m = NEG_INF;                                                                              \
        _Pragma("unroll") for (int c = 0; c < SM_CH; ++c) {                                             \
            const int ch = threadIdx.x + c * blockDim.x, j0 = ch * 8;                                   \
            const bool any = ch < nch && j0 < limit && j0 + 8 > first;                                  \
            if (any) load8(xr + j0, v[c]);                                                              \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) {                                             \
                const int j = j0 + q;                                                                   \
                v[c][q] = (any && j >= first && j < limit) ? v[c][q] * scale : NEG_INF;                 \
                m = fmaxf(m, v[c][q]);                                                                  \
            }                                                                                           \
        }                                                                                               \
        m = block_max(m, scratch);                                                                      \
        float s = 0.f;                                                                                  \
        _Pragma("unroll") for (int c = 0; c < SM_CH; ++c)                                               \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) {                                             \
                v[c][q] = v[c][q] == NEG_INF ? 0.f : expf(v[c][q] - m);                                 \
                s += v[c][q];                                                                           \
            }                                                                                           \
        s = block_sum(s, scratch);                                                                      \
        const float inv = s > 0.f ? 1.f / s : 0.f; /* every key masked: zeros, as the scalar kernel */   \
        _Pragma("unroll") for (int c = 0; c < SM_CH; ++c) {                                             \
            const int ch = threadIdx.x + c * blockDim.x;                                                \
            if (ch >= nch) continue;                                                                    \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) v[c][q] *= inv;                               \
            store8(orow + ch * 8, v[c]);                                                                \
        }                                                                                               \
    }                                                                                                   \
    extern "C" __global__ void softmax_bwd_v8_##SUFFIX(T* dx, const T* y, const T* dy, int cols, float scale) { \
        __shared__ float scratch[32];                                                                   \
        const int64_t row = blockIdx.x;                                                                 \
        const int nch = cols >> 3;                                                                      \
        float yv[SM_CH][8], dv[SM_CH][8];                                                               \
        float dot = 0.f;                                                                                \
        _Pragma("unroll") for (int c = 0; c < SM_CH; ++c) {                                             \
            const int ch = threadIdx.x + c * blockDim.x;                                                \
            if (ch >= nch) continue;                                                                    \
            load8(y + row * cols + ch * 8, yv[c]);                                                      \
            load8(dy + row * cols + ch * 8, dv[c]);                                                     \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) dot += yv[c][q] * dv[c][q];                   \
        }                                                                                               \
        dot = block_sum(dot, scratch);                                                                  \
        _Pragma("unroll") for (int c = 0; c < SM_CH; ++c) {                                             \
            const int ch = threadIdx.x + c * blockDim.x;                                                \
            if (ch >= nch) continue;                                                                    \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) yv[c][q] = scale * yv[c][q] * (dv[c][q] - dot); \
            store8(dx + row * cols + ch * 8, yv[c]);                                                    \
        }                                                                                               \
    }
INSTANTIATE_FLOAT_TYPES(SOFTMAX_V8)
