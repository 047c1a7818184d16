#!/usr/bin/env bash
# Device-tool call on one H100 (the card the issues' goals name): the 1B-shape benchmark against HF + torch.compile,
# a profile of two bridge steps (bench/trace_summary.py), then FP8 tensorwise vs bf16 on the 8B shape (8 layers).
#   run(kind="nvidia-h100-x1", carry=[".whl"], command="OUT=$OUT bash bench/gpu_h100.sh")
source bench/gpu_setup.sh
echo "== 1B shape, seq 2048, mbs 4, global batch 8: bridge vs HF + torch.compile + fused AdamW"
timeout 200 python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 --global-batch-size 8 \
    --steps 15 --json "$OUT/bench1-h100.json" 2>&1 | grep -E "^bridge|^HF|Error"
echo "== profile of two steps of the same run"
bash bench/gpu_profile.sh 2>&1 | grep -v "NVIDIA" | head -40
echo "== 8B shape (8 layers), seq 4096, mbs 1, global batch 8: FP8 tensorwise vs bf16"
PYTHONPATH=/tmp/site timeout 250 python3 bench/cp_fp8.py fp8 --model llama-8b-8l --seq-length 4096 --micro-batch-size 1 \
    --global-batch-size 8 --steps 15 --warmup 4 --compile --recipes tensorwise --json "$OUT/fp8-8b-h100.json" 2>&1 \
    | grep -E "^bf16|^fp8|Error"
