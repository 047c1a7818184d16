"""bridge.nn under real process groups: TP (+SP) gradients equal the TP=1 model's, tied embeddings stay in sync.

What the trainer builds on: backward through the column/row-parallel layers, vocab-parallel embedding
and cross entropy gives the TP=1 gradients, sharded the same way as the weights.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bridge.api import import_hf
from bridge.launch import launch
from bridge.layout import ParallelLayout
from tests.model_fixtures import rank_model

pytestmark = pytest.mark.slow


def _grads(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Loss and grads at TP=2 (with and without SP) vs the TP=1 model run on the same rank, per checkpoint pair."""
    errors: dict[str, float] = {}
    for ckpt_tp1, ckpt_tp2 in pairs:
        errors.update({f"{Path(ckpt_tp2).name}:{k}": v for k, v in _pair_grads(ckpt_tp1, ckpt_tp2).items()})
    return errors


def _pair_grads(ckpt_tp1: str, ckpt_tp2: str) -> dict[str, float]:
    from bridge.nn import allreduce_tp_partial_grads
    from bridge.sharding import rule_for, split

    tokens = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    # padded vocab differs (384 at TP=1, 512 at TP=2): mask it so both compute HF's loss
    _, (ref,) = rank_model(ckpt_tp1, 2, mask_padded_vocab=True)  # TP=1 layout in a world of 2: dp=2, each rank a full replica
    ref_loss = ref(tokens[:, :-1], labels=tokens[:, 1:])
    ref_loss.sum().backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    errors = {}
    for sp in (False, True):
        ps, (model,) = rank_model(ckpt_tp2, 2, sequence_parallel=sp, mask_padded_vocab=True)
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.sum().backward()
        allreduce_tp_partial_grads([model])
        errors[f"loss_sp{sp}"] = (loss - ref_loss).abs().max().item()
        padded = ps.layout.padded_vocab_size(300)
        for name, param in model.named_parameters():
            key = name if name != "output_layer.weight" or "output_layer.weight" in ref_grads else "embedding.word_embeddings.weight"
            full = ref_grads[key]
            expected = split(full, rule_for(name), 2, padded)[ps.tp_rank]
            errors[f"{name}_sp{sp}"] = (param.grad - expected).abs().max().item()
    return errors


def test_tp2_gradients_equal_tp1_gradients(tiny_hf, tmp_path: Path) -> None:
    pairs = []
    for name in ("Qwen--Qwen2.5-7B", "Qwen--Qwen3-0.6B"):  # qkv bias, untied; qk-norm, tied
        hf = tiny_hf(name)
        pairs.append((str(import_hf(hf, tmp_path / f"{name}-tp1", ParallelLayout())),
                      str(import_hf(hf, tmp_path / f"{name}-tp2", ParallelLayout(tp=2)))))
    for rank, errors in enumerate(launch(_grads, 2, pairs)):
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, f"rank {rank}: {worst} off by {errors[worst]}"
        assert len(errors) > 40


def _tied(ckpt: str) -> list[float]:
    import torch.distributed as dist

    from bridge.nn import allreduce_tied_embedding_grads, sync_tied_embeddings

    ps, chunks = rank_model(ckpt, 2)
    weight = chunks[0].embedding.word_embeddings.weight if ps.is_first_stage else chunks[-1].output_layer.weight
    with torch.no_grad():
        weight.add_(torch.randn_like(weight) * (ps.pp_rank + 1))  # the copies drift apart
    sync_tied_embeddings(chunks)
    other = [torch.empty_like(weight) for _ in range(2)]
    dist.all_gather(other, weight.detach(), group=ps.embedding_group)
    weight.grad = torch.full_like(weight, float(ps.pp_rank + 1))
    allreduce_tied_embedding_grads(chunks)
    return [(other[0] - other[1]).abs().max().item(), (weight.grad - 3.0).abs().max().item()]


def test_tied_embedding_copies_synced_across_first_and_last_stage(tiny_hf, tmp_path: Path) -> None:
    hf = tiny_hf("llama32-tied")
    ckpt = import_hf(hf, tmp_path / "pp2", ParallelLayout(pp=2, vpp=2))
    for weights_diff, grad_diff in launch(_tied, 2, str(ckpt)):
        assert weights_diff == 0.0 and grad_diff == 0.0
