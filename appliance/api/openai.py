"""OpenAI-compatible routes: models and embeddings (chat lives with the LLM service)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from appliance.api.common import (
    EMBEDDINGS,
    MANAGER,
    OFFLOOP,
    OFFLOOP_BYTES,
    PIPELINE,
    admit,
    json_response,
    read_body,
    read_json,
    render,
    requested_priority,
)
from appliance.errors import InvalidRequest, shown
from appliance.inference import EmbeddingService
from appliance.models import ModelRuntime, ModelState
from appliance.pipeline import Ticket

routes = web.RouteTableDef()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER]
    data = []
    for name, slot in mgr.slots.items():
        if slot.state == ModelState.unbuilt:
            continue  # not usable until pulled (the admin API and `appliance models list` show it)
        data.append(
            {
                "id": name,
                "object": "model",
                "created": mgr.created(name),
                "owned_by": "appliance",
                "kind": slot.entry.kind.value,
                "state": slot.state.value,
                **({} if slot.context_length is None else {"max_model_len": slot.context_length}),
            }
        )
    return json_response({"object": "list", "data": data})  # 2,000 models: ~250 kB


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER]
    name = request.match_info["model"]
    mgr.request_slot(name)  # 404 for an unknown or unbuilt model
    d = mgr.describe(name)
    created = mgr.created(d["name"])
    return web.json_response(
        {"id": d["name"], "object": "model", "created": created, "owned_by": "appliance", **d}
    )


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    raw = body.get("input")
    inputs: list[str] | list[list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        inputs = [raw]  # one token array
    elif isinstance(raw, list):
        inputs = raw
    else:
        raise InvalidRequest(
            "'input' must be a string, a list of strings or a list of token arrays", param="input"
        )
    # Admission first: a request its queue would refuse costs no tokenizing, hashing or lookup.
    ticket = admit(
        request,
        body.get("model"),
        requested_priority(request, body.get("priority")),
        items=max(len(inputs), 1),
    )
    fmt = body.get("encoding_format")
    fmt = "float" if fmt is None else fmt  # null is unset, as for every other optional field
    if fmt not in ("float", "base64"):
        raise InvalidRequest(
            f"'encoding_format' must be 'float' or 'base64', got {shown(fmt)}", param="encoding_format"
        )
    truncate = body.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise InvalidRequest("'truncate' must be true or false", param="truncate")
    user = body.get("user")  # an end-user id for abuse tracking; unused here, but typed
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string", param="user")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise InvalidRequest(
            f"'dimensions' must be a positive integer, got {shown(dims)}", param="dimensions"
        )
    digest = None
    if len(await read_body(request)) > OFFLOOP_BYTES:  # read by now: the bytes aiohttp kept
        # The cache key's JSON of the whole input list held the event loop ~100 ms for a 15 MB
        # body; a large one is hashed on a worker thread, and the key takes its digest.
        digest = await request.app[OFFLOOP].run(ticket, "hashing its input", input_digest, inputs)
    work = _Embeddings(request.app[EMBEDDINGS], ticket.model, inputs, fmt, truncate, dims, digest)
    work.fallback = request.app[MANAGER].slots[ticket.model].entry.spec.default_response
    return render(await request.app[PIPELINE].answer(ticket, work), ticket)


def input_digest(inputs: list[Any]) -> str:
    """``sha256:<hex>`` of an embeddings request's input items, each tagged and length-prefixed: a
    string's UTF-8, any other item's JSON (as orjson writes it, keys sorted). Hashed item by item,
    so that a worker thread running it gives the event loop the GIL between items (the hashing of a
    large item releases it too)."""
    digest = hashlib.sha256()
    for item in inputs:
        if isinstance(item, str):
            tag, part = b"s", item.encode("utf-8", "surrogatepass")
        else:
            tag, part = b"j", orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
        digest.update(tag + len(part).to_bytes(8, "big"))
        digest.update(part)
    return "sha256:" + digest.hexdigest()


class _Embeddings:
    """An embeddings request as the pipeline's Computation."""

    blobs: tuple[bytes, ...] = ()

    def __init__(
        self,
        service: EmbeddingService,
        model: str,
        inputs: list[str] | list[list[int]],
        fmt: str,
        truncate: bool | None,
        dims: int | None,
        digest: str | None = None,
    ) -> None:
        self.service = service
        self.model = model
        self.inputs = inputs
        self.fmt = fmt
        self.truncate = truncate
        self.dims = dims
        self.fallback: object = None
        self.canonical: dict[str, object] = {
            "api": "openai.embeddings",
            # A large input list is keyed by its digest (input_digest, off the loop): a string,
            # never equal to a list, so no digest's key is ever a listed input's.
            "input": inputs if digest is None else digest,
            "encoding_format": fmt,
            "truncate": truncate,
        }
        if dims is not None:
            # Checked against the model's width only when computed: part of the key, so that a
            # cached answer never stands in for a 'dimensions' the model would refuse.
            self.canonical["dimensions"] = dims

    async def compute(self, runtime: ModelRuntime, ticket: Ticket) -> tuple[bytes, str]:
        width = self.service.runtime_of(runtime, self.model).dim
        if self.dims is not None and self.dims != width:
            raise InvalidRequest(
                f"'dimensions' must be {width} for this model, got {self.dims!r}", param="dimensions"
            )
        result = await self.service.embed(
            runtime,
            self.inputs,
            priority=ticket.queue_level(),
            timeout_ms=ticket.timeout_ms(),
            truncate=self.truncate,
            reservation=ticket.reservation,
        )
        return self.render(result.vectors, result.prompt_tokens)

    def default(self) -> tuple[bytes, str] | None:
        # A configured default vector stands in for every input (say, a neutral embedding).
        fallback = self.fallback
        if (
            not isinstance(fallback, list)
            or not fallback
            or (self.dims is not None and len(fallback) != self.dims)
        ):
            return None
        vectors = np.tile(np.asarray(fallback, dtype=np.float32), (len(self.inputs), 1))
        return self.render(vectors, 0)

    def render(self, vectors: np.ndarray, prompt_tokens: int) -> tuple[bytes, str]:
        data = []
        for i, vec in enumerate(vectors):
            if self.fmt == "base64":
                emb: object = base64.b64encode(vec.astype("<f4").tobytes()).decode()
            else:
                emb = np.ascontiguousarray(vec, dtype=np.float32)  # orjson writes arrays natively
            data.append({"object": "embedding", "index": i, "embedding": emb})
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        doc = {"object": "list", "data": data, "model": self.model, "usage": usage}
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), "application/json"
