"""The collector and the serving process's long-lived heap.

A full (generation-2) collection walks every tracked object: after start-up that is the modules,
the models' Python-side state and the tokenizers, some 100,000 objects that live as long as the
process. Walking them took 75-200 ms on the 2-core box, holding the GIL, so each such collection
under load stalled the event loop and every engine worker's Python side at once (one or two per
30-s overload run, 151-198 ms each while the box was shared). Frozen once the default
models are loaded (``gc.freeze``), they are left out of every later collection; what the process
allocates while serving is collected as before.

Models loaded later (on demand, or every model where ``server.default_models`` names few) are
frozen in the same way once each load is done (``freeze_long_lived``): with 2,000 tiny models
loaded by requests, the heap held some 1.3 million tracked objects, and each full collection that
a ``/metrics`` rendering's allocations set off walked them all: 250-530 ms on the event loop. An
unloaded model's state must go back to the collector (``thaw``): frozen, whatever of it is held
in reference cycles would never be reclaimed, and each load and unload would leak it.
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


def freeze_long_lived() -> None:
    """After a model's load: collect what is garbage now, then freeze what is left alive. Only
    what is not frozen yet is walked (what the last freeze left out: the model just loaded and
    what requests made since), not the whole heap. What is frozen here that later becomes cyclic
    garbage (a request in flight now) waits for the next ``thaw``; a freeze is not a leak as
    long as every unload thaws. (Not ``gc.get_freeze_count()``: it walks every frozen object.)"""
    gc.collect()
    gc.freeze()


def thaw() -> None:
    """Give every frozen object back to the collector's oldest generation (an unloaded model's
    state among them; cheap: the lists are joined, nothing is walked). The next full collection
    walks the whole heap once; ``freeze_long_lived`` then freezes what is still alive."""
    gc.unfreeze()
