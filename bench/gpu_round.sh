#!/usr/bin/env bash
# One device-tool call on a 4-GPU machine: independent one-GPU measurements side by side (one per GPU; they
# share nothing but the host). Logs and JSON land in $OUT.
#   run(kind="nvidia-h100-x4", carry=[".whl"], command="OUT=$OUT bash bench/gpu_round.sh")
source bench/gpu_setup.sh
B1="python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --steps 15"
LIMIT=540 one_gpu 0 fp8-8b env OUT="$OUT" bash bench/cp_fp8_gpu.sh fp8-8b
LIMIT=540 one_gpu 1 fp8-1b env OUT="$OUT" bash bench/cp_fp8_gpu.sh fp8-1b
one_gpu 2 train1-mbs4 bash -c "$B1 --micro-batch-size 4 --global-batch-size 8 --profile $OUT/prof --json $OUT/bench1-mbs4.json"
one_gpu 3 train1-mbs8 bash -c "$B1 --micro-batch-size 8 --global-batch-size 16 --json $OUT/bench1-mbs8.json"
wait
rm -f "$OUT"/prof/*.json "$OUT"/prof/events.*  # the kernel table is what comes back
for f in train1-mbs4 train1-mbs8 fp8-1b fp8-8b; do echo "== $f"; grep -E "^bridge|^HF|^bf16|^fp8|^bf16-seed|exit|Error" "$OUT/$f.log"; done
