#!/usr/bin/env bash
# Issue 9 GPU measurements, one stage per device call (each fits the 10-minute limit):
#   bash bench/cp_fp8_gpu.sh cp       # nvidia-h100-x4: 1B shape, seq 32768, CP = 1 (DP4), 2 (DP2), 4
#   bash bench/cp_fp8_gpu.sh cp-long  # nvidia-h100-x4: 1B shape, seq 131072 (its full context), CP = 1 and 4
#   bash bench/cp_fp8_gpu.sh fp8-1b   # one H100: 1B shape, bf16 vs FP8 tensorwise, 200 steps of real text, + a
#                                     # bf16 run from another seed (the run-to-run spread)
#   bash bench/cp_fp8_gpu.sh fp8-8b   # one H100: 8B shape (8 layers), same comparison
# torchao travels as a wheel in .whl/ (carry it: run(..., carry=[".whl"])); results land in $OUT/*.json.
set -u
stage=${1:?usage: bench/cp_fp8_gpu.sh cp|cp-long|fp8-1b|fp8-8b}
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
[ -d /tmp/site/torchao ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')  # real text beside this repo's
case "$stage" in
  cp) python3 bench/cp_fp8.py cp --model llama-3.2-1b --seq-length 32768 --nproc 4 --cps 1,2,4 \
        --steps 5 --warmup 2 --json "$OUT/cp.json" ;;
  cp-long) python3 bench/cp_fp8.py cp --model llama-3.2-1b --seq-length 131072 --nproc 4 --cps 1,4 \
        --steps 3 --warmup 2 --json "$OUT/cp-long.json" ;;
  fp8-1b) python3 bench/cp_fp8.py fp8 --model llama-3.2-1b --seq-length 4096 --micro-batch-size 2 \
        --global-batch-size 4 --steps 200 --warmup 5 --compile --lr 2e-4 --recipes tensorwise --noise-seed 4321 \
        --extra-text "$stdlib" --json "$OUT/fp8-1b.json" ;;
  fp8-8b) python3 bench/cp_fp8.py fp8 --model llama-8b-8l --seq-length 4096 --micro-batch-size 1 \
        --global-batch-size 2 --steps 200 --warmup 5 --compile --lr 2e-4 --recipes tensorwise \
        --extra-text "$stdlib" --json "$OUT/fp8-8b.json" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
