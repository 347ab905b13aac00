"""Pure functions from admin API payloads to what the console shows (no Textual in here).

The payloads are read defensively: the admin API grows keys over time (``gpu``, per-model
``breaker``/``cache``/``generation``), and a console that is older or newer than the server must
still draw whatever it understands.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

BREAKER_STYLES = {
    "closed": "green",
    "half_open": "yellow",
    "open": "bold red",
    "forced_open": "bold red",
    "disabled": "dim",
}
STATE_STYLES = {  # appliance.models.ModelState
    "resident": "green",
    "loading": "yellow",
    "evicted": "yellow",
    "failed": "bold red",
    "available": "",
    "unbuilt": "dim",
}


# The sections of /admin/stats the console reads as objects, and the numbers it reads on top.
SECTIONS = ("models", "cache", "memory", "gpu", "loop", "compute", "workers")
TOP_NUMBERS = ("uptime_s", "started_at")


def clean_stats(doc: Mapping[str, Any]) -> JSON:
    """``doc`` as the console can read it: every number past a float's range (``1e400`` and
    ``Infinity`` parse as inf, a 400-digit integer as itself) is null, i.e. missing; a section
    of the wrong type is left out, as a server without it would send; so is a model that is not
    an object.

    The views read defensively already; this is what makes the rest (formatting, arithmetic,
    ``int()``) safe to do on any answer that parsed as a JSON object.
    """
    stats: JSON = {str(k): _finite(v) for k, v in doc.items()}
    for key in SECTIONS:
        if key in stats and not isinstance(stats[key], Mapping):
            del stats[key]
    for key in TOP_NUMBERS:
        if key in stats and number(stats[key]) is None:
            del stats[key]
    if "models" in stats:
        stats["models"] = {str(k): m for k, m in stats["models"].items() if isinstance(m, Mapping)}
    return stats


def _finite(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool) and number(value) is None:
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def models(stats: Mapping[str, Any]) -> Mapping[str, Any]:
    """``stats["models"]``, or no models where it is not an object."""
    section = stats.get("models")
    return section if isinstance(section, Mapping) else {}


@dataclass(frozen=True)
class ModelRow:
    name: str
    kind: str
    state: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    queue: tuple[int, ...]
    breaker: str | None
    cache_hit_rate: float | None
    backend: str | None = None  # tensorrt / onnxruntime-cuda / onnxruntime-cpu, while resident
    backend_reason: str | None = None  # why faster backends were skipped


BACKEND_LABELS = {"tensorrt": "TensorRT", "onnxruntime-cuda": "ORT CUDA", "onnxruntime-cpu": "ORT CPU"}
BACKEND_STYLES = {"tensorrt": "green", "onnxruntime-cuda": "cyan", "onnxruntime-cpu": ""}


def backend_label(backend: str | None) -> str:
    return "—" if not backend else BACKEND_LABELS.get(backend, backend)


def short_reason(reason: str | None, limit: int = 32) -> str:
    """The first step down's cause, without its detail: "TensorRT: no CUDA device (cudaError…);
    ONNX Runtime CUDA: …" reads "no CUDA device". The full text is in /v1/models/{m}."""
    if not reason:
        return ""
    first = reason.split("; ", 1)[0]
    cause = first.split(": ", 1)[1] if ": " in first else first
    cause = cause.split(" (", 1)[0].strip()
    return cause if len(cause) <= limit else cause[: limit - 1] + "…"


@dataclass(frozen=True)
class MemoryPoolRow:
    pool: str  # "GPU" or "host"
    used: int
    budget: int
    models: int | None


def memory_pools(stats: Mapping[str, Any]) -> list[MemoryPoolRow]:
    """The device and host budgets of ``stats["memory"]``; one row for a server with one pool
    (no GPU, or an older server without the split)."""
    memory = stats.get("memory")
    if not isinstance(memory, Mapping):
        return []
    rows = []
    for key, label in (("device", "GPU"), ("host", "host")):
        pool = memory.get(key)
        if isinstance(pool, Mapping):
            models = pool.get("models")
            rows.append(
                MemoryPoolRow(
                    label,
                    int(num(pool.get("used_bytes"))),
                    int(num(pool.get("budget_bytes"))),
                    int(num(models)) if isinstance(models, int | float) else None,
                )
            )
    if not rows and "budget_bytes" in memory:
        rows.append(
            MemoryPoolRow(
                "budget", int(num(memory.get("used_bytes"))), int(num(memory.get("budget_bytes"))), None
            )
        )
    return rows


