// Float storage conversions; twin: ops/cast.rs. Bytes = n × (sizeof(S) + sizeof(D)).
#define CAST(SN, TS, DN, TD)                                                                  \
    extern "C" __global__ void cast_##SN##_##DN(TD* out, const TS* x, int64_t n) {          \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;              \
             i += (int64_t)gridDim.x * blockDim.x)                                           \
            out[i] = from_float<TD>(to_float(x[i]));                                         \
    }
CAST(f32, float, bf16, bf16_t)
CAST(f32, float, f16, f16_t)
CAST(bf16, bf16_t, f32, float)
CAST(f16, f16_t, f32, float)
CAST(bf16, bf16_t, f16, f16_t)
CAST(f16, f16_t, bf16, bf16_t)
