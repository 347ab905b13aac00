"""The OpenAI-compatible embeddings API, driven by the official `openai` client over loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from appliance import pipeline
from appliance.api.common import MANAGER, RESILIENCE
from tests.conftest import ServerThread, copy_fixture, serve_identity_models

MODEL = "all-minilm-l6-v2"


@pytest.fixture
def server(start_server, minilm_folder: Path) -> ServerThread:  # type: ignore[no-untyped-def]
    return start_server({MODEL: minilm_folder})


def client(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_embeddings_match_sentence_transformers(server: ServerThread) -> None:
    ref = copy_fixture("minilm_reference.json")
    # The client asks for base64 by default; the server must encode little-endian float32.
    resp = client(server).embeddings.create(model=MODEL, input=ref["sentences"])
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    want = np.array(ref["embeddings"], dtype=np.float32)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999
    assert [d.index for d in resp.data] == list(range(len(ref["sentences"])))
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > len(ref["sentences"])
    assert resp.model == MODEL


def test_float_and_base64_encodings_carry_the_same_vector(server: ServerThread) -> None:
    _, as_float, _ = server.post("/v1/embeddings", {"model": MODEL, "input": "hello world"})
    _, as_b64, _ = server.post(
        "/v1/embeddings", {"model": MODEL, "input": "hello world", "encoding_format": "base64"}
    )
    vec = np.array(as_float["data"][0]["embedding"], dtype=np.float32)
    raw = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,)
    np.testing.assert_allclose(vec, raw, atol=1e-7)
    # null is unset (clients that write every field send it), as for every other optional field
    status, as_null, _ = server.post(
        "/v1/embeddings", {"model": MODEL, "input": "hello world", "encoding_format": None}
    )
    assert status == 200 and as_null["data"][0]["embedding"] == as_float["data"][0]["embedding"]


def test_token_arrays_are_accepted_and_equal_the_text(server: ServerThread) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(server.cfg.model_repository / MODEL / "tokenizer.json"))
    ids = tok.encode("a cat sat on the mat").ids
    _, by_text, _ = server.post("/v1/embeddings", {"model": MODEL, "input": "a cat sat on the mat"})
    _, by_ids, _ = server.post("/v1/embeddings", {"model": MODEL, "input": [ids]})
    np.testing.assert_allclose(by_text["data"][0]["embedding"], by_ids["data"][0]["embedding"], atol=1e-6)


def test_models_are_listed_with_their_context_once_loaded(server: ServerThread) -> None:
    server.post("/v1/embeddings", {"model": MODEL, "input": "load it"})
    models = {m.id: m for m in client(server).models.list().data}
    # vLLM's max_model_len: the longest input in tokens (MiniLM truncates at 256, as sentence-transformers)
    assert models[MODEL].model_extra == {"kind": "embedding", "state": "resident", "max_model_len": 256}
    assert client(server).models.retrieve(MODEL).model_extra["max_model_len"] == 256


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"input": "x"}, 400, "model"),
        ({"model": MODEL}, 400, "input"),
        ({"model": MODEL, "input": 42}, 400, "input"),
        ({"model": MODEL, "input": []}, 400, "input"),
        ({"model": MODEL, "input": [""]}, 400, "input"),
        ({"model": MODEL, "input": [["a", 1]]}, 400, "input"),
        ({"model": MODEL, "input": [[10**9]]}, 400, "input"),
        ({"model": MODEL, "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"model": MODEL, "input": "x", "dimensions": 3}, 400, "dimensions"),
        ({"model": MODEL, "input": "x", "priority": 9}, 400, "priority"),
        ({"model": MODEL, "input": "x", "priority": "high"}, 400, "priority"),
        ({"model": MODEL, "input": "x", "user": {"id": 1}}, 400, "user"),
    ],
)
def test_bad_input_gets_an_openai_error_envelope(
    server: ServerThread, body: dict[str, object], status: int, param: str
) -> None:
    got, resp, _ = server.post("/v1/embeddings", body)
    assert got == status, resp
    err = resp["error"]
    assert err["param"] == param
    assert err["message"] and err["type"] and err["code"]
    # The process keeps serving after every bad request.
    ok, _, _ = server.post("/v1/embeddings", {"model": MODEL, "input": "still alive"})
    assert ok == 200


def test_an_error_quotes_a_long_client_supplied_name_or_value_in_part(server: ServerThread) -> None:
    """A 100,000-character model name came back whole in its 404 (a 100 KB error, in every log
    that keeps it), as did any long value an error quotes. An error quotes the first 100
    characters and "…"; the rest of its message is as before."""
    long = "n" * 100_000
    cut = "n" * 100 + "…"
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for path, body, param, message in [
        ("/v1/embeddings", {"model": long, "input": "x"}, "model", f"The model '{cut}' does not exist"),
        ("/v1/chat/completions", {"model": long, **chat}, "model", f"The model '{cut}' does not exist"),
        ("/v1/completions", {"model": long, "prompt": "x"}, "model", f"The model '{cut}' does not exist"),
        (
            "/v1/embeddings",
            {"model": MODEL, "input": "x", "encoding_format": long},
            "encoding_format",
            f"'encoding_format' must be 'float' or 'base64', got '{cut}'",
        ),
        (
            "/v1/embeddings",
            {"model": MODEL, "input": "x", "dimensions": long},
            "dimensions",
            f"'dimensions' must be a positive integer, got '{cut}'",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": long, "content": "hi"}]},
            "messages[0].role",
            f"messages[0].role '{cut}' is not supported",
        ),
    ]:
        status, resp, _ = server.post(path, body)
        assert status in (400, 404) and resp["error"]["param"] == param, (path, param, status)
        assert resp["error"]["message"].startswith(message) and len(resp["error"]["message"]) < 300, (
            path,
            resp["error"]["message"][:300],
        )
    status, resp = server.get("/v1/models/" + "n" * 4000)
    assert status == 404 and resp["error"]["message"] == f"The model '{cut}' does not exist", resp


def test_a_cached_answer_never_stands_in_for_dimensions_the_model_refuses(server: ServerThread) -> None:
    """Found by fuzzing: after an input was answered (and cached) without 'dimensions', the same
    input with dimensions 100 was answered from the cache with 384 numbers."""
    body = {"model": MODEL, "input": "a sentence cached without dimensions"}
    assert server.post("/v1/embeddings", body)[0] == 200
    status, resp, _ = server.post("/v1/embeddings", {**body, "dimensions": 100})
    assert status == 400 and resp["error"]["param"] == "dimensions", resp
    status, resp, _ = server.post("/v1/embeddings", {**body, "dimensions": 384})
    assert status == 200 and len(resp["data"][0]["embedding"]) == 384


def test_a_large_inputs_cache_key_is_hashed_off_the_event_loop(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The response cache's key covers the whole input list. Its JSON was written and hashed on the
    event loop (~100 ms for a 15 MB body, a stall for every other client); a large input list is
    hashed on a worker thread and the loop keys the request by that digest. The key still tells
    inputs apart: the same inputs again are a hit, inputs that differ in one character are not."""
    keyed_on_loop: list[int] = []
    real = pipeline.cache_key

    def cache_key(identity: str, request: Any, blobs: Any = ()) -> str:
        keyed_on_loop.append(len(json.dumps(request)))  # the pipeline's cache read: on the loop
        return real(identity, request, blobs)

    monkeypatch.setattr(pipeline, "cache_key", cache_key)
    texts = [f"sentence {i} " * 2800 for i in range(10)]  # ~350 kB of input, cut to the context
    body = {"model": MODEL, "input": texts, "truncate": True}
    status, first, headers = server.post("/v1/embeddings", body)
    assert status == 200 and len(first["data"]) == 10 and headers["X-Appliance-Source"] == "engine"
    server.call(lambda: server.app[RESILIENCE].cache.flush())  # the cache writes behind the answer
    status, again, headers = server.post("/v1/embeddings", body)
    assert status == 200 and headers["X-Appliance-Source"] == "cache" and again == first
    texts[-1] = "Sentence" + texts[-1][len("sentence") :]
    status, _, headers = server.post("/v1/embeddings", {**body, "input": texts})
    assert status == 200 and headers["X-Appliance-Source"] == "engine"
    assert len(keyed_on_loop) == 3 and max(keyed_on_loop) < 1000, keyed_on_loop


