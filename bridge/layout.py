"""`ParallelLayout`: the TP/PP/VPP/EP degrees of a checkpoint, validated once, owning all rank arithmetic."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from bridge.config import ModelConfig
from bridge.errors import BridgeError


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one global layer lives: pipeline stage, virtual chunk on that stage, index inside the chunk."""

    pp_rank: int
    chunk: int
    local_index: int


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """Model-parallel degrees. `vpp` is the number of virtual pipeline chunks per stage (None = no VPP).

    `ep` splits the experts of every MoE layer into contiguous groups (global expert e lives on EP rank
    e // (E/EP) as local expert e % (E/EP)); `etp` (default: `tp`) splits each expert's FFN. The legacy
    format names files by the dense TP rank, so `etp` must divide `tp`: the file of TP rank t holds the
    expert shard t % etp. `moe_grouped_gemm` selects TEGroupedMLP names (`weight{j}`) over SequentialMLP's.
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    make_vocab_size_divisible_by: int = 128
    ep: int = 1
    etp: int | None = None
    moe_grouped_gemm: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise BridgeError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.etp is not None and (self.etp < 1 or self.tp % self.etp):
            raise BridgeError(f"--etp {self.etp} must divide --tp {self.tp}: Megatron's legacy files are named by the "
                              "dense TP rank, so each holds expert shard tp_rank % etp")
        if self.make_vocab_size_divisible_by < 1:
            raise BridgeError(f"--make-vocab-size-divisible-by must be >= 1, got {self.make_vocab_size_divisible_by}")
        if self.vpp is not None and self.vpp < 1:
            raise BridgeError(f"--vpp must be >= 1, got {self.vpp}")
        if self.vpp is not None and self.vpp > 1 and self.pp < 2:
            raise BridgeError("--vpp needs --pp 2 or more (virtual chunks interleave pipeline stages)")

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def name(self) -> str:
        suffix = f"-vpp{self.vpp}" if self.vpp else ""
        if self.ep > 1:
            suffix += f"-ep{self.ep}"
        if self.etp is not None and self.etp != self.tp:
            suffix += f"-etp{self.etp}"
        return f"tp{self.tp}-pp{self.pp}{suffix}"

    def to_json(self) -> dict[str, int | bool | None]:
        data: dict[str, int | bool | None] = {"tp": self.tp, "pp": self.pp, "vpp": self.vpp,
                                              "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by}
        if self.ep > 1 or self.etp is not None or self.moe_grouped_gemm:  # dense layouts keep their old JSON
            data.update(ep=self.ep, etp=self.etp, moe_grouped_gemm=self.moe_grouped_gemm)
        return data

    def validate(self, cfg: ModelConfig) -> None:
        """Raise BridgeError naming the first hyper-parameter this layout cannot split evenly."""
        checks = (
            ("num_attention_heads", cfg.num_attention_heads, self.tp, "--tp"),
            ("num_key_value_heads (query groups)", cfg.num_query_groups, self.tp, "--tp"),
            ("intermediate_size (FFN)", cfg.ffn_hidden_size, self.tp, "--tp"),
            ("num_hidden_layers", cfg.num_layers, self.pp * self.chunks, "--pp x --vpp"),
        )
        checks += self._expert_checks(cfg)
        for what, value, divisor, flag in checks:
            if value % divisor:
                raise BridgeError(f"{what} = {value} is not divisible by {flag} = {divisor}; choose a divisor of {value}")

    def _expert_checks(self, cfg: ModelConfig) -> tuple[tuple[str, int, int, str], ...]:
        if cfg.moe is None:
            if self.ep > 1 or self.etp is not None or self.moe_grouped_gemm:
                raise BridgeError(f"--ep/--etp/--moe-grouped-gemm need a Mixture-of-Experts model; {cfg.architecture} is dense")
            return ()
        moe, checks = cfg.moe, [("num_experts", cfg.moe.num_experts, self.ep, "--ep"),
                                ("moe_intermediate_size (expert FFN)", cfg.moe.moe_ffn_hidden_size, self.expert_tp, "--etp")]
        if moe.shared_expert_ffn_hidden_size:
            checks.append(("shared expert FFN", moe.shared_expert_ffn_hidden_size, self.tp, "--tp"))
        return tuple(checks)

    def expert_place(self, expert: int, num_experts: int) -> tuple[int, int]:
        """Global expert -> (EP rank, local index): contiguous groups of E/EP experts per EP rank."""
        return divmod(expert, num_experts // self.ep)

    def global_expert(self, ep_rank: int, local: int, num_experts: int) -> int:
        return ep_rank * (num_experts // self.ep) + local

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Megatron's padding: a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * self.tp
        return math.ceil(vocab_size / multiple) * multiple

    def layers_per_chunk(self, num_layers: int) -> int:
        return num_layers // (self.pp * self.chunks)

    def place(self, layer: int, num_layers: int) -> Placement:
        """Global layer -> stage/chunk/local index. Chunk v of stage p starts at v*L/VP + p*L/(PP*VP)."""
        per_chunk = self.layers_per_chunk(num_layers)
        block, local = divmod(layer, per_chunk)
        chunk, pp_rank = divmod(block, self.pp)
        return Placement(pp_rank=pp_rank, chunk=chunk, local_index=local)

    def global_layer(self, pp_rank: int, chunk: int, local_index: int, num_layers: int) -> int:
        per_chunk = self.layers_per_chunk(num_layers)
        return (chunk * self.pp + pp_rank) * per_chunk + local_index

    def chunk_layers(self, pp_rank: int, chunk: int, num_layers: int) -> range:
        """Global indices of the layers one virtual chunk of one stage holds."""
        start = self.global_layer(pp_rank, chunk, 0, num_layers)
        return range(start, start + self.layers_per_chunk(num_layers))

    def ranks(self) -> Iterator[tuple[int, int]]:
        """Every (tp_rank, pp_rank) pair, one checkpoint file each."""
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                yield tp_rank, pp_rank

    def files(self) -> Iterator[tuple[int, int, int]]:
        """Every (tp_rank, pp_rank, ep_rank) triple, one checkpoint file each."""
        for pp_rank in range(self.pp):
            for ep_rank in range(self.ep):
                for tp_rank in range(self.tp):
                    yield tp_rank, pp_rank, ep_rank

    def rank_dir(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
        """Megatron's folder name: `mp_rank_{tp:02d}`, plus `_{pp:03d}` when PP > 1, plus `_{ep:03d}` when EP > 1."""
        name = f"mp_rank_{tp_rank:02d}"
        if self.pp > 1:
            name += f"_{pp_rank:03d}"
        return f"{name}_{ep_rank:03d}" if self.ep > 1 else name
