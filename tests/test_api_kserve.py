"""KServe v2 / Triton HTTP API, driven by the official `tritonclient` over loopback."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from appliance import pipeline
from appliance.api import kserve
from appliance.api.common import MANAGER, OFFLOOP, RESILIENCE
from tests.conftest import ServerThread, build_tensor_model, copy_fixture, make_repository

EMB = "all-minilm-l6-v2"
AFFINE = "affine"


def build_affine_model(folder: Path) -> Path:
    """A real ONNX tensor model: y = 2x + 1 (FP32 [-1, 4]) and s = sum(ids) (INT64 [-1, 3])."""
    folder.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, ["batch", 1])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"], name="mul"),
            helper.make_node("Add", ["x2", "one"], ["y"], name="add"),
            helper.make_node("ReduceSum", ["ids", "axes"], ["s"], name="sum", keepdims=1),
        ],
        "affine",
        [x, ids],
        [y, s],
        initializer=[two, one, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, folder / "model.onnx")
    (folder / "model.yaml").write_text(
        "name: affine\nkind: tensor\nartefacts: {model: model.onnx}\n"
        "batching: {max_batch_size: 8}\nqueue: {priority_levels: 2, default_priority: 2}\n"
    )
    return folder


@pytest.fixture
def server(start_server, minilm_folder: Path, tmp_path: Path) -> ServerThread:  # type: ignore[no-untyped-def]
    affine = build_affine_model(tmp_path / "src" / AFFINE)
    return start_server({EMB: minilm_folder, AFFINE: affine})


def triton(srv: ServerThread) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=srv.url.removeprefix("http://"))


def test_health_metadata_and_config(server: ServerThread) -> None:
    c = triton(server)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(EMB) and c.is_model_ready(AFFINE)
    meta = c.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    m = c.get_model_metadata(AFFINE)
    assert m["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
    ]
    cfg = c.get_model_config(AFFINE)
    assert cfg["max_batch_size"] == 8
    assert cfg["input"][0] == {"name": "x", "data_type": "TYPE_FP32", "dims": [4]}
    assert cfg["dynamic_batching"]["priority_levels"] == 2
    emb = c.get_model_config(EMB)
    assert emb["input"][0]["data_type"] == "TYPE_STRING"


@pytest.mark.parametrize("binary", [True, False])
def test_tensor_model_infer_json_and_binary(server: ServerThread, binary: bool) -> None:
    c = triton(server)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    inputs = [httpclient.InferInput("x", [2, 4], "FP32"), httpclient.InferInput("ids", [2, 3], "INT64")]
    inputs[0].set_data_from_numpy(x, binary_data=binary)
    inputs[1].set_data_from_numpy(ids, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("y", binary_data=binary), httpclient.InferRequestedOutput("s")]
    res = c.infer(AFFINE, inputs, outputs=outputs, request_id="r-1", priority=1, timeout=5_000_000)
    np.testing.assert_allclose(res.as_numpy("y"), 2 * x + 1)
    np.testing.assert_array_equal(res.as_numpy("s"), [[6], [15]])
    assert res.get_response()["id"] == "r-1"


def test_embedding_model_takes_bytes_and_matches_the_reference(server: ServerThread) -> None:
    ref = copy_fixture("minilm_reference.json")
    texts = np.array([s.encode() for s in ref["sentences"][:4]], dtype=object).reshape(-1, 1)
    inp = httpclient.InferInput("text", list(texts.shape), "BYTES")
    inp.set_data_from_numpy(texts)
    res = triton(server).infer(EMB, [inp])
    got = res.as_numpy("sentence_embedding")
    want = np.array(ref["embeddings"][:4], dtype=np.float32)
    assert got.shape == (4, 384)
    assert ((got * want).sum(1)).min() >= 0.9999


_IDS = {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"inputs": "x"}, 400, "inputs"),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]},
                    {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
                ]
            },
            400,
            "datatype",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]},
                    {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
                ]
            },
            400,
            "shape",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]},
                    {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
                ]
            },
            400,
            "elements",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
            400,
            "missing",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                    {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1.5, 2, 3]},
                ]
            },
            400,
            "INT64",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                    {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
                ],
                "outputs": [{"name": "zzz"}],
            },
            400,
            "zzz",
        ),
        (  # one output twice was answered twice, the second's binary_data applied to both
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                    {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
                ],
                "outputs": [{"name": "y"}, {"name": "y", "parameters": {"binary_data": True}}],
            },
            400,
            "'y' is requested twice",
        ),
        (  # tritonclient's InferRequestedOutput(class_count=3): Triton's classification extension
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                    {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
                ],
                "outputs": [{"name": "y", "parameters": {"classification": 3}}],
            },
            400,
            "classification",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                    {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
                ],
                "parameters": {"priority": 3},
            },
            400,
            "priority",
        ),
        *[
            (  # numpy turned it into infinity (FP32) and answered the model's output of it
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": dt, "data": [v, 0, 0, 0]}, _IDS]},
                400,
                f"input 'x': a value is out of range for {dt}",
            )
            # (FP16's, 1e6, is refused as decoded in test_api_malformed: this model takes FP32,
            # which is checked first, on the declared datatype.)
            for dt, v in [("FP32", 1e308), ("FP32", -(10**39))]
        ],
        *[
            (  # each was said to exceed the binary data
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": p}, _IDS]},
                400,
                f"input 'x': parameters.binary_data_size must be a non-negative integer, got {got}",
            )
            for p, got in [
                ({"binary_data_size": "16"}, '"16"'),
                ({"binary_data_size": -1}, "-1"),
                ({"binary_data_size": True}, "true"),
                ({"binary_data_size": 16.0}, "16.0"),
            ]
        ],
        *[
            (  # a Python repr: "value None", "value True"
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, v, 3, 4]}, _IDS]},
                400,
                f"input 'x': value {spelled} is not a valid FP32 value",
            )
            for v, spelled in [(None, "null"), (True, "true"), ("2", '"2"')]
        ],
        (  # numpy's names: "expected datatype float32, got int32"
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}, _IDS]},
            400,
            "input 'x': expected datatype FP32, got INT32",
        ),
        (  # the input under another name was "missing ['x']", and the name it had unsaid
            {"inputs": [{"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}, _IDS]},
            400,
            "expected inputs ['ids', 'x'], missing ['x'], unexpected ['y']",
        ),
        *[
            (  # each was flattened into four elements and served
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": data}, _IDS]},
                400,
                fragment,
            )
            for data, fragment in [
                ([[1, 2], [3, [4]]], "input 'x': nested data must follow the shape [1, 4] (or be flat)"),
                ([[1, 2, 3, [4]]], "input 'x': nested data mixes depths: a list where a value is expected"),
                ([[[1, 2, 3, 4]]], "input 'x': nested data must follow the shape [1, 4] (or be flat)"),
                (
                    [1, [2, 3], 4],
                    "input 'x': a list where a value is expected (nested data must follow the shape)",
                ),
                ([[1, 2], [3, 4]], "input 'x': nested data must follow the shape [1, 4] (or be flat)"),
            ]
        ],
    ],
)
def test_bad_infer_requests_get_triton_errors(
    server: ServerThread, body: dict[str, object], status: int, fragment: str
) -> None:
    got, resp, _ = server.post(f"/v2/models/{AFFINE}/infer", body)
    assert got == status and fragment in resp["error"], resp
    assert set(resp) == {"error"}


def test_unknown_model_and_truncated_binary_data(server: ServerThread) -> None:
    status, resp, _ = server.post("/v2/models/ghost/infer", {"inputs": []})
    assert status == 404 and "ghost" in resp["error"]
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
                {"name": "ids", "shape": [1, 3], "datatype": "INT64", "parameters": {"binary_data_size": 24}},
            ]
        }
    ).encode()
    status, resp, _ = server.post(
        f"/v2/models/{AFFINE}/infer",
        head + b"\0" * 20,
        {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )
    assert status == 400 and "binary" in resp["error"]


def test_an_input_gives_its_data_once_flat_or_nested_as_its_shape(server: ServerThread) -> None:
    """Triton's rule: 'data' and binary_data_size together are refused (the JSON data was silently
    ignored for the binary); nested data that follows the shape is the flat data's equal."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "data": [9, 9, 9, 9],
                    "parameters": {"binary_data_size": 16},
                },
                _IDS,
            ]
        }
    ).encode()
    status, resp, _ = server.post(
        f"/v2/models/{AFFINE}/infer",
        head + np.arange(4, dtype="<f4").tobytes(),
        {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )
    assert status == 400 and resp == {
        "error": "input 'x' has both 'data' and parameters.binary_data_size; give one of them"
    }, resp
    x = {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [[0, 1, 2, 3], [4, 5, 6, 7]]}
    ids = {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": [[1, 2, 3], [4, 5, 6]]}
    status, resp, _ = server.post(f"/v2/models/{AFFINE}/infer", {"inputs": [x, ids]})
    assert status == 200, resp
    assert resp["outputs"][0]["data"] == [2.0 * k + 1 for k in range(8)]
    assert resp["outputs"][1]["data"] == [6, 15]


def test_an_error_quotes_a_long_model_or_tensor_name_in_part(server: ServerThread) -> None:
    """A 100,000-character name came back whole in its error: an unknown model's 404, an unknown
    input's or output's 400 (a 100 KB answer for a 100 KB mistake). An error quotes the first 100
    characters and "…"; the rest of its message is as before."""
    long = "n" * 100_000
    cut = "n" * 100 + "…"
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    extra = {"name": long, "shape": [1], "datatype": "FP32", "data": [1]}
    infer = f"/v2/models/{AFFINE}/infer"
    for path, body, message in [
        (infer, {"inputs": [x, _IDS, extra]}, f"unexpected inference input '{cut}'"),
        (
            infer,
            {"inputs": [{**x, "name": long}, _IDS]},
            f"expected inputs ['ids', 'x'], missing ['x'], unexpected ['{cut}']",
        ),
        (
            infer,
            {"inputs": [_IDS, *({**extra, "name": f"{k}{long}"} for k in range(7))]},
            "', '4" + "n" * 99 + "…', '… 2 more']",  # the first five names, cut short
        ),
        (infer, {"inputs": [{**x, "datatype": long}, _IDS]}, f"input 'x': unknown datatype '{cut}'"),
        (infer, {"inputs": [{**x, "name": long, "shape": [1] * 33}, _IDS]}, f"input '{cut}': shape has 33"),
        (infer, {"inputs": [x, _IDS], "outputs": [{"name": long}]}, f"unexpected inference output '{cut}'"),
        (
            infer,
            {"inputs": [x, _IDS], "outputs": [{"name": long}, {"name": long}]},
            f"output '{cut}' is requested twice",
        ),
        (f"/v2/models/{long[:4000]}/infer", {"inputs": [x, _IDS]}, f"The model '{cut}' does not exist"),
        (f"/v2/models/{AFFINE}/versions/{long[:4000]}/infer", {"inputs": [x, _IDS]}, f"version {cut}"),
    ]:
        status, resp, _ = server.post(path, body)
        assert status in (400, 404) and set(resp) == {"error"}, (status, resp)
        assert message in resp["error"] and len(resp["error"]) < 1000, resp["error"][:1000]
    for path in (f"/v2/models/{long[:4000]}", f"/v2/models/{long[:4000]}/stats"):
        status, resp = server.get(path)
        assert status == 404 and cut in resp["error"] and len(resp["error"]) < 200, resp


def test_a_version_in_the_path_must_be_one_the_model_has(server: ServerThread) -> None:
    """Triton's rule: version 1 (the only one a repository holds) is served; any other is
    "not found", never silently answered by version 1."""
    body = {
        "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
        ]
    }
    status, resp, _ = server.post(f"/v2/models/{AFFINE}/versions/1/infer", body)
    assert status == 200 and resp["model_version"] == "1", resp
    for path in (
        f"/v2/models/{AFFINE}/versions/2/infer",
        f"/v2/models/{AFFINE}/versions/2",
        f"/v2/models/{AFFINE}/versions/2/config",
        f"/v2/models/{AFFINE}/versions/2/ready",
    ):
        status, resp, _ = server.post(path, body) if path.endswith("infer") else (*server.get(path), None)
        assert status == 404 and "version 2 is not found" in resp["error"], (path, resp)
    assert server.get(f"/v2/models/{AFFINE}/versions/1/ready")[0] == 200


def test_client_sees_a_clean_exception_for_errors(server: ServerThread) -> None:
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="missing"):
        triton(server).infer(AFFINE, [inp])


