#!/usr/bin/env bash
# Device-tool call on two GPUs (fourth session): the 8B-shape (8 layers) FP8 loss curve against bf16 over 200 steps
# of real text at global batch 8 (bf16 on GPU 0, FP8 tensorwise on GPU 1, side by side, same seed and data), then
# the 1B shape at seq 32768 with CP=1 (DP=2) and CP=2, to see CP=1 run out of memory on 80 GB cards.
#   run(kind="nvidia-h100-x2", carry=[".whl"], command="OUT=$OUT bash bench/gpu_fp8_loss.sh")
source bench/gpu_setup.sh
export PYTHONPATH=/tmp/site
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')  # real text beside this repo's
common=(fp8 --model llama-8b-8l --seq-length 4096 --micro-batch-size 2 --global-batch-size 8 --steps 200 --warmup 5
        --compile --lr 2e-4 --extra-text "$stdlib")
LIMIT=440 one_gpu 0 bf16 python3 bench/cp_fp8.py "${common[@]}" --recipes "" --json "$OUT/bf16.json"
LIMIT=440 one_gpu 1 fp8 python3 bench/cp_fp8.py "${common[@]}" --skip-bf16 --recipes tensorwise --json "$OUT/fp8.json"
wait
grep -hE "^bf16|^fp8|exit|Error" "$OUT/bf16.log" "$OUT/fp8.log"
python3 bench/cp_fp8.py --compare "$OUT/bf16.json" "$OUT/fp8.json" | grep -v "^{"
echo "== CP at seq 32768, 1B shape, 2 GPUs"
timeout 130 python3 bench/cp_fp8.py cp --model llama-3.2-1b --seq-length 32768 --nproc 2 --cps 1,2 --steps 3 --warmup 2 \
    2>&1 | grep -E "^cp=|Error" | cut -c1-400
