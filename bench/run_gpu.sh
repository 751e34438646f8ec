#!/usr/bin/env bash
# The GPU loader benchmark on a machine without a package index (run from the repo root).
#
# DALI travels as the parts that `../shared/tools/dali-for-device .device-dali` makes (about 57 MB
# each, one per device call). Each call copies its part to /tmp/dali/; the call with the last part
# also runs this script, which unpacks DALI into /tmp/site (once) and runs bench/gpu_loader.py:
#
#   call 1 (carry .device-dali/part00): mkdir -p /tmp/dali && cp .device-dali/part00 /tmp/dali/
#   call 2 (carry .device-dali/part01): mkdir -p /tmp/dali && cp .device-dali/part01 /tmp/dali/
#   call 3 (carry .device-dali/part02): mkdir -p /tmp/dali && cp .device-dali/part02 /tmp/dali/ && bash bench/run_gpu.sh
#
# Extra arguments go to bench/gpu_loader.py (e.g. --images 10000). The log and a JSON of the numbers
# land in $OUT when it is set.
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
libs=$(find /tmp/site/nvidia -name 'lib*.so*' -exec dirname {} \; | sort -u | tr '\n' ':')
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
log=${OUT:-/tmp}/gpu_loader.log
set -o pipefail
timeout 330 python3 bench/gpu_loader.py "$@" 2>&1 | grep -v -e "nvjpeg2k" -e "nvtiff" | tee "$log"