def test_a_batch_larger_than_the_queue_is_400_not_a_429_no_retry_can_fix(server: ServerThread) -> None:
    """An embedding model queues each row: 513 rows can never fit a queue of 512, so, as on
    /v1/embeddings, the answer is a 400 saying to split it (found by fuzzing: it was a 429 with
    Retry-After, which a client would retry forever)."""
    rows = 513
    body = {"inputs": [{"name": "text", "shape": [rows, 1], "datatype": "BYTES", "data": ["x"] * rows}]}
    status, resp, headers = server.post("/v2/models/all-minilm-l6-v2/infer", body)
    assert status == 400 and "513 inputs" in resp["error"] and "split" in resp["error"], resp
    assert "Retry-After" not in headers


def test_a_tensor_request_the_model_refuses_on_its_shapes_is_refused_before_its_data_is_read(
    server: ServerThread,
) -> None:
    """A resident model's shapes and batch size are checked on the shapes a request declares,
    before its data is decoded: that cost grows with the body, and 8 MB of JSON numbers for a
    1,000,000-row tensor held the event loop 1.5 s (every client waited) to be refused after.
    Here each request's data also holds a value no decoding takes, which no longer gets read."""
    x_ok = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    assert server.post(f"/v2/models/{AFFINE}/infer", {"inputs": [x_ok, _IDS]})[0] == 200  # resident
    ids9 = {**_IDS, "shape": [9, 3], "data": ["a"] * 27}
    for x, ids, fragment in [
        (
            {"shape": [9, 4], "data": ["a"] * 36},
            ids9,
            "input 'x': batch-size must be <= 8 for model 'affine'",
        ),
        ({"shape": [1, 5], "data": ["a"] * 5}, _IDS, "input 'x': expected shape [-1, 4], got [1, 5]"),
        ({"datatype": "FP64", "data": ["a"] * 4}, _IDS, "input 'x': expected datatype FP32, got FP64"),
    ]:
        body = {"inputs": [{**x_ok, **x}, ids]}
        status, resp, _ = server.post(f"/v2/models/{AFFINE}/infer", body)
        assert status == 400 and set(resp) == {"error"}, resp
        assert fragment in resp["error"], resp
    # Binary data too: its size is not even looked at.
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [9, 4], "datatype": "FP32", "parameters": {"binary_data_size": 3}},
                ids9,
            ]
        }
    ).encode()
    status, resp, _ = server.post(
        f"/v2/models/{AFFINE}/infer",
        head + b"abc",
        {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )
    assert status == 400 and "batch-size must be <= 8" in resp["error"], resp


def _large_infer_body() -> bytes:
    """A valid request to the affine model whose body is over ``OFFLOOP_BYTES``: its size, not its
    content, decides where it is decoded (JSON's whitespace pads it)."""
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    return b" " * kserve.OFFLOOP_BYTES + json.dumps({"inputs": [x, _IDS]}).encode()


def _hold_decodes(monkeypatch: pytest.MonkeyPatch, how_many: int) -> tuple[threading.Event, threading.Event]:
    """The first ``how_many`` decodes wait for the returned ``release``; ``all_held`` is set once
    they all wait (a decode long enough to see what else the server does meanwhile)."""
    all_held, release = threading.Event(), threading.Event()
    held = [0]
    lock = threading.Lock()
    real = kserve.decode_inputs

    def decode(doc: dict[str, Any], tail: bytes) -> dict[str, np.ndarray]:
        with lock:
            hold = held[0] < how_many
            held[0] += hold
            if held[0] == how_many:
                all_held.set()
        if hold:
            release.wait(60)
        return real(doc, tail)

    monkeypatch.setattr(kserve, "decode_inputs", decode)
    return all_held, release


def test_a_large_infer_body_is_decoded_off_the_event_loop(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding a body's tensors costs time in proportion to it (16 MB of JSON numbers: seconds),
    and it ran on the event loop, where every other client (probes, streams, small requests)
    waited for it. A large body is decoded on a worker thread: while one decode is held there,
    /healthz and a small infer request are answered; then the large one is too."""
    held, release = _hold_decodes(monkeypatch, 1)
    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(server.post, f"/v2/models/{AFFINE}/infer", _large_infer_body())
        try:
            assert held.wait(30)
            with urllib.request.urlopen(server.url + "/healthz", timeout=10) as resp:
                assert resp.status == 200
            x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}
            status, resp, _ = server.post(f"/v2/models/{AFFINE}/infer", {"inputs": [x, _IDS]})
            assert status == 200 and resp["outputs"][0]["data"] == [1.0] * 4, resp
            assert not large.done()
        finally:
            release.set()
        status, resp, _ = large.result(60)
    assert status == 200 and resp["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0], resp


def test_a_flood_of_large_bodies_is_refused_with_503_once_their_decodes_are_all_taken(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decodes of large bodies are bounded: the worker threads run a few, a few more wait,
    and one past that is refused at once with a 503 and Retry-After (in KServe's shape), rather
    than queueing decoding work without end behind a flood. Those admitted are all answered."""
    offloop = server.app[OFFLOOP]
    held, release = _hold_decodes(monkeypatch, offloop.workers)
    path = f"/v2/models/{AFFINE}/infer"
    with ThreadPoolExecutor(offloop.limit) as pool:
        admitted = [pool.submit(server.post, path, _large_infer_body()) for _ in range(offloop.limit)]
        try:
            assert held.wait(30)
            deadline = time.monotonic() + 30
            while offloop.pending < offloop.limit and time.monotonic() < deadline:
                time.sleep(0.01)  # until the rest wait for a thread (nothing signals that)
            status, resp, headers = server.post(path, _large_infer_body())
            assert status == 503 and "Retry-After" in headers, (status, resp)
            assert set(resp) == {"error"} and "large request bodies" in resp["error"], resp
        finally:
            release.set()
        assert [f.result(60)[0] for f in admitted] == [200] * offloop.limit
    assert offloop.pending == 0


def _infer_binary(srv: ServerThread, model: str, x: np.ndarray) -> tuple[int, Any, dict[str, str]]:
    """``x`` as the one FP32 input ``x``, its bytes in the binary tail (as tritonclient sends)."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    return srv.post(f"/v2/models/{model}/infer", head + x.tobytes(), headers)


def test_a_large_tensors_cache_key_is_hashed_off_the_event_loop(
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The response cache's key covers a request's tensor bytes. It was hashed on the event loop
    (~30 ms for 48 MB, a stall for every other client); tensors past ``DIGEST_BLOB_BYTES`` are
    hashed where the body is decoded, and the loop hashes only their 32-byte digest. The key
    still tells contents apart: the same tensor again is a hit, a tensor that differs is not."""
    width = 1 << 18  # FP32 elements: one row is 1 MiB, past the bound
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    node = helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1)
    srv = start_server({"total": build_tensor_model(tmp_path / "src" / "total", [node], [x], [s], [axes])})
    hashed_on_loop: list[int] = []
    real = pipeline.cache_key

    def cache_key(identity: str, request: Any, blobs: Any = ()) -> str:
        hashed_on_loop.append(sum(len(b) for b in blobs))  # the pipeline's cache read: on the loop
        return real(identity, request, blobs)

    monkeypatch.setattr(pipeline, "cache_key", cache_key)
    ones = np.ones((1, width), np.float32)
    status, resp, headers = _infer_binary(srv, "total", ones)
    assert status == 200 and resp["outputs"][0]["data"] == [width], resp
    assert headers["X-Appliance-Source"] == "engine"
    srv.call(lambda: srv.app[RESILIENCE].cache.flush())  # the cache writes behind the answer
    status, resp, headers = _infer_binary(srv, "total", ones)
    assert status == 200 and headers["X-Appliance-Source"] == "cache"
    assert resp["outputs"][0]["data"] == [width], resp
    twos = ones * 2
    status, resp, headers = _infer_binary(srv, "total", twos)
    assert status == 200 and headers["X-Appliance-Source"] == "engine"
    assert resp["outputs"][0]["data"] == [2 * width], resp
    assert len(hashed_on_loop) == 3 and max(hashed_on_loop) == 32, hashed_on_loop


def test_kserve_takes_truncate_in_the_request_parameters(server: ServerThread) -> None:
    """An input over the context is a 400 that says how to have it cut; on KServe that is the
    request's parameters (found by a new user: the error named a field KServe cannot send)."""
    long = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["lighthouse keeper " * 600]}
    status, resp, _ = server.post("/v2/models/all-minilm-l6-v2/infer", {"inputs": [long]})
    assert status == 400 and "parameters" in resp["error"], resp
    status, resp, _ = server.post(
        "/v2/models/all-minilm-l6-v2/infer", {"inputs": [long], "parameters": {"truncate": True}}
    )
    assert status == 200 and resp["outputs"][0]["shape"] == [1, 384], resp
    status, resp, _ = server.post(
        "/v2/models/all-minilm-l6-v2/infer", {"inputs": [long], "parameters": {"truncate": "yes"}}
    )
    assert status == 400 and "truncate" in resp["error"]
    # The cut answer is cached under its own key: the uncut request is still refused.
    status, _, _ = server.post("/v2/models/all-minilm-l6-v2/infer", {"inputs": [long]})
    assert status == 400


