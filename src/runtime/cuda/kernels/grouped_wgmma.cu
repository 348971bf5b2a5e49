// Hopper (sm_90a) grouped GEMMs: the wgmma kernels fed by cp.async (wg_*) and the TMA
// warp-specialised persistent kernels (tt_*), VARM and VARK as grouped_mma.cu (contract there and
// in ops/grouped.rs; launchers in ops/grouped_cuda.rs). Other archs get trapping stubs so the
// family compiles everywhere.
#include "grouped.cuh"

// ---- Hopper (sm_90a) path: wgmma.mma_async from shared memory, CTA tile 128×256×64, two
// consumer warpgroups of 64×256 (128 f32 accumulators per thread), 4-stage cp.async pipeline into
// 128-byte-swizzled tiles (the layout wgmma descriptors and TMA's SWIZZLE_128B share: 16-byte
// chunk c of 128-byte line l stored at chunk c ^ (l % 8), atoms of 8 lines = 1024 B).
//   K-major operand tile  [R][64 k]              line = one row's 64 k values
//   MN-major operand tile [R/64][64 k][64 m|n]   line = 64 consecutive m (or n) at one k
// Descriptors: K-major SBO = 1024 (next 8 rows), k16 step = +32 B; MN-major LBO = 8 KB (next 64
// m/n), SBO = 1024 (next 8 k), k16 step = +2 KB.
#define WBM 128
#define WBN 256
#define WBK 64
#define WSTAGES 4
#define WTHREADS 256
#define W_A_BYTES (WBM * WBK * 2)
#define W_B_BYTES (WBN * WBK * 2)
#define W_STAGE_BYTES (W_A_BYTES + W_B_BYTES)
// Tiles of consecutive m-tiles walked column by column (L2 reuse of both operands): strips of 8
// (8, 16 and 32 measured within the run-to-run spread for the TMA kernels: BENCHMARKS NOTES, TMA
// kernels; the DRAM traffic is not the limiter).
#define W_SWIZZLE 8

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
           (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

template <int TA, int TB> __device__ __forceinline__ void wgmma_n256(float* d, uint64_t da, uint64_t db, bf16_t) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, 1, 1, 1, %130, %131;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}
template <int TA, int TB> __device__ __forceinline__ void wgmma_n256(float* d, uint64_t da, uint64_t db, f16_t) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, 1, 1, 1, %130, %131;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}

template <int TA, int TB> __device__ __forceinline__ void wgmma_n128(float* d, uint64_t da, uint64_t db, bf16_t) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1, 1, 1, %66, %67;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}
template <int TA, int TB> __device__ __forceinline__ void wgmma_n128(float* d, uint64_t da, uint64_t db, f16_t) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1, 1, 1, %66, %67;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}

// One operand's 64-wide k slice into a swizzled stage buffer at shared address `s`.
//   KMAJ: G(r, k) = G[r·ld + k]   else G(r, k) = G[k·ld + r];  valid r < Rv, k < Kdim
template <typename T, bool KMAJ, int R, int NT = WTHREADS>
__device__ __forceinline__ void wg_load(uint32_t s, const T* __restrict__ G, int ld, int r0, int Rv, int k0, int Kdim,
                                        int tid) {
    constexpr int CHUNKS = R * WBK / 8;
#pragma unroll
    for (int i = 0; i < CHUNKS / NT; ++i) {
        const int c = tid + i * NT;
        if (KMAJ) {
            const int r = c >> 3, kc = c & 7;
            const bool ok = (r0 + r < Rv) && (k0 + kc * 8 < Kdim);
            const T* src = ok ? G + (int64_t)(r0 + r) * ld + k0 + kc * 8 : G;
            cp_async16(s + r * 128 + ((kc ^ (r & 7)) << 4), src, ok);
        } else {
            const int kr = c / (R / 8), rc = c % (R / 8);
            const bool ok = (k0 + kr < Kdim) && (r0 + rc * 8 < Rv);
            const T* src = ok ? G + (int64_t)(k0 + kr) * ld + r0 + rc * 8 : G;
            cp_async16(s + (rc >> 3) * (WBK * 128) + kr * 128 + (((rc & 7) ^ (kr & 7)) << 4), src, ok);
        }
    }
}

// 16 bytes of TO <-> floats (V = 16 / sizeof(TO) of them) for the staged epilogue.
template <typename TO> struct Vec16;
template <> struct Vec16<float> {
    static constexpr int V = 4;
    static __device__ __forceinline__ void load(const float* p, float* v) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    }
    static __device__ __forceinline__ void store(float* p, const float* v) {
        float4 q;
        q.x = v[0], q.y = v[1], q.z = v[2], q.w = v[3];
        *reinterpret_cast<float4*>(p) = q;
    }
};
template <typename H> struct Vec16Half {
    static constexpr int V = 8;
    static __device__ __forceinline__ void load(const H* p, float* v) {
        const uint4 q = *reinterpret_cast<const uint4*>(p);
        const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            H lo, hi;
            lo.v = (unsigned short)(w[i] & 0xffffu);
            hi.v = (unsigned short)(w[i] >> 16);
            v[2 * i] = to_float(lo), v[2 * i + 1] = to_float(hi);
        }
    }
    static __device__ __forceinline__ void store(H* p, const float* v) {
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            w[i] = (uint32_t)from_float<H>(v[2 * i]).v | ((uint32_t)from_float<H>(v[2 * i + 1]).v << 16);
        uint4 q;
        q.x = w[0], q.y = w[1], q.z = w[2], q.w = w[3];
        *reinterpret_cast<uint4*>(p) = q;
    }
};
template <> struct Vec16<bf16_t> : Vec16Half<bf16_t> {};
template <> struct Vec16<f16_t> : Vec16Half<f16_t> {};

// A thread's part of its warp's 16 accumulator rows (a 64×256 wgmma fragment per warpgroup:
// acc[4i + 2h + j] is row 8h + lane/4, column 8i + 2·(lane%4) + j) stored as f32 into staging
// shared memory from `base` (its first element), rows LDS floats apart.
template <int LDS> __device__ __forceinline__ void stage_fragment(uint32_t base, const float* acc) {
#pragma unroll
    for (int i = 0; i < 32; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(base + (8 * h * LDS + 8 * i) * 4),
                         "f"(acc[4 * i + 2 * h]), "f"(acc[4 * i + 2 * h + 1])
                         : "memory");
}

