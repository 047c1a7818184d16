"""Which fused attention kernel SDPA runs (`--attention-backend`, Megatron-LM's names).

fused: cuDNN's fused attention, what Megatron-LM's default Transformer Engine backend runs on
Hopper; flash: FlashAttention-2 as built into PyTorch; unfused: the plain math (softmax(QK^T)V),
for debugging; auto: cuDNN first, then flash, then the others, each taking over when the one before
cannot run a shape. cuDNN comes first because it is the faster of the two for causal grouped-query
attention forward + backward at bridge's shapes, and takes grouped K/V as they are (docs/performance.md,
`python bench/run.py kernels`); PyTorch's own default order tries flash first. The choice is process-wide
and must be made before torch.compile traces attention, which fixes the kernel in its graph; it
affects CUDA tensors only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS: dict[str, list[SDPBackend]] = {
    "auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH],
    "fused": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "unfused": [SDPBackend.MATH],
}
_active = contextlib.ExitStack()
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Make `name` (a key of ATTENTION_BACKENDS) the process's SDPA kernel order, replacing an earlier choice."""
    global _backend
    _active.close()
    _active.enter_context(sdpa_kernel(ATTENTION_BACKENDS[name], set_priority=True))
    _backend = name


# ---- blocks with their log-sum-exp: what ring attention (bridge.parallel.ring) is built from ----------------------
# A ring computes one query block against one key block at a time and merges the partial outputs by each row's
# softmax log-sum-exp (lse); backward reruns every block with the *merged* output and lse, which gives each block's
# exact share of the gradient. SDPA hides the lse, so these call the ATen kernels beneath it. All tensors are
# contiguous [b, heads, s, d]; k/v may have fewer (GQA) heads, v a narrower head than q/k (MLA: 128 against 192);
# lse is fp32 [b, nq, s]; `scale` multiplies q k^T inside the kernel (in fp32: MLA's scale is not 1/sqrt(d)).

class BlockKernel(NamedTuple):
    """forward(q, k, v, causal, scale) -> (out, lse, aux); backward(dout, q, k, v, out, lse, aux, causal, scale) ->
    (dq, dk, dv). `aux` is what the kernel's own backward takes from its forward (sequence bookkeeping, RNG state)."""
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, tuple]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    name: str


def _cpu_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse.contiguous(), ()


def _cpu_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, aux: tuple, causal: bool, scale: float) -> tuple:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                                scale=scale)


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple:
    out, lse, cum_q, cum_k, max_q, max_k, rng, unused, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, scale=scale)
    return out, lse, (cum_q, cum_k, max_q, max_k, rng, unused)


def _flash_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, aux: tuple, causal: bool, scale: float) -> tuple:
    cum_q, cum_k, max_q, max_k, rng, unused = aux
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng, unused, scale=scale)


def _cudnn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple:
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse.reshape(lse.shape[:3]), (lse.shape, cum_q, cum_k, max_q, max_k, seed, offset)


def _cudnn_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, aux: tuple, causal: bool, scale: float) -> tuple:
    lse_shape, cum_q, cum_k, max_q, max_k, seed, offset = aux
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.reshape(lse_shape), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal,
        scale=scale)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32 (or t's dtype, if wider): the plain math's compute dtype."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_query_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """k or v widened (see _wide) with its GQA heads repeated: query head h reads KV head h // heads per group, as
    SDPA's enable_gqa."""
    return _wide(t).repeat_interleave(heads // t.shape[1], dim=1)


def _math_scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """q k^T * scale in fp32 or wider (k: one head per query head), -inf above the diagonal when causal."""
    scores = _wide(q) @ k.transpose(-1, -2) * scale  # [b, nq, sq, sk]
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores


def _math_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple:
    scores = _math_scores(q, _per_query_head(k, q.shape[1]), causal, scale)
    lse = scores.logsumexp(-1)
    return (torch.exp(scores - lse.unsqueeze(-1)) @ _per_query_head(v, q.shape[1])).to(q.dtype), lse, ()


def _math_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, aux: tuple, causal: bool, scale: float) -> tuple:
    """softmax backward with the given (merged) lse: dS = P * (dO V^T - rowsum(dO * O))."""
    groups, per_group = k.shape[1], q.shape[1] // k.shape[1]
    k_wide = _per_query_head(k, q.shape[1])
    p = torch.exp(_math_scores(q, k_wide, causal, scale) - lse.unsqueeze(-1))  # [b, nq, sq, sk]
    dout = _wide(dout)
    dv = p.transpose(-1, -2) @ dout
    ds = p * (dout @ _per_query_head(v, q.shape[1]).transpose(-1, -2) - (dout * _wide(out)).sum(-1, keepdim=True))
    dq = ds @ k_wide * scale
    dk = ds.transpose(-1, -2) @ _wide(q) * scale
    fold = lambda t: t.unflatten(1, (groups, per_group)).sum(2)  # noqa: E731 - query heads back onto their KV head
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


BLOCK_KERNELS: dict[str, BlockKernel] = {
    "cpu": BlockKernel(_cpu_forward, _cpu_backward, "cpu"),
    "flash": BlockKernel(_flash_forward, _flash_backward, "flash"),
    "cudnn": BlockKernel(_cudnn_forward, _cudnn_backward, "cudnn"),
    "math": BlockKernel(_math_forward, _math_backward, "math"),
}


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[-1])).contiguous()


