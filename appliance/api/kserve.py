"""KServe v2 / Triton HTTP routes, including the binary tensor data extension and /config."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from aiohttp import web

from appliance import __version__
from appliance.api.common import (
    EMBEDDINGS,
    MANAGER,
    METRICS,
    PIPELINE,
    TENSORS,
    admit,
    read_body,
    read_json,
    render,
)
from appliance.api.tensors import (
    HEADER_LENGTH,
    datatype_of,
    decode_inputs,
    encode_response,
    parameters_of,
    requested_outputs,
    split_body,
)
from appliance.errors import InvalidRequest, ModelNotBuilt, ModelNotFound
from appliance.inference import EmbeddingRuntime, EmbeddingService, TensorRuntime
from appliance.models import ModelManager, ModelRuntime, ModelState
from appliance.pipeline import Ticket
from appliance.repository import ModelKind

routes = web.RouteTableDef()

# What this server implements (the model repository extension is not: models are managed through
# the admin API).
EXTENSIONS = ["binary_tensor_data", "schedule_policy", "model_configuration", "statistics"]
TEXT_INPUT, EMBEDDING_OUTPUT = "text", "sentence_embedding"


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "appliance", "version": __version__, "extensions": EXTENSIONS})


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    # The protocol answers "false" with a 4xx (Triton: 400), not a 5xx: a readiness check that
    # says no is an answer, not a failure. Orchestrators read any non-2xx as not ready.
    return web.Response(status=200 if request.app[MANAGER].ready() else 400)


def _io(runtime: ModelRuntime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model's tensors as clients see them (full shapes, -1 for dynamic dims)."""
    rt = runtime.service
    if isinstance(rt, EmbeddingRuntime):
        return (
            [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1, 1]}],
            [{"name": EMBEDDING_OUTPUT, "datatype": "FP32", "shape": [-1, rt.dim]}],
        )

    def view(specs: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "datatype": datatype_of(s.dtype),
                "shape": [-1 if d is None else d for d in s.shape],
            }
            for s in specs
        ]

    return view(runtime.engine.inputs), view(runtime.engine.outputs)


VERSIONS = ("1",)  # a repository holds one version of each model


def _check_version(request: web.Request, name: str) -> None:
    """A path that names a version names one the model has (Triton: "not found" otherwise),
    rather than being served by whatever version there is."""
    version = request.match_info.get("version")
    if version is not None and version not in VERSIONS:
        raise ModelNotFound(f"Request for unknown model: '{name}' version {version} is not found")


async def _runtime(request: web.Request) -> ModelRuntime:
    name = request.match_info["model"]
    request["model"] = name
    _check_version(request, name)
    return await request.app[MANAGER].runtime(name)


# Registered before /v2/models/{model}, which would take "stats" for a model's name.
@routes.get("/v2/models/stats")
@routes.get("/v2/models/{model}/stats")
@routes.get("/v2/models/{model}/versions/{version}/stats")
async def statistics(request: web.Request) -> web.Response:
    """Triton's statistics extension: counts and durations since start, for every model the
    repository holds or for one (``telemetry.ModelStats``)."""
    mgr: ModelManager = request.app[MANAGER]
    name = request.match_info.get("model")
    if name is None:
        names = [n for n, s in mgr.slots.items() if s.state != ModelState.unbuilt]
    else:
        if name not in mgr.slots:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        if mgr.slots[name].state == ModelState.unbuilt:
            raise ModelNotBuilt(name)
        _check_version(request, name)
        names = [name]
    stats = request.app[METRICS].model_stats
    return web.json_response({"model_stats": [stats.triton(n, VERSIONS[0]) for n in names]})


