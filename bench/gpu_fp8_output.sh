#!/usr/bin/env bash
# Device-tool calls (tenth session): FP8 for the output layer too (--fp8-output-proj), the largest GEMM that
# --fp8 leaves in bf16 (23% of the matmul FLOPs of the 8-layer 8B shape).
#   speed (one H100): 8B shape (8 layers), seq 4096, global batch 8, mbs 4, compiled: bf16, FP8, FP8 + output
#          layer, in one call; then, if time is left, a profile of the last
#          (bridge train now sets expandable segments itself; the first call, before that, ran bf16 out of memory)
#   speed-1b (one H100): the same three at the 1B shape, seq 2048, mbs 4, global batch 8, 5 steps after 3
#   loss (two GPUs, side by side): 200 steps at global batch 16 on real text from seed 1234, bf16 on GPU 0 and FP8
#          tensorwise + output layer on GPU 1 (the eighth session's setup, bench/gpu_fp8_8b_loss_setup.sh)
#   ends (two GPUs; eleventh session, not yet run): --first-last-layers-bf16 on top of the output layer in FP8: the
#          loss pair of `loss` (FP8 side tensorwise+out+ends), then its speed on GPU 0 (8B shape, mbs 4)
#   run(kind="nvidia-h100-x1", carry=[".whl"], command="OUT=$OUT bash bench/gpu_fp8_output.sh speed")
#   run(kind="nvidia-h100-x2", carry=[".whl"], command="OUT=$OUT bash bench/gpu_fp8_output.sh loss")
case "${1:?usage: bench/gpu_fp8_output.sh speed|speed-1b|loss|ends}" in
  speed)
    source bench/gpu_setup.sh
    export PYTHONPATH=/tmp/site
    b8() { timeout "${T:-150}" python3 bench/train.py --model llama-8b-8l --seq-length 4096 --global-batch-size 8 \
        --micro-batch-size 4 --steps 6 --no-baseline "$@" 2>&1 | grep -E "^bridge|Error|error" | grep -v "^{"; }
    echo "== bf16 mbs4"; T=240 b8
    echo "== fp8 mbs4"; T=200 b8 --fp8 tensorwise
    echo "== fp8 + output layer mbs4"; T=200 b8 --fp8 tensorwise --fp8-output-proj
    if (( SECONDS < 400 )); then
      echo "== fp8 + output layer mbs4, profile"
      T=$((580 - SECONDS)) b8 --fp8 tensorwise --fp8-output-proj --profile "$OUT/p-out"
      python3 bench/trace_summary.py "$OUT/p-out/profile_rank0.json" --top 40; rm -rf "${OUT:?}/p-out"
    fi ;;
  speed-1b)
    source bench/gpu_setup.sh
    export PYTHONPATH=/tmp/site
    for v in "bf16:" "fp8:--fp8 tensorwise" "fp8 + output layer:--fp8 tensorwise --fp8-output-proj"; do
      echo "== ${v%%:*}"
      timeout 95 python3 bench/train.py --model llama-3.2-1b --no-baseline --steps 5 --warmup 3 ${v#*:} 2>&1 \
        | grep -E "^bridge|Error" | cut -c1-300
    done ;;
  loss)
    source bench/gpu_fp8_8b_loss_setup.sh
    one_gpu 0 bf16 python3 bench/cp_fp8.py "${common[@]}" --recipes "" --json "$OUT/bf16.json"
    one_gpu 1 fp8-out python3 bench/cp_fp8.py "${common[@]}" --skip-bf16 --recipes tensorwise+out \
      --json "$OUT/fp8-out.json"
    wait
    grep -hE "^bf16|^fp8|exit|Error" $LOGS/*.log | cut -c1-300
    python3 bench/cp_fp8.py --compare "$OUT/bf16.json" "$OUT/fp8-out.json" 2>&1 | tail -n 3
    cp $LOGS/*.log "$OUT/" ;;
  ends)
    source bench/gpu_fp8_8b_loss_setup.sh
    one_gpu 0 bf16 python3 bench/cp_fp8.py "${common[@]}" --recipes "" --json "$OUT/bf16.json"
    one_gpu 1 fp8-ends python3 bench/cp_fp8.py "${common[@]}" --skip-bf16 --recipes tensorwise+out+ends \
      --json "$OUT/fp8-ends.json"
    wait
    grep -hE "^bf16|^fp8|exit|Error" $LOGS/*.log | cut -c1-300
    python3 bench/cp_fp8.py --compare "$OUT/bf16.json" "$OUT/fp8-ends.json" 2>&1 | tail -n 3
    echo "== speed, 8B shape, mbs 4: FP8 + output layer + bf16 first/last layers"
    timeout $((590 - SECONDS)) python3 bench/train.py --model llama-8b-8l --seq-length 4096 --global-batch-size 8 \
      --micro-batch-size 4 --steps 6 --no-baseline --fp8 tensorwise --fp8-output-proj --first-last-layers-bf16 2>&1 \
      | grep -E "^bridge|Error" ;;
esac
