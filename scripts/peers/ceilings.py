#!/usr/bin/env python3
"""Measured ceilings of the machine a peer runs on, so every table names its GPU and its floors:
  * bf16 GEMM TFLOP/s: torch.mm of 8192 x 8192 x 8192 (2 * n^3 FLOPs), best of `reps` CUDA-event timings;
  * device copy TB/s: `dst.copy_(src)` of a 1 GiB buffer (>> L2), bytes read + written (2 GiB a copy), best
    of `reps` - the definition `moe bench generate` uses for its roofline.
Imported by the other peer scripts (`measure()`); run alone it prints one line:
    python3 scripts/peers/ceilings.py [--device cuda]
On the CPU the numbers are printed for completeness (wall clock), not as anyone's ceiling.
"""
import argparse
import time

import torch


def _best_ms(fn, device, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            best = min(best, a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            best = min(best, 1e3 * (time.perf_counter() - t))
    return best


def _gemm_ms(device, n, reps):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return _best_ms(lambda: torch.mm(a, b), device, reps=reps)


def _copy_ms(device, nbytes, reps):
    src = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    return _best_ms(lambda: dst.copy_(src), device, reps=reps)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def measure(device, gemm_n=8192, copy_bytes=1 << 30, reps=5):
    """Returns (gpu name, bf16 GEMM TFLOP/s, copy TB/s read + written, GEMM n, copy bytes)."""
    device = torch.device(device)
    if device.type == "cpu":  # keep a CPU smoke run short
        gemm_n, copy_bytes = min(gemm_n, 1024), min(copy_bytes, 1 << 26)
    tflops = 2.0 * gemm_n**3 / (_gemm_ms(device, gemm_n, reps) * 1e-3) / 1e12
    tbs = 2.0 * copy_bytes / (_copy_ms(device, copy_bytes, reps) * 1e-3) / 1e12
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return device_name(device), tflops, tbs, gemm_n, copy_bytes


def describe(device):
    """Measures and returns (line to print, TFLOP/s, TB/s)."""
    name, tflops, tbs, n, nbytes = measure(device)
    line = (f"# ceilings on {name} (torch {torch.__version__}): bf16 GEMM {n}^3 {tflops:.1f} TFLOP/s (best of 5), "
            f"device copy {nbytes / 2**30:g} GiB {tbs:.3f} TB/s read+written (best of 5)")
    return line, tflops, tbs


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    print(describe(ap.parse_args().device)[0])
