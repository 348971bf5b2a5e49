// MoE routers; CPU twins in src/moe/router.rs. One block per token row of E logits (E <= 1024,
// k <= 32). Bytes per token: E·4 read (+ E·4 probs written); FLOPs negligible.

// Same counter-based noise as router.rs `uniform` (splitmix64 of seed, stream, index).
__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t stream, uint64_t idx) {
    uint64_t z = seed ^ (stream * 0xD1B54A32D192ED03ull) ^ (idx * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) + 0.5f) * (1.0f / 16777216.0f);
}
__device__ __forceinline__ float gumbel(uint64_t seed, uint64_t stream, uint64_t idx) {
    return -logf(-logf(uniform01(seed, stream, idx)));
}

// Block-wide argmax; every thread gets the winner. `wbest` is 32 shared ValIdx.
__device__ __forceinline__ ValIdx block_best(ValIdx v, ValIdx* wbest) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_best(v);
    if (lane == 0) wbest[warp] = v;
    __syncthreads();
    ValIdx r = lane < nwarps ? wbest[lane] : ValIdx{NEG_INF, -1};
    r = warp_best(r);
    __syncthreads();
    return r;
}

// kind: 0 softmax top-k, 1 sigmoid (+bias, group-limited), 2 switch top-1/top-2 (noisy).
// Outputs are slot-major [k, T]: ids, raw gates; lse [T]; probs [T, E] when non-null; combine
// weights [k, T] when wout is non-null (dropless: every slot kept).
extern "C" __global__ void route(int* ids, float* gates, float* lse_out, float* probs, const float* logits,
                                 const float* bias, int kind, int T, int E, int k, int n_group, int topk_group,
                                 int noise1, int noise2, long long seed, float* wout, int wnorm, float wadd,
                                 float wclamp, float wscale) {
    PDL_ENTRY();
    extern __shared__ float sm[];
    float* x = sm;                                   // [E] logits
    float* gscore = sm + E;                          // [n_group]
    unsigned char* taken = (unsigned char*)(gscore + n_group);  // [E]
    unsigned char* gkeep = taken + E;                // [n_group]
    __shared__ float scratch[32];
    __shared__ ValIdx wbest[32];
    const int t = blockIdx.x;
    for (int i = threadIdx.x; i < E; i += blockDim.x) { x[i] = logits[(int64_t)t * E + i]; taken[i] = 0; }
    __syncthreads();
    float m = NEG_INF;
    for (int i = threadIdx.x; i < E; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max(m, scratch);
    float s = 0.f;
    for (int i = threadIdx.x; i < E; i += blockDim.x) s += expf(x[i] - m);
    s = block_sum(s, scratch);
    const float lse = m + logf(s);
    if (threadIdx.x == 0) lse_out[t] = lse;
    if (probs)
        for (int i = threadIdx.x; i < E; i += blockDim.x) probs[(int64_t)t * E + i] = expf(x[i] - lse);

    const uint64_t base = (uint64_t)t * E;
    if (kind == 1) {
        // choice = sigmoid + bias; groups score by the sum of their top-2; unselected groups -> 0.
        const int per = E / n_group;
        for (int i = threadIdx.x; i < E; i += blockDim.x) {
            float sg = 1.f / (1.f + expf(-x[i]));
            x[i] = sg + (bias ? bias[i] : 0.f);  // x now holds the choice scores
        }
        __syncthreads();
        if (n_group > 1) {
            for (int g = threadIdx.x; g < n_group; g += blockDim.x) {
                float a = NEG_INF, b = NEG_INF;
                for (int i = g * per; i < (g + 1) * per; ++i) {
                    float v = x[i];
                    if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
                }
                gscore[g] = a + b;
                gkeep[g] = 0;
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                for (int r = 0; r < topk_group; ++r) {
                    int best = -1; float bv = NEG_INF;
                    for (int g = 0; g < n_group; ++g)
                        if (!gkeep[g] && (best < 0 || gscore[g] > bv)) { best = g; bv = gscore[g]; }
                    gkeep[best] = 1;
                }
            }
            __syncthreads();
            for (int i = threadIdx.x; i < E; i += blockDim.x)
                if (!gkeep[i / per]) x[i] = 0.f;
            __syncthreads();
        }
    }
    for (int j = 0; j < k; ++j) {
        ValIdx best = {NEG_INF, -1};
        for (int i = threadIdx.x; i < E; i += blockDim.x) {
            if (taken[i]) continue;
            float v = x[i];
            if (kind == 2 && j == 0 && noise1) v += gumbel((uint64_t)seed, 1, base + i);
            if (kind == 2 && j == 1 && noise2) v += gumbel((uint64_t)seed, 2, base + i);
            best = better(best, ValIdx{v, i});
        }
        best = block_best(best, wbest);
        if (threadIdx.x == 0) {
            taken[best.i] = 1;
            ids[(int64_t)j * T + t] = best.i;
            float l = logits[(int64_t)t * E + best.i];
            gates[(int64_t)j * T + t] = kind == 1 ? 1.f / (1.f + expf(-l)) : expf(l - lse);
        }
        __syncthreads();
    }
    // Dropless inference: the combine weights too (combine_weights with every slot kept).
    if (wout && threadIdx.x == 0) {
        float d = 1.f;
        if (wnorm) {
            float s = 0.f;
            for (int j = 0; j < k; ++j) s += gates[(int64_t)j * T + t];
            d = fmaxf(s + wadd, wclamp);
        }
        for (int j = 0; j < k; ++j) wout[(int64_t)j * T + t] = wscale * gates[(int64_t)j * T + t] / d;
    }
}

// w = scale · g · kept / D, D = max(Σ g·kept + add, clamp_min) when normalising; one thread per token.
extern "C" __global__ void combine_weights(float* w, const float* g, const int* pos, int T, int k, int normalize,
                                           float add, float clamp_min, float scale) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    float d = 1.f;
    if (normalize) {
        float s = 0.f;
        for (int j = 0; j < k; ++j) s += pos[j * T + t] >= 0 ? g[j * T + t] : 0.f;
        d = fmaxf(s + add, clamp_min);
    }
    for (int j = 0; j < k; ++j) w[j * T + t] = pos[j * T + t] >= 0 ? scale * g[j * T + t] / d : 0.f;
}

