"""`ParallelState`: one rank's place in a TP x CP x DP x PP grid, validated once, with its process groups.

Rank order (Megatron Core's default `tp-cp-ep-dp-pp`, EP carved out of DP x CP): TP is fastest, then CP,
then DP, then PP, i.e. `rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank`. So a TP group
is a block of consecutive ranks (one NVLink island on a node), a CP group (which exchanges K/V every
layer) comes next, and the stages of one pipeline are `tp * cp * dp` apart. Context parallelism does
not change the checkpoint layout (weights are replicated over CP), so `cp` is not part of ParallelLayout.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.layout import ParallelLayout
from bridge.parallel.ulysses import check_model_heads

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
#: How CP ranks exchange K/V in attention (Megatron-LM's --cp-comm-type), the default first: p2p passes K/V blocks
#: around a ring behind the attention kernels (bridge.parallel.ring), all_gather collects all of them up front
#: (bridge.parallel.context), a2a trades the sequence split for a head split around attention
#: (bridge.parallel.ulysses).
CP_COMM_TYPES = ("p2p", "all_gather", "a2a")


#: --cp-comm-type spellings on the command line -> CP_COMM_TYPES (Megatron-LM's help spells the all-gather "allgather").
CP_COMM_SPELLINGS = {"p2p": "p2p", "all_gather": "all_gather", "allgather": "all_gather", "a2a": "a2a"}


def cp_comm_type_from_flag(given: list[str]) -> str:
    """The one exchange a --cp-comm-type list asks for, or a one-line error. Megatron-LM takes one value per layer;
    bridge runs one exchange for all layers, so the values must agree (`bridge train` and `bridge verify` alike)."""
    other = next((c for c in given if c not in CP_COMM_SPELLINGS), None)
    if other is not None:
        raise BridgeError(f"--cp-comm-type {other} is not available: bridge's context parallelism passes K/V around a "
                          f"ring (p2p), all-gathers them (all_gather) or splits the heads by all-to-all (a2a)")
    kinds = sorted({CP_COMM_SPELLINGS[c] for c in given})
    if len(kinds) > 1:
        raise BridgeError(f"--cp-comm-type mixes {' and '.join(kinds)} over layers; bridge runs one exchange for all "
                          f"layers: pass one value")
    return kinds[0]


def check_cp_comm_type(cp_comm_type: str) -> None:
    """One-line error for an exchange bridge does not have."""
    if cp_comm_type not in CP_COMM_TYPES:
        raise BridgeError(f"--cp-comm-type {cp_comm_type} is not one of {', '.join(CP_COMM_TYPES)}")


def check_context_parallel(cp: int, cp_comm_type: str, model: ModelConfig, tp: int) -> None:
    """One-line errors for what `bridge train` and `bridge verify` both refuse: a CP degree below 1, an exchange
    bridge does not have, a2a where the heads of a TP rank do not split evenly over CP, and LongRoPE, whose table
    depends on the longest position of the whole sequence, which no CP rank sees; and attention softcaps (Gemma 2) and
    sinks (GPT-OSS), which the CP exchanges' kernels do not apply."""
    if cp < 1:
        raise BridgeError(f"--cp must be >= 1, got {cp}")
    check_cp_comm_type(cp_comm_type)
    if cp > 1 and model.long_rope is not None:
        raise BridgeError(f"{model.architecture} with LongRoPE does not run under context parallelism: its frequencies "
                          "follow the whole sequence's length; use --cp 1")
    if cp > 1 and model.attention_softcaps:
        raise BridgeError(f"{model.architecture} soft-caps its attention scores, which context parallelism does not "
                          "do: use --cp 1")
    if cp > 1 and model.attention_sinks:
        raise BridgeError(f"{model.architecture} adds attention sinks to its softmax, which context parallelism does "
                          "not do: use --cp 1")
    if cp > 1 and cp_comm_type == "a2a":
        check_model_heads(model, tp, cp)


