"""Shedding before work (appliance.api.shedding) through the real server over loopback: a request
whose priority level's queue is full is refused in the front door from its model, priority and
deadline alone, with everything a refusal carries, and a request it lets through is served as
before.

A full queue needs a busy engine: the test-only fault hook (conftest.FaultyEngine) slows the real
engine so that a batch of one runs while one more request waits in the priority-3 queue.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.api.common import MANAGER, PIPELINE
from tests.conftest import ServerThread, metric

MODEL = "all-minilm-l6-v2"
BUSY_S = 1.5  # how long the engine holds each batch while a test runs


def queued(srv: ServerThread, level: int) -> int:
    return int(srv.call(lambda: srv.app[MANAGER].slots[MODEL].runtime.batcher.queued(level)))


def embed(
    srv: ServerThread, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    return srv.post("/v1/embeddings", {"model": MODEL, **body}, headers)


@pytest.fixture
def full(start_server, minilm_folder: Path, faulty) -> Iterator[ServerThread]:  # type: ignore[no-untyped-def]
    """A server whose priority-3 queue (one place) is full: one batch of one in the slowed engine,
    one request waiting behind it."""
    srv = start_server(
        {MODEL: minilm_folder},
        overrides={
            MODEL: {
                "queue": {"priority_levels": 3, "default_priority": 2, "max_queue_size": 1},
                "batching": {"max_batch_size": 1},
                "cache": {"enabled": False},
            }
        },
        config={"server": {"max_body_bytes": 4096}},
    )
    faulty[0].delay_s = BUSY_S
    before = faulty[0].rows  # the model's warm-up ran rows too
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(embed, srv, {"input": "runs first"}, {"X-Priority": "3"})
        deadline = time.monotonic() + 10
        while faulty[0].rows == before and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = pool.submit(embed, srv, {"input": "waits"}, {"X-Priority": "3"})
        while queued(srv, 3) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queued(srv, 3) == 1
        yield srv
        faulty[0].delay_s = 0.0
        assert running.result()[0] == 200 and waiting.result()[0] == 200


def test_a_request_for_a_full_level_is_refused_with_everything_a_refusal_carries(full: ServerThread) -> None:
    status, body, headers = embed(full, {"input": "no room"}, {"X-Priority": "3", "X-Request-Id": "r-42"})
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert headers["X-Request-Id"] == "r-42"
    error = body["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full"), error
    assert "priority 3" in error["message"] and set(error) == {"message", "type", "param", "code"}
    # Generated when the client sends none.
    assert embed(full, {"input": "no room"}, {"X-Priority": "3"})[2]["X-Request-Id"]
    assert metric(full, 'appliance_shed_total{reason="queue_full"}') == 2
    assert (
        metric(full, 'appliance_rejections_total{model="all-minilm-l6-v2",priority="3",reason="queue_full"}')
        == 2
    )
    assert metric(full, 'appliance_requests_total{api="openai",model="all-minilm-l6-v2",status="429"}') == 2
    series = 'appliance_request_duration_seconds_count{api="openai",model="all-minilm-l6-v2",priority="3"}'
    assert metric(full, series) == 2
    # Refused before work: never in flight, so the gauge counts only the two that are.
    assert metric(full, 'appliance_inflight_requests{api="openai"}') == 2


def test_the_priority_in_the_body_wins_over_the_header(full: ServerThread) -> None:
    assert embed(full, {"input": "no room at 3", "priority": 3}, {"X-Priority": "1"})[0] == 429
    assert embed(full, {"input": "room at 1", "priority": 1}, {"X-Priority": "3"})[0] == 200
    # No level named: the model's default (2), whose queue has room.
    assert embed(full, {"input": "room at the default"})[0] == 200


def test_a_refused_request_is_not_validated_further(full: ServerThread) -> None:
    """Shedding reads only the model, priority and deadline: with its level full, a request with a
    malformed input is refused, as it would have cost work to find out more."""
    status, body, _ = embed(full, {"input": 5}, {"X-Priority": "3"})
    assert status == 429 and body["error"]["code"] == "queue_full"


def test_what_shedding_cannot_read_is_answered_by_the_route(full: ServerThread) -> None:
    """Invalid JSON, a malformed priority or deadline, an unknown model, a body over the size limit:
    the route's precise answer, not a refusal."""
    status, body, _ = full.post("/v1/embeddings", b'{"model": ', {"X-Priority": "3"})
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body, _ = embed(full, {"input": "x"}, {"X-Priority": "three"})
    assert status == 400 and body["error"]["param"] == "priority"
    status, body, _ = embed(full, {"input": "x"}, {"X-Priority": "3", "X-Timeout-Ms": "-1"})
    assert status == 400 and body["error"]["param"] == "X-Timeout-Ms"
    status, body, _ = full.post("/v1/embeddings", {"model": "nope", "input": "x"}, {"X-Priority": "3"})
    assert status == 404
    status, body, _ = embed(full, {"input": "x" * 5000}, {"X-Priority": "3"})
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_refusals_keep_the_connection_and_end_when_the_queue_drains(full: ServerThread) -> None:
    """The body of a refused request is consumed: the next request on the same keep-alive
    connection is read correctly. Once the queue has room the same request is admitted (a
    refusal is replayed only while its queue stays full)."""
    conn = http.client.HTTPConnection("127.0.0.1", full.port, timeout=30)
    body = json.dumps({"model": MODEL, "input": "again and again"})
    headers = {"Content-Type": "application/json", "X-Priority": "3"}
    statuses = []
    for _ in range(5):
        conn.request("POST", "/v1/embeddings", body, headers)
        response = conn.getresponse()
        payload = json.loads(response.read())
        statuses.append(response.status)
        assert "error" in payload
    assert statuses == [429] * 5
    deadline = time.monotonic() + 3 * BUSY_S + 5
    while queued(full, 3) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    while True:  # the waiting request may still be in the engine: room at level 3 once it is
        conn.request("POST", "/v1/embeddings", body, headers)
        response = conn.getresponse()
        payload = json.loads(response.read())
        if response.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert response.status == 200 and payload["data"][0]["object"] == "embedding"
    conn.close()


