"""Mixture-of-Experts layer under Megatron Core's names: `router`, `experts` (SequentialMLP or TEGroupedMLP
names), `shared_experts`. Dropless top-k routing, EP all-to-all dispatch, experts as one batched GEMM.

Routing (Megatron's TopKRouter, matching transformers for each family):
- softmax, `pre_softmax=False`: top-k of the logits, softmax over those k (= renormalised; Mixtral, Qwen3-MoE);
- softmax, `pre_softmax=True`: softmax over all, then top-k (Qwen2-MoE with norm_topk_prob=false);
- sigmoid (DeepSeek-V3): scores + `expert_bias` choose (group-limited: best groups by the sum of their top-2
  scores, as transformers' DeepseekV3TopkRouter), weights are the unbiased scores, optionally renormalised,
  times `topk_scaling_factor`.
Router logits may have a bias (GPT-OSS). Experts apply their layer's gated activation (bridge.nn.activations: GPT-OSS's
clamped quick-GELU with its offset) and may have biases: fc1's split like its rows, fc2's added by TP rank 0 only.
Expert tensor parallelism equals TP here (each rank holds [gate_r; up_r] / fc2 columns of every local
expert); expert outputs are summed over TP before they are weighted, so router gradients are complete.
With sequence parallelism each TP rank routes its own sequence shard (the router weight's gradient is then summed
over TP, like a norm's); the routed tokens and their choices are all-gathered over TP, since every TP rank computes
its slice of every expert for all of them, and the experts' partial sums are reduce-scattered back to the shards
(Megatron's all-to-all dispatcher does the same around its expert-parallel exchange).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bridge.config import LLAMA_LAYER, LayerSpec, ModelConfig, MoEConfig
from bridge.nn.activations import gated
from bridge.nn.layers import (ColumnParallelLinear, RowParallelLinear, TEColumnParallelLinear, TEExtraState,
                              TERowParallelLinear)
from bridge.parallel import collectives as C
from bridge.parallel.moe_dispatch import Dispatch
from bridge.parallel.state import ParallelState


class Router(nn.Module):
    """`weight` [E, h], `bias` [E] (GPT-OSS: in the logits); `expert_bias` [E] (fp32 buffer, DeepSeek's score
    correction, updated outside autograd)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, *, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, cfg.hidden_size, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)
        self.bias = (nn.Parameter(torch.zeros(moe.num_experts, dtype=dtype, device=device)) if cfg.add_bias_linear
                     else None)
        if moe.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32, device=device))
            self.register_buffer("local_tokens_per_expert", torch.zeros(moe.num_experts, device=device), persistent=False)
        else:
            self.expert_bias = None

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [T, h] -> (weights [T, k], experts [T, k], logits [T, E])."""
        logits = F.linear(tokens, self.weight, self.bias)  # [T, E]
        moe, k = self.moe, self.moe.router_topk
        if moe.score_function == "softmax":
            if moe.pre_softmax:
                weights, experts = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
            else:
                top, experts = logits.topk(k, dim=-1)
                weights = torch.softmax(top.float(), dim=-1)
        else:
            scores = torch.sigmoid(logits.float())
            choice = scores if self.expert_bias is None else scores + self.expert_bias
            if moe.num_groups and moe.group_topk:
                choice = _group_limited(choice, moe.num_groups, moe.group_topk)
            experts = choice.topk(k, dim=-1).indices
            weights = scores.gather(1, experts)
            if moe.normalize_topk:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if moe.topk_scaling_factor:
            weights = weights * moe.topk_scaling_factor
        return weights.to(tokens.dtype), experts, logits


def _group_limited(choice: torch.Tensor, groups: int, keep: int) -> torch.Tensor:
    """Mask all experts outside the `keep` groups with the best top-2 sums."""
    t, e = choice.shape
    group_scores = choice.view(t, groups, e // groups).topk(min(2, e // groups), dim=-1).values.sum(-1)  # [T, G]
    best = group_scores.topk(keep, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return choice.masked_fill(~mask.repeat_interleave(e // groups, dim=1), float("-inf"))


class _ExpertLinear(nn.Module):
    def __init__(self, rows: int, cols: int, bias: bool, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(rows, dtype=dtype, device=device)) if bias else None
        self.adapter: nn.Module | None = None  # LoRA (bridge.nn.lora), applied in Experts.forward


class _TEExpertLinear(TEExtraState, _ExpertLinear):
    pass


class _ExpertMLP(nn.Module):
    def __init__(self, h: int, f: int, te: bool, bias: bool, dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        linear = _TEExpertLinear if te else _ExpertLinear
        self.linear_fc1, self.linear_fc2 = linear(2 * f, h, bias, dtype, device), linear(h, f, bias, dtype, device)


class _GroupedLinear(TEExtraState, nn.Module):
    """TEGroupedLinear's names: `weight0`, `weight1`, ... (and `bias0`, ... with biases) plus one `_extra_state`."""

    def __init__(self, n: int, rows: int, cols: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | None) -> None:
        super().__init__()
        self.n = n
        for j in range(n):
            self.register_parameter(f"weight{j}", nn.Parameter(torch.randn(rows, cols, dtype=dtype, device=device) * 0.02))
        for j in range(n if bias else 0):
            self.register_parameter(f"bias{j}", nn.Parameter(torch.zeros(rows, dtype=dtype, device=device)))

    def stacked(self, name: str = "weight") -> torch.Tensor:
        return torch.stack([getattr(self, f"{name}{j}") for j in range(self.n)])


