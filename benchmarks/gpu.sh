#!/usr/bin/env bash
# The GPU checks in one go, within 8 minutes: the ML tests on CUDA, then the GPU benchmarks; figures to one file.
#
#   benchmarks/gpu.sh [FIGURES_FILE]      default: $OUT/gpu-figures.txt if OUT is set, else benchmarks/gpu-figures.txt
#
# Needs the project installed (pip install -e '.[dev]'); PYTHON picks the interpreter (default: python).
# Without a CUDA device it prints "no GPU" and exits 0. Each step has its own time limit, so one slow step cannot
# eat the others' time; the figures of the steps that finished are in the file either way. JSON lines of every
# table go beside it (same name, .jsonl). Record the figures in benchmarks/README.md with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY="${PYTHON:-python}"
FIG="${1:-${OUT:-benchmarks}/gpu-figures.txt}"
JSONL="${FIG%.txt}.jsonl"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no GPU"
  exit 0
fi

mkdir -p "$(dirname "$FIG")"
: > "$FIG"
: > "$JSONL"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export HF_HUB_OFFLINE=1
status=0

step() {  # step SECONDS TITLE COMMAND...: run with a time limit, tee its output into the figures file
  local limit="$1" title="$2"
  shift 2
  local start=$SECONDS
  echo "== $title (limit ${limit}s): $*" | tee -a "$FIG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$FIG"
  local rc=${PIPESTATUS[0]}
  echo "== $title: exit $rc after $((SECONDS - start)) s" | tee -a "$FIG"
  [ "$rc" -eq 0 ] || status=1
}

{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || "$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
} | tee -a "$FIG"

# The ML tests pick CUDA by themselves (device "auto"); -x: the first failure is the one to read.
step 75 "GPU tests: ML" "$PY" -m pytest -q -x -p no:cacheprovider tests/workers/ml
step 25 "GPU tests: benchmark code paths" "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/benchmarks/test_bench_smoke.py -k "inversion or ncsn or sampler or peak or gpu_script"
step 220 "inversion (SD v1-4 architecture, 512 px)" \
  "$PY" -m benchmarks.inversion --gpu --gpu-batches 8,16,32 --json "$JSONL"
# 10 levels x 50 steps per variant (seven variants fit the budget); samples/s is normalised to 1,000 steps
step 140 "NCSN sampling (batch 1000)" "$PY" -m benchmarks.ncsn_sampling --gpu --steps-each 50 --json "$JSONL"

echo "figures: $FIG" | tee -a "$FIG"
exit "$status"