@dataclass(frozen=True)
class GpuRow:
    index: int
    name: str
    utilization: float | None  # 0..1
    memory_used: int | None
    memory_total: int | None
    temperature_c: float | None
    power_w: float | None


def num(value: Any, default: float = 0.0) -> float:
    """A JSON number as float; anything else (missing, null, a string, NaN, ±inf) as ``default``."""
    n = number(value)
    return default if n is None else n


def number(value: Any) -> float | None:
    """A JSON number as float; None for anything else (missing, null, a bool, a string, NaN, ±inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        n = float(value)
    except OverflowError:  # an integer past the largest float
        return None
    return n if math.isfinite(n) else None


def restarted(before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> bool:
    """Whether ``now`` comes from another server process than ``before``.

    ``started_at`` names the process; uptime cannot, as a new process may have been up longer by
    the next poll than the old one was at the last. A server that does not send ``started_at``
    is taken to have restarted when its uptime went down.
    """
    if before is None:
        return False
    then, started = number(before.get("started_at")), number(now.get("started_at"))
    if then is not None and started is not None:
        return started != then
    up_then, up = number(before.get("uptime_s")), number(now.get("uptime_s"))
    return up_then is not None and up is not None and up < up_then


def _optnum(value: Any) -> float | None:
    return None if value is None or isinstance(value, bool) else num(value)


def hit_rate(cache: Any) -> float | None:
    """Fresh and stale hits over all lookups; None before the first lookup or without a cache."""
    if not isinstance(cache, Mapping):
        return None
    hits = num(cache.get("hits")) + num(cache.get("stale_hits"))
    total = hits + num(cache.get("misses"))
    return hits / total if total else None


def model_rows(stats: Mapping[str, Any], breaker_fallback: Mapping[str, str] | None = None) -> list[ModelRow]:
    """One row per model, in the server's order.

    ``breaker_fallback`` holds states the breaker actions answered with; it is used only for a
    model whose stats carry no ``breaker`` section, so the operator still sees the effect of an
    action on a server that does not report breakers in /admin/stats.
    """
    rows = []
    models = stats.get("models")
    for name, m in models.items() if isinstance(models, Mapping) else []:
        if not isinstance(m, Mapping):
            continue
        queue = m.get("queue_depth")
        depths: tuple[int, ...] = ()
        if isinstance(queue, Mapping):
            depths = tuple(
                int(num(queue[k])) for k in sorted(queue, key=lambda k: int(k) if k.isdecimal() else 0)
            )
        breaker = m.get("breaker")
        state = breaker.get("state") if isinstance(breaker, Mapping) else None
        if state is None and breaker_fallback:
            state = breaker_fallback.get(str(name))
        rows.append(
            ModelRow(
                name=str(name),
                kind=str(m.get("kind", "?")),
                state=str(m.get("state", "?")),
                requests_per_s=num(m.get("requests_per_s")),
                p50_ms=num(m.get("p50_ms")),
                p99_ms=num(m.get("p99_ms")),
                queue=depths,
                breaker=str(state) if state is not None else None,
                cache_hit_rate=hit_rate(m.get("cache")),
                backend=str(m["backend"]) if m.get("backend") else None,
                backend_reason=str(m["backend_reason"]) if m.get("backend_reason") else None,
            )
        )
    return rows


def gpu_rows(stats: Mapping[str, Any]) -> list[GpuRow]:
    """The GPUs in ``stats["gpu"]`` (the NVML sampler's snapshot); empty on a CPU-only server."""
    gpu = stats.get("gpu")
    if not isinstance(gpu, Mapping) or not gpu.get("available"):
        return []
    out = []
    gpus = gpu.get("gpus")
    for i, g in enumerate(gpus if isinstance(gpus, list) else []):
        if not isinstance(g, Mapping):
            continue
        used, total = _optnum(g.get("memory_used_bytes")), _optnum(g.get("memory_total_bytes"))
        out.append(
            GpuRow(
                index=int(num(g.get("index"), i)),
                name=str(g.get("name") or f"GPU {i}"),
                utilization=_optnum(g.get("utilization_ratio")),
                memory_used=None if used is None else int(used),
                memory_total=None if total is None else int(total),
                temperature_c=_optnum(g.get("temperature_celsius")),
                power_w=_optnum(g.get("power_watts")),
            )
        )
    return out


def device_label(stats: Mapping[str, Any]) -> str:
    gpus = gpu_rows(stats)
    if not gpus:
        return "CPU only"
    names = sorted({g.name for g in gpus})
    return names[0] if len(gpus) == 1 else f"{len(gpus)}× {' / '.join(names)}"


# -- server health: event loop, compute arbiter, supervised workers, refusals ---------------

# Above this p99, the loop is visibly blocked: every client's latency grows by about this much.
LOOP_LAG_ALERT_MS = 50.0


@dataclass(frozen=True)
class LoopLag:
    """``stats["loop"]``: how late the server's event loop ran a timer, over the last minute."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def slow(self) -> bool:
        return self.p99_ms > LOOP_LAG_ALERT_MS


def loop_lag(stats: Mapping[str, Any]) -> LoopLag | None:
    loop = stats.get("loop")
    if not isinstance(loop, Mapping):
        return None
    return LoopLag(
        samples=int(num(loop.get("samples"))),
        p50_ms=num(loop.get("p50_ms")),
        p99_ms=num(loop.get("p99_ms")),
        max_ms=num(loop.get("max_ms")),
    )


@dataclass(frozen=True)
class Compute:
    """``stats["compute"]``: the arbiter that grants engine time across models by priority."""

    concurrency: int
    running: int
    waiting: tuple[tuple[int, int], ...]  # (priority level, waiters), every level from 1 up
    granted: int
    aging_ms: float
    urgent_lane: int = 0  # extra grants only priority-1 work may take (compute.urgent_lane)
    urgent_running: int = 0


def priority_levels(stats: Mapping[str, Any]) -> int:
    """The most priority levels any model queues by (their queue_depth keys)."""
    models = stats.get("models")
    levels = 0
    for m in models.values() if isinstance(models, Mapping) else []:
        queue = m.get("queue_depth") if isinstance(m, Mapping) else None
        if isinstance(queue, Mapping):
            levels = max([levels, *(int(k) for k in queue if str(k).isdecimal())])
    return levels


MAX_FILLED_LEVELS = 9


def compute(stats: Mapping[str, Any]) -> Compute | None:
    """The arbiter's state; its ``waiting`` names only levels with waiters (JSON keys are
    strings), so the levels in between, and up to the models' own, are filled with zeros."""
    c = stats.get("compute")
    if not isinstance(c, Mapping):
        return None
    raw = c.get("waiting")
    waiting = {
        int(k): int(num(v))
        for k, v in (raw.items() if isinstance(raw, Mapping) else [])
        if str(k).isdecimal()
    }
    # Zeros fill in up to MAX_FILLED_LEVELS at most: a stray huge level shows alone.
    top = min(
        max([priority_levels(stats), *(lv for lv in waiting if lv <= MAX_FILLED_LEVELS)]), MAX_FILLED_LEVELS
    )
    levels = sorted(set(range(1, top + 1)) | set(waiting))
    return Compute(
        concurrency=int(num(c.get("concurrency"), 1)),
        running=int(num(c.get("running"))),
        waiting=tuple((level, waiting.get(level, 0)) for level in levels),
        granted=int(num(c.get("granted"))),
        aging_ms=num(c.get("aging_ms")),
        urgent_lane=int(num(c.get("urgent_lane"))),
        urgent_running=int(num(c.get("urgent_running"))),
    )