class _OnOneRank(torch.autograd.Function):
    """The experts' fc2 bias, added by one TP rank only: the experts' outputs are partial sums that are summed over TP
    next, and the bias must count once. Its gradient is the same on every TP rank (the sum's gradient reaches each
    rank whole), so every rank gets it, as a replicated parameter's must be."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, add: bool) -> torch.Tensor:  # noqa: ANN001
        return bias.clone() if add else torch.zeros_like(bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None


class Experts(nn.Module):
    """This rank's E/EP experts (FFN split over TP): rows grouped by local expert -> one padded batched GEMM pair."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, ps: ParallelState, *, te: bool, grouped: bool,
                 dtype: torch.dtype, device: torch.device | None, spec: LayerSpec = LLAMA_LAYER) -> None:
        super().__init__()
        n, h, f = moe.num_experts // ps.layout.ep, cfg.hidden_size, moe.moe_ffn_hidden_size // ps.tp
        self.grouped, self.spec, self.biased, self.adds_fc2_bias = grouped, spec, cfg.add_bias_linear, ps.tp_rank == 0
        if grouped:
            self.linear_fc1 = _GroupedLinear(n, 2 * f, h, self.biased, dtype, device)
            self.linear_fc2 = _GroupedLinear(n, h, f, self.biased, dtype, device)
        else:
            self.local_experts = nn.ModuleList(_ExpertMLP(h, f, te, self.biased, dtype, device) for _ in range(n))
        for param in self.parameters():
            param.allreduce = False  # Megatron's mark: reduced over the expert-data-parallel group, not DP

    def weights(self, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
        """fc1's and fc2's weights (or biases) of every local expert, stacked."""
        if self.grouped:
            return self.linear_fc1.stacked(name), self.linear_fc2.stacked(name)
        return (torch.stack([getattr(e.linear_fc1, name) for e in self.local_experts]),
                torch.stack([getattr(e.linear_fc2, name) for e in self.local_experts]))

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, h] grouped by local expert, counts [n] -> [N, h] (this TP rank's partial sum)."""
        fc1, fc2 = self.weights()  # [n, 2F/tp, h], [n, h, F/tp]
        n, cap = fc1.shape[0], int(counts.max()) if counts.numel() else 0
        expert = torch.repeat_interleave(torch.arange(n, device=rows.device), counts)  # [N]
        slot = torch.arange(rows.shape[0], device=rows.device) - (torch.cumsum(counts, 0) - counts)[expert]
        padded = rows.new_zeros(n, max(cap, 1), rows.shape[1])
        padded = padded.index_put((expert, slot), rows)  # [n, cap, h]
        fc1_bias, fc2_bias = self.weights("bias") if self.biased else (None, None)  # [n, 2F/tp], [n, h]
        h1 = torch.bmm(padded, fc1.transpose(1, 2))  # [n, cap, 2F/tp]
        h1 = h1 if fc1_bias is None else h1 + fc1_bias[:, None]
        gate, up = self._adapted(padded, h1, "linear_fc1").chunk(2, dim=-1)
        hidden = gated(gate, up, self.spec)  # [n, cap, F/tp]
        out = self._adapted(hidden, torch.bmm(hidden, fc2.transpose(1, 2)), "linear_fc2")  # [n, cap, h]
        if fc2_bias is not None:
            out = out + _OnOneRank.apply(fc2_bias, self.adds_fc2_bias)[:, None]
        return out[expert, slot]

    def _adapted(self, x: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        """`out` plus each local expert's LoRA, scaling B_e A_e x, where bridge.nn.lora adapted the experts' `name`
        linears: x [n, cap, in] -> [n, cap, out] (padding rows are zero, so is their delta)."""
        if self.grouped or getattr(self.local_experts[0], name).adapter is None:
            return out
        adapters = [getattr(e, name).adapter for e in self.local_experts]
        a = torch.stack([ad.linear_in.weight for ad in adapters])  # [n, r, in]
        b = torch.stack([ad.linear_out.weight for ad in adapters])  # [n, out, r]
        delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        return out + delta.to(out.dtype) * adapters[0].scaling


class SharedExperts(nn.Module):
    """An always-on SwiGLU MLP next to the routed experts; Qwen2-MoE gates it with sigmoid(x . gate_weight)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, ps: ParallelState, *, te: bool, sequence_parallel: bool,
                 dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        column, row = (TEColumnParallelLinear, TERowParallelLinear) if te else (ColumnParallelLinear, RowParallelLinear)
        common = dict(tp=ps.tp, group=ps.tp_group, sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        self.linear_fc1 = column(cfg.hidden_size, 2 * moe.shared_expert_ffn_hidden_size, **common)
        self.linear_fc2 = row(moe.shared_expert_ffn_hidden_size, cfg.hidden_size, **common)
        self.gate_weight = nn.Parameter(torch.zeros(1, cfg.hidden_size, dtype=dtype, device=device)) if moe.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        out = self.linear_fc2(F.silu(gate) * up)
        return out if self.gate_weight is None else torch.sigmoid(F.linear(x, self.gate_weight)) * out


class MoELayer(nn.Module):
    """Megatron's `MoELayer` (the layer's `mlp`): router -> dispatch -> experts -> combine (+ shared experts)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, *, te: bool, sequence_parallel: bool, dtype: torch.dtype,
                 device: torch.device | None, spec: LayerSpec = LLAMA_LAYER) -> None:
        super().__init__()
        moe = cfg.moe
        self.moe, self.ps = moe, ps
        self.sequence_parallel = sequence_parallel and ps.tp > 1
        self.router = Router(cfg, moe, dtype=dtype, device=device)
        self.experts = Experts(cfg, moe, ps, te=te, grouped=ps.layout.moe_grouped_gemm, dtype=dtype, device=device,
                               spec=spec)
        self.shared_experts = (SharedExperts(cfg, moe, ps, te=te, sequence_parallel=sequence_parallel, dtype=dtype,
                                             device=device) if moe.shared_expert_ffn_hidden_size else None)
        self.aux_loss_scale = 1.0
        """Gradient scale of the aux loss (Megatron's MoEAuxLossAutoScaler): the trainer sets 1/micro-batches per
        global batch, so the aux loss is averaged like the language-model loss."""
        self.aux_loss_sum: torch.Tensor | float = 0.0
        """Sum of this layer's coefficient-weighted aux losses (unscaled) since the trainer last read it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape  # [s(/tp), b, h]
        tokens = x.reshape(-1, h)
        weights, experts, logits = self.router(tokens)  # this rank's tokens (its sequence shard under SP)
        group = self.ps.tp_group
        if self.sequence_parallel:  # every TP rank computes its slice of the experts for the whole TP sequence
            routed, experts = C.gather_from_sp(tokens, group), C.all_gather(experts, group, 0)
        else:
            routed = C.copy_to_tp(tokens, group)
        plan = Dispatch(experts, self.moe.num_experts, self.ps.layout.ep, self.ps.ep_group)
        if self.training and torch.is_grad_enabled():
            weights = self._aux_loss(weights, plan.counts, experts.numel(), logits)
        rows = plan.forward(routed, self.moe.router_topk)
        out = plan.backward(self.experts(rows, plan.local_counts))  # [T*k, h] partial over TP
        out = C.reduce_scatter_to_sp(out, group) if self.sequence_parallel else C.reduce_from_tp(out, group)
        y = (out.view(-1, self.moe.router_topk, h) * weights.unsqueeze(-1)).sum(1).view(s, b, h)
        return y if self.shared_experts is None else y + self.shared_experts(x)

    def _aux_loss(self, weights: torch.Tensor, counts: torch.Tensor, assignments: int,
                  logits: torch.Tensor) -> torch.Tensor:
        """Switch-style load-balancing loss (coeff * E * sum f_i P_i), injected into the backward pass.
        `counts` [E]: tokens per expert of the dispatch plan (under SP already those of the whole TP sequence);
        `assignments`: the plan's tokens x top-k; `logits`: this rank's tokens only.

        Under CP (and SP) a sequence's tokens are spread over the CP (and TP) group, so, as Megatron-LM does over
        TP x CP, the counts f_i cover the whole sequence (summed over CP here, gathered over TP by the dispatch) and
        each rank adds its tokens' share of P_i: the ranks' losses then sum to the whole sequence's, and so do their
        gradients (summed over DP x CP like every other gradient, and over TP like the router's under SP)."""
        counts = counts.float()
        if self.router.expert_bias is not None:
            self.router.local_tokens_per_expert += counts.detach()
        if not self.moe.aux_loss_coeff:
            return weights
        probs = torch.softmax(logits.float(), -1) if self.moe.score_function == "softmax" else torch.sigmoid(logits.float())
        cp = self.ps.cp
        if cp > 1:
            counts = C.all_reduce(counts, self.ps.cp_group)
        f = counts / (assignments * cp)
        shards = cp * (self.ps.tp if self.sequence_parallel else 1)
        p = probs.sum(0) / (probs.shape[0] * shards)  # this rank's share of the sequence's mean router probability
        aux = self.moe.aux_loss_coeff * self.moe.num_experts * (f * p).sum()
        self.aux_loss_sum = self.aux_loss_sum + aux.detach()  # a tensor: no device sync per layer
        return _AuxLoss.apply(weights, aux * self.aux_loss_scale)


class _AuxLoss(torch.autograd.Function):
    """Identity on `x`; backward adds d(aux)/d(params) with grad 1 (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float = 1e-3, group=None) -> None:  # noqa: ANN001
    """DeepSeek's auxiliary-loss-free balancing: bias += rate * sign(mean load - load), then reset the counts."""
    import torch.distributed as dist

    for module in model.modules():
        if isinstance(module, Router) and module.expert_bias is not None:
            load = module.local_tokens_per_expert
            if group is not None:
                dist.all_reduce(load, group=group)
            module.expert_bias += rate * torch.sign(load.mean() - load)
            load.zero_()
