#!/usr/bin/env bash
# Build the moe binary and the test binaries here (no GPU needed) and stage them in .gpu/ (git-
# ignored) with the device environment script and the runner that the GPU machine executes:
#   scripts/gpu-test.sh                 # build + stage
#   MOE_NVRTC_LIB=dir scripts/gpu-test.sh   # also precompile the sm_90a kernels (below)
#   then, with the device tool:  carry [".gpu"], command: bash .gpu/run.sh [extra bench args]
# On the GPU machine, .gpu/run.sh runs every test binary with MOE_REQUIRE_GPU=1 (a missing GPU
# fails instead of skipping), then `moe bench ops`; logs land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/tests
cargo build --profile gpu --bin moe
cp target/gpu/moe .gpu/moe
# Test binaries: ask cargo for their paths.
cargo test --profile gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        name = m["target"]["name"] + ("-lib" if "lib" in m["target"]["kind"] else "")
        shutil.copy(m["executable"], os.path.join(".gpu/tests", name))
        print("staged", name)
'
env_script=""
for c in ../shared/scripts/device-env.sh shared/scripts/device-env.sh; do [ -f "$c" ] && env_script=$c && break; done
[ -n "$env_script" ] || { echo "device-env.sh not found (../shared/scripts)"; exit 1; }
cp "$env_script" .gpu/device-env.sh
cp scripts/gpu-run.sh .gpu/run.sh
# With MOE_NVRTC_LIB (a directory holding the GPU machine's libnvrtc.so.13, e.g. unpacked from the
# nvidia-cuda-nvrtc 13.0 wheel), compile the kernels for sm_90a here, so the runs there start with
# a warm cache: `mkdir -p /tmp/moe-cache && tar xzf .gpu/kernels.tgz -C /tmp/moe-cache`.
if [ -n "${MOE_NVRTC_LIB:-}" ]; then
  rm -rf .gpu/cache
  LD_LIBRARY_PATH="$MOE_NVRTC_LIB" MOE_CACHE_DIR=.gpu/cache .gpu/moe kernels --arch sm_90a | tail -1
  tar czf .gpu/kernels.tgz -C .gpu/cache kernels && rm -rf .gpu/cache
fi
du -sh .gpu
