"""The decoder runtime (``appliance.llm.runtime``) under engine faults, through the real server.

Engine faults cannot be produced on demand from a healthy ONNX decoder; the test-only hook
``faulty_decoder`` (conftest.FaultyDecoder) wraps the real session's engine call and corrupts or
fails it when told to. Everything else is real: SmolLM2, the scheduler, the cache, HTTP.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.api.common import RESILIENCE
from tests.conftest import FaultyDecoder, ServerThread, nan_logits

MODEL = "smollm2-135m-instruct"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 8,
}


def post_raw(srv: ServerThread, path: str, body: dict[str, Any]) -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), dict(resp.getheaders())
    finally:
        conn.close()


def breaker(srv: ServerThread) -> dict[str, Any]:
    return srv.call(lambda: srv.app[RESILIENCE].breakers[MODEL].snapshot())  # type: ignore[no-any-return]


CORRUPTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "nan": nan_logits,
    "row-short": lambda logits: logits[:-1],
    "narrow": lambda logits: logits[..., :-5],
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_logits_that_cannot_be_the_batch_fail_as_the_engine_not_a_200(
    start_server: Any, smollm_folder: Path, faulty_decoder: list[FaultyDecoder], corruption: str
) -> None:
    """A chat user whose engine returns NaN logits (or a row short, or a narrower vocabulary)
    expects a 503 with Retry-After, not text sampled from garbage. Before, NaN logits sampled
    token 0 (SmolLM2's EOS): the answer cut short after its first token, served as a 200
    "stop", counted a success by the breaker and kept by the response cache, so the same
    question got it again after the engine was healthy; a narrower vocabulary was sampled from
    as if whole; a row short killed the scheduler's loop."""
    srv = start_server({MODEL: smollm_folder}, overrides={MODEL: {"breaker": {"min_requests": 100}}})
    hook = faulty_decoder[0]
    hook.only, hook.corrupt = "decode", CORRUPTIONS[corruption]
    status, raw, headers = post_raw(srv, "/v1/chat/completions", CHAT)
    assert status == 503, raw
    assert int(headers["Retry-After"]) >= 1
    assert json.loads(raw)["error"]["type"] == "service_unavailable"
    status, raw, _ = post_raw(srv, "/v1/chat/completions", {**CHAT, "stream": True})
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    # Headers may have gone with a first token (prefill is healthy): then an error event ends it.
    if status == 200:
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), raw
    else:
        assert status == 503, raw
    assert breaker(srv)["totals"].get("exception", 0) == 2, "the breaker counts both failures"
    hook.corrupt = None
    status, raw, headers = post_raw(srv, "/v1/chat/completions", CHAT)
    assert status == 200 and headers["X-Appliance-Source"] == "engine", raw
    assert json.loads(raw)["choices"][0]["message"]["content"], "a healthy engine answers with text"