class ParallelState:
    """Coordinates and process groups of one rank.

    Groups are created only when `torch.distributed` is initialised and `create_groups` is true;
    otherwise they are None and the object still answers every coordinate question (handy for
    building one rank's model shapes in a single process, e.g. to check state-dict keys).
    Every rank must construct its ParallelState in the same order, since `new_group` is collective.
    """

    def __init__(self, layout: ParallelLayout, world_size: int, rank: int, *, cp: int = 1,
                 cp_comm_type: str = CP_COMM_TYPES[0], create_groups: bool = True) -> None:
        if cp < 1:
            raise BridgeError(f"--cp must be >= 1, got {cp}")
        check_cp_comm_type(cp_comm_type)
        model_parallel = layout.tp * layout.pp * cp
        if world_size < 1 or world_size % model_parallel:
            what = "tp*pp" if cp == 1 else "tp*cp*pp"
            raise BridgeError(f"world size {world_size} is not a multiple of {what} = {model_parallel}; "
                              f"start a multiple of {model_parallel} processes")
        if not 0 <= rank < world_size:
            raise BridgeError(f"rank {rank} is outside the world of {world_size} processes")
        self.layout, self.world_size, self.rank = layout, world_size, rank
        self.tp, self.pp, self.cp, self.dp = layout.tp, layout.pp, cp, world_size // model_parallel
        self.tp_rank, self.dp_rank, self.pp_rank = self.coords(rank)
        self.cp_rank = rank // self.tp % cp
        self.ep = layout.ep
        if self.ep > 1 and (self.dp_cp % self.ep or layout.expert_tp != layout.tp):
            raise BridgeError(f"expert parallelism {self.ep} must divide dp x cp = {self.dp_cp} (Megatron's rule: "
                              f"ep x etp divides tp x cp x dp, with etp = tp; etp {layout.expert_tp}); start tp*pp*ep "
                              f"processes or more")
        self.ep_rank = self.dp_cp_rank % self.ep
        self.ep_group: dist.ProcessGroup | None = None
        """Ranks sharing tp/pp rank and dp_cp_rank // ep: they split the experts (tokens travel by all-to-all). As in
        Megatron-LM, EP is carved out of DP x CP: experts see tokens, not sequences, so CP ranks can split them too."""
        self.expert_dp_group: dist.ProcessGroup | None = None
        """Ranks holding the same experts (same ep_rank) within DP x CP: expert gradients are summed over this group."""
        self.tp_group: dist.ProcessGroup | None = None
        self.cp_group: dist.ProcessGroup | None = None
        """Ranks holding the other chunks of the same sequences: they exchange K/V in attention."""
        self.cp_comm_type = cp_comm_type
        self.dp_cp_group: dist.ProcessGroup | None = None
        """DP x CP: ranks with the same weights; gradients (each a partial sum over tokens) are summed here."""
        self.pp_group: dist.ProcessGroup | None = None
        self.dp_group: dist.ProcessGroup | None = None
        self.embedding_group: dist.ProcessGroup | None = None
        if create_groups and dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != world_size:
                raise BridgeError(f"torch.distributed has {dist.get_world_size()} ranks but the layout was given "
                                  f"world size {world_size}; pass the launched world size")
            self._create_groups()

    # ---- rank arithmetic -------------------------------------------------------------------
    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int, cp_rank: int | None = None) -> int:
        """(tp, dp, pp[, cp]) -> global rank; cp defaults to this rank's own CP rank."""
        cp_rank = self.cp_rank if cp_rank is None else cp_rank
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """Global rank -> (tp_rank, dp_rank, pp_rank) (the CP rank is `rank // tp % cp`)."""
        block, tp_rank = divmod(rank, self.tp)
        pp_rank, dp_rank = divmod(block // self.cp, self.dp)
        return tp_rank, dp_rank, pp_rank

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    @property
    def dp_cp_rank(self) -> int:
        """This rank's index in its DP x CP group (group ranks are ordered (dp, cp))."""
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def tp_ranks(self) -> list[int]:
        return [self.rank_of(t, self.dp_rank, self.pp_rank) for t in range(self.tp)]

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, in stage order."""
        return [self.rank_of(self.tp_rank, self.dp_rank, p) for p in range(self.pp)]

    @property
    def dp_ranks(self) -> list[int]:
        return [self.rank_of(self.tp_rank, d, self.pp_rank) for d in range(self.dp)]

    @property
    def embedding_ranks(self) -> list[int]:
        """First and last stage of this pipeline: they share the tied word embeddings."""
        ranks = self.pp_ranks
        return sorted({ranks[0], ranks[-1]})

    @property
    def expert_dp(self) -> int:
        """Size of the expert-data-parallel group: dp*cp*tp/(ep*etp) in Megatron's terms, dp*cp/ep here (etp = tp)."""
        return self.dp_cp // self.ep

    @property
    def expert_dp_rank(self) -> int:
        return self.dp_cp_rank // self.ep

    def dp_cp_member(self, index: int, tp_rank: int | None = None, pp_rank: int | None = None) -> int:
        """Global rank of DP x CP index `index` (ordered (dp, cp), CP fastest) at the given (default: this rank's) tp
        and pp coordinates."""
        dp_rank, cp_rank = divmod(index, self.cp)
        return self.rank_of(self.tp_rank if tp_rank is None else tp_rank, dp_rank,
                            self.pp_rank if pp_rank is None else pp_rank, cp_rank)

    def ep_peer(self, ep_rank: int) -> int:
        """Global rank of the member of this rank's EP group that holds EP rank `ep_rank`'s experts."""
        return self.dp_cp_member(self.expert_dp_rank * self.ep + ep_rank)

    @property
    def writes_checkpoint(self) -> bool:
        """The first replica of every distinct shard writes its file: DP x CP rank 0 (CP ranks hold the same weights),
        or with EP each EP rank's first copy (which may be a CP rank > 0: EP spans DP x CP)."""
        return self.expert_dp_rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def pre_process(self, chunk: int) -> bool:
        """Whether virtual chunk `chunk` of this stage holds the embedding (the model's first layers)."""
        return self.is_first_stage and chunk == 0

    def post_process(self, chunk: int) -> bool:
        """Whether virtual chunk `chunk` of this stage holds the final norm and output layer."""
        return self.is_last_stage and chunk == self.layout.chunks - 1

    @property
    def next_rank(self) -> int:
        """Where activations go: the next stage (the last stage wraps to stage 0's next virtual chunk)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp]

    @property
    def prev_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank - 1) % self.pp]

    # ---- groups ------------------------------------------------------------------------------
    def _new_group(self, ranks: list[int]) -> dist.ProcessGroup | None:
        """Collective on every rank; returns the group when this rank is in it."""
        group = dist.new_group(ranks)
        return group if self.rank in ranks else None

    def _create_groups(self) -> None:
        """Every rank walks every group in the same order (new_group is collective) and keeps its own."""
        tp, cp, dp, pp, at = range(self.tp), range(self.cp), range(self.dp), range(self.pp), self.rank_of
        for p in pp:
            for d in dp:
                for c in cp:
                    self.tp_group = self._new_group([at(t, d, p, c) for t in tp]) or self.tp_group
        for p in pp:
            for t in tp:
                for c in cp:
                    self.dp_group = self._new_group([at(t, d, p, c) for d in dp]) or self.dp_group
        self.dp_cp_group = self.dp_group
        if self.cp > 1:  # at CP=1 the CP group is None (collectives: identity) and DP x CP is DP
            for p in pp:
                for d in dp:
                    for t in tp:
                        self.cp_group = self._new_group([at(t, d, p, c) for c in cp]) or self.cp_group
            for p in pp:
                for t in tp:
                    ranks = sorted(at(t, d, p, c) for d in dp for c in cp)
                    self.dp_cp_group = self._new_group(ranks) or self.dp_cp_group
        for d in dp:
            for t in tp:
                for c in cp:
                    ranks = [at(t, d, p, c) for p in pp]
                    self.pp_group = self._new_group(ranks) or self.pp_group
                    self.embedding_group = self._new_group(sorted({ranks[0], ranks[-1]})) or self.embedding_group
        self._create_expert_groups()
        log.debug("rank %d: tp %d/%d dp %d/%d pp %d/%d", self.rank, self.tp_rank, self.tp,
                  self.dp_rank, self.dp, self.pp_rank, self.pp)

    def _create_expert_groups(self) -> None:
        """EP groups: consecutive runs of `ep` DP x CP ranks (CP fastest, as Megatron-LM orders them); expert-DP groups:
        DP x CP ranks with equal index % ep."""
        if self.ep == 1:
            self.expert_dp_group = self.dp_cp_group
            return
        for p in range(self.pp):
            for t in range(self.tp):
                for block in range(self.dp_cp // self.ep):
                    ranks = [self.dp_cp_member(block * self.ep + e, t, p) for e in range(self.ep)]
                    self.ep_group = self._new_group(ranks) or self.ep_group
                for e in range(self.ep):
                    ranks = sorted(self.dp_cp_member(i, t, p) for i in range(e, self.dp_cp, self.ep))
                    self.expert_dp_group = self._new_group(ranks) or self.expert_dp_group

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp}, "
                f"cp={self.cp_rank}/{self.cp}, dp={self.dp_rank}/{self.dp}, pp={self.pp_rank}/{self.pp}, "
                f"vpp={self.layout.vpp})")


def init_distributed(backend: str | None = None, *, timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL ranks are pinned to `cuda:LOCAL_RANK` first, so each process owns one GPU. Returns
    (rank, world_size). Without the variables it starts a one-rank world with a store of its own.
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in BACKENDS:
        raise BridgeError(f"backend {backend} is not one of {', '.join(BACKENDS)}")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    timeout = datetime.timedelta(seconds=timeout_s)
    store = None
    if "RANK" not in os.environ:  # a world of one: its own store on a port the OS binds (no port to race for)
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise BridgeError("backend nccl needs CUDA GPUs; use --device cpu (gloo) on this machine")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, store=store)
    return rank, world
