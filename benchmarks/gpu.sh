#!/usr/bin/env bash
# Issue #6's GPU figures in one go: configuration B (ViT-B/16, 224 px, 8 x 512 decoder)
# in bf16 on the jax and torch backends against HuggingFace ViTMAE on the same GPU, the
# model FLOPs utilisation against PEAK_TFLOPS (an H100's dense bf16 peak is about 800),
# and the asymmetric encoder's speed-up over the encoder with mask tokens.
#
#   PEAK_TFLOPS=800 BATCH=256 SPE=4 bash benchmarks/gpu.sh
#
# Each measurement has its own time limit, and the one whose length is least known
# (torch.compile's first compile) runs last on what is left of BUDGET_S seconds, so a
# short GPU lease still returns the main table. With LOG set, everything is also
# appended to that file. CONFIG, STEPS and WARMUP shrink it for a dry run on a CPU:
#   CONFIG=K BATCH=8 STEPS=2 WARMUP=2 bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PEAK_TFLOPS=${PEAK_TFLOPS:-800}
CONFIG=${CONFIG:-B}
BATCH=${BATCH:-256}
SPE=${SPE:-4}  # training steps per compiled call (jax): hides the per-step host work
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
BUDGET_S=${BUDGET_S:-520}
LOG=${LOG:-/dev/null}
export PYTHONUNBUFFERED=1
# The comparison and the mask-token run compile the same asymmetric jax step: compile it once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/keras_mae_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
start=$(date +%s)

step() {  # step SECONDS TITLE COMMAND...: runs COMMAND for at most SECONDS, logged
    local limit=$1 title=$2
    shift 2
    echo "=== $(date +%T) $title (at most ${limit} s)" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v "^[IW]0000\|WARNING: All log" | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || echo "=== $title: exit status $status (124 = time limit)" | tee -a "$LOG"
}

step 30 "GPU" nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
# The measured ceiling, to set next to PEAK_TFLOPS: a large bf16 matmul on random data.
step 60 "bf16 matmul ceiling" python3 -c '
import torch
if torch.cuda.is_available():
    n = 8192; a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
    for _ in range(3): a @ b
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); begin.record()
    for _ in range(20): a @ b
    end.record(); torch.cuda.synchronize()
    print(f"bf16_matmul_tflops={2 * n ** 3 * 20 / (begin.elapsed_time(end) / 1e3) / 1e12:.1f}")
else:
    print("no CUDA device: no matmul ceiling")'
step 250 "keras-mae jax and torch against HuggingFace" \
    python3 benchmarks/compare.py --config "$CONFIG" --backends jax,torch --batch-size "$BATCH" --steps "$STEPS" \
    --warmup "$WARMUP" --repeats 1 --dtype-policy mixed_bfloat16 --peak-tflops "$PEAK_TFLOPS" --steps-per-execution "$SPE"
step 130 "asymmetric encoder against the encoder with mask tokens (jax)" \
    python3 benchmarks/throughput.py --config "$CONFIG" --backend jax --batch-size "$BATCH" --steps "$STEPS" \
    --warmup "$WARMUP" --dtype-policy mixed_bfloat16 --compare-mask-tokens --repeats 1 --steps-per-execution "$SPE"
# The torch backend with its step compiled by torch.compile (eager, it is bound by Python on a GPU).
left=$((BUDGET_S - ($(date +%s) - start)))
if [ "$left" -gt 60 ]; then
    step "$left" "torch backend under torch.compile" \
        python3 benchmarks/throughput.py --config "$CONFIG" --backend torch --batch-size "$BATCH" --steps "$STEPS" \
        --warmup "$WARMUP" --dtype-policy mixed_bfloat16 --jit-compile true --peak-tflops "$PEAK_TFLOPS"
else
    echo "=== torch.compile skipped: ${left} s left of BUDGET_S=${BUDGET_S}" | tee -a "$LOG"
fi
