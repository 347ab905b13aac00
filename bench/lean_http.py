"""A minimal keep-alive HTTP/1.1 client for the benchmarks' floods.

On a 2-core box the load generator shares the cores with the server it measures: aiohttp's client
spends about a third of a millisecond of CPU per request, which at 3x the embedding capacity is a
tenth of the box taken from the server under test (and counted against its goodput). This client
writes a request in one call and reads the head and a ``Content-Length`` body, nothing more: enough
for the appliance's JSON answers and refusals (chat streams keep aiohttp).

Connections are pooled and reused; an idle one the server has closed (its keep-alive timeout) is
dropped, and a request on a reused connection that the server closed at that very moment is sent
once more on a fresh one, so only a real failure reads as "no answer". Every request
is bounded by ``timeout_s``: past it the connection is aborted and the call raises TimeoutError.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    head: bytes  # the status line and headers, lower-cased
    body: bytes

    def has_header(self, name: bytes) -> bool:
        return b"\r\n" + name.lower() + b":" in self.head


class LeanClient:
    def __init__(self, host: str, port: int, *, limit: int = 512, timeout_s: float = 30.0) -> None:
        self.host, self.port = host, port
        self.timeout_s = timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._open = asyncio.Semaphore(limit)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        ).encode() + body
        async with self._open:
            loop = asyncio.get_running_loop()
            for attempt in (0, 1):
                conn = self._reuse() if attempt == 0 else None
                fresh = conn is None
                reader, writer = conn or await asyncio.open_connection(self.host, self.port)
                due = loop.time() + self.timeout_s
                timer = loop.call_at(due, writer.transport.abort)
                try:
                    writer.write(request)
                    head = (await reader.readuntil(b"\r\n\r\n")).lower()
                    length = 0
                    at = head.find(b"\r\ncontent-length:")
                    if at >= 0:
                        length = int(head[at + 17 : head.index(b"\r\n", at + 2)])
                    data = await reader.readexactly(length) if length else b""
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    writer.close()
                    got_nothing = not (isinstance(exc, asyncio.IncompleteReadError) and exc.partial)
                    if attempt == 0 and not fresh and got_nothing and loop.time() < due:
                        continue  # the server closed an idle keep-alive connection: once more, fresh
                    if loop.time() >= due:
                        raise TimeoutError(f"no answer within {self.timeout_s:g} s") from None
                    raise
                finally:
                    timer.cancel()
                if b"\r\nconnection: close" in head:
                    writer.close()
                else:
                    self._idle.append((reader, writer))
                return Reply(int(head[9:12]), head, data)
        raise AssertionError("unreachable")

    def _reuse(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """An idle connection the server has not closed (its keep-alive timeout closes the ones
        idle longest: those are dropped here, not tried)."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()

    async def __aenter__(self) -> LeanClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