def test_an_embedding_models_input_errors_name_its_tensor_text(server: ServerThread) -> None:
    """Found by a conformance probe: the errors named OpenAI's field ("'input' must not be
    empty", "input[0] is an empty string"), which a KServe request does not have."""
    url = "/v2/models/all-minilm-l6-v2/infer"
    cases = [
        ({"name": "text", "shape": [0, 1], "datatype": "BYTES", "data": []}, "'text' must not be empty"),
        (
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", ""]},
            "text[1] is an empty string",
        ),
        (
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["lighthouse keeper " * 600]},
            "text[0] has",
        ),
    ]
    for tensor, fragment in cases:
        status, resp, _ = server.post(url, {"inputs": [tensor]}, {"Cache-Control": "no-store"})
        assert status == 400 and fragment in resp["error"] and "input" not in resp["error"][:12], resp


def test_statistics_in_tritons_shape_for_tritonclient(server: ServerThread) -> None:
    """Triton's statistics extension, as ``get_inference_statistics`` (and perf_analyzer) read it:
    inferences count rows, executions count engine batches, durations are in nanoseconds."""
    c = triton(server)
    before = c.get_inference_statistics(model_name=EMB)["model_stats"][0]
    inp = httpclient.InferInput("text", [3], "BYTES")
    inp.set_data_from_numpy(np.array([b"one", b"two", b"three"], dtype=object))
    c.infer(EMB, [inp])
    (stat,) = c.get_inference_statistics(model_name=EMB)["model_stats"]
    assert stat["name"] == EMB and stat["version"] == "1" and stat["last_inference"] > 0
    assert stat["inference_count"] - before["inference_count"] == 3
    assert 1 <= stat["execution_count"] - before["execution_count"] <= 3
    infer = stat["inference_stats"]
    assert infer["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    assert infer["success"]["ns"] > 0 and infer["compute_infer"]["ns"] > 0
    assert sum(b["compute_infer"]["count"] for b in stat["batch_stats"]) == stat["execution_count"]
    # Queue and compute count the request once, with its own durations, as Triton does: rows
    # counted one each (and each charged its batch's time) made perf_analyzer, which divides by
    # the request count, show compute n times too long for a request of n rows.
    for kind in ("queue", "compute_infer"):
        assert infer[kind]["count"] - before["inference_stats"][kind]["count"] == 1, kind
    spent = infer["success"]["ns"] - before["inference_stats"]["success"]["ns"]
    assert infer["compute_infer"]["ns"] - before["inference_stats"]["compute_infer"]["ns"] <= spent
    # Metadata and readiness are no inferences; an answer from the response cache is a cache hit.
    c.get_model_metadata(EMB)
    c.is_model_ready(EMB)
    body = {"model": EMB, "input": "a sentence for the cache"}
    server.post("/v1/embeddings", body)
    server.call(lambda: server.app[RESILIENCE].cache.flush())  # the cache writes behind the answer
    server.post("/v1/embeddings", body)
    (again,) = c.get_inference_statistics(model_name=EMB)["model_stats"]
    assert again["inference_stats"]["success"]["count"] == infer["success"]["count"] + 2
    assert again["inference_stats"]["cache_hit"]["count"] == infer["cache_hit"]["count"] + 1
    # Triton's queue count includes cache hits.
    assert again["inference_stats"]["queue"]["count"] == infer["queue"]["count"] + 2
    assert again["inference_count"] == stat["inference_count"] + 1
    everything = c.get_inference_statistics()["model_stats"]
    assert EMB in [m["name"] for m in everything]
    assert "statistics" in c.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.get_inference_statistics(model_name="nope")


# -- Triton's generate extension, on the real SmolLM2 --

LLM = "smollm2-135m-instruct"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm_server(
    tmp_path_factory: pytest.TempPathFactory, smollm_folder: Path, minilm_folder: Path
) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("generate")
    repo = make_repository(tmp, {LLM: smollm_folder, EMB: minilm_folder})
    cfg = {
        "model_repository": str(repo),
        "data_dir": str(tmp / "data"),
        "admin": {"port": 0, "socket": str(tmp / "data" / "admin.sock")},
    }
    srv = ServerThread(cfg).start()
    yield srv
    srv.stop()


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """The data of every event of a stream (keep-alive comments left out)."""
    return [json.loads(e[6:]) for e in raw.decode().split("\n\n") if e.startswith("data: ")]


def test_generate_answers_what_v1_completions_answers(llm_server: ServerThread) -> None:
    """Greedy, /generate's text_output is /v1/completions' text for the same prompt and
    max_tokens: the same machinery, in the generate extension's shape."""
    status, ref, _ = llm_server.post(
        "/v1/completions", {"model": LLM, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}, NO_CACHE
    )
    assert status == 200 and ref["choices"][0]["text"]
    expected = ref["choices"][0]["text"]
    # vLLM's style (parameters), TensorRT-LLM's (top-level fields), and the versioned path.
    for path, body in [
        (
            f"/v2/models/{LLM}/generate",
            {"text_input": PROMPT, "parameters": {"max_tokens": 8, "temperature": 0}},
        ),
        (
            f"/v2/models/{LLM}/versions/1/generate",
            {"text_input": PROMPT, "max_tokens": 8, "temperature": 0.0},
        ),
    ]:
        status, resp, headers = llm_server.post(path, body, NO_CACHE)
        assert status == 200, resp
        assert resp == {"model_name": LLM, "model_version": "1", "text_output": expected}
        assert headers["Content-Type"].startswith("application/json")
        assert headers["X-Appliance-Source"] == "engine"
    # vLLM's sampling_parameters, an id echoed, and the prompt repeated when asked for.
    body = {
        "text_input": PROMPT,
        "id": "req-1",
        "exclude_input_in_output": False,
        "sampling_parameters": json.dumps({"max_tokens": 8, "temperature": 0}),
    }
    status, resp, _ = llm_server.post(f"/v2/models/{LLM}/generate", body, NO_CACHE)
    assert status == 200 and resp["text_output"] == PROMPT + expected and resp["id"] == "req-1"


def test_generate_stream_sends_the_answer_as_triton_events(llm_server: ServerThread) -> None:
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 8, "temperature": 0, "stream": True}}
    status, whole, _ = llm_server.post(
        f"/v2/models/{LLM}/generate", {**body, "parameters": {"max_tokens": 8, "temperature": 0}}, NO_CACHE
    )
    assert status == 200
    status, raw, headers = llm_server.post(f"/v2/models/{LLM}/generate_stream", body, NO_CACHE)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert len(events) > 1  # token by token
    assert all(set(e) == {"model_name", "model_version", "text_output"} for e in events)
    assert all(e["model_name"] == LLM and e["model_version"] == "1" for e in events)
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert b"[DONE]" not in raw  # OpenAI's terminator is no part of Triton's stream
    # A deterministic answer from the cache is replayed as one event.
    llm_server.post(f"/v2/models/{LLM}/generate", {"text_input": "Hello", "max_tokens": 3, "temperature": 0})
    llm_server.call(lambda: llm_server.app[RESILIENCE].cache.flush())
    status, raw, headers = llm_server.post(
        f"/v2/models/{LLM}/generate_stream", {"text_input": "Hello", "max_tokens": 3, "temperature": 0}
    )
    assert status == 200 and headers["X-Appliance-Source"] == "cache"
    _, again, _ = llm_server.post(
        f"/v2/models/{LLM}/generate", {"text_input": "Hello", "max_tokens": 3, "temperature": 0}
    )
    assert [e["text_output"] for e in sse_events(raw)] == [again["text_output"]]


