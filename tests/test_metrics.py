"""Metric names are an interface for dashboards: pinned here so they never drift silently."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from appliance import telemetry
from appliance.api.common import RESILIENCE
from tests.conftest import ServerThread, metric

PINNED = {
    "appliance_requests_total": "counter",
    "appliance_request_duration_seconds": "histogram",
    "appliance_queue_duration_seconds": "histogram",
    "appliance_compute_duration_seconds": "histogram",
    "appliance_batch_size": "histogram",
    "appliance_engine_busy_seconds_total": "counter",
    "appliance_queue_depth": "gauge",
    "appliance_rejections_total": "counter",
    "appliance_inflight_requests": "gauge",
    "appliance_model_loaded": "gauge",
    "appliance_model_load_duration_seconds": "histogram",
    "appliance_time_to_first_token_seconds": "histogram",
    "appliance_time_per_output_token_seconds": "histogram",
    "appliance_generation_duration_seconds": "histogram",
    "appliance_generation_queue_duration_seconds": "histogram",
    "appliance_prompt_tokens_total": "counter",
    "appliance_generation_tokens_total": "counter",
    "appliance_preemptions_total": "counter",
    "appliance_running_sequences": "gauge",
    "appliance_waiting_sequences": "gauge",
    "appliance_kv_cache_bytes": "gauge",
}


def families(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            out[name] = kind
    return out


def test_metric_names_and_types_are_pinned(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    srv: ServerThread = start_server({"all-minilm-l6-v2": minilm_folder})
    sent = time.perf_counter()
    srv.post("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": ["a", "b"]})
    took = time.perf_counter() - sent
    srv.post("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "a", "priority": 7})
    _, body = srv.get("/metrics")
    text = body.decode()
    fams = families(text)
    for name, kind in PINNED.items():
        base = name.removesuffix("_total")
        assert fams.get(base, fams.get(name)) == kind, f"{name} missing or not a {kind}"
    assert not [f for f in fams if not f.startswith("appliance_")]
    assert 'appliance_requests_total{api="openai",model="all-minilm-l6-v2",status="200"} 1.0' in text
    assert 'status="400"' in text
    assert 'appliance_queue_depth{model="all-minilm-l6-v2",priority="2"}' in text
    # The engine's own time (on its worker thread): some, and never more than the request took.
    busy = metric(srv, 'appliance_engine_busy_seconds_total{model="all-minilm-l6-v2"}')
    assert 0 < busy <= took


def test_an_unloaded_chat_model_leaves_no_live_gauges_behind(start_server, smollm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    """After an unload, the chat model's gauges say it holds nothing and its scheduler's worker
    series is gone: they stood at their last values (prefix blocks 9, the scheduler "up")."""
    from appliance.api.common import MANAGER

    model = "smollm2-135m-instruct"
    srv: ServerThread = start_server({model: smollm_folder}, overrides={model: {"cache": {"enabled": False}}})
    body = {
        "model": model,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hello there, how are you?"}],
    }
    assert srv.post("/v1/chat/completions", body)[0] == 200
    up = f'appliance_worker_up{{worker="scheduler:{model}"}}'
    assert metric(srv, f'appliance_prefix_cache_blocks{{model="{model}"}}') > 0
    assert metric(srv, up) == 1
    srv.call(lambda: srv.app[MANAGER].unload(model))
    for gauge in ("prefix_cache_blocks", "running_sequences", "kv_cache_bytes"):
        assert metric(srv, f'appliance_{gauge}{{model="{model}"}}') == 0, gauge
    assert up not in srv.get("/metrics")[1].decode()


def _stat_counts(srv: ServerThread, model: str) -> dict[str, int]:
    (stat,) = srv.get(f"/v2/models/{model}/stats")[1]["model_stats"]
    infer = stat["inference_stats"]
    return {
        "inferences": stat["inference_count"],
        **{kind: infer[kind]["count"] for kind in ("success", "fail", "queue", "compute_infer")},
    }


def _hang_up_while_storing(
    srv: ServerThread, path: str, body: dict[str, Any], marker: bytes
) -> tuple[bytes, Callable[[], None]]:
    """Send ``body``, read until ``marker`` (b"" for nothing), and hang up once the answer waits
    for its cache commit (held: the fault); the bytes read, and what lets the commit end."""
    cache = srv.app[RESILIENCE].cache
    storing = threading.Event()
    commit = srv.call(asyncio.Event)

    async def held(*_args: Any) -> bool:
        storing.set()
        await commit.wait()
        return True

    cache.put_and_wait = held
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        raw = b""
        while marker not in raw:
            chunk = sock.recv(65536)
            assert chunk, raw
            raw += chunk
        assert storing.wait(30)
    return raw, lambda: srv.call(commit.set)


def _after_the_failure(srv: ServerThread, model: str, before: dict[str, int]) -> dict[str, int]:
    deadline = time.monotonic() + 30
    while (now := _stat_counts(srv, model))["fail"] == before["fail"]:
        assert time.monotonic() < deadline, now
        time.sleep(0.01)
    return {k: now[k] - before[k] for k in now}


def test_a_request_whose_client_leaves_before_its_answer_goes_out_counts_once_as_a_failure(
    start_server, minilm_folder: Path, smollm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    """Triton's inferences, queue and compute count requests that succeeded, once each; the
    front door knows how a request ended. Under ``cache.synchronous: FULL`` an answer waits for
    its cache commit; a client that hangs up meanwhile has a 499, a failure, and its engine work
    (done, but answered to nobody) counts no inference: it had counted the embedding's 3 rows
    and the stream's generation, and their queue and compute, beside the failure."""
    emb, chat = "all-minilm-l6-v2", "smollm2-135m-instruct"
    srv = start_server(
        {emb: minilm_folder, chat: smollm_folder}, config={"defaults": {"cache": {"synchronous": "FULL"}}}
    )
    nothing = {"inferences": 0, "success": 0, "fail": 1, "queue": 0, "compute_infer": 0}
    before = _stat_counts(srv, emb)
    _, commit = _hang_up_while_storing(srv, "/v1/embeddings", {"model": emb, "input": ["a", "b", "c"]}, b"")
    assert _after_the_failure(srv, emb, before) == nothing
    commit()
    before = _stat_counts(srv, chat)
    body = {
        "model": chat,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
    }
    raw, commit = _hang_up_while_storing(srv, "/v1/chat/completions", body, b'"finish_reason":"length"')
    assert b"[DONE]" not in raw
    assert _after_the_failure(srv, chat, before) == nothing
    commit()


