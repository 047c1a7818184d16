"""MoE conversion memory benchmark: import/export of a DeepSeek-V3-shaped checkpoint, peak RSS vs 2x largest + 1 GiB.

    python bench/convert_moe.py                                  # ~20 GB: 10 layers (3 dense), 16 experts, bf16, EP=2
    python bench/convert_moe.py --layers 6 --experts 8 --ep 4 --workdir /scratch/bench

The synthetic checkpoint keeps DeepSeek-V3's real layer structure and full widths (hidden 7168, MLA with
q/kv LoRA ranks 1536/512, dense FFN 18432 on the first `--dense` layers, routed experts of width 2048, one
shared expert, the sigmoid router's score-correction bias, 129k vocabulary) and scales only the number of
layers and experts, so the largest tensor (the 1.7 GiB embedding / head) is the real one. Each step runs in a
fresh subprocess that reports its own VmHWM (bench/convert.py's `child`), so the numbers are the converter's
own peak, not this script's. Weights are a repeated random tile: content does not change memory or I/O.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import bridge_step  # noqa: E402  (bench/ is a folder of scripts, not a package)

CONFIG = Path(__file__).resolve().parents[1] / "tests" / "configs" / "deepseek-ai--DeepSeek-V3" / "config.json"
GIB = 2**30


def hf_config(layers: int, experts: int, dense: int) -> dict:
    """DeepSeek-V3's config.json with fewer layers and experts, bf16 (no FP8 quantization), no MTP layer."""
    data = json.loads(CONFIG.read_text())
    data.update(num_hidden_layers=layers, n_routed_experts=experts, first_k_dense_replace=dense, n_group=8,
                topk_group=4, num_experts_per_tok=8, num_nextn_predict_layers=0, torch_dtype="bfloat16")
    data.pop("quantization_config", None)
    data.pop("auto_map", None)
    return data


def make_synthetic(folder: Path, layers: int, experts: int, dense: int) -> tuple[int, int]:
    """Write the HF folder tensor by tensor (shapes from transformers' model on `meta`); (total, largest) bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridge.converters.hf import PlannedTensor, StreamingSafetensorsWriter

    data = hf_config(layers, experts, dense)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    config = AutoConfig.for_model(data["model_type"], **{k: v for k, v in data.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = [PlannedTensor(n, torch.float32 if n.endswith("e_score_correction_bias") else torch.bfloat16, shape)
            for n, shape in _checkpoint_shapes(model.state_dict())]
    writer = StreamingSafetensorsWriter(folder, plan, max_shard_size=5 * 10**9)
    tile = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02
    for p in plan:
        numel = torch.Size(p.shape).numel()
        flat = tile.repeat(-(-numel // tile.numel()))[:numel]
        writer.write(p.name, flat.view(p.shape).to(p.dtype))
        del flat
    writer.close()
    return sum(p.nbytes for p in plan), max(p.nbytes for p in plan)


def _checkpoint_shapes(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """Names as the Hub checkpoint stores them: transformers fuses experts in memory (`experts.gate_up_proj`
    [E, 2F, h], `experts.down_proj` [E, h, F]); on disk every expert has its own gate/up/down_proj."""
    out = []
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            e, f2, h = t.shape
            base = name[: -len("gate_up_proj")]
            out += [(f"{base}{j}.{w}.weight", (f2 // 2, h)) for j in range(e) for w in ("gate_proj", "up_proj")]
        elif name.endswith("mlp.experts.down_proj"):
            e, h, f = t.shape
            out += [(f"{name[: -len('down_proj')]}{j}.down_proj.weight", (h, f)) for j in range(e)]
        else:
            out.append((name, tuple(t.shape)))
    return out


def run(root: Path, layers: int, experts: int, dense: int, ep: int, export: bool) -> dict[str, float]:
    src, ckpt, out = root / "hf", root / "ckpt", root / "out"
    total, largest = make_synthetic(src, layers, experts, dense)
    row = {"layers": layers, "dense_layers": dense, "experts": experts, "ep": ep, "model_gib": total / GIB,
           "largest_tensor_gib": largest / GIB, "rss_budget_gib": (2 * largest + GIB) / GIB}
    imp = bridge_step("import", str(src), "--out", str(ckpt), "--ep", str(ep))
    row.update(import_s=imp["seconds"], import_peak_rss_gib=imp["peak_rss"] / GIB)
    shutil.rmtree(src)  # keep the disk to two copies at most
    if export:
        exp = bridge_step("export", str(ckpt), "--out", str(out))
        row.update(export_s=exp["seconds"], export_peak_rss_gib=exp["peak_rss"] / GIB)
    for path in (ckpt, out):
        shutil.rmtree(path, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--dense", type=int, default=3, help="first dense layers (DeepSeek-V3: 3)")
    parser.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (DeepSeek-V3: 256)")
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--no-export", dest="export", action="store_false")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one); needs ~2x the model on disk")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bridge-bench-moe-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        row = run(root, args.layers, args.experts, args.dense, args.ep, args.export)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ok = all(row[k] <= row["rss_budget_gib"] for k in ("import_peak_rss_gib", "export_peak_rss_gib") if k in row)
    print(f"DeepSeek-V3 shape: {row['layers']} layers ({row['dense_layers']} dense), {row['experts']} experts, EP={row['ep']}; "
          f"model {row['model_gib']:.2f} GiB, largest tensor {row['largest_tensor_gib']:.2f} GiB, "
          f"budget {row['rss_budget_gib']:.2f} GiB")
    print(f"import {row['import_s']:.0f} s, peak RSS {row['import_peak_rss_gib']:.2f} GiB"
          + (f"; export {row['export_s']:.0f} s, peak RSS {row['export_peak_rss_gib']:.2f} GiB" if "export_s" in row else "")
          + f" -> {'within' if ok else 'OVER'} budget")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
