#!/usr/bin/env bash
# GPU check of issue 15 for one H200 (or H100) in at most 5 minutes, no network: the project on PYTHONPATH (no
# install), the machine's own python3 stack (jax 0.11.x with CUDA 13, flax, optax, orbax). Three stages, each
# under its own time limit, each printing its figures and one JSON line (copied to $OUT when set):
#   1. bench/gpu_attention.py  cuDNN flash vs dense attention: forward + gradients (causal GQA 7:1 with left and
#                              right padding, vision frames as the batch), the tiny model, the fp32 refusal; a
#                              7B-shaped 16k-token attention timing, cuDNN vs XLA chunked
#   2. bench/gpu_7b.py         7B-shaped prefill (180 frames, ~15.9k tokens) and decode tokens/s against the HBM
#                              roofline, compile counts, peak memory
#   3. bench/gpu_stage2.py     one 7B-shaped stage-2 step through train-stage2's programs (vision chunks, bucketed
#                              gradient; full_module LoRA, 13.8k tokens in the 16,384 bucket), compile count, peak
#                              memory (memory_stats()) against compile-check's reading
# CI never runs this. Usage: bash bench/gpu_check.sh   (PYTHON=... chooses the interpreter; SMOKE=1 runs
# tiny shapes on a CPU host to check the plumbing)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
start=$(date +%s)
echo "== gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo none)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: not available"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

failed=0
stage() {  # stage NAME SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - start ))s)"
  timeout -s INT --kill-after=10 "$limit" "$PY" "$@" 2>&1 | grep -v -E "^(WARNING|I0000|W0000)" | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  tail -n 1 "$LOGS/$name.log" | grep '^{' > "$LOGS/$name.json" || true
  [ "$rc" -eq 0 ] || { echo "!! $name exited with $rc"; failed=$((failed + 1)); }
}

if [ "${SMOKE:-0}" = 1 ]; then  # the plumbing on a CPU host: tiny shapes, the XLA form of the cuDNN call
  stage gpu_attention 400 bench/gpu_attention.py --smoke
  stage gpu_7b 300 bench/gpu_7b.py --config tiny --frames 4 --new_tokens 8 --repeats 1
  stage gpu_stage2 300 bench/gpu_stage2.py --config tiny --frames 2 --repeats 1
else
  stage gpu_attention 65 bench/gpu_attention.py --length 16384
  stage gpu_7b 115 bench/gpu_7b.py --frames 180 --new_tokens 128 --repeats 3
  stage gpu_stage2 115 bench/gpu_stage2.py --frames 180 --repeats 3
fi
echo "== done in $(( $(date +%s) - start ))s, $failed stage(s) failed; logs and JSON in $LOGS"
exit "$failed"
