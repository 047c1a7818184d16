#!/usr/bin/env bash
# Device-tool call on one H100: the Triton split + RoPE kernels (bridge/nn/rope_qkv.py) checked under torch.compile,
# timed in the attention block (bench/rope.py), then the 1B benchmark with and without them, then a profile.
#   run(kind="nvidia-h100-x1", command="OUT=$OUT bash bench/gpu_session3b.sh")
source bench/gpu_setup.sh
echo "== compiled layer: one graph with the kernels?"
timeout 120 python3 - <<'PY' 2>&1 | grep -v Warning | tail -5
import torch
from bench.rope import block_triton
s, b, g, hpg, d = 2048, 4, 8, 4, 64
qkv = torch.randn(s, b, g * (hpg + 2) * d, device="cuda", dtype=torch.bfloat16)
cos = torch.randn(s, b, 1, d, device="cuda", dtype=torch.bfloat16); sin = torch.randn_like(cos)
e = torch._dynamo.explain(lambda x: block_triton(None, x, cos, sin, g, hpg, d))(qkv)
print("graphs", e.graph_count, "breaks", e.graph_break_count, [str(r.reason)[:80] for r in e.break_reasons])
PY
echo "== attention block per RoPE variant (ms, forward + backward)"
timeout 240 python3 bench/rope.py --iters 30 2>&1 | grep -E "ms |Error|error" | grep -v "^{"
bench() { timeout 200 python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 \
    --global-batch-size 8 --steps 15 "$@" 2>&1 | grep -E "^bridge|^HF|Error|error"; }
echo "== gbs 8: bridge (rope fusion) vs HF"; bench --json "$OUT/gbs8-rope.json"
echo "== gbs 8: --no-rope-fusion"; bench --no-baseline --no-rope-fusion
echo "== profile with rope fusion"
timeout 150 python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 --global-batch-size 8 \
    --steps 8 --warmup 4 --no-baseline --profile "$OUT/prof" 2>&1 | grep -E "^bridge|Error|error"
python3 bench/trace_summary.py "$OUT/prof/profile_rank0.json" --top 30
rm -rf "$OUT"/prof
