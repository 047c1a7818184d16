"""The attention core of a layer, what Megatron Core calls `core_attention`: causal SDPA with GQA, a sliding window
and context parallelism. Its own module so that both attention variants, the standard one (bridge.nn.transformer)
and MLA (bridge.nn.mla), build on it while the layer builds on both.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bridge.nn.attention import Documents, block_kernel, document_ids, sdpa_pads_v, varlen_attention, varlen_runs
from bridge.errors import BridgeError
from bridge.nn.layers import TEExtraState
from bridge.parallel.collectives import Group
from bridge.parallel.context import cp_attention, window_mask
from bridge.parallel.ring import ring_attention
from bridge.parallel.state import CP_COMM_TYPES
from bridge.parallel.ulysses import heads_to_sequence, sequence_to_heads


class CoreAttention(nn.Module):
    """Causal scaled-dot-product attention with GQA (SDPA picks the kernel: bridge.nn.attention).

    With context parallelism (`cp` > 1) the sequence here is this rank's two load-balanced chunks and
    K/V come from the whole CP group: around a ring (`cp_comm_type` p2p, bridge.parallel.ring), by one
    all-gather (bridge.parallel.context), or the heads are traded for the sequence by all-to-all (a2a,
    bridge.parallel.ulysses), after which attention runs as without CP. The ring has no sliding window; where a
    window cuts the sequence the all-gather runs instead (training refuses p2p for such a run up front, verify
    needs only the numbers).

    With `softcap` (Gemma 2) the scores are tanh(s / cap) * cap before the softmax, and with `sinks` (GPT-OSS) a
    learned logit per head, `softmax_offset`, joins each softmax's denominator without a value; no SDPA kernel does
    either: the plain matmul-softmax runs instead on the CPU, FlexAttention on CUDA (`scored_attention`); neither
    under context parallelism.
    """

    def __init__(self, sliding_window: int | None, *, cp: int = 1, cp_rank: int = 0, cp_group: Group = None,
                 cp_comm_type: str = CP_COMM_TYPES[0], softmax_scale: float | None = None,
                 softcap: float | None = None, sinks: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        """`sinks`: this rank's number of heads, each with a sink (0: none)."""
        super().__init__()
        if softcap is not None and cp > 1:
            raise BridgeError("attention logit softcapping does not run under context parallelism: use --cp 1")
        if sinks and cp > 1:
            raise BridgeError("attention sinks do not run under context parallelism: use --cp 1")
        self.sliding_window, self.softmax_scale, self.softcap = sliding_window, softmax_scale, softcap
        self.cp, self.cp_rank, self.cp_group, self.cp_comm_type = cp, cp_rank, cp_group, cp_comm_type
        self.softmax_offset = nn.Parameter(torch.zeros(sinks, dtype=dtype, device=device)) if sinks else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        # q: [s, b, nq, d]; k: [s, b, ng, d]; v: [s, b, ng, dv] (dv = d but for MLA)
        if documents is not None and self.cp == 1:  # packed documents
            return self._per_document(q, k, v, documents)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        out = self._context_parallel(q, k, v, documents) if self.cp > 1 else self._whole_sequence(q, k, v)
        return out.permute(2, 0, 1, 3)  # [s, b, nq, dv]

    def _per_document(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents) -> torch.Tensor:
        """Attention within each packed document, [s, b, heads, d] -> [s, b, nq, dv]: flash attention's varlen kernel
        where it runs (CUDA, bf16/fp16), else document by document. Either way the cost is the sum of the squared
        document lengths, and no [s, s] mask exists."""
        s, b, nq, _ = q.shape
        flat = [t.transpose(0, 1).reshape(b * s, t.shape[2], t.shape[3]) for t in (q, k, v)]  # [b*s, heads, d]
        if varlen_runs(flat[0]) and self.softcap is None and self.softmax_offset is None:
            out = varlen_attention(*flat, documents, self.sliding_window, self.softmax_scale)
        else:
            bounds = documents.cu_seqlens.tolist()
            out = torch.cat([self._whole_sequence(*(t[start:end].transpose(0, 1).unsqueeze(0) for t in flat))[0]
                             .transpose(0, 1) for start, end in zip(bounds[:-1], bounds[1:])])
        return out.view(b, s, nq, -1).transpose(0, 1)

    def _windowed(self, seq_length: int) -> bool:
        return self.sliding_window is not None and seq_length > self.sliding_window

    def _whole_sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over a whole sequence: causal, within the sliding window where the sequence outgrows it."""
        s = q.shape[2]
        if self.softcap is not None or self.softmax_offset is not None:
            window = self.sliding_window if self._windowed(s) else None
            return scored_attention(q, k, v, self.softmax_scale, window, self.softcap, self.softmax_offset)
        if not self._windowed(s):
            return self._causal(q, k, v)
        mask = window_mask(torch.arange(s, device=q.device), s, self.sliding_window)  # transformers' q - kv < W
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=self.softmax_scale)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal SDPA; MLA's narrower v zero-padded where the fused kernel takes one head size (the extra output
        columns are zero and dropped)."""
        dv = v.shape[-1]
        if sdpa_pads_v(q, v):
            v = F.pad(v, (0, q.shape[-1] - dv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=self.softmax_scale)
        return out[..., :dv]

    def _context_parallel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          documents: Documents | None = None) -> torch.Tensor:
        """a2a; the ring; or the all-gather, where it was asked for, a sliding window cuts the sequence, or packed
        documents (a mask per query chunk: within its document; the ring's blocks know no documents)."""
        if self.cp_comm_type == "a2a" and documents is None:
            whole = (sequence_to_heads(t, self.cp_group, self.cp) for t in (q, k, v))
            return heads_to_sequence(self._whole_sequence(*whole), self.cp_group, self.cp)
        where = dict(group=self.cp_group, cp=self.cp, cp_rank=self.cp_rank, scale=self.softmax_scale)
        if self.cp_comm_type == "p2p" and not self._windowed(q.shape[2] * self.cp) and documents is None:
            return ring_attention(q, k, v, kernel_for=block_kernel, **where)
        segments = None if documents is None else document_ids(documents.cu_seqlens, q.shape[0], q.shape[2] * self.cp)
        return cp_attention(q, k, v, sliding_window=self.sliding_window, segments=segments, **where)


