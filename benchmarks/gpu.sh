#!/usr/bin/env bash
# Issue #6's GPU figures in one go: configuration B (ViT-B/16, 224 px, 8 x 512 decoder)
# in bf16 on the jax and torch backends against HuggingFace ViTMAE on the same GPU, the
# model FLOPs utilisation against PEAK_TFLOPS (an H100's dense bf16 peak is about 800),
# and the asymmetric encoder's speed-up over the encoder with mask tokens.
#
#   PEAK_TFLOPS=800 BATCH=256 SPE=4 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK_TFLOPS=${PEAK_TFLOPS:-800}
BATCH=${BATCH:-256}
SPE=${SPE:-4}  # training steps per compiled call: hides the per-step host work
STEPS=${STEPS:-20}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/compare.py --config B --backends jax,torch --batch-size "$BATCH" --steps "$STEPS" --warmup 5 \
    --repeats 1 --dtype-policy mixed_bfloat16 --peak-tflops "$PEAK_TFLOPS" --steps-per-execution "$SPE"
# The torch backend with its step compiled by torch.compile (eager, it is bound by Python on a GPU).
python3 benchmarks/throughput.py --config B --backend torch --batch-size "$BATCH" --steps "$STEPS" --warmup 5 \
    --dtype-policy mixed_bfloat16 --jit-compile true --peak-tflops "$PEAK_TFLOPS"
python3 benchmarks/throughput.py --config B --backend jax --batch-size "$BATCH" --steps "$STEPS" --warmup 5 \
    --dtype-policy mixed_bfloat16 --compare-mask-tokens --repeats 1 --steps-per-execution "$SPE"
