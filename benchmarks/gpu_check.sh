#!/usr/bin/env bash
# One device call: environment facts, the GPU test set, then the training benchmark. Logs go to $OUT.
# usage: bash benchmarks/gpu_check.sh [test-timeout-s] [benchmark args...]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TEST_TIMEOUT=${1:-300}; shift || true
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
if [ "$TEST_TIMEOUT" != 0 ]; then
  timeout "$TEST_TIMEOUT" python3 -m pytest -m gpu -q -p no:cacheprovider --maxfail=20 --no-header -rfE ${GPU_TESTS:-tests} > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; tail -25 "$OUT/gpu_tests.log"
fi
if [ "$#" -gt 0 ]; then
  python3 benchmarks/bench_training.py "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -40
  cp benchmarks/results/*.json "$OUT/" 2>/dev/null || true
fi
