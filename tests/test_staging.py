"""Host staging for async saves: kept copies hold the values at the save even as training goes on, and later saves
reuse the first save's (pinned, on CUDA) buffers instead of allocating more host memory."""
from __future__ import annotations

import pytest
import torch

from bridge.training.staging import HostStager

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def _save(stager: HostStager, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stage `tensors` as an async save does, then change them as the next optimizer step would."""
    expected = [t.clone() for t in tensors]
    stager.begin_kept()
    kept = [stager.host(t, keep=True) for t in tensors]
    ready = stager.kept_ready()
    for t in tensors:
        t.mul_(-3.0).add_(1.0)
    if ready is not None:
        ready.synchronize()
    return kept, expected


@pytest.mark.parametrize("device", DEVICES)
def test_kept_copies_hold_the_saved_values_and_reuse_their_buffers(device: str) -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(shape, device=device, dtype=dtype) for shape, dtype in
               (((64, 33), torch.float32), ((1000,), torch.bfloat16), ((7, 5, 3), torch.float32))]
    stager = HostStager(torch.device(device))
    first, expected = _save(stager, tensors)
    assert all(k.device.type == "cpu" and torch.equal(k, e) for k, e in zip(first, expected))
    kept_after_first = stager.kept_bytes
    assert kept_after_first == sum(t.numel() * t.element_size() for t in tensors)

    second, expected = _save(stager, tensors)
    assert all(torch.equal(k, e) for k, e in zip(second, expected))
    if device == "cuda":  # the same pinned buffers, no more host memory
        assert all(k.is_pinned() for k in second)
        assert [k.data_ptr() for k in second] == [k.data_ptr() for k in first]
        assert stager.kept_bytes == kept_after_first


@pytest.mark.parametrize("device", DEVICES)
def test_reserved_buffers_are_the_ones_the_first_save_fills(device: str) -> None:
    tensors = [torch.randn(shape, device=device) for shape in ((300,), (20, 7))]
    stager = HostStager(torch.device(device))
    stager.reserve([t.numel() * t.element_size() for t in tensors])
    reserved = [b.data_ptr() for b in stager._kept]
    kept, expected = _save(stager, tensors)
    assert all(torch.equal(k, e) for k, e in zip(kept, expected))
    if device == "cuda":
        assert [k.data_ptr() for k in kept] == reserved and stager.kept_bytes == sum(t.nbytes for t in tensors)
    else:
        assert reserved == []  # nothing to pin on the CPU: copies are plain clones