# KServe infer: the model is in the path; the priority and deadline in the body's ``parameters``.
INFER = f"/v2/models/{MODEL}/infer"


def infer_doc(text: str, parameters: Any = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [text]}]}
    if parameters is not None:
        doc["parameters"] = parameters
    return doc


def binary_infer(text: str, priority: int) -> tuple[bytes, dict[str, str]]:
    """An infer request with the binary tensor data extension: a JSON part, then the tensor."""
    data = text.encode()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": 4 + len(data)},
                }
            ],
            "parameters": {"priority": priority},
        }
    ).encode()
    body = head + len(data).to_bytes(4, "little") + data
    return body, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def admissions(srv: ServerThread) -> list[str]:
    """The models the real ``Pipeline.admit`` (a route's first step) is called for from now on."""
    pipeline = srv.app[PIPELINE]
    admitted: list[str] = []
    real_admit = pipeline.admit

    def spy(model: str, **kwargs: Any) -> Any:
        admitted.append(model)
        return real_admit(model, **kwargs)

    pipeline.admit = spy  # type: ignore[method-assign]
    return admitted


def test_a_kserve_infer_for_a_full_level_is_refused_in_kserves_shape(full: ServerThread) -> None:
    """Refused in the front door: the route (whose first step is the pipeline's admission) never
    runs. A spy on the real ``Pipeline.admit`` counts its calls."""
    admitted = admissions(full)
    status, body, headers = full.post(INFER, infer_doc("no room", {"priority": 3}), {"X-Request-Id": "k-7"})
    assert status == 429
    assert int(headers["Retry-After"]) >= 1 and headers["X-Request-Id"] == "k-7"
    assert set(body) == {"error"} and isinstance(body["error"], str) and "priority 3" in body["error"]
    # The binary extension: the priority is read from the JSON part alone.
    raw, binary_headers = binary_infer("no room either", 3)
    status, body, headers = full.post(INFER, raw, binary_headers)
    assert status == 429 and set(body) == {"error"} and headers["X-Request-Id"]
    # And the versioned path.
    assert full.post(f"/v2/models/{MODEL}/versions/1/infer", infer_doc("no", {"priority": 3}))[0] == 429
    assert metric(full, 'appliance_shed_total{reason="queue_full"}') == 3
    assert metric(full, 'appliance_requests_total{api="kserve",model="all-minilm-l6-v2",status="429"}') == 3
    series = 'appliance_request_duration_seconds_count{api="kserve",model="all-minilm-l6-v2",priority="3"}'
    assert metric(full, series) == 3
    assert metric(full, 'appliance_inflight_requests{api="kserve"}') == 0
    assert admitted == []


