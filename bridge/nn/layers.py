"""Tensor-parallel building blocks whose parameter names are Megatron Core's (TE and local spec).

Shapes follow Megatron: activations are [s, b, h]; with sequence parallelism the sequence
dimension of everything outside the TP regions is split, [s/tp, b, h].
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bridge.nn.fp8 import fp8_linear
from bridge.parallel import collectives as C
from bridge.parallel.collectives import Group


class TEExtraState:
    """Mixin for modules that Transformer Engine gives an `_extra_state` entry (FP8 metadata).

    Without FP8 TE 2.x stores an empty uint8 tensor; we emit the same and accept whatever is
    loaded (tensor, None or an older TE's BytesIO), so a strict load of a TE-spec file succeeds.
    """

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        del state  # no FP8 metadata to restore


class RMSNorm(nn.Module):
    """HF's and TE's RMSNorm: normalise in fp32, then apply the weight as the family's HF code does (`style`, one of
    bridge.config.NORM_STYLES), so that it is bit-compatible with transformers."""

    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: torch.device | None = None,
                 style: str = "llama") -> None:
        super().__init__()
        self.eps, self.style = eps, style
        self.weight = nn.Parameter(norm_weight_init(size, style, dtype, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.style)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp8: Any = None) -> torch.Tensor:
    """F.linear, or with `fp8` (a torchao Float8LinearConfig set by bridge.nn.fp8.apply_fp8) an FP8 matmul."""
    if fp8 is None:
        return F.linear(x, weight, bias)
    out = fp8_linear(x, weight, fp8)
    return out if bias is None else out + bias.to(out.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str = "llama",
             mean_square: torch.Tensor | None = None) -> torch.Tensor:
    """x / rms(x), weighted in the family's `style`. `mean_square` (fp32, [..., 1]): computed elsewhere, for a norm
    over a width that tensor parallelism splits (OLMo 2's q/k norms)."""
    x32 = x.float()
    if mean_square is None:
        mean_square = x32.pow(2).mean(-1, keepdim=True)
    return _APPLY_WEIGHT[style](x32 * torch.rsqrt(mean_square + eps), weight, x.dtype)


def norm_weight_init(size: int, style: str, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """The weight that leaves the input unscaled: 1, or 0 where the weight is applied as 1 + w."""
    return (torch.zeros if style == "zero-centered" else torch.ones)(size, dtype=dtype, device=device)


#: NORM_STYLES -> how the weight meets the normalised fp32 input (transformers' Llama, OLMo 2 and Gemma RMSNorms).
_APPLY_WEIGHT = {
    "llama": lambda x32, w, dtype: w * x32.to(dtype),
    "fp32-scale": lambda x32, w, dtype: (w * x32).to(dtype),
    "zero-centered": lambda x32, w, dtype: (x32 * (1.0 + w.float())).to(dtype),
}


@torch.library.custom_op("bridge::accumulate_weight_grad", mutates_args=("main_grad",))
def accumulate_weight_grad(main_grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """main_grad += grad_out^T x: the weight gradient of x W^T added into the gradient buffer by the GEMM itself
    (beta = 1). A custom op that declares its mutation, so torch.compile keeps it inside a layer's graph.

    An fp32 buffer with bf16 activations (the --bf16 default) takes cuBLAS's bf16 GEMM with an fp32 output, which
    accumulates into the buffer unrounded (Megatron's wgrad_gemm_accum_fp32). Off CUDA, where that kernel does not
    exist, the operands are widened to fp32 first: the same sum, computed slower."""
    a, b = grad_out.reshape(-1, grad_out.shape[-1]).t(), x.reshape(-1, x.shape[-1])
    if a.dtype == main_grad.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.is_cuda:
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)
    else:
        main_grad.addmm_(a.to(main_grad.dtype), b.to(main_grad.dtype))


class _LinearIntoMainGrad(torch.autograd.Function):
    """x W^T (+ b) whose backward adds W's gradient straight into `main_grad` and gives autograd none (Megatron's
    gradient-accumulation fusion): no separate pass that adds each micro-batch's gradient to the buffer.

    For weights the trainer marks (`fuse_wgrad_accumulation`: one data-parallel replica), without TP, where nothing
    else cuts the compiled layer's graph.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # noqa: ANN001
                main_grad: torch.Tensor) -> torch.Tensor:
        ctx.has_bias = bias is not None
        # not a saved tensor: the buffer's other views change it (one version counter per storage) before backward
        ctx.main_grad = main_grad
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        accumulate_weight_grad(ctx.main_grad, grad, x)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad.matmul(weight), None, grad_bias, None


def fuses_weight_grad(weight: torch.Tensor, group: Group, fp8: Any) -> bool:
    """Whether a linear layer's own weight takes the gradient-accumulation-fused path (see _LinearIntoMainGrad)."""
    return fp8 is None and C.group_size(group) == 1 and getattr(weight, "fuse_wgrad_accumulation", False)


class _ColumnParallelMatmul(torch.autograd.Function):
    """x W^T (+ b) for a column-parallel weight, with the backward's collectives overlapped (Megatron's
    LinearWithGradAccumulationAndAsyncCommunication).

    The input's gradient is a partial sum on each TP rank; its all-reduce (reduce-scatter under
    sequence parallelism) runs while the weight gradient is computed, which needs only local data.
    Under sequence parallelism the forward all-gathers the sequence and keeps only the local shard;
    the backward gathers it again while it computes the input's gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: Group,  # noqa: ANN001
                sequence_parallel: bool) -> torch.Tensor:
        ctx.group, ctx.sequence_parallel, ctx.has_bias = group, sequence_parallel, bias is not None
        ctx.save_for_backward(x, weight)
        total = C.all_gather(x, group, 0) if sequence_parallel else x
        return F.linear(total, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        gather = C.all_gather_async(x, ctx.group) if ctx.sequence_parallel else None
        grad_input = grad.matmul(weight)  # [s, b, in]: this rank's partial sum
        total = gather.wait() if gather is not None else x
        reduce = (C.reduce_scatter_async(grad_input, ctx.group) if ctx.sequence_parallel
                  else C.all_reduce_async(grad_input, ctx.group))
        grad_2d = grad.reshape(-1, grad.shape[-1])
        # a frozen weight (a LoRA base) needs no gradient: skip its GEMM
        grad_weight = grad_2d.t().matmul(total.reshape(-1, total.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_bias = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return reduce.wait(), grad_weight, grad_bias, None, None


@torch.compiler.disable
def column_parallel_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: Group,
                           sequence_parallel: bool) -> torch.Tensor:
    """[s(/tp), b, in] -> [s, b, out/tp]; kept out of torch.compile graphs (it holds asynchronous collectives)."""
    return _ColumnParallelMatmul.apply(x, weight, bias, group, sequence_parallel)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W split by rows over TP: [s, b, in] -> [s, b, out/tp].

    With `norm_eps` set, an RMSNorm with weight `layer_norm_weight` is applied first (TE's
    LayerNormColumnParallelLinear). With sequence parallelism the input is [s/tp, b, in] and is
    all-gathered along the sequence after the norm.
    """

    def __init__(self, in_features: int, out_features: int, *, tp: int, group: Group, bias: bool = False,
                 norm_eps: float | None = None, sequence_parallel: bool = False, skip_weight: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None, norm_style: str = "llama") -> None:
        super().__init__()
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by tp {tp}")
        self.group, self.sequence_parallel, self.norm_eps, self.norm_style = group, sequence_parallel, norm_eps, norm_style
        self.fp8: Any = None  # a torchao Float8LinearConfig when FP8 training converts this layer
        # skip_weight: the weight lives elsewhere and comes with forward() (tied output layer on one stage)
        self.weight = None if skip_weight else nn.Parameter(
            torch.empty(out_features // tp, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features // tp, dtype=dtype, device=device)) if bias else None
        if norm_eps is not None:
            self.layer_norm_weight = nn.Parameter(norm_weight_init(in_features, norm_style, dtype, device))
        if self.weight is not None:
            nn.init.normal_(self.weight, std=0.02)
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_eps is not None:
            x = rms_norm(x, self.layer_norm_weight, self.norm_eps, self.norm_style)
        out = self._project(x, weight)
        # a LoRA/DoRA adapter (bridge.nn.lora) sees what the matrix multiplies: the normed input, as peft's on q_proj
        return out if self.adapter is None else self.adapter(x, out, self.bias, self.weight)

    @property
    def plain_gemm(self) -> bool:
        """x W^T alone: no norm, bias, adapter or FP8 cast (what bridge.nn.linear_cross_entropy fuses with the loss)."""
        return self.norm_eps is None and self.bias is None and self.adapter is None and self.fp8 is None

    def _project(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        weight = self.weight if weight is None else weight  # `weight` given: the tied output layer's embedding
        if fuses_weight_grad(weight, self.group, self.fp8):
            return _LinearIntoMainGrad.apply(x, weight, self.bias, weight.main_grad)
        if self.fp8 is None and C.group_size(self.group) > 1:
            return column_parallel_matmul(x, weight, self.bias, self.group, self.sequence_parallel)
        if self.sequence_parallel:
            x = C.gather_from_sp(x, self.group)  # [s/tp, b, in] -> [s, b, in]
        else:
            x = C.copy_to_tp(x, self.group)
        return linear(x, weight, self.bias, self.fp8)  # [s, b, out/tp]


class TENorm(TEExtraState, RMSNorm):
    """TE spec's stand-alone `TENorm` (MoE layers' pre_mlp_layernorm, MLA's input_layernorm, the post-norm of
    Megatron-Bridge's TERowParallelLinearLayerNorm): has `_extra_state`."""


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b) with W split by columns over TP: [s, b, in/tp] -> [s, b, out], summed over TP.

    With sequence parallelism the sum is a reduce-scatter and the output is [s/tp, b, out]. The
    bias (replicated) is added after the reduction.
    """

    post_norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, in_features: int, out_features: int, *, tp: int, group: Group, bias: bool = False,
                 sequence_parallel: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, post_norm: tuple[float, str] | None = None) -> None:
        super().__init__()
        # post_norm (eps, style): an RMSNorm on the summed output, `post_layernorm` (Megatron-Bridge's
        # TERowParallelLinearLayerNorm for Gemma): a norm after attention or the MLP, before the residual add
        self.post_layernorm = None if post_norm is None else self.post_norm_class(
            out_features, post_norm[0], dtype=dtype, device=device, style=post_norm[1])
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by tp {tp}")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.fp8: Any = None  # a torchao Float8LinearConfig when FP8 training converts this layer
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._project(x)
        if self.adapter is not None:  # LoRA (bridge.nn.lora), on the matrix's output as peft's on o_proj/down_proj
            out = self.adapter(x, out, self.bias, self.weight)
        return out if self.post_layernorm is None else self.post_layernorm(out)  # after the adapter, as in HF

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if fuses_weight_grad(self.weight, self.group, self.fp8):
            return _LinearIntoMainGrad.apply(x, self.weight, self.bias, self.weight.main_grad)  # TP = 1: no sum
        partial = linear(x, self.weight, None, self.fp8)  # [s, b, out], this rank's share of the sum
        out = C.reduce_scatter_to_sp(partial, self.group) if self.sequence_parallel else C.reduce_from_tp(partial, self.group)
        return out if self.bias is None else out + self.bias


class TEColumnParallelLinear(TEExtraState, ColumnParallelLinear):
    """TE spec's `TELayerNormColumnParallelLinear` / `TEColumnParallelLinear`: same maths, plus `_extra_state`."""


class TERowParallelLinear(TEExtraState, RowParallelLinear):
    """TE spec's `TERowParallelLinear` (with a post-norm: Megatron-Bridge's TERowParallelLinearLayerNorm)."""

    post_norm_class = TENorm


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    """Embedding lookup whose backward adds each token's gradient row into the fp32 `main_grad` (a sorted,
    deterministic scatter-add) and gives autograd none: the dense [V/tp, h] gradient that F.embedding's backward
    writes, and the pass adding it to the buffer, are never made. For weights the trainer marks
    (`fuse_wgrad_accumulation`, see _LinearIntoMainGrad)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, weight: torch.Tensor, main_grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.main_grad = main_grad  # not saved: other views of the buffer change it before backward
        ctx.save_for_backward(local)
        return F.embedding(local, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (local,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]).to(ctx.main_grad.dtype)
        ctx.main_grad.index_put_((local.reshape(-1),), rows, accumulate=True)
        return None, None, None


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split over TP: tokens [b, s] -> [s, b, h].

    Each rank looks up the tokens in its row range, zeroes the others and the ranks sum (or
    reduce-scatter along the sequence with sequence parallelism).
    """

    def __init__(self, padded_vocab: int, hidden: int, *, tp: int, tp_rank: int, group: Group,
                 sequence_parallel: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        per_rank = padded_vocab // tp
        self.start, self.end = tp_rank * per_rank, (tp_rank + 1) * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, hidden, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.start) | (tokens >= self.end)
        local = (tokens - self.start).masked_fill(outside, 0)
        main_grad = getattr(self.weight, "main_grad", None)
        if (getattr(self.weight, "fuse_wgrad_accumulation", False) and self.weight.requires_grad
                and main_grad.dtype == torch.float32):
            emb = _EmbeddingIntoMainGrad.apply(local, self.weight, main_grad)
        else:
            emb = F.embedding(local, self.weight)
        emb = emb.masked_fill(outside.unsqueeze(-1), 0.0)  # [b, s, h]
        emb = emb.transpose(0, 1).contiguous()  # [s, b, h]
        return C.reduce_scatter_to_sp(emb, self.group) if self.sequence_parallel else C.reduce_from_tp(emb, self.group)
