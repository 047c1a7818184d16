"""LoRA at real size, every step a `bridge` command as a user types it: Qwen3-8B's real config at full size.

    random Qwen3-8B (save_pretrained) -> bridge import -> bridge train --lora-rank 16 (100 steps)
    -> bridge export --adapter -> peft loads it on the base -> bridge push --adapter -> download, peft loads it again

One GPU (random weights, about 16 GB in bf16):
    python bench/lora_journey.py --out /tmp/lora-journey
CPU smoke (the same steps on a scaled-down Qwen3, a few training steps):
    python bench/lora_journey.py --smoke

The Hub is the Hub-compatible server of the test suite (tests/hub_server.py) on 127.0.0.1. Each step is one
process; its wall time, peak resident memory and, on a GPU, the device's peak used memory go into a table and
`<out>/lora_journey.json` (bench/journey.py's step runner). Any failing step stops the run with its output.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.journey import MAKE_MODEL, TOKEN, USER, Journey, bridge, hub_env, table  # noqa: E402

REAL_CONFIG = ROOT / "tests" / "configs" / "Qwen--Qwen3-8B" / "config.json"
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512, bos_token_id=1, eos_token_id=2)

PEFT_LOAD = """
import sys, warnings, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
folder, base = sys.argv[1], sys.argv[2]
if folder.count("/") == 1 and not folder.startswith(("/", ".")):
    from huggingface_hub import snapshot_download
    folder = snapshot_download(folder, token=sys.argv[3])
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(model, folder)
keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
assert not keys, keys
ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
with torch.no_grad():
    print("adapter loads with peft without a key warning; logits", tuple(model(ids).logits.shape))
"""


def lora_journey(args: argparse.Namespace) -> Journey:
    from tests.hub_server import HubServer

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shape = json.dumps(SMOKE_SHAPE if args.smoke else {})
    gpu = ["--bf16", "--compile", "--device", "cuda"] if not args.smoke else ["--device", "cpu"]
    with HubServer(tokens={TOKEN: USER}) as hub:
        j = Journey(out, hub_env(hub.url, out / "hf_home"))
        source, save, adapter = out / "qwen3-8b", out / "run", out / "adapter"
        j.python("make-model", MAKE_MODEL, str(REAL_CONFIG), str(source), shape, args.shard_size)
        j.run("import", bridge("import", str(source), "--out", str(out / "ckpt")))
        j.run("train-lora", bridge("train", "--load", str(out / "ckpt"), "--mock-data", *gpu, "--lora-rank", "16",
                                   "--lora-alpha", "32", "--micro-batch-size", str(args.micro_batch_size),
                                   "--seq-length", str(args.seq_length), "--train-iters", str(args.iters),
                                   "--save", str(save), "--log-interval", "10", "--no-progress", "--eval-iters", "2"),
              note=f"{args.iters} steps, r=16 on linear_qkv/proj/fc1/fc2")
        j.run("export-adapter", bridge("export", str(save), "--out", str(adapter), "--adapter"))
        j.python("peft-load", PEFT_LOAD, str(adapter), str(source), TOKEN)
        j.run("push-adapter", bridge("push", str(save), f"{USER}/qwen3-8b-lora", "--adapter", "--token", TOKEN))
        j.python("download-peft-load", PEFT_LOAD, f"{USER}/qwen3-8b-lora", str(source), TOKEN)
    (out / "lora_journey.json").write_text(json.dumps([asdict(r) for r in j.results], indent=2) + "\n")
    return j


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/bridge-lora-journey", help="work folder (replaced)")
    p.add_argument("--smoke", action="store_true", help="CPU, scaled-down model, a few steps")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--shard-size", default="5GB", help="max_shard_size of the source model's save_pretrained")
    args = p.parse_args()
    if args.smoke:
        args.iters, args.micro_batch_size, args.seq_length, args.shard_size = 3, 2, 32, "60KB"
    began = time.perf_counter()
    j = lora_journey(args)
    print(table(j.results))
    print(f"lora journey: {time.perf_counter() - began:.0f} s end to end, every step clean")


if __name__ == "__main__":
    main()
