# Sourced by the bench/gpu_*.sh device-tool scripts: $OUT, bridge installed (editable, no dependencies: the device
# machines have torch, transformers and safetensors), torchao from a carried .whl/ (if any) in /tmp/site, and
# `one_gpu GPU NAME CMD...`, which runs CMD on one GPU in the background, logging to $LOGS/NAME.log.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
LOGS=${LOGS:-$OUT}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$OUT/pip.log" 2>&1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
one_gpu() {  # GPU, log name, command...  (time limit: $LIMIT seconds, default 330)
  local gpu=$1 name=$2; shift 2
  ( export CUDA_VISIBLE_DEVICES=$gpu; timeout "${LIMIT:-330}" "$@" > "$LOGS/$name.log" 2>&1
    echo "$name exit $?" >> "$LOGS/$name.log" ) &
}
