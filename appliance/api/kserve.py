"""KServe v2 / Triton HTTP routes, including the binary tensor data extension and /config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from appliance import __version__
from appliance.api.chat import GenerationRequest, Wire, completion_of, stream_generation
from appliance.api.common import (
    EMBEDDINGS,
    MANAGER,
    METRICS,
    OFFLOOP,
    OFFLOOP_BYTES,
    PIPELINE,
    TENSORS,
    admit,
    json_response,
    read_body,
    read_json,
    render,
)
from appliance.api.jsonbody import parse_object
from appliance.api.tensors import (
    HEADER_LENGTH,
    datatype_of,
    declared_inputs,
    decode_inputs,
    encode_response,
    parameters_of,
    requested_outputs,
    split_body,
)
from appliance.engines.base import Interface
from appliance.errors import (
    ApplianceError,
    InvalidRequest,
    ModelNotFound,
    Unavailable,
    json_type,
    quoted,
)
from appliance.inference import EmbeddingService, TensorRuntime, batches_rows
from appliance.llm.service import GenerationOptions
from appliance.models import ModelManager, ModelRuntime, ModelState
from appliance.pipeline import Ticket
from appliance.repository import ModelEntry, ModelKind

routes = web.RouteTableDef()

# What this server implements (the model repository extension is not: models are managed through
# the admin API).
EXTENSIONS = ["binary_tensor_data", "schedule_policy", "model_configuration", "statistics", "generate"]
TEXT_INPUT, EMBEDDING_OUTPUT = "text", "sentence_embedding"
# A generate model's interface as Triton's vLLM backend shows it (the inputs /generate reads as
# fields of its body; the rest of vLLM's optional inputs are not served), and what its config
# says: no Triton batching (the scheduler batches), and decoupled, as a model that streams is.
GENERATE_INPUTS: list[dict[str, Any]] = [
    {"name": "text_input", "datatype": "BYTES", "shape": [1]},
    {"name": "stream", "datatype": "BOOL", "shape": [1], "optional": True},
    {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "optional": True},
    {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [1], "optional": True},
]
GENERATE_OUTPUTS: list[dict[str, Any]] = [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
# Tensor bytes past which the cache key takes their SHA-256, computed by ``_decoded`` (on the
# worker thread for a large body), rather than the bytes themselves: the key was hashed on the
# event loop, ~30 ms for 48 MB, stalling every other client. Keys of smaller tensors are unchanged.
DIGEST_BLOB_BYTES = 256 * 1024


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


def _io(entry: ModelEntry, interface: Interface | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model's tensors as clients see them (full shapes, -1 for dynamic dims). A generate
    model's are its interface, needing no runtime; the others' follow their engine's."""
    if entry.kind == ModelKind.generate:
        strip = ("optional",)  # a config field; metadata has name, datatype and shape only
        return (
            [{k: v for k, v in t.items() if k not in strip} for t in GENERATE_INPUTS],
            [dict(t) for t in GENERATE_OUTPUTS],
        )
    assert interface is not None  # _described reads it for every model but a generate one
    engine_inputs, engine_outputs = interface
    if entry.kind == ModelKind.embedding:
        # Text in, the pooled vector out (EmbeddingRuntime.dim: its output's last dimension).
        spec = next((s for s in engine_outputs if s.name == EMBEDDING_OUTPUT), None)
        dim = int(spec.shape[-1]) if spec and spec.shape and spec.shape[-1] else 0
        return (
            [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1, 1]}],
            [{"name": EMBEDDING_OUTPUT, "datatype": "FP32", "shape": [-1, dim]}],
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

    return view(engine_inputs), view(engine_outputs)


VERSIONS = ("1",)  # a repository holds one version of each model


