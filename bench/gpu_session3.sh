#!/usr/bin/env bash
# Device-tool call on one H100 (third session): the 1B benchmark at global batch 8 (the setup so far) with and
# without gradient-accumulation fusion, at global batch 64 (16 micro-batches, a realistic accumulation), then a profile.
#   run(kind="nvidia-h100-x1", command="OUT=$OUT bash bench/gpu_session3.sh")
source bench/gpu_setup.sh
bench() { timeout 240 python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 "$@" 2>&1 \
    | grep -E "^bridge|^HF|Error|error"; }
echo "== gbs 8, bridge (fusion) vs HF"; bench --global-batch-size 8 --steps 15 --json "$OUT/gbs8.json"
echo "== gbs 8, no fusion"; bench --global-batch-size 8 --steps 15 --no-baseline --no-gradient-accumulation-fusion
echo "== gbs 64, bridge vs HF"; bench --global-batch-size 64 --steps 6 --warmup 3 --json "$OUT/gbs64.json"
echo "== profile gbs 8"
timeout 200 python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 --global-batch-size 8 \
    --steps 8 --warmup 4 --no-baseline --profile "$OUT/prof" 2>&1 | grep -E "^bridge|Error|error"
python3 bench/trace_summary.py "$OUT/prof/profile_rank0.json" --top 70
rm -rf "$OUT"/prof
