#!/usr/bin/env bash
# Device-tool call on one H100 (third session, final code): the 1B benchmark against HF twice, then a profile.
#   run(kind="nvidia-h100-x1", command="OUT=$OUT bash bench/gpu_session3d.sh")
source bench/gpu_setup.sh
bench() { timeout 280 python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 \
    --global-batch-size 8 --steps 15 "$@" 2>&1 | grep -E "^bridge|^HF|Error|error"; }
echo "== gbs 8: bridge vs HF (1)"; bench --json "$OUT/final-1.json"
echo "== gbs 8: bridge vs HF (2)"; bench --json "$OUT/final-2.json"
echo "== profile"
timeout 150 python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 --global-batch-size 8 \
    --steps 8 --warmup 4 --no-baseline --profile "$OUT/prof" 2>&1 | grep -E "^bridge|Error|error"
python3 bench/trace_summary.py "$OUT/prof/profile_rank0.json" --top 12
rm -rf "$OUT"/prof