def test_malformed_json_and_oversized_bodies_are_400_and_413(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server({MODEL: minilm_folder}, config={"server": {"max_body_bytes": 4096}})
    status, resp, _ = srv.post("/v1/embeddings", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "JSON" in resp["error"]["message"]
    status, resp, _ = srv.post("/v1/embeddings", {"model": MODEL, "input": "x" * 10_000})
    assert status == 413 and resp["error"]["code"] == "request_too_large"
    status, resp, _ = srv.request("GET", "/v1/nowhere")
    # A path with no route is "not_found", not "model_not_found" (a client may key on the code).
    assert status == 404 and resp["error"]["code"] == "not_found", resp
    assert resp["error"]["message"] == "no route for GET /v1/nowhere"


def test_priority_header_is_honoured_and_checked(server: ServerThread) -> None:
    ok, _, _ = server.post("/v1/embeddings", {"model": MODEL, "input": "x"}, {"X-Priority": "1"})
    bad, resp, _ = server.post("/v1/embeddings", {"model": MODEL, "input": "x"}, {"X-Priority": "0"})
    assert ok == 200
    assert bad == 400 and "priority" in resp["error"]["message"]


def test_async_client_concurrent_requests_are_batched(server: ServerThread) -> None:
    async def burst() -> list[int]:
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        texts = [f"sentence number {i} about batching" for i in range(48)]
        res = await asyncio.gather(*(c.embeddings.create(model=MODEL, input=t) for t in texts))
        await c.close()
        return [len(r.data[0].embedding) for r in res]

    assert asyncio.run(burst()) == [384] * 48
    status, text = server.get("/metrics")
    sizes = [line for line in text.decode().splitlines() if line.startswith("appliance_batch_size_count")]
    count = float(sizes[0].rsplit(" ", 1)[1])
    # 48 sentences in fewer engine runs than requests: the batcher grouped them.
    assert status == 200 and count < 48


def test_listing_models_reads_each_folder_once_per_reading_of_the_repository(  # type: ignore[no-untyped-def]
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /v1/models did a stat of every model's folder (its ``created``) on the event loop at
    every listing: 2,000 of them, each a slow or network disk's latency, stalled every request.
    A folder is read once per reading of the repository; a change shows after the next one."""

    names = ["m0", "m1", "m2"]
    srv = serve_identity_models(start_server, tmp_path, names)
    mgr = srv.app[MANAGER]
    folders = {srv.call(lambda n=n: mgr.slots[n].entry.folder) for n in names}
    read: list[str] = []
    real_stat = Path.stat

    def stat(path: Path, **kwargs: Any) -> os.stat_result:
        if path in folders:
            read.append(path.name)
        return real_stat(path, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    first = srv.get("/v1/models")
    assert first[0] == 200 and sorted(read) == names
    assert (
        srv.get("/v1/models") == first
        and srv.get("/v1/models/m1")[1]["created"] == first[1]["data"][1]["created"]
    )
    assert len(read) == 3, "each folder read once, not at every listing"

    os.utime(srv.call(lambda: mgr.slots["m1"].entry.folder), (1_000_000_000, 1_000_000_000))
    srv.call(mgr.rescan)
    status, listing = srv.get("/v1/models")
    assert status == 200 and {m["id"]: m["created"] for m in listing["data"]}["m1"] == 1_000_000_000
