"""OpenAI chat and text completions, whole or streamed as server-sent events.

Whole responses go through ``guarded`` (breaker, response cache when the output is deterministic,
the model's default response). Streams have the same chain (``_stream``): a deterministic stream
is answered from the entry a whole response (or an earlier stream) left, replayed as one chunk,
and fills that entry when it completes. A stream's headers are sent with its first token, so a request refused or timed out while queued
still gets a plain JSON error with its status (429, 503); after that, an error is sent as an
``data: {"error": ...}`` event before ``data: [DONE]``, so a stream never ends silently.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from appliance.api.common import (
    CHAT,
    MANAGER,
    METRICS,
    RESILIENCE,
    cache_policy,
    guarded,
    priority_of,
    read_json,
    timeout_ms_of,
)
from appliance.breaker import BreakerOpen
from appliance.cache import cache_key
from appliance.errors import ApplianceError, EngineFailure, InvalidRequest, Unavailable
from appliance.llm.scheduler import Finished, Token
from appliance.llm.service import ChatService, Completion, GenerationOptions, Prepared
from appliance.resilience import SOURCE_HEADER

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    body = await read_json(request)
    _label(request, body)
    options = GenerationOptions.from_openai(body)
    stream, include_usage = _stream_flags(body)
    priority = priority_of(request, body.get("priority"))
    timeout_ms = timeout_ms_of(request)
    service = request.app[CHAT]
    if chat:
        prepared = await service.prepare_chat(body.get("model"), body.get("messages"), options)
    else:
        prepared = await service.prepare_completion(body.get("model"), body.get("prompt"), options)
    wire = _Wire(chat=chat, model=prepared.model, include_usage=include_usage)
    return await _respond(request, service, prepared, wire, stream, priority, timeout_ms)


def _label(request: web.Request, body: dict[str, Any]) -> None:
    model = body.get("model")
    if isinstance(model, str) and model:
        request["model"] = model


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include = opts.get("include_usage", False) if isinstance(opts, dict) else None
    if not isinstance(include, bool):
        raise InvalidRequest("'stream_options' must be {'include_usage': bool}", param="stream_options")
    return stream, include


@dataclass
class _Wire:
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
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _event(doc: Any) -> bytes:
    return b"data: " + _dumps(doc) + b"\n\n"


def _error_event(exc: ApplianceError) -> bytes:
    return _event({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})


DONE = b"data: [DONE]\n\n"


async def _respond(
    request: web.Request,
    service: ChatService,
    prepared: Prepared,
    wire: _Wire,
    stream: bool,
    priority: int | None,
    timeout_ms: float | None,
) -> web.StreamResponse:
    fallback = prepared.llm.default_response
    default_completion = None if fallback is None else Completion(fallback, "stop", len(prepared.prompt), 0)
    if stream:
        return await _stream(request, service, prepared, wire, priority, timeout_ms, default_completion)

    async def compute() -> tuple[bytes, str]:
        stream = service.start(prepared, priority=priority, timeout_ms=timeout_ms)
        return wire.whole(await stream.collect()), "application/json"

    def default() -> tuple[bytes, str]:
        assert default_completion is not None
        return wire.whole(default_completion), "application/json"

    api = "openai.chat" if wire.chat else "openai.completions"
    return await guarded(
        request,
        prepared.model,
        compute,
        canonical=prepared.canonical(api),
        priority=priority,
        default=default if default_completion is not None else None,
    )


def _sse(request: web.Request, source: str) -> web.StreamResponse:
    return web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a reverse proxy must not hold tokens back
            SOURCE_HEADER: source,
        }
    )


class _StreamCache:
    """The response cache as a stream sees it. A deterministic stream reads and fills the same
    entries as the whole response to the same request (a hit is replayed as one chunk), so both
    kinds of client share answers, and a stream also has the stale-cache fallback."""

    def __init__(self, request: web.Request, prepared: Prepared, api: str) -> None:
        self.model = prepared.model
        self.canonical = prepared.canonical(api)
        self.cache = request.app[RESILIENCE].cache
        if not request.app[MANAGER].tunables(self.model)["cache.enabled"] or self.canonical is None:
            self.cache = None
        self.read, self.write = cache_policy(request)
        self.key: str | None = None

    async def open(self, request: web.Request) -> None:
        if self.cache is not None and self.canonical is not None:
            runtime = await request.app[MANAGER].runtime(self.model)
            self.key = cache_key(runtime.identity, self.canonical)  # as guarded() keys whole answers

    async def get(self, chat: bool) -> tuple[Completion, bool] | None:
        """(completion, fresh) from the cache, or None."""
        if self.cache is None or self.key is None or not self.read:
            return None
        hit = await self.cache.get(self.key)
        if hit is None:
            return None
        try:
            doc = json.loads(hit.value)
            choice, usage = doc["choices"][0], doc["usage"]
            text = choice["message"]["content"] if chat else choice["text"]
            reasoning = choice["message"].get("reasoning_content") if chat else None
            details = usage.get("completion_tokens_details") or {}
            done = Completion(
                text,
                choice["finish_reason"],
                usage["prompt_tokens"],
                usage["completion_tokens"],
                reasoning,
                details.get("reasoning_tokens"),
            )
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return done, hit.fresh

    async def put(self, body: bytes) -> None:
        if self.cache is None or self.key is None or not self.write:
            return
        if self.cache.synchronous == "FULL":  # the same durability promise as whole answers
            await self.cache.put_and_wait(self.key, self.model, body, "application/json")
        else:
            self.cache.put(self.key, self.model, body, "application/json")


async def _stream(
    request: web.Request,
    service: ChatService,
    prepared: Prepared,
    wire: _Wire,
    priority: int | None,
    timeout_ms: float | None,
    default: Completion | None,
) -> web.StreamResponse:
    model = prepared.model
    if priority is not None:  # a bad priority is a 400 even when the cache could answer
        levels = int(request.app[MANAGER].tunables(model)["queue.priority_levels"])
        if not 1 <= priority <= levels:
            raise InvalidRequest(
                f"priority must be an integer from 1 to {levels}, got {priority}", param="priority"
            )
    store = _StreamCache(request, prepared, "openai.chat" if wire.chat else "openai.completions")
    await store.open(request)
    hit = await store.get(wire.chat)
    if hit is not None and hit[1]:
        return await _replay(request, wire, hit[0], "cache")
    breaker = request.app[RESILIENCE].breaker(model, request.app[MANAGER].tunables(model))
    try:
        permit = breaker.acquire()
    except BreakerOpen as exc:
        return await _fallback(
            request, wire, hit, default, exc.retry_after_s, "is failing and its circuit breaker is open"
        )
    with permit:  # left unresolved (refusal, disconnect) it counts nothing
        started = time.perf_counter()
        gen = service.start(prepared, priority=priority, timeout_ms=timeout_ms)
        resp = _sse(request, "engine")
        try:
            try:
                event = await gen.__anext__()
            except EngineFailure as exc:
                permit.failure(exc.kind)
                return await _fallback(request, wire, hit, default, 1.0, f"failed ({exc.kind})")
            await resp.prepare(request)
            if wire.chat:
                await resp.write(wire.chunk("", role=True))
            text: list[str] = []
            thinking: list[str] = []
            try:
                while True:
                    if isinstance(event, Finished):
                        await resp.write(wire.chunk(None, event.finish_reason))
                        if wire.include_usage:
                            await resp.write(
                                wire.usage_chunk(
                                    event.prompt_tokens, event.completion_tokens, event.reasoning_tokens
                                )
                            )
                        whole = Completion(
                            "".join(text),
                            event.finish_reason,
                            event.prompt_tokens,
                            event.completion_tokens,
                            None if event.reasoning_tokens is None else "".join(thinking),
                            event.reasoning_tokens,
                        )
                        break
                    if isinstance(event, Token) and (event.text or event.reasoning):
                        text.append(event.text)
                        thinking.append(event.reasoning)
                        await resp.write(wire.chunk(event.text, reasoning=event.reasoning))
                    event = await gen.__anext__()
            except ApplianceError as exc:
                if isinstance(exc, EngineFailure):
                    permit.failure(exc.kind)
                await resp.write(_error_event(exc))
            else:
                permit.success(time.perf_counter() - started)
                await store.put(wire.whole(whole))
            await resp.write(DONE)
            await resp.write_eof()
            return resp
        except ConnectionError:
            # The client went away between two tokens; the slot is freed below.
            return resp
        finally:
            gen.close()


async def _fallback(
    request: web.Request,
    wire: _Wire,
    hit: tuple[Completion, bool] | None,
    default: Completion | None,
    retry_after_s: float,
    why: str,
) -> web.StreamResponse:
    """The stream's fallback chain, as resilience.py's: cached (even stale), default, else 503."""
    metrics = request.app[METRICS]
    if hit is not None:
        source = "cache" if hit[1] else "stale-cache"
        metrics.fallbacks.labels(wire.model, source).inc()
        return await _replay(request, wire, hit[0], source)
    if default is not None:
        metrics.fallbacks.labels(wire.model, "default").inc()
        return await _replay(request, wire, default, "default")
    metrics.fallbacks.labels(wire.model, "unavailable").inc()
    raise Unavailable(
        f"the model '{wire.model}' {why} and no fallback is available", retry_after_s=retry_after_s
    )


async def _replay(
    request: web.Request, wire: _Wire, completion: Completion, source: str
) -> web.StreamResponse:
    """A whole answer (cached, or the model's default response) sent as a stream."""
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
    await resp.write(DONE)
    await resp.write_eof()
    return resp
