"""Autograd collectives and vocab-parallel cross entropy on a spawned 2-rank gloo group, against one-process maths."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bridge.launch import launch


def _check_collectives() -> dict[str, float]:
    """Each collective's forward and backward vs the unsharded computation; returns max errors."""
    import torch.distributed as dist

    from bridge.nn.cross_entropy import vocab_parallel_cross_entropy
    from bridge.nn.linear_cross_entropy import linear_cross_entropy
    from bridge.parallel import collectives as C

    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same full tensors on every rank
    full = torch.randn(4, 3, 6)  # [s, b, h]
    err: dict[str, float] = {}

    x = full.clone().requires_grad_()
    y = C.gather_from_tp(C.scatter_to_tp(x, group), group)  # split then gather: identity, grads too
    (y * full).sum().backward()
    err["scatter_gather_tp"] = max((y - full).abs().max().item(), (x.grad - full).abs().max().item())

    logits = torch.randn(1, 5, 8)  # [b=1, s, V]: a leading 1 once broke the functional all-gather along -1
    err["gather_tp_batch1"] = (C.gather_from_tp(logits.chunk(world, -1)[rank], group) - logits).abs().max().item()

    x = full.clone().requires_grad_()
    y = C.reduce_from_tp(C.copy_to_tp(x, group) * (rank + 1), group)  # sum_r (r+1) x
    y.sum().backward()
    scale = world * (world + 1) / 2
    err["copy_reduce_tp"] = max((y - scale * full).abs().max().item(), (x.grad - scale).abs().max().item())

    x = full.clone().requires_grad_()
    local = C.scatter_to_sp(x, group)  # [s/tp, b, h]
    y = C.gather_from_sp(local, group, tensor_parallel_output_grad=False)
    (y * full).sum().backward()
    err["scatter_gather_sp"] = max((y - full).abs().max().item(), (x.grad - full).abs().max().item())

    x = full.clone().requires_grad_()
    y = C.reduce_scatter_to_sp(x, group)  # [s/tp, b, h] = (world * full)[my slice]
    expected = (world * full).chunk(world)[rank]
    y.sum().backward()
    err["reduce_scatter_sp"] = max((y - expected).abs().max().item(), (x.grad - 1).abs().max().item())

    logits = torch.randn(5, 2, 8)  # [s, b, V] with V padded from 7
    target = torch.randint(0, 7, (5, 2))
    for vocab in (None, 7):
        ref_logits = logits.clone().requires_grad_()
        masked = ref_logits if vocab is None else ref_logits.masked_fill(torch.arange(8) >= vocab, float("-inf"))
        ref = F.cross_entropy(masked.reshape(-1, 8), target.reshape(-1), reduction="none").view(5, 2)
        ref.sum().backward()
        shard = logits.chunk(world, -1)[rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, target, group, rank * 8 // world, vocab)
        loss.sum().backward()
        grad_ref = ref_logits.grad.chunk(world, -1)[rank]
        err[f"cross_entropy_{vocab}"] = max((loss - ref).abs().max().item(), (shard.grad - grad_ref).abs().max().item())

    # the output layer fused with the loss over vocabulary shards, in chunks of 3 tokens: the hidden's gradient is
    # this rank's partial sum (the model's copy_to_tp all-reduces it), the weight's its vocabulary rows'
    hidden, weight = torch.randn(5, 2, 6), torch.randn(8, 6)
    weights = torch.rand(5, 2)
    for vocab in (None, 7):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = F.linear(h, w)
        masked = logits if vocab is None else logits.masked_fill(torch.arange(8) >= vocab, float("-inf"))
        ref = (F.cross_entropy(masked.reshape(-1, 8), target.reshape(-1), reduction="none") * weights.reshape(-1)).sum()
        ref.backward()
        mine_h, mine_w = hidden.clone().requires_grad_(), weight.chunk(world)[rank].clone().requires_grad_()
        loss = linear_cross_entropy(mine_h, mine_w, target, weights, group, rank * 8 // world, vocab, rows=3)
        loss.backward()
        dh = mine_h.grad.clone()
        dist.all_reduce(dh, group=group)
        err[f"linear_cross_entropy_{vocab}"] = max(abs(loss.item() - ref.item()), (dh - h.grad).abs().max().item(),
                                                   (mine_w.grad - w.grad.chunk(world)[rank]).abs().max().item())
    return err


def test_collectives_and_cross_entropy_match_unsharded_maths() -> None:
    for rank, errors in enumerate(launch(_check_collectives, 2)):
        for name, value in errors.items():
            assert value < 1e-5, f"rank {rank}: {name} off by {value}"


def _compiled_against_eager() -> dict[str, float]:
    """Each autograd collective inside a torch.compile'd function vs eager: max error of the output and of the
    input's gradient (torch 2.11 compiled in-place c10d calls inside an autograd.Function to zero gradients)."""
    import torch.distributed as dist

    from bridge.parallel import collectives as C

    group, world = dist.group.WORLD, dist.get_world_size()
    ops = {"copy_to_tp": C.copy_to_tp, "reduce_from_tp": C.reduce_from_tp, "gather_from_tp": C.gather_from_tp,
           "scatter_to_tp": C.scatter_to_tp, "scatter_to_sp": C.scatter_to_sp, "gather_from_sp": C.gather_from_sp,
           "reduce_scatter_to_sp": C.reduce_scatter_to_sp,
           "all_to_all": lambda x, g: C.all_to_all(x, g, [4 // world] * world, [4 // world] * world)}
    torch.manual_seed(dist.get_rank())  # different inputs per rank: a wrong exchange shows
    err = {}
    for name, op in ops.items():
        x = torch.randn(4, 2, 6)

        def f(x: torch.Tensor, op=op) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
            y = op(x * 2, group)
            return y, (y * torch.arange(y.numel()).view(y.shape)).sum()

        results = []
        for fn in (f, torch.compile(f, fullgraph=False)):
            leaf = x.clone().requires_grad_()
            y, loss = fn(leaf)
            loss.backward()
            results.append((y.detach(), leaf.grad))
        (y_eager, g_eager), (y_comp, g_comp) = results
        assert g_eager.abs().max() > 0, name
        err[name] = max((y_comp - y_eager).abs().max().item(), (g_comp - g_eager).abs().max().item())
    return err


def test_collectives_compile_to_their_eager_gradients() -> None:
    """The TP/SP/a2a collectives run inside torch.compile'd layers: compiled, they compute eager's outputs and
    gradients (not zeros, as torch 2.11 made of the in-place c10d calls these once were)."""
    for err in launch(_compiled_against_eager, 2):
        assert max(err.values()) < 1e-5, err


def test_collectives_are_identities_without_a_group() -> None:
    from bridge.parallel import collectives as C

    x = torch.randn(4, 2, 3)
    for op in (C.copy_to_tp, C.reduce_from_tp, C.gather_from_tp, C.scatter_to_tp, C.scatter_to_sp,
               C.gather_from_sp, C.reduce_scatter_to_sp):
        assert op(x, None) is x


def test_cross_entropy_with_weighted_tokens_and_bf16_logits_matches_torch() -> None:
    """Per-token loss weights (a loss mask) and bf16 logits: the recomputing backward gives torch's gradient."""
    from bridge.nn.cross_entropy import vocab_parallel_cross_entropy

    torch.manual_seed(1)
    logits = (3 * torch.randn(6, 2, 40)).to(torch.bfloat16)  # [s, b, V_pad], V = 37
    target = torch.randint(0, 37, (6, 2))
    weight = torch.rand(6, 2) * (torch.rand(6, 2) > 0.3)
    ref_logits = logits.float().requires_grad_()
    masked = ref_logits.masked_fill(torch.arange(40) >= 37, float("-inf"))
    ref = F.cross_entropy(masked.reshape(-1, 40), target.reshape(-1), reduction="none").view(6, 2)
    (ref * weight).sum().backward()
    mine = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(mine, target, None, 0, 37)
    (loss * weight).sum().backward()
    assert loss.dtype == torch.float32 and mine.grad.dtype == torch.bfloat16
    assert (loss - ref).abs().max().item() < 1e-5
    assert (mine.grad.float() - ref_logits.grad).abs().max().item() < 1e-2  # bf16 rounding of the gradient
    assert mine.grad[..., 37:].abs().max().item() == 0.0  # padded rows get no gradient