// V staged f32 values from shared address `saddr` into v; with ACC, plus the V values at d (the
// read half of a read-add-write epilogue).
template <int V, bool ACC, typename TO>
__device__ __forceinline__ void staged_read_acc(float* v, uint32_t saddr, const TO* d) {
#pragma unroll
    for (int q = 0; q < V; q += 4)
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                     : "=f"(v[q]), "=f"(v[q + 1]), "=f"(v[q + 2]), "=f"(v[q + 3])
                     : "r"(saddr + q * 4)
                     : "memory");
    if (ACC) {
        float old[V];
        Vec16<TO>::load(d, old);
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] += old[q];
    }
}

// One CTA: a WBM×WBN tile of C = op(A)·op(B) over Kdim (operand conventions as tile_gemm).
template <typename T, typename TO, bool A_KMAJ, bool B_KMAJ, bool ACC = false>
__device__ __forceinline__ void wg_tile(TO* __restrict__ C, int ldc, const T* __restrict__ A, int lda,
                                        const T* __restrict__ B, int ldb, int m0, int n0, int Mv, int Nv, int Kdim,
                                        uint32_t smem, float* sumsq = nullptr) {
    const int tid = threadIdx.x, wg = tid >> 7;
    const int nk = (Kdim + WBK - 1) / WBK;
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;

#pragma unroll
    for (int s = 0; s < WSTAGES - 1; ++s) {
        if (s < nk) {
            const uint32_t st = smem + s * W_STAGE_BYTES;
            wg_load<T, A_KMAJ, WBM>(st, A, lda, m0, Mv, s * WBK, Kdim, tid);
            wg_load<T, B_KMAJ, WBN>(st + W_A_BYTES, B, ldb, n0, Nv, s * WBK, Kdim, tid);
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
        cp_async_wait<WSTAGES - 2>();
        fence_proxy_async();  // cp.async wrote through the generic proxy; wgmma reads via the async one
        __syncthreads();
        const uint32_t sa = smem + (kt % WSTAGES) * W_STAGE_BYTES, sb = sa + W_A_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < WBK / 16; ++ks) {
            const uint64_t da = A_KMAJ ? wg_desc(sa + wg * 64 * 128 + ks * 32, 16, 1024)
                                       : wg_desc(sa + wg * WBK * 128 + ks * 2048, WBK * 128, 1024);
            const uint64_t db = B_KMAJ ? wg_desc(sb + ks * 32, 16, 1024) : wg_desc(sb + ks * 2048, WBK * 128, 1024);
            wgmma_n256<A_KMAJ ? 0 : 1, B_KMAJ ? 0 : 1>(acc, da, db, T{});
        }
        wgmma_commit();
        wgmma_wait<1>();  // this warpgroup's previous k step is done ...
        __syncthreads();  // ... and everyone's: its stage can be refilled
        const int pf = kt + WSTAGES - 1;
        if (pf < nk) {
            const uint32_t st = smem + (pf % WSTAGES) * W_STAGE_BYTES;
            wg_load<T, A_KMAJ, WBM>(st, A, lda, m0, Mv, pf * WBK, Kdim, tid);
            wg_load<T, B_KMAJ, WBN>(st + W_A_BYTES, B, ldb, n0, Nv, pf * WBK, Kdim, tid);
        }
        cp_async_commit();
    }
    wgmma_wait<0>();
    cp_async_wait<0>();

    // Epilogue through shared memory (the stage ring is free now): fragments go to a padded f32
    // tile, then every thread moves 16-byte row chunks (coalesced; with ACC a read-add-write).
    // Fragment layout (per warp as mma.sync m16n8): d[4i + 2h + j] at row 16·warp + lane/4 + 8h,
    // column 8i + 2·(lane%4) + j of the warpgroup's 64×256 block.
    constexpr int LDS = WBN + 8;  // staged row stride in floats: 8 rows of a fragment store hit distinct banks
    __syncthreads();              // both warpgroups' last wgmma have read their stages
    {
        const int warp = (tid >> 5) & 3, lane = tid & 31;
        stage_fragment<LDS>(smem + ((wg * 64 + warp * 16 + (lane >> 2)) * LDS + 2 * (lane & 3)) * 4, acc);
    }
    __syncthreads();
    // Batches of 8 chunks per thread: all loads (shared, and global with ACC) issued before any
    // store, so a read-add-write epilogue keeps 8 global loads in flight per thread.
    // With `sumsq`, the squares of the values written are summed into it (one atomic per warp;
    // every thread runs the same number of batches).
    constexpr int V = Vec16<TO>::V, CPR = WBN / V, EB = 8;
    float ss = 0.f;
    for (int c0 = tid; c0 < WBM * CPR; c0 += WTHREADS * EB) {
        float v[EB][V];
        TO* dst[EB];
        bool ok[EB];
#pragma unroll
        for (int b = 0; b < EB; ++b) {
            const int c = c0 + b * WTHREADS;
            const int r = c / CPR, col = (c - r * CPR) * V;
            const int m = m0 + r, n = n0 + col;
            ok[b] = c < WBM * CPR && m < Mv && n < Nv;
            dst[b] = C + (int64_t)m * ldc + n;
            if (!ok[b]) continue;
            staged_read_acc<V, ACC>(v[b], smem + (r * LDS + col) * 4, dst[b]);
        }
#pragma unroll
        for (int b = 0; b < EB; ++b)
            if (ok[b]) {
                Vec16<TO>::store(dst[b], v[b]);
#pragma unroll
                for (int q = 0; q < V; ++q) ss += v[b][q] * v[b][q];
            }
    }
    if (sumsq) {
        ss = warp_sum(ss);
        if ((tid & 31) == 0) atomicAdd(sumsq, ss);
    }
}

__device__ __forceinline__ uint32_t wg_smem_base(const void* smem) { return (smem_addr(smem) + 1023u) & ~1023u; }

