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
from bridge.config import ModelConfig
from bridge.converters.convert import checkpoint_args, export_hf, open_checkpoint
from bridge.converters.megatron_legacy import LegacyCheckpointReader, LegacyCheckpointWriter
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.mapping import Conversion, expected_hf_shapes
from bridge.models import conversions
from bridge.nn.lora import TARGETS, LoRASpec
from bridge.sharding import gather, rule_for, split
from bridge.training.lora_run import LORA_FILE, read_lora, write_lora

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
#: bridge's adapter tensor -> peft's suffix of the HF module name.
PEFT_NAMES = {"linear_in.weight": "lora_A.weight", "linear_out.weight": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.adapter\.(linear_in\.weight|linear_out\.weight|magnitude)$")


def adapted(cfg: ModelConfig, spec: LoRASpec) -> list[tuple[str, str, Conversion]]:
    """(target, global Megatron module, the mapping conversion of its weight) of every linear the spec adapts."""
    by_name = {c.megatron: c for c in conversions(cfg)}
    out = []
    for layer in range(cfg.num_layers):
        for target in spec.target_modules:
            t = TARGETS[target]
            experts = [t.expert_path.format(e) for e in range(cfg.num_experts)] if t.expert_path and cfg.moe else []
            for path in [t.path, *experts]:
                module = f"decoder.layers.{layer}.{path}"
                if f"{module}.weight" in by_name:
                    out.append((target, module, by_name[f"{module}.weight"]))
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
        module, routed = _global_expert(match.group(2), layout, ep_rank, cfg.num_experts)
        key = f"decoder.layers.{layer}.{module}.adapter.{match.group(3)}"
        tensor = reader.get(tp_rank, pp_rank, chunk, name, ep_rank)
        if ep_rank and not routed and not torch.equal(tensor, shards[key][tp_rank]):
            raise BridgeError(f"{key} differs between EP ranks 0 and {ep_rank}; the checkpoint is inconsistent")
        shards.setdefault(key, {})[tp_rank] = tensor
    expected = {f"{m}.adapter.{p}" for _, m, _ in adapted(cfg, spec) for p in _params(spec)}
    missing, unexpected = sorted(expected - set(shards)), sorted(set(shards) - expected)
    if missing or unexpected:
        raise BridgeError(f"{run}'s adapter does not match its {LORA_FILE}: missing {missing[:6]}, unexpected {unexpected[:6]}")
    tensors = {}
    for key, by_rank in shards.items():
        tensors[key] = gather([by_rank[r] for r in range(layout.tp)], rule_for(key), 0)
    return spec, base, meta, tensors


_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])$")


def _global_expert(module: str, layout: ParallelLayout, ep_rank: int, num_experts: int) -> tuple[str, bool]:
    """(the module with a routed expert's global index for its local one, whether it is a routed expert's)."""
    match = _LOCAL_EXPERT.match(module)
    if match is None:
        return module, False
    e = layout.global_expert(ep_rank, int(match.group(1)), num_experts)
    return f"mlp.experts.local_experts.{e}.{match.group(2)}", True


#: transformers 5 holds a MoE layer's routed experts as 3-D parameters of one module (Mixtral, Qwen3-MoE:
#: gate_up_proj [E, 2I, H] = [gate; up] per expert, down_proj [E, H, I]); peft adapts them as `target_parameters`.
HF_EXPERTS = "model.layers.{}.mlp.experts"
EXPERT_PARAMETERS = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}


def _expert_peft(cfg: ModelConfig, spec: LoRASpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Routed experts' adapters -> peft's ParamWrapper tensors, one pair per layer and parameter: lora_A [E r, in]
    (expert-major: rows [e r, (e+1) r) are A_e) and lora_B [out, r E] (column j E + e is column j of B_e). peft wraps
    the parameters in `target_parameters`' order, so gate_up_proj's wrapper sits inside down_proj's (`base_layer.`)."""
    present = [t for t in EXPERT_PARAMETERS if t in spec.target_modules] if cfg.num_experts else []
    out: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_layers):
        for target in present:
            keys = [f"decoder.layers.{layer}.{TARGETS[target].expert_path.format(e)}.adapter" for e in range(cfg.num_experts)]
            if f"{keys[0]}.linear_in.weight" not in tensors:
                continue
            a = torch.cat([tensors[f"{k}.linear_in.weight"] for k in keys])  # [E r, in]
            b = torch.stack([tensors[f"{k}.linear_out.weight"] for k in keys], dim=2)  # [out, r, E]
            inner = ".base_layer" if target == present[0] and len(present) > 1 else ""
            prefix = f"{PEFT_PREFIX}{HF_EXPERTS.format(layer)}{inner}"
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = a, b.reshape(b.shape[0], -1).contiguous()
    return out


