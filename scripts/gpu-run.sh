#!/usr/bin/env bash
# Runs on the GPU machine from the repo root (staged as .gpu/run.sh by scripts/gpu-test.sh).
# Usage: bash .gpu/run.sh [test-name-filter]
set -uo pipefail
source .gpu/device-env.sh
export MOE_REQUIRE_GPU=1 MOE_CACHE_DIR=/tmp/moe-cache RUST_BACKTRACE=1 MOE_BIN=$PWD/.gpu/moe
out=${OUT:-/tmp/out}; mkdir -p "$out"
# Kernels precompiled where the binaries were built (scripts/gpu-test.sh with MOE_NVRTC_LIB).
[ -f .gpu/kernels.tgz ] && mkdir -p "$MOE_CACHE_DIR" && tar xzf .gpu/kernels.tgz -C "$MOE_CACHE_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fail=0
for t in .gpu/tests/*; do
  name=$(basename "$t")
  if "$t" --test-threads=4 ${1:-} >"$out/test-$name.log" 2>&1; then
    echo "PASS $name: $(grep -E '^test result' "$out/test-$name.log" | tail -1)"
  else
    echo "FAIL $name"; grep -E "panicked|FAILED|error" "$out/test-$name.log" | head -20; fail=1
  fi
done
.gpu/moe bench ops --device cuda 2>&1 | tee "$out/bench-ops.log"
exit $fail
