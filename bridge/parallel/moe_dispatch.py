"""Token dispatch for expert parallelism: tokens go to the EP rank that owns their expert with all-to-all.

Dropless: every (token, expert) pair is sent; per-expert counts are exchanged first so the
variable-size all-to-all knows its splits. Autograd runs the inverse all-to-all on the way back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bridge.parallel.collectives import Group, all_to_all


class Dispatch:
    """One layer's routing plan: permute (token, expert) pairs to their experts' ranks and back.

    `tokens` [T, h], `experts` [T, k] global expert ids. After `forward`, rows are grouped by local
    expert (`local_counts`); `backward` undoes everything and returns [T*k, h] in (token, slot) order.
    """

    def __init__(self, experts: torch.Tensor, num_experts: int, ep: int, group: Group) -> None:
        self.ep, self.group, self.local = ep, group, num_experts // ep
        flat = experts.reshape(-1)  # [T*k]
        self.order = torch.argsort(flat, stable=True)  # (token, slot) pairs sorted by global expert
        counts = torch.bincount(flat, minlength=num_experts)  # [E]
        self.counts = counts
        """Tokens routed to each global expert by this rank (before the exchange)."""
        if ep == 1:
            self.local_counts = counts
            return
        per_rank = counts.view(ep, self.local)  # what I send to each rank, per its local expert
        recv = torch.empty_like(per_rank)
        dist.all_to_all_single(recv, per_rank.contiguous(), group=group)  # [source rank, local expert]
        self.send_splits, self.recv_splits = per_rank.sum(1).tolist(), recv.sum(1).tolist()
        expert_of_row = torch.arange(self.local, device=experts.device).repeat(ep).repeat_interleave(recv.reshape(-1))
        self.regroup = torch.argsort(expert_of_row, stable=True)  # by source rank -> by local expert
        self.local_counts = recv.sum(0)

    def forward(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        rows = tokens[self.order // k]  # [T*k, h] sorted by global expert
        if self.ep == 1:
            return rows
        rows = all_to_all(rows, self.group, self.recv_splits, self.send_splits)
        return rows[self.regroup]

    def backward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.ep > 1:
            rows = all_to_all(rows[_inverse(self.regroup)], self.group, self.send_splits, self.recv_splits)
        return rows[_inverse(self.order)]  # (token, slot) order


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv
