// RMSNorm forward/backward; twins in ops/norm.rs. One block per row (forward); the backward's
// blocks stride over rows and keep a per-block dw partial in shared memory (cols floats).
// Bytes: forward rows·cols·(2·sizeof(T)) + rows·4; backward rows·cols·(3·sizeof(T)) + partials.

#define NORM(SUFFIX, T)                                                                                 \
    extern "C" __global__ void rmsnorm_fwd_##SUFFIX(T* y, float* rstd, const T* x, const T* w, int cols, \
                                                   float eps) {                                         \
        __shared__ float scratch[32];                                                                   \
        const int64_t row = blockIdx.x;                                                                 \
        const T* xr = x + row * cols;                                                                   \
        float ss = 0.f;                                                                                 \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) { float v = to_float(xr[i]); ss += v * v; } \
        ss = block_sum(ss, scratch);                                                                    \
        float r = rsqrtf(ss / cols + eps);                                                              \
        if (threadIdx.x == 0) rstd[row] = r;                                                            \
        for (int i = threadIdx.x; i < cols; i += blockDim.x)                                            \
            y[row * cols + i] = from_float<T>(to_float(xr[i]) * r * to_float(w[i]));                    \
    }                                                                                                   \
    extern "C" __global__ void rmsnorm_bwd_##SUFFIX(T* dx, float* dw_partial, const T* x, const T* w,   \
                                                   const float* rstd, const T* dy, int rows, int cols,  \
                                                   int acc) {                                           \
        extern __shared__ float dw_acc[];                                                               \
        __shared__ float scratch[32];                                                                   \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) dw_acc[i] = 0.f;                           \
        for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {                                  \
            const T* xr = x + row * cols;                                                               \
            const T* dr = dy + row * cols;                                                              \
            float r = rstd[row];                                                                        \
            float dot = 0.f;                                                                            \
            for (int i = threadIdx.x; i < cols; i += blockDim.x)                                        \
                dot += to_float(xr[i]) * to_float(w[i]) * to_float(dr[i]);                              \
            dot = block_sum(dot, scratch) / cols;                                                       \
            for (int i = threadIdx.x; i < cols; i += blockDim.x) {                                      \
                float xv = to_float(xr[i]), dv = to_float(dr[i]);                                       \
                const float g = r * to_float(w[i]) * dv - xv * r * r * r * dot;                         \
                dx[row * cols + i] = from_float<T>(acc ? to_float(dx[row * cols + i]) + g : g);         \
                dw_acc[i] += dv * xv * r;                                                               \
            }                                                                                           \
        }                                                                                               \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) dw_partial[(int64_t)blockIdx.x * cols + i] = dw_acc[i]; \
    }

INSTANTIATE_FLOAT_TYPES(NORM)

// Register-resident rows (cols a multiple of 8, at most 8·CH·blockDim, 16-byte aligned): thread
// t owns the 8-element chunks t, t + blockDim, ... (CH at most) of every row, so each row is read
// once, and in the backward the dw partial sums of its columns stay in registers. CH is a template
// parameter because the registers are allocated for all CH chunks: with CH = 4 the backward needs
// ~156 registers, one 256-thread block per SM and a single row in flight; rows of at most
// 8·blockDim take the CH = 1 kernels (~40 registers, several blocks per SM).
template <int CH, typename T>
__device__ __forceinline__ void rmsnorm_fwd_v8(T* y, float* rstd, const T* x, const T* w, int cols, float eps) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x;
    const int nch = cols >> 3;
    float v[CH][8];
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int ch = threadIdx.x + c * blockDim.x;
        if (ch >= nch) continue;
        load8(x + row * cols + ch * 8, v[c]);
#pragma unroll
        for (int q = 0; q < 8; ++q) ss += v[c][q] * v[c][q];
    }
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / cols + eps);
    if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int ch = threadIdx.x + c * blockDim.x;
        if (ch >= nch) continue;
        float wv[8];
        load8(w + ch * 8, wv);
#pragma unroll
        for (int q = 0; q < 8; ++q) v[c][q] = v[c][q] * r * wv[q];
        store8(y + row * cols + ch * 8, v[c]);
    }
}