// VARM on Hopper: as GG_VARM with 128×256 tiles; tile_prefix counted in WBM-row tiles. Tiles run
// in column strips W_SWIZZLE m-tiles tall (a strip may span groups; each CTA finds its own).
template <typename T, bool B_KMAJ>
__device__ __forceinline__ void wg_varm(T* y, const T* x, const T* w, const int* offsets, const int* tile_prefix,
                                        int E, int M, int N, int K, uint32_t smem) {
    const int ntn = (N + WBN - 1) / WBN, total = tile_prefix[E];
    const int bid = blockIdx.x;
    if (bid >= total * ntn) {
        const int first = total * ntn;
        zero_tail<T>(y, offsets, E, M, N, bid - first, gridDim.x - first);
        return;
    }
    const int strip = bid / (W_SWIZZLE * ntn), in = bid - strip * (W_SWIZZLE * ntn);
    const int h = min(W_SWIZZLE, total - strip * W_SWIZZLE);
    const int nt = in / h, mt = strip * W_SWIZZLE + (in - nt * h);
    const int e = find_group(tile_prefix, E, mt);
    const int row0 = offsets[e], rws = offsets[e + 1] - row0;
    const int m0 = (mt - tile_prefix[e]) * WBM;
    const T* we = w + (int64_t)e * N * K;
    wg_tile<T, T, true, B_KMAJ>(y + (int64_t)row0 * N, N, x + (int64_t)row0 * K, K, we, B_KMAJ ? K : N, m0,
                                nt * WBN, rws, N, K, smem);
}
#define WG_VARM(NAME, T, B_KMAJ, NTHREADS)                                                              \
    extern "C" __global__ void __launch_bounds__(NTHREADS, 1) NAME(T* y, const T* x, const T* w,       \
                                                                    const int* offsets, const int* tile_prefix, \
                                                                    int E, int M, int N, int K) {       \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        wg_varm<T, B_KMAJ>(y, x, w, offsets, tile_prefix, E, M, N, K, wg_smem_base(wsmem));          \
    }

// VARK on Hopper: grid (ceil(P/WBM)·ceil(Q/WBN), E). Accumulating into an empty group's
// gradient leaves it as it is (unless its squares are summed): those blocks exit.
#define WG_VARK(NAME, T, TO, ACC, TILE, NTHREADS)                                                       \
    extern "C" __global__ void __launch_bounds__(NTHREADS, 1) NAME(TO* out, const T* a, const T* b,    \
                                                                    const int* offsets, int P, int Q,   \
                                                                    float* sumsq) {                     \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        const int e = blockIdx.y;                                                                       \
        const int ntq = (Q + WBN - 1) / WBN;                                                            \
        const int pt = blockIdx.x / ntq, qt = blockIdx.x - pt * ntq;                                    \
        const int row0 = offsets[e], rows = offsets[e + 1] - row0;                                      \
        if (ACC && rows == 0 && !sumsq) return;                                                         \
        TILE<T, TO, false, false, ACC>(out + (int64_t)e * P * Q, Q, a + (int64_t)row0 * P, P, b + (int64_t)row0 * Q, Q, \
                                     pt * WBM, qt * WBN, P, Q, rows, wg_smem_base(wsmem), sumsq);       \
    }

#else
// Other archs: the launcher never picks these (they exist so every arch has the same symbols).
#define WG_VARM(NAME, T, B_KMAJ, NTHREADS)                                                              \
    extern "C" __global__ void NAME(T*, const T*, const T*, const int*, const int*, int, int, int, int) { __trap(); }
#define WG_VARK(NAME, T, TO, ACC, TILE, NTHREADS)                                                       \
    extern "C" __global__ void NAME(TO*, const T*, const T*, const int*, int, int, float*) { __trap(); }
#endif

