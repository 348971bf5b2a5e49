#!/usr/bin/env bash
# On the GPU machine: random-weight Qwen3-30B-A3B-shaped (24 of 48 layers) and OLMoE-1B-7B-shaped
# checkpoints saved by transformers, then `moe bench generate` and HF generate on each, same
# session. Logs in $OUT. MODELS=olmoe (or qwen3) writes and runs one of them; PEER=0 skips HF.
set -uo pipefail
source .gpu/device-env.sh
export MOE_CACHE_DIR=/tmp/moe-cache
out=${OUT:-/tmp/out}; mkdir -p "$out"
ck=/tmp/ckpt
python3 scripts/peers/make_checkpoints.py $ck --qwen-layers ${QWEN_LAYERS:-24} --models ${MODELS:-qwen3,olmoe} 2>&1 | grep -v Warning | tail -3 | tee "$out/make.log"
for m in olmoe-1b-7b-shape qwen3-30b-a3b-shape; do
  [ -d $ck/$m ] || continue
  .gpu/moe bench generate --model $ck/$m --device cuda ${GEN_ARGS:-} 2>&1 | tee -a "$out/bench-generate.log"
  [ "${PEER:-1}" = 0 ] && continue
  python3 scripts/peers/hf_generate.py $ck/$m ${GEN_ARGS:-} 2>&1 | grep -v Warning | tail -4 | tee -a "$out/peer-generate.log"
done
