"""LoRA and DoRA adapters on the Megatron-named parallel linears, split over TP the way Megatron-Bridge splits them.

An adapter is a submodule `adapter` of the linear it adapts, so the base weights keep their Megatron names
(`...linear_qkv.weight`) and the adapter's are `...linear_qkv.adapter.linear_in.weight` (A, [r, in]),
`...adapter.linear_out.weight` (B, [out, r]) and, for DoRA, `...adapter.magnitude` ([out]). The linear computes
    y = base(x) + scaling * B A dropout(x)                                  (LoRA, scaling = alpha / r)
    y = base(x) + (g - 1) * (base(x) - bias) + g * scaling * B A dropout(x),  g = m / ||W + scaling B A||_row  (DoRA)
where x is what the base's matrix multiplies (after the fused RMSNorm of a TE LayerNormColumnParallelLinear) and
the row norm is taken without gradient, as peft and the DoRA paper do.

Tensor parallelism (Megatron-Bridge's ParallelLinearAdapter; docs/lora.md states the layout):
- column-parallel base (W [out/tp, in]): A is split over the rank r, its output all-gathered to [.., r]; B is
  split over `out` like W (fc1's [gate_r; up_r] included), so B_r's rows line up with W_r's;
- row-parallel base (W [out, in/tp]): A is split over `in` like W, its output summed over TP; B is split over
  `out` and its output all-gathered, then (sequence parallel) scattered along the sequence like the base's.
The DoRA magnitude is split over `out` like B in both cases. bridge.params declares these splits with every other
parameter kind; conversion reads the same declaration.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bridge import transforms
from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.parallel import collectives as C
from bridge.sharding import rule_for
from bridge.sharding import split as tp_split


@dataclass(frozen=True)
class Target:
    """One adaptable linear: where it is in a layer, how TP splits its base, and the HF linears fused into it."""

    path: str
    kind: str
    """column | row: the base's TP split."""
    fuse: Callable[..., torch.Tensor] | None = None
    """How the HF parts' rows are fused (q, k, v -> linear_qkv; gate, up -> linear_fc1); None: one HF linear."""
    parts: int = 1
    expert_path: str | None = None
    """The same linear in each routed expert (SequentialMLP's names, `{}` the expert), which Megatron-Bridge's target
    name matches too."""


#: Megatron-Bridge's target names.
TARGETS: dict[str, Target] = {
    "linear_qkv": Target("self_attention.linear_qkv", "column", transforms.fuse_qkv, 3),
    "linear_proj": Target("self_attention.linear_proj", "row"),
    "linear_fc1": Target("mlp.linear_fc1", "column", transforms.fuse_gate_up, 2, "mlp.experts.local_experts.{}.linear_fc1"),
    "linear_fc2": Target("mlp.linear_fc2", "row", expert_path="mlp.experts.local_experts.{}.linear_fc2"),
}
ADAPTER_TAILS = ("adapter.linear_in.weight", "adapter.linear_out.weight", "adapter.magnitude")


