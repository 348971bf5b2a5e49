#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu-test.sh staged .gpu/ here: the decode-path parity tests,
# then batch-1 decode steps of the OLMoE and Qwen3 shapes under each setting, alternating, ROUNDS
# rounds (default 2). A setting is a label and space-free env assignments joined by commas (the
# names: DEVELOPING.md, kernel settings):
#   bash scripts/decode-ab.sh base:X=1 nopdl:MOE_NO_PDL=1 v2:MOE_KERNEL_DEFINES=MY_VARIANT=1
# Checkpoints: /tmp/ckpt (scripts/peers/make_checkpoints.py, written in the background while the
# tests run). Logs under $OUT (or /tmp/decode-ab); TESTS=0 skips the tests.
set -u
source .gpu/device-env.sh
export MOE_REQUIRE_GPU=1 MOE_CACHE_DIR=/tmp/moe-cache MOE_BIN=$PWD/.gpu/moe
out=${OUT:-/tmp/decode-ab}
mkdir -p "$out"
[ -d /tmp/ckpt/qwen3-30b-a3b-shape ] || (timeout 400 python3 scripts/peers/make_checkpoints.py /tmp/ckpt \
  --models olmoe,qwen3 > "$out/ckpt.log" 2>&1) &
t() {
  local name=$1; shift
  timeout 240 "$@" > "$out/$name.log" 2>&1
  echo "== $name rc=$?"; grep -E "test result|FAILED|panicked" "$out/$name.log" | head -8
}
if [ "${TESTS:-1}" != 0 ]; then
  t cuda_parity .gpu/tests/cuda_parity moe_serve router_topk fused_decode kv_cache attention \
    argmax streaming_loop small_m
  t moe_cuda_parity .gpu/tests/moe_cuda_parity
  t model_cuda .gpu/tests/model_cuda
  t generate_cli .gpu/tests/generate_cli
fi
wait
step() {  # model, label, comma-joined env assignments
  local m=$1 label=$2 envs=$3
  env ${envs//,/ } timeout 100 ${BENCH_BIN:-.gpu/moe} bench generate --model /tmp/ckpt/$m --device cuda \
    --batch ${BATCH:-1} > "$out/b_${m}_$label.log" 2>&1
  echo "$m $label: $(grep -A9 'prefill tok' "$out/b_${m}_$label.log" | grep -E '^ *[0-9]' | awk '{printf "%s:%s ", $1, $5}') $(grep -h 'graph replay' "$out/b_${m}_$label.log")"
}
for r in $(seq 1 ${ROUNDS:-2}); do
  for m in ${MODELS:-olmoe-1b-7b-shape qwen3-30b-a3b-shape}; do
    for s in "$@"; do step $m "${s%%:*}-$r" "${s#*:}"; done
  done
done
