#!/usr/bin/env bash
# Device-tool call on four GPUs (seventh session): the ring (p2p) against the all-gather for context parallelism.
# First attention alone (bench/ring_attention.py: errors against fp32 and forward+backward time, CP 2 and 4), then
# `bridge train` on the 1B shape at seq 32768: CP=1 (DP=4), CP=2 and CP=4 with each exchange, 3 steps after 2.
#   run(kind="nvidia-h100-x4", command="OUT=$OUT bash bench/gpu_ring.sh")
source bench/gpu_setup.sh
echo "== attention alone, 1B shape, seq 32768"
timeout 200 python3 bench/ring_attention.py --cps 2,4 --json "$OUT/ring_attention.json" 2>&1 | grep -E "^cp=|Error" \
  | cut -c1-900
echo "== bridge train, 1B shape, seq 32768, 4 GPUs"
timeout 330 python3 bench/cp_fp8.py cp --model llama-3.2-1b --seq-length 32768 --nproc 4 --cps 1,2,4 --steps 3 \
  --warmup 2 --json "$OUT/cp.json" 2>&1 | grep -E "^cp[0-9]|Error" | cut -c1-400
