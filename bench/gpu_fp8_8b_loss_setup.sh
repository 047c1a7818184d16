# Sourced by the eighth session's 8B-shape loss-curve scripts (gpu_fp8_e4m3_loss.sh, gpu_fp8_seeds.sh): the
# device setup, then `common` (bench/cp_fp8.py's arguments for 200 steps at global batch 16 on real text) and the
# text corpus and tokenizer, built once in /tmp/corpus for the four runs side by side.
source bench/gpu_setup.sh
export PYTHONPATH=/tmp/site
LOGS=/tmp/logs; mkdir -p $LOGS
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
common=(fp8 --model llama-8b-8l --seq-length 4096 --micro-batch-size 2 --global-batch-size 16 --steps 200 --warmup 5
        --compile --lr 2e-4 --extra-text "$stdlib" --corpus /tmp/corpus)
python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from cp_fp8 import text_corpus; \
print(text_corpus(Path('/tmp/corpus'), 8192, Path('$stdlib')))"
LIMIT=${LIMIT:-565}