def _check_version(request: web.Request, name: str) -> None:
    """A path that names a version names one the model has (Triton: "not found" otherwise),
    rather than being served by whatever version there is."""
    version = request.match_info.get("version")
    if version is not None and version not in VERSIONS:
        raise ModelNotFound(
            f"Request for unknown model: '{quoted(name)}' version {quoted(version)} is not found"
        )


async def _described(request: web.Request) -> tuple[ModelEntry, Interface | None]:
    """The model a metadata or config request names, and its engine's inputs and outputs (None
    for a generate model, whose interface is fixed). Its answer is its interface and its
    tunables, so a GET of it must not load it (seconds, its memory, evicting another, and a
    keep-alive reset): a model that is not resident is described from its file
    (``ModelManager.interface``), within a bound."""
    name = request.match_info["model"]
    request["model"] = name
    _check_version(request, name)
    mgr: ModelManager = request.app[MANAGER]
    slot = mgr.request_slot(name)  # a 404, or ModelNotBuilt, as a load would answer
    if slot.entry.kind == ModelKind.generate:
        return slot.entry, None
    interface = await mgr.interface(name)
    return slot.entry, interface


def _platform(backend: str) -> str:
    return "onnxruntime_onnx" if backend == "onnxruntime" else "tensorrt_plan"


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
        # As every route naming a model: a folder copied in since the last reading is found (not
        # a 404 until some other request read the repository again), one removed is a 404, in
        # Triton's words (tritonclient users match them) unless its model.yaml is what is wrong.
        try:
            mgr.request_slot(name)
        except ModelNotFound as exc:
            if name in mgr.broken:
                raise
            raise ModelNotFound(f"Request for unknown model: '{quoted(name)}' is not found") from exc
        _check_version(request, name)
        names = [name]
    stats = request.app[METRICS].model_stats
    # Written by orjson: 2,000 models' statistics are ~1 MB, ~15 ms of the loop's with stdlib json.
    return json_response({"model_stats": [stats.triton(n, VERSIONS[0]) for n in names]})


