// Embedding gather and gradient scatter-add; twins in ops/embedding.rs. One thread per element.
// Bytes: n·(sizeof(T) read + write); the backward's f32 atomics make its row sums order-dependent.
#define EMBED(SUFFIX, T)                                                                                \
    extern "C" __global__ void embedding_fwd_##SUFFIX(T* out, const int* ids, const T* table, int64_t n, \
                                                      int d, int vocab) {                               \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= n) return;                                                                             \
        int id = ids[i / d];                                                                            \
        out[i] = (id >= 0 && id < vocab) ? table[(int64_t)id * d + i % d] : from_float<T>(0.f);         \
    }                                                                                                   \
    extern "C" __global__ void embedding_bwd_##SUFFIX(float* dtable, const int* ids, const T* dy, int64_t n, \
                                                      int d, int vocab) {                               \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= n) return;                                                                             \
        int id = ids[i / d];                                                                            \
        if (id >= 0 && id < vocab) atomicAdd(&dtable[(int64_t)id * d + i % d], to_float(dy[i]));       \
    }

INSTANTIATE_FLOAT_TYPES(EMBED)
