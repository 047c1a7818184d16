"""Shared pytest setup: the local Hub fixture (`hub`) is available to every test module; under xdist, the heaviest
files start first and each worker keeps to its share of the CPU cores."""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.hub_fixture", "tests.model_fixtures"]

#: The files that take longest (`--durations`, summed per file), heaviest first. pyproject's addopts hand whole files
#: to the xdist workers in collection order (--dist loadfile --no-loadscope-reorder): started first, none of these is
#: left running alone at the end while the other worker idles. Files not named keep their order, after these.
HEAVY_FIRST = (
    "tests/test_train_moe.py",
    "tests/test_train_parallel.py",
    "tests/test_train_units.py",
    "tests/test_context_parallel.py",
    "tests/test_bench_smoke.py",
    "tests/test_train_ckpt_dist.py",
    "tests/test_demo.py",
    "tests/test_verify.py",
    "tests/test_train_resume.py",
    "tests/test_api_live.py",
    "tests/test_moe_verify.py",
    "tests/test_fp8.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(HEAVY_FIRST)))  # stable


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker's own torch ops get its share of the cores (spawned ranks set theirs in bridge.launch)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
