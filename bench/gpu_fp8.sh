#!/usr/bin/env bash
# Device-tool call on one H100 (fourth session): where the FP8 step's time goes on the 8B shape (8 layers), seq 4096,
# global batch 8, and how the FP8 speed-up depends on the micro-batch size and the depth.
#   run(kind="nvidia-h100-x1", carry=[".whl"], command="OUT=$OUT bash bench/gpu_fp8.sh [profile|depth|mbs4]")
# The session ran these in two calls, together with two FP8 variants it then removed (docs/performance.md).
# The first run on a fresh machine compiles cold and needs more than the default 150 s: hence T=240 there.
source bench/gpu_setup.sh
export PYTHONPATH=/tmp/site
b8() { timeout "${T:-150}" python3 bench/train.py --model llama-8b-8l --seq-length 4096 --global-batch-size 8 --no-baseline \
    "$@" 2>&1 | grep -E "^bridge|Error|error" | grep -v "^{"; }
prof() { python3 bench/trace_summary.py "$OUT/$1/profile_rank0.json" --top 45; rm -rf "${OUT:?}/$1"; }
case "${1:-profile}" in
  profile)
    echo "== bf16 mbs1, profile"; T=240 b8 --micro-batch-size 1 --steps 6 --warmup 3 --profile "$OUT/p-bf16"; prof p-bf16
    echo "== fp8 mbs1, profile"; T=200 b8 --micro-batch-size 1 --steps 6 --warmup 3 --fp8 tensorwise --profile "$OUT/p-fp8"
    prof p-fp8
    echo "== bf16 mbs2"; b8 --micro-batch-size 2 --steps 6
    echo "== fp8 mbs2"; b8 --micro-batch-size 2 --steps 6 --fp8 tensorwise ;;
  depth)  # per-layer cost: the 8-layer step minus the 4-layer step
    for layers in 8 4; do
      echo "== $layers layers bf16 mbs2"; T=240 b8 --micro-batch-size 2 --steps 6 --layers $layers
      echo "== $layers layers fp8 mbs2"; b8 --micro-batch-size 2 --steps 6 --layers $layers --fp8 tensorwise
    done ;;
  mbs4)  # fifth session: two micro-batches of 4 instead of four of 2, then a third depth (10 layers) at mbs 2
    echo "== bf16 mbs4"; T=240 b8 --micro-batch-size 4 --steps 6
    echo "== fp8 mbs4"; T=200 b8 --micro-batch-size 4 --steps 6 --fp8 tensorwise
    echo "== 10 layers bf16 mbs2"; b8 --micro-batch-size 2 --steps 6 --layers 10
    echo "== 10 layers fp8 mbs2"; b8 --micro-batch-size 2 --steps 6 --layers 10 --fp8 tensorwise ;;
  *) echo "usage: bench/gpu_fp8.sh [profile|depth|mbs4]" >&2; exit 2 ;;
esac
