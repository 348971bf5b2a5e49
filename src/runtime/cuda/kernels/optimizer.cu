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
