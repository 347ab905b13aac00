"""Embedding and tensor inference services: admission, batching and engine calls, no HTTP.

An embedding request of k texts becomes k batcher items, so the engine sees batches of sentences
whatever the request sizes, and variable lengths can be grouped to waste little padding.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from appliance.batcher import (
    AdmissionError,
    Batcher,
    BatcherClosed,
    InvalidPriority,
    QueueFull,
    Reservation,
    Tally,
)
from appliance.engines.base import (
    Engine,
    EngineError,
    EngineOutOfMemory,
    EngineTimeout,
    Interface,
    datatype_of,
)
from appliance.errors import ApplianceError, EngineFailure, InvalidRequest, Overloaded, Unavailable, quoted
from appliance.models import RUNTIME_FACTORIES, ModelManager, ModelRuntime, batch_policy
from appliance.repository import ModelEntry, ModelKind
from appliance.telemetry import Metrics, held_stats

log = logging.getLogger(__name__)


def admission_error(exc: AdmissionError) -> ApplianceError:
    """Map the batcher's refusals to the API errors (429 for a full queue, 503 for deadlines)."""
    if isinstance(exc, InvalidPriority):
        return InvalidRequest(str(exc), param="priority")
    if isinstance(exc, QueueFull):
        return Overloaded(str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, BatcherClosed):
        # Draining for a stop or an unload: come back once a fresh process or model serves.
        return Unavailable(f"{exc}; the server is shutting down or the model unloading", retry_after_s=5)
    # A 503 always says when to come back; a passed deadline has no better hint than "soon".
    return Unavailable(str(exc), retry_after_s=exc.retry_after_s or 1.0)


class _Observer:
    """Feeds batcher events into Prometheus."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.m = metrics
        self.model = model
        # Labelled children are looked up once: labels() takes a lock on every call, and these
        # run on every submit and every batch.
        self._batch = metrics.batch_size.labels(model)
        self._compute = metrics.compute_duration.labels(model)
        self._queue = metrics.queue_duration.labels(model)
        self._depth: dict[int, Any] = {}
        self._rejected: dict[tuple[int, str], Any] = {}

    def on_batch(self, size: int, queue_wait_s: Sequence[float], compute_s: float, ok: bool) -> None:
        self._batch.observe(size)
        self._compute.observe(compute_s)
        for w in queue_wait_s:
            self._queue.observe(w)
        if ok:  # Triton's execution_count and batch_stats count successful executions only
            self.m.model_stats.stepped(self.model, size, compute_s)

    def on_answered(self, tally: Tally) -> None:
        # In the request's context (submit_all): held for the front door, as it ends.
        self.m.model_stats.finished(
            self.model, tally.queue_s, tally.compute_s, rows=tally.rows, held=held_stats()
        )

    def on_reject(self, priority: int, reason: str) -> None:
        # Cached here: refusals come by the thousand per second under overload.
        counter = self._rejected.get((priority, reason))
        if counter is None:
            counter = self._rejected[priority, reason] = self.m.rejections.labels(
                self.model, str(priority), reason
            )
        counter.inc()

    def on_queue_depth(self, priority: int, depth: int) -> None:
        gauge = self._depth.get(priority)
        if gauge is None:
            gauge = self._depth[priority] = self.m.queue_depth.labels(self.model, str(priority))
        gauge.set(depth)

    def on_failure(self) -> None:
        # Counted as the scheduler of a generate model counts its faults: a worker's failure.
        self.m.worker_failures.labels(f"batcher:{self.model}").inc()


def engine_failure(exc: Exception) -> ApplianceError:
    """Admission refusals and engine errors as API errors; the kind is what the breaker counts."""
    if isinstance(exc, AdmissionError):
        return admission_error(exc)
    if isinstance(exc, ApplianceError):
        return exc
    kind = (
        "oom"
        if isinstance(exc, EngineOutOfMemory)
        else "timeout"
        if isinstance(exc, EngineTimeout)
        else "exception"
    )
    return EngineFailure(f"engine {kind}: {exc}", kind=kind)


def batcher_of(runtime: ModelRuntime) -> Batcher[Any, Any]:
    """The dynamic batcher of an embedding or tensor model (a generate model queues in the LLM
    scheduler, and the request is refused by name)."""
    batcher = runtime.batcher
    if not isinstance(batcher, Batcher):
        raise InvalidRequest(
            f"The model '{runtime.entry.name}' is a {runtime.entry.kind.value} model; this API needs "
            "an embedding or tensor model",
            param="model",
        )
    return batcher


async def submit_all(
    batcher: Batcher[Any, Any],
    items: Sequence[Any],
    priority: int | None,
    timeout_ms: float | None,
    reservation: Reservation | None = None,
) -> list[Any]:
    """Submit items of one request together; if any is refused, withdraw the rest. The request
    counts in the statistics once it has every answer (Triton's: once, when it succeeds)."""
    tally = Tally(len(items))
    if len(items) == 1:
        # The common case (one sentence, one tensor request) awaits the batcher directly: a task
        # and a gather per request were a sixth of the event loop's time in a py-spy profile.
        try:
            result = await batcher.submit(
                items[0], priority=priority, timeout_ms=timeout_ms, reservation=reservation, tally=tally
            )
        except (AdmissionError, EngineError) as exc:
            raise engine_failure(exc) from None
        batcher.answered(tally)
        return [result]
    tasks = [
        asyncio.ensure_future(
            batcher.submit(it, priority=priority, timeout_ms=timeout_ms, reservation=reservation, tally=tally)
        )
        for it in items
    ]
    try:
        results = list(await asyncio.gather(*tasks))
        batcher.answered(tally)
        return results
    except (AdmissionError, EngineError) as exc:
        raise engine_failure(exc) from None
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """The worker's outcome into the batch's future, unless it was given up on (timed out, or its
    batch cancelled) meanwhile."""
    if fut.done():
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def _dropped(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], job: concurrent.futures.Future[None]
) -> None:
    if not job.cancelled():
        return
    error = EngineError("the engine's worker was shut down before the batch ran")
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, fut, None, error)


