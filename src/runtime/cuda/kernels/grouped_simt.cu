// SIMT grouped GEMMs (f32, or shapes not multiples of 8): VARM and VARK as grouped_mma.cu, one
// thread per output element. Launchers in ops/grouped_cuda.rs; CPU twins in ops/grouped.rs.
#include "grouped.cuh"

// ---- SIMT fallback: one thread per output element (f32 inputs or unaligned shapes).
template <typename T>
__device__ __forceinline__ void simt_varm(T* y, const T* x, const T* w, const int* offsets, int E, int M, int N,
                                          int K, int trans_w) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)M * N; i += (int64_t)gridDim.x * blockDim.x) {
        int r = i / N, n = i - (int64_t)r * N;
        if (r >= offsets[E]) { y[i] = from_float<T>(0.f); continue; }
        int e = find_group(offsets, E, r);
        const T* we = w + (int64_t)e * N * K;
        float s = 0.f;
        for (int k = 0; k < K; ++k)
            s += to_float(x[(int64_t)r * K + k]) * to_float(trans_w ? we[(int64_t)n * K + k] : we[(int64_t)k * N + n]);
        y[i] = from_float<T>(s);
    }
}
template <typename T, typename TO>
__device__ __forceinline__ void simt_vark(TO* out, const T* a, const T* b, const int* offsets, int E, int P, int Q,
                                          int accumulate) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)E * P * Q; i += (int64_t)gridDim.x * blockDim.x) {
        int e = i / ((int64_t)P * Q);
        int64_t pq = i - (int64_t)e * P * Q;
        int p = pq / Q, q = pq - (int64_t)p * Q;
        float s = 0.f;
        for (int r = offsets[e]; r < offsets[e + 1]; ++r) s += to_float(a[(int64_t)r * P + p]) * to_float(b[(int64_t)r * Q + q]);
        out[i] = from_float<TO>(s + (accumulate ? to_float(out[i]) : 0.f));
    }
}
#define GG_SIMT(SUFFIX, T)                                                                              \
    extern "C" __global__ void gg_simt_varm_##SUFFIX(T* y, const T* x, const T* w, const int* offsets, int E, \
                                                     int M, int N, int K, int trans_w) {                \
        simt_varm<T>(y, x, w, offsets, E, M, N, K, trans_w);                                            \
    }                                                                                                   \
    extern "C" __global__ void gg_simt_vark_##SUFFIX##_f32(float* out, const T* a, const T* b, const int* offsets, \
                                                           int E, int P, int Q, int accumulate) {       \
        simt_vark<T, float>(out, a, b, offsets, E, P, Q, accumulate);                                   \
    }                                                                                                   \
    extern "C" __global__ void gg_simt_vark_##SUFFIX##_same(T* out, const T* a, const T* b, const int* offsets, \
                                                            int E, int P, int Q, int accumulate) {      \
        simt_vark<T, T>(out, a, b, offsets, E, P, Q, accumulate);                                       \
    }
INSTANTIATE_FLOAT_TYPES(GG_SIMT)
