#!/usr/bin/env bash
# Device-tool call on four GPUs (fifth session). First, if the cards are H100s, the CP sweep of the 1B shape at
# seq 32768 (CP=1/DP=4, CP=2/DP=2, CP=4). Then how far apart two bf16 runs are on the 8B-shape (8 layers) loss
# curve, to read the FP8 gap against: four 200-step runs side by side, one per GPU, on the same real text:
#   GPU 0 bf16 seed 1234 | GPU 1 FP8 tensorwise seed 1234 | GPU 2 bf16 seed 1234 again | GPU 3 bf16 seed 7.
# The two seed-1234 bf16 runs differ only by what is not deterministic on the GPU (reduction order, torch.compile's
# per-process kernel choices); seed 7 is another initialisation.
#   run(kind="nvidia-h100-x4", carry=[".whl"], command="OUT=$OUT bash bench/gpu_fp8_spread.sh")
# GBS=16 NO_CP=1 LIMIT=560 (sixth session): twice the global batch (8 micro-batches of 2 per step), no CP sweep.
source bench/gpu_setup.sh
export PYTHONPATH=/tmp/site
LOGS=/tmp/logs; mkdir -p $LOGS
if [ -z "${NO_CP:-}" ] && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then
  echo "== CP at seq 32768, 1B shape, 4 GPUs"
  timeout 170 python3 bench/cp_fp8.py cp --model llama-3.2-1b --seq-length 32768 --nproc 4 --cps 1,2,4 --steps 3 \
      --warmup 2 --json "$OUT/cp.json" 2>&1 | grep -E "^cp=|Error" | cut -c1-400
fi
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
common=(fp8 --model llama-8b-8l --seq-length 4096 --micro-batch-size 2 --global-batch-size "${GBS:-8}" --steps 200 --warmup 5
        --compile --lr 2e-4 --extra-text "$stdlib")
LIMIT=${LIMIT:-420}
one_gpu 0 bf16 python3 bench/cp_fp8.py "${common[@]}" --recipes "" --json "$OUT/bf16.json"
one_gpu 1 fp8 python3 bench/cp_fp8.py "${common[@]}" --skip-bf16 --recipes tensorwise --json "$OUT/fp8.json"
one_gpu 2 bf16-again python3 bench/cp_fp8.py "${common[@]}" --recipes "" --json "$OUT/bf16-again.json"
one_gpu 3 bf16-seed7 python3 bench/cp_fp8.py "${common[@]}" --skip-bf16 --recipes "" --noise-seed 7 --json "$OUT/seed7.json"
wait
grep -hE "^bf16|^fp8|exit|Error" $LOGS/*.log | cut -c1-300
for other in fp8 bf16-again seed7; do
  echo "== $other vs bf16"; python3 bench/cp_fp8.py --compare "$OUT/bf16.json" "$OUT/$other.json" | grep -v "^{"
done
