"""LoRA runs to and from HF PEFT: `bridge export RUN --adapter` (a PEFT folder), `bridge export RUN` (the adapter merged
into its base, a plain HF folder) and `bridge import --adapter FOLDER` (a PEFT folder as a LoRA run to train on).

Global adapter tensors carry Megatron names with the global layer index (`decoder.layers.3.self_attention.linear_qkv.
adapter.linear_in.weight`); the family's mapping row of the base weight (`...linear_qkv.weight` <-> q/k/v_proj) names
the HF modules and splits B and the DoRA magnitude the way it splits the base's rows (docs/lora.md):
    one A shared by the fused parts (bridge's training):  A_q = A_k = A_v = A,   B_q, B_k, B_v = split_qkv(B)
    canonical (an A per part, from peft):                 A_j = A[j r:(j+1) r],  B_j = split(B)[j][:, j r:(j+1) r]
Both are exact: part j's rows of B A are B_j A_j.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bridge.checkpoint import HF_META_DIR, CheckpointMeta, atomic_output_dir, copy_hf_meta, hf_meta_bytes
from bridge.config import ModelConfig, megatron_args
from bridge.converters.convert import export_hf, open_checkpoint
from bridge.converters.megatron_legacy import LegacyCheckpointReader, LegacyCheckpointWriter
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.mapping import Conversion
from bridge.models import conversions
from bridge.nn.lora import TARGETS, LoRASpec, adapter_split
from bridge.sharding import gather, rule_for, split
from bridge.training.lora_run import LORA_FILE, read_lora

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
#: bridge's adapter tensor -> peft's suffix of the HF module name.
PEFT_NAMES = {"linear_in.weight": "lora_A.weight", "linear_out.weight": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.adapter\.(linear_in\.weight|linear_out\.weight|magnitude)$")


def adapted(cfg: ModelConfig, spec: LoRASpec) -> list[tuple[str, Conversion]]:
    """(global Megatron module, the mapping conversion of its weight) of every linear the spec adapts."""
    by_name = {c.megatron: c for c in conversions(cfg)}
    out = []
    for layer in range(cfg.num_layers):
        for target in spec.target_modules:
            module = f"decoder.layers.{layer}.{TARGETS[target].path}"
            if f"{module}.weight" in by_name:
                out.append((module, by_name[f"{module}.weight"]))
    return out


def _params(spec: LoRASpec) -> tuple[str, ...]:
    return ("linear_in.weight", "linear_out.weight") + (("magnitude",) if spec.use_dora else ())


def read_adapter(run: Path, iteration: int | None = None) -> tuple[LoRASpec, Path, CheckpointMeta, dict[str, torch.Tensor]]:
    """A LoRA run's adapter as global tensors, every rank file's tensor used once and every expected tensor found."""
    spec, base = read_lora(run)
    meta = CheckpointMeta.load(run)
    reader = LegacyCheckpointReader(run, meta.layout, iteration)
    layout, cfg = meta.layout, meta.config
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for tp_rank, pp_rank, ep_rank, chunk, name in reader.entries():
        match = _LAYER.match(name)
        if match is None:
            raise BridgeError(f"{run} holds {name}, not an adapter tensor; a LoRA run's files hold only the adapter")
        layer = layout.global_layer(pp_rank, chunk, int(match.group(1)), cfg.num_layers)
        key = f"decoder.layers.{layer}.{match.group(2)}.adapter.{match.group(3)}"
        tensor = reader.get(tp_rank, pp_rank, chunk, name, ep_rank)
        if ep_rank and not torch.equal(tensor, shards[key][tp_rank]):
            raise BridgeError(f"{key} differs between EP ranks 0 and {ep_rank}; the checkpoint is inconsistent")
        shards.setdefault(key, {})[tp_rank] = tensor
    expected = {f"{m}.adapter.{p}" for m, _ in adapted(cfg, spec) for p in _params(spec)}
    missing, unexpected = sorted(expected - set(shards)), sorted(set(shards) - expected)
    if missing or unexpected:
        raise BridgeError(f"{run}'s adapter does not match its {LORA_FILE}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    tensors = {}
    for key, by_rank in shards.items():
        module, param = key.split(".adapter.")
        kind = next(t.kind for t in TARGETS.values() if module.endswith(t.path))
        tensors[key] = gather([by_rank[r] for r in range(layout.tp)], adapter_split(kind, rule_for(f"{module}.weight"), param), 0)
    return spec, base, meta, tensors


def to_peft(cfg: ModelConfig, spec: LoRASpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global Megatron adapter tensors -> peft's state dict (HF module names, fused parts split)."""
    out: dict[str, torch.Tensor] = {}
    for module, conv in adapted(cfg, spec):
        a, b = tensors[f"{module}.adapter.linear_in.weight"], tensors[f"{module}.adapter.linear_out.weight"]
        names = [n.removesuffix(".weight") for n in conv.hf]
        parts = len(names)
        b_parts = conv.to_hf(b, cfg)  # rows of each HF linear, as the base weight's
        m_parts = conv.to_hf(tensors[f"{module}.adapter.magnitude"], cfg) if spec.use_dora else [None] * parts
        canonical = a.shape[0] == parts * spec.rank and parts > 1
        for j, (name, b_j, m_j) in enumerate(zip(names, b_parts, m_parts)):
            cols = slice(j * spec.rank, (j + 1) * spec.rank) if canonical else slice(None)
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a[cols].clone()  # its own storage: parts share A
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b_j[:, cols].contiguous()
            if m_j is not None:
                out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m_j.contiguous()
    return out


