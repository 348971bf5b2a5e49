// Deterministic reductions; twins in ops/reduce.rs. Bytes: one read of the input.

// Column sums: block (32 columns × 8 row lanes), grid (column tiles, row groups). Group g sums
// rows g, g + G, g + 2G, ... into partial[g, c].
#define COLSUM(SUFFIX, T)                                                                               \
    extern "C" __global__ void col_sum_##SUFFIX(float* partial, const T* x, int rows, int cols) {       \
        __shared__ float acc[8][33];                                                                    \
        const int c = blockIdx.x * 32 + threadIdx.x;                                                    \
        float s = 0.f;                                                                                  \
        if (c < cols)                                                                                   \
            for (int64_t r = blockIdx.y * 8 + threadIdx.y; r < rows; r += (int64_t)gridDim.y * 8)       \
                s += to_float(x[r * cols + c]);                                                         \
        acc[threadIdx.y][threadIdx.x] = s;                                                              \
        __syncthreads();                                                                                \
        if (threadIdx.y == 0 && c < cols) {                                                             \
            float t = 0.f;                                                                              \
            for (int j = 0; j < 8; ++j) t += acc[j][threadIdx.x];                                       \
            partial[(int64_t)blockIdx.y * cols + c] = t;                                                \
        }                                                                                               \
    }                                                                                                   \
    extern "C" __global__ void block_sums_##SUFFIX(float* out, const T* x, int64_t n, int squares) {     \
        __shared__ float scratch[32];                                                                   \
        float s = 0.f;                                                                                  \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) { \
            float v = to_float(x[i]);                                                                   \
            s += squares ? v * v : v;                                                                   \
        }                                                                                               \
        s = block_sum(s, scratch);                                                                      \
        if (threadIdx.x == 0) out[blockIdx.x] = s;                                                      \
    }
INSTANTIATE_FLOAT_TYPES(COLSUM)

// block_sums reading 8 elements per access (n8 = n / 8; 16-byte aligned), 8 partial sums per
// thread: more loads in flight than the one-element loop, same fixed order for a fixed grid.
#define BLOCKSUM_V8(SUFFIX, T)                                                                          \
    extern "C" __global__ void block_sums_v8_##SUFFIX(float* out, const T* x, int64_t n8, int squares) { \
        __shared__ float scratch[32];                                                                   \
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};                                        \
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8; i += (int64_t)gridDim.x * blockDim.x) { \
            float v[8];                                                                                 \
            load8(x + 8 * i, v);                                                                        \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) acc[q] += squares ? v[q] * v[q] : v[q];       \
        }                                                                                               \
        float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));    \
        s = block_sum(s, scratch);                                                                      \
        if (threadIdx.x == 0) out[blockIdx.x] = s;                                                      \
    }
INSTANTIATE_FLOAT_TYPES(BLOCKSUM_V8)

// Σ x² over many tensors in one launch (the gradient norm over every parameter). table holds
// `count` rows {address, n8, first block} (int64): tensor i owns blocks first_i .. first_{i+1} − 1,
// which stride over its n8 units of 8 elements (16-byte aligned). One partial per block, in a
// fixed order for fixed shapes (block_sums_f32 finishes it).
#define MULTI_SUMSQ_V8(SUFFIX, T)                                                                       \
    extern "C" __global__ void multi_sumsq_v8_##SUFFIX(float* out, const long long* table, int count) { \
        __shared__ float scratch[32];                                                                   \
        int lo = 0, hi = count - 1;                                                                     \
        while (lo < hi) {                                                                               \
            const int mid = (lo + hi + 1) >> 1;                                                         \
            if (table[3 * mid + 2] <= (long long)blockIdx.x) lo = mid; else hi = mid - 1;               \
        }                                                                                               \
        const T* x = reinterpret_cast<const T*>(table[3 * lo]);                                         \
        const int64_t n8 = table[3 * lo + 1], b0 = table[3 * lo + 2];                                   \
        const int64_t nb = (lo + 1 < count ? table[3 * lo + 5] : (long long)gridDim.x) - b0;            \
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};                                        \
        for (int64_t i = (blockIdx.x - b0) * blockDim.x + threadIdx.x; i < n8; i += nb * blockDim.x) {  \
            float v[8];                                                                                 \
            load8(x + 8 * i, v);                                                                        \
            _Pragma("unroll") for (int q = 0; q < 8; ++q) acc[q] += v[q] * v[q];                        \
        }                                                                                               \
        float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));    \
        s = block_sum(s, scratch);                                                                      \
        if (threadIdx.x == 0) out[blockIdx.x] = s;                                                      \
    }
INSTANTIATE_FLOAT_TYPES(MULTI_SUMSQ_V8)