def with_v_padded(kernel: BlockKernel) -> BlockKernel:
    """`kernel` for a v narrower than q/k, where it takes one head size only (the CPU and flash kernels): v is zero-
    padded to q's width per block, the output's extra columns (all zero) are dropped, and in backward the output and
    its gradient are padded with zeros again (exactly what the padded forward gave) and dv's extra columns dropped."""
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple:
        out, lse, aux = kernel.forward(q, k, _pad_to(v, q.shape[-1]), causal, scale)
        return out[..., :v.shape[-1]], lse, aux

    def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, aux: tuple, causal: bool, scale: float) -> tuple:
        width = q.shape[-1]
        dq, dk, dv = kernel.backward(_pad_to(dout, width), q, k, _pad_to(v, width), _pad_to(out, width), lse, aux,
                                     causal, scale)
        return dq, dk, dv[..., :v.shape[-1]]

    return BlockKernel(forward, backward, f"{kernel.name}+padded-v")


#: --attention-backend -> the block kernels CUDA tries, in order (the first that can run the shape and dtype; the last
#: runs regardless, and errors as SDPA would): as ATTENTION_BACKENDS, with the plain math for fp32.
_CUDA_BLOCK_KERNELS = {"auto": ("cudnn", "flash", "math"), "fused": ("cudnn",), "flash": ("flash",),
                       "unfused": ("math",)}
_CAN_RUN = {"cudnn": torch.backends.cuda.can_use_cudnn_attention, "flash": torch.backends.cuda.can_use_flash_attention}


def block_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> BlockKernel:
    """The log-sum-exp kernel pair for these inputs under the process's --attention-backend (CPU: its flash kernel).

    A v narrower than q/k (MLA) goes to the first kernel that takes the two head sizes as they are; where none
    does, to the first that runs them padded to one (with_v_padded). v wider than q/k is not handled here (the ring
    pads q and k up front)."""
    narrow_v = v.shape[-1] != q.shape[-1]
    if q.device.type == "cpu":
        return with_v_padded(BLOCK_KERNELS["cpu"]) if narrow_v else BLOCK_KERNELS["cpu"]
    *preferred, last = _CUDA_BLOCK_KERNELS[_backend]
    gqa = k.shape[1] != q.shape[1]
    as_is = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, causal, gqa)
    name = next((name for name in preferred if _CAN_RUN[name](as_is, False)), None)
    if name is not None or not narrow_v:
        return BLOCK_KERNELS[name or last]
    one_width = torch.backends.cuda.SDPAParams(q, k, k, None, 0.0, causal, gqa)  # v as wide as k
    name = next((name for name in preferred if _CAN_RUN[name](one_width, False)), last)
    return BLOCK_KERNELS[name] if name == "math" else with_v_padded(BLOCK_KERNELS[name])


def sdpa_pads_v(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether SDPA should get v zero-padded to q's width: v is narrower (MLA) and the kernel SDPA would run takes
    one head size, the CPU's fused kernel or flash (`--attention-backend flash`); unpadded, SDPA would fall back to
    its plain math or find no kernel. cuDNN takes both sizes (DeepSeek-V3's 192/128 among them), so auto
    and fused do not pad. Decided from the device and backend alone, without probing kernels as block_kernel does,
    so that torch.compile traces it inside the layer without a graph break."""
    return v.shape[-1] < q.shape[-1] and (q.device.type == "cpu" or _backend == "flash")


class Documents(NamedTuple):
    """Packed documents of a micro-batch as varlen kernels take them: `cu_seqlens` [N+1] int32 (device), the
    boundaries over the flattened [b*s] tokens, and a bound on their length (a host int: kernels size their grid by
    it; the trainer gives the sample length, a constant)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


def document_ids(cu_seqlens: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """[b, s] document number of every token, from the varlen boundaries over the flattened [b*s] tokens."""
    starts = torch.zeros(b * s, dtype=torch.int32, device=cu_seqlens.device)
    starts[cu_seqlens[1:-1].long()] = 1
    return torch.cumsum(starts, 0).view(b, s)


class VarlenKernel(NamedTuple):
    """A flash-attention varlen kernel in torch's form, and whether it takes fewer k/v heads than q heads."""

    fn: Callable
    grouped: bool


def _varlen_kernel() -> VarlenKernel | None:
    """torch's flash-attention varlen kernel, where this torch has the form used here (causal through windows);
    torch 2.11's has no grouped queries, later ones do."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = set(inspect.signature(varlen_attn).parameters)
    return VarlenKernel(varlen_attn, "enable_gqa" in parameters) if {"window_size", "scale"} <= parameters else None


_VARLEN = _varlen_kernel()


def varlen_runs(q: torch.Tensor) -> bool:
    """Whether the varlen kernel takes these queries: CUDA, half precision, a torch that has it."""
    return _VARLEN is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents,
                     sliding_window: int | None, scale: float | None, kernel: VarlenKernel | None = None) -> torch.Tensor:
    """Causal attention within each document of flattened tokens: q [T, nq, d], k [T, ng, d], v [T, ng, dv] ->
    [T, nq, dv]. A narrower v (MLA) is zero-padded to d (flash takes one head size) and the extra columns dropped;
    a window W keeps, as transformers does, the keys with q - kv < W."""
    kernel = kernel or _VARLEN
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    cu, longest = documents.cu_seqlens, documents.max_seqlen
    gqa = {"enable_gqa": True} if kernel.grouped else {}
    if not kernel.grouped and k.shape[1] != q.shape[1]:  # every q head gets its own copy of its group's k, v
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = kernel.fn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=window, **gqa)
    return out[..., :dv]
