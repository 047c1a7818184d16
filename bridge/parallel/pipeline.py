"""Forward-only pipeline pass: activations go stage to stage (and chunk to chunk) by P2P send/recv.

Order for every micro-batch m: chunk 0 on stages 0..PP-1, then chunk 1 on stages 0..PP-1, ...
(the last stage sends chunk v's output to stage 0 for chunk v+1). Every rank walks the same
(m, chunk) sequence, so each send meets its recv; there is no overlap between micro-batches
(that is the training schedules' job, see the trainer). Every rank is given the micro-batches:
non-first stages use only the token shapes to size their receive buffers.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from bridge.parallel.state import ParallelState

MicroBatch = Mapping[str, torch.Tensor] | torch.Tensor


def _fields(batch: MicroBatch) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]:
    """(tokens, what every stage's model takes besides them: positions and packed documents, labels)."""
    if isinstance(batch, torch.Tensor):
        return batch, {}, None
    return batch["tokens"], model_inputs(batch), batch.get("labels")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The micro-batch fields every pipeline stage passes to its model (the first stage also takes the tokens, the
    last the labels): position ids, and the packed documents' boundaries where the batch has them."""
    return {k: batch[k] for k in ("position_ids", "cu_seqlens", "max_seqlen") if k in batch}


def activation_shape(tokens: torch.Tensor, hidden: int, tp: int, sequence_parallel: bool) -> tuple[int, int, int]:
    """[s(/tp), b, h]: what travels between stages for tokens [b, s]."""
    b, s = tokens.shape
    return (s // tp if sequence_parallel else s, b, hidden)


def send_forward(x: torch.Tensor, ps: ParallelState) -> None:
    dist.send(x.contiguous(), dst=ps.next_rank, group=ps.pp_group)


def recv_forward(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, ps: ParallelState) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buf, src=ps.prev_rank, group=ps.pp_group)
    return buf


@torch.no_grad()
def forward_only(chunks: Sequence[torch.nn.Module], ps: ParallelState, micro_batches: Sequence[MicroBatch]) -> list[Any]:
    """Run every micro-batch through the whole pipeline; the last stage returns one output each
    (logits shard [s, b, V_pad/tp] or, with labels, loss [b, s]); other stages return []."""
    param = next(chunks[0].parameters())
    outputs: list[Any] = []
    for batch in micro_batches:
        tokens, inputs, labels = _fields(batch)
        x: torch.Tensor = tokens
        for v, model in enumerate(chunks):
            if not model.pre_process:
                shape = activation_shape(tokens, model.cfg.hidden_size, ps.tp, model.sequence_parallel)
                x = recv_forward(shape, param.dtype, param.device, ps)
            x = model(x, labels=labels if model.post_process else None, **inputs)
            if model.post_process:
                outputs.append(x)
            else:
                send_forward(x, ps)
    return outputs