def test_a_generate_models_metadata_and_config_show_the_generate_interface(llm_server: ServerThread) -> None:
    """What Triton's vLLM backend shows: text in, text out, no Triton batching, decoupled; its raw
    decoder tensors (input_ids, past_key_values.*) are not what a client can send."""
    c = triton(llm_server)
    assert c.is_model_ready(LLM)
    assert "generate" in c.get_server_metadata()["extensions"]
    meta = c.get_model_metadata(LLM)
    assert meta["inputs"] == [
        {"name": "text_input", "datatype": "BYTES", "shape": [1]},
        {"name": "stream", "datatype": "BOOL", "shape": [1]},
        {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1]},
        {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [1]},
    ]
    assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
    cfg = c.get_model_config(LLM)
    assert cfg["max_batch_size"] == 0
    assert cfg["model_transaction_policy"] == {"decoupled": True}
    assert cfg["input"][0] == {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]}
    assert cfg["input"][1] == {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True}
    assert cfg["output"] == [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]}]
    assert "model_transaction_policy" not in c.get_model_config(EMB)
    # /infer does not serve a decoupled model over HTTP (nor does Triton): it says where to go.
    doc = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}]}
    status, resp, _ = llm_server.post(f"/v2/models/{LLM}/infer", doc)
    assert status == 400 and f"/v2/models/{LLM}/generate" in resp["error"]


