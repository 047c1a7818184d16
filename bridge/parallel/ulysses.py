"""Context parallelism by all-to-all (Megatron-LM's `--cp-comm-type a2a`, DeepSpeed-Ulysses): around attention,
trade the sequence split for a head split.

Outside attention a CP rank holds every head of its two load-balanced chunks (bridge.parallel.context). One
all-to-all per tensor gives each rank 1/cp of the heads for the whole sequence, in sequence order; attention then
runs exactly as without CP (causal, or a sliding window, which the ring cannot apply); a second all-to-all takes the
output back to every head of the local chunks. Per layer and rank, the forward sends (cp-1)/cp of q, k, v and the
output; the ring sends K and V cp-1 times (and hides that behind its block kernels, where a2a waits for its
all-to-alls). With K/V as wide as q (MHA, MLA) a2a sends less from CP=3 on; with GQA's narrower K/V the ring
does. Its condition: query heads and K/V heads (per TP rank) must both divide by cp.
"""
from __future__ import annotations

import torch

from bridge.config import ModelConfig
from bridge.errors import BridgeError
from bridge.parallel.collectives import Group, all_to_all
from bridge.parallel.context import global_order, rank_major_order, reorder_chunks


def check_heads(query_heads: int, kv_heads: int, cp: int) -> None:
    """One-line error unless every CP rank can take an equal share of the query and the K/V heads."""
    if query_heads % cp or kv_heads % cp:
        raise BridgeError(f"--cp-comm-type a2a splits the attention heads over cp={cp} ranks: {query_heads} query and "
                          f"{kv_heads} K/V heads (per TP rank) do not both divide by {cp}; use --cp-comm-type p2p or "
                          f"all_gather, or a smaller --cp")


def check_model_heads(model: ModelConfig, tp: int, cp: int) -> None:
    """check_heads for a model's attention at TP=tp: K/V heads are its query groups, or with MLA one per head."""
    kv_heads = model.num_attention_heads if model.mla is not None else model.num_query_groups
    check_heads(model.num_attention_heads // tp, kv_heads // tp, cp)


def _exchange(x: torch.Tensor, group: Group, cp: int) -> torch.Tensor:
    """x [cp, ...]: slice r goes to CP rank r; returns [cp, ...], slice r from rank r (backward: the inverse)."""
    return all_to_all(x.contiguous(), group, [1] * cp, [1] * cp)


def sequence_to_heads(x: torch.Tensor, group: Group, cp: int) -> torch.Tensor:
    """[b, n, S/cp, d] (every head, this rank's two chunks) -> [b, n/cp, S, d] (this rank's heads, whole sequence)."""
    b, n, local, d = x.shape
    check_heads(n, n, cp)
    send = x.reshape(b, cp, n // cp, local, d).transpose(0, 1)  # [destination rank, b, n/cp, S/cp, d]
    recv = _exchange(send, group, cp)  # [source rank, b, n/cp, 2 chunks x L, d]
    halves = recv.unflatten(3, (2, local // 2))  # [source rank, b, n/cp, its two chunks, L, d]
    # rank-major index i = 2 x rank + (first or second chunk); one copy into sequence order
    return torch.cat([halves[i // 2, :, :, i % 2] for i in global_order(cp)], dim=2)


def heads_to_sequence(y: torch.Tensor, group: Group, cp: int) -> torch.Tensor:
    """[b, n/cp, S, d] (this rank's heads, whole sequence) -> [b, n, S/cp, d] (every head, this rank's two chunks)."""
    b, m, seq, d = y.shape
    chunks = reorder_chunks(y, 2, rank_major_order(cp))
    send = chunks.reshape(b, m, cp, seq // cp, d).permute(2, 0, 1, 3, 4)  # [destination rank, b, n/cp, S/cp, d]
    recv = _exchange(send, group, cp)  # [source rank = head group, b, n/cp, S/cp, d]
    return recv.transpose(0, 1).reshape(b, cp * m, seq // cp, d)
