"""Documents packed into one sample: where each starts, the positions inside it, and the tokens it trains.

A packed sample holds several documents, each ended by EOD (the EOD belongs to the document it ends).
Megatron-LM's flags decide what the model sees of that packing (`get_ltor_masks_and_position_ids`):

- `--reset-attention-mask`: a token attends only to earlier tokens of its own document. Attention takes
  the documents as varlen boundaries (`cu_seqlens` over the flattened batch, as flash attention's varlen
  kernels do), never as a dense s x s mask: its cost is the sum of the squared document lengths.
- `--reset-position-ids`: positions restart at 0 after each EOD, so RoPE sees every document as if alone.
- `--eod-mask-loss`: no loss where the input is EOD (that prediction would be the next document's first
  token, which nothing in the current document can know).

With all three, every document's per-token losses are those of the document run alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackingFlags:
    """Megatron-LM's three packing flags (all off: documents see each other, as plain pretraining does)."""

    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    eod_mask_loss: bool = False


def document_segments(inputs: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] input tokens -> [b, s] document number of each token, counted from 0 in each sample: a token after
    the k-th EOD belongs to document k (the EOD itself to the document it ends)."""
    ends = (inputs == eod).to(torch.int32)
    return torch.cumsum(ends, dim=1) - ends


def _document_starts(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] document numbers -> [b, s] True where a document starts (every sample starts one)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] document numbers -> [b, s] position of each token within its document."""
    b, s = segments.shape
    index = torch.arange(s, device=segments.device).expand(b, s)
    first = torch.where(_document_starts(segments), index, torch.zeros_like(index))
    return index - torch.cummax(first, dim=1).values


def varlen_boundaries(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] document numbers -> cu_seqlens [N+1] int32: the documents of the flattened [b*s] batch as varlen
    attention kernels take them (a document never spans two samples)."""
    begin = torch.nonzero(_document_starts(segments).flatten()).flatten()
    return torch.cat([begin, torch.tensor([segments.numel()])]).to(torch.int32)


def pack_fields(inputs: torch.Tensor, loss_mask: torch.Tensor, eod: int, flags: PackingFlags) -> dict[str, torch.Tensor]:
    """What the flags add to a micro-batch of inputs [b, s]: `cu_seqlens` and `max_seqlen` (reset attention: the
    documents as varlen boundaries over the flattened batch), `position_ids` (reset positions), and the loss mask
    with EOD inputs removed (eod-mask-loss)."""
    out: dict[str, torch.Tensor] = {}
    segments = document_segments(inputs, eod) if flags.reset_attention_mask or flags.reset_position_ids else None
    if flags.reset_attention_mask:
        out["cu_seqlens"] = varlen_boundaries(segments)
        # the kernels' bound on a document's length: the sample's, one constant, so a compiled layer (which would
        # specialise on the int) is not recompiled for each batch's longest document
        out["max_seqlen"] = torch.tensor(inputs.shape[1])
    if flags.reset_position_ids:
        out["position_ids"] = document_positions(segments)
    out["loss_mask"] = loss_mask * (inputs != eod).to(loss_mask.dtype) if flags.eod_mask_loss else loss_mask
    return out
