#!/usr/bin/env bash
# Device-tool call on a 4-GPU machine: the one-GPU 1B benchmark per attention backend side by side (one per GPU)
# with a profile of the default, then TP=4 on the 8B-shaped model, then the context-parallel sweeps.
#   run(kind="nvidia-h100-x4", carry=[".whl"], command="OUT=$OUT bash bench/gpu_round2.sh")
LOGS=/tmp; LIMIT=120  # logs stay on the machine: only 8 files come back from a call
source bench/gpu_setup.sh
B1="python3 bench/train.py --model llama-3.2-1b --seq-length 2048 --steps 12 --micro-batch-size 4 --global-batch-size 8 --no-baseline"
one_gpu 0 auto $B1 --profile /tmp/prof
one_gpu 1 flash $B1 --attention-backend flash
one_gpu 2 fused $B1 --attention-backend fused
wait
for f in auto flash fused; do echo "== 1B, one GPU, --attention-backend $f"; grep -E "^bridge|exit|Error" /tmp/$f.log; done
head -48 /tmp/prof/profile_rank0.txt | cut -c1-160
echo "== 8B-shaped, 8 layers, seq 4096, four GPUs"
B4="python3 bench/train.py --model llama-8b-8l --seq-length 4096 --nproc 4 --no-baseline --steps 8 --warmup 4 --global-batch-size 8"
for mbs in 1 2; do timeout 100 $B4 --micro-batch-size $mbs --layouts tp4 2>&1 | grep -E "^bridge|Error" | sed "s/^/mbs $mbs /"; done
echo "== context parallel, 1B shape"
timeout 140 env OUT="$OUT" bash bench/cp_fp8_gpu.sh cp > "$OUT/cp.log" 2>&1; echo "cp exit $?"
grep -E "^cp=|Error" "$OUT/cp.log"
timeout 110 env OUT="$OUT" bash bench/cp_fp8_gpu.sh cp-long > "$OUT/cp-long.log" 2>&1; echo "cp-long exit $?"
grep -E "^cp=|Error" "$OUT/cp-long.log"