@routes.get("/v2/models/{model}")
@routes.get("/v2/models/{model}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    runtime = await _runtime(request)
    inputs, outputs = _io(runtime)
    return web.json_response(
        {
            "name": runtime.entry.name,
            "versions": list(VERSIONS),
            "platform": "onnxruntime_onnx" if runtime.engine.backend == "onnxruntime" else "tensorrt_plan",
            "inputs": inputs,
            "outputs": outputs,
        }
    )


@routes.get("/v2/models/{model}/ready")
@routes.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    mgr: ModelManager = request.app[MANAGER]
    name = request.match_info["model"]
    slot = mgr.slots.get(name)
    if slot is None:
        return web.json_response({"error": f"Request for unknown model: '{name}' is not found"}, status=404)
    _check_version(request, name)
    # Ready as long as the next request is served: resident, or unloaded by keep-alive after it
    # has served (its next request loads it). Following residency alone, a client that checks
    # readiness before it sends (as Triton's clients may) never sent again once the model idled.
    is_ready = mgr.serves(name)
    return web.json_response({"name": name, "ready": is_ready}, status=200 if is_ready else 400)


@routes.get("/v2/models/{model}/config")
@routes.get("/v2/models/{model}/versions/{version}/config")
async def model_config(request: web.Request) -> web.Response:
    runtime = await _runtime(request)
    values = request.app[MANAGER].tunables(runtime.entry.name)
    inputs, outputs = _io(runtime)

    # A model whose tensors do not all have a dynamic first dimension runs each request alone:
    # Triton's max_batch_size 0, and dims are then the whole shapes.
    rt = runtime.service
    batching = not isinstance(rt, TensorRuntime) or rt.batchable

    def triton(t: dict[str, Any]) -> dict[str, Any]:
        # Triton's config leaves the batch dimension out of dims.
        return {
            "name": t["name"],
            "data_type": "TYPE_" + ("STRING" if t["datatype"] == "BYTES" else t["datatype"]),
            "dims": t["shape"][1:] if batching else t["shape"],
        }

    levels = int(values["queue.priority_levels"])
    return web.json_response(
        {
            "name": runtime.entry.name,
            "platform": "onnxruntime_onnx" if runtime.engine.backend == "onnxruntime" else "tensorrt_plan",
            "backend": runtime.engine.backend,
            "max_batch_size": int(values["batching.max_batch_size"]) if batching else 0,
            "input": [triton(t) for t in inputs],
            "output": [triton(t) for t in outputs],
            "dynamic_batching": {
                "preferred_batch_size": list(values["batching.preferred_batch_sizes"]),
                "max_queue_delay_microseconds": int(float(values["batching.max_queue_delay_ms"]) * 1000),
                "priority_levels": levels,
                "default_priority_level": int(values["queue.default_priority"]),
                "default_queue_policy": {
                    "max_queue_size": int(values["queue.max_queue_size"]),
                    "default_timeout_microseconds": int(float(values["queue.default_timeout_ms"]) * 1000),
                    "allow_timeout_override": bool(values["queue.allow_timeout_override"]),
                },
            },
            "instance_group": [{"count": int(values["engine.instances"]), "kind": "KIND_CPU"}],
        }
    )


def schedule_of(doc: dict[str, Any]) -> tuple[int | None, float | None]:
    """The priority and deadline (ms) a request's ``parameters`` name, None for each it leaves to
    the model's default (the deadline: to ``X-Timeout-Ms``); read here and by early shedding."""
    params = parameters_of(doc, "the request")
    priority = params.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise InvalidRequest("Unable to parse 'priority': expected an unsigned integer")
    timeout = params.get("timeout")
    # Triton's timeout is a uint64; a larger integer would not even convert to a float.
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout < 2**64
    ):
        raise InvalidRequest("Unable to parse 'timeout': expected microseconds as an unsigned 64-bit integer")
    # In the v2 protocol priority 0 means "the model's default level".
    return (priority or None), (timeout / 1000.0 if timeout else None)