@dataclass(frozen=True)
class WorkerRow:
    """One supervised background worker of ``stats["workers"]``."""

    name: str
    up: bool
    given_up: bool
    recent_failures: int

    @property
    def down(self) -> bool:
        return self.given_up or not self.up

    @property
    def state(self) -> str:
        return "given up" if self.given_up else "up" if self.up else "down"


def worker_rows(stats: Mapping[str, Any]) -> list[WorkerRow]:
    """Workers that are down (given up first) before those that are up; by name within each."""
    workers = stats.get("workers")
    rows = [
        WorkerRow(
            name=str(name),
            up=w.get("up") is not False,
            given_up=w.get("given_up") is True,
            recent_failures=int(num(w.get("recent_failures"))),
        )
        for name, w in (workers.items() if isinstance(workers, Mapping) else [])
        if isinstance(w, Mapping)
    ]
    return sorted(rows, key=lambda r: (not r.given_up, not r.down, r.name))


def workers_down(stats: Mapping[str, Any]) -> list[WorkerRow]:
    return [r for r in worker_rows(stats) if r.down]


@dataclass(frozen=True)
class Refusals:
    """Requests the models' queues refused: the rate now and the counts since start by reason
    (early shedding counts here too: a full queue or a missed deadline refused before any work)."""

    per_s: float
    by_reason: tuple[tuple[str, int], ...]  # non-zero reasons, most first


