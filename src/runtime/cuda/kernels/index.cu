// Index kernels; twins in ops/index.rs.

// ---- top-k: one block per row. The row sits in shared memory (cols floats + cols taken flags);
// k rounds of a block argmax (ValIdx in common.cuh; NaN counts as -inf).
#define TOPK(SUFFIX, T)                                                                                 \
    extern "C" __global__ void topk_##SUFFIX(T* vals, int* idx, const T* x, int cols, int k) {          \
        extern __shared__ float row[];                                                                  \
        unsigned char* taken = (unsigned char*)(row + cols);                                            \
        __shared__ ValIdx wbest[32];                                                                    \
        const int64_t r = blockIdx.x;                                                                   \
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {                                          \
            float v = to_float(x[r * cols + i]);                                                        \
            row[i] = (v != v) ? NEG_INF : v;                                                            \
            taken[i] = 0;                                                                               \
        }                                                                                               \
        __syncthreads();                                                                                \
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;     \
        for (int j = 0; j < k; ++j) {                                                                   \
            ValIdx best = {NEG_INF, -1};                                                                \
            for (int i = threadIdx.x; i < cols; i += blockDim.x)                                        \
                if (!taken[i]) best = better(best, ValIdx{row[i], i});                                  \
            best = warp_best(best);                                                                     \
            if (lane == 0) wbest[warp] = best;                                                          \
            __syncthreads();                                                                            \
            if (warp == 0) {                                                                            \
                ValIdx b = lane < nwarps ? wbest[lane] : ValIdx{NEG_INF, -1};                           \
                b = warp_best(b);                                                                       \
                if (lane == 0) {                                                                        \
                    taken[b.i] = 1;                                                                     \
                    vals[r * k + j] = x[r * cols + b.i];                                                \
                    idx[r * k + j] = b.i;                                                               \
                }                                                                                       \
            }                                                                                           \
            __syncthreads();                                                                            \
        }                                                                                               \
    }
INSTANTIATE_FLOAT_TYPES(TOPK)

// ---- histogram of ids in [0, bins): shared-memory counters, then one global add per bin/block.
extern "C" __global__ void histogram(int* counts, const int* ids, int n, int bins) {
    extern __shared__ int c[];
    for (int b = threadIdx.x; b < bins; b += blockDim.x) c[b] = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        int id = ids[i];
        if (id >= 0 && id < bins) atomicAdd(&c[id], 1);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < bins; b += blockDim.x)
        if (c[b]) atomicAdd(&counts[b], c[b]);
}

// ---- stable counting sort: blocks of 1024 threads own chunks of 1024 ids. Bin `bins` collects
// out-of-range ids. counts is [nb = bins + 1][chunks] (bin-major), so its exclusive scan gives
// each (bin, chunk) its first output slot in stable order.
__device__ __forceinline__ int sort_key(const int* ids, int i, int n, int bins) {
    if (i >= n) return -1;
    int id = ids[i];
    return (id >= 0 && id < bins) ? id : bins;
}

// Per-warp counts of each bin in shared memory cnt[32][nb]; returns this thread's rank among the
// equal keys of its warp and the warp-mates mask.
__device__ __forceinline__ int warp_counts(int* cnt, int key, int nb) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int j = threadIdx.x; j < 32 * nb; j += blockDim.x) cnt[j] = 0;
    __syncthreads();
    unsigned same = __match_any_sync(0xffffffffu, key);
    int rank = __popc(same & ((1u << lane) - 1));
    if (key >= 0 && rank == 0) cnt[warp * nb + key] = __popc(same);
    __syncthreads();
    return rank;
}

extern "C" __global__ void sort_count(int* counts, const int* ids, int n, int bins, int chunks) {
    extern __shared__ int cnt[];
    const int nb = bins + 1;
    const int key = sort_key(ids, blockIdx.x * blockDim.x + threadIdx.x, n, bins);
    warp_counts(cnt, key, nb);
    const int nwarps = blockDim.x >> 5;
    for (int b = threadIdx.x; b < nb; b += blockDim.x) {
        int s = 0;
        for (int w = 0; w < nwarps; ++w) s += cnt[w * nb + b];
        counts[(int64_t)b * chunks + blockIdx.x] = s;
    }
}