def _expire(fut: asyncio.Future[Any], n: int, timeout_ms: float) -> None:
    if not fut.done():
        fut.set_exception(EngineTimeout(f"a batch of {n} ran past {timeout_ms:.0f} ms"))


def engine_call(
    mgr: ModelManager, name: str, executor: ThreadPoolExecutor, fn: Callable[[list[Any]], Any]
) -> Callable[[list[Any]], Awaitable[Any]]:
    """The batcher's ``execute``: run ``fn`` on the model's worker thread, bounded in time.

    A hung engine thread cannot be killed; its batch fails with EngineTimeout so that callers get
    an answer and the breaker sees the failures, while the thread is left to finish or hang.
    """
    loop = asyncio.get_running_loop()
    component = f"engine:{name}"
    # The compute arbiter decides who runs when; only engines that share one device arena
    # (TensorRT) must also never overlap, whatever the arbiter's concurrency.
    engine = getattr(getattr(fn, "__self__", None), "engine", None)
    shared: contextlib.AbstractContextManager[Any] = (
        mgr.arena_lock if hasattr(engine, "activation_bytes") else contextlib.nullcontext()
    )

    def split_on_oom(items: list[Any]) -> list[Any]:
        try:
            with shared:
                return list(fn(items))
        except EngineOutOfMemory:
            if len(items) == 1:
                raise  # even one item does not fit: a failure the breaker counts
            half = len(items) // 2
            mgr.metrics.oom_splits.labels(name).inc()
            log.warning("model %s: out of memory at batch %d; splitting and capping", name, len(items))
            # Never form a batch that large again; the batcher's policy picks the cap up.
            mgr.batch_caps[name] = min(mgr.batch_caps.get(name, half), half)
            loop.call_soon_threadsafe(mgr.apply, name)
            return split_on_oom(items[:half]) + split_on_oom(items[half:])

    busy = mgr.metrics.engine_busy.labels(name)

    def watched(items: list[Any]) -> Any:
        timeout_ms = float(mgr.tunables(name)["engine.timeout_ms"])
        # A batch may take up to twice its timeout before the watchdog calls the engine hung.
        with mgr.progress.working(component, 2 * timeout_ms / 1000 if timeout_ms > 0 else 300.0):
            began = time.perf_counter()
            try:
                return split_on_oom(items)
            except StopIteration as exc:
                # asyncio cannot put StopIteration into a future (a TypeError in the callback
                # that copies the worker's outcome): the batch never ended, and its requests
                # waited for the engine timeout (or for ever without one).
                raise EngineError(f"the engine raised StopIteration {exc.args!r}") from None
            finally:
                busy.inc(time.perf_counter() - began)

    def execute(items: list[Any]) -> Awaitable[Any]:
        # A plain function, not a coroutine: the batch goes to the worker thread now, in the turn
        # that formed it, not when the batcher's task first runs (behind the previous batch's
        # answers, which the loop renders meanwhile: the engine sat idle for that long).
        # The worker settles the returned future itself, in one loop callback: through
        # run_in_executor, a shield and a timeout context the result took three loop turns to
        # reach the batcher. (At one client the time there is the loop's wake-up, not the turns:
        # README, Performance, session 32.)
        fut: asyncio.Future[Any] = loop.create_future()

        def job() -> None:
            try:
                result = watched(items)
            except BaseException as exc:  # handed to the loop, raised in the batch's task
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, fut, result, None)

        # RuntimeError once the executor is shut down: the batch fails. A job cancelled before it
        # ran (a shutdown that cancels pending work) fails it too, instead of leaving it unanswered
        # where no engine timeout is set.
        executor.submit(job).add_done_callback(functools.partial(_dropped, loop, fut))
        timeout_ms = float(mgr.tunables(name)["engine.timeout_ms"])
        if timeout_ms > 0:
            # A hung thread cannot be killed: the batch fails at the timeout and its late result
            # is dropped (_settle finds the future done).
            timer = loop.call_later(timeout_ms / 1000, _expire, fut, len(items), timeout_ms)
            fut.add_done_callback(lambda _: timer.cancel())
        return fut

    return execute


