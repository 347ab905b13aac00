"""The registry of tunable settings.

One table (name, type, default, bounds, help) drives the YAML config, the admin API, the README's
configuration reference and the console's tuning form, as datasette's settings do. Every setting
is declared at the bottom of this module, so nothing needs importing for its side effects.

Every tunable is per model: ``defaults`` in ``appliance.yaml`` sets the server-wide value, a
model's ``model.yaml`` section overrides it, and ``models.<name>`` in ``appliance.yaml`` (what the
admin API writes) overrides both.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SettingValue = int | float | bool | str | list[int]


class _Bad(Exception):
    """A value a Setting refuses (turned into the SettingError that names it)."""


class SettingError(ValueError):
    """A value that the registry refuses; the message names the setting and the expectation."""

    def __init__(self, name: str, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.detail = message
        # Every (setting, message) found, for forms that show each next to its field.
        self.problems = problems or [(name, message)]


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: SettingValue
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    # Settings that only take effect when the model is loaded again (thread counts, say).
    reload: bool = False
    # "model": per model (defaults, model.yaml, models.<name>); "server": one value, in defaults.
    scope: str = "model"

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0]

    def expectation(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
            self.type, "a list of integers"
        )
        if self.minimum is not None and self.maximum is not None:
            return f"{kind} from {_fmt(self.minimum)} to {_fmt(self.maximum)}"
        if self.minimum is not None:
            return f"{kind} >= {_fmt(self.minimum)}"
        if self.maximum is not None:
            return f"{kind} <= {_fmt(self.maximum)}"
        return kind

    def bounds(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        lo = "" if self.minimum is None else _fmt(self.minimum)
        hi = "" if self.maximum is None else _fmt(self.maximum)
        return f"{lo}..{hi}" if lo or hi else ""

    def coerce(self, value: Any) -> SettingValue:
        """Validate one value; raise SettingError naming this setting otherwise."""
        try:
            return self._coerce(value)
        except _Bad:
            # Built only on failure, and abbreviated: a hostile value's repr may be huge.
            raise SettingError(
                self.name, f"expected {self.expectation()}, got {reprlib.repr(value)}"
            ) from None

    def _coerce(self, value: Any) -> SettingValue:
        bad = _Bad()
        if self.type is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise bad
            self._check_bounds(value, bad)
            return int(value)
        if self.type is float:
            # NaN passes every comparison, so every range check (``.nan`` in a file made each
            # request of the model a 500); an infinity or a huge integer is no duration either.
            if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
                raise bad
            self._check_bounds(value, bad)
            return float(value)
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        # list[int]
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad
        for v in value:
            self._check_bounds(v, bad)
        return list(value)

    def _check_bounds(self, value: float, bad: _Bad) -> None:
        if self.minimum is not None and value < self.minimum:
            raise bad
        if self.maximum is not None and value > self.maximum:
            raise bad

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": "list[int]" if self.type is list else self.type.__name__,
            "default": self.default,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "choices": list(self.choices) if self.choices else None,
            "help": self.help,
            "reload": self.reload,
            "scope": self.scope,
        }


def _finite(value: float) -> bool:
    """Whether ``value`` is a finite number a float can hold (an int past 1e308 is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


REGISTRY: dict[str, Setting] = {}


def register(*settings: Setting) -> None:
    for s in settings:
        if s.name in REGISTRY:
            raise RuntimeError(f"setting {s.name} registered twice")
        REGISTRY[s.name] = s


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"batching": {"max_batch_size": 8}}`` -> ``{"batching.max_batch_size": 8}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def validate(
    values: Mapping[str, Any], where: str = "", *, per_model: bool = False, removals: bool = False
) -> dict[str, SettingValue]:
    """Validate a flat mapping of settings as a whole; every problem is reported at once.

    ``per_model`` refuses server-wide settings (a model cannot have its own cache file size).
    ``removals``: a None value removes an override (the admin API's null); only its name is
    checked, and it is left out of the result. A misspelt name removed nothing, silently.
    """
    problems: list[str] = []
    found: list[tuple[str, str]] = []
    clean: dict[str, SettingValue] = {}
    for name, value in values.items():
        setting = REGISTRY.get(name)
        if setting is None:
            if any(n.startswith(name + ".") for n in REGISTRY):
                # A group given a value ({"batching": null}, 5, [1]): "unknown setting" read as
                # if the group did not exist.
                why = f"a group of settings; expected a mapping of {name}.* settings (null each one to remove it)"
            else:
                close = [n for n in REGISTRY if n.split(".")[-1] == name.split(".")[-1]]
                why = "unknown setting" + (f" (did you mean {close[0]}?)" if close else "")
            problems.append(f"{where}{name}: {why}")
            found.append((name, why))
            continue
        if per_model and setting.scope == "server":
            problems.append(f"{where}{name}: a server-wide setting; set it under 'defaults'")
            found.append((name, "a server-wide setting; set it under 'defaults'"))
            continue
        if removals and value is None:
            continue
        try:
            clean[name] = setting.coerce(value)
        except SettingError as exc:
            problems.append(f"{where}{exc}")
            found.append((name, exc.detail))
    if problems:
        raise SettingError(found[0][0], "; ".join(problems), found)
    return clean


