"""OpenAI chat and text completions, whole or streamed as server-sent events.

Both go through the request pipeline (``appliance.pipeline``): priority, early shedding, deadline,
response cache (deterministic requests: temperature 0 or a seed; a stream reads and fills the same
entries as a whole answer, replayed as one chunk), breaker judged by time to first token, fallback
to a stale entry or the model's default response. A stream's headers are sent with its first token
or its first keep-alive comment (``server.sse_keepalive_s`` while queued), so a request refused or
timed out before that still gets a plain JSON error with its status (429, 503); after it, an error
is sent as a ``data: {"error": ...}`` event before ``data: [DONE]``, so a stream never ends
silently.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from appliance.api.common import (
    CHAT,
    CONFIG,
    MANAGER,
    PIPELINE,
    STREAM_ERROR,
    admit,
    read_json,
    render,
    requested_priority,
)
from appliance.errors import ApplianceError, EngineFailure, InvalidRequest, Unavailable
from appliance.llm.scheduler import Finished, Token
from appliance.llm.service import (
    UNKNOWN_CONTEXT,
    ChatService,
    Completion,
    GenerationOptions,
    GenerationStream,
    Prepared,
    normalize_messages,
)
from appliance.models import ModelRuntime
from appliance.pipeline import EventStream, LiveStream, Pipeline, Ticket, follow
from appliance.resilience import SOURCE_HEADER, Answer

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    body = await read_json(request)
    stream, include_usage = _stream_flags(body)
    # Admission first: a request its queue would refuse costs no templating or tokenizing.
    ticket = admit(request, body.get("model"), requested_priority(request, body.get("priority")))
    options = GenerationOptions.from_openai(body, chat=chat)
    source: dict[str, Any]
    slot = request.app[MANAGER].slots[ticket.model]
    if chat:
        # Bounded by the model's context where a load has told it (else a generous default).
        context = slot.context_length or UNKNOWN_CONTEXT
        source = {"messages": normalize_messages(body.get("messages"), context)}
    else:
        source = {"prompt": body.get("prompt")}
    work = GenerationRequest.of(request.app, ticket, chat, source, options)
    wire = Wire(chat=chat, model=ticket.model, include_usage=include_usage)
    work.wire = wire
    pipeline = request.app[PIPELINE]
    if not stream:
        answer = await pipeline.answer(ticket, work)
        if answer.source in ("cache", "stale-cache"):
            # A stored answer carries the id and time of the response it was; this one is new
            # (a client that dedupes by id would drop it).
            completion = completion_of(answer.body, chat)
            if completion is not None:
                answer = dataclasses.replace(answer, body=wire.whole(completion))
        return render(answer, ticket)
    return await stream_generation(request, pipeline, ticket, work, wire)


class GenerationRequest:
    """A chat or completion request as the pipeline's Computation (whole) and Generation (stream)."""

    blobs: tuple[bytes, ...] = ()
    open_ended = True  # bounded by time to first token and stalls, not by its length

    @classmethod
    def of(
        cls,
        app: web.Application,
        ticket: Ticket,
        chat: bool,
        source: dict[str, Any],
        options: GenerationOptions,
    ) -> GenerationRequest:
        """The request for ``ticket``'s model with that model's defaults: its reasoning parser,
        its default max_tokens (within its limit) and its default response."""
        values = ticket.values
        return cls(
            app[CHAT],
            ticket.model,
            chat,
            source,
            options,
            app[MANAGER].slots[ticket.model].entry.spec.default_response,
            str(values.get("generation.reasoning_parser", "auto")),
            min(int(values["generation.max_tokens_default"]), int(values["generation.max_tokens_limit"])),
        )

    def __init__(
        self,
        service: ChatService,
        model: str,
        chat: bool,
        source: dict[str, Any],
        options: GenerationOptions,
        fallback: object,
        parser: str = "auto",
        default_max_tokens: int | None = None,
    ) -> None:
        self.service = service
        self.model = model
        self.chat = chat
        self.source = source
        self.options = options
        self.fallback = fallback if isinstance(fallback, str) else None
        self.wire: Wire | None = None
        o = options
        deterministic = o.temperature == 0 or o.seed is not None
        # The key is the request as sent (no model load is needed to compute it).
        self.canonical = (
            {
                "api": "openai.chat" if chat else "openai.completions",
                **source,
                "max_tokens": o.max_tokens,
                # Unset, it is the server's default: the key holds the limit the generation runs
                # with, so an operator's new default is not answered from the old one's entries.
                **({"default_max_tokens": default_max_tokens} if o.max_tokens is None else {}),
                "temperature": o.temperature,
                "top_p": o.top_p,
                "top_k": o.top_k,
                "seed": o.seed,
                "stop": list(o.stop),
                "ignore_eos": o.ignore_eos,
                # Only when set, so the keys of requests without them stay what they were.
                **({"stop_token_ids": list(o.stop_token_ids)} if o.stop_token_ids else {}),
                **({"min_tokens": o.min_tokens} if o.min_tokens else {}),
                # The answer's shape depends on the reasoning parser; keys of models without one
                # stay as they were.
                **(
                    {"reasoning": [o.reasoning_format, parser]}
                    if o.reasoning_format is not None or parser != "auto"
                    else {}
                ),
            }
            if deterministic
            else None
        )

    async def _prepare(self, runtime: ModelRuntime) -> Prepared:
        if self.chat:
            return await self.service.prepare_chat(runtime, self.source["messages"], self.options)
        return await self.service.prepare_completion(runtime, self.source["prompt"], self.options)

    def start(self, runtime: ModelRuntime, ticket: Ticket) -> EventStream:
        return _Started(self, runtime, ticket)

    async def compute(self, runtime: ModelRuntime, ticket: Ticket) -> tuple[bytes, str]:
        assert self.wire is not None
        parts: list[str] = []
        thinking: list[str] = []
        live = await follow(ticket, self.start(runtime, ticket))
        try:
            async for ev in live:
                if isinstance(ev, Token):
                    parts.append(ev.text)
                    thinking.append(ev.reasoning)
                elif isinstance(ev, Finished):
                    return self.wire.whole(_completion(parts, thinking, ev)), "application/json"
        finally:
            live.close()
        raise EngineFailure("the generation ended without a finish event", kind="exception")

    def default(self) -> tuple[bytes, str] | None:
        if self.fallback is None or self.wire is None:
            return None
        return self.wire.whole(Completion(self.fallback, "stop", 0, 0)), "application/json"


