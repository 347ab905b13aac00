"""The memory manager: a byte budget that several models share, on the GPU or in host RAM.

Each resident model holds a lease for its weights. Activation memory is one shared arena that
engines use in turn, sized to the largest need among resident models (TensorRT contexts with
user-managed memory run one at a time on it; ONNX Runtime's per-run memory is accounted the same
way). A model that does not fit makes idle models (nothing queued or running) go, least recently
used first; pinned models never go; a model that could never fit is refused with a clear error.

Pure bookkeeping, no I/O: the model manager asks it what to evict and reports what was loaded,
with footprints measured at load and warm-up (for ONNX Runtime) rather than guessed. It imports
nothing heavy, so the GPU check script can drive it on a machine without the server's packages.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


class DoesNotFit(Exception):
    """The model cannot be made resident, now (``never`` False) or ever (``never`` True)."""

    def __init__(self, message: str, *, never: bool) -> None:
        super().__init__(message)
        self.never = never


@dataclass
class Lease:
    weights: int
    activation: int = 0
    pinned: bool = False


@dataclass
class MemoryManager:
    budget: int
    leases: dict[str, Lease] = field(default_factory=dict)
    loads: int = 0
    evictions: int = 0

    @property
    def arena(self) -> int:
        """One activation arena shared in turn: the largest need, not the sum."""
        return max((lease.activation for lease in self.leases.values()), default=0)

    @property
    def used(self) -> int:
        return sum(lease.weights for lease in self.leases.values()) + self.arena

    def need(self, weights: int, activation: int, without: Iterable[str] = ()) -> int:
        """Bytes in use if a model of this footprint were added after evicting ``without``."""
        gone = set(without)
        rest = [lease for name, lease in self.leases.items() if name not in gone]
        return (
            sum(lease.weights for lease in rest)
            + weights
            + max([activation, *(lease.activation for lease in rest)])
        )

    def plan(
        self,
        name: str,
        weights: int,
        activation: int,
        *,
        idle: Callable[[str], bool],
        last_used: Callable[[str], float],
    ) -> list[str]:
        """The models to evict so that ``name`` fits, least recently used first.

        Raises DoesNotFit, with ``never`` set when even an empty budget (pinned models aside)
        could not hold it: that is a configuration problem, not a busy moment.
        """
        pinned = [n for n, lease in self.leases.items() if lease.pinned and n != name]
        floor = (
            sum(self.leases[n].weights for n in pinned)
            + weights
            + max([activation, *(self.leases[n].activation for n in pinned)])
        )
        if floor > self.budget:
            raise DoesNotFit(
                f"model {name!r} needs {_mib(weights + activation)} (weights {_mib(weights)}, "
                f"activations {_mib(activation)}) and the memory budget is {_mib(self.budget)}"
                + (f" with {_mib(floor - weights - activation)} held by pinned models" if pinned else ""),
                never=True,
            )
        victims: list[str] = []
        candidates = sorted(
            (n for n, lease in self.leases.items() if n != name and not lease.pinned), key=last_used
        )
        for n in candidates:
            if self.need(weights, activation, victims) <= self.budget:
                break
            if idle(n):
                victims.append(n)
        if self.need(weights, activation, victims) > self.budget:
            raise DoesNotFit(
                f"model {name!r} needs {_mib(weights + activation)} but the budget of {_mib(self.budget)} "
                "is held by busy models; retry when they are idle",
                never=False,
            )
        return victims

    def admit(self, name: str, weights: int, activation: int, pinned: bool) -> None:
        self.leases[name] = Lease(weights, activation, pinned)
        self.loads += 1

    def release(self, name: str, *, evicted: bool = False) -> None:
        if self.leases.pop(name, None) is not None and evicted:
            self.evictions += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "used_bytes": self.used,
            "arena_bytes": self.arena,
            "loads": self.loads,
            "evictions": self.evictions,
            "models": {
                n: {
                    "weights_bytes": lease.weights,
                    "activation_bytes": lease.activation,
                    "pinned": lease.pinned,
                }
                for n, lease in self.leases.items()
            },
        }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def host_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def rss_bytes() -> int:
    """This process's resident set, for measuring what a load really took."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that the next peak is this run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return rss_bytes()


def measure(fn: Callable[[], Any]) -> tuple[int, int]:
    """(resident growth, peak working memory) of ``fn``, from the process's RSS and its peak."""
    base = rss_bytes()
    resettable = peak_rss_reset()
    fn()
    after = rss_bytes()
    peak = peak_rss_bytes() if resettable else after
    return max(0, after - base), max(0, peak - after)


def budget_from(values: dict[str, Any], device_total: int | None = None) -> int:
    """The configured budget, or a fraction of the device's (GPU) or host's memory minus a reserve."""
    configured = int(values["memory.budget_bytes"])
    if configured > 0:
        return configured
    total = device_total if device_total else host_memory_bytes()
    return max(0, int(total * float(values["memory.budget_fraction"])) - int(values["memory.reserve_bytes"]))


def gpu_check_step(probe: Any) -> tuple[str, str]:
    """For scripts/gpu-check: the manager evicting between two models under a small budget, with
    the leases backed by real device allocations, and free memory checked after each step."""
    if not getattr(probe, "ok", False):
        return "SKIPPED", "no CUDA device"
    from appliance.gpu import cuda

    size = 256 << 20
    mm = MemoryManager(budget=size + size // 2)  # room for one model, never two
    buffers: dict[str, Any] = {}
    clock = iter(range(1_000_000))
    used: dict[str, float] = {}
    for name in ("model-a", "model-b"):
        victims = mm.plan(name, size, 0, idle=lambda n: True, last_used=lambda n: used.get(n, 0.0))
        for v in victims:
            buffers.pop(v).close()
            mm.release(v, evicted=True)
        free_before = cuda.mem_info(0)[0]
        buffers[name] = cuda.DeviceBuffer(size)
        mm.admit(name, size, 0, pinned=False)
        used[name] = float(next(clock))
        taken = free_before - cuda.mem_info(0)[0]
        if taken < size:
            return "FAIL", f"allocating {name} took {taken} bytes of device memory, expected >= {size}"
    ok = list(mm.leases) == ["model-b"] and mm.evictions == 1
    for b in buffers.values():
        b.close()
    if not ok:
        return "FAIL", f"expected model-a evicted for model-b, leases {list(mm.leases)}"
    return "PASS", f"budget {_mib(mm.budget)}: model-a evicted to load model-b; device memory tracked"