#define WG_FAMILY(P, TILE, NTHREADS)                                                                    \
    WG_VARM(P##_nt_bf16, bf16_t, true, NTHREADS)                                                        \
    WG_VARM(P##_nn_bf16, bf16_t, false, NTHREADS)                                                       \
    WG_VARM(P##_nt_f16, f16_t, true, NTHREADS)                                                          \
    WG_VARM(P##_nn_f16, f16_t, false, NTHREADS)                                                         \
    WG_VARK(P##_tn_bf16_f32, bf16_t, float, false, TILE, NTHREADS)                                      \
    WG_VARK(P##_tn_bf16_bf16, bf16_t, bf16_t, false, TILE, NTHREADS)                                    \
    WG_VARK(P##_tn_f16_f32, f16_t, float, false, TILE, NTHREADS)                                        \
    WG_VARK(P##_tn_f16_f16, f16_t, f16_t, false, TILE, NTHREADS)                                        \
    WG_VARK(P##_tn_bf16_f32_acc, bf16_t, float, true, TILE, NTHREADS)                                   \
    WG_VARK(P##_tn_bf16_bf16_acc, bf16_t, bf16_t, true, TILE, NTHREADS)                                 \
    WG_VARK(P##_tn_f16_f32_acc, f16_t, float, true, TILE, NTHREADS)                                     \
    WG_VARK(P##_tn_f16_f16_acc, f16_t, f16_t, true, TILE, NTHREADS)
WG_FAMILY(wg, wg_tile, WTHREADS)

// ---- Hopper TMA + warp-specialised persistent VARM (forward and dgrad).
// 384 threads: warps 0-7 are two consumer warpgroups (64×256 of the 128×256 tile each, as
// wg_tile; setmaxnreg gives them 232 registers), warps 8-11 the producer warpgroup (40
// registers) whose first lane issues the TMA loads (cp.async.bulk.tensor into the
// same 128-byte-swizzled stage layout wg_tile's cp.async writes). Stage s has a full barrier (the
// producer's expect_tx; the TMA completes it) and an empty barrier (one arrive per consumer warp
// once its wgmma stopped reading the stage). CTAs loop over tiles (grid = SMs), so the producer
// loads the next tile's stages while the consumers run the epilogue (registers straight to
// global: no smem staging, the ring belongs to the producer).
// Tensor maps (host: grouped_cuda.rs): A = x [Mx, K] box {64, 128}; B K-major = w as [E·N, K]
// box {64, 256}; B N-major = w as [E·K, N] box {64, 64} (4 per stage; needs K % 64 == 0 so a
// k slice never crosses into the next expert). Out-of-range rows and k read as zeros.
#define TT_THREADS 384
#define TT_CONSUMERS 256
struct __align__(64) TmaMap {
    unsigned long long v[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const TmaMap* map, int c0, int c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

// The stage ring's barriers at `bars`: full[s] at bars + 8s (one arrive: the producer's
// expect_tx), empty[s] at bars + 8(S + s) (one arrive per consumer warp: ARRIVES), then EXTRA
// more with ARRIVES arrives each at bars + 8(2S + i).
template <int S = WSTAGES, int ARRIVES = TT_CONSUMERS / 32, int EXTRA = 0>
__device__ __forceinline__ void tt_init_barriers(uint32_t bars) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(bars + 8 * s, 1);
            mbar_init(bars + 8 * (S + s), ARRIVES);
        }
        for (int i = 0; i < EXTRA; ++i) mbar_init(bars + 8 * (2 * S + i), ARRIVES);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
}

// Tile t of the VARM schedule (as wg_varm: column strips W_SWIZZLE m-tiles tall).
struct TtTile {
    int e, row0, rws, m0, n0;
};
__device__ __forceinline__ TtTile tt_tile(int t, int total, int ntn, const int* offsets, const int* tile_prefix,
                                          int E) {
    const int strip = t / (W_SWIZZLE * ntn), in = t - strip * (W_SWIZZLE * ntn);
    const int h = min(W_SWIZZLE, total - strip * W_SWIZZLE);
    const int nt = in / h, mt = strip * W_SWIZZLE + (in - nt * h);
    TtTile r;
    r.e = find_group(tile_prefix, E, mt);
    r.row0 = offsets[r.e];
    r.rws = offsets[r.e + 1] - r.row0;
    r.m0 = (mt - tile_prefix[r.e]) * WBM;
    r.n0 = nt * WBN;
    return r;
}

template <typename T, bool B_KMAJ>
__device__ __forceinline__ void tt_varm(T* y, const TmaMap* ta, const TmaMap* tb, const int* offsets,
                                        const int* tile_prefix, int E, int M, int N, int K, uint32_t smem) {
    const int ntn = (N + WBN - 1) / WBN, total = tile_prefix[E], ntiles = total * ntn;
    const int nk = (K + WBK - 1) / WBK;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const uint32_t bars = smem + WSTAGES * W_STAGE_BYTES;
    tt_init_barriers(bars);
    if (warp >= TT_CONSUMERS / 32) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (warp == TT_CONSUMERS / 32 && lane == 0) {
            int it = 0;
            for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
                const TtTile tl = tt_tile(t, total, ntn, offsets, tile_prefix, E);
                for (int kt = 0; kt < nk; ++kt, ++it) {
                    const int s = it % WSTAGES;
                    const uint32_t full = bars + 8 * s, st = smem + s * W_STAGE_BYTES;
                    mbar_wait(bars + 8 * (WSTAGES + s), ((it / WSTAGES) & 1) ^ 1);
                    mbar_expect_tx(full, W_STAGE_BYTES);
                    tma_load_2d(st, ta, kt * WBK, tl.row0 + tl.m0, full);
                    if (B_KMAJ) {
                        tma_load_2d(st + W_A_BYTES, tb, kt * WBK, tl.e * N + tl.n0, full);
                    } else {
#pragma unroll
                        for (int j = 0; j < WBN / 64; ++j)
                            tma_load_2d(st + W_A_BYTES + j * (WBK * 128), tb, tl.n0 + j * 64, tl.e * K + kt * WBK,
                                        full);
                    }
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int wg = warp >> 2;
        int it = 0;
        for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
            const TtTile tl = tt_tile(t, total, ntn, offsets, tile_prefix, E);
            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.f;
            for (int kt = 0; kt < nk; ++kt, ++it) {
                const int s = it % WSTAGES;
                mbar_wait(bars + 8 * s, (it / WSTAGES) & 1);
                const uint32_t sa = smem + s * W_STAGE_BYTES, sb = sa + W_A_BYTES;
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < WBK / 16; ++ks) {
                    const uint64_t da = wg_desc(sa + wg * 64 * 128 + ks * 32, 16, 1024);
                    const uint64_t db =
                        B_KMAJ ? wg_desc(sb + ks * 32, 16, 1024) : wg_desc(sb + ks * 2048, WBK * 128, 1024);
                    wgmma_n256<0, B_KMAJ ? 0 : 1>(acc, da, db, T{});
                }
                wgmma_commit();
                wgmma_wait<1>();  // the previous stage's wgmma are done: release it
                if (kt > 0 && lane == 0) mbar_arrive(bars + 8 * (WSTAGES + (it - 1) % WSTAGES));
            }
            wgmma_wait<0>();
            if (nk > 0 && lane == 0) mbar_arrive(bars + 8 * (WSTAGES + (it - 1) % WSTAGES));
            // Epilogue: fragment d[4i + 2h + j] at row 16·warp + lane/4 + 8h, column 8i + 2·(lane%4) + j
            // of the warpgroup's 64×256 block; pairs of columns stored as one 4-byte word.
            const int r = wg * 64 + (warp & 3) * 16 + (lane >> 2);
            T* yb = y + (int64_t)(tl.row0 + tl.m0) * N + tl.n0 + 2 * (lane & 3);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int rr = r + 8 * h;
                if (tl.m0 + rr >= tl.rws) continue;
                T* yr = yb + (int64_t)rr * N;
#pragma unroll
                for (int i = 0; i < 32; ++i) {
                    const int c = tl.n0 + 8 * i + 2 * (lane & 3);
                    if (c < N) {
                        const uint32_t wv = (uint32_t)from_float<T>(acc[4 * i + 2 * h]).v |
                                            ((uint32_t)from_float<T>(acc[4 * i + 2 * h + 1]).v << 16);
                        *reinterpret_cast<uint32_t*>(yr + 8 * i) = wv;
                    }
                }
            }
        }
    }
    zero_tail<T>(y, offsets, E, M, N, blockIdx.x, gridDim.x);
}
// The weight gradient's f32 tile out through TMA: 4 passes of 32 rows (tile rows 32j..32j+31:
// warps 2(j%2), 2(j%2)+1 of warpgroup j/2 write their fragments into a staging buffer as 8 boxes
// of 32 rows × 32 columns, 128-byte lines swizzled as SWIZZLE_128B reads them), then one thread
// stores the boxes (ACC: adds them in L2, cp.reduce.async.bulk .add) through `to`, a 3-D map
// over out [E, P, Q] (rows past P and columns past Q are clipped by the TMA unit). The staging
// is only waited for (read by the TMA unit) when it is about to be written again, so the last
// pass drains while the next tile's main loop runs. Without ACC the squares of the values go
// to `ss`. (Staging 2 or 4 passes at once with a ring of 3 or 2 stages was slower: NOTES.)
// One pass's fragments into the staging as the TMA store's boxes of 32 rows × 128 bytes (4 KB
// each: 32 f32 or 64 16-bit values a row, 128-byte lines swizzled as SWIZZLE_128B reads them):
// `a` is the warp's m64 accumulator block, its rows 16·(warp % 2) + lane / 4 (+ 8) the staging
// rows (warp and lane: the caller's). With SUMS the squares of the values (f32, before a 16-bit
// TO rounds them, as the CPU twin sums them) inside P × Q (tile row p, column q0 + ..) go to `ss`.
template <int COLS, bool SUMS, typename TO = float>
__device__ __forceinline__ void tt_stage_pass(const float* a, uint32_t stg, int warp, int lane, int p, int q0, int P,
                                              int Q, float& ss) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int R = (warp & 1) * 16 + (lane >> 2) + 8 * h;  // staging row
        const bool prow = p + R < P;
#pragma unroll
        for (int i = 0; i < COLS / 8; ++i) {
            const float x = a[4 * i + 2 * h], y = a[4 * i + 2 * h + 1];
            if constexpr (sizeof(TO) == 4) {
                const int chunk = 2 * (i & 3) + ((lane & 3) >> 1);
                const uint32_t addr = stg + (i >> 2) * 4096 + R * 128 + ((chunk ^ (R & 7)) << 4) + (lane & 1) * 8;
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(x), "f"(y) : "memory");
            } else {
                // Columns 8i + 2·(lane % 4), + 1: box i / 8, 16-byte chunk i % 8, bytes 4·(lane % 4).
                const uint32_t addr = stg + (i >> 3) * 4096 + R * 128 + (((i & 7) ^ (R & 7)) << 4) + (lane & 3) * 4;
                const uint32_t v = (uint32_t)from_float<TO>(x).v | ((uint32_t)from_float<TO>(y).v << 16);
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
            }
            if (SUMS && prow && q0 + 8 * i + 2 * (lane & 3) < Q) ss += x * x + y * y;
        }
    }
}

// NT = 128, COLS = 128: one warpgroup stores its own 128 × 128 tile (two m64 accumulator
// halves, 4 passes of 4 boxes) with its own staging, named barrier 2 + warpgroup and first
// thread (the ping-pong kernel). A 16-bit TO (NT = 128 only: `to` maps out as 16-bit with boxes
// of 32 rows × 64 columns) takes 8 KB a pass, so passes alternate between the staging's halves and
// a pass waits only for the one before the last (the TMA unit reading one half while the warps
// fill the other).
template <bool ACC, int NT = TT_CONSUMERS, int COLS = WBN, typename TO = float>
__device__ __forceinline__ void tt_store_tma(const float (&acc)[128], const TmaMap* to, uint32_t stg, int e, int p0,
                                             int q0, int P, int Q, float& ss) {
    static_assert((NT == TT_CONSUMERS && COLS == WBN && sizeof(TO) == 4) || (NT == 128 && COLS == 128),
                  "tile shapes");
    constexpr int BOXC = 128 / sizeof(TO), NBUF = sizeof(TO) == 4 ? 1 : 2;  // columns a box; staging buffers
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
    const int bar = NT == TT_CONSUMERS ? 1 : 2 + wg, lead = tid % NT == 0;
    // Unrolled for the accumulator halves (register indices must be constants).
#pragma unroll(COLS == 128 ? 4 : 1)
    for (int pass = 0; pass < 4; ++pass) {
        // Tile rows 32·pass..: the m64 block pass / 2 (a warpgroup's, or an accumulator half),
        // its warps 2·(pass % 2) and 2·(pass % 2) + 1.
        const int mb = pass >> 1;
        const bool mine = (pass & 1) == ((warp & 3) >> 1) && (NT == 128 || mb == wg);
        const float* a = acc + (COLS == 128 ? 64 * mb : 0);
        const uint32_t buf = stg + (pass % NBUF) * (32 * COLS * sizeof(TO));
        if (lead) asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(NBUF - 1) : "memory");
        asm volatile("bar.sync %0, %1;" ::"r"(bar), "n"(NT) : "memory");
        if (mine) {
            tt_stage_pass<COLS, !ACC, TO>(a, buf, warp, lane, p0 + pass * 32, q0, P, Q, ss);
            fence_proxy_async();  // generic-proxy writes, read by the TMA unit
        }
        asm volatile("bar.sync %0, %1;" ::"r"(bar), "n"(NT) : "memory");
        if (lead) {
#pragma unroll 1
            for (int b = 0; b < COLS / BOXC && q0 + BOXC * b < Q; ++b) {
                if (ACC)
                    asm volatile(
                        "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.bulk_group [%0, {%1, %2, %3}], [%4];" ::"l"(
                            reinterpret_cast<uint64_t>(to)),
                        "r"(q0 + BOXC * b), "r"(p0 + pass * 32), "r"(e), "r"(buf + b * 4096)
                        : "memory");
                else
                    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];" ::"l"(
                                     reinterpret_cast<uint64_t>(to)),
                                 "r"(q0 + BOXC * b), "r"(p0 + pass * 32), "r"(e), "r"(buf + b * 4096)
                                 : "memory");
            }
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        }
    }
}

// Lines valid..63 of a stage's `subs` 64-line sub-tiles (contiguous, 8 KB each) set to zero by
// the NT threads of named barrier `bar` (`t` = thread within them): a group's last k slice holds
// the next group's rows, which must not reach the sums (a line is one row's 64 values, so the
// swizzle does not matter).
template <int NT>
__device__ __forceinline__ void tt_zero_lines(uint32_t sa, int subs, int valid, int t, int bar) {
    const int per_tile = (WBK - valid) * 8;
    for (int c = t; c < subs * per_tile; c += NT) {
        const int sub = c / per_tile, rest = c - sub * per_tile;
        const uint32_t addr = sa + sub * (WBK * 128) + (valid + (rest >> 3)) * 128 + (rest & 7) * 16;
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(addr), "r"(0) : "memory");
    }
    fence_proxy_async();
    asm volatile("bar.sync %0, %1;" ::"r"(bar), "n"(NT) : "memory");
}

// Tile t of a VARK schedule over E groups of ntp × ntq tiles of BM_ × BN_ (p × q): group by
// group, each in column strips W_SWIZZLE p-tiles tall (as VARM).
template <int BM_, int BN_>
__device__ __forceinline__ void tt_vark_tile(int t, int ntp, int ntq, int& e, int& p0, int& q0) {
    const int per = ntp * ntq;
    e = t / per;
    const int in = t - e * per;
    const int strip = in / (W_SWIZZLE * ntq), r = in - strip * (W_SWIZZLE * ntq);
    const int h = min(W_SWIZZLE, ntp - strip * W_SWIZZLE);
    const int qt = r / h, pt = strip * W_SWIZZLE + (r - qt * h);
    p0 = pt * BM_, q0 = qt * BN_;
}

// The VARK producer (one thread): for each of this CTA's tiles, one stage per 64 rows of its
// group, A's BM_ / 64 and B's BN_ / 64 MN-major boxes of {64 p|q, 64 rows}, into a ring of S
// stages (full[s] at bars + 8s, empty[s] at bars + 8(S + s)).
template <int BM_, int BN_, int S>
__device__ __forceinline__ void tt_vark_produce(const TmaMap* ta, const TmaMap* tb, const int* offsets, int E, int P,
                                                int Q, uint32_t smem, uint32_t bars) {
    constexpr int A_BYTES = BM_ * WBK * 2, BYTES = (BM_ + BN_) * WBK * 2;
    const int ntp = (P + BM_ - 1) / BM_, ntq = (Q + BN_ - 1) / BN_, ntiles = E * ntp * ntq;
    int it = 0;
    for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
        int e, p0, q0;
        tt_vark_tile<BM_, BN_>(t, ntp, ntq, e, p0, q0);
        const int row0 = offsets[e], nk = (offsets[e + 1] - row0 + WBK - 1) / WBK;
        for (int kt = 0; kt < nk; ++kt, ++it) {
            const int s = it % S;
            const uint32_t full = bars + 8 * s, st = smem + s * BYTES;
            mbar_wait(bars + 8 * (S + s), ((it / S) & 1) ^ 1);
            mbar_expect_tx(full, BYTES);
            const int k0 = row0 + kt * WBK;
#pragma unroll
            for (int j = 0; j < BM_ / 64; ++j) tma_load_2d(st + j * (WBK * 128), ta, p0 + j * 64, k0, full);
#pragma unroll
            for (int j = 0; j < BN_ / 64; ++j) tma_load_2d(st + A_BYTES + j * (WBK * 128), tb, q0 + j * 64, k0, full);
        }
    }
}

// VARK (weight gradients) with TMA: out[e] (P × Q) = a[rows of e]ᵀ · b[rows of e], a [M, P] and
// b [M, Q] read as MN-major boxes of {64 p|q, 64 rows} (2 for A, 4 for B per stage). A group's
// rows start anywhere, so its last k slice may hold the next group's rows: the consumers zero
// those lines of every sub-tile (a line is one row's 64 values, so the swizzle does not matter)
// before their wgmma. Persistent: tiles (e, p-tile, q-tile) walked e by e in strips as VARM.
// ACC adds into out; with `sumsq` the squares of the values written are summed into it.
template <typename T, typename TO, bool ACC>
__device__ __forceinline__ void tt_vark(TO* out, const TmaMap* ta, const TmaMap* tb, const TmaMap* to,
                                        const int* offsets, int E, int P, int Q, float* sumsq, uint32_t smem) {
    const int ntp = (P + WBM - 1) / WBM, ntq = (Q + WBN - 1) / WBN, per = ntp * ntq, ntiles = E * per;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // Shared memory: the stage ring, the epilogue's staging (1024-aligned for the TMA store's
    // swizzle), the barriers.
    constexpr int STAGING = 32 * (WBN + 8) * 4;
    const uint32_t stg = smem + WSTAGES * W_STAGE_BYTES, bars = stg + STAGING;
    // f32 gradients leave through TMA: stored, or added in L2 with ACC (cp.reduce.async.bulk), so
    // the consumers never wait on global memory; ACC with `sumsq` needs the sums, so it reads.
    const bool tma_out = sizeof(TO) == 4 && !(ACC && sumsq);
    tt_init_barriers(bars);
    if (warp >= TT_CONSUMERS / 32) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (warp == TT_CONSUMERS / 32 && lane == 0)
            tt_vark_produce<WBM, WBN, WSTAGES>(ta, tb, offsets, E, P, Q, smem, bars);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int wg = warp >> 2;
        int it = 0;
        float ss = 0.f;
        for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
            int e, p0, q0;
            tt_vark_tile<WBM, WBN>(t, ntp, ntq, e, p0, q0);
            const int row0 = offsets[e], rws = offsets[e + 1] - row0, nk = (rws + WBK - 1) / WBK;
            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.f;
            for (int kt = 0; kt < nk; ++kt, ++it) {
                const int s = it % WSTAGES;
                mbar_wait(bars + 8 * s, (it / WSTAGES) & 1);
                const uint32_t sa = smem + s * W_STAGE_BYTES, sb = sa + W_A_BYTES;
                const int valid = rws - kt * WBK;
                // Lines valid..63 of the 6 sub-tiles (A's 2, B's 4) read as zeros.
                if (valid < WBK) tt_zero_lines<TT_CONSUMERS>(sa, W_STAGE_BYTES / (WBK * 128), valid, tid, 1);
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < WBK / 16; ++ks) {
                    const uint64_t da = wg_desc(sa + wg * WBK * 128 + ks * 2048, WBK * 128, 1024);
                    const uint64_t db = wg_desc(sb + ks * 2048, WBK * 128, 1024);
                    wgmma_n256<1, 1>(acc, da, db, T{});
                }
                wgmma_commit();
                wgmma_wait<1>();
                if (kt > 0 && lane == 0) mbar_arrive(bars + 8 * (WSTAGES + (it - 1) % WSTAGES));
            }
            wgmma_wait<0>();
            if (nk > 0 && lane == 0) mbar_arrive(bars + 8 * (WSTAGES + (it - 1) % WSTAGES));
            if (tma_out) {
                if (!(ACC && nk == 0)) tt_store_tma<ACC>(acc, to, stg, e, p0, q0, P, Q, ss);
                continue;
            }
            // Epilogue staged through shared memory past the ring (the ring is the producer's,
            // already filling for the next tile): 4 passes of 32 rows (warp j of each warpgroup
            // in pass j, fragment layout as wg_tile's), each moved as coalesced 16-byte row chunks
            // with all of a thread's loads (and ACC's global reads) issued before its stores.
            constexpr int LDS = WBN + 8, V = Vec16<TO>::V, CPR = WBN / V, EB = 32 * CPR / TT_CONSUMERS;
#pragma unroll 1
            for (int pass = 0; pass < 4; ++pass) {
                if ((warp & 3) == pass)
                    stage_fragment<LDS>(stg + ((wg * 16 + (lane >> 2)) * LDS + 2 * (lane & 3)) * 4, acc);
                asm volatile("bar.sync 1, %0;" ::"n"(TT_CONSUMERS) : "memory");
                float v[EB][V];
                // Chunk b of this thread: staged row sr = tid / CPR + b · (256 / CPR), column col.
                const int sr0 = tid / CPR, col = (tid - sr0 * CPR) * V, q = q0 + col;
                TO* const dst0 = out + ((int64_t)e * P + p0 + pass * 16) * Q + q;
                auto prow = [&](int b) {
                    const int sr = sr0 + b * (TT_CONSUMERS / CPR);
                    return (sr >> 4) * 64 + (sr & 15);
                };
#pragma unroll
                for (int b = 0; b < EB; ++b) {
                    const int sr = sr0 + b * (TT_CONSUMERS / CPR), pr = prow(b);
                    if (p0 + pass * 16 + pr >= P || q >= Q) continue;
                    staged_read_acc<V, ACC>(v[b], stg + (sr * LDS + col) * 4, dst0 + (int64_t)pr * Q);
                }
#pragma unroll
                for (int b = 0; b < EB; ++b)
                    if (p0 + pass * 16 + prow(b) < P && q < Q) {
                        Vec16<TO>::store(dst0 + (int64_t)prow(b) * Q, v[b]);
#pragma unroll
                        for (int u = 0; u < V; ++u) ss += v[b][u] * v[b][u];
                    }
                asm volatile("bar.sync 1, %0;" ::"n"(TT_CONSUMERS) : "memory");
            }
        }
        if (sumsq) {
            ss = warp_sum(ss);
            if (lane == 0) atomicAdd(sumsq, ss);
        }
        if (tma_out && tid == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
}
// The ping-pong kernel's other accumulating epilogue, through loads and stores instead of the
// L2's reduce-adds (a different unit: MOE_GG_PP_LDG mixes the two): one warpgroup's 128 × 128 f32
// tile in 4 passes of 32 rows staged as tt_store_tma's boxes, then each warp adds whole 512-byte
// row pieces, 8 rows' old values loaded (16 bytes a lane) before any is stored. Q % 4 == 0.
__device__ __forceinline__ void tt_add_ldg(const float (&acc)[128], float* out, uint32_t stg, int e, int p0, int q0,
                                           int P, int Q) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2, lt = tid & 127;
    const bool qok = q0 + 4 * lane < Q;
