"""LoRA runs on disk: `SAVE/lora.json` names the adapter's settings and the base checkpoint it was trained on.

A LoRA run's `iter_N/` files hold only the adapter tensors (under their Megatron names), their optimizer state and
the usual training entries; the base weights stay where they were and are referenced by absolute path, so a
checkpoint costs the adapter's size. `bridge train --load RUN` resumes it (the base is loaded from the reference),
`bridge export RUN` merges it into the base, `bridge export RUN --adapter` writes a PEFT folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from bridge.checkpoint import META_FILE, CheckpointMeta
from bridge.converters.megatron_legacy import TRACKER
from bridge.errors import BridgeError
from bridge.config import ModelConfig
from bridge.models import conversions
from bridge.nn.lora import TARGETS, LoRASpec, check_spec
from bridge.training.config import TrainConfig

LORA_FILE = "lora.json"


def is_lora_run(folder: str | os.PathLike) -> bool:
    return (Path(folder) / LORA_FILE).is_file()


def read_lora(folder: str | os.PathLike) -> tuple[LoRASpec, Path]:
    """(the adapter's settings, the base checkpoint) of a LoRA run; one line when either is unusable."""
    path = Path(folder) / LORA_FILE
    if not path.is_file():
        raise BridgeError(f"{folder} has no adapter ({LORA_FILE}): it was not trained with --lora-rank; "
                          "export it without --adapter")
    data = json.loads(path.read_text())
    base = Path(data["base"])
    if not (base / META_FILE).is_file():
        raise BridgeError(f"the base checkpoint {base} of the LoRA run {folder} is gone; the run stores only the "
                          "adapter: put the base back at that path")
    now = base_iteration(base)
    if now != data.get("base_iteration", now):
        raise BridgeError(f"the base checkpoint {base} of the LoRA run {folder} is at iteration {now}, the adapter was "
                          f"trained on its iteration {data['base_iteration']}; the run refers to the base, not a copy")
    return LoRASpec.from_json(data["lora"]), base


def base_iteration(base: Path) -> str | None:
    """The iteration a base checkpoint's tracker names (`release` for an import): an adapter is trained on that one."""
    tracker = base / TRACKER
    return tracker.read_text().strip() if tracker.is_file() else None


def lora_spec(cfg: TrainConfig) -> LoRASpec:
    return LoRASpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    target_modules=tuple(cfg.lora_target_modules), use_dora=cfg.lora_use_dora,
                    canonical=cfg.lora_canonical, absent_parts=tuple((t, int(j)) for t, j in cfg.lora_absent_parts),
                    seed=cfg.seed)


def write_lora(save: Path, spec: LoRASpec, base: str | os.PathLike) -> None:
    """`lora.json` (write-then-rename), once per save folder: the adapter's settings, and the base checkpoint by
    absolute path and the iteration its tracker names."""
    data = {"lora": spec.to_json(), "base": str(Path(base).resolve()), "base_iteration": base_iteration(Path(base))}
    tmp = save / (LORA_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, save / LORA_FILE)


def _flags(spec: LoRASpec) -> dict[str, Any]:
    return {"lora_rank": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "lora_target_modules": list(spec.target_modules), "lora_use_dora": spec.use_dora, "lora_canonical": spec.canonical,
            "lora_absent_parts": [list(p) for p in spec.absent_parts]}