@dataclass(frozen=True, kw_only=True)
class LoRASpec:
    """What is adapted and how (Megatron-Bridge's LoRA fields: dim = rank, alpha, dropout, target_modules)."""

    rank: int
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = tuple(TARGETS)
    use_dora: bool = False
    canonical: bool = False
    """Megatron-Bridge's CanonicalLoRA: each HF linear fused into linear_qkv / linear_fc1 keeps an A of its own (the
    form of an adapter trained with peft on q/k/v and gate/up, `bridge import --adapter`); fused, they share one."""
    absent_parts: tuple[tuple[str, int], ...] = ()
    """(target, part) of the HF linears a canonical adapter leaves out (peft's default q_proj, v_proj: k_proj is part 1
    of linear_qkv): their factors are zero, stay zero in training, and are not exported."""
    seed: int = 1234
    """Seeds A's initialisation per (layer, target), the same global tensor at every layout."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": list(self.target_modules),
                "absent_parts": [list(p) for p in self.absent_parts]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LoRASpec":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "target_modules": tuple(fields.get("target_modules", TARGETS)),
                      "absent_parts": tuple((t, int(j)) for t, j in fields.get("absent_parts", ()))})


def check_spec(spec: LoRASpec) -> None:
    """One line per bad setting, before any process starts."""
    if spec.rank < 1:
        raise BridgeError(f"--lora-rank must be >= 1, got {spec.rank}")
    if not 0.0 <= spec.dropout < 1.0:
        raise BridgeError(f"--lora-dropout must be in [0, 1), got {spec.dropout}")
    unknown = [t for t in spec.target_modules if t not in TARGETS]
    if unknown or not spec.target_modules:
        raise BridgeError(f"--lora-target-modules {' '.join(unknown) or '(none)'} matches no adaptable linear; "
                          f"choose from {' '.join(TARGETS)}")


class LoRAAdapter(nn.Module):
    """This TP rank's share of one adapter; `forward(x, base_out)` adds it to the base linear's output."""

    def __init__(self, base: nn.Module, kind: str, spec: LoRASpec, *, global_in: int, global_out: int, tp: int,
                 mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind, self.spec, self.group, self.tp = kind, spec, base.group, tp
        self.sequence_parallel = base.sequence_parallel
        r, dtype, device = spec.rank * (1 if mask is None else mask.shape[1] // spec.rank), torch.float32, base.weight.device
        # canonical parts: B is block-sparse (part j's rows use only A_j's columns); the mask keeps it so
        self.register_buffer("mask", None if mask is None else mask.to(device), persistent=False)
        if kind == "column" and r % tp:
            raise BridgeError(f"--lora-rank {spec.rank} (x {r // spec.rank} parts) must be divisible by --tp {tp}: a "
                              "column-parallel base splits A over the rank")
        in_shape = (r // tp, global_in) if kind == "column" else (r, global_in // tp)
        self.linear_in = nn.Linear(in_shape[1], in_shape[0], bias=False, dtype=dtype, device=device)
        self.linear_out = nn.Linear(r, global_out // tp, bias=False, dtype=dtype, device=device)
        nn.init.zeros_(self.linear_out.weight)
        self.magnitude = nn.Parameter(torch.ones(global_out // tp, dtype=dtype, device=device)) if spec.use_dora else None
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()

    def lora(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * B A x for this rank: [s(/tp), b, in(/tp)] -> the base output's shape before any TP reduction
        (column: [s, b, out/tp]; row: [s(/tp), b, out], already gathered and scattered like the base's)."""
        g, a, b = self.group, self.linear_in.weight, self.b()
        if self.kind == "column":
            x = C.gather_from_sp(x, g) if self.sequence_parallel else C.copy_to_tp(x, g)  # [s, b, in]
            u = C.copy_to_tp(C.gather_from_tp(F.linear(self.dropout(x), a), g), g)  # [s, b, r]
            return F.linear(u, b) * self.spec.scaling  # [s, b, out/tp]
        u = C.copy_to_tp(C.reduce_from_tp(F.linear(self.dropout(x), a), g), g)  # [s, b, r]
        y = C.gather_from_tp(F.linear(u, b), g) * self.spec.scaling  # [s, b, out]
        return C.scatter_to_sp(y, g) if self.sequence_parallel else y

    def b(self) -> torch.Tensor:
        """B as it acts: masked to its parts' blocks for a canonical adapter."""
        w = self.linear_out.weight
        return w if self.mask is None else w * self.mask.to(w.dtype)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, bias: torch.Tensor | None,
                weight: torch.Tensor) -> torch.Tensor:
        delta = self.lora(x)
        if self.magnitude is None:
            return base_out + delta.to(base_out.dtype)
        scale = self._magnitude_scale(weight)  # [out(/tp)] as the output's last dimension
        plain = base_out if bias is None else base_out - bias
        return (base_out + (scale - 1) * plain + scale * delta).to(base_out.dtype)

    def _magnitude_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + scaling B A|| per output row, the norm without gradient (peft's DoRA), laid out like the output."""
        with torch.no_grad():
            norm = self._row_norms(weight)  # [out/tp]: this rank's rows
        scale = self.magnitude / norm
        if self.kind == "column":
            return scale
        # row base: the output holds every row; under SP each rank's gradient covers its sequence shard: summed
        return C.gather_from_sp(scale, self.group, tensor_parallel_output_grad=self.sequence_parallel)

    def _row_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + scaling B A||_2 over each output row this rank's magnitude covers."""
        a, b, s, g = self.linear_in.weight.float(), self.b().float(), self.spec.scaling, self.group
        if self.kind == "column":  # W_r [out/tp, in], B_r [out/tp, r], A split over r
            full_a = C.all_gather(a, g, 0) if self.tp > 1 else a
            return (weight.float() + s * b @ full_a).norm(dim=1)
        full_b = C.all_gather(b, g, 0) if self.tp > 1 else b  # row base: W [out, in/tp], A [r, in/tp]
        squares = (weight.float() + s * full_b @ a).pow(2).sum(dim=1)  # [out], partial over the input shards
        return C.split(C.all_reduce(squares, g).sqrt(), g, 0)  # this rank's rows of the full norms


class ExpertAdapter(nn.Module):
    """One routed expert's LoRA (A [r, in], B [out, r]); the experts' batched GEMMs apply it (bridge.nn.moe). Expert
    weights are not split over TP here, and are reduced over expert-DP like the expert itself."""

    def __init__(self, base: nn.Module, spec: LoRASpec) -> None:
        super().__init__()
        out, inp = base.weight.shape
        self.scaling = spec.scaling
        self.linear_in = nn.Linear(inp, spec.rank, bias=False, dtype=torch.float32, device=base.weight.device)
        self.linear_out = nn.Linear(spec.rank, out, bias=False, dtype=torch.float32, device=base.weight.device)
        nn.init.zeros_(self.linear_out.weight)
        for p in self.parameters():
            p.allreduce = False  # Megatron's mark: reduced over the expert-data-parallel group


def adapted_modules(chunk: nn.Module, spec: LoRASpec) -> Iterator[tuple[str, str, str, nn.Module]]:
    """(seed key, target name, chunk-local module path, module) of every linear `spec` adapts in a chunk; the seed key
    names the global layer (and expert), so every layout draws the same initial A."""
    for local, layer in enumerate(chunk.decoder.layers):
        for target in spec.target_modules:
            path = TARGETS[target].path
            module = _submodule(layer, path)
            if module is not None and getattr(module, "weight", None) is not None:
                yield f"{chunk.layer_numbers[local]}", target, f"decoder.layers.{local}.{path}", module
            for j, expert in _local_experts(layer, TARGETS[target]):
                e = chunk.ps.layout.global_expert(chunk.ps.ep_rank, j, chunk.cfg.num_experts)
                path = TARGETS[target].expert_path.format(j)
                yield f"{chunk.layer_numbers[local]}.{e}", target, f"decoder.layers.{local}.{path}", expert


def _local_experts(layer: nn.Module, target: Target) -> list[tuple[int, nn.Module]]:
    """(local index, linear) of the target's linear in this layer's routed experts (SequentialMLP's), if any."""
    experts = _submodule(layer, "mlp.experts.local_experts") if target.expert_path else None
    return [] if experts is None else [(j, _submodule(layer, target.expert_path.format(j))) for j in range(len(experts))]


def _submodule(layer: nn.Module, path: str) -> nn.Module | None:
    """`layer`'s module at `path`, None where this layer has none (an MoE layer's mlp.linear_fc1, MLA's linear_qkv)."""
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def part_mask(target: Target, cfg: ModelConfig, rank: int) -> torch.Tensor | None:
    """The global [out, parts * rank] block mask of a canonical adapter's B: HF part j's rows (fused the way the
    base's are) take only columns [j * rank, (j + 1) * rank). None for a target of one HF linear."""
    if target.fuse is None:
        return None
    rows = {"linear_qkv": (cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels,
                           cfg.num_query_groups * cfg.kv_channels),
            "linear_fc1": (cfg.ffn_hidden_size, cfg.ffn_hidden_size)}[target.path.rsplit(".", 1)[1]]
    blocks = []
    for j, n in enumerate(rows):
        block = torch.zeros(n, target.parts * rank)
        block[:, j * rank:(j + 1) * rank] = 1.0
        blocks.append(block)
    return target.fuse(*blocks, cfg)


def _init_a(global_shape: tuple[int, int], seed: int, where: str, target: str) -> torch.Tensor:
    """A's global initial value (kaiming-uniform, a = sqrt(5): U(+-1/sqrt(in)), nn.Linear's and peft's default),
    drawn from its own seed (the run's, the layer's and expert's, the target's), so every layout starts alike."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{where}:{target}".encode()))
    bound = 1.0 / math.sqrt(global_shape[1])
    return (torch.rand(global_shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()


def apply_lora(chunks: Sequence[nn.Module], spec: LoRASpec) -> list[str]:
    """Freeze every base weight and add an adapter to each target linear; returns the adapted modules' chunk-local
    paths (bridge.training.lora_run checks beforehand that every target matches some linear of the model)."""
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
    found: dict[str, list[str]] = {t: [] for t in spec.target_modules}
    for chunk in chunks:
        tp, tp_rank = chunk.ps.tp, chunk.ps.tp_rank
        for where, target, path, module in adapted_modules(chunk, spec):
            if ".experts." in path:
                module.adapter = ExpertAdapter(module, spec)
                with torch.no_grad():
                    module.adapter.linear_in.weight.copy_(_init_a(tuple(module.adapter.linear_in.weight.shape),
                                                                  spec.seed, where, target))
                found[target].append(path)
                continue
            kind = TARGETS[target].kind
            out_local, in_local = module.weight.shape
            g_out, g_in = (out_local * tp, in_local) if kind == "column" else (out_local, in_local * tp)
            mask = part_mask(TARGETS[target], chunk.cfg, spec.rank) if spec.canonical else None
            if mask is not None:
                mask = tp_split(mask, rule_for(f"{path}.adapter.linear_out.weight"), tp, 0)[tp_rank]
            adapter = LoRAAdapter(module, kind, spec, global_in=g_in, global_out=g_out, tp=tp, mask=mask)
            a = _init_a((adapter.linear_in.weight.shape[0] * (tp if kind == "column" else 1), g_in),
                        spec.seed, where, target)
            with torch.no_grad():
                adapter.linear_in.weight.copy_(tp_split(a, rule_for(f"{path}.adapter.linear_in.weight"), tp, 0)[tp_rank])
            module.adapter = adapter
            if adapter.magnitude is not None:
                with torch.no_grad():
                    adapter.magnitude.copy_(adapter._row_norms(module.weight))  # DoRA starts as the base: m = ||W||
            found[target].append(path)
    return sorted(p for paths in found.values() for p in paths)


def adapter_state(chunk: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of a chunk by their state-dict names: what a LoRA checkpoint stores for the model."""
    return {k: v for k, v in chunk.state_dict().items() if k.endswith(ADAPTER_TAILS)}


def is_adapted(chunk: nn.Module) -> bool:
    return any(k.endswith(ADAPTER_TAILS) for k, _ in chunk.named_parameters())


def load_adapter_state(chunks: Sequence[nn.Module], shards: Sequence[dict[str, torch.Tensor]]) -> None:
    """Load each chunk's adapter tensors strictly (every adapter tensor present, nothing else)."""
    for v, (chunk, shard) in enumerate(zip(chunks, shards)):
        expected = set(adapter_state(chunk))
        missing, unexpected = sorted(expected - set(shard)), sorted(set(shard) - expected)
        if missing or unexpected:
            raise BridgeError(f"the LoRA checkpoint's chunk {v} does not match this run's adapters: missing "
                              f"{missing[:6]}, unexpected {unexpected[:6]}; resume with the run's own --lora-* flags")
        params = dict(chunk.named_parameters())
        with torch.no_grad():
            for name, tensor in shard.items():
                params[name].copy_(tensor)


def checkpoint_state(chunk: nn.Module) -> dict[str, torch.Tensor]:
    """What a training checkpoint stores of a chunk: the adapters alone when it has any (the base is referenced, not
    copied), else the whole state dict and the entries carried unchanged from the loaded file (MTP layers)."""
    if is_adapted(chunk):
        return adapter_state(chunk)
    return {**chunk.state_dict(), **getattr(chunk, "carried", {})}
