"""appliance.heap: the serving process's start-up heap, frozen out of later collections."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from appliance.api.common import MANAGER
from appliance.heap import freeze_startup_heap
from tests.conftest import build_tensor_model
from tests.test_admin import admin


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


def tiny(folder: Path) -> Path:
    return build_tensor_model(
        folder,
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
    )


def test_a_model_loaded_on_demand_is_frozen_and_given_back_to_the_collector_once_unloaded(  # type: ignore[no-untyped-def]
    start_server, tmp_path: Path, thawed: None
) -> None:
    """With 2,000 tiny models loaded by their first requests (not at start-up, where the heap was
    frozen once), each full collection that a /metrics scrape set off walked some 1.3 million
    objects: 250-530 ms with the event loop held. A load's state is frozen once the load is done;
    an unload gives it back to the collector, or what of it only the collector reclaims (a
    reference cycle) would be kept for ever, at every load and unload."""
    models = {name: tiny(tmp_path / "src" / name) for name in ("a", "b")}
    srv = start_server(models, config={"server": {"default_models": []}})
    mgr = srv.app[MANAGER]
    srv.call(lambda: setattr(mgr, "freeze_heap", True))  # as the serving process has it
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    assert srv.post("/v2/models/a/infer", body, {"Cache-Control": "no-store"})[0] == 200
    runtime = srv.call(lambda: mgr.slots["a"].runtime)
    assert id(runtime.batcher) not in {id(o) for o in gc.get_objects()}, "the loaded model is frozen"
    runtime.cycle = Node()  # state of model a that only the collector can reclaim
    cycle = weakref.ref(runtime.cycle)
    del runtime
    assert srv.post("/v2/models/b/infer", body, {"Cache-Control": "no-store"})[0] == 200
    assert id(cycle()) not in {id(o) for o in gc.get_objects()}, "frozen with b's load"

    assert admin(srv, "POST", "/admin/models/a/unload")[0] == 200
    srv.call(gc.collect)
    assert cycle() is None, "what the unloaded model held is reclaimed"
    deadline = time.monotonic() + 30
    while gc.get_freeze_count() == 0:  # the next keep-alive tick (once a second) freezes again
        assert time.monotonic() < deadline, "the heap was not frozen again after the unload"
        time.sleep(0.05)