def test_a_generate_models_config_has_no_dynamic_batching_as_tritons_vllm_backend_shows(
    llm_server: ServerThread,
) -> None:
    """Triton's vLLM backend leaves batching to the engine: its config is decoupled, with
    max_batch_size 0 and no dynamic_batching. Ours showed a dynamic_batching with preferred batch
    sizes beside max_batch_size 0, a config Triton itself refuses to load, so a client that
    reads it (perf_analyzer, model analyzer) took the chat model for a Triton-batched one."""
    status, cfg = llm_server.get(f"/v2/models/{LLM}/config")
    assert status == 200, cfg
    assert cfg["max_batch_size"] == 0 and cfg["model_transaction_policy"] == {"decoupled": True}
    assert "dynamic_batching" not in cfg, cfg
    # An embedding model is batched by Triton's rules: its dynamic_batching stays.
    emb = llm_server.get(f"/v2/models/{EMB}/config")[1]
    assert emb["max_batch_size"] > 0 and "preferred_batch_size" in emb["dynamic_batching"], emb


def test_tensorrt_llms_quick_start_request_is_served_its_empty_word_lists_meaning_none(
    llm_server: ServerThread,
) -> None:
    """TensorRT-LLM's README sends ``"bad_words": ""`` and ``"stop_words": ""``, its way of saying
    none; both were refused (an unexpected field, an empty stop string)."""
    base = {"text_input": PROMPT, "max_tokens": 8, "temperature": 0}
    _, ref, _ = llm_server.post(f"/v2/models/{LLM}/generate", base, NO_CACHE)
    for words in ({"bad_words": "", "stop_words": ""}, {"bad_words": [], "stop_words": None}):
        status, resp, _ = llm_server.post(f"/v2/models/{LLM}/generate", {**base, **words}, NO_CACHE)
        assert status == 200, resp
        assert resp["text_output"] == ref["text_output"]
    # Words to ban cannot be honoured: refused, naming the field, not answered without the ban.
    for body in (
        {**base, "bad_words": "Paris"},
        {**base, "parameters": {"bad_words": ["Paris"]}},
        {**base, "sampling_parameters": json.dumps({"bad_words": ["Paris"]})},
    ):
        status, resp, _ = llm_server.post(f"/v2/models/{LLM}/generate", body)
        assert status == 400 and "'bad_words' is not supported" in resp["error"], resp