#pragma unroll
    for (int pass = 0; pass < 4; ++pass) {
        const float* a = acc + 64 * (pass >> 1);
        asm volatile("bar.sync %0, 128;" ::"r"(2 + wg) : "memory");  // the last pass's reads are done
        float no_sums = 0.f;
        if ((pass & 1) == ((warp & 3) >> 1)) tt_stage_pass<128, false>(a, stg, warp, lane, 0, q0, P, Q, no_sums);
        asm volatile("bar.sync %0, 128;" ::"r"(2 + wg) : "memory");
        // Row R = lt / 32 + 4i of the pass, 16-byte column chunk `lane` (box lane / 8).
        float* const base = out + ((int64_t)e * P + p0 + pass * 32) * Q + q0 + 4 * lane;
        float4 old[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int R = (lt >> 5) + 4 * i;
            old[i] = qok && p0 + pass * 32 + R < P ? *reinterpret_cast<const float4*>(base + (int64_t)R * Q)
                                                   : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int R = (lt >> 5) + 4 * i;
            if (!qok || p0 + pass * 32 + R >= P) continue;
            const uint32_t addr = stg + (lane >> 3) * 4096 + R * 128 + (((lane & 7) ^ (R & 7)) << 4);
            float4 v;
            asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                         : "r"(addr));
            v.x += old[i].x, v.y += old[i].y, v.z += old[i].z, v.w += old[i].w;
            *reinterpret_cast<float4*>(base + (int64_t)R * Q) = v;
        }
    }
}

