// The served decode path's routers: logits and softmax top-k in one launch (router_topk_r*), and
// the o projection with the router folded through it (o_route_r*). Launchers in
// ops/grouped_cuda.rs; CPU twins ops::router_topk, ops::o_router_topk.
#include "gemv.cuh"
#include "router_warp.cuh"

// Router logits and softmax top-k in one launch (decode, M <= 8 rows): the blocks compute logits
// [M, E] f32 = x·Wᵀ as gemv_nt does; the last block to finish (arrival counter) routes row r with
// warp r (warp_softmax_topk) into ids / wts [k, M] and resets the counter to zero. Replaces the
// router GEMV + route kernel pair of a served step. Twin: ops::router_topk (CPU).
// The _addnorm variant takes the rows as residual x + a, RMSNorm weight g (addnorm_rows): it
// also writes the new residual x_out and the normed rows h_out (the experts' input).
template <int R, typename T, bool NORM>
__device__ __forceinline__ void router_topk(float* logits, int* ids, float* wts, const T* x, const T* w, int M,
                                            int E, int K, int k, int wnorm, float wadd, float wclamp, float wscale,
                                            int* counter, AddNorm<T> an) {
    gg_small_nt<R, T, float, NORM>(logits, x, w, nullptr, 0, M, E, K, blockIdx.x, an);
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int warp = threadIdx.x >> 5;
    if (warp < M)
        warp_softmax_topk(logits + (int64_t)warp * E, E, k, wnorm, wadd, wclamp, wscale, ids + warp, wts + warp, M);
    if (threadIdx.x == 0) *counter = 0;
}
#define ROUTER_TOPK_R(SUFFIX, T, R)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) router_topk_r##R##_##SUFFIX(                      \
        float* logits, int* ids, float* wts, const T* x, const T* w, int M, int E, int K, int k,         \
        int wnorm, float wadd, float wclamp, float wscale, int* counter) {                               \
        router_topk<R, T, false>(logits, ids, wts, x, w, M, E, K, k, wnorm, wadd, wclamp, wscale, counter, \
                                 AddNorm<T>{});                                                         \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) router_topk_addnorm_r##R##_##SUFFIX(              \
        float* logits, int* ids, float* wts, const T* x, const T* w, int M, int E, int K, int k,         \
        int wnorm, float wadd, float wclamp, float wscale, int* counter, const T* a, const T* g,         \
        float eps, T* x_out, T* h_out) {                                                                \
        router_topk<R, T, true>(logits, ids, wts, x, w, M, E, K, k, wnorm, wadd, wclamp, wscale, counter, \
                                AddNorm<T>{a, g, eps, x_out, h_out});                                   \
    }
#define ROUTER_TOPK(SUFFIX, T) ROUTER_TOPK_R(SUFFIX, T, 1) ROUTER_TOPK_R(SUFFIX, T, 2) ROUTER_TOPK_R(SUFFIX, T, 4) ROUTER_TOPK_R(SUFFIX, T, 8)
ROUTER_TOPK(bf16, bf16_t)
ROUTER_TOPK(f16, f16_t)

// ---- Served decode, MoE blocks: the o projection and the router in one launch. The router reads
// h = RMSNorm(x + o)·g with o = c·Woᵀ (c the attention's context [M, C], x the residual [M, D]).
// Its logits are r·z with r = rsqrt(mean((x + o)²) + eps) > 0 per row and z = [x | c]·Wfᵀ,
// Wf = [W ⊙ g | (W ⊙ g)·Wo] [E, D + C] (ops::router_fold, once per layer), so the top k of z are
// the router's and need only what the attention wrote: the router runs beside the o projection
// instead of after it. r and the combine weights come in moe_serve_up_norm, which norms the
// rows anyway. Twins: ops::o_router_topk, ops::moe_serve_swiglu_norm (CPU).
//   o_route_rR: grid ceil(E / 4)·S router blocks, then ceil(D / 8) o-projection blocks (gemv_nt,
//               writing the new residual s = x + o, o rounded to T first, as add_rmsnorm would).
//               A router block computes 4 experts' partial logits over one of the S slices of
//               K = D + C (16-byte vectors; the host's S = ceil((D + C) / 8·256) for 16-bit
//               types gives one vector per thread, so no thread waits on a second round of
//               loads) into zp [S, M, E]; the last router block to arrive sums the slices in
//               order into z [M, E] f32, picks each row's top k (largest first, ties to the
//               lower index) into ids [k, M] and resets the counter.
#define OR_RC 4
template <int R, typename T>
__device__ __forceinline__ void o_route(T* s_out, float* z, float* zp, int* ids, const T* ctx, const T* x,
                                        const T* wo, const T* wf, int M, int D, int C, int E, int k, int S, int* counter) {
    constexpr int VEC = 16 / sizeof(T);
    const int K = D + C, dv = D / VEC, kv = K / VEC, nr = (E + OR_RC - 1) / OR_RC * S;
    if ((int)blockIdx.x >= nr) {
        gg_small_nt<R, T, T>(s_out, ctx, wo, nullptr, 0, M, D, C, blockIdx.x - nr, AddNorm<T>{}, x);
        return;
    }
    PDL_ENTRY();
    __shared__ float red[8][R][OR_RC];
    __shared__ int last;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sl = blockIdx.x % S, e0 = blockIdx.x / S * OR_RC, ne = min(OR_RC, E - e0);
    const int per = (kv + S - 1) / S, vend = min(kv, (sl + 1) * per);
    const T* wb = wf + (int64_t)e0 * K;
    float acc[R][OR_RC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < OR_RC; ++c) acc[r][c] = 0.f;
    for (int v = sl * per + threadIdx.x; v < vend; v += blockDim.x) {
        uint4 wr[OR_RC];
#pragma unroll
        for (int c = 0; c < OR_RC; ++c)
            wr[c] = c < ne ? ld_stream(reinterpret_cast<const uint4*>(wb + (int64_t)c * K + v * VEC))
                           : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (r < M) {
                const T* src = v < dv ? x + (int64_t)r * D + v * VEC : ctx + (int64_t)r * C + (v - dv) * VEC;
                float xf[VEC];
                unpack16<T>(*reinterpret_cast<const uint4*>(src), xf);
#pragma unroll
                for (int c = 0; c < OR_RC; ++c) dot16<T>(&acc[r][c], wr[c], xf);
            }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < OR_RC; ++c) {
            const float s = warp_sum(acc[r][c]);
            if (lane == 0) red[warp][r][c] = s;
        }
    __syncthreads();
    if (threadIdx.x < R * OR_RC) {
        const int r = threadIdx.x / OR_RC, c = threadIdx.x % OR_RC;
        if (r < M && c < ne) {
            float s = 0.f;
#pragma unroll
            for (int q = 0; q < 8; ++q) s += red[q][r][c];
            zp[((int64_t)sl * M + r) * E + e0 + c] = s;
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1) == nr - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // z = the slices' sum, in slice order (the same for whichever block arrives last).
    for (int q = threadIdx.x; q < M * E; q += blockDim.x) {
        float sum = 0.f;
        for (int j = 0; j < S; ++j) sum += __ldcg(zp + (int64_t)j * M * E + q);
        z[q] = sum;
    }
    __syncthreads();
    if (M * E <= (int)blockDim.x) {
        // Every logit's rank at once (one per thread): the number of logits before it in the
        // order above (larger, or equal at a lower index; NaN taken as -inf so that the ranks
        // are a permutation); ranks below k are the choices.
        __shared__ float zs[R][ROUTE_WARP_MAX_E];
        const int r = threadIdx.x / E, i = threadIdx.x - r * E;
        float mine = NEG_INF;
        if (r < M) {
            mine = z[(int64_t)r * E + i];
            mine = mine != mine ? NEG_INF : mine;
            zs[r][i] = mine;
        }
        __syncthreads();
        if (r < M) {
            int rank = 0;
#pragma unroll 4
            for (int j = 0; j < E; ++j) {
                const float o = zs[r][j];
                rank += o > mine || (o == mine && j < i);
            }
            if (rank < k) ids[(int64_t)rank * M + r] = i;
        }
    } else if (warp < M) {
        float v[ROUTE_WARP_MAX_E / 32];
        warp_row_load(z + (int64_t)warp * E, E, 1.f, v);
        unsigned taken = 0;
        int my_id = -1;
        for (int j = 0; j < k; ++j) {
            const ValIdx b = warp_pick(v, E, taken);
            if (lane == j) my_id = b.i;
        }
        if (lane < k) ids[(int64_t)lane * M + warp] = my_id;
    }
    if (threadIdx.x == 0) *counter = 0;
}
#define O_ROUTE_R(SUFFIX, T, R)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) o_route_r##R##_##SUFFIX(                          \
        T* s_out, float* z, float* zp, int* ids, const T* ctx, const T* x, const T* wo, const T* wf,     \
        int M, int D, int C, int E, int k, int S, int* counter) {                                       \
        o_route<R, T>(s_out, z, zp, ids, ctx, x, wo, wf, M, D, C, E, k, S, counter);                    \
    }
#define O_ROUTE(SUFFIX, T) O_ROUTE_R(SUFFIX, T, 1) O_ROUTE_R(SUFFIX, T, 2) O_ROUTE_R(SUFFIX, T, 4) O_ROUTE_R(SUFFIX, T, 8)
O_ROUTE(bf16, bf16_t)
O_ROUTE(f16, f16_t)
