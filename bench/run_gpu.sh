#!/usr/bin/env bash
# The GPU loader benchmark on a machine without a package index (run from the repo root).
#
# DALI travels as the parts that `../shared/tools/dali-for-device .device-dali` makes (about 57 MB
# each, one per device call). Each call copies its part to /tmp/dali/; the call with the last part
# also runs this script, which unpacks DALI into /tmp/site (once) and runs bench/gpu_loader.py:
#
#   call 1 (carry .device-dali/part00): mkdir -p /tmp/dali && cp .device-dali/part00 /tmp/dali/
#   call 2 (carry .device-dali/part01): mkdir -p /tmp/dali && cp .device-dali/part01 /tmp/dali/
#   call 3 (carry .device-dali/part02 and .whl): mkdir -p /tmp/dali && cp .device-dali/part02 /tmp/dali/ && bash bench/run_gpu.sh
#
# The sync check runs `pipeline fit`, which needs jsonargparse (LightningCLI); the GPU machine's Python has
# Lightning but not it. Its wheels travel in .whl/ (ignored by git; carry it with the last part):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
#
# It runs bench/gpu_loader.py (extra arguments go to it, e.g. --images 10000), then bench/gpu_step_sync.py
# (host-GPU synchronisations in the steps of a real `pipeline fit`). BENCH=bench/X.py runs X alone, with
# the extra arguments. The logs and a JSON of the loader numbers land in $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
parts=${DALI_PARTS:-/tmp/dali}
if [ ! -d /tmp/site/nvidia/dali ]; then
  n=$( (ls "$parts"/part* 2>/dev/null || true) | wc -l)
  if [ "$n" -lt 3 ]; then
    echo "run_gpu.sh: DALI parts missing: $n of 3 in $parts (copy .device-dali/partNN there, one per call)" >&2
    exit 2
  fi
  t0=$(date +%s)
  mkdir -p /tmp/site
  cat "$parts"/part* | python3 -c "import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1<<20)" | tar x -C /tmp/site
  echo "DALI unpacked in $(( $(date +%s) - t0 ))s"
fi
if [ -d .whl ] && [ ! -d /tmp/site-whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-whl .whl/*.whl
fi
libs=$(find /tmp/site/nvidia -name 'lib*.so*' -exec dirname {} \; | sort -u | tr '\n' ':')
export PYTHONPATH=/tmp/site:/tmp/site-whl:$PWD:${PYTHONPATH:-}
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
set -o pipefail
run() {  # seconds, script, args...: the script's output without DALI's optional-codec noise, also in $OUT
  local limit=$1 script=$2
  shift 2
  timeout "$limit" python3 "$script" "$@" 2>&1 | grep -v -e "nvjpeg2k" -e "nvtiff" | tee "${OUT:-/tmp}/$(basename "$script" .py).log"
}
if [ -n "${BENCH:-}" ]; then
  run 480 "$BENCH" "$@"
else
  run 400 bench/gpu_loader.py "$@" || echo "run_gpu.sh: gpu_loader.py failed (exit $?); the sync check still runs"
  run 120 bench/gpu_step_sync.py
fi
