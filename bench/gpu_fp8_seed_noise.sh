#!/usr/bin/env bash
# Device-tool call on four GPUs (ninth session): is the 8B-shape FP8 curve's early-descent gap from seed 99 (3.1% in
# the window ending at step 32, eighth session) beyond what two runs of the same configuration differ by? Four runs
# from seed 99 side by side, 100 steps at global batch 16 (the learning-rate warm-up is 50 steps, so steps 1-50 run
# as in the 200-step runs), on one text corpus:
#   GPU 0 bf16 | GPU 1 bf16 again | GPU 2 FP8 tensorwise | GPU 3 FP8 tensorwise again
#   run(kind="nvidia-h100-x4", carry=[".whl"], command="OUT=$OUT bash bench/gpu_fp8_seed_noise.sh")
LIMIT=420
source bench/gpu_fp8_8b_loss_setup.sh
for i in 0 1; do
  one_gpu $i bf16-$i python3 bench/cp_fp8.py "${common[@]}" --steps 100 --seed 99 --recipes "" \
    --json "$OUT/bf16-$i.json"
  one_gpu $((i + 2)) fp8-$i python3 bench/cp_fp8.py "${common[@]}" --steps 100 --seed 99 --skip-bf16 \
    --recipes tensorwise --json "$OUT/fp8-$i.json"
done
wait
grep -hE "^bf16|^tensorwise|exit|Error" $LOGS/*.log | cut -c1-300
cp $LOGS/*.log "$OUT/"
