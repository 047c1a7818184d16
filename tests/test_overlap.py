"""The conversion's read-ahead: order, errors where they belong, and never more than one item ahead."""
from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest

from bridge.converters.overlap import prefetched


def _counted(n: int, produced: list[int], fail_at: int | None = None) -> Iterator[int]:
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"bad item {i}")
        produced.append(i)
        yield i


def test_items_come_in_order_and_the_producer_stays_one_ahead() -> None:
    produced: list[int] = []
    seen = []
    for item in prefetched(_counted(20, produced)):
        time.sleep(0.005)  # the producer has time to run ahead if it could
        assert len(produced) <= item + 2, (item, produced)  # the one being consumed, and the next
        seen.append(item)
    assert seen == list(range(20))


def test_an_error_while_producing_is_raised_at_its_item() -> None:
    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item in prefetched(_counted(10, [], fail_at=3)):
            seen.append(item)
    assert seen == [0, 1, 2]


def test_stopping_early_stops_the_producer() -> None:
    produced: list[int] = []
    before = threading.active_count()
    with pytest.raises(RuntimeError):
        for item in prefetched(_counted(1000, produced)):
            if item == 2:
                raise RuntimeError("the consumer failed")
    assert len(produced) <= 4 and threading.active_count() == before