def refusals(stats: Mapping[str, Any]) -> Refusals | None:
    """None for a server whose model stats carry no ``rejections``."""
    models = stats.get("models")
    totals: dict[str, int] = {}
    per_s = 0.0
    seen = False
    for m in models.values() if isinstance(models, Mapping) else []:
        if not isinstance(m, Mapping):
            continue
        per_s += num(m.get("rejected_per_s"))
        rejections = m.get("rejections")
        if isinstance(rejections, Mapping):
            seen = True
            for reason, count in rejections.items():
                totals[str(reason)] = totals.get(str(reason), 0) + int(num(count))
    if not seen:
        return None
    ranked = sorted(((r, n) for r, n in totals.items() if n), key=lambda rn: (-rn[1], rn[0]))
    return Refusals(per_s, tuple(ranked))


# -- formatting ------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover  (the loop always returns)


def fmt_duration(seconds: float | None) -> str:
    # Below zero is no duration (a server clock that went back): unknown, like a missing one.
    if seconds is None or not 0 <= seconds < math.inf:
        return "—"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{s}s"


def fmt_rate(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def fmt_ms(x: float) -> str:
    if x <= 0:
        return "—"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def fmt_percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def fmt_value(value: Any) -> str:
    """A setting's value as the tuning form writes it (and parses it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e15 else str(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def fmt_generic(section: Mapping[str, Any], limit: int = 8) -> list[tuple[str, str]]:
    """Key/value lines for a panel whose shape the console does not know in detail."""
    out: list[tuple[str, str]] = []
    for key, value in section.items():
        if isinstance(value, Mapping | list) or len(out) >= limit:
            continue
        if key.endswith("_bytes") and isinstance(value, int | float):
            text = fmt_bytes(value)
        elif isinstance(value, float):
            text = f"{value:.3g}"
        else:
            text = fmt_value(value)
        out.append((key.removesuffix("_bytes").replace("_", " "), text))
    return out


# -- history ---------------------------------------------------------------------------------

HISTORY_LEN = 240  # samples per metric: 4 minutes at the default 1 s interval


@dataclass
class History:
    """Bounded rings of server-wide samples, one per graphed metric."""

    maxlen: int = HISTORY_LEN
    series: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        if not math.isfinite(value):  # a sum or product of huge numbers: no sample, not a crash
            return
        ring = self.series.get(name)
        if ring is None:
            ring = self.series[name] = deque(maxlen=self.maxlen)
        ring.append(value)

    def values(self, name: str) -> list[float]:
        return list(self.series.get(name, ()))

    def clear(self) -> None:
        self.series.clear()

    def record(self, stats: Mapping[str, Any]) -> None:
        rows = model_rows(stats)
        self.add("requests_per_s", sum(r.requests_per_s for r in rows))
        self.add("p99_ms", max((r.p99_ms for r in rows), default=0.0))
        self.add("queue_depth", float(sum(sum(r.queue) for r in rows)))
        gpus = gpu_rows(stats)
        utils = [g.utilization for g in gpus if g.utilization is not None]
        if utils:
            self.add("gpu_utilization", 100 * sum(utils) / len(utils))
        used = [g.memory_used for g in gpus if g.memory_used is not None]
        if used:
            self.add("gpu_memory", float(sum(used)))
        lag = loop_lag(stats)
        if lag is not None:
            self.add("loop_p99_ms", lag.p99_ms)


# -- tuning ----------------------------------------------------------------------------------


def parse_value(kind: str, text: str) -> Any:
    """The form's text back into a JSON value of the registry's type; ValueError says why not.

    Bounds are the server's to check: its message names the setting and the bound, and the form
    shows that message next to the field.
    """
    text = text.strip()
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError("not an integer") from None
    if kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    if kind == "bool":
        if text.lower() in ("true", "yes", "on", "1"):
            return True
        if text.lower() in ("false", "no", "off", "0"):
            return False
        raise ValueError("not true or false")
    if kind == "list[int]":
        if not text:
            return []
        try:
            return [int(part) for part in re.split(r"[,\s]+", text.strip("[] ")) if part]
        except ValueError:
            raise ValueError("not a comma-separated list of integers") from None
    return text


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool | str):
        return not isinstance(b, bool) and float(a) == float(b)
    return bool(a == b)


def nest(flat: Mapping[str, Any]) -> JSON:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``: the shape PATCH /admin/settings documents.

    Raises ValueError for names that cannot share one tree (``a`` and ``a.b``: a setting and a
    group of the same name), which only a server answering keys with dots in them could make the
    form hold; sending either half would change something other than what was typed.
    """
    tree: JSON = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for i, p in enumerate(parents):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"{name} and {'.'.join(parents[: i + 1])} cannot both be set in one request")
            node = child
        if leaf in node:
            raise ValueError(f"{name} and the settings under it cannot both be set in one request")
        node[leaf] = value
    return tree