# -- embedding ---------------------------------------------------------------------------------


# Load-time batch-size measurement: a short customer-service sentence (~14 tokens), every size
# timed (process CPU time) in TUNE_PASSES interleaved passes, cheapest run kept; stops after TUNE_BUDGET_S;
# sizes within TUNE_TIE of the best count as ties (the smallest wins: see best_batch).
TUNE_SENTENCE = "my order has not arrived yet, can you check the delivery status please"
TUNE_PASSES = 2
TUNE_BUDGET_S = 1.5
TUNE_TIE = 0.95
# What a batch costs in serving beyond its engine run: the gap between one batch's end and the
# next one's start (its results handed to the event loop, the next batch launched), 2.3-3.4 ms p50
# measured here, during which the engine's threads idle. The timing charges each batch that gap
# times the engine's threads, so near-ties go to the size that pays it fewer times per sentence
# (without it, 8 and 16 read within 4 % on a quiet box, 8 was chosen, and 64 clients got 0.88 of
# the engine's best instead of 0.95).
TUNE_BATCH_GAP_S = 0.0025


@dataclass
class EmbeddingResult:
    vectors: np.ndarray
    prompt_tokens: int


@dataclass(frozen=True)
class TextItem:
    """A sentence queued untokenized: the batch's worker tokenizes it with the rest of its batch.
    Tokenizing one request's sentence on the event loop was its largest single cost there (a fifth
    of the loop's time in a py-spy profile), and on a GPU the loop, not the engine, bounds
    embeddings. ``index`` is its place in the request, for the error that names it."""

    text: str
    index: int
    cut: bool
    field: str = "input"  # what the request calls its inputs, for that error

    def __len__(self) -> int:
        # What the batcher groups by, before there are tokens: about 4 characters a token, plus
        # [CLS] and [SEP].
        return len(self.text) // 4 + 2


class Embedded(NamedTuple):
    vector: np.ndarray
    tokens: int