class _Started:
    """Prepares (tokenizes) and queues on the first ``__anext__``, so that the pipeline's deadline
    bounds tokenizing too and a refusal surfaces as the first event's exception."""

    def __init__(self, work: GenerationRequest, runtime: ModelRuntime, ticket: Ticket) -> None:
        self.work = work
        self.runtime = runtime
        self.ticket = ticket
        self.stream: GenerationStream | None = None
        self.closed = False

    def __aiter__(self) -> _Started:
        return self

    async def __anext__(self) -> Any:
        if self.stream is None:
            prepared = await self.work._prepare(self.runtime)
            if self.closed:
                raise StopAsyncIteration
            self.stream = self.work.service.start(
                prepared,
                priority=self.ticket.queue_level(),
                timeout_ms=self.ticket.timeout_ms(),
                reservation=self.ticket.reservation,
            )
        return await self.stream.__anext__()

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.close()

    def engine_stalled(self, seconds: float) -> bool:
        return self.stream is not None and self.stream.engine_stalled(seconds)


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    stream = False if stream is None else stream  # null is unset; 0, "" or [] are not booleans
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include = opts.get("include_usage") if isinstance(opts, dict) else ()
    include = False if include is None else include  # null is unset, as vLLM's Optional[bool]
    if not isinstance(include, bool):
        raise InvalidRequest("'stream_options' must be {'include_usage': bool}", param="stream_options")
    # vLLM's per-chunk usage: a client that asks for it counts on it, so it is refused, not ignored
    # (it had been dropped without a word: no usage on any chunk and no error).
    if opts.get("continuous_usage_stats") not in (None, False):
        raise InvalidRequest(
            "'stream_options.continuous_usage_stats' is not supported; use include_usage for the "
            "usage in the last chunk",
            param="stream_options.continuous_usage_stats",
        )
    return stream, include


@dataclass
class Wire:
    """The OpenAI shapes of one response; every chunk of a stream shares its id and timestamp."""

    chat: bool
    model: str
    include_usage: bool = False
    id: str = field(init=False)
    created: int = field(init=False)

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, c: Completion) -> bytes:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            if c.reasoning is not None:
                message["reasoning_content"] = c.reasoning
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
        else:
            choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        doc = {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": _usage(c.prompt_tokens, c.completion_tokens, c.reasoning_tokens),
            "system_fingerprint": None,
        }
        return _dumps(doc)

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        role: bool = False,
        reasoning: str | None = None,
    ) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if reasoning:  # DeepSeek's delta field for the thinking
                delta["reasoning_content"] = reasoning
            if text is not None and (text or not reasoning):
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None}
        choice["finish_reason"] = finish_reason
        doc = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if self.include_usage:
            doc["usage"] = None  # OpenAI's convention: only the last chunk carries usage
        return _event(doc)

    def error_event(self, exc: ApplianceError) -> bytes:
        """The event that reports an error once the stream's headers are sent."""
        return _error_event(exc)

    def end(self) -> bytes:
        """What closes the stream (KServe's generate_stream sends no terminator: ``kserve``)."""
        return DONE

    def usage_chunk(
        self, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None
    ) -> bytes:
        doc = {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [],
            "usage": _usage(prompt_tokens, completion_tokens, reasoning_tokens),
        }
        return _event(doc)


def _usage(prompt: int, completion: int, reasoning: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if reasoning is not None:  # OpenAI's field for the tokens spent thinking
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def _dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)


def _event(doc: Any) -> bytes:
    return b"data: " + _dumps(doc) + b"\n\n"


