"""Context parallelism: the sequence split over CP ranks, with causal load balancing, and attention across it.

Megatron-LM's scheme (`--context-parallel-size`): a sequence of S tokens is cut into 2*CP chunks of
L = S / (2*CP) and CP rank i holds chunks i and 2*CP-1-i, so every rank gets the same amount of causal
attention work (an early chunk attends to little, a late one to much). Everything outside attention is
per token and runs on the local 2*L tokens unchanged; RoPE takes the chunks' global positions.

Attention exchanges K/V over the CP group in one of two ways (Megatron's --cp-comm-type): around a ring
(p2p, the default: bridge.parallel.ring), or, here, by one all-gather (all_gather). The all-gather
collects K and V of the whole sequence (with GQA a small fraction of the activations) and each local query chunk c
attends to the K/V prefix of chunks 0..c with a lower-right causal mask: exactly the rows of full
causal attention. The all-gather's backward is a reduce-scatter, so each rank receives the sum of the
K/V gradients that every rank's queries produced. The mask is plain causal over the packed sequence,
as without CP: bridge does not reset attention at document boundaries, and CP keeps that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from bridge.errors import BridgeError
from bridge.parallel import collectives as C
from bridge.parallel.collectives import Group


def chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two global chunks (of 2*cp) that CP rank `cp_rank` holds, in local order."""
    return cp_rank, 2 * cp - 1 - cp_rank


def check_seq_length(seq_length: int, cp: int, what: str = "--seq-length") -> None:
    """CP needs 2*cp equal chunks: a one-line user error otherwise."""
    if seq_length % (2 * cp):
        raise BridgeError(f"context parallelism splits each sequence into 2 x cp = {2 * cp} chunks: {what} {seq_length} "
                          f"is not divisible; use a multiple of {2 * cp}")


def local_positions(seq_length: int, cp: int, cp_rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Global positions [seq_length / cp] of this rank's tokens (its two chunks, concatenated)."""
    check_seq_length(seq_length, cp, "sequence length")
    size = seq_length // (2 * cp)
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunk_ids(cp, cp_rank)])


def split_sequence(x: torch.Tensor, cp: int, cp_rank: int, dim: int) -> torch.Tensor:
    """This rank's two chunks of `x` along `dim` (the full sequence), concatenated: [.., S, ..] -> [.., S/cp, ..]."""
    if cp == 1:
        return x
    check_seq_length(x.shape[dim], cp, "sequence length")
    parts = x.chunk(2 * cp, dim=dim)
    return torch.cat([parts[c] for c in chunk_ids(cp, cp_rank)], dim=dim)


def global_order(cp: int) -> list[int]:
    """For each global chunk g, its index in the all-gathered (rank-major, two chunks per rank) order."""
    order = []
    for g in range(2 * cp):
        order.append(2 * g if g < cp else 2 * (2 * cp - 1 - g) + 1)
    return order


def rank_major_order(cp: int) -> list[int]:
    """The global chunks in rank-major order (rank 0's two, then rank 1's, ...): what an all-gather of the
    ranks' local chunks holds, and what an all-to-all back to the ranks must send."""
    return [c for r in range(cp) for c in chunk_ids(cp, r)]


def reorder_chunks(x: torch.Tensor, dim: int, order: list[int]) -> torch.Tensor:
    """x cut into len(order) equal chunks along `dim`, put back together as chunks order[0], order[1], ...

    One concatenation of views: no index tensor, which on a GPU would be copied from the host on every call."""
    parts = x.chunk(len(order), dim=dim)
    return torch.cat([parts[i] for i in order], dim=dim)


def gather_sequence(x: torch.Tensor, group: Group, cp: int) -> torch.Tensor:
    """All-gather dimension 0 over CP and put the chunks in sequence order: [S/cp, ...] -> [S, ...].

    Backward: reduce-scatter (each rank's share of the gradient summed over the ranks that used it).
    """
    if cp == 1:
        return x
    gathered = C.gather_from_sp(x, group, tensor_parallel_output_grad=True)  # [S, ...] in rank order
    return reorder_chunks(gathered, 0, global_order(cp))


def window_mask(q_pos: torch.Tensor, k_len: int, window: int | None) -> torch.Tensor:
    """Boolean [Lq, Lk] mask: causal by global position, and within the sliding window when given."""
    dist = q_pos[:, None] - torch.arange(k_len, device=q_pos.device)[None, :]
    mask = dist >= 0
    return mask if window is None else mask & (dist < window)


def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Group, cp: int, cp_rank: int,
                 sliding_window: int | None = None, scale: float | None = None,
                 segments: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this rank's query chunks over the whole sequence.

    q: [b, nq, S/cp, d] (local chunks); k: [b, ng, S/cp, d], v: [b, ng, S/cp, dv] (local) -> [b, nq, S/cp, dv];
    `scale` as SDPA's. A v narrower than q/k (MLA's) is gathered as it is and then zero-padded to q's width: PyTorch
    runs these masks (a query chunk against its key prefix, or a window) fast only in flash attention, which takes
    one head size; unpadded, SDPA falls back to a kernel several times slower (docs/performance.md).
    `segments` [b, S]: the document of every token of the whole sequence (packed documents): a query sees only
    keys of its own document.
    """
    k, v = (gather_sequence(t.permute(2, 0, 1, 3), group, cp).permute(1, 2, 0, 3) for t in (k, v))  # [b, ng, S, d]
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    size = q.shape[2] // 2
    outs = []
    for i, c in enumerate(chunk_ids(cp, cp_rank)):
        q_c = q[:, :, i * size:(i + 1) * size]
        end = (c + 1) * size  # keys 0..end-1 are at or before this chunk's last query
        k_c, v_c = k[:, :, :end], v[:, :, :end]
        if segments is not None:  # [b, 1, size, end]: causal (and windowed), and only within the query's document
            same = segments[:, c * size:end, None] == segments[:, None, :end]
            mask = window_mask(torch.arange(c * size, end, device=q.device), end, sliding_window) & same.unsqueeze(1)
        elif sliding_window is not None and end > sliding_window:
            q_pos = torch.arange(c * size, end, device=q.device)
            mask = window_mask(q_pos, end, sliding_window)
        else:
            mask = causal_lower_right(size, end)
        outs.append(F.scaled_dot_product_attention(q_c, k_c, v_c, attn_mask=mask, enable_gqa=True, scale=scale))
    return torch.cat(outs, dim=2)[..., :dv]
