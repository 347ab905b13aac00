"""Shed before work: the refusal a request's queue would give, decided in the front door from what
the request says about itself (its model, priority and deadline), before the route's handler runs.

Under overload most requests are refused, and each refusal's cost is paid thousands of times a
second on the event loop: this path reads only the fields admission needs, raises nothing and
renders a refusal body it has rendered before. A request it does not refuse goes to its route as
usual (which reuses the parsed body), and anything unusual about it (a chunked body, invalid
JSON, a malformed priority or deadline, an unknown model) is left to the route, which answers it
precisely.

It covers the OpenAI routes, whose body names the model (the priority may be in the body or in
``X-Priority``), and KServe's infer and generate (the generate extension), whose path names the
model (the priority and deadline are in the body's ``parameters``, the deadline else in
``X-Timeout-Ms``; with the binary extension, in the JSON part that
``Inference-Header-Content-Length`` delimits). A refused request is never
validated further: with its queue full, a request with a malformed ``input`` gets the 429, not the
400 it would get once admitted.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from appliance.api.common import (
    BODY,
    PIPELINE,
    RAW_BODY,
    encoded,
    rendered_error,
    requested_priority,
    timeout_ms_of,
)
from appliance.api.jsonbody import check_object, loads_object
from appliance.api.kserve import schedule_of
from appliance.api.tensors import HEADER_LENGTH, header_length_of
from appliance.auth import ApiKeyRecord
from appliance.errors import ApplianceError, InvalidRequest

SHED_EARLY = frozenset({"/v1/embeddings", "/v1/chat/completions", "/v1/completions"})
# KServe's infer and the generate extension's routes: the path names the model, ``parameters``
# the priority and deadline.
_MODELS, _KSERVE = "/v2/models/", ("/infer", "/generate", "/generate_stream")


def sheds(path: str) -> bool:
    """Whether a POST to ``path`` is shed before work (its route matched: see ``early_refusal``)."""
    return path in SHED_EARLY or (path.endswith(_KSERVE) and path.startswith(_MODELS))


def body_here(request: web.Request) -> bool | None:
    """Whether all of the body is here (False: more is coming; clients often send the headers and
    the body in two writes); None when early shedding leaves the request to its route (a chunked
    body). A compressed body is never taken as all here: its length counts bytes on the wire, not
    the decoded bytes the stream holds. (A length over the size limit was refused before this:
    ``common.body_refusal``.)"""
    length = request.content_length
    if length is None:
        return None
    return request.content.total_bytes >= length and not encoded(request)


def early_refusal(
    request: web.Request, key: ApiKeyRecord | None, raw: bytes
) -> tuple[ApplianceError, int] | None:
    """The refusal for a POST that ``sheds`` with body ``raw``, by ``key`` (when keys are on), and
    its priority level, or None. Synchronous: an await costs a coroutine per request."""
    said = _admission_fields(request, raw)
    if said is not None:
        model, priority, timeout_ms, doc = said
        found = request.app[PIPELINE].refusal(model, priority=priority, key=key, timeout_ms=timeout_ms)
        if found is not None:
            # (A refusal's body is not kept: nothing reads it.)
            request["model"] = model
            request["priority"] = found[1]
            return found
        if doc is not None:
            try:
                check_object(raw, doc)
            except InvalidRequest:
                pass  # the route parses it again, and says what is wrong with it
            else:
                request[BODY] = doc  # the route reads it from here (read_json)
    request[RAW_BODY] = raw  # and this (read_body): the body has been read off the stream
    return None


def _admission_fields(
    request: web.Request, raw: bytes
) -> tuple[str, int | None, float | None, dict[str, Any] | None] | None:
    """The model, priority and deadline the request names, and its parsed body when the route
    can reuse it; None when anything about them is unusual."""
    if request.path in SHED_EARLY:
        try:
            doc: dict[str, Any] = loads_object(raw)
            priority = requested_priority(request, doc.get("priority"))
            timeout_ms = timeout_ms_of(request)
        except InvalidRequest:
            return None
        model = doc.get("model")
        return (model, priority, timeout_ms, doc) if isinstance(model, str) else None
    model = request.match_info.get("model")
    if model is None:  # no route matched: the router's 404 or 405
        return None
    json_length = request.headers.get(HEADER_LENGTH)
    try:
        if json_length is None:
            doc = loads_object(raw)
            whole: dict[str, Any] | None = doc
        else:
            n = header_length_of(json_length)
            if n is None or n > len(raw):
                return None
            doc = loads_object(raw[:n])  # only the JSON part (the route splits the body again)
            whole = None
        priority, timeout_ms = schedule_of(doc)
        if timeout_ms is None:
            timeout_ms = timeout_ms_of(request)
    except (InvalidRequest, ValueError):
        return None
    return model, priority, timeout_ms, whole


# By the refusal itself: the pipeline replays one refusal object while its queue stays full.
_BY_REFUSAL: dict[tuple[str, ApplianceError], tuple[bytes, CIMultiDict[str]]] = {}


def refusal_response(api: str, error: ApplianceError) -> web.Response:
    """``error_response`` for an early refusal."""
    rendered = _BY_REFUSAL.get((api, error))
    if rendered is None:
        if len(_BY_REFUSAL) >= 64:
            _BY_REFUSAL.clear()
        rendered = _BY_REFUSAL[(api, error)] = rendered_error(api, error)
    return web.Response(body=rendered[0], status=error.status, headers=rendered[1])