@routes.post("/v2/models/{model}/infer")
@routes.post("/v2/models/{model}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    _check_version(request, name)
    header = request.headers.get(HEADER_LENGTH)
    if header is None:
        doc = await read_json(request)
        tail = b""
    else:
        doc, tail = split_body(await read_body(request), header)
    priority, timeout_ms = schedule_of(doc)
    slot = request.app[MANAGER].slots.get(name)
    # An embedding model queues each row as an item; any other model the request as one.
    items = _rows_declared(doc) if slot is not None and slot.entry.kind == ModelKind.embedding else 1
    # Admission first: a request its queue would refuse costs no decoding, hashing or lookup.
    ticket = admit(request, name, priority, items=items, timeout_ms=timeout_ms)
    assert slot is not None  # admission refused an unknown model
    if slot.entry.kind == ModelKind.generate:
        raise InvalidRequest(
            f"model '{name}' generates text: use POST /v1/chat/completions or /v1/completions"
        )
    feeds = decode_inputs(doc, tail)
    outputs, binary = requested_outputs(doc)
    truncate = parameters_of(doc, "the request").get("truncate")  # as OpenAI's 'truncate' field
    if truncate is not None and not isinstance(truncate, bool):
        raise InvalidRequest("Unable to parse 'truncate': expected true or false")
    # The response echoes the request id, so the id is part of the key (tritonclient sends none).
    canonical = {
        "api": "kserve.infer",
        "id": doc.get("id"),
        "inputs": [[k, str(v.dtype), list(v.shape)] for k, v in feeds.items()],
        "outputs": outputs,
        "binary": binary,
    }
    if truncate is not None:
        canonical["truncate"] = truncate  # a cut answer must not stand in for an uncut request
    work = _Infer(request, name, doc, feeds, outputs, binary, canonical, truncate)
    answer = await request.app[PIPELINE].answer(ticket, work)
    return render(answer, ticket, _length_header(answer.body, answer.content_type))


def _rows_declared(doc: dict[str, Any]) -> int:
    """The rows the first input's shape declares, for admission (at least 1; a malformed shape
    counts 1 here and gets its precise 400 from decoding)."""
    inputs = doc.get("inputs")
    first = inputs[0] if isinstance(inputs, list) and inputs else None
    shape = first.get("shape") if isinstance(first, dict) else None
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return 1
    rows = 1
    for d in shape:
        rows = min(rows * d, 1 << 31)  # bounded: a hostile shape must not build a huge int
    return max(rows, 1)


class _Infer:
    """A KServe infer request as the pipeline's Computation."""

    def __init__(
        self,
        request: web.Request,
        name: str,
        doc: dict[str, Any],
        feeds: dict[str, np.ndarray],
        outputs: list[str] | None,
        binary: Any,
        canonical: dict[str, Any],
        truncate: bool | None = None,
    ) -> None:
        self.app = request.app
        self.name = name
        self.doc = doc
        self.feeds = feeds
        self.outputs = outputs
        self.binary = binary
        self.canonical = canonical
        self.truncate = truncate  # the request's parameters.truncate (embedding models)
        self.blobs = [_blob(v) for v in feeds.values()]

    async def compute(self, runtime: ModelRuntime, ticket: Ticket) -> tuple[bytes, str]:
        if runtime.entry.kind == ModelKind.embedding:
            result = await _embed(
                self.app[EMBEDDINGS], runtime, self.feeds, self.outputs, ticket, self.truncate
            )
        else:
            result = await self.app[TENSORS].infer(
                runtime,
                self.feeds,
                self.outputs,
                priority=ticket.level,
                timeout_ms=ticket.timeout_ms(),
                reservation=ticket.reservation,
            )
        header: dict[str, Any] = {"model_name": self.name, "model_version": VERSIONS[0]}
        if "id" in self.doc:
            header["id"] = self.doc["id"]
        body, json_len = encode_response(header, result, self.outputs or list(result), self.binary)
        return body, "application/json" if json_len is None else "application/octet-stream"

    def default(self) -> tuple[bytes, str] | None:
        return None


def _blob(arr: np.ndarray) -> bytes:
    if arr.dtype == object:
        return b"".join(len(x).to_bytes(4, "little") + bytes(x) for x in arr.reshape(-1))
    return np.ascontiguousarray(arr).tobytes()


def _length_header(body: bytes, content_type: str) -> dict[str, str]:
    """A binary response names the length of its JSON part; recover it from the (cached) body."""
    if content_type != "application/octet-stream":
        return {}
    _, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
    return {HEADER_LENGTH: str(end)}


async def _embed(
    service: EmbeddingService,
    runtime: ModelRuntime,
    feeds: dict[str, np.ndarray],
    outputs: list[str] | None,
    ticket: Ticket,
    truncate: bool | None = None,
) -> dict[str, np.ndarray]:
    name = runtime.entry.name
    if set(feeds) != {TEXT_INPUT}:
        raise InvalidRequest(f"model '{name}' takes exactly one input, '{TEXT_INPUT}' (BYTES)")
    arr = feeds[TEXT_INPUT]
    if arr.dtype != object:
        raise InvalidRequest(f"input '{TEXT_INPUT}': expected datatype BYTES, got {datatype_of(arr.dtype)}")
    if arr.ndim not in (1, 2) or (arr.ndim == 2 and arr.shape[1] != 1):
        raise InvalidRequest(f"input '{TEXT_INPUT}': expected shape [-1] or [-1, 1], got {list(arr.shape)}")
    for o in outputs or []:
        if o != EMBEDDING_OUTPUT:
            raise InvalidRequest(f"unexpected inference output '{o}' for model '{name}'")
    try:
        texts = [b.decode("utf-8") for b in arr.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidRequest(f"input '{TEXT_INPUT}': elements must be UTF-8 text") from None
    result = await service.embed(
        runtime,
        texts,
        priority=ticket.level,
        timeout_ms=ticket.timeout_ms(),
        truncate=truncate,
        reservation=ticket.reservation,
        field=TEXT_INPUT,  # its errors name the tensor, not OpenAI's 'input'
    )
    return {EMBEDDING_OUTPUT: result.vectors.astype(np.float32)}
