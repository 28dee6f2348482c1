#!/usr/bin/env bash
# The device session's work, in stages that each fit one 10-minute call; logs and results go to $OUT as they come.
#
#   bash benchmarks/gpu_check.sh STAGE [STAGE ...]
#
# Stages, in the order the open issues need them (notes/PERF.md, "Next device session"):
#   tests-model     GPU tests of decoding, generation (static cache + compile), compile, modeling, warm-up (issue 9, 12)
#   tests-kernels   GPU tests of the training kernels, one autotune config each (issue 8)
#   bench-decode    decode kernels (both layouts), the 1.1B model's generate (static compiled / dynamic vs dense),
#                   the first call at new prompt lengths (issue 9)
#   bench-training  attention fwd+bwd, paper and llama3-8b layouts at 8k / 64k (issue 8's no-regression check)
#   bench-model     the 1.1B model's training step vs its dense twin, eager and compiled (issues 11, 12)
# The quality experiment (issue 10) needs a carried checkpoint between its two calls: see
# benchmarks/quality_experiment.py.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-540}  # seconds per stage, under the call's 600
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"

gpu_tests() {  # log name, then pytest arguments
  local name=$1; shift
  timeout "$LIMIT" python3 -m pytest -m gpu -q -p no:cacheprovider --no-header -rfE --durations=10 "$@" \
    > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"; tail -25 "$OUT/$name.log"
}

for stage in "$@"; do
  case $stage in
    tests-model)
      gpu_tests tests_model tests/test_decode.py tests/test_generation.py tests/test_compile.py tests/test_modeling.py \
        tests/test_warmup.py ;;
    tests-kernels)
      NSA_HF_AUTOTUNE=0 gpu_tests tests_kernels tests/test_kernels_window_compressed.py \
        tests/test_kernels_selection.py tests/test_kernels_selected.py tests/test_nsa_triton.py tests/test_autotune.py ;;
    bench-decode)
      timeout "$LIMIT" python3 benchmarks/bench_decode.py --parts kernel model coldstart --out "$OUT/decode.json" \
        > "$OUT/bench_decode.log" 2>&1
      echo "bench-decode rc=$?"; tail -40 "$OUT/bench_decode.log" ;;
    bench-training)
      timeout "$LIMIT" python3 benchmarks/bench_training.py --layouts paper llama3-8b --seqlens 8192 65536 \
        --out "$OUT/training.json" > "$OUT/bench_training.log" 2>&1
      echo "bench-training rc=$?"; tail -40 "$OUT/bench_training.log" ;;
    bench-model)
      timeout "$LIMIT" python3 benchmarks/bench_model_training.py --seqlens 4096 8192 16384 32768 65536 --compile \
        --out "$OUT/model_training.json" > "$OUT/bench_model.log" 2>&1
      echo "bench-model rc=$?"; tail -40 "$OUT/bench_model.log" ;;
    *)
      echo "gpu_check.sh: unknown stage '$stage' (tests-model, tests-kernels, bench-decode, bench-training, bench-model)"
      exit 2 ;;
  esac
done
