"""OpenAI-compatible routes: models and embeddings (chat lives with the LLM service)."""

from __future__ import annotations

import base64
import json

import numpy as np
from aiohttp import web

from appliance.api.common import (
    EMBEDDINGS,
    MANAGER,
    guarded,
    priority_of,
    read_json,
    timeout_ms_of,
)
from appliance.errors import InvalidRequest

routes = web.RouteTableDef()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER]
    data = []
    for name, slot in mgr.slots.items():
        data.append(
            {
                "id": name,
                "object": "model",
                "created": int(slot.entry.folder.stat().st_mtime),
                "owned_by": "appliance",
                "kind": slot.entry.kind.value,
                "state": slot.state.value,
            }
        )
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    d = request.app[MANAGER].describe(request.match_info["model"])
    return web.json_response({"id": d["name"], "object": "model", "owned_by": "appliance", **d})


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    request["model"] = model
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
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequest(
            f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", param="encoding_format"
        )
    service = request.app[EMBEDDINGS]
    dims = body.get("dimensions")
    width = await service.dimensions(model)
    if dims is not None and dims != width:
        raise InvalidRequest(f"'dimensions' must be {width} for this model, got {dims!r}", param="dimensions")
    priority = priority_of(request, body.get("priority"))
    timeout_ms = timeout_ms_of(request)

    async def compute() -> tuple[bytes, str]:
        result = await service.embed(model, inputs, priority=priority, timeout_ms=timeout_ms)
        return render(result.vectors, result.prompt_tokens)

    canonical = {"api": "openai.embeddings", "input": inputs, "encoding_format": fmt}
    fallback = request.app[MANAGER].slots[model].entry.spec.default_response

    def default() -> tuple[bytes, str]:
        # A configured default vector stands in for every input (say, a neutral embedding).
        vectors = np.tile(np.asarray(fallback, dtype=np.float32), (len(inputs), 1))
        return render(vectors, 0)

    def render(vectors: np.ndarray, prompt_tokens: int) -> tuple[bytes, str]:
        data = []
        for i, vec in enumerate(vectors):
            if fmt == "base64":
                emb: object = base64.b64encode(vec.astype("<f4").tobytes()).decode()
            else:
                emb = vec.astype(np.float32).tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        doc = {"object": "list", "data": data, "model": model, "usage": usage}
        return json.dumps(doc, separators=(",", ":")).encode(), "application/json"

    usable_default = isinstance(fallback, list) and len(fallback) == width
    return await guarded(
        request,
        model,
        compute,
        canonical=canonical,
        priority=priority,
        default=default if usable_default else None,
    )
