#!/usr/bin/env bash
# One device-tool call on a 2-GPU machine: `bridge verify` over 2 GPUs with NCCL (bf16, then fp32) and
# the 1-GPU training benchmark against HF transformers + torch.compile + fused AdamW.
#   run: bash bench/gpu_session.sh        (logs and JSON land in $OUT, or ./gpu-out)
source bench/gpu_setup.sh
out=$OUT
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
echo "== bridge verify, Llama-3.2-1B shape, TP=2 over 2 GPUs (NCCL)"
timeout 240 python3 bench/gpu_verify.py --also-fp32 > "$out/verify.log" 2>&1; echo "verify exit $?"
grep -E "PASS|FAIL|all prompts|layout|Error|error" "$out/verify.log" | tail -12
echo "== training throughput, Llama-3.2-1B shape, seq 2048, bf16, one GPU"
timeout 300 python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --micro-batch-size 4 --global-batch-size 8 \
    --steps 20 --json "$out/bench1.json" > "$out/train1.log" 2>&1; echo "train bench exit $?"
tail -15 "$out/train1.log"