// VARK ping-pong (f32 gradients out through TMA; the default, MOE_GG_PINGPONG=0 takes tt_vark):
// each consumer warpgroup owns every other tile of the CTA's list, 128 × 128 (p × q: two m64n128
// accumulator chains), so one warpgroup's f32 epilogue (a read-add-write in L2) runs while the
// other's main loop keeps the tensor cores busy (accumulating, the L2's reduce rate bounds it
// still: BENCHMARKS NOTES). Stages hold A's two 64 × 64 boxes and B's two (32 KB; ring of 6);
// each warpgroup has its own 16 KB staging. The ring is filled in tile order and each warpgroup skips the other's
// positions, so main loops are ordered: tile j's starts only after tile j − 1's was issued
// (done[w], one arrive per warp), which also keeps a full barrier's parity from aliasing (every
// position before ours has been filled by then).
#define PP_BM 128
#define PP_BN 128
#define PP_STAGES 6
#define PP_A_BYTES (PP_BM * WBK * 2)
#define PP_STAGE_BYTES (PP_A_BYTES + PP_BN * WBK * 2)
#define PP_STAGING (32 * PP_BN * 4)
// ACC with ldg_every = n > 0: every n-th tile of a warpgroup adds through tt_add_ldg (f32 TO only).
// A 16-bit TO: the gradient in the operands' type (`to` maps it as such), stored or added by TMA.
template <typename T, typename TO, bool ACC>
__device__ __forceinline__ void tt_vark_pp(TO* out, const TmaMap* ta, const TmaMap* tb, const TmaMap* to,
                                           const int* offsets, int E, int P, int Q, float* sumsq, int ldg_every,
                                           uint32_t smem) {
    const int ntp = (P + PP_BM - 1) / PP_BM, ntq = (Q + PP_BN - 1) / PP_BN, per = ntp * ntq, ntiles = E * per;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // Shared memory: the ring, two stagings (1024-aligned for the TMA store's swizzle), barriers:
    // full[s] at bars + 8s, empty[s] at bars + 8(S + s) (one arrive per warp of a warpgroup),
    // done[w] at bars + 8(2S + w).
    const uint32_t stg = smem + PP_STAGES * PP_STAGE_BYTES, bars = stg + 2 * PP_STAGING;
    const uint32_t done = bars + 8 * (2 * PP_STAGES);
    tt_init_barriers<PP_STAGES, 4, 2>(bars);
    if (warp >= TT_CONSUMERS / 32) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (warp == TT_CONSUMERS / 32 && lane == 0)
            tt_vark_produce<PP_BM, PP_BN, PP_STAGES>(ta, tb, offsets, E, P, Q, smem, bars);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int wg = warp >> 2;
        int it = 0, n = 0;  // ring position; this warpgroup's tiles so far
        float ss = 0.f;
        for (int t = blockIdx.x, j = 0; t < ntiles; t += gridDim.x, ++j) {
            int e, p0, q0;
            tt_vark_tile<PP_BM, PP_BN>(t, ntp, ntq, e, p0, q0);
            const int row0 = offsets[e], rws = offsets[e + 1] - row0, nk = (rws + WBK - 1) / WBK;
            if ((j & 1) != wg) {
                it += nk;
                continue;
            }
            // Tile j − 1 (the other warpgroup's: its n-th for warpgroup 1, its (n−1)-th for 0).
            if (j > 0) mbar_wait(done + 8 * (wg ^ 1), (wg ? n : n - 1) & 1);
            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.f;
            for (int kt = 0; kt < nk; ++kt, ++it) {
                const int s = it % PP_STAGES;
                mbar_wait(bars + 8 * s, (it / PP_STAGES) & 1);
                const uint32_t sa = smem + s * PP_STAGE_BYTES, sb = sa + PP_A_BYTES;
                const int valid = rws - kt * WBK;
                // Lines valid..63 of the 4 sub-tiles (A's 2, B's 2) read as zeros.
                if (valid < WBK) tt_zero_lines<128>(sa, PP_STAGE_BYTES / (WBK * 128), valid, tid & 127, 2 + wg);
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < WBK / 16; ++ks) {
                    const uint64_t db = wg_desc(sb + ks * 2048, WBK * 128, 1024);
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        wgmma_n128<1, 1>(acc + 64 * h, wg_desc(sa + h * (WBK * 128) + ks * 2048, WBK * 128, 1024), db,
                                         T{});
                }
                wgmma_commit();
                wgmma_wait<1>();
                if (kt > 0 && lane == 0) mbar_arrive(bars + 8 * (PP_STAGES + (it - 1) % PP_STAGES));
            }
            if (lane == 0) mbar_arrive(done + 8 * wg);  // the next tile's main loop may start
            wgmma_wait<0>();
            if (nk > 0 && lane == 0) mbar_arrive(bars + 8 * (PP_STAGES + (it - 1) % PP_STAGES));
            ++n;
            if (sizeof(TO) == 4 && ACC && ldg_every > 0 && n % ldg_every == 0) {
                if constexpr (sizeof(TO) == 4)
                    if (nk > 0) tt_add_ldg(acc, out, stg + wg * PP_STAGING, e, p0, q0, P, Q);
            } else if (!(ACC && nk == 0)) {
                tt_store_tma<ACC, 128, PP_BN, TO>(acc, to, stg + wg * PP_STAGING, e, p0, q0, P, Q, ss);
            }
        }
        if (sumsq) {
            ss = warp_sum(ss);
            if (lane == 0) atomicAdd(sumsq, ss);
        }
        if ((tid & 127) == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
}
#define TT_VARK_PP(NAME, T, TO, ACC)                                                                    \
    extern "C" __global__ void __launch_bounds__(TT_THREADS, 1)                                         \
        NAME(TO* out, const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb,              \
             const __grid_constant__ TmaMap to, const int* offsets, int E, int P, int Q, float* sumsq,   \
             int ldg_every) {                                                                           \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        tt_vark_pp<T, TO, ACC>(out, &ta, &tb, &to, offsets, E, P, Q, sumsq, ldg_every, wg_smem_base(wsmem)); \
    }
