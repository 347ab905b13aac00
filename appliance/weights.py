"""Trusted weights measurements: what opening a model's engine took, read while no other engine ran.

A model's weights lease is the process's RSS growth across its engine's open, and RSS is the whole
process's: opened while another model served, a MiniLM read 132 to 260 MiB against 102 to 121 MiB
on a quiet process (another model's batch allocated, or freed, meanwhile), enough for needless
evictions or a false "never fits". The open cannot be made quiet as the peak probe is (a SmolLM
open takes 8-16 s of the other models' service), and the artefacts' sizes bound nothing sound
from above (ONNX Runtime may fold or pre-pack weights into new tensors). So a reading is trusted
only when no engine call ran during the open (the compute arbiter held no grant at its start and
granted none until its end), and the latest trusted reading is kept per model artefacts, engine
backend and the model's effective settings, in ``<data_dir>/weights.json`` (written atomically, so
it outlives a restart): a load beside other engine calls takes it in place of its own reading. One
with no trusted reading yet keeps its own, and the next quiet load measures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from appliance.config import atomic_write

log = logging.getLogger(__name__)

FILE = "weights.json"
# Old entries go first past this many (each rebuild or settings change adds one).
MAX_ENTRIES = 256


def weights_key(digest: str, backend: str, values: dict[str, Any]) -> str:
    """What a reading is valid for. Every effective setting counts, not only those marked for a
    reload: openers read others too (a decoder sizes its buffers by
    ``generation.max_running_sequences``), and a changed one costs only a miss."""
    text = json.dumps([digest, backend, values], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class WeightsRecords:
    """``<data_dir>/weights.json``: {key: {"model", "weights_bytes", "measured_at"}}. Read once, at
    first use; an unreadable or malformed file is logged and started afresh, and a write that
    fails (a read-only data folder) is logged and kept in memory. Blocking: call off the loop."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILE
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] | None = None

    def _read(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = {}
            try:
                raw = json.loads(self.path.read_text())
                self._entries = {
                    k: v
                    for k, v in raw.items()
                    if isinstance(v, dict)
                    and isinstance(v.get("weights_bytes"), int)
                    and v["weights_bytes"] >= 0
                }
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("%s: not read (%s); weights are measured again", self.path, exc)
        return self._entries

    def get(self, key: str) -> int | None:
        with self._lock:
            entry = self._read().get(key)
            return None if entry is None else int(entry["weights_bytes"])

    def put(self, key: str, model: str, weights: int) -> None:
        with self._lock:
            entries = self._read()
            entries.pop(key, None)  # re-inserted last: the newest are kept
            entries[key] = {"model": model, "weights_bytes": int(weights), "measured_at": round(time.time())}
            while len(entries) > MAX_ENTRIES:
                entries.pop(next(iter(entries)))
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.path, json.dumps(entries, indent=1, sort_keys=False).encode())
            except OSError as exc:
                log.warning("%s: not written (%s); a restart measures the weights again", self.path, exc)