def peft_config(spec: LoRASpec, cfg: ModelConfig, base_name: str | None) -> dict[str, Any]:
    """adapter_config.json: the fields peft reads (it fills the rest with its defaults). Targets are the HF modules'
    short names for a dense model, their full names where an MoE model's other linears could share a short name."""
    modules = [n.removesuffix(".weight") for _, conv in adapted(cfg, spec) for n in conv.hf]
    targets = sorted(modules) if cfg.moe else sorted({m.rsplit(".", 1)[1] for m in modules})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": targets, "use_dora": spec.use_dora,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None}


def base_name(base: Path) -> str | None:
    """The base model as the Hub knows it: the id it was imported from, else the folder."""
    source = CheckpointMeta.load(base).source
    return source.get("id") or source.get("path") or str(base)


def export_adapter(run: str | Path, out: str | Path, *, iteration: int | None = None, overwrite: bool = False) -> Path:
    """A LoRA run -> HF PEFT folder (adapter_config.json + adapter_model.safetensors) that peft loads on the base."""
    spec, base, meta, tensors = read_adapter(Path(run), iteration)
    state = to_peft(meta.config, spec, tensors)
    config = peft_config(spec, meta.config, base_name(base))
    with atomic_output_dir(Path(out), overwrite, sources=(Path(run),)) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    log.info("wrote %s (%d adapted modules, r=%d)", out, len(state) // (2 + spec.use_dora), spec.rank)
    return Path(out)


class _Merged:
    """The base's tensors with the adapter merged in: W + scaling B A, or for DoRA m / ||W + scaling B A|| (W + scaling
    B A) per output row (in fp64, cast back to the weight's dtype). Every adapted module must be merged."""

    def __init__(self, source: Any, spec: LoRASpec, adapter: dict[str, torch.Tensor]) -> None:
        self.source, self.spec, self.adapter = source, spec, adapter
        self.conversions = source.conversions
        self.merged: set[str] = set()

    def tensors(self, meta: bool = False) -> Iterator[tuple[Conversion, torch.Tensor]]:
        for conv, tensor in self.source.tensors(meta):
            module = conv.megatron.removesuffix(".weight")
            if meta or f"{module}.adapter.linear_in.weight" not in self.adapter:
                yield conv, tensor
                continue
            yield conv, self._merge(module, tensor)
            self.merged.add(module)

    def _merge(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        a = self.adapter[f"{module}.adapter.linear_in.weight"].double()
        b = self.adapter[f"{module}.adapter.linear_out.weight"].double()
        w = weight.double() + self.spec.scaling * b @ a
        if self.spec.use_dora:
            w = w * (self.adapter[f"{module}.adapter.magnitude"].double() / w.norm(dim=1)).unsqueeze(1)
        return w.to(weight.dtype)

    def finish(self) -> None:
        self.source.finish()
        missing = sorted({k.split(".adapter.")[0] for k in self.adapter} - self.merged)
        if missing:
            raise BridgeError(f"the base has no weight for the adapted modules {missing[:6]}; is it the run's base?")


def export_merged(run: str | Path, out: str | Path, *, dtype: str = "auto", max_shard_size: str = "5GB",
                  overwrite: bool = False, iteration: int | None = None) -> Path:
    """A LoRA run -> its base with the adapter merged in, a plain HF folder."""
    spec, base, _, tensors = read_adapter(Path(run), iteration)
    return export_hf(base, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                     adjust=lambda source: _Merged(source, spec, tensors))


def export(checkpoint: str | Path, out: str | Path, *, adapter: bool = False, **kwargs: Any) -> Path:
    """`bridge export`: a LoRA run merged (or, with `adapter`, as a PEFT folder); any other checkpoint as it is."""
    is_run = (Path(checkpoint) / LORA_FILE).is_file()
    if adapter:
        if kwargs.get("hf_config") is not None:
            raise BridgeError("--adapter exports a bridge LoRA run; --hf-config is for Megatron-LM checkpoints")
        return export_adapter(checkpoint, out, iteration=kwargs.get("iteration"), overwrite=kwargs.get("overwrite", False))
    if is_run:
        kwargs.pop("hf_config", None)
        return export_merged(checkpoint, out, **kwargs)
    return export_hf(checkpoint, out, **kwargs)
