// Elementwise kernels; twins in ops/elementwise.rs. All are grid-stride loops over n elements and
// memory-bound: bytes = n × (inputs read + outputs written) × sizeof(T), FLOPs negligible.

__device__ __forceinline__ float act_f(float x, int act) {
    if (act == 0) return x / (1.f + expf(-x));
    if (act == 1) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    if (act == 3) return 1.f / (1.f + expf(-x));
    float u = 0.7978845608f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + tanhf(u));
}

__device__ __forceinline__ float act_df(float x, int act) {
    if (act == 0) {
        float s = 1.f / (1.f + expf(-x));
        return s * (1.f + x * (1.f - s));
    }
    if (act == 1) {
        float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
        return cdf + x * expf(-0.5f * x * x) * 0.3989422804f;
    }
    if (act == 3) {
        float s = 1.f / (1.f + expf(-x));
        return s * (1.f - s);
    }
    float u = 0.7978845608f * (x + 0.044715f * x * x * x);
    float t = tanhf(u);
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * 0.7978845608f * (1.f + 3.f * 0.044715f * x * x);
}

#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

#define ELEMENTWISE(SUFFIX, T)                                                                              \
    extern "C" __global__ void binary_##SUFFIX(T* out, const T* a, const T* b, int64_t n, int op) {        \
        GRID_STRIDE(i, n) {                                                                                 \
            float x = to_float(a[i]), y = to_float(b[i]);                                                   \
            out[i] = from_float<T>(op == 0 ? x + y : x * y);                                                \
        }                                                                                                   \
    }                                                                                                       \
    extern "C" __global__ void scale_##SUFFIX(T* x, int64_t n, float s) {                                   \
        GRID_STRIDE(i, n) x[i] = from_float<T>(to_float(x[i]) * s);                                         \
    }                                                                                                       \
    /* x = clamp(x, -c, c) in place; NaN stays NaN (as torch.clamp) */                                   \
    extern "C" __global__ void clamp_##SUFFIX(T* x, int64_t n, float c) {                                   \
        GRID_STRIDE(i, n) {                                                                                 \
            const float v = to_float(x[i]);                                                                 \
            if (v > c) x[i] = from_float<T>(c);                                                             \
            else if (v < -c) x[i] = from_float<T>(-c);                                                      \
        }                                                                                                   \
    }                                                                                                       \
    extern "C" __global__ void add_bias_##SUFFIX(T* out, const T* x, const T* b, int64_t n, int cols) {    \
        GRID_STRIDE(i, n) out[i] = from_float<T>(to_float(x[i]) + to_float(b[i % cols]));                   \
    }                                                                                                       \
    extern "C" __global__ void act_fwd_##SUFFIX(T* out, const T* x, int64_t n, int act) {                   \
        GRID_STRIDE(i, n) out[i] = from_float<T>(act_f(to_float(x[i]), act));                              \
    }                                                                                                       \
    extern "C" __global__ void act_bwd_##SUFFIX(T* dx, const T* x, const T* dy, int64_t n, int act) {       \
        GRID_STRIDE(i, n) dx[i] = from_float<T>(to_float(dy[i]) * act_df(to_float(x[i]), act));             \
    }                                                                                                       \
    extern "C" __global__ void scale_rows_##SUFFIX(T* out, const T* x, const float* s, int64_t n, int cols) { \
        GRID_STRIDE(i, n) out[i] = from_float<T>(to_float(x[i]) * s[i / cols]);                            \
    }                                                                                                   \
    /* one warp per row */                                                                              \
    extern "C" __global__ void row_dot_##SUFFIX(float* out, const T* a, const T* b, int rows, int cols) { \
        int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;                              \
        int lane = threadIdx.x & 31;                                                                    \
        if (w >= rows) return;                                                                          \
        float s = 0.f;                                                                                  \
        for (int c = lane; c < cols; c += 32) s += to_float(a[w * cols + c]) * to_float(b[w * cols + c]); \
        s = warp_sum(s);                                                                                \
        if (lane == 0) out[w] = s;                                                                      \
    }                                                                                                   \
    /* gu: [rows, 2F] = [gate | up]; h: [rows, F]. n = rows * F. */                                        \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(T* h, const T* gu, int64_t n, int f) {                   \
        GRID_STRIDE(i, n) {                                                                                 \
            int64_t r = i / f, c = i - r * f;                                                               \
            float g = to_float(gu[r * 2 * f + c]), u = to_float(gu[r * 2 * f + f + c]);                     \
            h[i] = from_float<T>(act_f(g, 0) * u);                                                          \
        }                                                                                                   \
    }                                                                                                       \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(T* dgu, const T* gu, const T* dh, int64_t n, int f) {    \
        GRID_STRIDE(i, n) {                                                                                 \
            int64_t r = i / f, c = i - r * f;                                                               \
            float g = to_float(gu[r * 2 * f + c]), u = to_float(gu[r * 2 * f + f + c]);                     \
            float d = to_float(dh[i]);                                                                      \
            dgu[r * 2 * f + c] = from_float<T>(d * u * act_df(g, 0));                                       \
            dgu[r * 2 * f + f + c] = from_float<T>(d * act_f(g, 0));                                        \
        }                                                                                                   \
    }

