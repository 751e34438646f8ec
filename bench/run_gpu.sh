#!/usr/bin/env bash
# The GPU loader benchmark on a machine without a package index (run from the repo root).
#
# DALI travels as the parts that `../shared/tools/dali-for-device .device-dali` makes (about 57 MB
# each, one per device call: a call carries at most 64 MiB). Each call copies its part to /tmp/dali/;
# the call with the last part also runs this script, which unpacks DALI into /tmp/site (once) and runs
# bench/gpu_loader.py, then bench/gpu_step_sync.py. Before the calls, keep both folders out of the
# working tree that travels with every call (else all the parts travel each time and the call is refused):
#
#   echo /.device-dali/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   call 1 (carry .device-dali/part00): mkdir -p /tmp/dali && cp .device-dali/part00 /tmp/dali/ &&
#          python3 bench/gpu_loader.py --shards-only      (the benchmark's shards, ~30 s: no DALI needed)
#   call 2 (carry .device-dali/part01): mkdir -p /tmp/dali && cp .device-dali/part01 /tmp/dali/
#   call 3 (carry .device-dali/part02 and .whl, timeout_s 600):
#          mkdir -p /tmp/dali && cp .device-dali/part02 /tmp/dali/ && bash bench/run_gpu.sh
#
# Make the three calls back to back: the machine stays warm only about 30 s after a call, and a fresh
# one has an empty /tmp/dali (start again from call 1). This script needs about 9 minutes at most:
# unpacking (~15 s), gpu_loader.py (stopped at 400 s; it measures the two targets first and saves
# $OUT/gpu_loader.json after each measurement, so a stop keeps what it measured) and gpu_step_sync.py
# (stopped at 120 s). If time is short: `bash bench/run_gpu.sh --sweep '' --decode-variants window`.
#
# The sync check runs `pipeline fit`, which needs jsonargparse (LightningCLI); the GPU machine's Python has
# Lightning but not it. Its wheels travel in .whl/ (ignored, see above; carry it with the last part):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
#
# Extra arguments go to bench/gpu_loader.py (e.g. --images 10000). BENCH=bench/X.py runs X alone, with
# the extra arguments. The logs, a JSON of the loader numbers and the preflight land in $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
parts=${DALI_PARTS:-/tmp/dali}
if [ ! -d /tmp/site/nvidia/dali ]; then
  n=$( (ls "$parts"/part* 2>/dev/null || true) | wc -l)
  if [ "$n" -lt "${DALI_NPARTS:-3}" ]; then
    echo "run_gpu.sh: DALI parts missing: $n of ${DALI_NPARTS:-3} in $parts (copy .device-dali/partNN there, one per call)" >&2
    exit 2
  fi
  t0=$(date +%s)
  rm -rf /tmp/site.partial && mkdir -p /tmp/site.partial
  # into a side folder first: an unpack cut short must not pass for a whole one at the next run
  if ! cat "$parts"/part* | python3 -c "import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1<<20)" | tar x -C /tmp/site.partial; then
    echo "run_gpu.sh: unpacking DALI failed (a part missing, truncated or out of order in $parts?)" >&2
    exit 2
  fi
  rm -rf /tmp/site && mv /tmp/site.partial /tmp/site
  echo "DALI unpacked in $(( $(date +%s) - t0 ))s"
fi
if [ -d .whl ] && [ ! -d /tmp/site-whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-whl .whl/*.whl \
    || echo "run_gpu.sh: installing .whl failed: gpu_step_sync.py (pipeline fit) will fail" >&2
fi
libs=$(find /tmp/site/nvidia -name 'lib*.so*' -exec dirname {} \; | sort -u | tr '\n' ':')
export PYTHONPATH=/tmp/site:/tmp/site-whl:$PWD:${PYTHONPATH:-}
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
{  # what a failure below would depend on, in one place
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "cpus $(nproc); /dev/shm: $(df -h /dev/shm 2>/dev/null | tail -1 || echo none)"
  timeout 120 python3 - <<'EOF' || true
import sys
print("python", sys.version.split()[0], sys.executable)
if sys.version_info[:2] != (3, 12):
    print("WARNING: DALI's parts hold Python 3.12 extension modules only")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("nvidia.dali", "jsonargparse", "pytorch_lightning", "sklearn"):
    try:
        mod = __import__(name, fromlist=["__version__"])
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(f"WARNING: {name} does not import: {type(e).__name__}: {e}")
EOF
} 2>&1 | grep --line-buffered -v -e "nvjpeg2k" -e "nvtiff" | tee "$out/preflight.log"
run() {  # seconds, script, args...: the script's output without DALI's optional-codec noise, also in $OUT
  local limit=$1 script=$2
  shift 2
  # SIGTERM at the limit, SIGKILL 15 s later if that hangs; the log keeps what the script printed before
  timeout -k 15 "$limit" python3 "$script" "$@" 2>&1 | grep --line-buffered -v -e "nvjpeg2k" -e "nvtiff" \
    | tee "$out/$(basename "$script" .py).log"
}
if [ -n "${BENCH:-}" ]; then
  run 480 "$BENCH" "$@"
else
  run 400 bench/gpu_loader.py "$@" || echo "run_gpu.sh: gpu_loader.py failed (exit $?); the sync check still runs"
  # the loader's shards (20,000 photos) if it made them, else 6,000 new ones there
  run 120 bench/gpu_step_sync.py --work /tmp/gpu-loader-bench
fi
