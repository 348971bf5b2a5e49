#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu-test.sh staged .gpu/ here: the grouped-GEMM parity tests,
# then `moe bench moe-layer` with the given env settings (each "NAME=V[,NAME=V]" or "default"),
# the torch peer, and the training step. Logs under $OUT (or /tmp/grouped-ab).
#   bash scripts/grouped-ab.sh default MOE_GG_TMA=0 MOE_GG_PINGPONG=0
set -u
source .gpu/device-env.sh
export MOE_REQUIRE_GPU=1 MOE_CACHE_DIR=/tmp/moe-cache
out=${OUT:-/tmp/grouped-ab}
mkdir -p "$out"
t() {
  local name=$1; shift
  timeout 240 "$@" > "$out/$name.log" 2>&1
  echo "== $name rc=$?"; grep -E "test result|FAILED|panicked" "$out/$name.log" | head -6
}
t cuda_parity .gpu/tests/cuda_parity grouped_gemm small_m
t moe_cuda_parity .gpu/tests/moe_cuda_parity
t model_cuda .gpu/tests/model_cuda
for v in "$@"; do
  env_args=(); [ "$v" = default ] || IFS=, read -ra env_args <<< "$v"
  env "${env_args[@]}" timeout 200 .gpu/moe bench moe-layer --device cuda > "$out/ml_$v.log" 2>&1
  echo "== moe-layer $v rc=$?"; grep -A6 "shape d:F" "$out/ml_$v.log"
done
timeout 200 python3 scripts/peers/moe_layer_peers.py > "$out/peers.log" 2>&1
echo "== peers rc=$?"; grep torch "$out/peers.log"
timeout 200 .gpu/moe bench train --device cuda --layers 8 --batch 4 --seq 2048 > "$out/train.log" 2>&1
echo "== train rc=$?"; tail -1 "$out/train.log"
