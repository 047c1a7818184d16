#!/usr/bin/env bash
# Device-tool call on one H100 (fifth session): fp32 gradients under --bf16 (Megatron-LM's default, now bridge's).
# 1. The fused weight-gradient op on CUDA (bf16 GEMM with an fp32 output added into the fp32 buffer) against an
#    fp64 reference and the CPU path. 2. What fp32 gradients cost: the 8B shape (8 layers), seq 4096, global
#    batch 8, mbs 2, bf16 with fp32 gradients (default) vs --grad-reduce-in-bf16 (the old default), then FP8.
# `bench/gpu_grads.sh mbs4` runs only bf16 and FP8 at mbs 4, both with fp32 gradients and PyTorch's expandable
# segments: without them the bf16 run ran out of memory on the H100 (74.9 GiB needed, 6 GiB lost to fragmentation).
#   run(kind="nvidia-h100-x1", carry=[".whl"], command="OUT=$OUT bash bench/gpu_grads.sh [mbs4]")
source bench/gpu_setup.sh
export PYTHONPATH=/tmp/site
b8() { timeout "${T:-150}" python3 bench/train.py --model llama-8b-8l --seq-length 4096 --global-batch-size 8 --no-baseline \
    --steps 6 "$@" 2>&1 | grep -E "^bridge|Error|error" | grep -v "^{"; }
if [ "${1:-}" = mbs4 ]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  echo "== bf16 mbs4, fp32 gradients"; T=240 b8 --micro-batch-size 4
  echo "== fp8 mbs4, fp32 gradients"; T=200 b8 --micro-batch-size 4 --fp8 tensorwise
  exit
fi
python3 - <<'PY'
import torch
from bridge.nn.layers import accumulate_weight_grad
for tokens, out, inp in [(8192, 4096, 4096), (8192, 14336, 4096), (333, 96, 80)]:
    g = torch.Generator(device="cuda").manual_seed(0)
    grad = torch.randn(tokens, 1, out, device="cuda", generator=g).bfloat16()
    x = torch.randn(tokens, 1, inp, device="cuda", generator=g).bfloat16()
    start = torch.randn(out, inp, device="cuda", generator=g)
    buf = start.clone()
    accumulate_weight_grad(buf, grad, x)
    accumulate_weight_grad(buf, grad, x)  # twice: the second call must add to the first
    exact = start.double() + 2 * (grad.reshape(tokens, out).double().t() @ x.reshape(tokens, inp).double())
    cpu = start.cpu().clone()
    if tokens < 1000:
        accumulate_weight_grad(cpu, grad.cpu(), x.cpu()); accumulate_weight_grad(cpu, grad.cpu(), x.cpu())
    err = (buf.double() - exact).abs().max().item() / exact.abs().max().item()
    bf16_err = (exact.bfloat16().double() - exact).abs().max().item() / exact.abs().max().item()
    cpu_err = (cpu.double() - exact.cpu()).abs().max().item() / exact.abs().max().item() if tokens < 1000 else float("nan")
    print(f"fused fp32 accumulate {tokens}x{out}x{inp}: max rel err {err:.2e} (bf16 rounding alone {bf16_err:.2e}; "
          f"CPU path {cpu_err:.2e})")
PY
echo "== bf16, fp32 gradients (default)"; T=240 b8 --micro-batch-size 2
echo "== bf16, --grad-reduce-in-bf16"; b8 --micro-batch-size 2 --grad-reduce-in-bf16
echo "== fp8, fp32 gradients (default)"; T=200 b8 --micro-batch-size 2 --fp8 tensorwise
