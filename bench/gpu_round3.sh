#!/usr/bin/env bash
# Device-tool call on four H100s: the one-GPU measurements side by side (the 1B benchmark against HF, FP8 on the
# 8B shape), then the four-GPU runs: the 8B-shaped layouts and the context-parallel sweep at seq 32768.
#   run(kind="nvidia-h100-x4", carry=[".whl"], command="OUT=$OUT bash bench/gpu_round3.sh")
LOGS=/tmp; LIMIT=240
source bench/gpu_setup.sh
B1="python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --steps 15 --micro-batch-size 4 --global-batch-size 8"
one_gpu 0 bench1 $B1 --json "$OUT/bench1.json"
one_gpu 1 fp8-8b env PYTHONPATH=/tmp/site python3 bench/cp_fp8.py fp8 --model llama-8b-8l --seq-length 4096 \
    --micro-batch-size 1 --global-batch-size 8 --steps 20 --warmup 5 --compile --recipes tensorwise --json "$OUT/fp8-8b.json"
one_gpu 2 bench1-gbs32 $B1 --global-batch-size 32 --no-baseline
wait
for f in bench1 bench1-gbs32 fp8-8b; do echo "== $f"; grep -E "^bridge|^HF|^bf16|^fp8|exit|Error" /tmp/$f.log; done
echo "== 8B-shaped, 8 layers, seq 4096, four GPUs, mbs 2, global batch 8"
B4="python3 bench/train.py --model llama-8b-8l --seq-length 4096 --nproc 4 --no-baseline --steps 6 --warmup 3 --global-batch-size 8 --micro-batch-size 2"
timeout 200 $B4 --layouts tp4,tp2pp2,dp4-distopt 2>&1 | grep -E "^bridge|Error"
echo "== context parallel, 1B shape, seq 32768"
timeout 150 env OUT="$OUT" bash bench/cp_fp8_gpu.sh cp > "$OUT/cp.log" 2>&1; echo "cp exit $?"
grep -E "^cp=|Error|memory" "$OUT/cp.log" | cut -c1-300
