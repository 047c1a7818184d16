#!/usr/bin/env bash
# Device-tool call on one H100 (seventh session): does Megatron's --fp8-format e4m3 (tensorwise scaling, e4m3 output
# gradients) run on Hopper at hybrid's speed (e5m2 gradients)? 1B shape, seq 2048, mbs 4, compiled, 5 timed steps
# after 3, same seed: tokens/s and losses of each.
#   run(kind="nvidia-h100-x1", carry=[".whl"], command="OUT=$OUT bash bench/gpu_fp8_e4m3.sh")
source bench/gpu_setup.sh
export PYTHONPATH=/tmp/site
for fmt in hybrid e4m3; do
  timeout 110 python3 bench/train.py --model llama-3.2-1b --fp8 tensorwise --fp8-format $fmt --no-baseline \
    --steps 5 --warmup 3 --json "$OUT/fp8-$fmt.json" > "$OUT/fp8-$fmt.log" 2>&1
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], json.dumps(r)[:700])" \
    "$OUT/fp8-$fmt.json" $fmt || tail -3 "$OUT/fp8-$fmt.log"
done