def resolve_lora_resume(cfg: TrainConfig) -> TrainConfig:
    """`--load RUN` of a LoRA run: load the base it references and resume the adapter from RUN; the run's adapter
    settings stand (flags that contradict them are refused, one line)."""
    if cfg.load is None or not is_lora_run(cfg.load) or cfg.lora_resume is not None:
        return cfg
    spec, base = read_lora(cfg.load)
    saved = _flags(spec)
    if cfg.lora_rank is not None:
        given = {k: getattr(cfg, k) for k in saved if k not in ("lora_canonical", "lora_absent_parts")}
        differ = sorted(k for k in given if given[k] != saved[k] and not (k == "lora_target_modules"
                                                                          and set(given[k]) == set(saved[k])))
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (saved: {saved[k]})" for k in differ)
            raise BridgeError(f"{cfg.load} is a LoRA run with other settings: {flags}; drop the --lora-* flags to resume it")
    meta = CheckpointMeta.load(Path(cfg.load))
    here = (cfg.tp, cfg.pp, cfg.vpp, cfg.ep)
    there = (meta.layout.tp, meta.layout.pp, meta.layout.vpp, meta.layout.ep)
    if here != there:
        raise BridgeError(f"{cfg.load} was trained at {meta.layout.name}; resume its adapter with --tp {there[0]} "
                          f"--pp {there[1]}{f' --vpp {there[2]}' if there[2] else ''}{f' --ep {there[3]}' if there[3] > 1 else ''}")
    return dataclasses.replace(cfg, **saved, load=str(base), lora_resume=str(cfg.load))


def check_targets(cfg: TrainConfig, model: ModelConfig, grouped_experts: bool = False) -> None:
    """Every --lora-target-modules name must match a linear of the model (linear_qkv matches none on an MLA model);
    adapted routed experts take no expert TP, DoRA or dropout (peft adapts fused experts without either)."""
    if cfg.lora_rank is None:
        return
    keys = [c.megatron for c in conversions(model)]
    empty = [t for t in cfg.lora_target_modules if not any(_matches(k, TARGETS[t]) for k in keys)]
    if empty:
        raise BridgeError(f"--lora-target-modules {' '.join(empty)} matches no linear layer of {model.architecture}; "
                          f"drop it or choose from {' '.join(TARGETS)}")
    experts = [t for t in cfg.lora_target_modules if TARGETS[t].expert_path and any(".experts.local_experts." in k
               and k.endswith(f"{t}.weight") for k in keys)]
    why = {"--tp > 1 (expert TP)": cfg.tp > 1, "--lora-use-dora": cfg.lora_use_dora, "--lora-dropout": cfg.lora_dropout > 0,
           "--moe-grouped-gemm experts": grouped_experts}
    bad = [flag for flag, on in why.items() if on]
    if experts and any(c.hf_index is not None for c in conversions(model)):
        raise BridgeError(f"--lora-target-modules {' '.join(experts)} adapts {model.architecture}'s routed experts, "
                          "whose HF form (every expert in one tensor, gate and up interleaved) bridge writes no peft "
                          "adapter for; adapt linear_qkv linear_proj only")
    if experts and bad:
        raise BridgeError(f"--lora-target-modules {' '.join(experts)} adapts {model.architecture}'s routed experts, "
                          f"which bridge does with neither {' nor '.join(bad)}; change that, or adapt linear_qkv "
                          "linear_proj only")


def _matches(key: str, target: Any) -> bool:
    """Whether a global Megatron weight key is the target's dense linear or one routed expert's."""
    tail = key.split(".", 3)[-1] if key.startswith("decoder.layers.") else key
    return tail == f"{target.path}.weight" or (target.expert_path is not None and re.fullmatch(
        target.expert_path.replace(".", r"\.").replace("{}", r"\d+") + r"\.weight", tail) is not None)


def check_lora(cfg: TrainConfig) -> None:
    """LoRA flags that cannot work together, before any process starts."""
    if cfg.lora_rank is None:
        if cfg.lora_use_dora:
            raise BridgeError("--lora-use-dora adapts with DoRA: give --lora-rank too")
        return
    check_spec(lora_spec(cfg))
    if cfg.load is None and cfg.save:  # --model-config: a random base, for benchmarks; nothing to refer a save to
        raise BridgeError("a LoRA run's checkpoints refer to their base: give the base with --load CHECKPOINT")
    if cfg.ckpt_format != "torch":
        raise BridgeError("LoRA runs save with --ckpt-format torch (the adapter's per-rank files); drop --ckpt-format "
                          f"{cfg.ckpt_format}")
    if cfg.fp8:
        raise BridgeError("--fp8 is not supported with --lora-rank yet; train the adapter in --bf16")