_defaults: dict[str, SettingValue] = {}


def defaults() -> dict[str, SettingValue]:
    """A fresh dict of every setting's default. The request path asks for a model's tunables
    several times per request: a copy of a cached dict costs a tenth of rebuilding it."""
    global _defaults
    if len(_defaults) != len(REGISTRY):  # settings register on import; never removed
        _defaults = {name: s.default for name, s in REGISTRY.items()}
    return dict(_defaults)


def table(rows: Iterable[Setting] | None = None) -> str:
    """A plain-text table for ``appliance settings``."""
    rows = list(rows if rows is not None else REGISTRY.values())
    header = ("setting", "type", "default", "bounds", "help")
    lines = [header]
    for s in rows:
        d = s.describe()
        scope = "server-wide" if s.scope == "server" else "per model"
        lines.append(
            (s.name, d["type"], _show(s.default), s.bounds(), f"{s.help} ({scope}{_applies(s, '; ')})")
        )
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    out = []
    for i, r in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=False)) + "  " + r[4])
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(out)


def markdown_table() -> str:
    """The README's configuration reference is generated from (and checked against) this."""
    out = ["| setting | scope | type | default | bounds | help |", "|---|---|---|---|---|---|"]
    for s in REGISTRY.values():
        note = f" ({_applies(s)})" if s.reload else ""
        # A choice's "|" would split the cell, and an <html-like> help text would be hidden.
        bounds = " / ".join(f"`{c}`" for c in s.choices) if s.choices else s.bounds()
        text = re.sub(r"(<[^<>]+>(?:\.\.\.<[^<>]+>)?)", r"`\1`", s.help)
        out.append(
            f"| `{s.name}` | {s.scope} | {s.describe()['type']} | `{_show(s.default)}` | "
            f"{bounds} | {text}{note} |"
        )
    return "\n".join(out)


def _applies(s: Setting, lead: str = "") -> str:
    """When a setting that needs a reload takes effect ("" for one that applies at once)."""
    if not s.reload:
        return ""
    return lead + ("applies at restart" if s.scope == "server" else "applies when the model is next loaded")


