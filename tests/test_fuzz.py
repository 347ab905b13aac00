"""Fuzzing the data plane from its own OpenAPI description (GET /openapi.json) with schemathesis.

For every documented operation, schemathesis generates requests that fit the description (valid
bodies, headers, path parameters) and requests that break it (wrong types, missing fields, bad
headers), and they are sent to the real server over loopback: an embedding model, a tensor model
and the LLM. The contract: no response is a server error (>= 500), except a 503 that carries
Retry-After (overload, a deadline, a breaker: the client is told when to come back); every client
error is in its API's error shape; no request hangs; and the server still answers afterwards.

The run is bounded (a fixed number of examples per operation and mode, derandomized so that the
figures repeat); ``APPLIANCE_FUZZ_EXAMPLES`` raises the bound for a longer hunt. Run with ``-s``
to see the figures (requests sent, statuses seen).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.conftest import ServerThread, make_repository
from tests.test_api_kserve import build_affine_model

EMB, AFFINE, LLM = "all-minilm-l6-v2", "affine", "smollm2-135m-instruct"
# Examples per operation and generation mode: the routes that parse a body get more (that is where
# inputs go wrong); a GET has little to vary.
EXAMPLES = int(os.environ.get("APPLIANCE_FUZZ_EXAMPLES", "20"))
GET_EXAMPLES = max(1, EXAMPLES // 4)
# Which models a generated request is aimed at, by route (None keeps the generated name).
TARGETS: dict[str, list[str | None]] = {
    "/v1/embeddings": [None, EMB, EMB],
    "/v1/chat/completions": [None, LLM, LLM],
    "/v1/completions": [None, LLM, LLM],
    "/v2/models/{model}/infer": [None, EMB, AFFINE, AFFINE],
    "/v2/models/{model}/versions/{version}/infer": [None, EMB, AFFINE, AFFINE],
    "/v2/models/{model}/generate": [None, EMB, LLM, LLM],
    "/v2/models/{model}/versions/{version}/generate": [None, EMB, LLM, LLM],
    "/v2/models/{model}/generate_stream": [None, EMB, LLM, LLM],
    "/v2/models/{model}/versions/{version}/generate_stream": [None, EMB, LLM, LLM],
}
REQUEST_TIMEOUT_S = 30.0  # far above any answer here: reaching it means a hang


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, minilm_folder: Path, smollm_folder: Path
) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("fuzz")
    affine = build_affine_model(tmp / "src" / AFFINE)
    # Generated requests may ask for long generations; a small limit keeps the run short (a larger
    # max_tokens is then a 400, which the fuzzer exercises as well).
    overrides = {LLM: {"generation": {"max_tokens_default": 2, "max_tokens_limit": 4}}}
    repo = make_repository(tmp, {EMB: minilm_folder, AFFINE: affine, LLM: smollm_folder}, overrides)
    cfg = {
        "model_repository": str(repo),
        "data_dir": str(tmp / "data"),
        "admin": {"port": 0, "socket": str(tmp / "data" / "admin.sock")},
    }
    srv = ServerThread(cfg).start()
    yield srv
    srv.stop()


def _aim(case: Any, model: str | None) -> None:
    """Point a generated request at a real model, so that it gets past the model lookup and into
    the parsing and inference code (random names only ever meet the 404)."""
    if model is None:
        return
    if isinstance(case.path_parameters, dict) and "model" in case.path_parameters:
        case.path_parameters["model"] = model
        if "version" in case.path_parameters:
            case.path_parameters["version"] = "1"
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
    # A JSON body that also names a binary header length is refused on that header alone.
    if case.media_type == "application/json" and isinstance(case.headers, dict):
        case.headers.pop("Inference-Header-Content-Length", None)


class Tally:
    """Statuses seen and contract violations, over all the requests of a test."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.violations: list[str] = []
        self.session = requests.Session()

    def send(self, label: str, path: str, call: Callable[[], requests.Response], curl: str) -> None:
        try:
            response = call()
        except requests.Timeout:
            self.violations.append(f"{label}: no answer within {REQUEST_TIMEOUT_S} s\n    {curl}")
            return
        except requests.ConnectionError as exc:
            self.violations.append(f"{label}: connection failed: {exc}\n    {curl}")
            return
        self.statuses[response.status_code] += 1
        problem = _violation(path, response)
        if problem:
            self.violations.append(f"{label}: {problem}\n    {curl}")

    def check(self, name: str, server: ServerThread) -> None:
        sent = sum(self.statuses.values())
        statuses = {str(k): v for k, v in sorted(self.statuses.items())}
        print(f"\n{name}:", json.dumps({"requests": sent, "statuses": statuses}))
        shown = "\n".join(self.violations[:30])
        assert not self.violations, f"{len(self.violations)} of {sent} requests broke the contract:\n{shown}"
        # The server is alive and still computing after the barrage.
        assert server.error is None
        assert server.get("/healthz")[0] == 200
        status, body, _ = server.post("/v1/embeddings", {"model": EMB, "input": "still here"})
        assert status == 200 and len(body["data"][0]["embedding"]) == 384


