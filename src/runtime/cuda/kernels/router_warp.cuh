// A softmax router's per-warp pieces, shared by serve_router.cu and serve_experts.cu.
#pragma once

// A softmax router's choice for one token by one warp (E <= 256 logits, k <= 32): the route
// kernel's rule for softmax routers without noise — largest logit first, ties to the lower index,
// gate exp(l − lse), combine weight scale·g / max(Σg + add, clamp) when normalising, else scale·g.
// Writes ids[j·stride] and wts[j·stride] for j < k. Logits are read through L2 (other blocks of
// the calling kernel wrote them).
#define ROUTE_WARP_MAX_E 256
// A row of E <= 256 logits, times `scale`, spread over a warp: lane's values at lane + 32q, -inf
// past E (read through L2: other blocks wrote them).
__device__ __forceinline__ void warp_row_load(const float* row, int E, float scale, float (&v)[ROUTE_WARP_MAX_E / 32]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int q = 0; q < ROUTE_WARP_MAX_E / 32; ++q) {
        const int i = lane + 32 * q;
        v[q] = i < E ? scale * __ldcg(row + i) : NEG_INF;
    }
}
// warp_row_load, returning the row's log-sum-exp.
__device__ __forceinline__ float warp_row_lse(const float* row, int E, float scale, float (&v)[ROUTE_WARP_MAX_E / 32]) {
    const int lane = threadIdx.x & 31;
    warp_row_load(row, E, scale, v);
    float m = NEG_INF;
#pragma unroll
    for (int q = 0; q < ROUTE_WARP_MAX_E / 32; ++q) m = fmaxf(m, v[q]);
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < ROUTE_WARP_MAX_E / 32; ++q)
        if (lane + 32 * q < E) s += expf(v[q] - m);
    return m + logf(warp_sum(s));
}
// One round of a warp's top-k over warp_row_load's values: the largest not yet taken (ties to the
// lower index), the same on every lane, then marked taken.
__device__ __forceinline__ ValIdx warp_pick(const float (&v)[ROUTE_WARP_MAX_E / 32], int E, unsigned& taken) {
    const int lane = threadIdx.x & 31;
    ValIdx b = {NEG_INF, -1};
#pragma unroll
    for (int q = 0; q < ROUTE_WARP_MAX_E / 32; ++q) {
        const int i = lane + 32 * q;
        if (i < E && !((taken >> q) & 1u)) b = better(b, ValIdx{v[q], i});
    }
    b = warp_best(b);
    if (b.i >= 0 && (b.i & 31) == lane) taken |= 1u << (b.i >> 5);
    return b;
}
// A softmax router's choice for one token by one warp (E <= 256 logits, k <= 32): the route
// kernel's rule for softmax routers without noise — largest logit first, ties to the lower index,
// gate exp(l − lse), combine weight scale·g / max(Σg + add, clamp) when normalising, else scale·g.
// Writes ids[j·stride] and wts[j·stride] for j < k.
__device__ __forceinline__ void warp_softmax_topk(const float* row, int E, int k, int wnorm, float wadd,
                                                  float wclamp, float wscale, int* ids, float* wts, int stride) {
    const int lane = threadIdx.x & 31;
    float v[ROUTE_WARP_MAX_E / 32];
    const float lse = warp_row_lse(row, E, 1.f, v);
    unsigned taken = 0;
    float gsum = 0.f, my_g = 0.f;
    int my_id = -1;
    for (int j = 0; j < k; ++j) {
        const ValIdx b = warp_pick(v, E, taken);
        const float g = b.i >= 0 ? expf(b.v - lse) : 0.f;
        gsum += g;
        if (lane == j) my_g = g, my_id = b.i;
    }
    const float d = wnorm ? fmaxf(gsum + wadd, wclamp) : 1.f;
    if (lane < k) {
        ids[(int64_t)lane * stride] = my_id;
        wts[(int64_t)lane * stride] = wscale * my_g / d;
    }
}
// warp_softmax_topk's combine weights for experts already chosen (ids[j·stride], j < k) of a row
// whose logits are scale·row: gates summed in choice order as warp_softmax_topk sums them.
__device__ __forceinline__ void warp_softmax_weights(const float* row, int E, float scale, const int* ids, int k,
                                                     int wnorm, float wadd, float wclamp, float wscale, float* wts,
                                                     int stride) {
    const int lane = threadIdx.x & 31;
    float v[ROUTE_WARP_MAX_E / 32];
    const float lse = warp_row_lse(row, E, scale, v);
    const int id = lane < k ? ids[(int64_t)lane * stride] : -1;
    const float g = id >= 0 && id < E ? expf(scale * __ldcg(row + id) - lse) : 0.f;
    float gsum = 0.f;
    for (int j = 0; j < k; ++j) gsum += __shfl_sync(0xffffffffu, g, j);
    const float d = wnorm ? fmaxf(gsum + wadd, wclamp) : 1.f;
    if (lane < k) wts[(int64_t)lane * stride] = wscale * g / d;
}
