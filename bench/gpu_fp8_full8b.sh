#!/usr/bin/env bash
# Device-tool call on four GPUs (sixth session): FP8 vs bf16 on the real 8B shape, all 32 layers. It does not fit one
# 80 GB card with Adam (18 bytes per parameter with fp32 gradients), so DP=4 with the distributed optimizer: every
# GPU runs the whole model on its own micro-batches (mbs 2, 4 per step, seq 4096) and holds a quarter of the
# optimizer state. Both runs compile; gradients fp32 (the default).
#   run(kind="nvidia-h100-x4", carry=[".whl"], command="OUT=$OUT bash bench/gpu_fp8_full8b.sh")
source bench/gpu_setup.sh
export PYTHONPATH=/tmp/site PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
f() { local name=$1; shift; timeout 265 python3 bench/train.py --model llama-8b-8l --layers 32 --seq-length 4096 --nproc 4 \
  --layouts dp4-distopt --micro-batch-size 2 --global-batch-size 8 --steps 5 --warmup 3 --no-baseline \
  --json "$OUT/$name.json" "$@" 2>&1 | grep -E "^bridge|Error|error" | grep -v "^{"; }
echo "== bf16"; f full8b-bf16
echo "== fp8"; f full8b-fp8 --fp8 tensorwise
