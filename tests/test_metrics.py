"""Metric names are an interface for dashboards: pinned here so they never drift silently."""

from __future__ import annotations

import time
from pathlib import Path

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