def test_a_generate_models_metadata_and_config_do_not_load_it(llm_server: ServerThread) -> None:
    """Its interface is static and its config its tunables: a GET of either loaded an unloaded
    generate model (seconds, 1.3 GB, a keep-alive reset) to answer what needs no engine."""
    from tests.test_admin import admin

    status, _, _ = llm_server.post(f"/v2/models/{LLM}/generate", {"text_input": "Hi", "max_tokens": 1})
    assert status == 200
    paths = [f"/v2/models/{LLM}", f"/v2/models/{LLM}/config", f"/v2/models/{LLM}/versions/1/config"]
    resident = [llm_server.get(p) for p in paths]
    assert admin(llm_server, "POST", f"/admin/models/{LLM}/unload")[1]["state"] == "available"
    assert [llm_server.get(p) for p in paths] == resident  # the same answers, status 200 each
    assert all(status == 200 for status, _ in resident)
    assert llm_server.call(lambda: llm_server.app[MANAGER].slots[LLM].runtime) is None  # still unloaded


def test_metadata_and_config_of_a_model_not_loaded_are_read_from_its_file_without_loading_it(
    start_server: Any, minilm_folder: Path, tmp_path: Path
) -> None:
    """An embedding or tensor model's metadata and config are its tensors and its tunables: a GET
    of either loaded an unloaded model (seconds, its memory, evicting another, waited for
    without a bound). They are read from its ONNX file instead, the same answers as resident."""
    from tests.test_admin import admin

    reduce = build_tensor_model(  # each request alone: its output is not one row per input row
        tmp_path / "src" / "reduce",
        [helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=1)],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0])],
    )
    models = {EMB: minilm_folder, AFFINE: build_affine_model(tmp_path / "src" / AFFINE), "reduce": reduce}
    # Preferred sizes set for all: a model that runs each request alone must not show them.
    srv = start_server(models, config={"defaults": {"batching": {"preferred_batch_sizes": [2, 4]}}})
    paths = [f"/v2/models/{m}{tail}" for m in models for tail in ("", "/config", "/versions/1/config")]
    resident = [srv.get(p) for p in paths]
    assert all(status == 200 for status, _ in resident), resident
    reduce_cfg = srv.get("/v2/models/reduce/config")[1]
    assert reduce_cfg["max_batch_size"] == 0
    # Its queues still apply, but no preferred batch size: Triton refuses one over max_batch_size.
    assert "preferred_batch_size" not in reduce_cfg["dynamic_batching"], reduce_cfg
    assert srv.get(f"/v2/models/{AFFINE}/config")[1]["dynamic_batching"]["preferred_batch_size"] == [2, 4]
    assert reduce_cfg["dynamic_batching"]["priority_levels"] >= 1
    for m in models:
        assert admin(srv, "POST", f"/admin/models/{m}/unload")[1]["state"] == "available"
    assert [srv.get(p) for p in paths] == resident
    assert srv.call(lambda: [srv.app[MANAGER].slots[m].runtime for m in models]) == [None] * 3


