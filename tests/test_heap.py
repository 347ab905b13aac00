"""appliance.heap: the serving process's start-up heap, frozen out of later collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from appliance.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector reclaims it


@pytest.fixture
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test runner's heap goes back to the collector


def test_objects_alive_at_start_up_are_left_out_of_later_collections(thawed: None) -> None:
    start_up = Node()
    frozen = freeze_startup_heap()
    assert frozen == gc.get_freeze_count() > 0
    later = Node()
    tracked = {id(o) for o in gc.get_objects()}
    # A full collection walks what was made since, not what start-up left alive.
    assert id(later) in tracked and id(start_up) not in tracked
    # What serving makes and drops is still reclaimed.
    del later
    assert gc.collect() >= 1