@routes.get("/v2/models/{model}")
@routes.get("/v2/models/{model}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    entry, interface = await _described(request)
    inputs, outputs = _io(entry, interface)
    return web.json_response(
        {
            "name": entry.name,
            "versions": list(VERSIONS),
            "platform": _platform(request.app[MANAGER].backend(entry.name)),
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
        # Looked up as a request for it would be: a folder copied in since is found, and with the
        # repository unreadable the answer is a 503 (unknown for now), not a 404 (gone).
        slot = mgr.request_slot(name)
    _check_version(request, name)
    # Ready as long as the next request is served: resident, or unloaded by keep-alive after it
    # has served (its next request loads it). Following residency alone, a client that checks
    # readiness before it sends (as Triton's clients may) never sent again once the model idled.
    is_ready = mgr.serves(name)
    return web.json_response({"name": name, "ready": is_ready}, status=200 if is_ready else 400)


@routes.get("/v2/models/{model}/config")
@routes.get("/v2/models/{model}/versions/{version}/config")
async def model_config(request: web.Request) -> web.Response:
    entry, interface = await _described(request)
    values = request.app[MANAGER].tunables(entry.name)
    inputs, outputs = _io(entry, interface)
    generates = entry.kind == ModelKind.generate
    if generates:
        inputs = GENERATE_INPUTS  # with their "optional" marks

    # A model whose tensors do not all have a dynamic first dimension runs each request alone:
    # Triton's max_batch_size 0, and dims are then the whole shapes. A generate model's requests
    # are batched by its scheduler, token by token, not by Triton (as vLLM's backend says too).
    batching = entry.kind == ModelKind.embedding or (
        entry.kind == ModelKind.tensor and interface is not None and batches_rows(interface)
    )

    def triton(t: dict[str, Any]) -> dict[str, Any]:
        # Triton's config leaves the batch dimension out of dims.
        return {
            "name": t["name"],
            "data_type": "TYPE_" + ("STRING" if t["datatype"] == "BYTES" else t["datatype"]),
            "dims": t["shape"][1:] if batching else t["shape"],
            **({"optional": True} if t.get("optional") else {}),
        }

    # Decoupled: a request may have many responses (generate_stream), which is also why Triton's
    # HTTP /infer does not serve such a model.
    policy = {"model_transaction_policy": {"decoupled": True}} if generates else {}
    backend = request.app[MANAGER].backend(entry.name)
    return web.json_response(
        {
            "name": entry.name,
            "platform": _platform(backend),
            "backend": backend,
            "max_batch_size": int(values["batching.max_batch_size"]) if batching else 0,
            "input": [triton(t) for t in inputs],
            "output": [triton(t) for t in outputs],
            # A generate model is scheduled by its own scheduler, as vLLM's backend is: Triton
            # shows no dynamic_batching for it (its config has max_batch_size 0 and decoupled).
            **({} if generates else {"dynamic_batching": _dynamic_batching(values, batching)}),
            "instance_group": [{"count": int(values["engine.instances"]), "kind": "KIND_CPU"}],
            **policy,
        }
    )


def _dynamic_batching(values: dict[str, Any], batching: bool) -> dict[str, Any]:
    """Triton's dynamic_batching of a model's tunables. A model that runs each request alone
    (max_batch_size 0) keeps its priority queues but names no preferred batch sizes: Triton
    refuses a config whose preferred size exceeds its max_batch_size."""
    sizes = {"preferred_batch_size": list(values["batching.preferred_batch_sizes"])} if batching else {}
    return {
        **sizes,
        "max_queue_delay_microseconds": int(float(values["batching.max_queue_delay_ms"]) * 1000),
        "priority_levels": int(values["queue.priority_levels"]),
        "default_priority_level": int(values["queue.default_priority"]),
        "default_queue_policy": {
            "max_queue_size": int(values["queue.max_queue_size"]),
            "default_timeout_microseconds": int(float(values["queue.default_timeout_ms"]) * 1000),
            "allow_timeout_override": bool(values["queue.allow_timeout_override"]),
        },
    }


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
        # As Triton's HTTP endpoint answers for a decoupled model (its config says it is one).
        raise InvalidRequest(
            f"model '{name}' generates text and is decoupled (its config's model_transaction_policy): "
            f"/infer does not serve it; use POST /v2/models/{name}/generate or "
            f"/v2/models/{name}/generate_stream (Triton's generate extension), or /v1/completions"
        )
    runtime = slot.runtime
    if runtime is not None and isinstance(runtime.service, TensorRuntime):
        declared = declared_inputs(doc)
        if declared is not None:
            # Against the resident model before any data is decoded: the data's cost grows with
            # the body (8 MB of JSON numbers held the event loop 1.5 s, for every client), and a
            # request the model refuses on its shapes or its batch size should not pay it.
            request.app[TENSORS].check(runtime, declared)
    if len(await read_body(request)) > OFFLOOP_BYTES:  # read by now: the bytes aiohttp kept
        feeds, blobs, digested = await request.app[OFFLOOP].run(
            ticket, "decoding its tensors", _decoded, doc, tail
        )
    else:
        feeds, blobs, digested = _decoded(doc, tail)
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
    if digested:
        canonical["blobs"] = "sha256"  # the one blob is their digest: never the same key as raw bytes
    work = _Infer(request, name, doc, feeds, blobs, outputs, binary, canonical, truncate)
    answer = await request.app[PIPELINE].answer(ticket, work)
    return render(answer, ticket, _length_header(answer.body, answer.content_type))


_ROWS_BOUND = 1 << 31  # bounded: a hostile shape must not build a huge int


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
        rows *= d
        if rows > _ROWS_BOUND:
            # No body holds that many rows: the shape is malformed, and decoding says how (a
            # capped count here had been quoted as "the request has 2147483648 inputs").
            return 1
    return max(rows, 1)


class _Infer:
    """A KServe infer request as the pipeline's Computation."""

    def __init__(
        self,
        request: web.Request,
        name: str,
        doc: dict[str, Any],
        feeds: dict[str, np.ndarray],
        blobs: list[bytes],
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
        self.blobs = blobs

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
                priority=ticket.queue_level(),
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


def _decoded(doc: dict[str, Any], tail: bytes) -> tuple[dict[str, np.ndarray], list[bytes], bool]:
    """The request's input tensors, and their bytes for the cache key (a BYTES tensor's are a
    loop over its elements): all of a request's work that grows with its body. Past
    ``DIGEST_BLOB_BYTES`` the bytes are hashed here, and the one blob is their SHA-256 (True)."""
    feeds = decode_inputs(doc, tail)
    blobs = [_blob(v) for v in feeds.values()]
    if sum(len(b) for b in blobs) <= DIGEST_BLOB_BYTES:
        return feeds, blobs, False
    digest = hashlib.sha256()
    for blob in blobs:  # length-prefixed, as cache_key hashes its parts
        digest.update(len(blob).to_bytes(8, "big"))
        digest.update(blob)
    return feeds, [digest.digest()], True


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
            raise InvalidRequest(f"unexpected inference output '{quoted(o)}' for model '{name}'")
    try:
        texts = [b.decode("utf-8") for b in arr.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidRequest(f"input '{TEXT_INPUT}': elements must be UTF-8 text") from None
    result = await service.embed(
        runtime,
        texts,
        priority=ticket.queue_level(),
        timeout_ms=ticket.timeout_ms(),
        truncate=truncate,
        reservation=ticket.reservation,
        field=TEXT_INPUT,  # its errors name the tensor, not OpenAI's 'input'
    )
    return {EMBEDDING_OUTPUT: result.vectors.astype(np.float32)}


# -- Triton's generate extension: text in, text out, for a generate model --

# Sampling fields a generate request may set, at the top level of its body or in its
# ``parameters`` (Triton passes a field that names no input of the model on as a parameter), or
# in the JSON of vLLM's ``sampling_parameters``. ``stop_words`` is TensorRT-LLM's name for stop;
# ``bad_words`` (TensorRT-LLM's and vLLM's) is accepted only as none: banning a word's every
# tokenization is not implemented, and a request that needs it must not get the words back.
_SAMPLING = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_words",
    "bad_words",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
)
# What TensorRT-LLM's clients send for "no words" (its quick start sends "" for both lists).
_NO_WORDS: tuple[object, ...] = ("", [], None)
_FIELDS = ("text_input", "parameters", "id", "stream", "sampling_parameters", "exclude_input_in_output")
_SCHEDULE = ("priority", "timeout")  # parameters that schedule_of reads, as for infer


@dataclass
class _GenerateRequest:
    prompt: str
    sampling: dict[str, Any]  # as a /v1/completions body names them
    stream: bool | None
    exclude_input: bool
    stop_field: str  # the name the client set the stop strings with, for its errors


def _generate_request(doc: dict[str, Any]) -> _GenerateRequest:
    """The fields of a generate request, checked; each problem named by its field."""
    unknown = [k for k in doc if k not in _FIELDS and k not in _SAMPLING]
    if unknown:
        raise InvalidRequest(
            f"unexpected field '{unknown[0]}' in the generate request; it takes "
            + ", ".join(f"'{f}'" for f in (*_FIELDS, *_SAMPLING))
            + " ('priority' and 'timeout' go in 'parameters')"
        )
    text = doc.get("text_input")
    if isinstance(text, list) and len(text) == 1:  # the input's shape [1], as a JSON array
        text = text[0]
    if text is None:
        raise InvalidRequest("'text_input' is required: the text to generate from, a string")
    if not isinstance(text, str):
        raise InvalidRequest(f"'text_input' must be a string, got {json_type(text)}")
    if not text:  # named here: /v1/completions' check would name its own 'prompt'
        raise InvalidRequest("'text_input' must not be empty")
    params = parameters_of(doc, "the generate request")
    unknown = [k for k in params if k not in _SAMPLING and k not in _SCHEDULE and k not in _FIELDS[3:]]
    if unknown:
        raise InvalidRequest(
            f"unexpected parameter '{unknown[0]}'; 'parameters' takes "
            + ", ".join(f"'{f}'" for f in (*_SAMPLING, *_FIELDS[3:], *_SCHEDULE))
        )
    sources: list[tuple[str, dict[str, Any]]] = [("the request", doc), ("'parameters'", params)]
    encoded = doc.get("sampling_parameters", params.get("sampling_parameters"))
    if encoded is not None:
        if not isinstance(encoded, str):
            raise InvalidRequest(
                f"'sampling_parameters' must be a JSON object as a string, got {json_type(encoded)}"
            )
        try:
            # The body's own parser and checks: json.loads let through what they refuse. Nesting
            # past the recursion limit (a RecursionError, not a ValueError) and a lone surrogate
            # (which the cache key cannot encode) were 500s; a seed of 10**30 was taken here and
            # refused in the body.
            sampling = parse_object(encoded.encode(), "its text")
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"'sampling_parameters' must be a JSON object as a string: {exc.message}"
            ) from None
        unknown = [k for k in sampling if k not in _SAMPLING]
        if unknown:
            raise InvalidRequest(
                f"unexpected field '{unknown[0]}' in 'sampling_parameters'; it takes "
                + ", ".join(f"'{f}'" for f in _SAMPLING)
            )
        sources.append(("'sampling_parameters'", sampling))
    # A field set in two places is refused rather than one silently winning.
    found: dict[str, tuple[str, Any]] = {}
    for where, fields in sources:
        for k, v in fields.items():
            if k in _SAMPLING or k in _FIELDS[3:]:
                if k in found:
                    raise InvalidRequest(f"'{k}' is set both in {found[k][0]} and in {where}: set it once")
                found[k] = (where, v)
    values = {k: v for k, (_, v) in found.items()}
    for name in ("stop_words", "bad_words"):
        if name in values and values[name] in _NO_WORDS:
            del values[name]  # unset, as TensorRT-LLM reads it
    if "bad_words" in values:
        raise InvalidRequest(
            "'bad_words' is not supported: only \"\", [] or null (no words) is accepted, "
            f"got {json.dumps(values['bad_words'])[:40]}"
        )
    if "stop" in values and "stop_words" in values:
        raise InvalidRequest("'stop' and 'stop_words' name the same thing: set one of them")
    flags: dict[str, bool | None] = {}
    for name in ("stream", "exclude_input_in_output"):
        value = values.pop(name, None)
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"'{name}' must be true or false, got {json_type(value)}")
        flags[name] = value
    values.pop("sampling_parameters", None)
    stop_field = "stop"
    if "stop_words" in values:
        values["stop"], stop_field = values.pop("stop_words"), "stop_words"
    # The prompt is left out of text_output unless asked for: the answer /v1/completions gives.
    # (vLLM's backend repeats it by default when not streaming; exclude_input_in_output false
    # asks for that.)
    exclude = flags["exclude_input_in_output"]
    return _GenerateRequest(text, values, flags["stream"], True if exclude is None else exclude, stop_field)


def _options(req: _GenerateRequest) -> GenerationOptions:
    try:
        return GenerationOptions.from_openai(req.sampling, chat=False)
    except InvalidRequest as exc:
        if exc.param == "stop" and req.stop_field == "stop_words":  # named as the client named it
            raise InvalidRequest(exc.message.replace("'stop'", "'stop_words'"), param="stop_words") from None
        raise


@dataclass
class _TritonWire(Wire):
    """generate_stream's events: each carries the new text as ``text_output``, as Triton sends
    them; an error is ``{"error": message}``; the stream ends with the connection, not a marker."""

    version: str = VERSIONS[0]
    request_id: str | None = None

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        role: bool = False,
        reasoning: str | None = None,
    ) -> bytes:
        if not text:
            return b""  # the finish: Triton sends no event of its own for it
        return _sse_event(self.answer(text))

    def answer(self, text: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"model_name": self.model, "model_version": self.version, "text_output": text}
        if self.request_id is not None:
            doc["id"] = self.request_id
        return doc

    def error_event(self, exc: ApplianceError) -> bytes:
        return _sse_event({"error": exc.message})

    def end(self) -> bytes:
        return b""


def _sse_event(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


@routes.post("/v2/models/{model}/generate")
@routes.post("/v2/models/{model}/versions/{version}/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, stream=False)


@routes.post("/v2/models/{model}/generate_stream")
@routes.post("/v2/models/{model}/versions/{version}/generate_stream")
async def generate_stream(request: web.Request) -> web.StreamResponse:
    return await _generate(request, stream=True)


async def _generate(request: web.Request, *, stream: bool) -> web.StreamResponse:
    """Triton's generate extension on the machinery of /v1/completions: the same admission,
    deadline, response cache (its entries are shared with /v1/completions), breaker, fallback and
    validation; only the request's and the answer's shapes differ."""
    name = request.match_info["model"]
    _check_version(request, name)
    doc = await read_json(request)
    params = doc.get("parameters")
    if params is not None and not isinstance(params, dict):  # in JSON's words, as this route's others
        raise InvalidRequest(f"the generate request: 'parameters' must be an object, got {json_type(params)}")
    priority, timeout_ms = schedule_of(doc)
    # Admission first: a request its queue would refuse costs no templating or tokenizing.
    ticket = admit(request, name, priority, timeout_ms=timeout_ms)
    slot = request.app[MANAGER].slots[ticket.model]
    kind = slot.entry.kind
    if kind != ModelKind.generate:
        other = " or POST /v1/embeddings" if kind == ModelKind.embedding else ""
        raise InvalidRequest(
            f"model '{name}' is an {kind.value} model, not a generate model: "
            f"use POST /v2/models/{name}/infer{other}"
        )
    req = _generate_request(doc)
    if req.stream and not stream:
        raise InvalidRequest(
            f"'stream' must be false on /generate: use POST /v2/models/{name}/generate_stream for a stream"
        )
    # What a stream cannot honour is refused, not ignored (Triton's vLLM backend refuses the
    # second too): its events are the new text only, and a stream is what this route sends.
    if stream and req.stream is False:
        raise InvalidRequest(
            f"'stream' must be true or unset on /generate_stream: use POST /v2/models/{name}/generate "
            "for a whole answer"
        )
    if stream and not req.exclude_input:
        raise InvalidRequest(
            "'exclude_input_in_output' must be true or unset on /generate_stream: its events carry the "
            f"new text only; use POST /v2/models/{name}/generate to have the prompt repeated"
        )
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest(f"'id' must be a string, got {json_type(request_id)}")
    options = _options(req)
    work = GenerationRequest.of(request.app, ticket, False, {"prompt": req.prompt}, options)
    wire = _TritonWire(chat=False, model=ticket.model, request_id=request_id)
    # The whole answer (what the cache stores) keeps /v1/completions' shape: the two share entries.
    work.wire = wire
    pipeline = request.app[PIPELINE]
    if stream:
        return await stream_generation(request, pipeline, ticket, work, wire)
    answer = await pipeline.answer(ticket, work)
    completion = completion_of(answer.body, chat=False)
    if completion is None:
        raise Unavailable(f"the model '{name}' has no usable answer", retry_after_s=1.0)
    text = completion.text if req.exclude_input else req.prompt + completion.text
    body = orjson.dumps(wire.answer(text))
    return render(dataclasses.replace(answer, body=body, content_type="application/json"), ticket)