template <int CH, typename T>
__device__ __forceinline__ void rmsnorm_bwd_v8(T* dx, float* dw_partial, const T* x, const T* w, const float* rstd,
                                               const T* dy, int rows, int cols, int acc) {
    __shared__ float scratch[32];
    const int nch = cols >> 3;
    float wv[CH][8], dw[CH][8];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int ch = threadIdx.x + c * blockDim.x;
#pragma unroll
        for (int q = 0; q < 8; ++q) dw[c][q] = 0.f, wv[c][q] = 0.f;
        if (ch < nch) load8(w + ch * 8, wv[c]);
    }
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float r = rstd[row];
        float xv[CH][8], dv[CH][8];
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            const int ch = threadIdx.x + c * blockDim.x;
            if (ch >= nch) continue;
            load8(x + row * cols + ch * 8, xv[c]);
            load8(dy + row * cols + ch * 8, dv[c]);
#pragma unroll
            for (int q = 0; q < 8; ++q) dot += xv[c][q] * wv[c][q] * dv[c][q];
        }
        dot = block_sum(dot, scratch) / cols;
#pragma unroll
        for (int c = 0; c < CH; ++c) {
            const int ch = threadIdx.x + c * blockDim.x;
            if (ch >= nch) continue;
            float o[8];
            if (acc) load8(dx + row * cols + ch * 8, o);
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                const float g = r * wv[c][q] * dv[c][q] - xv[c][q] * r * r * r * dot;
                o[q] = acc ? o[q] + g : g;
                dw[c][q] += dv[c][q] * xv[c][q] * r;
            }
            store8(dx + row * cols + ch * 8, o);
        }
    }
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        const int ch = threadIdx.x + c * blockDim.x;
        if (ch < nch) store8(dw_partial + (int64_t)blockIdx.x * cols + ch * 8, dw[c]);
    }
}

// rmsnorm_{fwd,bwd}_v8_* hold 4 chunks per thread, rmsnorm_{fwd,bwd}_v8c1_* one.
#define NORM_V8(SUFFIX, T)                                                                              \
    extern "C" __global__ void rmsnorm_fwd_v8_##SUFFIX(T* y, float* rstd, const T* x, const T* w, int cols, \
                                                      float eps) {                                      \
        rmsnorm_fwd_v8<4, T>(y, rstd, x, w, cols, eps);                                                 \
    }                                                                                                   \
    extern "C" __global__ void rmsnorm_fwd_v8c1_##SUFFIX(T* y, float* rstd, const T* x, const T* w, int cols, \
                                                        float eps) {                                    \
        rmsnorm_fwd_v8<1, T>(y, rstd, x, w, cols, eps);                                                 \
    }                                                                                                   \
    extern "C" __global__ void rmsnorm_bwd_v8_##SUFFIX(T* dx, float* dw_partial, const T* x, const T* w, \
                                                      const float* rstd, const T* dy, int rows, int cols, int acc) { \
        rmsnorm_bwd_v8<4, T>(dx, dw_partial, x, w, rstd, dy, rows, cols, acc);                               \
    }                                                                                                   \
    extern "C" __global__ void rmsnorm_bwd_v8c1_##SUFFIX(T* dx, float* dw_partial, const T* x, const T* w, \
                                                        const float* rstd, const T* dy, int rows, int cols, int acc) { \
        rmsnorm_bwd_v8<1, T>(dx, dw_partial, x, w, rstd, dy, rows, cols, acc);                               \
    }
INSTANTIATE_FLOAT_TYPES(NORM_V8)

