#!/usr/bin/env bash
# Device-tool calls on four GPUs (seventh session): the ring (p2p) against the all-gather for context parallelism,
# 1B shape.
#   first:  attention alone (bench/ring_attention.py: errors against fp32, forward+backward time, CP 2 and 4), then
#           `bridge train` at seq 32768: CP=1 (DP=4), CP=2 and CP=4 with each exchange, 3 steps after 2, eager
#   second: the same training sweep with --compile, then seq 131072 (the model's full context) at CP=4 with the ring
#   third:  attention alone again, after the ring's kernel became a per-block choice (cuDNN, flash or the plain
#           math, as SDPA's checks allow): which kernel each block gets, the same times, the ring in fp32
#   fourth: FP8 with the ring, compiled, seq 32768: CP=2 and CP=4 in bf16, then with --fp8 tensorwise (torchao:
#           run(..., carry=[".whl"]))
#   h100:   only on H100s (stops at once elsewhere), two GPUs: seq 32768 compiled, CP=1 (DP=2) and CP=2 with each
#           exchange: run(kind="nvidia-h100-x2", command="OUT=$OUT bash bench/gpu_ring.sh h100")
#   run(kind="nvidia-h100-x4", command="OUT=$OUT bash bench/gpu_ring.sh first")
source bench/gpu_setup.sh
train=(python3 bench/cp_fp8.py cp --model llama-3.2-1b --nproc 4 --steps 3 --warmup 2)
export PYTHONPATH=/tmp/site  # torchao, for the fourth stage
case "${1:?usage: bench/gpu_ring.sh first|second|third|fourth|h100}" in
  first)
    echo "== attention alone, 1B shape, seq 32768"
    timeout 200 python3 bench/ring_attention.py --cps 2,4 --json "$OUT/ring_attention.json" 2>&1 \
      | grep -E "^cp=|Error" | cut -c1-900
    echo "== bridge train, 1B shape, seq 32768, 4 GPUs"
    timeout 330 "${train[@]}" --seq-length 32768 --cps 1,2,4 --json "$OUT/cp.json" 2>&1 | grep -E "^cp[0-9]|Error" \
      | cut -c1-400 ;;
  second)
    echo "== bridge train --compile, 1B shape, seq 32768, 4 GPUs"
    timeout 400 "${train[@]}" --compile --seq-length 32768 --cps 1,2,4 --json "$OUT/cp-compiled.json" 2>&1 \
      | grep -E "^cp[0-9]|Error" | cut -c1-400
    echo "== bridge train, 1B shape, seq 131072, CP=4, the ring"
    timeout 170 "${train[@]}" --seq-length 131072 --cps 4 --cp-comm-types p2p --json "$OUT/cp-long.json" 2>&1 \
      | grep -E "^cp[0-9]|Error" | cut -c1-400 ;;
  third)
    timeout 200 python3 bench/ring_attention.py --cps 2,4 --json "$OUT/ring_attention.json" 2>&1 \
      | grep -E "^cp=|Error" | cut -c1-1200 ;;
  fourth)
    for fp8 in "" tensorwise; do
      echo "== bridge train --compile ${fp8:+--fp8 $fp8}, 1B shape, seq 32768, 4 GPUs, the ring"
      timeout 280 "${train[@]}" --compile --seq-length 32768 --cps 2,4 --cp-comm-types p2p ${fp8:+--cp-fp8 $fp8} \
        --json "$OUT/cp-fp8-${fp8:-none}.json" 2>&1 | grep -E "^cp[0-9]|Error" | cut -c1-400
    done ;;
  h100)
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || { echo "not H100s: stopping"; exit 0; }
    timeout 280 python3 bench/cp_fp8.py cp --model llama-3.2-1b --nproc 2 --steps 3 --warmup 2 --compile \
      --seq-length 32768 --cps 1,2 --json "$OUT/cp-h100.json" 2>&1 | grep -E "^cp[0-9]|Error" | cut -c1-400 ;;
esac
