#!/usr/bin/env bash
# On the GPU machine (after scripts/gpu-test.sh staged .gpu/): `moe bench train` and its PyTorch
# peer in the same session, OLMoE shape, 8 layers, batch 4 x 2048. Logs in $OUT.
set -uo pipefail
source .gpu/device-env.sh
export MOE_CACHE_DIR=/tmp/moe-cache
out=${OUT:-/tmp/out}; mkdir -p "$out"
.gpu/moe bench train --device cuda --layers ${LAYERS:-8} --batch 4 --seq 2048 2>&1 | tee "$out/bench-train.log"
python3 scripts/peers/train_step_torch.py --layers ${LAYERS:-8} --batch 4 --seq 2048 2>&1 | tail -5 | tee "$out/peer-train.log"