// dlogits for one token per block: through the weight rule, the scoring (softmax or sigmoid),
// the aux loss (coefficient aux_coef, counts c) and the z-loss.
extern "C" __global__ void route_backward(float* dlogits, const float* logits, const float* lse, const int* ids,
                                          const float* g, const float* w, const float* dw, const int* pos,
                                          const int* counts, int T, int E, int k, int sigmoid, int normalize,
                                          float add, float clamp_min, float scale, float aux_coef, float z_coef) {
    extern __shared__ float dp[];
    __shared__ float dg[32];
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    const float l = lse[t];
    const float Tf = (float)T;
    if (threadIdx.x == 0) {
        float s = 0.f, dot = 0.f;
        for (int j = 0; j < k; ++j) {
            bool kept = pos[j * T + t] >= 0;
            s += kept ? g[j * T + t] : 0.f;
            dot += dw[j * T + t] * w[j * T + t];
        }
        float d = 1.f;
        if (normalize) {
            if (s + add < clamp_min) { d = clamp_min; dot = 0.f; } else { d = s + add; }
        }
        for (int j = 0; j < k; ++j) {
            float kept = pos[j * T + t] >= 0 ? 1.f : 0.f;
            dg[j] = normalize ? kept / d * (scale * dw[j * T + t] - dot) : scale * kept * dw[j * T + t];
        }
    }
    for (int i = threadIdx.x; i < E; i += blockDim.x)
        dp[i] = sigmoid ? 0.f : aux_coef * E * (float)counts[i] / (Tf * Tf);
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int j = 0; j < k; ++j) {
            int i = ids[j * T + t];
            if (sigmoid) {
                float sg = 1.f / (1.f + expf(-logits[(int64_t)t * E + i]));
                dp[i] += dg[j] * sg * (1.f - sg);
            } else {
                dp[i] += dg[j];
            }
        }
    }
    __syncthreads();
    float dot = 0.f;
    if (!sigmoid)
        for (int i = threadIdx.x; i < E; i += blockDim.x) dot += expf(logits[(int64_t)t * E + i] - l) * dp[i];
    dot = block_sum(dot, scratch);
    const float zc = z_coef * 2.f * l / Tf;
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        float p = expf(logits[(int64_t)t * E + i] - l);
        float v = sigmoid ? dp[i] : p * (dp[i] - dot);
        dlogits[(int64_t)t * E + i] = v + zc * p;
    }
}

extern "C" __global__ void i32_to_f32(float* out, const int* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (float)x[i];
}

// bias_e += rate · sign(mean load − load_e); one block.
extern "C" __global__ void update_bias(float* bias, const int* load, int E, float rate) {
    __shared__ float scratch[32];
    float s = 0.f;
    for (int i = threadIdx.x; i < E; i += blockDim.x) s += (float)load[i];
    const float mean = block_sum(s, scratch) / E;
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        float d = mean - (float)load[i];
        bias[i] += rate * (d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f));
    }
}
