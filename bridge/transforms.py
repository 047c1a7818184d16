"""Pure tensor transforms between HF and Megatron layouts; no I/O, no sharding, round-trip tested."""
from __future__ import annotations

import torch

from bridge.config import ModelConfig


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v (weights `[rows, h]` or biases `[rows]`) -> Megatron linear_qkv grouped by query group.

    Rows of group g are `[q heads of g ; k_g ; v_g]`, so a plain dim-0 split over TP hands each
    rank whole query groups.
    """
    ng, d = cfg.num_query_groups, cfg.kv_channels
    tail = q.shape[1:]  # (h,) for weights, () for biases
    q_g = q.reshape(ng, cfg.heads_per_group * d, *tail)
    k_g = k.reshape(ng, d, *tail)
    v_g = v.reshape(ng, d, *tail)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *tail)  # ((nq + 2ng) d, *tail)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Inverse of `fuse_qkv`: Megatron linear_qkv -> [q, k, v] in HF layout."""
    ng, d = cfg.num_query_groups, cfg.kv_channels
    tail = qkv.shape[1:]
    per_group = qkv.reshape(ng, (cfg.heads_per_group + 2) * d, *tail)
    q, k, v = per_group.split([cfg.heads_per_group * d, d, d], dim=1)
    return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF gate_proj, up_proj -> Megatron linear_fc1 `[gate; up]` (gate goes through the activation)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Inverse of `fuse_gate_up`."""
    gate, up = fc1.chunk(2, dim=0)
    return [gate, up]


def copy(tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Identity: the tensor has the same layout in both formats."""
    return tensor


def uncopy(tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    return [tensor]
