// Rotate-half RoPE; twin in ops/rope.rs. One thread per rotated pair (t, h, i < half); threads of
// a head also copy the pass-through dims past 2·half. Positions outside the table give zeros
// (the CPU twin reports them as an error before launching).
#define ROPE(SUFFIX, T)                                                                                 \
    extern "C" __global__ void rope_##SUFFIX(T* out, const T* x, const float* cos_t, const float* sin_t, \
                                             const int* pos, int n_tok, int n_head, int hd, int half,   \
                                             int max_pos, float sign) {                                 \
        int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                   \
        if (idx >= (int64_t)n_tok * n_head * half) return;                                              \
        int i = idx % half;                                                                             \
        int64_t th = idx / half;                                                                        \
        int t = th / n_head;                                                                            \
        const T* xr = x + th * hd;                                                                      \
        T* orow = out + th * hd;                                                                        \
        int p = pos[t];                                                                                 \
        float a = to_float(xr[i]), b = to_float(xr[i + half]);                                          \
        if (p < 0 || p >= max_pos) {                                                                    \
            orow[i] = from_float<T>(0.f);                                                               \
            orow[i + half] = from_float<T>(0.f);                                                        \
        } else {                                                                                        \
            float c = cos_t[(int64_t)p * half + i], s = sign * sin_t[(int64_t)p * half + i];            \
            orow[i] = from_float<T>(a * c - b * s);                                                     \
            orow[i + half] = from_float<T>(b * c + a * s);                                              \
        }                                                                                               \
        for (int j = 2 * half + i; j < hd; j += half) orow[j] = xr[j];                                  \
    }

INSTANTIATE_FLOAT_TYPES(ROPE)