def test_a_generate_request_for_a_full_level_is_refused_in_the_front_door(full: ServerThread) -> None:
    """The generate extension's routes name the model in the path and the priority in
    ``parameters``, as infer does, and are shed the same way: refused before the route runs (which
    would have said the model does not generate)."""
    admitted = admissions(full)
    doc = {"text_input": "no room", "parameters": {"priority": 3}}
    for route in ("generate", "versions/1/generate", "generate_stream"):
        status, body, headers = full.post(f"/v2/models/{MODEL}/{route}", doc)
        assert status == 429 and set(body) == {"error"} and "priority 3" in body["error"], (route, body)
        assert int(headers["Retry-After"]) >= 1
    assert metric(full, 'appliance_shed_total{reason="queue_full"}') == 3
    assert admitted == []


def test_a_kserve_infer_with_room_at_its_level_is_served(full: ServerThread) -> None:
    """Priority 1, and no priority (the model's default, 2; priority 0 means the same in KServe),
    have room: served as before, from the body the front door read, binary extension included."""
    for parameters in ({"priority": 1}, None, {"priority": 0, "timeout": 30_000_000}):
        status, body, _ = full.post(INFER, infer_doc("room", parameters))
        assert status == 200, body
        assert body["outputs"][0]["name"] == "sentence_embedding" and body["outputs"][0]["shape"] == [1, 384]
    raw, headers = binary_infer("room", 1)
    status, body, response_headers = full.post(INFER, raw, headers)
    assert status == 200 and response_headers["Content-Type"] == "application/json", body


def test_what_shedding_cannot_read_in_a_kserve_infer_is_answered_by_the_route(full: ServerThread) -> None:
    """A malformed priority, timeout or ``parameters``, a bad JSON-part length, an unknown model:
    KServe's precise error from the route, even at a full level."""
    status, body, _ = full.post(INFER, infer_doc("x", {"priority": "3"}))
    assert status == 400 and "priority" in body["error"]
    status, body, _ = full.post(INFER, infer_doc("x", {"priority": 3, "timeout": -5}))
    assert status == 400 and "timeout" in body["error"]
    status, body, _ = full.post(INFER, infer_doc("x", [3]))
    assert status == 400 and "'parameters' must be an object" in body["error"]
    status, body, _ = full.post(INFER, infer_doc("x", {"priority": 3}), {"X-Timeout-Ms": "soon"})
    assert status == 400 and "X-Timeout-Ms" in body["error"]
    raw, headers = binary_infer("x", 3)
    status, body, _ = full.post(INFER, raw, {**headers, "Inference-Header-Content-Length": "99999"})
    assert status == 400 and "exceeds the body length" in body["error"]
    status, body, _ = full.post("/v2/models/nope/infer", infer_doc("x", {"priority": 3}))
    assert status == 404 and set(body) == {"error"}


def test_a_replayed_refusal_does_not_keep_an_unloaded_model_alive(full: ServerThread) -> None:
    """A refusal kept for replay holds its model's runtime weakly: once the model is unloaded,
    its engine and queues are freed. Held strongly, a replay outliving the unload kept an unloaded
    chat model's engine, scheduler and prefix cache resident (548 MiB in a probe's soak) while the
    memory manager counted them as released."""
    import gc
    import weakref

    status, _, _ = embed(full, {"input": "refused and remembered"}, {"X-Priority": "3"})
    assert status == 429
    assert full.call(lambda: len(full.app[PIPELINE]._refused)) >= 1
    runtime = weakref.ref(full.call(lambda: full.app[MANAGER].slots[MODEL].runtime))
    deadline = time.monotonic() + 3 * BUSY_S + 10
    while queued(full, 3) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    full.call(lambda: full.app[MANAGER].unload(MODEL))
    assert full.call(lambda: len(full.app[PIPELINE]._refused)) >= 1  # the replay is still there
    while runtime() is not None and time.monotonic() < deadline:
        full.call(gc.collect)
        time.sleep(0.1)
    assert runtime() is None, gc.get_referrers(runtime())