def _violation(path: str, response: requests.Response) -> str | None:
    """What is wrong with this response under the contract, or None."""
    status = response.status_code
    if status >= 500 and not (status == 503 and "Retry-After" in response.headers):
        return f"status {status}: {response.text[:300]}"
    if 400 <= status < 500:
        try:
            doc = response.json()
        except ValueError:
            return f"status {status} without a JSON error body: {response.text[:200]!r}"
        err = doc.get("error") if isinstance(doc, dict) else None
        if path.startswith("/v1/"):
            ok = isinstance(err, dict) and isinstance(err.get("message"), str)
        else:
            ok = isinstance(err, str)
        if not ok:
            return f"status {status} not in the API's error shape: {response.text[:200]}"
    return None


def _schema(server: ServerThread) -> Any:
    status, doc = server.get("/openapi.json")
    assert status == 200
    # hypothesis-jsonschema takes seconds per example to build long lists of chat messages (each a
    # choice of shapes); four messages exercise the parsing of a message as well as forty.
    doc["components"]["schemas"]["ChatRequest"]["properties"]["messages"]["maxItems"] = 4
    return schemathesis.openapi.from_dict(doc)


def _fuzz_operation(server: ServerThread, tally: Tally, operation: Any, mode: GenerationMode) -> None:
    targets = TARGETS.get(operation.path, [None, EMB, AFFINE, LLM])

    @settings(
        max_examples=EXAMPLES if operation.method.upper() == "POST" else GET_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode), model=st.sampled_from(targets))
    def send(case: Any, model: str | None) -> None:
        _aim(case, model)
        tally.send(
            f"{operation.label} [{mode.value}]",
            operation.path,
            lambda: case.call(base_url=server.url, session=tally.session, timeout=REQUEST_TIMEOUT_S),
            case.as_curl_command(),
        )

    send()


def test_every_route_answers_generated_requests_without_a_server_error(server: ServerThread) -> None:
    operations = [result.ok() for result in _schema(server).get_all_operations()]
    assert len(operations) == 27  # every route of the data plane and its versioned variants
    tally = Tally()
    for operation in operations:
        _fuzz_operation(server, tally, operation, GenerationMode.POSITIVE)
        # A request with only path parameters has no invalid form that reaches a handler (an
        # empty name is another path), so those operations get valid requests only.
        if operation.body or operation.headers or operation.query:
            _fuzz_operation(server, tally, operation, GenerationMode.NEGATIVE)
    tally.check("schemathesis fuzz, every operation", server)


# -- structure-aware: every field of a valid request, one at a time, replaced by any JSON value --

_X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
_IDS = {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [[1, 2, 3]]}
VALID: list[tuple[str, dict[str, Any]]] = [
    (
        "/v1/embeddings",
        {
            "model": EMB,
            "input": ["hello", "world"],
            "encoding_format": "float",
            "dimensions": 384,
            "priority": 2,
        },
    ),
    ("/v1/embeddings", {"model": EMB, "input": [[101, 7592, 102]], "encoding_format": "base64"}),
    (
        "/v1/chat/completions",
        {
            "model": LLM,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "max_tokens": 2,
            "temperature": 0,
            "top_p": 0.9,
            "top_k": 5,
            "seed": 1,
            "stop": ["\n"],
            "stream": True,
            "stream_options": {"include_usage": True},
            "response_format": {"type": "text"},
            "priority": 2,
        },
    ),
    ("/v1/completions", {"model": LLM, "prompt": "Once upon", "max_tokens": 2, "temperature": 0, "n": 1}),
    ("/v1/completions", {"model": LLM, "prompt": [[1, 2, 3]], "max_completion_tokens": 1}),
    (
        f"/v2/models/{AFFINE}/infer",
        {
            "id": "r1",
            "inputs": [_X, _IDS],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "s"}],
            "parameters": {"priority": 1, "timeout": 10**6, "binary_data_output": False},
        },
    ),
    (
        f"/v2/models/{EMB}/versions/1/infer",
        {
            "inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}],
            "outputs": [{"name": "sentence_embedding", "parameters": {"binary_data": True}}],
        },
    ),
    (
        f"/v2/models/{LLM}/generate",
        {
            "id": "g1",
            "text_input": "Once upon",
            "max_tokens": 2,
            "stop_words": ["\n"],
            "parameters": {"temperature": 0, "top_p": 0.9, "seed": 1, "priority": 1, "timeout": 10**6},
        },
    ),
    (
        f"/v2/models/{LLM}/versions/1/generate_stream",
        {"text_input": "Hi", "stream": True, "sampling_parameters": '{"max_tokens": 2, "top_k": 5}'},
    ),
]
# Values that broke parsers before, mixed into arbitrary JSON.
_NASTY = [2**64, 2**32, -1, 0, 10**30, 1e308, "²", "", "FP32", "BYTES", [4294967296, 4294967296], [2**63, 0]]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(_NASTY),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
HEADERS = ["X-Priority", "X-Timeout-Ms", "Cache-Control", "Inference-Header-Content-Length"]
# Header values as a client may send them: any printable text, sent as UTF-8.
HEADER_VALUES = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"), max_size=12
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every field and element of ``doc``, as a key path (the document itself excluded)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _mutate(doc: dict[str, Any], path: tuple[Any, ...], value: Any, delete: bool) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, str], str]:
    route, valid = draw(st.sampled_from(VALID))
    path = draw(st.sampled_from(_paths(valid)))
    delete = draw(st.booleans()) and draw(st.booleans())  # a quarter of the time: the field is missing
    body = _mutate(valid, path, draw(JSON_VALUES), delete)
    headers = {"Content-Type": "application/json"}
    if draw(st.booleans()) and draw(st.booleans()):
        header = draw(st.sampled_from(HEADERS))
        headers[header] = draw(HEADER_VALUES).encode().decode("latin-1").strip()
    what = f"{'delete' if delete else 'replace'} {'.'.join(map(str, path))}"
    return route, body, headers, what


def test_every_field_of_a_valid_request_may_be_anything(server: ServerThread) -> None:
    tally = Tally()

    @settings(
        max_examples=6 * EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(request=mutated_requests())
    def send(request: tuple[str, dict[str, Any], dict[str, str], str]) -> None:
        route, body, headers, what = request
        data = json.dumps(body).encode()
        tally.send(
            f"POST {route} ({what})",
            route,
            lambda: tally.session.post(
                server.url + route, data=data, headers=headers, timeout=REQUEST_TIMEOUT_S
            ),
            f"curl -X POST {route} -H {headers!r} -d {data.decode()[:300]!r}",
        )

    send()
    tally.check("field mutations", server)