def to_peft(cfg: ModelConfig, spec: LoRASpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global Megatron adapter tensors -> peft's state dict (HF module names, fused parts split)."""
    out: dict[str, torch.Tensor] = _expert_peft(cfg, spec, tensors)
    for target, module, conv in adapted(cfg, spec):
        if ".experts.local_experts." in module:
            continue
        a, b = tensors[f"{module}.adapter.linear_in.weight"], tensors[f"{module}.adapter.linear_out.weight"]
        names = [n.removesuffix(".weight") for n in conv.hf]
        parts = len(names)
        b_parts = conv.to_hf(b, cfg)  # rows of each HF linear, as the base weight's
        m_parts = conv.to_hf(tensors[f"{module}.adapter.magnitude"], cfg) if spec.use_dora else [None] * parts
        canonical = a.shape[0] == parts * spec.rank and parts > 1
        for j, (name, b_j, m_j) in enumerate(zip(names, b_parts, m_parts)):
            if (target, j) in spec.absent_parts:  # imported from peft without it: zero, and left out again
                continue
            cols = slice(j * spec.rank, (j + 1) * spec.rank) if canonical else slice(None)
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a[cols].clone()  # its own storage: parts share A
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b_j[:, cols].contiguous()
            if m_j is not None:
                out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m_j.contiguous()
    return out


def peft_config(spec: LoRASpec, cfg: ModelConfig, base_name: str | None) -> dict[str, Any]:
    """adapter_config.json: the fields peft reads (it fills the rest with its defaults). Targets are the HF modules'
    short names for a dense model, their full names where an MoE model's other linears could share a short name."""
    modules = [n.removesuffix(".weight") for target, module, conv in adapted(cfg, spec) for j, n in enumerate(conv.hf)
               if (target, j) not in spec.absent_parts and ".experts.local_experts." not in module]
    targets = sorted(modules) if cfg.moe else sorted({m.rsplit(".", 1)[1] for m in modules})
    routed = [f"experts.{p}" for t, p in EXPERT_PARAMETERS.items() if t in spec.target_modules
              and any(".experts.local_experts." in m for _, m, _ in adapted(cfg, spec))]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": targets,
            "target_parameters": routed or None, "use_dora": spec.use_dora,
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
    workers = kwargs.pop("workers", 1)
    if (adapter or is_run) and workers != 1:
        raise BridgeError(f"--workers {workers} exports a plain checkpoint; a LoRA run exports in one process")
    if adapter:
        if kwargs.get("hf_config") is not None:
            raise BridgeError("--adapter exports a bridge LoRA run; --hf-config is for Megatron-LM checkpoints")
        return export_adapter(checkpoint, out, iteration=kwargs.get("iteration"), overwrite=kwargs.get("overwrite", False))
    if is_run:
        kwargs.pop("hf_config", None)
        return export_merged(checkpoint, out, **kwargs)
    return export_hf(checkpoint, out, workers=workers, **kwargs)


# ---- bridge import --adapter: a PEFT folder -> a LoRA run on a bridge base checkpoint ---------------------------------
#: peft options whose adapters bridge's LoRA does not compute; a folder using one is refused rather than changed.
_UNSUPPORTED = {"use_rslora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                "target_parameters": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}


def read_peft_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise BridgeError(f"{folder} is not an HF PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise BridgeError(f"{folder} holds a {config.get('peft_type')} adapter; bridge imports LoRA and DoRA adapters")
    odd = [f"{k}={config[k]!r}" for k, plain in _UNSUPPORTED.items() if config.get(k, plain) not in (plain, None, {}, [])]
    if odd:
        raise BridgeError(f"{folder} uses peft options bridge's LoRA does not compute: {', '.join(odd)}")
    return config


Part = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"] | None
"""One HF linear's (A, B, DoRA magnitude or None), None where peft did not adapt it."""


def from_peft(cfg: ModelConfig, state: dict[str, torch.Tensor], folder: Path, rank: int,
              dora: bool) -> tuple[dict[str, torch.Tensor], list[str], bool, tuple[tuple[str, int], ...]]:
    """peft's state dict -> (global Megatron adapter tensors, the targets adapted, canonical, absent parts). Every
    peft tensor is used once and must fit the base's shapes. A fused linear peft adapted only in part (its default
    q_proj and v_proj) is canonical with zero factors for the absent parts, which then stay zero in training."""
    by_name = {c.megatron: c for c in conversions(cfg)}
    left = dict(state)
    chosen = [(name, by_name[key]) for layer in range(cfg.num_layers) for name, t in TARGETS.items()
              if (key := f"decoder.layers.{layer}.{t.path}.weight") in by_name
              and any(f"{PEFT_PREFIX}{h.removesuffix('.weight')}.lora_A.weight" in state for h in by_name[key].hf)]
    parts = {conv.megatron: [_peft_part(left, h, conv, cfg, folder, rank) for h in conv.hf] for _, conv in chosen}
    if left:
        raise BridgeError(f"{folder}'s base model does not match the checkpoint: the base has no linear for "
                          f"{sorted(left)[:6]}")
    targets = _whole_targets(cfg, chosen, folder)
    absent = _absent_parts(chosen, parts, folder)
    if absent and dora:
        raise BridgeError(f"{folder} is a DoRA adapter on some of the linears fused into {absent[0][0]}: their "
                          "magnitudes would train the others too; adapt all of them or none")
    canonical = bool(absent) or any(len(p) > 1 and not all(torch.equal(p[0][0], q[0]) for q in p[1:])
                                    for p in parts.values())
    out: dict[str, torch.Tensor] = {}
    for _, conv in chosen:
        out.update(_fused(conv, parts[conv.megatron], cfg, rank, canonical))
    return out, targets, canonical, absent


def _fused(conv: Conversion, ps: list[Part], cfg: ModelConfig, rank: int, canonical: bool) -> dict[str, torch.Tensor]:
    """One Megatron linear's adapter from its HF parts: a shared A, or (canonical) the parts' As stacked and B
    block-sparse, part j's rows in columns [j r, (j+1) r); an absent part's factors are zero."""
    module, present = conv.megatron.removesuffix(".weight"), next(p for p in ps if p is not None)
    rows = [shape[0] for shape in expected_hf_shapes(conv, cfg)]
    n = len(ps) if canonical else 1
    a = torch.zeros(n * rank, present[0].shape[1])
    blocks = [torch.zeros(r, n * rank) for r in rows]
    for j, part in enumerate(ps):
        if part is not None:
            cols = slice(j * rank, (j + 1) * rank) if canonical else slice(0, rank)
            a[cols], blocks[j][:, cols] = part[0], part[1]
    out = {f"{module}.adapter.linear_in.weight": a, f"{module}.adapter.linear_out.weight": conv.to_megatron(blocks, cfg)}
    if present[2] is not None:
        out[f"{module}.adapter.magnitude"] = conv.to_megatron([p[2] for p in ps], cfg)
    return out


def _whole_targets(cfg: ModelConfig, chosen: list[tuple[str, Conversion]], folder: Path) -> list[str]:
    """The targets peft adapted, each in every layer that has it (bridge adapts a target in every layer)."""
    keys = [c.megatron for c in conversions(cfg)]
    targets = sorted({name for name, _ in chosen}, key=list(TARGETS).index)
    for name in targets:
        every = sum(1 for layer in range(cfg.num_layers) if f"decoder.layers.{layer}.{TARGETS[name].path}.weight" in keys)
        if every != sum(1 for n, _ in chosen if n == name):
            raise BridgeError(f"{folder} adapts {name} in some layers only; bridge adapts a target in every layer")
    return targets


def _absent_parts(chosen: list[tuple[str, Conversion]], parts: dict[str, list[Part]],
                  folder: Path) -> tuple[tuple[str, int], ...]:
    """(target, part index) of every fused part peft left out, the same in every layer."""
    found: dict[str, set[tuple[int, ...]]] = {}
    for name, conv in chosen:
        found.setdefault(name, set()).add(tuple(j for j, p in enumerate(parts[conv.megatron]) if p is None))
    uneven = [name for name, sets in found.items() if len(sets) > 1]
    if uneven:
        raise BridgeError(f"{folder} adapts different parts of {uneven[0]} in different layers; bridge adapts the "
                          "same ones in every layer")
    return tuple((name, j) for name, sets in found.items() for j in next(iter(sets)))


def _peft_part(left: dict[str, torch.Tensor], hf_weight: str, conv: Conversion, cfg: ModelConfig,
               folder: Path, rank: int) -> Part:
    """(A, B, magnitude or None) of one HF linear, taken out of `left` and checked against the base's shape and the
    rank; None where peft did not adapt it."""
    module = hf_weight.removesuffix(".weight")
    names = [f"{PEFT_PREFIX}{module}.{s}" for s in PEFT_NAMES.values()]
    if names[0] not in left and names[1] not in left:
        return None
    if names[0] not in left or names[1] not in left:
        raise BridgeError(f"{folder} holds only one of lora_A and lora_B for {module}")
    a, b, m = left.pop(names[0]).float(), left.pop(names[1]).float(), left.pop(names[2], None)
    rows, cols = dict(zip(conv.hf, expected_hf_shapes(conv, cfg)))[hf_weight]
    if a.shape[1] != cols or b.shape[0] != rows:
        raise BridgeError(f"{folder}'s base model does not match the checkpoint: {module} has A {tuple(a.shape)} and "
                          f"B {tuple(b.shape)}, the checkpoint's {hf_weight} is {rows} x {cols}")
    if a.shape[0] != rank or b.shape[1] != rank:
        raise BridgeError(f"{folder}'s {module} is of rank {a.shape[0]}, not r={rank} as its {ADAPTER_CONFIG} says "
                          "(rank_pattern is not supported)")
    return a, b, None if m is None else m.float()


def import_adapter(folder: str | Path, base: str | Path, out: str | Path, layout: ParallelLayout | None = None, *,
                   overwrite: bool = False) -> Path:
    """An HF PEFT folder -> a LoRA run on `base` (iteration 0, no optimizer state) that `bridge train --load OUT`
    continues and `bridge export OUT --adapter` writes back."""
    folder, base = Path(folder), Path(base)
    config = read_peft_config(folder)
    ckpt = open_checkpoint(base)
    cfg, layout = ckpt.meta.config, layout or ckpt.meta.layout
    layout.validate(cfg)
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    rank, dora = int(config["r"]), bool(config.get("use_dora", False))
    tensors, targets, canonical, absent = from_peft(cfg, state, folder, rank, dora)
    if not targets:
        raise BridgeError(f"{folder}'s base model does not match the checkpoint: none of its modules is a linear bridge adapts")
    spec = LoRASpec(rank=rank, alpha=float(config.get("lora_alpha", rank)), dropout=float(config.get("lora_dropout", 0.0)),
                    target_modules=tuple(targets), use_dora=dora, canonical=canonical, absent_parts=absent)
    meta = CheckpointMeta(config=cfg, layout=layout, transformer_impl=ckpt.meta.transformer_impl, dtype="fp32",
                          source={"adapter": str(folder.resolve()), "trained_from": str(base.resolve())})
    with atomic_output_dir(Path(out), overwrite, sources=(folder, base), needed=hf_meta_bytes(ckpt.hf_meta)) as tmp:
        _write_adapter(tmp, meta, spec, tensors)
        copy_hf_meta(ckpt.hf_meta, tmp / HF_META_DIR)
        meta.save(tmp)
        write_lora(tmp, spec, base)
    log.info("wrote %s: %s adapter of rank %d on %s", out, "DoRA" if spec.use_dora else "LoRA", rank, base)
    return Path(out)


def _write_adapter(root: Path, meta: CheckpointMeta, spec: LoRASpec, tensors: dict[str, torch.Tensor]) -> None:
    """Iteration 0's rank files: each rank's shard of every adapter tensor, under its stage-local name."""
    cfg, layout = meta.config, meta.layout
    writer = LegacyCheckpointWriter(root, layout, lambda tp_rank=0, pp_rank=0: checkpoint_args(meta), iteration=0)
    for key, tensor in tensors.items():
        match = _LAYER.match(key)
        place = layout.place(int(match.group(1)), cfg.num_layers)
        shards = split(tensor.contiguous(), rule_for(key), layout.tp, 0)
        name = f"decoder.layers.{place.local_index}.{match.group(2)}.adapter.{match.group(3)}"
        for tp_rank, shard in enumerate(shards):
            for ep_rank in range(layout.ep):
                writer.add(tp_rank, place.pp_rank, place.chunk, name, shard.contiguous(), ep_rank)
    writer.close()
