"""Inference services: the embedding batch size measured at load (on the real MiniLM engine),
and tensor models, which share an engine run only when their rows allow it."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tokenizers import Tokenizer
from tritonclient.utils import InferenceServerException

from appliance.api.common import MANAGER
from appliance.engines.base import EngineError, EngineTimeout
from appliance.engines.onnxruntime import OnnxRuntimeEngine
from appliance.inference import (
    TUNE_TIE,
    EmbeddingRuntime,
    TensorItem,
    TensorRuntime,
    batches_rows,
    engine_call,
)
from tests.conftest import ServerThread, build_tensor_model, metric

MODEL = "all-minilm-l6-v2"


def runtime(folder: Path) -> EmbeddingRuntime:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    return EmbeddingRuntime(OnnxRuntimeEngine(folder / "model.onnx", intra_op_threads=2), tok, 256)


def test_best_batch_times_powers_of_two_up_to_the_bound_and_picks_the_smallest_near_best(
    minilm_folder: Path,
) -> None:
    rt = runtime(minilm_folder)
    try:
        started = time.perf_counter()
        chosen, rates = rt.best_batch(12)
        elapsed = time.perf_counter() - started
    finally:
        rt.engine.close()
    # The bound is timed too when it is no power of two; nothing above it is.
    assert set(rates) <= {1, 2, 4, 8, 12} and 1 in rates
    assert all(r > 0 for r in rates.values())
    top = max(rates.values())
    assert rates[chosen] >= TUNE_TIE * top
    assert all(rates[s] < TUNE_TIE * top for s in rates if s < chosen)
    assert elapsed < 10  # budgeted at 1.5 s; a busy shared machine stretches it, not tenfold


def test_a_per_batch_cost_moves_near_ties_to_the_larger_size(minilm_folder: Path) -> None:
    """Serving pays a gap per batch that the engine run alone does not show; charged to each
    batch, it favours sizes that pay it fewer times per sentence. A cost far above any run's
    makes the largest size the cheapest per sentence, whatever the machine's noise."""
    rt = runtime(minilm_folder)
    try:
        chosen, rates = rt.best_batch(8, per_batch_s=1.0)
    finally:
        rt.engine.close()
    assert chosen == 8 and max(rates, key=lambda s: rates[s]) == 8


def test_a_server_caps_batches_at_the_measured_size_and_reports_it(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    srv: ServerThread = start_server(
        {MODEL: minilm_folder}, overrides={MODEL: {"batching": {"max_batch_size": 8}}}
    )
    status, model = srv.get(f"/v1/models/{MODEL}")
    assert status == 200
    measured = model["measured_batch_size"]
    assert measured["upper_bound"] == 8
    assert 1 <= measured["chosen"] <= 8
    assert set(measured["sentences_per_cpu_s"]) <= {"1", "2", "4", "8"}
    batcher = srv.app[MANAGER].slots[MODEL].runtime.batcher  # type: ignore[union-attr]
    assert batcher.policy.max_batch_size == measured["chosen"]
    # A live settings change keeps the measured cap (ModelManager.apply).
    srv.call(lambda: srv.app[MANAGER].apply(MODEL))
    assert batcher.policy.max_batch_size == measured["chosen"]
    status, body, _ = srv.post("/v1/embeddings", {"model": MODEL, "input": ["a", "b", "c"]})
    assert status == 200 and np.array(body["data"][2]["embedding"]).shape == (384,)


def test_measuring_can_be_turned_off(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    srv: ServerThread = start_server(
        {MODEL: minilm_folder},
        overrides={MODEL: {"batching": {"max_batch_size": 8, "measure_batch_size": False}}},
    )
    status, model = srv.get(f"/v1/models/{MODEL}")
    assert status == 200 and "measured_batch_size" not in model
    assert srv.app[MANAGER].slots[MODEL].runtime.batcher.policy.max_batch_size == 8  # type: ignore[union-attr]


def test_a_reload_reuses_the_measured_batch_size_and_a_busy_timing_is_not_trusted(
    start_server: Callable[..., ServerThread], minilm_folder: Path
) -> None:
    """The timing counts the process's CPU, which is the engine's only while nothing else runs.
    A model unloaded when idle (memory.keep_alive_s) and loaded again under traffic was timed
    while the chat decoder and the loop ran too: it picked batch 1, served a fraction of its
    throughput and its queue timed out. A reload reuses the first measurement; a timing that
    other engine calls overlapped keeps the configured maximum."""
    srv: ServerThread = start_server(
        {MODEL: minilm_folder}, overrides={MODEL: {"batching": {"max_batch_size": 8}}}
    )
    mgr = srv.app[MANAGER]

    def reload() -> dict[str, Any]:
        srv.call(lambda: mgr.unload(MODEL))
        srv.call(lambda: mgr.load(MODEL))
        status, model = srv.get(f"/v1/models/{MODEL}")
        assert status == 200
        return dict(model["measured_batch_size"])

    _, first = srv.get(f"/v1/models/{MODEL}")
    first = first["measured_batch_size"]
    assert "from_earlier_load" not in first and "untrusted" not in first
    again = reload()
    assert again["from_earlier_load"] is True and again["chosen"] == first["chosen"]
    assert mgr.slots[MODEL].runtime.batcher.policy.max_batch_size == first["chosen"]  # type: ignore[union-attr]

    # Another model's engine call holds the compute grant through the whole load.
    mgr.batch_measurements.clear()
    srv.call(lambda: mgr.arbiter.acquire("another-model", 1))
    try:
        busy = reload()
    finally:
        srv.call(mgr.arbiter.release)
    assert busy["chosen"] == 8 and "other engine calls" in busy["untrusted"]
    assert mgr.slots[MODEL].runtime.batcher.policy.max_batch_size == 8  # type: ignore[union-attr]
    assert MODEL not in mgr.batch_measurements  # the next idle load measures again
    status, body, _ = srv.post("/v1/embeddings", {"model": MODEL, "input": ["a", "b"]})
    assert status == 200 and len(body["data"]) == 2


# -- tensor models -----------------------------------------------------------------------------


def _tensor_models(root: Path) -> dict[str, Path]:
    """Tiny real ONNX models: outputs whose rows are not the inputs' rows (a sum over them, a
    transpose), scalars, strings, and rows kept as they are."""
    vi = helper.make_tensor_value_info
    f32 = TensorProto.FLOAT
    # Held long enough for concurrent requests to meet in one batch, as they would under load.
    held = "{max_batch_size: 4, max_queue_delay_ms: 200}"
    return {
        "reduce": build_tensor_model(  # Y = the sum over the rows: [N, 4] -> [1, 4]
            root / "reduce",
            [helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=1)],
            [vi("X", f32, ["N", 4])],
            [vi("Y", f32, [1, 4])],
            [helper.make_tensor("axes", TensorProto.INT64, [1], [0])],
            batching=held,
        ),
        "transpose": build_tensor_model(
            root / "transpose",
            [helper.make_node("Transpose", ["X"], ["Y"], perm=[1, 0])],
            [vi("X", f32, [1, 4])],
            [vi("Y", f32, [4, 1])],
        ),
        "scalar": build_tensor_model(
            root / "scalar",
            [helper.make_node("Mul", ["X", "two"], ["Y"])],
            [vi("X", f32, [])],
            [vi("Y", f32, [])],
            [helper.make_tensor("two", f32, [], [2.0])],
            batching=held,
        ),
        "text": build_tensor_model(
            root / "text",
            [helper.make_node("Identity", ["S"], ["T"])],
            [vi("S", TensorProto.STRING, ["N"])],
            [vi("T", TensorProto.STRING, ["N"])],
        ),
        "rows": build_tensor_model(
            root / "rows",
            [helper.make_node("Identity", ["X"], ["Y"])],
            [vi("X", f32, ["N", 2])],
            [vi("Y", f32, ["N", 2])],
        ),
    }


@pytest.fixture
def tensors(start_server: Callable[..., ServerThread], tmp_path: Path) -> ServerThread:
    return start_server(_tensor_models(tmp_path / "src"))


def _fp32(name: str, shape: list[int], data: list[float]) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": data}]}


def test_concurrent_requests_to_a_model_that_reduces_its_rows_each_get_their_own_answer(
    tensors: ServerThread,
) -> None:
    """Requests share an engine run only when every input and output has a dynamic first
    dimension (Triton's rule). A sum over the rows was batched anyway and its output cut by input
    rows: 20 of 32 concurrent requests got another's sum or nothing, and were cached so."""

    def ask(k: int) -> tuple[int, Any]:
        status, body, _ = tensors.post("/v2/models/reduce/infer", _fp32("X", [2, 4], [k] * 4 + [1] * 4))
        return status, body

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(1000, 1032)))
    for k, (status, body) in zip(range(1000, 1032), answers, strict=True):
        assert status == 200, body
        out = body["outputs"][0]
        assert out["shape"] == [1, 4] and out["data"] == [k + 1.0] * 4, (k, body)
    # Triton's config for a model that runs each request alone: no batching, whole shapes.
    _, cfg = tensors.get("/v2/models/reduce/config")
    assert cfg["max_batch_size"] == 0
    assert cfg["input"][0]["dims"] == [-1, 4] and cfg["output"][0]["dims"] == [1, 4]


def test_a_fixed_shape_output_comes_back_whole(tensors: ServerThread) -> None:
    """An output is never cut by the request's rows: a [1, 4] -> [4, 1] transpose answered one
    element of four."""
    status, body, _ = tensors.post("/v2/models/transpose/infer", _fp32("X", [1, 4], [1, 2, 3, 4]))
    assert status == 200, body
    assert body["outputs"][0]["shape"] == [4, 1] and body["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]


def test_a_scalar_input_is_served(tensors: ServerThread) -> None:
    """A zero-dimensional input has no rows to batch on: it runs alone (it was always a 500,
    "zero-dimensional arrays cannot be concatenated"), concurrent requests too."""

    def ask(k: int) -> tuple[int, Any]:
        status, body, _ = tensors.post("/v2/models/scalar/infer", _fp32("X", [], [k]))
        return status, body

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    for k, (status, body) in enumerate(answers):
        assert status == 200, body
        assert body["outputs"][0]["shape"] == [] and body["outputs"][0]["data"] == [2.0 * k]


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_reach_the_model_as_text_and_come_back_as_bytes(tensors: ServerThread, binary: bool) -> None:
    """BYTES elements are UTF-8 text to an ONNX string tensor: ORT turned Python bytes into their
    repr, and an identity model answered "b'a'" for "a"."""
    client = httpclient.InferenceServerClient(url=tensors.url.removeprefix("http://"))
    words = np.array([b"a", "é".encode(), b""], dtype=object)
    inp = httpclient.InferInput("S", [3], "BYTES")
    inp.set_data_from_numpy(words, binary_data=binary)
    res = client.infer("text", [inp], outputs=[httpclient.InferRequestedOutput("T", binary_data=binary)])
    got = [x.decode() if isinstance(x, bytes) else x for x in res.as_numpy("T")]  # JSON: str
    assert got == ["a", "é", ""]
    body = {"inputs": [{"name": "S", "shape": [2], "datatype": "BYTES", "data": ["a", "é"]}]}
    status, resp, _ = tensors.post("/v2/models/text/infer", body)
    assert status == 200 and resp["outputs"][0] == {
        "name": "T",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["a", "é"],
    }, resp


def test_bytes_that_are_not_utf8_are_a_400_naming_the_input(tensors: ServerThread) -> None:
    """A string tensor holds text: bytes that are not UTF-8 are the client's error (they reached
    the model as the repr "b'\\xff\\xfe'")."""
    head = json.dumps(
        {"inputs": [{"name": "S", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}
    ).encode()
    status, resp, _ = tensors.post(
        "/v2/models/text/infer",
        head + struct.pack("<I", 2) + b"\xff\xfe",
        {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )
    assert status == 400 and "'S'" in resp["error"] and "UTF-8" in resp["error"], resp


def test_a_datatype_mismatch_is_said_in_kserve_names(tensors: ServerThread) -> None:
    """The protocol's names, not numpy's ("expected datatype object, got float32")."""
    body = {"inputs": [{"name": "S", "shape": [1], "datatype": "FP32", "data": [1]}]}
    status, resp, _ = tensors.post("/v2/models/text/infer", body)
    assert status == 400 and resp["error"] == "input 'S': expected datatype BYTES, got FP32", resp


def test_a_request_over_max_batch_size_rows_is_a_400(tensors: ServerThread) -> None:
    """Triton's rule: a request is at most one batch, max_batch_size rows (/config says 4; a
    1,000-row request was served, 200 rows at a time)."""
    _, cfg = tensors.get("/v2/models/rows/config")
    assert cfg["max_batch_size"] == 4 and cfg["input"][0]["dims"] == [2]
    status, resp, _ = tensors.post("/v2/models/rows/infer", _fp32("X", [5, 2], list(range(10))))
    assert status == 400 and "'X'" in resp["error"] and "batch-size must be <= 4" in resp["error"], resp
    status, resp, _ = tensors.post("/v2/models/rows/infer", _fp32("X", [4, 2], list(range(8))))
    assert status == 200 and resp["outputs"][0]["data"] == list(map(float, range(8))), resp


def test_a_float_out_of_its_datatypes_range_is_a_400_not_infinity(tensors: ServerThread) -> None:
    """numpy only warns when a float overflows its type: 1e308 became inf as FP32, the sum was
    answered 200 as [null] (and a RuntimeWarning went to stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, resp, _ = tensors.post("/v2/models/reduce/infer", _fp32("X", [1, 4], [1e308, 1e308, 0, 0]))
    assert status == 400 and resp["error"] == "input 'X': a value is out of range for FP32", resp
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    # The largest and smallest FP32 powers of two are in range; a value too small for FP32 is
    # rounded to zero, as any float is rounded to its type.
    big = 2.0**127
    status, resp, _ = tensors.post("/v2/models/reduce/infer", _fp32("X", [1, 4], [big, 1e-50, 0, -big]))
    assert status == 200 and resp["outputs"][0]["data"] == [big, 0.0, 0.0, -big], resp


def test_nan_and_infinity_travel_as_binary_data_and_are_refused_as_json(tensors: ServerThread) -> None:
    """Binary inputs may hold NaN and infinity (they are floats); JSON cannot carry them, and
    orjson wrote null: an output holding them is a 400 saying to ask for binary data, and is not
    cached (the same request is refused again)."""
    client = httpclient.InferenceServerClient(url=tensors.url.removeprefix("http://"))
    x = np.array([[np.nan, np.inf, 3e38, 1], [0, 0, 3e38, 1]], dtype=np.float32)
    inp = httpclient.InferInput("X", [2, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    res = client.infer("reduce", [inp], outputs=[httpclient.InferRequestedOutput("Y", binary_data=True)])
    got = res.as_numpy("Y")
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and got[0, 2] == np.inf and got[0, 3] == 2, got
    for _ in range(2):
        with pytest.raises(InferenceServerException) as err:
            client.infer("reduce", [inp], outputs=[httpclient.InferRequestedOutput("Y", binary_data=False)])
        assert "output 'Y' holds NaN or Infinity" in str(err.value) and '"binary_data": true' in str(
            err.value
        )


class _Counting:
    """An engine that counts its runs and the rows of each."""

    def __init__(self, inner: OnnxRuntimeEngine) -> None:
        self.inner = inner
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.runs: list[int] = []

    def run(self, feeds: dict[str, np.ndarray], names: Any = None) -> dict[str, np.ndarray]:
        self.runs.append(len(next(iter(feeds.values()))))
        return self.inner.run(feeds, names)


def test_a_batch_holds_at_most_max_batch_size_rows_and_loose_shapes_run_alone(tmp_path: Path) -> None:
    """Concatenated requests never exceed max_batch_size rows in one run; and a model that
    declares a dynamic first dimension its output does not keep (a sum over the rows) is not cut
    at a guess: each request runs again alone."""
    vi = helper.make_tensor_value_info
    rows = build_tensor_model(
        tmp_path / "rows",
        [helper.make_node("Identity", ["X"], ["Y"])],
        [vi("X", TensorProto.FLOAT, ["N", 2])],
        [vi("Y", TensorProto.FLOAT, ["N", 2])],
    )
    engine = _Counting(OnnxRuntimeEngine(rows / "model.onnx"))
    rt = TensorRuntime(engine, batches_rows(engine), lambda: 4)  # type: ignore[arg-type]
    items = [TensorItem({"X": np.full((n, 2), n, np.float32)}, ("Y",)) for n in (3, 1, 2, 2)]
    out = rt.run_batch(items)
    assert engine.runs == [4, 4]
    for it, got in zip(items, out, strict=True):
        assert isinstance(got, dict)
        np.testing.assert_array_equal(got["Y"], it.feeds["X"])

    loose = build_tensor_model(
        tmp_path / "loose",
        [helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=1)],
        [vi("X", TensorProto.FLOAT, ["N", 2])],
        [vi("Y", TensorProto.FLOAT, ["M", 2])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0])],
    )
    engine = _Counting(OnnxRuntimeEngine(loose / "model.onnx"))
    # Batching as declared (ONNX Runtime's own shape inference happens to see through this one).
    rt = TensorRuntime(engine, True, lambda: 4)  # type: ignore[arg-type]
    items = [TensorItem({"X": np.full((1, 2), k, np.float32)}, ("Y",)) for k in (1, 2)]
    out = rt.run_batch(items)
    assert engine.runs == [2, 1, 1]
    assert [np.asarray(o["Y"]).tolist() for o in out if isinstance(o, dict)] == [[[1, 1]], [[2, 2]]]


# -- Triton's statistics of requests that end early --


def _stats(srv: ServerThread) -> dict[str, Any]:
    status, body = srv.get(f"/v2/models/{MODEL}/stats")
    assert status == 200, body
    (stat,) = body["model_stats"]
    return dict(stat)


def _counts(stat: dict[str, Any]) -> dict[str, int]:
    infer = stat["inference_stats"]
    return {
        "inferences": stat["inference_count"],
        "executions": stat["execution_count"],
        **{kind: infer[kind]["count"] for kind in ("success", "fail", "queue", "compute_infer")},
        **{f"{kind}_ns": infer[kind]["ns"] for kind in ("queue", "compute_infer")},
    }


def _settled(srv: ServerThread, before: dict[str, int], executions: int, fail: int) -> dict[str, int]:
    """The counts once the server has answered (or given up on) the request and its batch has
    ended: both happen on the server's own time, after the client's part is over."""
    deadline = time.monotonic() + 30
    while True:
        now = _counts(_stats(srv))
        if now["executions"] >= before["executions"] + executions and now["fail"] >= before["fail"] + fail:
            return now
        assert time.monotonic() < deadline, now
        time.sleep(0.02)


def test_the_engine_worker_hands_back_its_batch_fails_it_at_the_timeout_and_drops_the_late_result(
    start_server: Callable[..., ServerThread], minilm_folder: Path
) -> None:
    """``engine_call``, the batcher's ``execute``: the worker thread settles the batch's future
    itself; an engine error is the batch's; a run past ``engine.timeout_ms`` fails the batch with
    EngineTimeout and what it returns later is dropped; a batch whose job was cancelled before it
    ran (its pool shut down) fails rather than waiting for ever. The server's own manager supplies
    the model's settings, metrics and watchdog; ``fn`` stands in for the engine to inject faults."""
    srv = start_server({MODEL: minilm_folder}, overrides={MODEL: {"engine": {"timeout_ms": 200}}})
    mgr = srv.app[MANAGER]
    release = threading.Event()
    ran: list[list[str]] = []

    def fn(items: list[str]) -> list[str]:
        ran.append(items)
        if items == ["boom"]:
            raise ValueError("boom")
        if items == ["hang"]:
            release.wait(10)
        return [x.upper() for x in items]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            execute = engine_call(mgr, MODEL, pool, fn)
            assert await execute(["a", "b"]) == ["A", "B"]
            with pytest.raises(ValueError, match="boom"):
                await execute(["boom"])
            hung = execute(["hang"])
            began = loop.time()
            with pytest.raises(EngineTimeout, match="ran past 200 ms"):
                await hung
            assert 0.15 < loop.time() - began < 2.0
            queued = execute(["late"])  # behind the hung run in the one-thread pool
            pool.shutdown(wait=False, cancel_futures=True)
            with pytest.raises(EngineError, match="shut down before the batch ran"):
                await asyncio.wait_for(queued, 2)
            release.set()
        # The hung run ended after its batch was answered: its result went nowhere.
        assert isinstance(hung.exception(), EngineTimeout)  # type: ignore[attr-defined]
        assert ran == [["a", "b"], ["boom"], ["hang"]]

    asyncio.run_coroutine_threadsafe(scenario(), srv.loop).result(30)


@pytest.fixture
def slow_embeddings(
    start_server: Callable[..., ServerThread], minilm_folder: Path, faulty: list[Any]
) -> tuple[ServerThread, Any]:
    srv = start_server(
        {MODEL: minilm_folder},
        overrides={MODEL: {"batching": {"max_batch_size": 16, "measure_batch_size": False}}},
    )
    (engine,) = faulty
    return srv, engine


# What a request that ends early while its batch runs adds to Triton's statistics: the batch as an
# execution, the request as one failure, and nothing else of it (no rows, queue or compute).
FAILED_ONCE = {
    "inferences": 0,
    "executions": 1,
    "success": 0,
    "fail": 1,
    "queue": 0,
    "compute_infer": 0,
    "queue_ns": 0,
    "compute_infer_ns": 0,
}


def test_a_request_whose_client_hangs_up_while_its_batch_runs_counts_once_as_a_failure(
    slow_embeddings: tuple[ServerThread, Any],
) -> None:
    """Triton counts a request once, when it ends: inferences (its rows), queue and compute only
    for one that succeeded, a failure otherwise. A client that hangs up while its 16 rows run
    leaves one failure and the engine's execution, and no inferences: those rows were answered
    to nobody (they had counted 16 inferences and a request's worth of queue and compute besides
    the failure)."""
    srv, engine = slow_embeddings
    before = _counts(_stats(srv))
    engine.delay_s = 1.0  # ample for the server to see the hang-up while the batch runs
    data = json.dumps({"model": MODEL, "input": [f"sentence {i}" for i in range(16)]}).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    sock.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\nCache-Control: no-store\r\n\r\n".encode()
        + data
    )
    deadline = time.monotonic() + 30
    while engine.rows < 16:  # the batch is in the engine
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()
    after = _settled(srv, before, executions=1, fail=1)
    assert {k: after[k] - before[k] for k in after} == FAILED_ONCE
    # The same request answered counts its 16 rows, and itself once in queue and compute.
    engine.delay_s = 0
    status, body, _ = srv.post("/v1/embeddings", json.loads(data), {"Cache-Control": "no-store"})
    assert status == 200, body
    done = _counts(_stats(srv))
    assert {k: done[k] - after[k] for k in ("inferences", "success", "fail", "queue", "compute_infer")} == {
        "inferences": 16,
        "success": 1,
        "fail": 0,
        "queue": 1,
        "compute_infer": 1,
    }


def test_a_request_cut_by_its_deadline_while_its_batch_runs_counts_once_as_a_failure(
    slow_embeddings: tuple[ServerThread, Any],
) -> None:
    """A deadline that passes while the request's rows run answers 503 at once; the batch's end
    later adds the engine's execution and nothing else of that request."""
    srv, engine = slow_embeddings
    before = _counts(_stats(srv))
    engine.delay_s = 1.0
    body = {"model": MODEL, "input": [f"sentence {i}" for i in range(16)]}
    status, resp, headers = srv.post(
        "/v1/embeddings", body, {"Cache-Control": "no-store", "X-Timeout-Ms": "300"}
    )
    assert status == 503 and "deadline" in resp["error"]["message"] and headers["Retry-After"], resp
    after = _settled(srv, before, executions=1, fail=1)
    assert {k: after[k] - before[k] for k in after} == FAILED_ONCE


def test_a_batch_the_engine_failed_is_no_execution(slow_embeddings: tuple[ServerThread, Any]) -> None:
    """Triton's ``execution_count`` and ``batch_stats`` count successful executions: a batch
    whose engine call raised had counted as one, beside its request's failure."""
    srv, engine = slow_embeddings
    before, rows = _stats(srv), engine.rows
    engine.mode = "raise"
    body = {"model": MODEL, "input": ["one", "two", "three"]}
    status, resp, _ = srv.post("/v1/embeddings", body, {"Cache-Control": "no-store"})
    assert status == 503 and engine.rows - rows == 3, resp  # the rows reached the engine
    after = _stats(srv)
    assert _counts(after)["fail"] == _counts(before)["fail"] + 1
    assert after["execution_count"] == before["execution_count"]
    assert after["batch_stats"] == before["batch_stats"]


def _corruption(kind: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def corrupt(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        v = out["sentence_embedding"]
        bad = {
            "nan": np.where(np.arange(v.shape[1]) == 0, np.nan, v).astype(v.dtype),
            "narrow": v[:, :10],
            "integers": v.astype(np.int64),
            "a row short": v[:-1],
            "a row over": np.concatenate([v, v[:1]]),
        }[kind]
        return {"sentence_embedding": bad}

    return corrupt


@pytest.mark.parametrize("kind", ["nan", "narrow", "integers", "a row short", "a row over"])
def test_vectors_that_cannot_be_the_batchs_embeddings_are_an_engine_failure_not_an_answer(
    slow_embeddings: tuple[ServerThread, Any], kind: str
) -> None:
    """A broken engine (an fp16 overflow, a mis-exported graph) that returns NaN, vectors of the
    wrong width or dtype, or the wrong number of rows fails as the engine does: a 503 with
    Retry-After on both APIs, counted by the breaker, and nothing cached. Before, NaN went out as
    JSON nulls and a wrong width or dtype as a 200 (and the cache served it after the engine
    healed); a row short never answered until the engine timeout (60 s by default)."""
    srv, engine = slow_embeddings
    engine.corrupt = _corruption(kind)
    started = time.monotonic()
    status, body, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": f"broken {kind}"})
    assert status == 503 and body["error"]["code"] == "unavailable" and headers["Retry-After"], body
    assert time.monotonic() - started < 15, "answered when the engine returned, not at a timeout"
    infer = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [f"kserve {kind}"]}]}
    status, body, headers = srv.post(f"/v2/models/{MODEL}/infer", infer)
    assert status == 503 and "failed" in body["error"] and headers["Retry-After"], body
    engine.corrupt = None
    status, body, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": f"broken {kind}"})
    assert (status, headers["X-Appliance-Source"]) == (200, "engine"), "the failure was cached"
    vector = body["data"][0]["embedding"]
    assert len(vector) == 384 and all(isinstance(x, float) for x in vector)
    assert metric(srv, "appliance_compute_running") == 0.0


def test_an_engine_that_raises_stopiteration_fails_its_batch_at_once(
    slow_embeddings: tuple[ServerThread, Any],
) -> None:
    """An engine whose run raises StopIteration (a ``next()`` on an exhausted iterator inside it)
    fails its batch as any engine error does: asyncio refuses StopIteration into a future, so
    the batch had never ended and its requests waited for the engine timeout."""
    srv, engine = slow_embeddings

    def exhausted(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return next(iter([]))  # type: ignore[no-any-return]

    engine.corrupt = exhausted
    started = time.monotonic()
    status, body, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "exhausted"})
    assert status == 503 and headers["Retry-After"], body
    assert time.monotonic() - started < 15, "answered when the engine returned, not at a timeout"
    engine.corrupt = None
    assert srv.post("/v1/embeddings", {"model": MODEL, "input": "exhausted"})[0] == 200
