"""The memory manager with real ONNX Runtime engines and the real MiniLM model: on-demand loads,
LRU eviction under a budget that holds one model, pinned models, a model that can never fit,
out-of-memory batches split and survived, keep-alive unloads, and the metrics."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import signal
import sys
import threading
import time
import urllib.request
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from onnx import TensorProto, helper

import appliance.models
from appliance.api.common import MANAGER
from appliance.config import Config
from appliance.inference import EmbeddingRuntime
from appliance.memory import DoesNotFit, MemoryManager, MemoryPools, rss_bytes, trim_heap
from appliance.models import ModelManager
from tests.conftest import (
    ROOT,
    FaultyEngine,
    ServerThread,
    build_tensor_model,
    make_repository,
    serve_identity_models,
)

A, B = "minilm-a", "minilm-b"


def two_models(folder: Path, tmp: Path) -> dict[str, Path]:
    """Two models over the same built artefacts, each with its own model.yaml."""
    out = {}
    for name in (A, B):
        d = tmp / "src" / name
        d.mkdir(parents=True)
        for f in folder.iterdir():
            if f.name != "model.yaml":
                (d / f.name).symlink_to(f)
        (d / "model.yaml").write_text(
            (folder / "model.yaml").read_text().replace("name: all-minilm-l6-v2", f"name: {name}")
        )
        out[name] = d
    return out


def lease_of(srv: ServerThread, name: str) -> tuple[int, int]:
    snap = srv.call(lambda: srv.app[MANAGER].memory.snapshot())
    m = snap["models"][name]
    return int(m["weights_bytes"]), int(m["activation_bytes"])


def state(srv: ServerThread, name: str) -> str:
    return str(srv.call(lambda: srv.app[MANAGER].slots[name].state.value))


def embed(srv: ServerThread, model: str, text: str = "hello") -> tuple[int, Any, dict[str, str]]:
    return srv.post("/v1/embeddings", {"model": model, "input": text}, {"Cache-Control": "no-store"})


# A fixed batch size: the load then measures only the peak-memory probe, not the batch-size
# timing runs too, whose allocations made a reloaded model's footprint vary by tens of MiB in a
# busy test process (enough to miss the one-model budget these tests set).
SMALL_BATCH = {"batching": {"max_batch_size": 4, "measure_batch_size": False}}


def hold_one(srv: ServerThread, resident: str) -> int:
    """Shrink the budget, live, to just under "the resident model plus the artefacts of another":
    a second model never fits (its weights are at least its files' size), while one measured a
    little differently on its next load still does."""
    weights, activation = lease_of(srv, resident)
    folder = srv.cfg.model_repository / resident
    files = sum((folder / f).stat().st_size for f in ("model.onnx", "tokenizer.json"))
    budget = weights + activation + files - (1 << 20)
    from tests.test_admin import admin

    status, _ = admin(srv, "PATCH", "/admin/settings", {"defaults": {"memory": {"budget_bytes": budget}}})
    assert status == 200
    return budget


def test_loads_on_demand_and_evicts_the_least_recently_used_idle_model(
    start_server, minilm_folder: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    models = two_models(minilm_folder, tmp_path)
    srv = start_server(
        models, overrides={A: SMALL_BATCH, B: SMALL_BATCH}, config={"server": {"default_models": [A]}}
    )
    one_model_budget = hold_one(srv, A)
    assert (state(srv, A), state(srv, B)) == ("resident", "available")
    assert embed(srv, B)[0] == 200, "B loads on demand"
    assert (state(srv, A), state(srv, B)) == ("evicted", "resident")
    one_model_budget = hold_one(srv, B)  # footprints are measured per load: re-fit to B's
    assert embed(srv, A)[0] == 200
    assert (state(srv, A), state(srv, B)) == ("resident", "evicted")
    _, metrics = srv.get("/metrics")
    text = metrics.decode()
    assert 'appliance_model_evictions_total{model="minilm-a"} 1.0' in text
    assert 'appliance_model_evictions_total{model="minilm-b"} 1.0' in text
    budget = next(line for line in text.splitlines() if line.startswith("appliance_memory_budget_bytes "))
    assert float(budget.split()[1]) == one_model_budget
    assert 'appliance_memory_used_bytes{model="minilm-b"} 0.0' in text
    _, listed = srv.get("/v1/models")
    assert {m["id"]: m["state"] for m in listed["data"]} == {A: "resident", B: "evicted"}


def test_pinned_models_are_never_evicted(start_server, minilm_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    models = two_models(minilm_folder, tmp_path)
    srv = start_server(
        models,
        overrides={A: {**SMALL_BATCH, "memory": {"pinned": True}}, B: SMALL_BATCH},
        config={"server": {"default_models": [A]}},
    )
    hold_one(srv, A)
    status, body, headers = embed(srv, B)
    assert status == 503 and "pinned" in body["error"]["message"] and "Retry-After" in headers
    assert state(srv, A) == "resident"
    assert embed(srv, A)[0] == 200


def test_a_model_that_can_never_fit_is_refused_with_a_clear_error(
    start_server, minilm_folder: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    models = two_models(minilm_folder, tmp_path)
    srv = start_server(
        {A: models[A]},
        config={"server": {"default_models": [A]}, "defaults": {"memory": {"budget_bytes": 10 << 20}}},
        wait_ready=False,
    )
    for _ in range(100):
        if state(srv, A) == "failed":
            break
        time.sleep(0.05)
    status, ready = srv.get("/readyz")
    assert status == 503 and ready["models"][A] == "failed"
    # KServe's readiness answers "no" with a 4xx, as the protocol and Triton do.
    assert srv.get("/v2/health/ready")[0] == 400
    status, model_ready = srv.get(f"/v2/models/{A}/ready")
    assert status == 400 and model_ready == {"name": A, "ready": False}
    status, body, headers = embed(srv, A)
    assert status == 503 and "memory budget is 10 MiB" in body["error"]["message"]
    # Not "retry in 1 s": nothing changes by then (each retry was a new load that failed alike).
    assert int(headers["Retry-After"]) > 5


def test_a_model_that_could_not_fit_loads_as_soon_as_the_budget_is_raised(tmp_path: Path) -> None:
    """An operator who raises the budget for a model it could not hold expects its next request to
    load it; it was refused for up to 30 s more (the failed-load back-off), quoting the old budget.

    In a process of its own: what a load measures is its RSS growth, and in the test process the
    heap freed by earlier tests' models was reused by this load, which then grew by less than its
    files and fitted (CI saw 200 where the 503 was due)."""
    from tests.test_lifecycle import eventually, free_port, post, serve_process

    def live() -> bool:  # /healthz: a request to the model would load it before the test asks
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    model = "all-minilm-l6-v2"
    make_repository(tmp_path, {model: ROOT / "engines" / model})
    folder = tmp_path / "engines" / model
    files = sum((folder / f).stat().st_size for f in ("model.onnx", "tokenizer.json"))
    # Room for its files (the estimate before the load) but not for what the load measures
    # (in a fresh process its open alone grows by ~40 MiB more than the files).
    budget = files + (1 << 20)
    port = free_port()
    settings = {"defaults": {"memory": {"budget_bytes": budget}}, "models": {model: SMALL_BATCH}}
    proc, out = serve_process(
        tmp_path, {"port": port, "log_level": "info", "default_models": []}, extra=settings
    )
    try:
        assert eventually(live, 60), out.read_text()
        status, headers, raw = post(port, {"model": model, "input": "hello"})
        assert status == 503, raw
        assert f"memory budget is {budget / (1 << 20):.0f} MiB" in json.loads(raw)["error"]["message"]
        assert int(headers["Retry-After"]) > 5, "nothing changes by itself within seconds"
        raised = {**settings, "defaults": {"memory": {"budget_bytes": 4 << 30}}}
        cfg = tmp_path / "appliance.yaml"
        cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), **raised}))
        os.kill(proc.pid, signal.SIGHUP)
        # Well inside the 30 s back-off: loaded by the first request after the reload.
        assert eventually(lambda: post(port, {"model": model, "input": "hello"})[0] == 200, 20), (
            out.read_text()
        )
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_out_of_memory_batches_are_split_retried_and_capped(
    start_server, minilm_folder: Path, faulty: Any
) -> None:  # type: ignore[no-untyped-def]
    srv = start_server({"all-minilm-l6-v2": minilm_folder})
    engine = faulty[0]
    engine.oom_above = 2
    engine.delay_s = 0.05  # let a burst queue up behind the first batch
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: embed(srv, "all-minilm-l6-v2", f"oom {i}")[0], range(16)))
    assert results == [200] * 16, "every request survived the out-of-memory batches"
    assert max(engine.batches) > 2, "a batch that was too large did happen"
    # A second burst: the batcher itself now forms batches no larger than what fitted.
    seen = len(engine.batches)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        again = list(pool.map(lambda i: embed(srv, "all-minilm-l6-v2", f"again {i}")[0], range(16)))
    assert again == [200] * 16
    assert engine.batches[seen:] and max(engine.batches[seen:]) <= 2
    _, metrics = srv.get("/metrics")
    assert 'appliance_oom_splits_total{model="all-minilm-l6-v2"}' in metrics.decode()
    cap = srv.call(lambda: srv.app[MANAGER].slots["all-minilm-l6-v2"].runtime.batcher.policy.max_batch_size)
    assert cap <= 2, "later batches are capped below the size that failed"


def test_keep_alive_unloads_idle_models_which_stay_ready_and_load_again(
    start_server, minilm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    # Not waiting for /readyz: on a loaded box the model may load and be unloaded again (1 s idle)
    # between two polls, and readiness then never shows. Loaded once and back to "available" is
    # what the test waits for.
    srv = start_server(
        {"all-minilm-l6-v2": minilm_folder},
        overrides={"all-minilm-l6-v2": {"memory": {"keep_alive_s": 1}}},
        wait_ready=False,
    )
    slot = srv.app[MANAGER].slots["all-minilm-l6-v2"]
    deadline = time.monotonic() + 120
    while not (slot.loaded_at is not None and state(srv, "all-minilm-l6-v2") == "available"):
        assert time.monotonic() < deadline, "the model was not loaded and then unloaded"
        time.sleep(0.1)
    # Unloaded when idle, still ready: its next request loads it. (Readiness followed residency,
    # so a Kubernetes Service dropped the pod after five idle minutes, and no request came back
    # to load the model again.)
    status, ready = srv.get("/readyz")
    assert status == 200 and ready["ready"] is True, ready
    # So does KServe's readiness, of the server and of the model: a client that checks the model
    # before it sends would otherwise never send again.
    assert srv.get("/v2/health/ready")[0] == 200
    assert srv.get("/v2/models/all-minilm-l6-v2/ready") == (200, {"name": "all-minilm-l6-v2", "ready": True})
    assert embed(srv, "all-minilm-l6-v2")[0] == 200
    assert state(srv, "all-minilm-l6-v2") == "resident"


def test_load_unload_cycles_give_each_model_back_and_rss_stays_bounded(
    start_server, minilm_folder: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """An unload frees what the model held: after load, serve, unload cycles through the admin API
    no unloaded engine is still referenced, and the process's RSS stays near what it was after
    the first cycle. Each closed batcher was kept (with its runtime, engine, tokenizers and worker
    threads) by the deadline timer of a request it had answered, for that request's timeout: the
    30 s default kept every model a swap evicted, about 12 MiB a cycle on a real server."""
    from tests.test_admin import admin

    srv = start_server(two_models(minilm_folder, tmp_path), overrides={A: SMALL_BATCH})
    mgr = srv.app[MANAGER]
    engines: list[weakref.ref[Any]] = []
    rss: list[int] = []
    for _ in range(6):
        assert admin(srv, "POST", f"/admin/models/{A}/load")[0] == 200
        engines.append(weakref.ref(srv.call(lambda: mgr.slots[A].runtime.engine)))
        assert embed(srv, A, "word " * 200)[0] == 200  # a request with a deadline (30 s default)
        assert admin(srv, "POST", f"/admin/models/{A}/unload")[0] == 200
        gc.collect()
        rss.append(rss_bytes())
    assert [e() for e in engines] == [None] * len(engines), "an unloaded model's engine is still held"
    assert rss[-1] - rss[0] < 128 << 20, [r >> 20 for r in rss]


def test_the_activation_lease_is_the_peak_probe_s_not_the_batch_size_timing_s(
    start_server, minilm_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The activation lease is the peak probe's working memory scaled to the largest batch; the
    batch-size timing that follows it at load is not measured with it. Its full-size batches'
    transient memory was scaled by max_batch_size / PEAK_PROBE_ROWS again (a MiniLM lease of
    238-476 MiB for a need of 47). Here the timing's transient is 64 MiB, made certain."""
    real = EmbeddingRuntime.best_batch

    def allocating_timing(self: EmbeddingRuntime, *args: Any, **kw: Any) -> Any:
        scratch = np.ones(64 << 20, dtype=np.uint8)  # touched: resident while the timing runs
        result = real(self, *args, **kw)
        del scratch
        return result

    monkeypatch.setattr(EmbeddingRuntime, "best_batch", allocating_timing)
    models = two_models(minilm_folder, tmp_path)
    timed = {"batching": {"max_batch_size": 16, "measure_batch_size": True}}
    untimed = {"batching": {"max_batch_size": 16, "measure_batch_size": False}}
    srv = start_server(
        models, overrides={A: timed, B: untimed}, config={"server": {"default_models": [A, B]}}
    )
    assert srv.call(lambda: srv.app[MANAGER].slots[A].runtime.measured_batch_size) is not None
    (_, with_timing), (_, without) = lease_of(srv, A), lease_of(srv, B)
    # 4x the timing's 64 MiB had it been measured; the two probes differ by noise only.
    assert abs(with_timing - without) < 64 << 20, (with_timing >> 20, without >> 20)


def load_b_while_a_runs(srv: ServerThread) -> None:
    """B's first request (which loads it) sent while a batch of A's is running."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        serving = pool.submit(embed, srv, A)
        deadline = time.monotonic() + 10
        while not srv.call(lambda: srv.app[MANAGER].arbiter.held()):  # A's batch is running
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert embed(srv, B)[0] == 200  # loads B
        assert serving.result(30)[0] == 200


def test_a_model_loaded_while_another_serves_measures_its_own_working_memory_alone(
    start_server, minilm_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A load's peak probe reads the process's RSS, so no other engine call runs during it (the
    compute arbiter's quiet period): the probe waits for the batch running, and that batch's
    working memory is not the new model's. Measured while another model served, a MiniLM leased
    0 to 838 MiB of activations for a need of 190 (a false "never fits" under a tight budget).
    Here A's batch, running when B loads, takes 128 MiB for a moment once B's probe has begun
    (or after 3 s), and B's probe lasts until it has (or 3 s)."""
    probing, freed = threading.Event(), threading.Event()

    class Busy(FaultyEngine):
        def run(self, feeds: Any, output_names: Any = None) -> dict[str, np.ndarray]:
            probing.wait(3)
            scratch = np.ones(128 << 20, dtype=np.uint8)  # touched: resident for a moment
            del scratch
            freed.set()
            return super().run(feeds, output_names)

    original = ModelManager._open_engine
    monkeypatch.setattr(
        ModelManager,
        "_open_engine",
        staticmethod(lambda e, v: Busy(original(e, v)) if e.name == A else original(e, v)),
    )
    real_probe = EmbeddingRuntime.warmup_peak

    def probe(self: EmbeddingRuntime) -> None:
        probing.set()
        real_probe(self)
        freed.wait(3)

    models = two_models(minilm_folder, tmp_path)
    srv = start_server(
        models, overrides={A: SMALL_BATCH, B: SMALL_BATCH}, config={"server": {"default_models": [A]}}
    )
    monkeypatch.setattr(EmbeddingRuntime, "warmup_peak", probe)
    load_b_while_a_runs(srv)
    _, activation = lease_of(srv, B)
    # B's own need at batch 4 is a few MiB; A's 128 MiB would read as 128 MiB at least.
    assert activation < 64 << 20, activation >> 20


def test_a_model_opened_while_another_serves_leases_the_weights_a_quiet_open_measured(
    start_server, minilm_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A model's weights lease is the process's RSS growth across its engine's open, and the open
    cannot wait for quiet as the peak probe does (a SmolLM open takes 8-16 s). Opened while another
    model served, a MiniLM read 132 to 260 MiB against 102 to 121 quiet. So an open that another
    engine call ran beside takes the reading of the last quiet open of the same artefacts, backend
    and settings, kept in the data folder: the same after a restart. Here A's batch, running when
    B opens, takes 128 MiB once B's open has begun and gives it back once the open is measured."""
    armed, opening, allocated, measured = (threading.Event() for _ in range(4))

    class Busy(FaultyEngine):
        def run(self, feeds: Any, output_names: Any = None) -> dict[str, np.ndarray]:
            if armed.is_set():
                opening.wait(3)
                scratch = np.ones(128 << 20, dtype=np.uint8)  # touched: resident meanwhile
                allocated.set()
                measured.wait(3)
                del scratch
            return super().run(feeds, output_names)

    original = ModelManager._open_engine

    def open_engine(entry: Any, values: Any) -> Any:
        if entry.name == A:
            return Busy(original(entry, values))
        if armed.is_set():
            opening.set()
            engine = original(entry, values)
            allocated.wait(3)
            return engine
        return original(entry, values)

    real_measure = appliance.models.measure

    def measure(fn: Any) -> tuple[int, int]:
        try:
            return real_measure(fn)
        finally:
            measured.set()

    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(open_engine))
    monkeypatch.setattr(appliance.models, "measure", measure)
    models = two_models(minilm_folder, tmp_path)

    def open_b_beside_a(srv: ServerThread) -> int:
        for event in (opening, allocated, measured):
            event.clear()
        armed.set()
        load_b_while_a_runs(srv)
        armed.clear()
        assert allocated.is_set(), "A's batch took its memory during B's open"
        return lease_of(srv, B)[0]

    srv = start_server(
        models, overrides={A: SMALL_BATCH, B: SMALL_BATCH}, config={"server": {"default_models": [A]}}
    )
    assert embed(srv, B)[0] == 200  # a quiet open
    quiet, _ = lease_of(srv, B)
    srv.call(lambda: srv.app[MANAGER].unload(B))
    assert abs(open_b_beside_a(srv) - quiet) < 16 << 20
    # A's settings differ there: its quiet open at start is no reading for B's settings.
    other = {"batching": {"max_batch_size": 2, "measure_batch_size": False}}
    restarted = start_server(
        models, overrides={A: other, B: SMALL_BATCH}, config={"server": {"default_models": [A]}}
    )
    assert abs(open_b_beside_a(restarted) - quiet) < 16 << 20, "kept in the data folder"


def test_plan_is_lru_and_skips_busy_and_pinned_models() -> None:
    mm = MemoryManager(budget=300)
    mm.admit("old", 100, 0, pinned=False)
    mm.admit("busy", 100, 0, pinned=False)
    mm.admit("pinned", 100, 0, pinned=True)
    used = {"old": 1.0, "busy": 0.5, "pinned": 0.0}
    victims = mm.plan("new", 100, 0, idle=lambda n: n != "busy", last_used=used.__getitem__)
    assert victims == ["old"]
    with pytest.raises(DoesNotFit) as err:
        mm.plan("huge", 250, 0, idle=lambda n: True, last_used=used.__getitem__)
    assert err.value.never and "pinned" in str(err.value)
    mm.admit("big-activations", 0, 50, pinned=False)
    assert mm.arena == 50 and mm.used == 350, "one shared arena: the largest need, not the sum"


def test_tensorrt_engines_share_one_arena_sized_to_the_largest(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT engines need a GPU, which this machine lacks: stand-ins with the same two methods
    (activation_bytes, set_activation) and a stand-in device buffer check the manager's wiring."""
    from appliance.config import parse
    from appliance.gpu import cuda
    from appliance.models import ModelManager
    from appliance.telemetry import Metrics

    class Buffer:
        def __init__(self, nbytes: int) -> None:
            self.nbytes, self.closed = nbytes, False

        def close(self) -> None:
            self.closed = True

    class TrtLike:
        def __init__(self, need: int) -> None:
            self.need, self.arena = need, None

        def activation_bytes(self) -> int:
            return self.need

        def set_activation(self, arena: Any) -> None:
            assert arena is None or arena.nbytes >= self.need
            self.arena = arena

    monkeypatch.setattr(cuda, "DeviceBuffer", Buffer)
    mgr = ModelManager(parse({}, env={}), Metrics())
    small, large = TrtLike(100 << 20), TrtLike(300 << 20)
    mgr._share_arena(small)
    first = small.arena
    assert first is not None and first.nbytes == 100 << 20

    class Slot:
        def __init__(self, engine: Any) -> None:
            self.runtime = type("R", (), {"engine": engine})()

    mgr.slots = {"small": Slot(small)}  # type: ignore[dict-item]
    mgr._share_arena(large)
    assert large.arena is small.arena and small.arena.nbytes == 300 << 20
    assert first.closed, "the smaller arena is freed once everyone moved to the larger one"


def test_gpu_box_has_a_device_pool_and_a_separate_host_pool() -> None:
    from appliance import settings

    values = {
        **settings.defaults(),
        "memory.budget_bytes": 0,
        "memory.budget_fraction": 0.5,
        "memory.reserve_bytes": 100,
        "memory.host_budget_bytes": 1000,
    }
    pools = MemoryPools.create(values, device_total=10_000)
    assert pools.device is not None and pools.device.budget == 4900 and pools.host.budget == 1000
    assert pools.budget == 4900, "the main pool (metrics, the old figures) is the device's"
    pools.admit("trt", 3000, 1000, False, on_gpu=True)
    pools.admit("cpu", 900, 0, False, on_gpu=False)
    # A GPU model that needs room evicts GPU models only; host RAM is not its budget, and back.
    assert pools.plan("trt2", 1000, 0, idle=lambda n: True, last_used=lambda n: 0.0, on_gpu=True) == ["trt"]
    assert pools.plan("cpu2", 900, 0, idle=lambda n: True, last_used=lambda n: 0.0) == ["cpu"]
    with pytest.raises(DoesNotFit, match="the memory budget is 0 MiB"):
        pools.plan("cpu-huge", 2000, 0, idle=lambda n: True, last_used=lambda n: 0.0)
    snap = pools.snapshot()
    assert snap["device"] == {"budget_bytes": 4900, "used_bytes": 4000, "arena_bytes": 1000, "models": 1}
    assert snap["host"] == {"budget_bytes": 1000, "used_bytes": 900, "arena_bytes": 0, "models": 1}
    assert snap["models"]["trt"]["pool"] == "device" and snap["models"]["cpu"]["pool"] == "host"
    assert snap["budget_bytes"] == 4900 and snap["loads"] == 2
    # A model that reloads onto the other backend (TensorRT failed this time) moves pools.
    pools.admit("trt", 800, 0, False, on_gpu=False)
    assert "trt" not in pools.device.leases and pools.host.leases["trt"].weights == 800
    pools.release("trt", evicted=True)
    assert "trt" not in pools.leases and pools.evictions == 1
    pools.configure({**values, "memory.host_budget_bytes": 2000}, device_total=10_000)
    assert pools.host.budget == 2000 and pools.device.budget == 4900


def test_cpu_box_has_one_host_pool() -> None:
    from appliance import settings

    values = {**settings.defaults(), "memory.budget_bytes": 5000, "memory.host_budget_bytes": 1}
    pools = MemoryPools.create(values, device_total=None)
    assert pools.device is None and pools.budget == pools.host.budget == 5000  # host_budget: GPU boxes only
    pools.admit("m", 10, 0, False, on_gpu=True)  # no device pool: everything leases from the host
    assert pools.snapshot()["device"] is None and pools.snapshot()["host"]["used_bytes"] == 10


def test_gpu_engine_models_lease_device_memory_and_cpu_models_host_memory(
    start_server, minilm_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """This machine has no GPU: injected are a 10 GiB device and model A's engine saying it runs
    there; both engines are the real ONNX Runtime ones, and the manager is the server's."""
    from appliance import models as models_mod
    from appliance.models import ModelManager
    from tests.conftest import FaultyEngine

    class OnGpu(FaultyEngine):
        @property
        def on_gpu(self) -> bool:
            return True

    original = ModelManager._open_engine

    def open_engine(entry: Any, values: Any) -> Any:
        engine = original(entry, values)
        return OnGpu(engine) if entry.name == A else engine

    monkeypatch.setattr(models_mod, "_device_total", lambda: 10 << 30)
    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(open_engine))
    srv = start_server(two_models(minilm_folder, tmp_path), config={"server": {"default_models": [A, B]}})
    snap = srv.call(lambda: srv.app[MANAGER].memory.snapshot())
    assert snap["device"]["models"] == 1 and snap["host"]["models"] == 1
    assert snap["models"][A]["pool"] == "device" and snap["models"][B]["pool"] == "host"
    assert snap["device"]["budget_bytes"] == int((10 << 30) * 0.8) - (512 << 20)  # the device's budget
    _, described = srv.get(f"/v1/models/{A}")
    assert described["memory_pool"] == "device"
    assert srv.get(f"/v1/models/{B}")[1]["memory_pool"] == "host"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_heap_gives_freed_memory_back_to_the_system() -> None:
    """Memory freed by an unloaded model goes back to the system: glibc keeps freed heap in its
    arenas (676 MiB of an unloaded model's in a probe's soak) until ``malloc_trim``, and a later
    load reusing it measured a lease from an RSS that hardly grew."""
    chunks = [bytearray(4096) for _ in range(50_000)]  # ~200 MiB from malloc's heap
    pin = bytearray(4096)  # above them: the heap's top is in use, so free() alone keeps it all
    del chunks
    freed = rss_bytes()
    if not trim_heap():
        pytest.skip("no malloc_trim in this libc")
    assert freed - rss_bytes() > 100 << 20
    del pin


def test_a_model_given_work_while_another_is_evicted_is_not_evicted_too(
    start_server, minilm_folder: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Only idle models are evicted. A load that must evict two unloads them one after the other,
    and the second may be given work while the first unloads (a drain, worker threads, a heap
    trim): it stays, and the load is told the room is held by busy models. It was evicted from
    the plan made before, queued requests and all. A fake ``idle`` marks it busy at that moment
    (the race, made certain); the unloads and the plan are real."""
    models = two_models(minilm_folder, tmp_path)
    srv = start_server(
        models, overrides={A: SMALL_BATCH, B: SMALL_BATCH}, config={"server": {"default_models": [A, B]}}
    )
    mgr = srv.app[MANAGER]
    busy: set[str] = set()
    real_idle, real_unload = mgr.idle, mgr.unload

    async def unload(name: str, **kw: Any) -> None:
        await real_unload(name, **kw)
        busy.update({A, B} - {name})  # the other one gets a request meanwhile

    async def make_room() -> str:
        mgr.idle = lambda n: n not in busy and real_idle(n)
        mgr.unload = unload
        mgr.memory.budget = mgr.memory.main.used
        try:
            # Fits only once both are gone.
            await mgr._make_room("newcomer", mgr.memory.budget - (1 << 20), 0)
        except DoesNotFit as exc:
            assert not exc.never
            return str(exc)
        finally:
            del mgr.idle, mgr.unload
        return "made room"

    assert "held by busy models" in srv.call(make_room)
    assert sorted([state(srv, A), state(srv, B)]) == ["evicted", "resident"]


def test_admin_stats_and_a_settings_change_look_each_models_lease_up_once(
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Every model's state in /admin/stats, and the memory gauges a settings change refreshes,
    name its lease. Each model asked for the merged map of every model's lease, built afresh,
    so both grew with the square of the models (~0.1 s of event loop each at 2,000). The work is
    now one lookup per model: the merged map is not built once per model."""
    import json
    import urllib.request

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    src = build_tensor_model(
        tmp_path / "src" / "ident", [helper.make_node("Identity", ["x"], ["y"])], [x], [y]
    )
    names = [f"m{i:02d}" for i in range(12)]
    srv = start_server({n: src for n in names}, overrides={n: {"name": n} for n in names})
    merged = [0]
    real = MemoryPools.leases

    def leases(pools: MemoryPools) -> Any:
        merged[0] += 1
        return real.fget(pools)  # type: ignore[misc]

    monkeypatch.setattr(MemoryPools, "leases", property(leases))

    def admin(method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            srv.admin_url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {srv.server.admin_token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    stats = admin("GET", "/admin/stats")
    assert all(stats["models"][n]["memory_bytes"] > 0 for n in names), stats["models"]
    admin("PATCH", "/admin/settings", {"models": {names[0]: {"cache": {"enabled": False}}}})
    assert merged[0] < len(names), merged


def test_the_keep_alive_check_reads_one_setting_of_each_resident_model(  # type: ignore[no-untyped-def]
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every second the keep-alive check built each model's whole tunables (a dict of ~60
    settings), resident or not, to read one: a few ms of the event loop's every second at 2,000
    models. It reads that one setting of each resident model, and still follows a change."""
    from tests.test_admin import admin

    names = [f"m{i}" for i in range(3)]
    srv = serve_identity_models(start_server, tmp_path, names)
    mgr = srv.app[MANAGER]
    built: list[str] = []
    real = Config.tunables_for

    def tunables_for(self: Config, model: str, model_yaml: Any) -> dict[str, Any]:
        built.append(model)
        return real(self, model, model_yaml)

    monkeypatch.setattr(Config, "tunables_for", tunables_for)
    srv.call(mgr._expire_tick)
    assert built == [] and [state(srv, n) for n in names] == ["resident"] * 3

    patch = {"models": {"m1": {"memory": {"keep_alive_s": 0}}}}
    assert admin(srv, "PATCH", "/admin/settings", patch)[0] == 200
    srv.call(mgr._expire_tick)
    assert [state(srv, n) for n in names] == ["resident", "available", "resident"]


def test_models_going_idle_together_are_unloaded_with_one_reading_of_the_repository(  # type: ignore[no-untyped-def]
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each unload reads the repository again (a few stats per model folder: ~100 ms of the
    event loop at 2,000 models), and a keep-alive tick that unloaded many models did that after
    each one: 400 idle models held the loop ~100-200 ms at a time for as long as they took. The
    tick's unloads are followed by one reading, which still finds a folder edited meanwhile."""
    from tests.test_admin import admin

    names = [f"m{i}" for i in range(4)]
    srv = serve_identity_models(start_server, tmp_path, names)
    mgr = srv.app[MANAGER]
    (Path(srv.call(lambda: mgr.slots["m2"].entry.folder)) / "model.yaml").write_text(
        "name: m2\nkind: tensor\nartefacts: {model: model.onnx}\nbatching: {max_batch_size: 2}\n"
    )
    scans = [0]
    real = ModelManager.rescan

    def rescan(self: ModelManager) -> None:
        scans[0] += 1
        real(self)

    monkeypatch.setattr(ModelManager, "rescan", rescan)
    assert admin(srv, "PATCH", "/admin/settings", {"defaults": {"memory": {"keep_alive_s": 0}}})[0] == 200
    scans[0] = 0
    srv.call(mgr._expire_tick)
    assert [state(srv, n) for n in names] == ["available"] * 4
    assert scans[0] <= 2, "one reading per tick (the server's own tick may run beside this one)"
    assert srv.call(lambda: mgr.tunables("m2"))["batching.max_batch_size"] == 2
