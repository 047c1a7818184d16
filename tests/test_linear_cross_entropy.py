"""The output layer and cross entropy fused over chunks of tokens (bridge.nn.linear_cross_entropy) against autograd
through torch's own F.linear and F.cross_entropy; its TP form is checked in test_parallel_collectives."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bridge.nn import linear_cross_entropy as lce
from bridge.nn.linear_cross_entropy import linear_cross_entropy

S, B, H, V = 6, 2, 8, 24  # 12 tokens; V padded from VOCAB
VOCAB = 21


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, B, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    target = torch.randint(0, VOCAB, (S, B), generator=g)
    weights = torch.rand(S, B, generator=g) * (torch.rand(S, B, generator=g) > 0.3)
    return hidden, weight, target, weights


def _reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
               vocab: int | None, cap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In fp64 from the same values."""
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = F.linear(h, w)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    if vocab is not None:
        logits = logits[..., :vocab]
    loss = (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            * weights.reshape(-1).double()).sum()
    loss.backward()
    return loss.detach(), h.grad.float(), w.grad.float()


@pytest.mark.parametrize("rows", [1, 5, 12])
@pytest.mark.parametrize("vocab,cap", [(None, None), (VOCAB, None), (VOCAB, 2.0)])
def test_loss_and_gradients_match_autograd(rows: int, vocab: int | None, cap: float | None) -> None:
    """Every chunking (one row, uneven, all at once), with the padded rows in or out of the softmax and a softcap."""
    hidden, weight, target, weights = _inputs()
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, target, weights, vocab, cap)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, target, weights, None, 0, vocab, cap, rows=rows)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-6 * abs(ref_loss.item())
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-5, atol=1e-6)


def test_weight_gradient_goes_into_the_fused_buffer_and_a_scaled_loss_is_refused() -> None:
    """Where the trainer fuses gradient accumulation the weight gradient is added to main_grad (not replacing what
    is there) and autograd gets none; differentiating anything but the loss itself fails instead of training wrong."""
    hidden, weight, target, weights = _inputs()
    _, ref_dh, ref_dw = _reference(hidden, weight, target, weights, VOCAB, None)
    w = weight.clone().requires_grad_()
    w.fuse_wgrad_accumulation = True
    w.main_grad = torch.full_like(weight, 0.5)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, w, target, weights, None, 0, VOCAB, rows=5).backward()
    assert w.grad is None
    torch.testing.assert_close(w.main_grad, ref_dw + 0.5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="scaled after the forward"):
        (2 * linear_cross_entropy(h, w, target, weights, None, 0, VOCAB)).backward()


def test_a_scaled_loss_scales_the_returned_gradients() -> None:
    hidden, weight, target, weights = _inputs()
    _, ref_dh, ref_dw = _reference(hidden, weight, target, weights, None, None)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (3 * linear_cross_entropy(h, w, target, weights, None, 0, rows=4)).backward()
    torch.testing.assert_close(h.grad, 3 * ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, 3 * ref_dw, rtol=1e-5, atol=1e-6)


def test_chunks_split_the_tokens_evenly_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lce, "CHUNK_LOGITS", 1000)
    assert lce.chunk_rows(8192, 100) == 8  # 1024 chunks of 8 rows: 800 logits each
    assert lce.chunk_rows(12, 1000) == 1
    assert lce.chunk_rows(12, 400) == 2  # 3 rows would be 1200 logits; 12 % 5 != 0, so 6 chunks of 2
    assert lce.chunk_rows(7, 10) == 7


def _rss(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))


def _peak_above_start(fn) -> int:  # noqa: ANN001
    Path("/proc/self/clear_refs").write_text("5\n")  # VmHWM := VmRSS
    start = _rss("VmRSS:")
    fn()
    return _rss("VmHWM:") - start


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_the_logits_never_exist_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward and backward with 256 MiB of fp32 logits raises the peak RSS by a chunk's temporaries, not by the
    logits: under a third of what the unfused path (logits kept for backward, then their gradient) takes."""
    monkeypatch.setattr(lce, "CHUNK_LOGITS", 2**21)  # 8 MiB of fp32 logits per chunk
    tokens, h, v = 2048, 64, 32768
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, 1, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.02).requires_grad_()
    target = torch.randint(0, v, (tokens, 1), generator=g)
    weights = torch.full((tokens, 1), 1.0 / tokens)

    def unfused() -> None:
        from bridge.nn.cross_entropy import vocab_parallel_cross_entropy
        loss = (vocab_parallel_cross_entropy(F.linear(hidden, weight), target, None, 0) * weights).sum()
        loss.backward()

    def fused() -> None:
        linear_cross_entropy(hidden, weight, target, weights, None, 0).backward()

    logits_bytes = tokens * v * 4
    base = _peak_above_start(unfused)
    hidden.grad = weight.grad = None
    ours = _peak_above_start(fused)
    assert base > logits_bytes, f"the unfused path peaked {base / 2**20:.0f} MiB above its start"
    assert ours < base / 3, f"fused {ours / 2**20:.0f} MiB against {base / 2**20:.0f} MiB unfused"