// Backward for short rows (cols <= 256, a multiple of 8: per-head q/k norms): one warp per row,
// lane l owning elements 8l..8l+7, the row's dot product by shuffles (no block barrier per row),
// so 64 warps per SM stream rows. Each warp writes one partial dw row (dw_partial [gridDim.x ·
// warps, cols]), summed afterwards as in rmsnorm_bwd_v8.
#define NORM_W8(SUFFIX, T)                                                                              \
    extern "C" __global__ void rmsnorm_bwd_w8_##SUFFIX(T* dx, float* dw_partial, const T* x, const T* w, \
                                                      const float* rstd, const T* dy, int rows, int cols, \
                                                      int acc) {                                        \
        const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;                                        \
        const int64_t wid = (int64_t)blockIdx.x * nw + (threadIdx.x >> 5);                              \
        const bool on = lane < (cols >> 3);                                                             \
        float wv[8], dw[8];                                                                             \
        _Pragma("unroll") for (int q = 0; q < 8; ++q) dw[q] = 0.f, wv[q] = 0.f;                         \
        if (on) load8(w + lane * 8, wv);                                                                \
        for (int64_t row = wid; row < rows; row += (int64_t)gridDim.x * nw) {                           \
            float xv[8], dv[8], dot = 0.f;                                                              \
            if (on) {                                                                                   \
                load8(x + row * cols + lane * 8, xv);                                                   \
                load8(dy + row * cols + lane * 8, dv);                                                  \
                _Pragma("unroll") for (int q = 0; q < 8; ++q) dot += xv[q] * wv[q] * dv[q];             \
            }                                                                                           \
            dot = warp_sum(dot) / cols;                                                                 \
            const float r = rstd[row];                                                                  \
            if (on) {                                                                                   \
                float o[8];                                                                             \
                if (acc) load8(dx + row * cols + lane * 8, o);                                          \
                _Pragma("unroll") for (int q = 0; q < 8; ++q) {                                         \
                    const float g = r * wv[q] * dv[q] - xv[q] * r * r * r * dot;                        \
                    o[q] = acc ? o[q] + g : g;                                                          \
                    dw[q] += dv[q] * xv[q] * r;                                                         \
                }                                                                                       \
                store8(dx + row * cols + lane * 8, o);                                                  \
            }                                                                                           \
        }                                                                                               \
        if (on) store8(dw_partial + wid * cols + lane * 8, dw);                                         \
    }
INSTANTIATE_FLOAT_TYPES(NORM_W8)

// Forward for the same short rows: one warp per row (grid ceil(rows / warps per block)).
#define NORM_FWD_W8(SUFFIX, T)                                                                          \
    extern "C" __global__ void rmsnorm_fwd_w8_##SUFFIX(T* y, float* rstd, const T* x, const T* w, int rows, \
                                                      int cols, float eps) {                            \
        const int lane = threadIdx.x & 31;                                                              \
        const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);               \
        if (row >= rows) return;                                                                        \
        const bool on = lane < (cols >> 3);                                                             \
        float v[8], ss = 0.f;                                                                           \
        if (on) {                                                                                       \
            load8(x + row * cols + lane * 8, v);                                                        \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) ss += v[q] * v[q];                            \
        }                                                                                               \
        ss = warp_sum(ss);                                                                              \
        const float r = rsqrtf(ss / cols + eps);                                                        \
        if (lane == 0) rstd[row] = r;                                                                   \
        if (on) {                                                                                       \
            float wv[8];                                                                                \
            load8(w + lane * 8, wv);                                                                    \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) v[q] = v[q] * r * wv[q];                      \
            store8(y + row * cols + lane * 8, v);                                                       \
        }                                                                                               \
    }
INSTANTIATE_FLOAT_TYPES(NORM_FWD_W8)

// Residual add + RMSNorm (inference): x += a (rounded to T, as axpy does), then y = rmsnorm(x).
// One block per row. Bytes: rows·cols·(4·sizeof(T)).
#define ADD_NORM(SUFFIX, T)                                                                             \
    extern "C" __global__ void add_rmsnorm_##SUFFIX(T* y, T* x, const T* a, const T* w, int cols,      \
                                                   float eps) {                                         \
        PDL_ENTRY();                                                                                    \
        __shared__ float scratch[32];                                                                   \
        const int64_t row = blockIdx.x;                                                                 \
        T* xr = x + row * cols;                                                                         \
        const T* ar = a + row * cols;                                                                   \
        float ss = 0.f;                                                                                 \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {                                          \
            T s = from_float<T>(to_float(xr[i]) + to_float(ar[i]));                                     \
            xr[i] = s;                                                                                  \
            float v = to_float(s);                                                                      \
            ss += v * v;                                                                                \
        }                                                                                               \
        ss = block_sum(ss, scratch);                                                                    \
        float r = rsqrtf(ss / cols + eps);                                                              \
        for (int i = threadIdx.x; i < cols; i += blockDim.x)                                            \
            y[row * cols + i] = from_float<T>(to_float(xr[i]) * r * to_float(w[i]));                    \
    }

INSTANTIATE_FLOAT_TYPES(ADD_NORM)
