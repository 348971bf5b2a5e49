#!/usr/bin/env python3
"""What the GPU's bf16 GEMMs sustain under its power cap, on the GEMMs of an MoE layer's fwd+bwd.

The benchmark floor (816 TFLOP/s) is cuBLAS 8192^3 in short runs at full clock. Sustained GEMM
work on an H200 runs into the 700 W cap and the SM clock drops. This script runs, for several
seconds each, back to back:
  * cuBLAS 8192^3 (torch.mm),
  * the six GEMMs of a balanced MoE layer's forward and backward, one cuBLAS call per expert
    (forward x.W1, a.W2; dgrad dy.W2^T, dh.W1^T; weight gradients x^T.dh, a^T.dy),
  * the same through torch._grouped_mm (CUTLASS grouped kernels, the torch peer's path),
while sampling nvidia-smi (power, SM clock) every 100 ms, and prints the steady-state rate (the
median iteration time over the last half of the window) with the median power and clock there.
Usage on the GPU machine:
  python3 scripts/peers/gemm_power_ceiling.py [--shape d:F:E:k:T] [--seconds s] [--per-kind]
"""
import argparse
import statistics
import subprocess
import time

import torch

from moe_layer_peers import PEAK_TFLOPS  # the short-run floor the benchmarks use


def sampler():
    cmd = ["nvidia-smi", "--query-gpu=power.draw,clocks.sm", "--format=csv,noheader,nounits", "-lms", "100"]
    try:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None


def sustained(name, fn, flops, seconds):
    """Run fn back to back for `seconds`; report steady-state ms, TFLOP/s, power and clock."""
    fn()
    torch.cuda.synchronize()
    smi = sampler()
    t0 = time.time()
    times = []
    while time.time() - t0 < seconds:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append((time.time() - t0, a.elapsed_time(b)))
    t1 = time.time() - t0
    watts, clocks = [], []
    if smi is not None:
        smi.terminate()
        out, _ = smi.communicate()
        lines = [l for l in out.splitlines() if l.strip()]
        # Samples arrive every 100 ms from t0: keep the last half of the window.
        for i, line in enumerate(lines):
            if i * 0.1 >= t1 / 2:
                try:
                    w, c = (float(v) for v in line.split(","))
                    watts.append(w)
                    clocks.append(c)
                except ValueError:
                    pass
    ms = statistics.median_high([ms for t, ms in times if t >= t1 / 2] or [ms for _, ms in times])
    first = min(ms for _, ms in times[:3])
    med = lambda v: statistics.median_high(v) if v else float("nan")
    print(
        f"{name:<44} {ms:9.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s sustained"
        f"  (first runs {flops / first / 1e9:6.1f})  {med(watts):5.0f} W  {med(clocks):5.0f} MHz"
        f"  [{len(times)} iterations, {t1:.1f} s]",
        flush=True,
    )
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096:14336:8:2:8192", help="d:F:E:k:T (balanced routing)")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--per-kind", action="store_true", help="also each GEMM kind (forward, dgrad, weight gradient) alone")
    args = ap.parse_args()
    d, f, e, k, t = (int(v) for v in args.shape.split(":"))
    rows = t * k // e
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bf = torch.bfloat16
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  shape {args.shape}: {rows} rows per expert")

    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=bf), torch.randn(n, n, device=dev, dtype=bf)
    sustained("cuBLAS 8192^3", lambda: torch.mm(a, b), 2 * n**3, args.seconds)
    del a, b

    s = 0.5
    x = torch.randn(e * rows, d, device=dev, dtype=bf) * s
    w1 = torch.randn(e, d, 2 * f, device=dev, dtype=bf) * s  # [E, K, N]
    w2 = torch.randn(e, f, d, device=dev, dtype=bf) * s
    h = torch.randn(e * rows, 2 * f, device=dev, dtype=bf) * s  # gate/up out, and its gradient
    act = torch.randn(e * rows, f, device=dev, dtype=bf) * s  # SwiGLU out
    dy = torch.randn(e * rows, d, device=dev, dtype=bf) * s
    gemm_flops = 3 * 6 * e * rows * d * f  # per pass and expert 2*R*d*2F + 2*R*F*d; 3 passes

    # The six GEMMs of expert i's rows r, by kind.
    kinds = {
        "forward": lambda r, i: (torch.mm(x[r], w1[i]), torch.mm(act[r], w2[i])),
        "dgrad": lambda r, i: (torch.mm(dy[r], w2[i].t()), torch.mm(h[r], w1[i].t())),
        "weight gradient": lambda r, i: (torch.mm(x[r].t(), h[r]), torch.mm(act[r].t(), dy[r])),
    }

    def per_expert(gemms):
        for i in range(e):
            for g in gemms:
                g(slice(i * rows, (i + 1) * rows), i)

    ms_cublas = sustained("cuBLAS per expert, layer f+b GEMMs", lambda: per_expert(kinds.values()), gemm_flops, args.seconds)
    if args.per_kind:
        for kind, g in kinds.items():
            sustained(f"cuBLAS per expert, {kind}", lambda g=g: per_expert([g]), gemm_flops // 3, args.seconds / 2)

    offs = torch.arange(1, e + 1, device=dev, dtype=torch.int32) * rows
    grouped = getattr(torch, "_grouped_mm", None)
    ms_grouped = None
    if grouped is not None:
        def grouped_layer():
            grouped(x, w1, offs=offs)
            grouped(act, w2, offs=offs)
            grouped(dy, w2.transpose(1, 2), offs=offs)
            grouped(h, w1.transpose(1, 2), offs=offs)
            grouped(x.t(), h, offs=offs)
            grouped(act.t(), dy, offs=offs)

        try:
            ms_grouped = sustained("torch._grouped_mm, layer f+b GEMMs", grouped_layer, gemm_flops, args.seconds)
        except RuntimeError as err:
            print(f"torch._grouped_mm: {str(err).splitlines()[0]}")

    floor = gemm_flops / (PEAK_TFLOPS * 1e9)
    print(f"layer f+b GEMM FLOPs {gemm_flops / 1e12:.2f} TFLOP: {floor:.2f} ms at {PEAK_TFLOPS:.0f} TFLOP/s; "
          f"cuBLAS sustained {ms_cublas:.2f} ms ({ms_cublas / floor:.2f}x that floor)"
          + (f"; grouped_mm {ms_grouped:.2f} ms" if ms_grouped else ""))


if __name__ == "__main__":
    main()