class EmbeddingRuntime:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, max_tokens: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer  # truncates to the model's max_seq_length, as sentence-transformers
        self.max_tokens = max_tokens
        # The same tokenizer without truncation: counts an input's tokens, so that one too long
        # is refused (400) instead of silently cut.
        self.counting = Tokenizer.from_str(tokenizer.to_str())
        self.counting.no_truncation()
        spec = engine.output_spec("sentence_embedding")
        self.dim = int(spec.shape[-1]) if spec and spec.shape[-1] else 0

    def run_batch(self, items: Sequence[np.ndarray | TextItem]) -> list[Embedded | BaseException]:
        """Embed a batch of token arrays and sentences; the sentences are tokenized here, on the
        worker thread, all at once. A sentence over the context (without truncation) fails alone,
        as a 400 naming it."""
        texts = [it.text for it in items if isinstance(it, TextItem)]
        encoded = iter(self.encode(texts) if texts else [])
        rows = [self.ids_of(next(encoded), it) if isinstance(it, TextItem) else it for it in items]
        runnable = [r for r in rows if isinstance(r, np.ndarray)]
        vectors = iter(self._embed(runnable) if runnable else [])
        return [Embedded(next(vectors), len(r)) if isinstance(r, np.ndarray) else r for r in rows]

    def _embed(self, items: list[np.ndarray]) -> np.ndarray:
        width = max(len(i) for i in items)
        ids = np.zeros((len(items), width), dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for row, toks in enumerate(items):
            ids[row, : len(toks)] = toks
            mask[row, : len(toks)] = 1
        out = self.engine.run({"input_ids": ids, "attention_mask": mask}, ["sentence_embedding"])
        return self.checked(out.get("sentence_embedding"), len(items))

    def checked(self, vectors: np.ndarray | None, rows: int) -> np.ndarray:
        """The engine's vectors, or EngineError when they cannot be the batch's embeddings.

        A broken engine (an fp16 overflow, a mis-exported graph) must fail as the engine, a 503
        the breaker counts, not be served: NaN went out as JSON nulls, a wrong width or row count
        as a 200 that the cache then kept, and too few rows never answered at all."""
        want = (rows, self.dim) if self.dim else (rows,)
        if vectors is None or vectors.ndim != 2 or vectors.shape[: len(want)] != want:
            got = "no output" if vectors is None else f"shape {list(vectors.shape)}"
            raise EngineError(f"sentence_embedding: expected shape {list(want)}, got {got}")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise EngineError(f"sentence_embedding: expected floating-point values, got {vectors.dtype}")
        if not np.isfinite(vectors).all():
            raise EngineError("sentence_embedding: the engine returned NaN or infinite values")
        return vectors.astype(np.float32, copy=False)

    def encode(self, texts: list[str]) -> list[Any]:
        """Token counts and ids of ``texts`` without truncation. One batch call: it releases the
        GIL (the event loop serves meanwhile) and skips the character offsets (``_fast``)."""
        fast = getattr(self.counting, "encode_batch_fast", None)  # tokenizers >= 0.21
        return list(fast(texts) if fast is not None else self.counting.encode_batch(texts))

    def ids_of(self, encoding: Any, item: TextItem) -> np.ndarray | InvalidRequest:
        """A sentence's token ids, cut to the context when it asks, else the 400 it earns."""
        ids = encoding.ids
        if len(ids) > self.max_tokens:
            if not item.cut:
                return _too_long(item.index, len(ids), "tokens", self.max_tokens, item.field)
            ids = self.tokenizer.encode(item.text).ids  # the model's own truncation keeps [CLS] ... [SEP]
        return np.array(ids, dtype=np.int64)

    def warmup(self) -> None:
        self.run_batch([np.array(self.tokenizer.encode("warm up").ids, dtype=np.int64)])

    def warmup_peak(self) -> None:
        """A batch of PEAK_PROBE_ROWS sentences of the longest length, so that the working memory
        is measured, not guessed; the manager scales it to the largest batch allowed."""
        ids = self.tokenizer.encode("warm up").ids
        longest = np.array((ids[:-1] * self.max_tokens)[: self.max_tokens - 1] + ids[-1:], dtype=np.int64)
        self.run_batch([longest] * PEAK_PROBE_ROWS)

    def best_batch(
        self, upper: int, budget_s: float = TUNE_BUDGET_S, per_batch_s: float = 0.0
    ) -> tuple[int, dict[int, float]]:
        """The batch size, at most ``upper``, that costs the least CPU per sentence on this engine
        and machine: at saturation the cores are the limit, so sentences per CPU-second is the
        throughput a batch size allows. CPU time, not wall time: another process's load on the
        cores barely moves it (wall-clock timing picked batch 2 on the shared 2-core box, where
        batch 32 is best), and the process is otherwise idle while a model loads.

        Powers of two up to ``upper`` (and ``upper`` itself) on a short sentence (the common case,
        and the one where batching matters most), timed in TUNE_PASSES interleaved passes, each
        size keeping its cheapest run. Near-ties go to the smaller size: on the loaded 2-core box
        the engine alone served 122 sentences/s at batch 8, 89 at 16 and 58 at 32 while this
        timing had them within 5 %, and a server capped at 32 (the largest near-tie) served
        0.46-0.91x what one capped at 16 did (bench/bench_embeddings.py, one run); the per-batch
        hand-off that larger batches save (3-7 ms a batch there) is the smaller effect. Cost:
        about 3 x (2 x upper) sentences, bounded by ``budget_s``. ``per_batch_s``: CPU time each
        batch costs in serving beyond the run (see TUNE_BATCH_GAP_S), added to every size's."""
        sizes = sorted({1 << k for k in range(upper.bit_length()) if 1 << k <= upper} | {upper})
        row = np.array(self.tokenizer.encode(TUNE_SENTENCE).ids, dtype=np.int64)
        fastest = dict.fromkeys(sizes, float("inf"))
        deadline = time.perf_counter() + budget_s
        for pass_ in range(TUNE_PASSES):
            for size in sizes:
                if time.perf_counter() > deadline:
                    break  # a busy machine: the sizes timed so far decide
                if pass_ == 0:
                    self.run_batch([row] * size)  # the first run at a shape allocates
                started = time.process_time()
                self.run_batch([row] * size)
                fastest[size] = min(fastest[size], time.process_time() - started)
        rates = {s: s / (t + per_batch_s) for s, t in fastest.items() if t < float("inf")}
        top = max(rates.values())
        chosen = min(s for s, r in rates.items() if r >= TUNE_TIE * top)
        return chosen, rates


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer file; a failure names it (the library's own message does not say which)."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path.parent.name}/{path.name}: not a usable tokenizer: {exc}") from None


def _embedding_runtime(
    mgr: ModelManager, entry: ModelEntry, engine: Engine, executor: ThreadPoolExecutor
) -> ModelRuntime:
    tok = load_tokenizer(entry.artefact("tokenizer"))
    tok.no_padding()
    trunc = tok.truncation
    max_tokens = int(trunc["max_length"]) if trunc else 512
    rt = EmbeddingRuntime(engine, tok, max_tokens)
    execute = engine_call(mgr, entry.name, executor, rt.run_batch)
    values = mgr.tunables(entry.name)
    loop = asyncio.get_running_loop()
    batcher: Batcher[np.ndarray | TextItem, Embedded] = Batcher(
        entry.name,
        batch_policy(values),
        execute,
        instances=int(values["engine.instances"]),
        length=len,
        observer=_Observer(mgr.metrics, entry.name),
        arbiter=mgr.arbiter,
    )

    def measure_batch() -> None:
        """Runs on the model's worker thread during the load, after the peak-memory probe: the
        batch size this engine serves best on this machine (the configured maximum stays the
        upper bound); the batcher forms no larger batches from then on."""
        if not bool(values["batching.measure_batch_size"]):
            return
        upper = int(values["batching.max_batch_size"])
        measured = measure_once(mgr, runtime, values, rt)
        runtime.measured_batch_size = measured
        size = int(measured["chosen"])
        if size < upper:
            # ModelManager.apply keeps this cap when settings change live (until a reload).
            loop.call_soon_threadsafe(_cap_policy, batcher, size)

    runtime = ModelRuntime(
        entry,
        engine,
        executor,
        batcher,
        entry.digest(),
        service=rt,
        warmup=rt.warmup,
        peak_probe=rt.warmup_peak,
        # Not in the probe: its full-size batches' peak, scaled again, read as 8x the working
        # memory (a MiniLM lease of 476 MiB at a first load, 48 MiB at a reload that reused the
        # timing).
        tune=measure_batch,
        context_length=max_tokens,
        # Working memory grows with the batch: the probe's peak, scaled to the largest batch.
        peak_scale=int(values["batching.max_batch_size"]) / PEAK_PROBE_ROWS,
    )
    return runtime


def measure_once(
    mgr: ModelManager, runtime: ModelRuntime, values: dict[str, Any], rt: EmbeddingRuntime
) -> dict[str, Any]:
    """The batch size to cap ``entry``'s batches at, timed (``best_batch``) only on an idle
    process, and once per model, engine and bound.

    The timing counts the process's CPU time, which is the engine's only while nothing else
    runs. A model that ``memory.keep_alive_s`` unloaded and a request loads again under traffic
    is timed while other engines run: that picked batch 1 (the loop and the chat decoder's CPU
    time charged to it), the model then served a fraction of its throughput, and its queue timed
    out. So a load reuses the earlier measurement, and a timing that other engine calls
    overlapped (the compute arbiter granted any) is not trusted: the configured maximum stays,
    and the next load on an idle process measures again."""
    entry = runtime.entry
    upper = int(values["batching.max_batch_size"])
    key = (upper, runtime.engine.backend_name, int(values["engine.intra_op_threads"]), runtime.identity)
    earlier = mgr.batch_measurements.get(entry.name)
    if earlier is not None and earlier[0] == key:
        log.info("model %s: batch size %d, as measured at an earlier load", entry.name, earlier[1]["chosen"])
        return {**earlier[1], "from_earlier_load": True}
    arbiter = mgr.arbiter
    granted_before = arbiter.granted
    started = time.perf_counter()
    threads = int(values["engine.intra_op_threads"]) or os.cpu_count() or 1
    size, rates = rt.best_batch(upper, per_batch_s=TUNE_BATCH_GAP_S * threads)
    measured: dict[str, Any] = {
        "chosen": size,
        "upper_bound": upper,
        "sentences_per_cpu_s": {str(b): round(r, 1) for b, r in rates.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    # Read from the worker thread: a count that moved, or a call still running, is all this asks.
    if arbiter.granted != granted_before or arbiter.held():
        log.warning(
            "model %s: other engine calls ran while batch sizes were timed; keeping "
            "batching.max_batch_size %d (a load on an idle process measures again)",
            entry.name,
            upper,
        )
        return {**measured, "chosen": upper, "untrusted": "other engine calls ran during the timing"}
    log.info(
        "model %s: batch size %d measured best (of %s sentences per CPU-second)", entry.name, size, rates
    )
    mgr.batch_measurements[entry.name] = (key, measured)
    return measured


def _cap_policy(batcher: Batcher[Any, Any], size: int) -> None:
    """The batcher's running policy capped at ``size`` (as ModelManager.apply caps by batch_caps)."""
    policy = dataclasses.replace(batcher.policy)
    policy.max_batch_size = min(policy.max_batch_size, size)
    policy.preferred_batch_sizes = [b for b in policy.preferred_batch_sizes if b <= policy.max_batch_size]
    batcher.policy = policy


MAX_EMBEDDING_INPUTS = 2048
PEAK_PROBE_ROWS = 4


# A BERT-family token is rarely longer than a dozen characters; an input longer than this many
# characters per allowed token is refused (or, with truncation, cut) before it is tokenized, so an
# absurd input costs nothing. Inputs above OFFLOOP_CHARS in total are tokenized off the event loop.
CHARS_PER_TOKEN_BOUND = 32
OFFLOOP_CHARS = 16_384


class EmbeddingService:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    @staticmethod
    def runtime_of(runtime: ModelRuntime, model: str) -> EmbeddingRuntime:
        rt = runtime.service
        if not isinstance(rt, EmbeddingRuntime):
            raise InvalidRequest(f"The model '{model}' is not an embedding model", param="model")
        return rt

    async def embed(
        self,
        runtime: ModelRuntime,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        *,
        priority: int | None = None,
        timeout_ms: float | None = None,
        truncate: bool | None = None,
        reservation: Reservation | None = None,
        field: str = "input",
    ) -> EmbeddingResult:
        """Tokenize (with the input limits), queue every text, gather the vectors.
        ``truncate`` None means the model's ``input.truncate`` setting. ``field`` is what the
        request calls its inputs (OpenAI's ``input``, KServe's tensor ``text``), for the errors."""
        model = runtime.entry.name
        rt = self.runtime_of(runtime, model)
        if not inputs:
            raise InvalidRequest(f"'{field}' must not be empty", param=field)
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(
                f"'{field}' has {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS} are allowed",
                param=field,
            )
        cut = bool(self.manager.tunables(model)["input.truncate"]) if truncate is None else truncate
        items: Sequence[np.ndarray | TextItem]
        if all(isinstance(x, str) for x in inputs):
            texts = _checked_texts(rt, [str(x) for x in inputs], cut, field)
            if sum(len(t) for t in texts) > OFFLOOP_CHARS:
                # Large inputs are tokenized up front on another thread, not inside an engine call
                # (which holds the compute grant): the loop and the engine serve everyone else.
                loop = asyncio.get_running_loop()
                items = await loop.run_in_executor(None, _encode_texts, rt, texts, cut, field)
            else:
                items = [TextItem(t, i, cut, field) for i, t in enumerate(texts)]
        else:
            items = _token_arrays(rt, inputs, cut)
        results = await submit_all(batcher_of(runtime), items, priority, timeout_ms, reservation)
        observe = self.manager.metrics.child(self.manager.metrics.input_tokens, model).observe
        for r in results:
            observe(r.tokens)
        return EmbeddingResult(np.stack([r.vector for r in results]), sum(r.tokens for r in results))


def _too_long(i: int, n: int, unit: str, limit: int, field: str = "input") -> InvalidRequest:
    return InvalidRequest(
        f"{field}[{i}] has {n} {unit}; the model takes at most {limit} tokens. Shorten it, or ask to "
        "cut it to the model's context ('truncate': true; on KServe, in the request's parameters)",
        param=field,
    )


def _checked_texts(rt: EmbeddingRuntime, texts: list[str], cut: bool, field: str = "input") -> list[str]:
    """The limits that need no tokenizer: no empty string, and no text longer than
    CHARS_PER_TOKEN_BOUND characters per allowed token (refused unread, or cut to that first)."""
    limit = rt.max_tokens
    max_chars = limit * CHARS_PER_TOKEN_BOUND
    for i, t in enumerate(texts):
        if not t:
            raise InvalidRequest(f"{field}[{i}] is an empty string", param=field)
        if len(t) > max_chars:
            if not cut:
                unit = f"characters (more than {max_chars} are refused unread)"
                raise _too_long(i, len(t), unit, limit, field)
            texts[i] = t[:max_chars]  # first by characters, then by tokens
    return texts


def _encode_texts(rt: EmbeddingRuntime, texts: list[str], cut: bool, field: str) -> list[np.ndarray]:
    out = []
    for i, e in enumerate(rt.encode(texts)):
        ids = rt.ids_of(e, TextItem(texts[i], i, cut, field))
        if isinstance(ids, InvalidRequest):
            raise ids
        out.append(ids)
    return out


def _token_arrays(rt: EmbeddingRuntime, inputs: Sequence[Any], cut: bool) -> list[np.ndarray]:
    limit = rt.max_tokens
    vocab = rt.tokenizer.get_vocab_size()
    items = []
    for i, seq in enumerate(inputs):
        if isinstance(seq, str) or not isinstance(seq, list | tuple):
            raise InvalidRequest(
                "'input' must be a string, a list of strings or a list of token arrays",
                param="input",
            )
        if not seq:
            raise InvalidRequest(f"input[{i}] is an empty token array", param="input")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
            raise InvalidRequest(f"input[{i}] must contain only integers", param="input")
        if len(seq) > limit:
            if not cut:
                raise _too_long(i, len(seq), "tokens", limit)
            seq = list(seq[:limit])
        # Checked on Python integers: an id beyond int64 would overflow the array conversion.
        if min(seq) < 0 or max(seq) >= vocab:
            raise InvalidRequest(f"input[{i}] has a token id outside 0..{vocab - 1}", param="input")
        items.append(np.array(seq, dtype=np.int64))
    return items


# -- tensor ------------------------------------------------------------------------------------


@dataclass
class TensorItem:
    """One request's feeds; for a batching model, rows along axis 0 are its batch."""

    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...]

    @property
    def rows(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])

    def signature(self) -> tuple[Any, ...]:
        return (self.outputs, *((k, v.shape[1:], v.dtype.str) for k, v in sorted(self.feeds.items())))


def batches_rows(engine: Engine | Interface) -> bool:
    """Whether requests can share an engine run, concatenated along axis 0: only when every input
    and every output has a dynamic first dimension (Triton's rule for max_batch_size > 0).
    Otherwise an output's rows are not the requests' rows (a reduction over axis 0, a fixed shape,
    a scalar): cut by input rows, concurrent requests got each other's data or nothing."""
    return all(s.shape and s.shape[0] is None for s in (*engine.inputs, *engine.outputs))


class TensorRuntime:
    def __init__(self, engine: Engine, batchable: bool, max_rows: Callable[[], int] = lambda: 0) -> None:
        self.engine = engine
        self.batchable = batchable
        self.max_rows = max_rows  # a batch's rows at most (batching.max_batch_size), 0: no bound

    def run_batch(self, items: list[TensorItem]) -> list[dict[str, np.ndarray] | BaseException]:
        """Concatenate requests whose non-batch shapes agree, at most ``max_rows`` rows a run;
        a model that does not batch rows runs each request alone, its outputs whole."""
        results: list[dict[str, np.ndarray] | BaseException] = [{} for _ in items]
        if not self.batchable:
            for i, it in enumerate(items):
                results[i] = self._run(it.feeds, it.outputs)
            return results
        groups: dict[tuple[Any, ...], list[list[int]]] = {}
        limit = self.max_rows()
        for i, it in enumerate(items):
            chunks = groups.setdefault(it.signature(), [[]])
            if limit and chunks[-1] and sum(items[j].rows for j in chunks[-1]) + it.rows > limit:
                chunks.append([])
            chunks[-1].append(i)
        for idx in (chunk for chunks in groups.values() for chunk in chunks):
            members = [items[i] for i in idx]
            if len(members) == 1:
                results[idx[0]] = self._run(members[0].feeds, members[0].outputs)
                continue
            feeds = {k: np.concatenate([m.feeds[k] for m in members]) for k in members[0].feeds}
            out = self._run(feeds, members[0].outputs)
            total = sum(m.rows for m in members)
            if isinstance(out, BaseException) or any(v.ndim == 0 or len(v) != total for v in out.values()):
                # An output whose first dimension is not the batch's after all (the model's
                # declared shapes are loose): each request runs alone, never cut at a guess.
                for i, m in zip(idx, members, strict=True):
                    results[i] = out if isinstance(out, BaseException) else self._run(m.feeds, m.outputs)
                continue
            start = 0
            for i, m in zip(idx, members, strict=True):
                results[i] = {k: v[start : start + m.rows] for k, v in out.items()}
                start += m.rows
        return results

    def _run(
        self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray] | EngineError:
        try:
            return self.engine.run(feeds, outputs)
        except EngineError as exc:
            return exc


def _tensor_runtime(
    mgr: ModelManager, entry: ModelEntry, engine: Engine, executor: ThreadPoolExecutor
) -> ModelRuntime:
    rt = TensorRuntime(
        engine, batches_rows(engine), lambda: int(mgr.tunables(entry.name)["batching.max_batch_size"])
    )
    execute = engine_call(mgr, entry.name, executor, rt.run_batch)
    values = mgr.tunables(entry.name)
    batcher: Batcher[TensorItem, dict[str, np.ndarray]] = Batcher(
        entry.name,
        batch_policy(values),
        execute,
        instances=int(values["engine.instances"]),
        observer=_Observer(mgr.metrics, entry.name),
        arbiter=mgr.arbiter,
    )
    return ModelRuntime(entry, engine, executor, batcher, entry.digest(), service=rt)


class TensorService:
    """KServe v2 inference on a model's raw inputs and outputs (any kind but generate)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def infer(
        self,
        runtime: ModelRuntime,
        feeds: dict[str, np.ndarray],
        outputs: Sequence[str] | None,
        *,
        priority: int | None = None,
        timeout_ms: float | None = None,
        reservation: Reservation | None = None,
    ) -> dict[str, np.ndarray]:
        model = runtime.entry.name
        engine = runtime.engine
        self.check(runtime, {k: (v.dtype, v.shape) for k, v in feeds.items()})
        feeds = {k: text_feed(k, v) if v.dtype == object else v for k, v in feeds.items()}
        names = tuple(outputs) if outputs else tuple(o.name for o in engine.outputs)
        for n in names:
            if engine.output_spec(n) is None:
                raise InvalidRequest(
                    f"unexpected inference output '{quoted(n)}' for model '{model}'", param="outputs"
                )
        (result,) = await submit_all(
            batcher_of(runtime), [TensorItem(feeds, names)], priority, timeout_ms, reservation
        )
        return dict(result)

    @staticmethod
    def check(runtime: ModelRuntime, declared: Mapping[str, tuple[np.dtype, Sequence[int]]]) -> None:
        """A request's inputs, by name, dtype and shape, against the model: its engine's specs
        and, for a model that batches rows, its batch size. The route checks the shapes a request
        declares with this before it decodes their data, when the model is resident (decoding 4
        million JSON numbers that the model then refused held the event loop 1.5 s)."""
        check_feeds(runtime.engine, declared)
        rt = runtime.service
        limit = rt.max_rows() if isinstance(rt, TensorRuntime) and rt.batchable else 0
        for name, (_, shape) in declared.items():
            # Triton's rule: a request is at most one batch (one was served 200 rows of 1,000).
            if limit and shape[0] > limit:
                raise InvalidRequest(
                    f"input '{name}': batch-size must be <= {limit} for model "
                    f"'{runtime.entry.name}', got {shape[0]} rows; split the request",
                    param="inputs",
                )


def check_feeds(engine: Engine, feeds: Mapping[str, tuple[np.dtype, Sequence[int]]]) -> None:
    """Names, dtypes and shapes (of the arrays, or as a request declares them) against the
    engine's specs, before anything is queued."""
    expected = {s.name: s for s in engine.inputs}
    missing = sorted(set(expected) - set(feeds))
    if missing:
        # The unexpected names too: an input under another name than the model's reads as both.
        unexpected = [n for n in feeds if n not in expected]
        # The client's names, bounded: each quoted in part, and the first few of them.
        shown = [quoted(n) for n in unexpected[:5]] + (
            [f"… {len(unexpected) - 5} more"] if len(unexpected) > 5 else []
        )
        raise InvalidRequest(
            f"expected inputs {sorted(expected)}, missing {missing}"
            + (f", unexpected {shown}" if unexpected else ""),
            param="inputs",
        )
    for name, (dtype, shape) in feeds.items():
        spec = expected.get(name)
        if spec is None:
            raise InvalidRequest(f"unexpected inference input '{quoted(name)}'", param="inputs")
        if dtype != spec.dtype:
            raise InvalidRequest(
                f"input '{name}': expected datatype {datatype_of(spec.dtype)}, got {datatype_of(dtype)}",
                param="inputs",
            )
        ok = len(shape) == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape, shape, strict=True)
        )
        if not ok:
            raise InvalidRequest(
                f"input '{name}': expected shape {_shape(spec.shape)}, got {list(shape)}",
                param="inputs",
            )
    rows = {shape[0] for _, shape in feeds.values() if len(shape)}
    if len(rows) > 1:
        raise InvalidRequest("all inputs must have the same batch size", param="inputs")


def text_feed(name: str, arr: np.ndarray) -> np.ndarray:
    """A BYTES input as the engine takes strings: ``str`` elements. ONNX Runtime turns a ``bytes``
    element into its repr (an identity model answered "b'a'" for "a")."""
    try:
        return np.array([b.decode("utf-8") for b in arr.reshape(-1)], dtype=object).reshape(arr.shape)
    except UnicodeDecodeError:
        raise InvalidRequest(f"input '{name}': BYTES elements must be UTF-8 text", param="inputs") from None


def _shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in shape) + "]"


RUNTIME_FACTORIES[ModelKind.embedding] = _embedding_runtime
RUNTIME_FACTORIES[ModelKind.tensor] = _tensor_runtime
