"""The random-number state of a rank, saved with every training checkpoint so a resume draws the same numbers."""
from __future__ import annotations

import io

import torch


def rng_state() -> list[dict[str, torch.Tensor]]:
    """Megatron's `rng_state` entry: a list with one dict of generator states."""
    state = {"torch_rng_state": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return [state]


def set_rng_state(states: list[dict[str, torch.Tensor]]) -> None:
    state = states[0]
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def rng_bytes() -> bytes:
    """`rng_state()` as a byte blob (torch_dist stores one per rank)."""
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    return buf.getvalue()


def rng_from_bytes(data: bytes) -> list[dict[str, torch.Tensor]]:
    return torch.load(io.BytesIO(data), weights_only=True)