INSTANTIATE_FLOAT_TYPES(ELEMENTWISE)

// SwiGLU moving 8 elements per thread (f a multiple of 8, 16-byte aligned); n8 = rows · f / 8.
#define SWIGLU_V8(SUFFIX, T)                                                                                \
    extern "C" __global__ void swiglu_fwd_v8_##SUFFIX(T* h, const T* gu, int64_t n8, int f) {                \
        const int f8 = f >> 3;                                                                              \
        GRID_STRIDE(i, n8) {                                                                                \
            const int64_t r = i / f8;                                                                       \
            const int c = (int)(i - r * f8) << 3;                                                           \
            float g[8], u[8], o[8];                                                                         \
            load8(gu + r * 2 * f + c, g);                                                                   \
            load8(gu + r * 2 * f + f + c, u);                                                               \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) o[q] = act_f(g[q], 0) * u[q];                     \
            store8(h + r * f + c, o);                                                                       \
        }                                                                                                   \
    }                                                                                                       \
    extern "C" __global__ void swiglu_bwd_v8_##SUFFIX(T* dgu, const T* gu, const T* dh, int64_t n8, int f) { \
        const int f8 = f >> 3;                                                                              \
        GRID_STRIDE(i, n8) {                                                                                \
            const int64_t r = i / f8;                                                                       \
            const int c = (int)(i - r * f8) << 3;                                                           \
            float g[8], u[8], d[8], dg[8], du[8];                                                           \
            load8(gu + r * 2 * f + c, g);                                                                   \
            load8(gu + r * 2 * f + f + c, u);                                                               \
            load8(dh + r * f + c, d);                                                                       \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) {                                                 \
                dg[q] = d[q] * u[q] * act_df(g[q], 0);                                                      \
                du[q] = d[q] * act_f(g[q], 0);                                                              \
            }                                                                                               \
            store8(dgu + r * 2 * f + c, dg);                                                                \
            store8(dgu + r * 2 * f + f + c, du);                                                            \
        }                                                                                                   \
    }
INSTANTIATE_FLOAT_TYPES(SWIGLU_V8)

// binary (add / mul) 8 elements per thread (n a multiple of 8, 16-byte aligned); n8 = n / 8.
#define BINARY_V8(SUFFIX, T)                                                                            \
    extern "C" __global__ void binary_v8_##SUFFIX(T* out, const T* a, const T* b, int64_t n8, int op) { \
        GRID_STRIDE(i, n8) {                                                                            \
            float x[8], y[8];                                                                           \
            load8(a + i * 8, x);                                                                        \
            load8(b + i * 8, y);                                                                        \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) x[q] = op == 0 ? x[q] + y[q] : x[q] * y[q];   \
            store8(out + i * 8, x);                                                                     \
        }                                                                                               \
    }
INSTANTIATE_FLOAT_TYPES(BINARY_V8)

// dst += s * src, with dst's and src's storage types in the name.
#define AXPY(DN, TD, SN, TS)                                                                           \
    extern "C" __global__ void axpy_##DN##_##SN(TD* dst, const TS* src, int64_t n, float s) {         \
        GRID_STRIDE(i, n) dst[i] = from_float<TD>(to_float(dst[i]) + s * to_float(src[i]));           \
    }
// 8 elements per thread (n a multiple of 8, 16-byte aligned); n8 = n / 8.
#define AXPY_V8(DN, TD, SN, TS)                                                                         \
    extern "C" __global__ void axpy_v8_##DN##_##SN(TD* dst, const TS* src, int64_t n8, float s) {      \
        GRID_STRIDE(i, n8) {                                                                            \
            float a[8], b[8];                                                                           \
            load8(dst + i * 8, a);                                                                      \
            load8(src + i * 8, b);                                                                      \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) a[q] += s * b[q];                             \
            store8(dst + i * 8, a);                                                                     \
        }                                                                                               \
    }
AXPY_V8(f32, float, f32, float)
AXPY_V8(f32, float, bf16, bf16_t)
AXPY_V8(f32, float, f16, f16_t)
AXPY_V8(bf16, bf16_t, bf16, bf16_t)
AXPY_V8(f16, f16_t, f16, f16_t)
AXPY(f32, float, f32, float)
AXPY(f32, float, bf16, bf16_t)
AXPY(f32, float, f16, f16_t)
AXPY(bf16, bf16_t, bf16, bf16_t)
AXPY(f16, f16_t, f16, f16_t)