#define TT_VARK(NAME, T, TO, ACC)                                                                       \
    extern "C" __global__ void __launch_bounds__(TT_THREADS, 1)                                         \
        NAME(TO* out, const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb,              \
             const __grid_constant__ TmaMap to, const int* offsets, int E, int P, int Q, float* sumsq) {  \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        tt_vark<T, TO, ACC>(out, &ta, &tb, &to, offsets, E, P, Q, sumsq, wg_smem_base(wsmem));          \
    }
#define TT_VARM(NAME, T, B_KMAJ)                                                                        \
    extern "C" __global__ void __launch_bounds__(TT_THREADS, 1)                                         \
        NAME(T* y, const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb, const int* offsets, \
             const int* tile_prefix, int E, int M, int N, int K) {                                      \
        extern __shared__ __align__(1024) unsigned char wsmem[];                                        \
        tt_varm<T, B_KMAJ>(y, &ta, &tb, offsets, tile_prefix, E, M, N, K, wg_smem_base(wsmem));         \
    }
#else
#define TT_VARM(NAME, T, B_KMAJ)                                                                        \
    extern "C" __global__ void NAME(T*, const __grid_constant__ TmaMap, const __grid_constant__ TmaMap, \
                                    const int*, const int*, int, int, int, int) { __trap(); }