def test_a_scrape_is_rendered_off_the_event_loop_and_shared_by_scrapes_meanwhile(  # type: ignore[no-untyped-def]
    start_server, minilm_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prometheus_client renders the text format in pure Python: ~2 s for the ~10 MB of 2,000
    resident models, and it ran on the event loop, where every other client waited for it. It
    runs on a worker thread: while one rendering is held there, /healthz is answered; a scrape
    that arrives meanwhile shares that rendering; both get the whole exposition once it is done."""
    srv: ServerThread = start_server({"all-minilm-l6-v2": minilm_folder})
    held, release = threading.Event(), threading.Event()
    rendered = [0]
    real_render = telemetry.generate_latest

    def generate_latest(registry: Any) -> bytes:
        rendered[0] += 1
        held.set()
        release.wait(30)
        return real_render(registry)

    asked = [0]
    real_exposition = telemetry.Metrics.exposition

    async def exposition(self: telemetry.Metrics) -> bytes:
        asked[0] += 1
        return await real_exposition(self)

    monkeypatch.setattr(telemetry, "generate_latest", generate_latest)
    monkeypatch.setattr(telemetry.Metrics, "exposition", exposition)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(srv.get, "/metrics")
        try:
            assert held.wait(30)
            with urllib.request.urlopen(srv.url + "/healthz", timeout=10) as resp:
                assert resp.status == 200
            second = pool.submit(srv.get, "/metrics")
            deadline = time.monotonic() + 30
            while asked[0] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the second scrape waits too (nothing signals that)
            assert not first.done() and not second.done()
        finally:
            release.set()
        (status, one), (status2, two) = first.result(30), second.result(30)
    assert status == status2 == 200 and one == two
    assert b"appliance_requests_total" in one and rendered[0] == 1