def _show(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


# The whole table, in one place: importing this module is enough to know every setting, and no
# module is imported for the side effect of registering its own.
register(
    Setting("batching.max_batch_size", int, 32, "Largest batch sent to the engine.", 1, 1024),
    Setting(
        "batching.measure_batch_size",
        bool,
        True,
        "Embedding models: time batch sizes up to max_batch_size at load and cap batches at the "
        "cheapest (CPU time per sentence) on this machine.",
        reload=True,
    ),
    Setting(
        "batching.max_queue_delay_ms",
        float,
        2.0,
        "How long a partial batch may wait for company while another batch of the model runs "
        "(instances > 1; priority-1 work does not wait).",
        0,
        10_000,
    ),
    Setting(
        "batching.priority_1_alone",
        bool,
        True,
        "A batch that holds priority-1 work takes no lower-priority items, so that it stays short "
        "(off: fill it to max_batch_size, more throughput, slower priority 1 under load).",
    ),
    Setting(
        "batching.share_turns",
        bool,
        True,
        "With priority_1_alone: when the engine comes back to this model from another model's "
        "call, its first batch also takes items as urgent as that call (up to max_batch_size), so "
        "that this model's work at that level gets the engine in turn with the other model's "
        "instead of never while priority-1 work keeps arriving (off: priority-1 batches always alone).",
    ),
    Setting(
        "batching.urgent_batch_ms",
        float,
        0.0,
        "While more urgent work (of any model) has used the engine within the last second, a batch "
        "of less urgent work is cut to about this many ms of compute (from the measured rate), so "
        "that the urgent work waits at most about that long (0 = batches by max_batch_size only).",
        0,
        60_000,
    ),
    Setting(
        "batching.preferred_batch_sizes",
        list,
        [],
        "Batch sizes dispatched as soon as they can be formed (e.g. TensorRT profile sizes).",
        1,
        1024,
    ),
    Setting("queue.priority_levels", int, 3, "Number of priority levels; 1 is the highest.", 1, 16),
    Setting("queue.default_priority", int, 2, "Level of a request that names none.", 1, 16),
    Setting(
        "queue.max_queue_size",
        int,
        256,
        "Waiting items allowed per priority level before 429 (0 = unbounded): each input of an "
        "embedding request counts, any other request counts once.",
        0,
        1_000_000,
    ),
    Setting(
        "queue.default_timeout_ms",
        float,
        30_000.0,
        "Deadline of a request in the queue (0 = none); past it the request is answered 503.",
        0,
        3_600_000,
    ),
    Setting(
        "queue.allow_timeout_override",
        bool,
        True,
        "Whether a request may set a shorter deadline of its own.",
    ),
    Setting(
        "queue.aging_ms",
        float,
        0.0,
        "Promote a waiting request one level per this many ms (0 = strict priority).",
        0,
        3_600_000,
    ),
    Setting(
        "queue.observed_drain",
        bool,
        True,
        "Predict a request's wait also from how often its level (and each more urgent one) was "
        "seen to get the engine lately, once that level's requests have timed out in the queue, "
        "not only from the engine's rate: a level starved by more urgent work is then refused on "
        "arrival (503, Retry-After) instead of timing out in the queue (embedding and tensor models).",
    ),
    Setting(
        "engine.instances",
        int,
        1,
        "Engine worker threads per model (batches that may run at once).",
        1,
        16,
        reload=True,
    ),
    Setting(
        "engine.intra_op_threads",
        int,
        0,
        "ONNX Runtime threads inside one operator (0 = one per core).",
        0,
        256,
        reload=True,
    ),
    Setting(
        "engine.inter_op_threads",
        int,
        1,
        "ONNX Runtime threads across operators.",
        1,
        64,
        reload=True,
    ),
    Setting(
        "engine.load_timeout_s",
        float,
        600.0,
        "A load (engine open, warm-up, measurements) taking longer fails: 503 with Retry-After for "
        "its requests, the model failed with this reason; the stuck open is closed when it ends.",
        1,
        86400,
    ),
)

# memory
register(
    Setting(
        "memory.budget_bytes",
        int,
        0,
        "Bytes the models may use (0 = memory.budget_fraction of the GPU's or the host's memory).",
        0,
        1 << 50,
        scope="server",
    ),
    Setting(
        "memory.host_budget_bytes",
        int,
        0,
        "With a GPU engine: host RAM for models on a CPU engine (0 = memory.budget_fraction of it).",
        0,
        1 << 50,
        scope="server",
    ),
    Setting(
        "memory.budget_fraction",
        float,
        0.8,
        "Share of device or host memory for models when no byte budget is set.",
        0.05,
        1.0,
        scope="server",
    ),
    Setting(
        "memory.reserve_bytes",
        int,
        512 << 20,
        "Memory kept free for the process itself and the CUDA context.",
        0,
        1 << 40,
        scope="server",
    ),
    Setting(
        "memory.keep_alive_s",
        float,
        300.0,
        "Unload a model idle this long (-1 keeps it loaded, as Ollama's keep_alive).",
        -1,
        7 * 86400,
    ),
    Setting("memory.pinned", bool, False, "Never evict this model to make room for another."),
)

# telemetry
register(
    Setting(
        "gpu.sample_interval_s",
        float,
        5.0,
        "How often NVML is read for GPU telemetry.",
        0.2,
        3600,
        scope="server",
        reload=True,
    )
)

# scheduler
register(
    Setting(
        "generation.max_running_sequences",
        int,
        8,
        "Sequences decoded together in one continuous batch (generate models).",
        1,
        1024,
    ),
    Setting(
        "generation.kv_cache_bytes",
        int,
        512 << 20,
        "KV-cache budget: running sequences reserve prompt + max_tokens tokens; the prefix cache uses the rest.",
        1 << 20,
        1 << 40,
    ),
    Setting(
        "generation.max_tokens_default",
        int,
        256,
        "max_tokens of a request that sets none (lowered to max_tokens_limit and to what the context has left).",
        1,
        1_000_000,
    ),
    Setting(
        "generation.max_tokens_limit",
        int,
        4096,
        "Largest max_tokens a request may ask for.",
        1,
        1_000_000,
    ),
    Setting(
        "generation.preemption",
        bool,
        True,
        "Let a waiting request evict running ones of a lower priority (they resume by recomputing; "
        "off, two long low-priority generations can hold the KV budget from priority 1 for minutes).",
    ),
    Setting(
        "generation.single_stream_q4",
        bool,
        True,
        "On the CPU, decode a lone sequence on the model's exact 4-bit companion build (1.4x faster).",
        reload=True,
    ),
    Setting(
        "generation.q4_int8_decode",
        bool,
        True,
        "Decode on that 4-bit companion with int8 activations, as llama.cpp does, up to 8 rows "
        "(2.6x faster at 1 row, 1.4x at 8 on AVX2; logits within ~2 of the float graph, not 2e-4, "
        "and greedy answers may differ with the batch; off: float accumulation, 1 row only, "
        "batch-independent).",
        reload=True,
    ),
    Setting(
        "generation.fused_decode",
        bool,
        True,
        "With q4_int8_decode, decode with that companion rewritten at load: its LM head as one 8-bit "
        "MatMulNBits (the same weights; 0.55-0.7x the head's time at 8 rows) and its rotary "
        "embedding and attention layout in ~30% fewer kernels (the same logits bit for bit); CPU only.",
        reload=True,
    ),
    Setting(
        "generation.decode_spin_us",
        int,
        200,
        "On the CPU, let the chat decoder's ONNX Runtime threads spin up to this many microseconds "
        "for their next kernel before sleeping (a decode step is ~1300 small kernels; each wake-up "
        "costs a futex call). 0: sleep at once. Measured on 2 cores with the appliance alone: 200 "
        "gives 1.2x the tokens/s at one stream and 1.17x at eight; with another process busy at "
        "the same priority a step takes ~1.4x as long: set 0 on a box shared with other work.",
        0,
        100000,
        reload=True,
    ),
    Setting(
        "generation.fused_attention",
        bool,
        False,
        "Also fuse each layer's decode attention into one ONNX Runtime GroupQueryAttention node "
        "(~6% less CPU per step at 1 row), at the cost of a row's tokens depending on its batch "
        "near ties (int8 activations amplify the different summation order).",
        reload=True,
    ),
    Setting(
        "generation.decode_steps_per_call",
        int,
        8,
        "Decode steps the engine worker runs in one hand-off while nothing else is due: no "
        "sequence waiting, joining or leaving, and no other engine call waiting for the compute "
        "grant; tokens still stream one by one (1 = one step per hand-off).",
        1,
        64,
    ),
    Setting(
        "generation.max_prefill_tokens",
        int,
        128,
        "Padded prompt tokens of the newcomers admitted to prefill together in one step (a lone "
        "prompt is always admitted; a long one is read in prefill_chunk_tokens chunks). Small, a burst's "
        "first requests get their first token sooner instead of all at the end of one long step: on 2 CPU "
        "cores 8 streams' TTFT p50 was two thirds of 4096's at the same tokens/s. On a GPU, where prefilling "
        "several prompts costs about what one does, raise it.",
        1,
        1_000_000,
    ),
    Setting(
        "generation.reasoning_parser",
        str,
        "auto",
        "Split chat answers into reasoning_content and content (deepseek-r1: <think>...</think>); "
        "auto: as the builder recognised the model's family.",
        choices=("auto", "none", "deepseek-r1"),
    ),
    Setting(
        "generation.prefill_chunk_tokens",
        int,
        512,
        "Prompt tokens computed per step, between decode steps of the running batch (0 = whole prompts).",
        0,
        1_000_000,
    ),
    Setting(
        "generation.urgent_prefill_ms",
        float,
        100.0,
        "While more urgent work has used the engine within the last second, prefill chunks are cut "
        "to about this many ms of compute (measured), so that it waits at most about one chunk "
        "(0 = chunks by prefill_chunk_tokens only).",
        0,
        60_000,
    ),
    Setting(
        "generation.max_prefill_ms",
        float,
        200.0,
        "Prefill chunks are cut to about this many ms of compute (measured) even while nothing "
        "more urgent is about, so that urgent work arriving during one waits at most about that "
        "long (0 = chunks by prefill_chunk_tokens only).",
        0,
        60_000,
    ),
    Setting(
        "generation.prefix_cache",
        bool,
        True,
        "Reuse the KV of whole prompt blocks shared with earlier requests (within kv_cache_bytes).",
    ),
    Setting(
        "generation.prefix_block_tokens",
        int,
        8,
        "Tokens per prefix-cache block; only whole blocks after an identical prefix are reused "
        "(8: a prompt recomputes at most 7 tokens past the longest shared prefix, not 15).",
        1,
        4096,
    ),
)

# resilience
register(
    Setting("breaker.window_s", float, 10.0, "Rolling window the failure rate is computed over.", 1, 3600),
    Setting(
        "breaker.min_requests",
        int,
        20,
        "Calls needed in the window before the breaker may trip.",
        1,
        1_000_000,
    ),
    Setting("breaker.failure_rate_threshold", float, 0.5, "Failure rate that trips the breaker.", 0.01, 1),
    Setting(
        "breaker.slow_call_ms",
        float,
        0.0,
        "A call slower than this is slow (0 = slow calls never trip).",
        0,
        3_600_000,
    ),
    Setting(
        "breaker.slow_call_rate_threshold", float, 1.0, "Slow-call rate that trips the breaker.", 0.01, 1
    ),
    Setting(
        "breaker.open_duration_s", float, 5.0, "How long the breaker stays open before probing.", 0.05, 3600
    ),
    Setting("breaker.half_open_probes", int, 1, "Calls let through to probe a recovering engine.", 1, 1000),
    Setting(
        "breaker.restart_engine_after",
        int,
        3,
        "Failed probes in a row after which the model's engine is replaced (unloaded; its next "
        "request loads a fresh one), so that a fault stuck in one engine instance, such as a CUDA "
        "error that poisons its context, heals without restarting the process (0 = never).",
        0,
        1000,
    ),
    Setting(
        "engine.timeout_ms",
        float,
        60_000.0,
        "A batch running longer counts as an engine timeout (0 = none).",
        0,
        3_600_000,
    ),
    Setting("cache.enabled", bool, True, "Answer identical deterministic requests from the response cache."),
    Setting(
        "cache.max_bytes",
        int,
        256 << 20,
        "Size bound of the response cache's entries (LRU eviction); SQLite keeps freed pages for reuse, so the file may stay larger.",
        1 << 20,
        1 << 40,
        scope="server",
    ),
    Setting(
        "cache.ttl_s", float, 3600.0, "Age until a cached response is stale.", 1, 365 * 86400, scope="server"
    ),
    Setting(
        "cache.max_stale_s",
        float,
        86400.0,
        "How long past its TTL a stale response may still be a fallback.",
        0,
        365 * 86400,
        scope="server",
    ),
    Setting(
        "cache.synchronous",
        str,
        "NORMAL",
        "SQLite durability: NORMAL survives a process crash; FULL also a power cut.",
        choices=("NORMAL", "FULL"),
        scope="server",
        reload=True,
    ),
)

# compute arbiter and input limits
register(
    Setting(
        "engine.spin_wait",
        bool,
        False,
        "Let ONNX Runtime's threads spin between runs (faster for one model alone; off, models taking "
        "turns on the cores do not steal them from each other).",
        reload=True,
    ),
    Setting(
        "engine.spin_us",
        int,
        500,
        "On the CPU, within one run, let an encoder's ONNX Runtime threads spin up to this many "
        "microseconds for their next kernel before sleeping; they sleep as soon as the run ends. "
        "Measured on 2 cores with the appliance alone (MiniLM): ~1 ms less at one client and ~10% "
        "more sentences/s at 16-64 clients, no loss beside chat; with another process busy at the "
        "same priority ~1.4x slower at 16 clients: set 0 on a box shared with other work. Chat "
        "decoders use generation.decode_spin_us.",
        0,
        100000,
        reload=True,
    ),
    Setting(
        "compute.concurrency",
        int,
        1,
        "Engine calls (batches, prefill chunks, decode steps) of all models that may run at once.",
        1,
        64,
        scope="server",
    ),
    Setting(
        "compute.aging_ms",
        float,
        1000.0,
        "A call waiting for engine time gains one priority level per this many ms (0 = strict).",
        0,
        3_600_000,
        scope="server",
    ),
    Setting(
        "compute.urgent_lane",
        int,
        0,
        "Extra engine calls only priority-1 work may run, so it never waits for lower-priority work "
        "already running (0 = none).",
        0,
        16,
        scope="server",
    ),
    Setting(
        "input.truncate",
        bool,
        False,
        "Cut inputs longer than the model's context instead of refusing them (400).",
    ),
)
