#!/usr/bin/env bash
# Device-tool call (ninth session), two or more GPUs: the CP code paths that changed since they last ran on GPUs
# (ab84a9a: the softmax scale passed to the ring's cuDNN/flash/math block kernels; 062b425: the ring pads MLA's
# narrower v itself), then, only where the cards are H100s, the CP=1/2/4 sweep of issue 9 (1B shape, seq 32768).
#   check: ring attention against fp32 (dense heads, CP=2, both exchanges, each backend); `bridge verify --cp 2` of a
#          1B-shaped Llama through the ring (bf16 and fp32); bench/gpu_cp_moe.py (MLA and MoE at CP=2 x EP=2:
#          verify fp32/bf16, 10 training steps against CP=1)
#   sp:    MLA's head sizes in the ring (v 128, padded to 192) against v 192 and CP=1 SDPA; the bf16 half of the
#          dense verify through the ring (its table was cut off in the first call); bench/gpu_cp_moe.py --sp (4 GPUs:
#          sequence parallelism with MoE and MLA at TP=2 x EP=2, verify fp32/bf16 and 10 steps against TP=2 without)
#   mla:   after the ring sends MLA's narrower v unpadded (a block kernel that needs one head size pads it per
#          block) and the all-gather pads v after gathering: attention alone at MLA's and the 1B shape's heads (errors,
#          times, kernels); bench/gpu_cp_moe.py for the DeepSeek shape at CP=2 x EP=2; bf16 verify with and without
#          sequence parallelism at TP=2 x EP=2 (is the sp call's bf16 miss SP's?)
#   sweep: H100s only (stops at once elsewhere): `bridge train --compile` at seq 32768, CP=1 (DP=all GPUs), 2 and,
#          on 4 GPUs, 4, each exchange, 3 steps after 2
#          (eleventh session: CPS=1,4 and CPS=2 split the sweep over two calls on four GPUs; EXCHANGES picks the K/V
#          exchanges, default all three; SEQ the length, default 32768: at 32K CP=1 now fits an H100, so the next
#          call is SEQ=65536 CPS=1,2,4 EXCHANGES=p2p,a2a)
#          (twelfth session: CAP_GIB=N runs it on any card with each rank's allocator capped at N GiB,
#          bench/memcap/sitecustomize.py; 78.5: an 80 GB H100 gives torch 79.2 GiB, less its CUDA context; NCCL buffers are not counted)
#   a2a:   (eleventh session, before its first GPU run) attention alone at CP=2 and CP=4, all three exchanges, seq
#          32768: errors against fp32 at 4096 and times, the 1B shape's heads
#   a2a-probe: (eleventh session: the sweep's compiled CP=4 a2a ran 1.76x the ring's tokens/s, faster than four
#          GPUs can do the work) CP=4 a2a and p2p at seq 32768, compiled with a profile of two steps each, then eager
#   compiled: (eleventh session, after the collectives became functional, four GPUs of any kind)
#          bench/compiled_parallel.py over NCCL: compiled against eager at TP=2 + SP, CP=2 a2a and EP=2, beside the
#          same for a copy of the previous bridge where OLD names one (its compiled gradients were wrong); then
#          CP=4 with a2a and the ring at seq 32768
#   run(kind="nvidia-h100-x4", command="OUT=$OUT bash bench/gpu_check_cp.sh check")
source bench/gpu_setup.sh
case "${1:?usage: bench/gpu_check_cp.sh check|sp|mla|a2a|a2a-probe|compiled|sweep}" in
  check)
    echo "== ring attention against fp32, CP=2, dense 1B heads"
    timeout 150 python3 bench/ring_attention.py --cps 2 --seq-length 8192 --check-length 4096 --iters 3 \
      --json "$OUT/ring_attention.json" 2>&1 | grep -E "^cp=|Error" | cut -c1-1500
    echo "== bridge verify --cp 2 (the ring), 1B-shaped Llama, bf16 and fp32"
    timeout 200 python3 bench/gpu_verify.py --tp 1 --cp 2 --also-fp32 2>&1 | tail -n 12
    echo "== CP=2 x EP=2: DeepSeek-V3-shaped (MLA) and Mixtral-shaped"
    timeout 240 python3 bench/gpu_cp_moe.py --json "$OUT/cp_moe.json" 2>&1 | grep -vE "^\s*$|it/s|Warning" | tail -n 30 ;;
  sp)
    for shape in mla mla-v192; do
      echo "== attention alone, shape $shape, seq 32768, CP=2"
      timeout 150 python3 bench/ring_attention.py --shape $shape --cps 2 --backends auto --iters 5 \
        --json "$OUT/ring_$shape.json" 2>&1 | grep -E "^cp=|Error" | cut -c1-1200
    done
    echo "== bridge verify --cp 2 (the ring), 1B-shaped Llama, bf16"
    timeout 150 python3 bench/gpu_verify.py --tp 1 --cp 2 2>&1 | grep -E "^all prompts|PASS|FAIL|Error"
    echo "== sequence parallelism with MoE/MLA: TP=2 x EP=2"
    timeout 300 python3 bench/gpu_cp_moe.py --sp --json "$OUT/sp_moe.json" 2>&1 \
      | grep -E "^all prompts|PASS|FAIL|Error| train |difference" ;;
  mla)
    for shape in mla llama-1b; do
      echo "== attention alone, shape $shape, seq 32768, CP=2"
      timeout 150 python3 bench/ring_attention.py --shape $shape --cps 2 --backends auto --iters 5 \
        --json "$OUT/ring_$shape.json" 2>&1 | grep -E "^cp=|Error" | cut -c1-1200
    done
    echo "== CP=2 x EP=2, DeepSeek-V3-shaped (MLA)"
    timeout 200 python3 bench/gpu_cp_moe.py --models deepseek-v3 --json "$OUT/cp_mla.json" 2>&1 \
      | grep -E "^all prompts|PASS|FAIL|Error| train |difference"
    echo "== bf16 verify at TP=2 x EP=2, without and with sequence parallelism"
    timeout 200 python3 bench/gpu_cp_moe.py --sp --verify-only --json "$OUT/sp_verify.json" 2>&1 \
      | grep -E "^layout|^all prompts|PASS|FAIL|Error" ;;
  a2a)
    timeout "${T:-200}" python3 bench/ring_attention.py --cps 2,4 --backends auto --iters 5 \
      --json "$OUT/ring_a2a.json" 2>&1 | grep -E "^cp=|Error" | cut -c1-1500 ;;
  a2a-probe)
    cp4() { timeout "$1" python3 bench/cp_fp8.py cp --model llama-3.2-1b --nproc 4 --steps 3 --warmup 2 \
        --seq-length 32768 --cps 4 --cp-comm-types a2a,p2p "${@:2}" 2>&1 | grep -E "^cp[0-9]|Error" | cut -c1-300; }
    echo "== compiled, profiled"; cp4 300 --compile --profile "$OUT/prof"
    for run in cp4-a2a cp4-p2p; do
      echo "== $run: kernels"; python3 bench/trace_summary.py "$OUT/prof/$run/profile_rank0.json" --top 18 2>&1 | head -40
    done
    rm -rf "${OUT:?}/prof"
    echo "== eager at $SECONDS s"; cp4 $((585 - SECONDS)) ;;
  compiled)  # what the eleventh session ran, in three calls, on the 4x H200 it was given
    echo "== compiled against eager, this checkout (GPUs 0,1) and the previous bridge in \$OLD (GPUs 2,3)"
    ( CUDA_VISIBLE_DEVICES=0,1 timeout 300 python3 bench/compiled_parallel.py --layouts tp2-sp,cp2-a2a,ep2 \
        --json "$OUT/compiled.json" > "$OUT/new.log" 2>&1 ) &
    if [ -n "${OLD:-}" ]; then
      ( CUDA_VISIBLE_DEVICES=2,3 PYTHONPATH="$OLD" timeout 300 python3 bench/compiled_parallel.py \
          --layouts tp2-sp,cp2-a2a --json "$OUT/compiled-old.json" > "$OUT/old.log" 2>&1 ) &
    fi
    wait; grep -hE "^bridge|^tp|^cp|^ep|Error" "$OUT"/new.log "$OUT"/old.log 2>/dev/null | cut -c1-300
    echo "== CP=4, a2a and the ring, seq 32768, compiled, at $SECONDS s"
    timeout $((585 - SECONDS)) python3 bench/cp_fp8.py cp --model llama-3.2-1b --nproc 4 --steps 3 --warmup 2 \
      --compile --seq-length 32768 --cps 4 --cp-comm-types a2a,p2p --json "$OUT/cp4.json" 2>&1 \
      | grep -E "^cp[0-9]|Error" | cut -c1-400 ;;
  sweep)  # tenth session: on two H100s too (CP=1/2); twelfth: CAP_GIB=78.5 runs it on H200s capped like an H100
    if [ -n "${CAP_GIB:-}" ]; then
      export BENCH_CUDA_MEMORY_GIB=$CAP_GIB PYTHONPATH="$PWD/bench/memcap${PYTHONPATH:+:$PYTHONPATH}"
      echo "allocator capped at $CAP_GIB GiB per GPU"
    else
      nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || { echo "not H100s: stopping"; exit 0; }
    fi
    gpus=$(nvidia-smi -L | wc -l); cps=${CPS:-$([ "$gpus" -ge 4 ] && echo 1,2,4 || echo 1,2)}
    timeout "${T:-560}" python3 bench/cp_fp8.py cp --model llama-3.2-1b --nproc "$gpus" --steps 3 --warmup 2 \
      --compile --seq-length "${SEQ:-32768}" --cps "$cps" --cp-comm-types "${EXCHANGES:-p2p,all_gather,a2a}" \
      --json "$OUT/cp-h100-${SEQ:-32768}-${cps//,/}.json" 2>&1 | grep -E "^cp[0-9]|Error" | cut -c1-400 ;;
esac
