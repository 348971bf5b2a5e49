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
