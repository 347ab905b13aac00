"""What the console knows about the server at one moment; replaced wholesale on every poll."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONNECTING, CONNECTED, DISCONNECTED, UNAUTHORIZED, ERROR = (
    "connecting",
    "connected",
    "disconnected",
    "unauthorized",
    "error",
)


@dataclass(frozen=True)
class Snapshot:
    # The last stats that arrived: kept (and shown dimmed) while the server is unreachable, so the
    # operator still sees what was happening when it went away.
    stats: dict[str, Any] | None = None
    status: str = CONNECTING
    error: str | None = None
    # Polls that failed in a row; the header shows it so a "retrying" screen visibly retries.
    failures: int = 0

    @property
    def connected(self) -> bool:
        return self.status == CONNECTED