#define TT_VARK_PP(NAME, T, TO, ACC)                                                                    \
    extern "C" __global__ void NAME(TO*, const __grid_constant__ TmaMap, const __grid_constant__ TmaMap, \
                                    const __grid_constant__ TmaMap, const int*, int, int, int, float*, int) { __trap(); }
#define TT_VARK(NAME, T, TO, ACC)                                                                       \
    extern "C" __global__ void NAME(TO*, const __grid_constant__ TmaMap, const __grid_constant__ TmaMap, \
                                    const __grid_constant__ TmaMap, const int*, int, int, int, float*) { __trap(); }
#endif
TT_VARK(tt_tn_bf16_f32, bf16_t, float, false)
TT_VARK(tt_tn_bf16_bf16, bf16_t, bf16_t, false)
TT_VARK(tt_tn_f16_f32, f16_t, float, false)
TT_VARK(tt_tn_f16_f16, f16_t, f16_t, false)
TT_VARK(tt_tn_bf16_f32_acc, bf16_t, float, true)
TT_VARK(tt_tn_bf16_bf16_acc, bf16_t, bf16_t, true)
TT_VARK(tt_tn_f16_f32_acc, f16_t, float, true)
TT_VARK(tt_tn_f16_f16_acc, f16_t, f16_t, true)
TT_VARK_PP(tt_tn_bf16_f32_pp, bf16_t, float, false)
TT_VARK_PP(tt_tn_f16_f32_pp, f16_t, float, false)
TT_VARK_PP(tt_tn_bf16_f32_acc_pp, bf16_t, float, true)
TT_VARK_PP(tt_tn_f16_f32_acc_pp, f16_t, float, true)
TT_VARK_PP(tt_tn_bf16_bf16_pp, bf16_t, bf16_t, false)
TT_VARK_PP(tt_tn_f16_f16_pp, f16_t, f16_t, false)
TT_VARK_PP(tt_tn_bf16_bf16_acc_pp, bf16_t, bf16_t, true)
TT_VARK_PP(tt_tn_f16_f16_acc_pp, f16_t, f16_t, true)
TT_VARM(tt_nt_bf16, bf16_t, true)
TT_VARM(tt_nn_bf16, bf16_t, false)
TT_VARM(tt_nt_f16, f16_t, true)
TT_VARM(tt_nn_f16, f16_t, false)
