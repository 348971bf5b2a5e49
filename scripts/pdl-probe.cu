// Does a PDL dependent start before its primary ends, on a stream and in a captured graph?
// On the GPU machine: nvcc -O2 -arch=sm_90a -o pdl scripts/pdl-probe.cu && ./pdl (BENCHMARKS,
// NOTES, decode step, 2026-12-01). Kernel A (132 or 1056 blocks) releases its dependents at once
// and spins 20 us; kernel B, launched with programmatic stream serialisation, stamps the global
// timer at entry and after griddepcontrol.wait. Printed: both stamps relative to A's end.
#include <cstdio>
#include <cuda_runtime.h>
__device__ __forceinline__ unsigned long long gt() { unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }
__global__ void A(unsigned long long* rec, int spin_ns, int trig) {
  if (trig) asm volatile("griddepcontrol.launch_dependents;");
  unsigned long long t0 = gt();
  while (gt() - t0 < (unsigned long long)spin_ns) {}
  if (threadIdx.x == 0) atomicMax(rec + 0, gt());
}
__global__ void B(unsigned long long* rec) {
  if (threadIdx.x == 0) atomicMin(rec + 1, gt());
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (threadIdx.x == 0) atomicMin(rec + 2, gt());
}
__global__ void init(unsigned long long* rec) { rec[0] = 0; rec[1] = ~0ull; rec[2] = ~0ull; }
void launchB(cudaStream_t s, unsigned long long* rec, int blocks, int pdl) {
  cudaLaunchConfig_t cfg = {}; cfg.gridDim = blocks; cfg.blockDim = 128; cfg.stream = s;
  cudaLaunchAttribute at[1]; at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; at[0].val.programmaticStreamSerializationAllowed = pdl;
  cfg.attrs = at; cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, B, rec);
}
void launchA(cudaStream_t s, unsigned long long* rec, int blocks, int trig, int pdl) {
  cudaLaunchConfig_t cfg = {}; cfg.gridDim = blocks; cfg.blockDim = 128; cfg.stream = s;
  cudaLaunchAttribute at[1]; at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization; at[0].val.programmaticStreamSerializationAllowed = pdl;
  cfg.attrs = at; cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, A, rec, 20000, trig);
}
int main() {
  unsigned long long *rec, h[3];
  cudaMalloc(&rec, 24);
  cudaStream_t s; cudaStreamCreate(&s);
  for (int graph = 0; graph < 2; ++graph)
    for (int pdl = 0; pdl < 2; ++pdl)
      for (int ablocks : {132, 1056}) {
        cudaGraphExec_t ge = nullptr;
        if (graph) {
          cudaGraph_t g;
          cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
          init<<<1, 1, 0, s>>>(rec); launchA(s, rec, ablocks, 1, pdl); launchB(s, rec, 132, pdl);
          cudaStreamEndCapture(s, &g);
          if (cudaGraphInstantiate(&ge, g, 0) != cudaSuccess) { printf("instantiate failed\n"); return 1; }
          cudaGraphLaunch(ge, s);
        } else {
          init<<<1, 1, 0, s>>>(rec); launchA(s, rec, ablocks, 1, pdl); launchB(s, rec, 132, pdl);
        }
        cudaMemcpyAsync(h, rec, 24, cudaMemcpyDeviceToHost, s);
        cudaError_t e = cudaStreamSynchronize(s);
        printf("graph=%d pdl=%d A_blocks=%d: B entry - A end = %lld ns, B after wait - A end = %lld ns (%s)\n", graph, pdl, ablocks,
               (long long)(h[1] - h[0]), (long long)(h[2] - h[0]), cudaGetErrorString(e));
      }
  return 0;
}
