#!/usr/bin/env bash
# Device-tool call on four GPUs (eighth session): is the 8B-shape FP8 loss curve at global batch 16 within 1% of
# bf16 with e4m3 output gradients (Megatron's --fp8-format e4m3), where hybrid's e5m2 gradients ran 1.2% behind
# (sixth session)? Four 200-step runs side by side, one per GPU, same seed and real text:
#   GPU 0 bf16 | GPU 1 FP8 tensorwise e4m3 | GPU 2 FP8 tensorwise hybrid (again, same call) | GPU 3 bf16 again
# (the run-to-run noise floor).
#   run(kind="nvidia-h100-x4", carry=[".whl"], command="OUT=$OUT bash bench/gpu_fp8_e4m3_loss.sh")
source bench/gpu_fp8_8b_loss_setup.sh
one_gpu 0 bf16 python3 bench/cp_fp8.py "${common[@]}" --recipes "" --json "$OUT/bf16.json"
one_gpu 1 e4m3 python3 bench/cp_fp8.py "${common[@]}" --skip-bf16 --recipes tensorwise-e4m3 --json "$OUT/e4m3.json"
one_gpu 2 hybrid python3 bench/cp_fp8.py "${common[@]}" --skip-bf16 --recipes tensorwise --json "$OUT/hybrid.json"
one_gpu 3 bf16-again python3 bench/cp_fp8.py "${common[@]}" --recipes "" --json "$OUT/bf16-again.json"
wait
grep -hE "^bf16|^fp8|exit|Error" $LOGS/*.log | cut -c1-300
for other in e4m3 hybrid bf16-again; do
  echo "== $other vs bf16"; python3 bench/cp_fp8.py --compare "$OUT/bf16.json" "$OUT/$other.json" | grep -v "^{"
done
cp $LOGS/*.log "$OUT/"
