#!/usr/bin/env bash
# One device-tool call on a 4-GPU machine that runs independent one-GPU measurements side by side (one per GPU:
# they share nothing but the host). Logs and JSON land in $OUT.
#   run(kind="nvidia-h100-x4", carry=[".whl"], command="OUT=$OUT bash bench/gpu_round.sh")
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$OUT/pip.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
one_gpu() {  # GPU, log name, command...
  local gpu=$1 name=$2; shift 2
  ( export CUDA_VISIBLE_DEVICES=$gpu; timeout "${LIMIT:-480}" "$@" > "$OUT/$name.log" 2>&1; echo "$name exit $?" >> "$OUT/$name.log" ) &
}
B1="python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 --global-batch-size 8 --steps 15"
LIMIT=480 one_gpu 0 fp8-8b env OUT="$OUT" bash bench/cp_fp8_gpu.sh fp8-8b
LIMIT=480 one_gpu 1 fp8-1b env OUT="$OUT" bash bench/cp_fp8_gpu.sh fp8-1b
one_gpu 2 train1-auto bash -c "python3 bench/attention.py; $B1 --json $OUT/bench1.json; $B1 --no-baseline --attention-backend fused --profile $OUT/prof-fused"
one_gpu 3 train1-flash bash -c "$B1 --no-baseline --attention-backend flash --profile $OUT/prof-flash; $B1 --no-baseline --micro-batch-size 8 --global-batch-size 16"
wait
for f in train1-auto train1-flash fp8-1b fp8-8b; do echo "== $f"; grep -vE "Warning|warn|^\s*$|pytree" "$OUT/$f.log" | tail -25; done
