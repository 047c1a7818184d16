"""Bench-only: make a bigger card behave like a smaller one, memory-wise (the device tool may give H200s when a
run asks whether something fits an 80 GB H100).

With BENCH_CUDA_MEMORY_GIB set, every process that has this folder on PYTHONPATH caps its CUDA caching allocator
at that many GiB on the device it selects (torch.cuda.set_device, which bridge's launcher and torchrun path both
call), so a run that needs more fails with torch.OutOfMemoryError as it would on the smaller card. Speed stays
the bigger card's. Off (nothing imported) without the variable.
"""
import os

_CAP_GIB = os.environ.get("BENCH_CUDA_MEMORY_GIB")

if _CAP_GIB:
    import torch

    _set_device = torch.cuda.set_device

    def _set_device_capped(device) -> None:  # noqa: ANN001 - torch's own signature
        _set_device(device)
        index = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(_CAP_GIB) * 2**30 / total), index)

    torch.cuda.set_device = _set_device_capped
