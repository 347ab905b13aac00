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

import ctypes
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


@dataclass
class MemoryPools:
    """Two budgets: device memory for models on a GPU engine, host RAM for models on a CPU engine.

    Without a GPU engine on this box there is only the host pool. With one, ``memory.budget_bytes``
    (or ``memory.budget_fraction`` of the GPU) sizes the device pool and ``memory.host_budget_bytes``
    (or the same fraction of host RAM) the host pool; a model leases from the pool of the engine it
    runs on, and evicts only models in that pool. The interface is the single manager's, plus
    ``on_gpu`` to say which pool; ``budget``, ``arena`` and the top-level snapshot figures are the
    main pool's (the device's when there is one), as before the split.
    """

    host: MemoryManager
    device: MemoryManager | None = None

    @classmethod
    def create(cls, values: dict[str, Any], device_total: int | None) -> MemoryPools:
        if device_total is None:
            return cls(MemoryManager(budget_from(values)))
        return cls(MemoryManager(host_budget_from(values)), MemoryManager(budget_from(values, device_total)))

    def configure(self, values: dict[str, Any], device_total: int | None) -> None:
        """New budgets for the next load; leases stay (resident models are not evicted for them)."""
        if device_total is None or self.device is None:
            self.main.budget = budget_from(values, device_total)
            return
        self.device.budget = budget_from(values, device_total)
        self.host.budget = host_budget_from(values)

    @property
    def main(self) -> MemoryManager:
        return self.device if self.device is not None else self.host

    def pool(self, on_gpu: bool) -> MemoryManager:
        return self.device if on_gpu and self.device is not None else self.host

    @property
    def budget(self) -> int:
        return self.main.budget

    @budget.setter
    def budget(self, value: int) -> None:
        self.main.budget = value

    @property
    def arena(self) -> int:
        return self.main.arena

    @property
    def leases(self) -> dict[str, Lease]:
        return {**self.host.leases, **(self.device.leases if self.device else {})}

    def lease(self, name: str) -> Lease | None:
        """``name``'s lease, from either pool (the device's first, as ``leases`` merges them).
        One lookup: ``leases`` builds a dict of every model's, and asking it once per model made
        /admin/stats and every settings change quadratic in the models (~0.1 s at 2,000)."""
        lease = self.device.leases.get(name) if self.device else None
        return self.host.leases.get(name) if lease is None else lease

    @property
    def loads(self) -> int:
        return self.host.loads + (self.device.loads if self.device else 0)

    @property
    def evictions(self) -> int:
        return self.host.evictions + (self.device.evictions if self.device else 0)

    def plan(
        self,
        name: str,
        weights: int,
        activation: int,
        *,
        idle: Callable[[str], bool],
        last_used: Callable[[str], float],
        on_gpu: bool = False,
    ) -> list[str]:
        return self.pool(on_gpu).plan(name, weights, activation, idle=idle, last_used=last_used)

    def admit(self, name: str, weights: int, activation: int, pinned: bool, *, on_gpu: bool = False) -> None:
        # A model that reloaded onto another backend (say TensorRT failed) moves pools: one lease.
        for other in (self.host, self.device):
            if other is not None and other is not self.pool(on_gpu):
                other.leases.pop(name, None)
        self.pool(on_gpu).admit(name, weights, activation, pinned)

    def release(self, name: str, *, evicted: bool = False) -> None:
        for pool in (self.host, self.device):
            if pool is not None:
                pool.release(name, evicted=evicted)

    def snapshot(self) -> dict[str, Any]:
        main = self.main.snapshot()
        models: dict[str, Any] = {}
        for label, pool in (("host", self.host), ("device", self.device)):
            if pool is not None:
                for n, m in pool.snapshot()["models"].items():
                    models[n] = {**m, "pool": label}
        return {
            **{k: v for k, v in main.items() if k != "models"},
            "loads": self.loads,
            "evictions": self.evictions,
            "models": models,
            "device": _totals(self.device) if self.device is not None else None,
            "host": _totals(self.host),
        }


def _totals(pool: MemoryManager) -> dict[str, int]:
    return {
        "budget_bytes": pool.budget,
        "used_bytes": pool.used,
        "arena_bytes": pool.arena,
        "models": len(pool.leases),
    }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def host_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def rss_bytes() -> int:
    """This process's resident set, for measuring what a load really took."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> bool:
    """Give the heap that freed models left back to the system (glibc's ``malloc_trim``); False
    where there is no such call (another libc). Called after an unload: glibc keeps freed memory
    in its arenas, so an unloaded model's hundreds of MiB stayed resident (676 MiB came back from
    one trim in a probe's soak), and the next load, reusing them, measured its lease from an RSS
    that hardly grew (a 76 MB model read 59 MB after reloads)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)  # its result says whether anything was released, not whether it could be
    return True


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


def host_budget_from(values: dict[str, Any]) -> int:
    """The host pool's budget on a box whose main pool is the GPU's: for CPU-engine models."""
    configured = int(values["memory.host_budget_bytes"])
    if configured > 0:
        return configured
    return budget_from({**values, "memory.budget_bytes": 0}, None)


def gpu_check_step(probe: Any) -> tuple[str, str]:
    """For scripts/gpu-check: the device pool evicting on real device memory. Two models of 256 MiB
    under a device budget that holds one; each lease is backed by a real allocation, and the free
    device memory must fall by the allocation on admit and come back when the model is evicted."""
    if not getattr(probe, "ok", False):
        return "SKIPPED", "no CUDA device"
    from appliance.gpu import cuda

    size = 256 << 20
    pools = MemoryPools(MemoryManager(1 << 40), MemoryManager(size + size // 2))  # one model, never two
    buffers: dict[str, Any] = {}
    used: dict[str, float] = {}
    notes = []
    try:
        for step, name in enumerate(("model-a", "model-b")):
            victims = pools.plan(
                name, size, 0, idle=lambda n: True, last_used=lambda n: used.get(n, 0.0), on_gpu=True
            )
            for v in victims:
                before = cuda.mem_info(0)[0]
                buffers.pop(v).close()
                pools.release(v, evicted=True)
                back = cuda.mem_info(0)[0] - before
                if back < size:
                    return "FAIL", f"evicting {v} gave back {back} bytes of device memory, expected >= {size}"
                notes.append(f"evicting {v} freed {back >> 20} MiB")
            free_before = cuda.mem_info(0)[0]
            buffers[name] = cuda.DeviceBuffer(size)
            pools.admit(name, size, 0, pinned=False, on_gpu=True)
            used[name] = float(step)
            taken = free_before - cuda.mem_info(0)[0]
            if taken < size:
                return "FAIL", f"allocating {name} took {taken} bytes of device memory, expected >= {size}"
        assert pools.device is not None
        if list(pools.device.leases) != ["model-b"] or pools.evictions != 1 or pools.host.leases:
            return "FAIL", f"expected model-a evicted for model-b, device leases {list(pools.device.leases)}"
    finally:
        for b in buffers.values():
            b.close()
    return (
        "PASS",
        f"device budget {_mib(pools.device.budget)}: model-a evicted to load model-b; " + "; ".join(notes),
    )
