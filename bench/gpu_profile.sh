#!/usr/bin/env bash
# Device-tool call on one GPU: profile two steps of the 1B-shape benchmark and print where the GPU time goes.
#   run(kind="nvidia-h100-x1", command="OUT=$OUT bash bench/gpu_profile.sh [extra bench/train.py flags]")
source bench/gpu_setup.sh
timeout 300 python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 --global-batch-size 8 \
    --steps 8 --warmup 4 --no-baseline --profile "$OUT/prof" "$@" 2>&1 | grep -E "^bridge|Error|error"
python3 bench/trace_summary.py "$OUT/prof/profile_rank0.json" --top 45
rm -f "$OUT"/prof/*.json "$OUT"/prof/events.*