def test_metadata_of_a_model_that_names_no_model_artefact_is_a_503_as_its_load(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Described from its file, a model whose model.yaml names no 'model' artefact is refused as
    loading it is (a 503 saying why), not a 500 from the missing key."""
    from appliance import models

    monkeypatch.setattr(models, "RESCAN_MIN_S", 0.0)
    folder = Path(server.cfg.model_repository) / "odd"
    folder.mkdir()
    (folder / "graph.onnx").symlink_to(Path(server.cfg.model_repository) / AFFINE / "model.onnx")
    (folder / "model.yaml").write_text("name: odd\nkind: tensor\nartefacts: {graph: graph.onnx}\n")
    status, body, headers = server.request("GET", "/v2/models/odd")
    assert status == 503 and "Retry-After" in headers and "'model' artefact" in body["error"], body


def test_metadata_of_a_model_whose_file_is_slow_to_read_is_a_503_within_its_bound(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading an unloaded model's interface waits at most INTERFACE_WAIT_S (a stalled disk), then
    says to come back; the read goes on, and its answer serves the next request."""
    import threading

    from appliance import models
    from tests.test_admin import admin

    real, disk = models.graph_io, threading.Event()

    def stalled(path: Path) -> Any:
        disk.wait(30)
        return real(path)

    monkeypatch.setattr(models, "graph_io", stalled)
    monkeypatch.setattr(models, "INTERFACE_WAIT_S", 0.2)
    _, resident = server.get(f"/v2/models/{AFFINE}")
    assert admin(server, "POST", f"/admin/models/{AFFINE}/unload")[1]["state"] == "available"
    status, body, headers = server.request("GET", f"/v2/models/{AFFINE}")
    assert status == 503 and "Retry-After" in headers and "slow to read" in body["error"], body
    disk.set()
    assert server.get(f"/v2/models/{AFFINE}") == (200, resident)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "'text_input' is required"),
        ({"text_input": 5}, "'text_input' must be a string, got a number"),
        ({"text_input": ["a", "b"]}, "'text_input' must be a string"),
        ({"text_input": ""}, "'text_input' must not be empty"),  # not /v1/completions' 'prompt'
        ({"text_input": [""]}, "'text_input' must not be empty"),
        ({"text_input": "x", "stream": True}, "'stream' must be false on /generate"),
        ({"text_input": "x", "parameters": {"stream": True}}, "'stream' must be false on /generate"),
        ({"text_input": "x", "stream": "no"}, "'stream' must be true or false"),
        ({"text_input": "x", "parameters": {"temperature": "hot"}}, "'temperature'"),
        ({"text_input": "x", "max_tokens": 0}, "'max_tokens' must be at least 1"),
        ({"text_input": "x", "stop_words": [1]}, "'stop_words' must be a string or a list of strings"),
        ({"text_input": "x", "beam_width": 2}, "unexpected field 'beam_width'"),
        ({"text_input": "x", "parameters": {"beam_width": 2}}, "unexpected parameter 'beam_width'"),
        # In JSON's words, not Python's (they said "got list", "got dict").
        ({"text_input": "x", "parameters": []}, "'parameters' must be an object, got an array"),
        (
            {"text_input": "x", "max_tokens": {"a": 1}},
            "'max_tokens' must be an integer of at most 64 bits, got an object",
        ),
        (
            {"text_input": "x", "parameters": {"seed": "1"}},
            "'seed' must be an integer of at most 64 bits, got a string",
        ),
        ({"text_input": "x", "parameters": {"priority": "high"}}, "'priority'"),
        ({"text_input": "x", "max_tokens": 2, "parameters": {"max_tokens": 3}}, "'max_tokens' is set both"),
        ({"text_input": "x", "sampling_parameters": "{"}, "'sampling_parameters' must be a JSON object"),
        # Read as the body is: these were 500s (a RecursionError; a stop string the cache key
        # could not encode) or, past 64 bits, taken where the body refuses them.
        (
            {"text_input": "x", "sampling_parameters": '{"stop": ' + "[" * 2000 + "]" * 2000 + "}"},
            "'sampling_parameters' must be a JSON object as a string: its text is nested more than",
        ),
        (
            {"text_input": "x", "temperature": 0, "sampling_parameters": '{"stop": ["\\ud800"]}'},
            "'sampling_parameters' must be a JSON object as a string: its text is not valid JSON",
        ),
        (
            {"text_input": "x", "sampling_parameters": '{"seed": 1000000000000000000000000000000}'},
            "'seed' must be an integer of at most 64 bits",
        ),
        ({"text_input": "x", "id": 7}, "'id' must be a string"),
    ],
)
def test_bad_generate_requests_are_kserve_400s_naming_the_field(
    llm_server: ServerThread, body: dict[str, Any], fragment: str
) -> None:
    status, resp, _ = llm_server.post(f"/v2/models/{LLM}/generate", body)
    assert status == 400 and set(resp) == {"error"}, resp
    assert fragment in resp["error"], resp


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"stream": False}, "'stream' must be true or unset on /generate_stream"),
        ({"parameters": {"stream": False}}, "'stream' must be true or unset on /generate_stream"),
        ({"exclude_input_in_output": False}, "'exclude_input_in_output' must be true or unset"),
    ],
)
def test_generate_stream_refuses_the_flags_it_cannot_honour_rather_than_ignoring_them(
    llm_server: ServerThread, body: dict[str, Any], fragment: str
) -> None:
    """A stream asked not to stream, or to repeat the prompt (Triton's vLLM backend refuses
    that too), was streamed without the prompt as if the flags were not there."""
    doc = {"text_input": PROMPT, "max_tokens": 2, "temperature": 0, **body}
    status, resp, _ = llm_server.post(f"/v2/models/{LLM}/generate_stream", doc, NO_CACHE)
    assert status == 400 and set(resp) == {"error"}, resp
    assert fragment in resp["error"], resp


def test_generate_on_a_model_that_does_not_generate_names_its_kind_and_route(
    llm_server: ServerThread,
) -> None:
    for route in ("generate", "generate_stream"):
        status, resp, _ = llm_server.post(f"/v2/models/{EMB}/{route}", {"text_input": "a sentence"})
        assert status == 400 and set(resp) == {"error"}
        assert "embedding model" in resp["error"] and f"/v2/models/{EMB}/infer" in resp["error"]
    status, resp, _ = llm_server.post("/v2/models/ghost/generate", {"text_input": "x"})
    assert status == 404 and "ghost" in resp["error"]
    status, resp, _ = llm_server.post(f"/v2/models/{LLM}/versions/2/generate", {"text_input": "x"})
    assert status == 404 and "version 2" in resp["error"]
