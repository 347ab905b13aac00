"""An async client for the appliance's admin API (aiohttp), over loopback TCP or a Unix socket.

Every call returns a :class:`Result` instead of raising: the console polls once a second and a
server that is restarting is an ordinary state for it, not an exception to unwind through the UI.
The error side is typed, so the UI can tell "not reachable" from "refused the token" from "the
server rejected this value".
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import aiohttp

T = TypeVar("T")
JSON = dict[str, Any]


class AdminError(Exception):
    """Base of every error the client reports."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Disconnected(AdminError):
    """Nothing answered: connection refused or reset, socket missing, timed out."""


class TimedOut(Disconnected):
    """Nothing answered within the timeout (the server may still be working on it)."""


class Unauthorized(AdminError):
    """The server answered 401: the admin token is missing or wrong (TCP only)."""


class ProtocolError(AdminError):
    """Something answered, but not with the admin API's JSON."""


class ApiError(AdminError):
    """The admin API refused the request (4xx/5xx) with its error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Result(Generic[T]):
    value: T | None = None
    error: AdminError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class AdminClient:
    """One ``aiohttp.ClientSession`` for the console's lifetime, opened lazily on first use.

    The session is created inside the running loop (Textual's), not in ``__init__``, because
    ``appliance tui`` builds the client before the app's loop exists.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        socket: str | Path | None = None,
        token: str | None = None,
        timeout_s: float = 5.0,
        label: str | None = None,
    ) -> None:
        if url is None and socket is None:
            raise ValueError("AdminClient needs a URL or a Unix socket path")
        self.socket = Path(socket) if socket is not None else None
        # Over a Unix socket the host part is ignored; aiohttp still needs a well-formed URL.
        self.base_url = "http://localhost" if self.socket is not None else str(url).rstrip("/")
        self.token = token or None
        self.timeout_s = timeout_s
        self._label = label
        self._session: aiohttp.ClientSession | None = None

    @property
    def address(self) -> str:
        """What the header shows: the socket path or host:port (or a fixed label for snapshots)."""
        if self._label is not None:
            return self._label
        if self.socket is not None:
            return f"unix:{self.socket}"
        return self.base_url.removeprefix("http://").removeprefix("https://")

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector = (
                aiohttp.UnixConnector(path=str(self.socket))
                if self.socket is not None
                else aiohttp.TCPConnector()
            )
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(connector=connector, headers=headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(
        self, method: str, path: str, body: JSON | None = None, *, timeout_s: float | None = None
    ) -> Result[JSON]:
        # A keep-alive connection from before a server restart fails once with "disconnected";
        # retrying a read once turns that into a normal answer instead of a red flash. Never after
        # a timeout: that is a stalled server, not a stale connection, and a second wait would
        # keep "connected" on screen twice as long as the timeout the error names.
        attempts = 2 if method == "GET" else 1
        result: Result[JSON] = Result(error=Disconnected("no attempt made"))
        for _ in range(attempts):
            result = await self._once(method, path, body, timeout_s)
            if not isinstance(result.error, Disconnected) or isinstance(result.error, TimedOut):
                break
        return result

    async def _once(self, method: str, path: str, body: JSON | None, timeout_s: float | None) -> Result[JSON]:
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            session = self._open()
            async with session.request(method, self.base_url + path, json=body, timeout=timeout) as resp:
                raw = await resp.read()
                status = resp.status
                reason = resp.reason
        except asyncio.TimeoutError:
            return Result(error=TimedOut(f"no answer within {timeout.total:g} s"))
        except aiohttp.ClientConnectorError as exc:
            return Result(error=Disconnected(_reason(exc.os_error)))
        except (aiohttp.ClientError, OSError) as exc:
            return Result(error=Disconnected(_reason(exc)))
        try:
            # An empty success is an empty object; an empty refusal has no error to read.
            doc = json.loads(raw) if raw else {} if status < 400 else None
        except ValueError:
            doc = None
            problem = "the answer is not JSON"
        except RecursionError:  # "[" * 100000 parses as deep as the stack goes, then raises
            doc = None
            problem = "the answer is nested too deep"
        else:
            problem = "expected a JSON object"
        if not isinstance(doc, dict):
            if status >= 400:
                # Not the admin API's error body: a proxy in front of it, most likely. Its status
                # says what happened, and its text (often HTML) may say more.
                return Result(error=_not_json_error(status, reason, raw))
            return Result(error=ProtocolError(f"HTTP {status}: {problem}"))
        if status >= 400:
            err = doc.get("error")
            err = err if isinstance(err, dict) else {"message": str(err or f"HTTP {status}")}
            message = str(err.get("message") or f"HTTP {status}")
            if status == 401:
                return Result(error=Unauthorized(message))
            return Result(error=ApiError(status, message, err.get("param"), err.get("code")))
        return Result(value=doc)

    # -- the admin API ------------------------------------------------------------------------

    async def stats(self) -> Result[JSON]:
        return await self.request("GET", "/admin/stats")

    async def settings(self) -> Result[JSON]:
        return await self.request("GET", "/admin/settings")

    async def patch_settings(self, body: JSON) -> Result[JSON]:
        return await self.request("PATCH", "/admin/settings", body)

    async def load_model(self, model: str) -> Result[JSON]:
        # Loading builds an engine session: seconds, not the poll's short timeout.
        return await self.request("POST", f"/admin/models/{quote(model, safe='')}/load", timeout_s=300)

    async def unload_model(self, model: str) -> Result[JSON]:
        return await self.request("POST", f"/admin/models/{quote(model, safe='')}/unload", timeout_s=60)

    async def breaker(self, model: str, verb: str) -> Result[JSON]:
        """``verb`` is open, close, reset or disable."""
        return await self.request("POST", f"/admin/breakers/{quote(model, safe='')}/{verb}")

    async def purge_cache(self, model: str | None = None) -> Result[JSON]:
        return await self.request(
            "POST", "/admin/cache/purge", {"model": model} if model else {}, timeout_s=60
        )


def _not_json_error(status: int, reason: str | None, raw: bytes) -> AdminError:
    """The error for a refusal whose body is not the admin API's JSON: its status, what to do
    about a 401, and the start of its text without tags."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = reason or "error"
    text = " ".join(re.sub(r"<[^>]*>", " ", raw[:2000].decode("utf-8", "replace")).split())
    said = f"the answer: {text[:77]}…" if len(text) > 80 else f"the answer: {text}" if text else ""
    if status == 401:
        return Unauthorized(f"401 {phrase}: check the admin token ({said or 'no answer body'})")
    return ApiError(status, f"{status} {phrase} ({said or 'no answer body'})")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, FileNotFoundError):
        return "admin socket not found"
    return text