def _error_event(exc: ApplianceError) -> bytes:
    return _event({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})


DONE = b"data: [DONE]\n\n"


def _sse(request: web.Request, source: str) -> web.StreamResponse:
    headers = {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # a reverse proxy must not hold tokens back
        SOURCE_HEADER: source,
    }
    if "request_id" in request:  # its headers leave before the front door sees the response
        headers["X-Request-Id"] = request["request_id"]
    return web.StreamResponse(headers=headers)


def _completion(text: list[str], thinking: list[str], done: Finished) -> Completion:
    """The whole answer a generation made (reasoning apart, when a reasoning parser is on)."""
    reasoning = None if done.reasoning_tokens is None else "".join(thinking)
    return Completion(
        "".join(text),
        done.finish_reason,
        done.prompt_tokens,
        done.completion_tokens,
        reasoning,
        done.reasoning_tokens,
    )


def completion_of(body: bytes, chat: bool) -> Completion | None:
    """The whole answer a cached entry (or the default response) holds, to replay as a stream."""
    try:
        doc = orjson.loads(body)
        choice, usage = doc["choices"][0], doc["usage"]
        text = choice["message"]["content"] if chat else choice["text"]
        reasoning = choice["message"].get("reasoning_content") if chat else None
        details = usage.get("completion_tokens_details") or {}
        return Completion(
            text,
            choice["finish_reason"],
            usage["prompt_tokens"],
            usage["completion_tokens"],
            reasoning,
            details.get("reasoning_tokens"),
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


async def stream_generation(
    request: web.Request, pipeline: Pipeline, ticket: Ticket, work: GenerationRequest, wire: Wire
) -> web.StreamResponse:
    resp: web.StreamResponse | None = None

    async def keepalive() -> None:
        # An SSE comment: proxies and clients with idle timeouts keep the stream while it queues.
        nonlocal resp
        if resp is None:
            resp = _sse(request, "engine")
            await resp.prepare(request)
        await resp.write(b": keep-alive\n\n")

    # A client gone mid-stream, noticed by a write that finds the connection closing before the
    # handler's cancellation lands, raises ConnectionResetError to the front door: a 499 and a
    # failure, as the cancellation counts it. Caught here, it was the stream's end: a 200 and a
    # success in the statistics for an answer nobody received.
    try:
        outcome = await pipeline.stream(
            ticket, work, keepalive_s=request.app[CONFIG].server.sse_keepalive_s, on_wait=keepalive
        )
    except ApplianceError as exc:
        if resp is None:
            raise  # nothing sent yet: a plain JSON error with its status and Retry-After
        request[STREAM_ERROR] = exc
        await resp.write(wire.error_event(exc))
        await resp.write(wire.end())
        await resp.write_eof()
        return resp
    if isinstance(outcome, Answer):
        completion = completion_of(outcome.body, wire.chat)
        if completion is None:
            raise Unavailable(f"the model '{wire.model}' has no usable fallback", retry_after_s=1.0)
        return await _replay(request, wire, completion, outcome.source, resp)
    return await _live(request, wire, outcome, resp)


async def _live(
    request: web.Request, wire: Wire, live: LiveStream, resp: web.StreamResponse | None
) -> web.StreamResponse:
    try:
        if resp is None:
            resp = _sse(request, "engine")
            await resp.prepare(request)
        if wire.chat:
            await resp.write(wire.chunk("", role=True))
        text: list[str] = []
        thinking: list[str] = []
        try:
            async for event in live:
                if isinstance(event, Finished):
                    await resp.write(wire.chunk(None, event.finish_reason))
                    if wire.include_usage:
                        await resp.write(
                            wire.usage_chunk(
                                event.prompt_tokens, event.completion_tokens, event.reasoning_tokens
                            )
                        )
                    await live.finish(wire.whole(_completion(text, thinking, event)))
                    break
                if isinstance(event, Token) and (event.text or event.reasoning):
                    text.append(event.text)
                    thinking.append(event.reasoning)
                    await resp.write(wire.chunk(event.text, reasoning=event.reasoning))
        except ApplianceError as exc:
            request[STREAM_ERROR] = exc
            await resp.write(wire.error_event(exc))
        await resp.write(wire.end())
        await resp.write_eof()
        return resp
    finally:
        live.close()


async def _replay(
    request: web.Request,
    wire: Wire,
    completion: Completion,
    source: str,
    resp: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """A whole answer (cached, or the model's default response) sent as a stream."""
    if resp is None:
        resp = _sse(request, source)
        await resp.prepare(request)
    if wire.chat:
        await resp.write(wire.chunk("", role=True))
    await resp.write(wire.chunk(completion.text, reasoning=completion.reasoning))
    await resp.write(wire.chunk(None, completion.finish_reason))
    if wire.include_usage:
        await resp.write(
            wire.usage_chunk(
                completion.prompt_tokens, completion.completion_tokens, completion.reasoning_tokens
            )
        )
    await resp.write(wire.end())
    await resp.write_eof()
    return resp