extern "C" __global__ void sort_scatter(int* perm, const int* base, const int* ids, int n, int bins, int chunks) {
    extern __shared__ int cnt[];
    const int nb = bins + 1;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int key = sort_key(ids, i, n, bins);
    const int rank = warp_counts(cnt, key, nb);
    if (key < 0) return;
    const int warp = threadIdx.x >> 5;
    int pos = base[(int64_t)key * chunks + blockIdx.x] + rank;
    for (int w = 0; w < warp; ++w) pos += cnt[w * nb + key];
    perm[pos] = i;
}

// In-place exclusive prefix sum of n ints by one block of 1024 threads, tile by tile.
extern "C" __global__ void exclusive_scan_i32(int* a, int n) {
    __shared__ int wsum[32];
    __shared__ int carry;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    for (int t0 = 0; t0 < n; t0 += blockDim.x) {
        int i = t0 + threadIdx.x;
        int v = i < n ? a[i] : 0;
        int x = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == 31) wsum[warp] = x;
        __syncthreads();
        if (warp == 0) {
            int s = wsum[lane];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                int y = __shfl_up_sync(0xffffffffu, s, o);
                if (lane >= o) s += y;
            }
            wsum[lane] = s;
        }
        __syncthreads();
        int before = carry + (warp > 0 ? wsum[warp - 1] : 0) + x - v;
        if (i < n) a[i] = before;
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) carry = before + v;
        __syncthreads();
    }
}

// ---- row gather / weighted scatter-add / [A,B,C,D] -> [A,C,B,D], one thread per element.
#define ROWS(SUFFIX, T)                                                                                 \
    extern "C" __global__ void gather_rows_##SUFFIX(T* out, const T* x, const int* idx, int64_t total, int d, \
                                                    int rows) {                                         \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= total) return;                                                                         \
        int r = idx[i / d];                                                                             \
        out[i] = (r >= 0 && r < rows) ? x[(int64_t)r * d + i % d] : from_float<T>(0.f);                 \
    }                                                                                                   \
    extern "C" __global__ void scatter_add_rows_##SUFFIX(float* dst, const int* idx, const T* src,     \
                                                         const float* w, int64_t total, int d, int rows) { \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= total) return;                                                                         \
        int64_t n = i / d;                                                                              \
        int r = idx[n];                                                                                 \
        if (r < 0 || r >= rows) return;                                                                 \
        float s = w ? w[n] : 1.f;                                                                       \
        atomicAdd(&dst[(int64_t)r * d + i % d], s * to_float(src[i]));                                  \
    }                                                                                                   \
    extern "C" __global__ void transpose_12_##SUFFIX(T* out, const T* x, int64_t n, int B, int C, int D) { \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= n) return;                                                                             \
        int64_t dd = i % D, t = i / D;                                                                  \
        int64_t bb = t % B; t /= B;                                                                     \
        int64_t cc = t % C, aa = t / C;                                                                 \
        out[i] = x[((aa * B + bb) * C + cc) * D + dd];                                                  \
    }
INSTANTIATE_FLOAT_TYPES(ROWS)

// The same gather and transpose moving 8 elements (16 or 32 bytes) per thread: d (resp. D) a
// multiple of 8 and 16-byte aligned tensors; n8 = elements / 8.
#define ROWS_V8(SUFFIX, T)                                                                              \
    extern "C" __global__ void gather_rows_v8_##SUFFIX(T* out, const T* x, const int* idx, int64_t n8, int d, \
                                                       int rows) {                                      \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= n8) return;                                                                            \
        const int d8 = d >> 3;                                                                          \
        const int64_t row = i / d8;                                                                     \
        const int c = (int)(i - row * d8) << 3;                                                         \
        const int r = idx[row];                                                                         \
        if (r >= 0 && r < rows) copy8(out + row * d + c, x + (int64_t)r * d + c);                       \
        else zero8(out + row * d + c);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void transpose_12_v8_##SUFFIX(T* out, const T* x, int64_t n8, int B, int C, int D) { \
        int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;                                     \
        if (i >= n8) return;                                                                            \
        const int D8 = D >> 3;                                                                          \
        int64_t t = i / D8;                                                                             \
        const int dd = (int)(i - t * D8) << 3;                                                          \
        const int64_t bb = t % B;                                                                       \
        t /= B;                                                                                         \
        const int64_t cc = t % C, aa = t / C;                                                           \
        copy8(out + i * 8, x + ((aa * B + bb) * C + cc) * D + dd);                                      \
    }
INSTANTIATE_FLOAT_TYPES(ROWS_V8)