def field_errors(message: str, param: str | None, names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Attribute the server's validation message to fields of the form.

    PATCH /admin/settings reports every problem at once, joined with "; ", each starting with
    the setting's full name (``defaults.queue.max_queue_size: expected …``); cross-field checks
    name only the leaf (``BatchPolicy.default_priority must be …``) and put it in ``param``.
    Returns the per-field messages and the problems no field could be found for.
    """
    names = list(names)
    by_leaf: dict[str, str] = {}
    for n in names:
        by_leaf.setdefault(n.rsplit(".", 1)[-1], n)
    found: dict[str, str] = {}
    leftover: list[str] = []
    segments = [s.strip() for s in message.split("; ") if s.strip()]
    for i, seg in enumerate(segments):
        target = _full_name_in(seg, names)
        if target is None and param and i == 0:
            target = by_leaf.get(param.rsplit(".", 1)[-1])
        if target is None:
            target = _leaf_in(seg, by_leaf)
        if target is None:
            leftover.append(seg)
        else:
            found[target] = f"{found[target]}; {seg}" if target in found else seg
    return found, leftover


def _full_name_in(seg: str, names: list[str]) -> str | None:
    best: tuple[int, int, str] | None = None
    for n in names:
        m = re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", seg)
        if m and (best is None or (m.start(), -len(n)) < (best[0], best[1])):
            best = (m.start(), -len(n), n)
    return best[2] if best else None


def _leaf_in(seg: str, by_leaf: Mapping[str, str]) -> str | None:
    best: tuple[int, str] | None = None
    for leaf, n in by_leaf.items():
        m = re.search(rf"(?<![\w]){re.escape(leaf)}(?![\w])", seg)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), n)
    return best[1] if best else None


# -- the settings answer ---------------------------------------------------------------------

# The registry's types (appliance/settings.py, Setting.describe): the only ones the form edits.
SETTING_TYPES = ("bool", "int", "float", "str", "list[int]")


def clean_settings(doc: Mapping[str, Any]) -> tuple[JSON, list[str]]:
    """``doc`` (GET or PATCH /admin/settings) as the tuning form can read it, and a line for each
    part it cannot: which, and what was expected.

    The registry keeps the entries :func:`read_setting` can read, the first of each name;
    ``defaults`` is an object, ``models`` an object of objects, ``overrides`` holds ``defaults``
    and ``models`` of those shapes; a part of another type is left out, as a server without it
    would send. Like :func:`clean_stats`, this lets the form index and compare without a check
    at each step, and a setting it cannot show is named, not silently missing.
    """
    problems: list[str] = []
    raw = doc.get("registry")
    if not isinstance(raw, list):
        problems.append(f"registry: expected a list, got {json_kind(raw)}")
        raw = []
    registry: list[JSON] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw, 1):
        spec = read_setting(entry, i)
        if isinstance(spec, str):
            problems.append(spec)
        elif spec["name"] in seen:
            problems.append(f"{clip(spec['name'])}: listed twice; the first is shown")
        else:
            seen.add(spec["name"])
            registry.append(spec)
    models = _object(doc.get("models"), "models", problems)
    overrides = _object(doc.get("overrides"), "overrides", problems)
    mine = _object(overrides.get("models"), "overrides.models", problems)
    where, needed, restart = doc.get("config_file"), doc.get("reload_needed"), doc.get("restart_needed")
    clean: JSON = {
        "registry": registry,
        "defaults": _object(doc.get("defaults"), "defaults", problems),
        "models": {m: v for m, v in models.items() if _is_object(v, f"model {m}", problems)},
        "overrides": {
            "defaults": _object(overrides.get("defaults"), "overrides.defaults", problems),
            "models": {m: v for m, v in mine.items() if _is_object(v, f"overrides.models.{m}", problems)},
        },
        "config_file": where if isinstance(where, str) else None,
        "reload_needed": [str(n) for n in needed] if isinstance(needed, list) else [],
        "restart_needed": [str(n) for n in restart] if isinstance(restart, list) else [],
    }
    return clean, problems


def read_setting(entry: Any, index: int) -> JSON | str:
    """Registry entry number ``index`` with every key the form reads of the type it reads it as
    (a missing key: no bounds, no choices, no help, per model), or what is wrong with it."""
    if not isinstance(entry, Mapping):
        return f"setting {index}: expected an object, got {json_kind(entry)}"
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        return f"setting {index}: no name"
    kind, choices, help_text = entry.get("type"), entry.get("choices"), entry.get("help")
    if kind not in SETTING_TYPES:
        return f"{clip(name)}: type: expected one of {', '.join(SETTING_TYPES)}, got {json_kind(kind)}"
    if choices is not None and not (
        kind == "str" and isinstance(choices, list) and all(isinstance(c, str) for c in choices)
    ):
        return f"{clip(name)}: choices: expected a list of strings of a str setting, got {json_kind(choices)}"
    for key in ("minimum", "maximum"):
        if entry.get(key) is not None and number(entry[key]) is None:
            return f"{clip(name)}: {key}: expected a number, got {json_kind(entry[key])}"
    if help_text is not None and not isinstance(help_text, str):
        return f"{clip(name)}: help: expected a string, got {json_kind(help_text)}"
    return {
        "name": name,
        "type": kind,
        "default": entry.get("default"),
        "minimum": entry.get("minimum"),
        "maximum": entry.get("maximum"),
        "choices": choices or None,
        "help": help_text or "",
        "reload": entry.get("reload") is True,
        "scope": "server" if entry.get("scope") == "server" else "model",
    }


def value_problem(spec: Mapping[str, Any], value: Any) -> str | None:
    """Why ``value`` cannot be shown in the editor of ``spec`` (a setting :func:`read_setting`
    read): it is not of the setting's type, or not one of its choices. None when it can."""
    kind, choices = spec["type"], spec["choices"]
    if kind == "bool":
        ok, expected = isinstance(value, bool), "true or false"
    elif kind == "int":
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind == "float":
        ok, expected = number(value) is not None, "a number"
    elif kind == "str":
        ok = isinstance(value, str) and (not choices or value in choices)
        expected = f"one of {', '.join(choices)}" if choices else "a string"
    else:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        expected = "a list of integers"
    if ok:
        return None
    shown = json_kind(value) if isinstance(value, list | Mapping) or value is None else repr(clip(str(value)))
    return f"expected {clip(expected)}, got {shown}"


def json_kind(value: Any) -> str:
    """What a JSON value is, in a few words however big it is: for messages about a value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    return "an object"


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _object(value: Any, where: str, problems: list[str]) -> JSON:
    """``value`` if it is an object; else nothing (said in ``problems`` unless it is missing)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    problems.append(f"{where}: expected an object, got {json_kind(value)}")
    return {}


def _is_object(value: Any, where: str, problems: list[str]) -> bool:
    if isinstance(value, Mapping):
        return True
    problems.append(f"{where}: expected an object, got {json_kind(value)}")
    return False
