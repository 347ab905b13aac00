"""The collector and the serving process's long-lived heap.

A full (generation-2) collection walks every tracked object: after start-up that is the modules,
the models' Python-side state and the tokenizers, some 100,000 objects that live as long as the
process. Walking them took 75-200 ms on the 2-core box, holding the GIL, so each such collection
under load stalled the event loop and every engine worker's Python side at once (one or two per
30-s overload run, 151-198 ms each while the box was shared). Frozen once the default
models are loaded (``gc.freeze``), they are left out of every later collection; what the process
allocates while serving is collected as before.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then move every object still alive out of the collector's generations
    (they stay alive; unreachable cycles among them would never be reclaimed, which for
    start-up state that lives until exit costs nothing). Returns how many were frozen."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("heap: %d start-up objects frozen in %.0f ms", frozen, (time.perf_counter() - started) * 1000)
    return frozen
