// AdamW step on f32 master weights; twin in ops/adamw.rs (same formula, same order of operations).
// copy_kind: 0 none, 1 bf16 copy, 2 f16 copy, 3 f32 copy. Bytes per element: 16 read + 12 written.
#define ADAMW(SUFFIX, TG)                                                                               \
    extern "C" __global__ void adamw_##SUFFIX(float* p, float* m, float* v, const TG* grad, void* copy, \
                                              int copy_kind, int64_t n, float lr, float b1, float b2,   \
                                              float eps, float wd, float step_size, float bc2_sqrt,     \
                                              float grad_scale) {                                       \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;                         \
             i += (int64_t)gridDim.x * blockDim.x) {                                                    \
            float g = to_float(grad[i]) * grad_scale;                                                   \
            float pi = p[i];                                                                            \
            pi -= lr * wd * pi;                                                                         \
            float mi = b1 * m[i] + (1.f - b1) * g;                                                      \
            float vi = b2 * v[i] + (1.f - b2) * g * g;                                                  \
            float denom = sqrtf(vi) / bc2_sqrt + eps;                                                   \
            pi -= step_size * mi / denom;                                                               \
            p[i] = pi; m[i] = mi; v[i] = vi;                                                            \
            if (copy_kind == 1) ((bf16_t*)copy)[i] = from_float<bf16_t>(pi);                            \
            else if (copy_kind == 2) ((f16_t*)copy)[i] = from_float<f16_t>(pi);                         \
            else if (copy_kind == 3) ((float*)copy)[i] = pi;                                            \
        }                                                                                               \
    }
INSTANTIATE_FLOAT_TYPES(ADAMW)

// The same step on 4 elements per thread (16-byte f32 accesses; n a multiple of 4 and every
// pointer 16-byte aligned); n4 = n / 4. Per element the arithmetic is identical to adamw_*.
template <typename T> __device__ __forceinline__ void load4(const T* p, float* v) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    T a, b, c, d;
    a.v = (unsigned short)(q.x & 0xffffu), b.v = (unsigned short)(q.x >> 16);
    c.v = (unsigned short)(q.y & 0xffffu), d.v = (unsigned short)(q.y >> 16);
    v[0] = to_float(a), v[1] = to_float(b), v[2] = to_float(c), v[3] = to_float(d);
}
template <> __device__ __forceinline__ void load4<float>(const float* p, float* v) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
template <typename T> __device__ __forceinline__ void store4(T* p, const float* v) {
    uint2 q;
    q.x = (uint32_t)from_float<T>(v[0]).v | ((uint32_t)from_float<T>(v[1]).v << 16);
    q.y = (uint32_t)from_float<T>(v[2]).v | ((uint32_t)from_float<T>(v[3]).v << 16);
    *reinterpret_cast<uint2*>(p) = q;
}
template <> __device__ __forceinline__ void store4<float>(float* p, const float* v) {
    float4 q;
    q.x = v[0], q.y = v[1], q.z = v[2], q.w = v[3];
    *reinterpret_cast<float4*>(p) = q;
}
#define ADAMW_V4(SUFFIX, TG)                                                                            \
    extern "C" __global__ void adamw_v4_##SUFFIX(float* p, float* m, float* v, const TG* grad, void* copy, \
                                                 int copy_kind, int64_t n4, float lr, float b1, float b2, \
                                                 float eps, float wd, float step_size, float bc2_sqrt,  \
                                                 float grad_scale) {                                    \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4;                        \
             i += (int64_t)gridDim.x * blockDim.x) {                                                    \
            float g[4], pi[4], mi[4], vi[4];                                                            \
            load4(grad + 4 * i, g);                                                                     \
            load4(p + 4 * i, pi);                                                                       \
            load4(m + 4 * i, mi);                                                                       \
            load4(v + 4 * i, vi);                                                                       \
            _Pragma("unroll") for (int q = 0; q < 4; ++q) {                                             \
                const float gq = g[q] * grad_scale;                                                     \
                pi[q] -= lr * wd * pi[q];                                                               \
                mi[q] = b1 * mi[q] + (1.f - b1) * gq;                                                   \
                vi[q] = b2 * vi[q] + (1.f - b2) * gq * gq;                                              \
                const float denom = sqrtf(vi[q]) / bc2_sqrt + eps;                                      \
                pi[q] -= step_size * mi[q] / denom;                                                     \
            }                                                                                           \
            store4(p + 4 * i, pi);                                                                      \
            store4(m + 4 * i, mi);                                                                      \
            store4(v + 4 * i, vi);                                                                      \
            if (copy_kind == 1) store4((bf16_t*)copy + 4 * i, pi);                                      \
            else if (copy_kind == 2) store4((f16_t*)copy + 4 * i, pi);                                  \
            else if (copy_kind == 3) store4((float*)copy + 4 * i, pi);                                  \
        }                                                                                               \
    }
INSTANTIATE_FLOAT_TYPES(ADAMW_V4)
