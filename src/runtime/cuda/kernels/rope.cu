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

// 8-wide: one thread per 8 consecutive rotated pairs (16-byte loads of x and both halves, 32-byte
// table loads) or per 8 pass-through dims. Needs half % 8 == 0 and hd % 8 == 0, rows aligned.
#define ROPE_V8(SUFFIX, T)                                                                              \
    extern "C" __global__ void rope_v8_##SUFFIX(T* out, const T* x, const float* cos_t, const float* sin_t, \
                                                const int* pos, int n_tok, int n_head, int hd, int half, \
                                                int max_pos, float sign) {                              \
        const int per = half / 8, cph = per + (hd - 2 * half) / 8;                                      \
        int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                   \
        if (idx >= (int64_t)n_tok * n_head * cph) return;                                               \
        const int c = idx % cph;                                                                        \
        const int64_t th = idx / cph;                                                                   \
        const T* xr = x + th * hd;                                                                      \
        T* orow = out + th * hd;                                                                        \
        if (c >= per) {                                                                                 \
            const int j = 2 * half + (c - per) * 8;                                                     \
            copy8(orow + j, xr + j);                                                                    \
            return;                                                                                     \
        }                                                                                               \
        const int i = c * 8, p = pos[th / n_head];                                                      \
        float a[8], b[8], o1[8], o2[8];                                                                 \
        load8(xr + i, a);                                                                               \
        load8(xr + i + half, b);                                                                        \
        if (p < 0 || p >= max_pos) {                                                                    \
            for (int k = 0; k < 8; ++k) o1[k] = o2[k] = 0.f;                                            \
        } else {                                                                                        \
            float cs[8], sn[8];                                                                         \
            load8(cos_t + (int64_t)p * half + i, cs);                                                   \
            load8(sin_t + (int64_t)p * half + i, sn);                                                   \
            _Pragma("unroll") for (int k = 0; k < 8; ++k) {                                             \
                const float s = sign * sn[k];                                                           \
                o1[k] = a[k] * cs[k] - b[k] * s;                                                        \
                o2[k] = b[k] * cs[k] + a[k] * s;                                                        \
            }                                                                                           \
        }                                                                                               \
        store8(orow + i, o1);                                                                           \
        store8(orow + i + half, o2);                                                                    \
    }

INSTANTIATE_FLOAT_TYPES(ROPE_V8)
