#!/usr/bin/env bash
# On the GPU machine: check a change against the build before it, in one call per part.
#   .gpu/       the new build (scripts/gpu-test.sh: moe, test binaries, device-env.sh, kernels.tgz)
#   .gpu-base/  the build before it: `moe` (stripped) and its kernels.tgz (moe kernels --arch sm_90a)
#   bash scripts/gpu-validate.sh tests          # every GPU test binary of the new build (MOE_REQUIRE_GPU=1)
#   bash scripts/gpu-validate.sh decode         # moe bench generate, base/new alternating, OLMoE + Qwen3 shapes
#   bash scripts/gpu-validate.sh train layer    # moe bench train and moe-layer, base/new alternating
# ROUNDS (default 2) alternations; logs under $OUT. `firstcall` times a fresh-cache first run (kernel compiles).
set -uo pipefail
source .gpu/device-env.sh
out=${OUT:-/tmp/out}; mkdir -p "$out"
ck=${CKPT_DIR:-/tmp/ckpt}
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a "$out/gpu.txt"
unpack() {  # kernels.tgz of a build into its own cache dir
  mkdir -p "$2" && [ -f "$1/kernels.tgz" ] && tar xzf "$1/kernels.tgz" -C "$2"
}
unpack .gpu /tmp/cache-new; unpack .gpu-base /tmp/cache-base
run_as() {  # base|new, then the moe arguments
  local which=$1; shift
  if [ "$which" = base ]; then MOE_CACHE_DIR=/tmp/cache-base .gpu-base/moe "$@"
  else MOE_CACHE_DIR=/tmp/cache-new .gpu/moe "$@"; fi
}
ckpt() {
  [ -d "$ck/qwen3-30b-a3b-shape" ] || timeout 300 python3 scripts/peers/make_checkpoints.py "$ck" \
    --models olmoe,qwen3 --qwen-layers ${QWEN_LAYERS:-24} > "$out/ckpt.log" 2>&1
}
for part in "$@"; do
  case $part in
    tests)
      export MOE_REQUIRE_GPU=1 MOE_CACHE_DIR=/tmp/cache-new MOE_BIN=$PWD/.gpu/moe RUST_BACKTRACE=1
      for t in .gpu/tests/*; do
        n=$(basename "$t")
        if timeout 300 "$t" --test-threads=4 > "$out/test-$n.log" 2>&1; then
          echo "PASS $n: $(grep -E '^test result' "$out/test-$n.log" | tail -1)"
        else
          echo "FAIL $n"; grep -E "panicked|FAILED|error" "$out/test-$n.log" | head -20
        fi
      done ;;
    firstcall)
      ckpt
      for w in base new; do
        rm -rf /tmp/cache-cold && mkdir -p /tmp/cache-cold
        s=$(date +%s.%N)
        if [ $w = base ]; then b=.gpu-base/moe; else b=.gpu/moe; fi
        MOE_CACHE_DIR=/tmp/cache-cold $b bench generate --model "$ck/olmoe-1b-7b-shape" --device cuda \
          --batch 1 --prompt-len 16 --new-tokens 8 > "$out/firstcall-$w.log" 2>&1
        echo "$w: fresh-cache prefill + decode (bench generate, batch 1) $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s"
      done ;;
    decode)
      ckpt
      for r in $(seq 1 ${ROUNDS:-2}); do
        for m in olmoe-1b-7b-shape qwen3-30b-a3b-shape; do
          for w in base new; do
            run_as $w bench generate --model "$ck/$m" --device cuda --batch 1,32 > "$out/gen-$m-$w-$r.log" 2>&1
            echo "$m $w round $r: $(grep -E '^ *(1|32) ' "$out/gen-$m-$w-$r.log" | tr -s ' ' | tr '\n' '|')"
          done
        done
      done ;;
    train)
      for r in $(seq 1 ${ROUNDS:-2}); do
        for w in base new; do
          run_as $w bench train --device cuda --layers 8 --batch 4 --seq 2048 > "$out/train-$w-$r.log" 2>&1
          echo "train $w round $r: $(tail -1 "$out/train-$w-$r.log")"
        done
      done ;;
    layer)
      for r in $(seq 1 ${ROUNDS:-2}); do
        for w in base new; do
          run_as $w bench moe-layer --device cuda > "$out/layer-$w-$r.log" 2>&1
          echo "== layer $w round $r"; tail -6 "$out/layer-$w-$r.log"
        done
      done ;;
    *) echo "unknown part '$part': tests, firstcall, decode, train or layer"; exit 2 ;;
  esac
done
