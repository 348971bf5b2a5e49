#!/usr/bin/env bash
# On the GPU machine, from the repo root, after scripts/gpu-test.sh staged .gpu/ (moe binary, device-env.sh,
# optionally kernels.tgz): moe's benches and their strongest peers side by side, logs tee'd into $OUT.
#   bash scripts/gpu-peers.sh PART...      PART: layer | train | gen-olmoe | gen-qwen3 | all
# Two device calls of < 9 minutes each on an H100 (estimates, not yet timed there):
#   bash scripts/gpu-peers.sh layer train        (~4 + ~4 min)
#   bash scripts/gpu-peers.sh gen-olmoe gen-qwen3 (~5 + ~4 min, checkpoints included)
# Every call starts with the GPU's name and its measured ceilings (scripts/peers/ceilings.py). Each step runs
# under `timeout` with what is left of DEADLINE_S (default 530 s from the start): a step cut short says so
# and the call still returns its logs. torch.compile warm-ups are capped by the scripts' --compile-budget-s
# (LAYER_COMPILE_S, TRAIN_VARIANTS, HF_COMPILE_S below); what a budget skipped is printed in its table.
# Other knobs: TRAIN_ARGS (extra `moe bench train` flags, e.g. --expert-grad-dtype bf16), BATCH and GEN_ARGS
# (both generate benches), OLMOE_LAYERS (16), QWEN_LAYERS (8), CKPT_DIR (/tmp/ckpt: kept while the machine is).
set -uo pipefail
start=$(date +%s)
deadline=${DEADLINE_S:-530}
[ -f .gpu/device-env.sh ] && source .gpu/device-env.sh
export MOE_CACHE_DIR=/tmp/moe-cache
[ -f .gpu/kernels.tgz ] && mkdir -p "$MOE_CACHE_DIR" && tar xzf .gpu/kernels.tgz -C "$MOE_CACHE_DIR"
out=${OUT:-/tmp/out}; mkdir -p "$out"
moe=${MOE_BIN:-.gpu/moe}
ck=${CKPT_DIR:-/tmp/ckpt}
peers=scripts/peers

# step NAME LOG CMD...: runs CMD with the time left, appends its output (less HF's progress noise) to LOG.
step() {
  local name=$1 log=$2; shift 2
  local left=$(( deadline - ($(date +%s) - start) ))
  if [ "$left" -le 10 ]; then
    echo "### $name: skipped, DEADLINE_S=$deadline spent" | tee -a "$out/$log"; return
  fi
  echo "### $name ($(( $(date +%s) - start )) s in, ${left} s left): $*" | tee -a "$out/$log"
  local t0=$(date +%s)
  timeout "$left" "$@" 2>&1 | grep --line-buffered -v -E "Warning|warn\(|Loading weights|Writing model shards|^\s*$" \
    | tee -a "$out/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "### $name: CUT at the deadline" | tee -a "$out/$log"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && echo "### $name: exit $rc" | tee -a "$out/$log"
  echo "### $name took $(( $(date +%s) - t0 )) s" | tee -a "$out/$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv,noheader \
  | tee -a "$out/gpu.txt"
step ceilings gpu.txt python3 $peers/ceilings.py

# moe three ways around the peers: its default (f32 expert grads accumulated), then the peer's two columns'
# semantics: bf16 .grads accumulated ("f+b acc") and bf16 .grads written ("f+b none" = set_to_none).
layer() {
  step "moe layer (expert grads f32, accumulated: moe's default)" layer.log $moe bench moe-layer --device cuda
  step "torch layer peers" layer.log python3 $peers/moe_layer_peers.py --compile-budget-s ${LAYER_COMPILE_S:-150}
  step "moe layer (expert grads bf16, accumulated: the peer's f+b acc)" layer.log \
    $moe bench moe-layer --device cuda --grad-dtype bf16
  step "moe layer (expert grads bf16, written: the peer's f+b none)" layer.log \
    $moe bench moe-layer --device cuda --write-grads --grad-dtype bf16
}

train() {
  step "moe train" train.log $moe bench train --device cuda --layers 8 --batch 4 --seq 2048 ${TRAIN_ARGS:-}
  step "torch train peer" train.log python3 $peers/train_step_torch.py --layers 8 --batch 4 --seq 2048 \
    --variants ${TRAIN_VARIANTS:-eager,compile-layers}
}

# gen MODEL_DIR_NAME MAKE_ARGS...: writes the checkpoint if absent, then moe and HF on it.
gen() {
  local name=$1; shift
  [ -d "$ck/$name" ] || step "checkpoint $name" generate.log python3 $peers/make_checkpoints.py "$ck" "$@"
  step "moe generate $name" generate.log $moe bench generate --model "$ck/$name" --device cuda \
    --batch ${BATCH:-1,32} ${GEN_ARGS:-}
  step "HF generate $name" generate.log python3 $peers/hf_generate.py "$ck/$name" --batch ${BATCH:-1,32} \
    --compile-budget-s ${HF_COMPILE_S:-120} ${GEN_ARGS:-}
}

[ $# -gt 0 ] || { echo "usage: bash scripts/gpu-peers.sh layer|train|gen-olmoe|gen-qwen3|all ..."; exit 2; }
for part in "$@"; do
  case $part in
    layer) layer ;;
    train) train ;;
    gen-olmoe) gen olmoe-1b-7b-shape --models olmoe --olmoe-layers ${OLMOE_LAYERS:-16} ;;
    gen-qwen3) gen qwen3-30b-a3b-shape --models qwen3 --qwen-layers ${QWEN_LAYERS:-8} ;;
    all) layer; train; gen olmoe-1b-7b-shape --models olmoe --olmoe-layers ${OLMOE_LAYERS:-16}
         gen qwen3-30b-a3b-shape --models qwen3 --qwen-layers ${QWEN_LAYERS:-8} ;;
    *) echo "unknown part '$part': expected layer, train, gen-olmoe, gen-qwen3 or all"; exit 2 ;;
  esac
done
echo "### done in $(( $(date +%s) - start )) s; logs in $out"
