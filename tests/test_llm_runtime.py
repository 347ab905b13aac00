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


@pytest.mark.parametrize("stream", [False, True])
def test_generations_failing_after_their_first_token_open_the_breaker(
    start_server: Any, smollm_folder: Path, faulty_decoder: list[FaultyDecoder], stream: bool
) -> None:
    """Every generation fails after its first token (prefill healthy, every decode step raises):
    each is one failed call, and a breaker whose threshold is above 0.5 opens. Before, each
    counted a success at its first token and a second, failed call: the rate read 10/20 = 0.5
    and the breaker never opened, however many failed."""
    srv = start_server(
        {MODEL: smollm_folder},
        overrides={MODEL: {"breaker": {"min_requests": 4, "failure_rate_threshold": 0.6}}},
    )
    hook = faulty_decoder[0]
    hook.only, hook.mode = "decode", "raise"
    statuses = []
    for i in range(4):
        body = {**CHAT, "messages": [{"role": "user", "content": f"question {i}"}], "stream": stream}
        statuses.append(post_raw(srv, "/v1/chat/completions", body)[0])
    assert statuses == ([200] * 4 if stream else [503] * 4), statuses  # a stream's error is an event
    snap = breaker(srv)
    assert snap["state"] == "open", snap
    assert snap["totals"].get("success", 0) == 4 and snap["totals"].get("exception", 0) == 4, snap