def scored_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, window: int | None,
                     softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention whose scores are soft-capped, or whose softmax has sinks: q [b, nq, s, d], k/v [b, ng, s, d]
    -> [b, nq, s, d]. On CUDA through compiled FlexAttention (no [s, s] scores in memory), elsewhere as the plain
    math."""
    if q.is_cuda:
        return flex_scored_attention(q, k, v, scale, window, softcap, sinks)
    return math_scored_attention(q, k, v, scale, window, softcap, sinks)


def math_scored_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                          window: int | None, softcap: float | None = None,
                          sinks: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' order of operations (eager_attention_forward: scale, cap, mask, softmax in fp32, cast back), so
    that CPU fp32 runs are bit-exact with it; it holds the [b, nq, s, s] scores."""
    heads, s = q.shape[1], q.shape[2]
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))  # GQA: each query head's KV head
    scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = window_mask(torch.arange(s, device=q.device), s, window)  # [s, s]: causal, within the window
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32) if sinks is None else softmax_with_sinks(scores, sinks)
    return torch.matmul(probs.to(q.dtype), v)


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Softmax of [b, heads, sq, sk] scores whose denominators also hold exp(sink) of the row's head, in fp32: as
    transformers' GPT-OSS (the sinks a last column, the row maximum subtracted, that column dropped after)."""
    b, heads, sq, _ = scores.shape
    logits = torch.cat([scores, sinks.to(scores.dtype).view(1, heads, 1, 1).expand(b, heads, sq, 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return torch.softmax(logits, dim=-1, dtype=torch.float32)[..., :-1]


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """An attention output [b, heads, s, d] and its rows' log-sum-exp [b, heads, s] -> the output had each row's
    softmax also held exp(sink): Z / (Z + e^sink) = sigmoid(lse - sink) times it (differentiable in lse)."""
    return out * torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1)).unsqueeze(-1).to(out.dtype)


def flex_scored_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, window: int | None,
                          softcap: float | None = None, sinks: torch.Tensor | None = None,
                          compiled: bool = True) -> torch.Tensor:
    """The same attention through FlexAttention: the cap as its score_mod, causality and the window as its block mask
    (transformers' q - kv < W), the sinks from its log-sum-exp (`with_sinks`). `compiled` false: FlexAttention's
    eager reference, which runs anywhere (the tests; forward only off CUDA)."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    def cap(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
            kv_idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(score / softcap) * softcap

    def allowed(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        causal = q_idx >= kv_idx
        return causal if window is None else causal & (q_idx - kv_idx < window)

    s = q.shape[2]
    mask = create_block_mask(allowed, None, None, s, s, device=q.device)
    kernel = _compiled_flex() if compiled else flex_attention
    where = dict(score_mod=None if softcap is None else cap, block_mask=mask, scale=scale, enable_gqa=True,
                 kernel_options=FLEX_KERNEL if compiled else None)
    if sinks is None:
        return kernel(q, k, v, **where)
    out, aux = kernel(q, k, v, **where, return_aux=AuxRequest(lse=True))
    return with_sinks(out, aux.lse, sinks)


#: FlexAttention's main Triton kernel for every length. Its default (AUTO) takes the decoding kernel for queries
#: shorter than a block, which torch 2.11 could not lower for GPT-OSS's 64 query heads over 8 KV heads of 64 with
#: the log-sum-exp returned ("NoValidChoicesError: No choices exist for backend", a 24-token prompt on an H100);
#: the main kernel takes any length and GQA.
FLEX_KERNEL = {"BACKEND": "TRITON"}


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """FlexAttention runs as a fused kernel only compiled; compiled once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


class TECoreAttention(TEExtraState, CoreAttention):
    """TE spec's `TEDotProductAttention`: no parameters, one `_extra_state`."""
