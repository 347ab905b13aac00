"""Errors the services raise; the HTTP layer maps each to a status and its API's error shape."""

from __future__ import annotations

import reprlib
from typing import Any


class ApplianceError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        # Every problem found, each naming its field (the admin API's settings validation).
        self.problems: list[dict[str, str]] = []


class InvalidRequest(ApplianceError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ModelNotFound(ApplianceError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ModelNotBuilt(ModelNotFound):
    """In the repository, but not built: not usable until ``appliance models pull``, so a 404 as
    OpenAI (and Ollama, "try pulling it first") answers for a model one cannot use. A 503 with
    Retry-After had clients that honour it (the openai SDK) wait minutes for what only a pull
    fixes."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"The model '{name}' is not built yet; run `appliance models pull {name}`", param="model"
        )


class Conflict(ApplianceError):
    """The request is valid but the state of the file or the model does not allow it now."""

    status = 409
    type = "invalid_request_error"

    def __init__(self, message: str, code: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.code = code


class NotFound(ApplianceError):
    """No route for the path (a model that does not exist is ``ModelNotFound``)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Overloaded(ApplianceError):
    """The queue is full: the client should come back after ``retry_after_s``."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class Unavailable(ApplianceError):
    """Not now: deadline passed or would pass, model loading, draining, breaker open."""

    status = 503
    type = "service_unavailable"
    code = "unavailable"


class ModelUnloading(Unavailable):
    """The model is being unloaded (an operator's unload, an eviction): its running work drains,
    which may last as long as its longest generation, and a new request is told to come back
    rather than held for all of it (as Triton refuses requests for a model it is unloading)."""

    def __init__(self, name: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(f"The model '{name}' is being unloaded", param="model", retry_after_s=retry_after_s)


class LoadFailed(Unavailable):
    """A model that could not be loaded; ``reason`` says why, without the model's name (for a
    message that names it already)."""

    def __init__(
        self, name: str, reason: str, *, param: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(
            f"The model '{name}' failed to load: {reason}", param=param, retry_after_s=retry_after_s
        )
        self.reason = reason


class EngineFailure(ApplianceError):
    status = 500
    type = "server_error"
    code = "engine_error"

    def __init__(self, message: str, *, kind: str = "exception") -> None:
        super().__init__(message)
        self.kind = kind  # exception | timeout | oom: what the breaker counts


def json_type(value: Any) -> str:
    """What JSON calls ``value``'s type, for an error that names it: the client wrote JSON, not
    Python's "dict", "list" or "str"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


QUOTED_CHARS = 100


def quoted(name: str) -> str:
    """A client-supplied name (a model's, a tensor's) as an error message quotes it: its first
    ``QUOTED_CHARS`` characters, and "…" for the rest. Quoted whole, a 100,000-character model
    name made its 404 100 KB, and an unknown input's 400 likewise."""
    return name if len(name) <= QUOTED_CHARS else name[:QUOTED_CHARS] + "…"


_BOUNDED = reprlib.Repr()  # a few items of a list or an object, a few levels deep
_BOUNDED.maxstring = _BOUNDED.maxother = QUOTED_CHARS


def shown(value: Any) -> str:
    """A client-supplied value of any type as an error message shows it (Python's spelling),
    bounded as ``quoted`` bounds a name."""
    return repr(quoted(value)) if isinstance(value, str) else _BOUNDED.repr(value)
