"""ParallelState rank arithmetic and validation (no processes), and its groups in a spawned gloo world."""
from __future__ import annotations

import pytest

from bridge.errors import BridgeError
from bridge.launch import launch
from bridge.layout import ParallelLayout
from bridge.parallel.state import ParallelState


def test_rank_order_is_tp_then_dp_then_pp() -> None:
    ps = ParallelState(ParallelLayout(tp=2, pp=2), world_size=8, rank=0, create_groups=False)
    assert (ps.tp, ps.dp, ps.pp) == (2, 2, 2)
    assert [ps.coords(r) for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    ps5 = ParallelState(ParallelLayout(tp=2, pp=2), world_size=8, rank=5, create_groups=False)
    assert ps5.tp_ranks == [4, 5] and ps5.dp_ranks == [5, 7] and ps5.pp_ranks == [1, 5]
    assert ps5.embedding_ranks == [1, 5] and ps5.is_last_stage and not ps5.is_first_stage
    assert (ps5.next_rank, ps5.prev_rank) == (1, 1)


def test_pre_and_post_process_follow_virtual_chunks() -> None:
    layout = ParallelLayout(pp=2, vpp=2)
    first, last = (ParallelState(layout, 2, r, create_groups=False) for r in (0, 1))
    assert [first.pre_process(v) for v in range(2)] == [True, False]
    assert [first.post_process(v) for v in range(2)] == [False, False]
    assert [last.post_process(v) for v in range(2)] == [False, True]


def test_expert_parallel_spans_dp_and_cp_cp_fastest() -> None:
    """EP is carved out of DP x CP (Megatron-LM): world 8 = cp 2 x dp 4 at EP=4 has EP groups {0..3} and {4..7},
    expert-DP groups of ranks 4 apart; each EP rank's first copy (which may be a CP rank > 0) writes its file."""
    states = [ParallelState(ParallelLayout(ep=4), 8, r, cp=2, create_groups=False) for r in range(8)]
    assert [(ps.dp_rank, ps.cp_rank) for ps in states[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [ps.ep_rank for ps in states] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [ps.expert_dp_rank for ps in states] == [0, 0, 0, 0, 1, 1, 1, 1] and states[0].expert_dp == 2
    assert [states[5].ep_peer(e) for e in range(4)] == [4, 5, 6, 7]
    assert [ps.writes_checkpoint for ps in states] == [True] * 4 + [False] * 4
    dense = [ParallelState(ParallelLayout(), 4, r, cp=2, create_groups=False) for r in range(4)]
    assert [ps.writes_checkpoint for ps in dense] == [True, False, False, False]  # CP ranks hold the same weights
    with pytest.raises(BridgeError, match="expert parallelism 4 must divide dp x cp = 2"):
        ParallelState(ParallelLayout(ep=4), 2, 0, cp=2, create_groups=False)


@pytest.mark.parametrize("world,rank,match", [(3, 0, "not a multiple of tp\\*pp"), (4, 4, "outside the world")])
def test_invalid_worlds_are_user_errors(world: int, rank: int, match: str) -> None:
    with pytest.raises(BridgeError, match=match):
        ParallelState(ParallelLayout(tp=2, pp=2), world_size=world, rank=rank, create_groups=False)


def _group_members() -> dict[str, list[int]]:
    import torch
    import torch.distributed as dist

    ps = ParallelState(ParallelLayout(tp=2, pp=2), dist.get_world_size(), dist.get_rank())
    out = {}
    for name in ("tp_group", "dp_group", "pp_group", "embedding_group"):
        group = getattr(ps, name)
        gathered = [torch.zeros(1) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, torch.tensor([float(ps.rank)]), group=group)
        out[name] = [int(t.item()) for t in gathered]
    return out


def test_groups_in_a_spawned_world() -> None:
    """World 4 at TP=2 x PP=2 (dp=1): each group holds exactly the ranks the arithmetic names."""
    results = launch(_group_members, 4)
    assert [r["tp_group"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pp_group"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["dp_group"] for r in results] == [[0], [1], [2], [3]]
    assert [r["embedding_group"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def _fail_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise BridgeError("rank one is broken; fix it")
    dist.barrier()  # rank 0 would wait here forever: launch must stop it


def test_launch_reports_a_failing_rank_and_stops_the_others() -> None:
    with pytest.raises(BridgeError, match="rank one is broken"):
        launch(_fail_on_rank_one, 2, timeout_s=120)


def test_nccl_without_gpus_is_a_user_error() -> None:
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("GPUs present")
    with pytest.raises(BridgeError, match="GPUs"):
        launch(_group_members, 2, backend="nccl")


def test_cpu_ranks_fork_from_the_server_and_gpu_ranks_are_spawned() -> None:
    from bridge.launch import _rank_context

    assert _rank_context("gloo").get_start_method() == "forkserver"
    assert _rank_context("nccl").get_start_method() == "spawn"
