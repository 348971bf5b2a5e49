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

// Row arg-max (greedy decoding): out[r] = the first index of the row's largest value, counting
// only values > -inf (NaN never wins; a row with none gives 0), as ops::argmax_row does. Two
// passes: argmax_part with grid (parts, rows) leaves each part's (value, index) in part_v /
// part_i [rows, parts]; argmax_final (one block per row) reduces them. Bytes: rows·cols·sizeof(T).
__device__ __forceinline__ void argmax_take(float& bv, int& bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
}
__device__ __forceinline__ void argmax_warp(float& bv, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, bv, o);
        const int i = __shfl_xor_sync(0xffffffffu, bi, o);
        argmax_take(bv, bi, v, i);
    }
}
// The block's (value, index) ends in thread 0.
__device__ __forceinline__ void argmax_block(float& bv, int& bi) {
    __shared__ float sv[32];
    __shared__ int si[32];
    argmax_warp(bv, bi);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    if (warp == 0) {
        bv = lane < nw ? sv[lane] : NEG_INF;
        bi = lane < nw ? si[lane] : 0x7fffffff;
        argmax_warp(bv, bi);
    }
}
#define ARGMAX(SUFFIX, T)                                                                               \
    extern "C" __global__ void argmax_part_##SUFFIX(float* part_v, int* part_i, const T* x, int cols) { \
        const int row = blockIdx.y, parts = gridDim.x;                                                  \
        const int per = (cols + parts - 1) / parts, lo = blockIdx.x * per, hi = min(cols, lo + per);    \
        const T* xr = x + (int64_t)row * cols;                                                          \
        float bv = NEG_INF;                                                                             \
        int bi = 0x7fffffff;                                                                            \
        for (int c = lo + threadIdx.x; c < hi; c += blockDim.x) {                                       \
            const float v = to_float(xr[c]);                                                            \
            if (v > NEG_INF) argmax_take(bv, bi, v, c);                                                 \
        }                                                                                               \
        argmax_block(bv, bi);                                                                           \
        if (threadIdx.x == 0) part_v[row * parts + blockIdx.x] = bv, part_i[row * parts + blockIdx.x] = bi; \
    }
INSTANTIATE_FLOAT_TYPES(ARGMAX)
// One pass (the usual path; argmax_part + argmax_final where the device's arrival counters
// cannot be had): grid (parts, rows), 256 threads, 8 values per thread (parts = ceil(cols / 2048);
// one 16- or 32-byte load where vec, else value by value), each block's (value, index) into
// part_v / part_i [rows, parts]; the last block of a row to arrive (counters[row]) reduces the
// row's parts, writes out[row] (and advances pos / lens as argmax_final) and sets the counter
// back to zero. One launch and one load round instead of two launches and 16 dependent loads.
template <typename T>
__device__ __forceinline__ void argmax_onepass(int* out, float* part_v, int* part_i, const T* x, int cols,
                                               int vec, int* pos, int* lens, int* counters) {
    PDL_ENTRY();
    __shared__ int last;
    const int row = blockIdx.y, parts = gridDim.x;
    const T* xr = x + (int64_t)row * cols;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    float v[8];
    if (vec && c0 < cols) {
        load8<T>(xr + c0, v);
    } else {
#pragma unroll
        for (int q = 0; q < 8; ++q) v[q] = c0 + q < cols ? to_float(xr[c0 + q]) : NEG_INF;
    }
#pragma unroll
    for (int q = 0; q < 8; ++q)
        if (c0 + q < cols && v[q] > NEG_INF) argmax_take(bv, bi, v[q], c0 + q);
    argmax_block(bv, bi);
    if (threadIdx.x == 0) {
        part_v[row * parts + blockIdx.x] = bv, part_i[row * parts + blockIdx.x] = bi;
        __threadfence();
        last = atomicAdd(counters + row, 1) == parts - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    bv = NEG_INF, bi = 0x7fffffff;
    for (int p = threadIdx.x; p < parts; p += blockDim.x) {
        const float pv = __ldcg(part_v + row * parts + p);
        if (pv > NEG_INF) argmax_take(bv, bi, pv, __ldcg(part_i + row * parts + p));
    }
    argmax_block(bv, bi);
    if (threadIdx.x == 0) {
        out[row] = bi == 0x7fffffff ? 0 : bi;
        if (pos) pos[row] += 1;
        if (lens) lens[row] += 1;
        counters[row] = 0;
    }
}
#define ARGMAX_ONEPASS(SUFFIX, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) argmax_onepass_##SUFFIX(                          \
        int* out, float* part_v, int* part_i, const T* x, int cols, int vec, int* pos, int* lens,        \
        int* counters) {                                                                                \
        argmax_onepass<T>(out, part_v, part_i, x, cols, vec, pos, lens, counters);                      \
    }
INSTANTIATE_FLOAT_TYPES(ARGMAX_ONEPASS)
// With pos / lens (else null): a greedy decode step's advance, pos[row] and lens[row] + 1 (the
// step's output ids become the next step's input on the device: ops::argmax_rows_advance).
extern "C" __global__ void argmax_final(int* out, const float* part_v, const int* part_i, int parts, int* pos,
                                        int* lens) {
    const int row = blockIdx.x;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int p = threadIdx.x; p < parts; p += blockDim.x) {
        const float v = part_v[row * parts + p];
        if (v > NEG_INF) argmax_take(bv, bi, v, part_i[row * parts + p]);
    }
    argmax_block(bv, bi);
    if (threadIdx.x == 0) {
        out[row] = bi == 0x7fffffff ? 0 : bi;
        if (pos) pos[row] += 1;
        if (lens) lens[row] += 1;
    }
}
