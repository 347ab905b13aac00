"""The continuous-batching scheduler and the sampling helpers, without HTTP.

Most tests drive the scheduler with a fake decoder whose next token is a function of the whole
row held in its KV state, so any slip in joining, selecting or trimming rows changes the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.admission import ComputeStarved
from appliance.arbiter import ComputeArbiter
from appliance.batcher import BatchPolicy, DeadlineExceeded, InvalidPriority, QueueFull, WouldMissDeadline
from appliance.engines.base import EngineError, EngineTimeout
from appliance.llm.kv import KVState
from appliance.llm.sampling import (
    IncrementalDetokenizer,
    OutputProcessor,
    SamplingParams,
    StopMatcher,
    make_rng,
    sample,
)
from appliance.llm.scheduler import Failed, Finished, GenerationConfig, Scheduler, Seq, Token
from appliance.telemetry import Metrics

V = 40


def next_token(context: Sequence[int]) -> int:
    return 1 + (sum(context) * 7 + len(context)) % (V - 1)


def reference(prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(prompt + out))
    return out


class FakeTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def text_of(ids: list[int]) -> str:
    return FakeTokenizer().decode(ids)


class FakeDecoder:
    """Keys hold the token ids; logits are one-hot at ``next_token`` of each row's real tokens."""

    layers, kv_heads, head_dim = 1, 1, 1
    kv_dtype = np.dtype(np.float32)

    def __init__(self, prefill_s: float = 0.0, decode_s: float = 0.0) -> None:
        self.prefill_s = prefill_s
        self.decode_s = decode_s
        self.fail_prefill: Callable[[Sequence[int]], bool] | None = None
        self.fail_decodes = 0
        self.prefill_sizes: list[int] = []
        self.prefill_tokens: list[int] = []  # tokens computed per prefill call
        self.decode_sizes: list[int] = []
        self.prefilling = threading.Event()

    def _logits(self, keys: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.zeros((mask.shape[0], V), dtype=np.float32)
        for b in range(mask.shape[0]):
            ctx = keys[b, 0, mask[b] == 1, 0].astype(int).tolist()
            out[b, next_token(ctx)] = 1.0
        return out

    def prefill(
        self, prompts: Sequence[Sequence[int]], past: KVState | None = None
    ) -> tuple[np.ndarray, KVState]:
        self.prefilling.set()
        time.sleep(self.prefill_s)
        self.prefilling.clear()
        if self.fail_prefill and any(self.fail_prefill(p) for p in prompts):
            raise RuntimeError("prefill exploded")
        self.prefill_sizes.append(len(prompts))
        self.prefill_tokens.append(sum(len(p) for p in prompts))
        if past is not None:  # the real session's contract: one row continues from its past
            assert len(prompts) == 1 and past.batch == 1
            col = np.asarray(prompts[0], dtype=np.float32).reshape(1, 1, -1, 1)
            keys = np.concatenate([past.ops.to_host(past.keys[0]), col], axis=2)
            mask = np.concatenate([past.mask, np.ones((1, len(prompts[0])), dtype=np.int64)], axis=1)
            return self._logits(keys, mask), KVState([keys], [keys.copy()], mask)
        width = max(len(p) for p in prompts)
        keys = np.zeros((len(prompts), 1, width, 1), dtype=np.float32)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, p in enumerate(prompts):
            keys[row, 0, width - len(p) :, 0] = p
            mask[row, width - len(p) :] = 1
        return self._logits(keys, mask), KVState([keys], [keys.copy()], mask)

    def decode(self, next_ids: Sequence[int] | np.ndarray, state: KVState) -> np.ndarray:
        time.sleep(self.decode_s)
        if self.fail_decodes:
            self.fail_decodes -= 1
            raise RuntimeError("decode exploded")
        b = state.batch
        self.decode_sizes.append(b)
        col = np.asarray(next_ids, dtype=np.float32).reshape(b, 1, 1, 1)
        keys = np.concatenate([state.keys[0], col], axis=2)
        mask = np.concatenate([state.mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        state.keys, state.values, state.mask = [keys], [keys.copy()], mask
        return self._logits(keys, mask)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    ex = ThreadPoolExecutor(1)
    yield ex
    ex.shutdown(wait=True)


def make(
    executor: ThreadPoolExecutor,
    decoder: FakeDecoder | None = None,
    *,
    metrics: Metrics | None = None,
    max_running: int = 8,
    kv_cache_bytes: int = 1 << 30,
    preemption: bool = False,
    max_queue_size: int = 0,
    timeout_ms: float = 0.0,
    engine_timeout_ms: float = 0.0,
) -> Scheduler:
    policy = BatchPolicy(priority_levels=3, default_priority=2, max_queue_size=max_queue_size)
    policy.default_timeout_ms = timeout_ms
    config = GenerationConfig(max_running=max_running, kv_cache_bytes=kv_cache_bytes, preemption=preemption)
    tunables = (lambda: {"engine.timeout_ms": engine_timeout_ms}) if engine_timeout_ms else None
    return Scheduler(
        "fake", decoder or FakeDecoder(), executor, policy, config, tunables=tunables, metrics=metrics
    )


def seq(prompt: list[int], max_tokens: int = 8, eos: Sequence[int] = (), **kw: Any) -> Seq:
    params = SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), **kw)
    return Seq(list(prompt), params, OutputProcessor.create(params, FakeTokenizer(), eos))


async def drain(s: Seq) -> tuple[str, Finished | Failed]:
    text = []
    while True:
        ev = await asyncio.wait_for(s.events.get(), 10)
        if isinstance(ev, Token):
            text.append(ev.text)
        else:
            return "".join(text), ev


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


# ---------------------------------------------------------------------------------- batching


async def test_continuous_batching_equals_one_at_a_time(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(decode_s=0.002)
    sch = make(executor, dec, max_running=3)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5], [3, 5, 8, 9, 7, 9, 3], [2, 3], [8, 4, 6, 2, 6, 4]]
    lengths = [5, 9, 3, 12, 7, 4]
    seqs = []
    for p, n in zip(prompts, lengths, strict=True):
        s = seq(p, n)
        sch.submit(s)
        seqs.append(s)
        await asyncio.sleep(0.003)  # staggered arrivals: joins happen mid-batch
    results = await asyncio.gather(*(drain(s) for s in seqs))
    for (text, fin), p, n in zip(results, prompts, lengths, strict=True):
        assert isinstance(fin, Finished) and fin.finish_reason == "length"
        assert text == text_of(reference(p, n))
        assert (fin.prompt_tokens, fin.completion_tokens) == (len(p), n)
    assert max(dec.decode_sizes) == 3  # batched, and never beyond max_running
    assert sch.generation_snapshot()["running"] == 0
    await sch.close()


async def test_newcomers_are_prefilled_together(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(decode_s=0.05)
    sch = make(executor, dec)
    first = seq([1, 2], 3)
    sch.submit(first)
    await until(lambda: bool(dec.decode_sizes))
    late = [seq([i, i + 1], 3) for i in range(3)]
    for s in late:
        sch.submit(s)
    await asyncio.gather(drain(first), *(drain(s) for s in late))
    assert dec.prefill_sizes == [1, 3]
    await sch.close()


async def test_eos_stops_and_is_not_text(executor: ThreadPoolExecutor) -> None:
    sch = make(executor)
    ref = reference([7, 7], 6)
    s = seq([7, 7], 6, eos=[ref[2]])
    sch.submit(s)
    text, fin = await drain(s)
    assert isinstance(fin, Finished) and fin.finish_reason == "stop" and fin.completion_tokens == 3
    assert text == text_of(ref[:2])
    ignore = seq([7, 7], 6, eos=[ref[2]], ignore_eos=True)
    sch.submit(ignore)
    text, fin = await drain(ignore)
    assert isinstance(fin, Finished) and fin.finish_reason == "length" and text == text_of(ref)
    await sch.close()


async def test_kv_budget_bounds_the_running_batch(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(decode_s=0.002)
    # bytes per token here: 1 layer x 2 x 1 head x 1 dim x 4 bytes = 8; reservations are 4 + 6 = 10.
    sch = make(executor, dec, kv_cache_bytes=2 * 10 * 8)
    seqs = [seq([1, 2, 3, 4], 6) for _ in range(5)]
    for s in seqs:
        sch.submit(s)
    results = await asyncio.gather(*(drain(s) for s in seqs))
    assert all(t == text_of(reference([1, 2, 3, 4], 6)) for t, _ in results)
    assert max(dec.decode_sizes) == 2
    await sch.close()


# ---------------------------------------------------------------------------------- admission


async def test_a_predicted_wait_past_the_deadline_is_refused_on_arrival(executor: ThreadPoolExecutor) -> None:
    """Once a sequence's time in a slot is known, a request that would wait longer than its
    deadline is refused now, with a Retry-After no longer than one deadline (or 1 s), the same
    bound early admission gives: a long prediction must not send a client away for minutes."""
    sch = make(executor, FakeDecoder(decode_s=0.01), max_running=1)
    first = seq([1], 150)
    sch.submit(first)
    await drain(first)  # a measured time per sequence: ~1.5 s, so the predicted wait is longer
    running = seq([2], 400)
    sch.submit(running)
    await until(lambda: sch.generation_snapshot()["running"] == 1)
    with pytest.raises(WouldMissDeadline) as info:
        sch.submit(seq([3], 2), timeout_ms=5)
    assert info.value.retry_after_s is not None and 0 < info.value.retry_after_s <= 1.0
    assert sch.snapshot()["rejections"]["would_miss_deadline"] == 1
    await sch.close(drain=False)


async def test_a_kv_budget_full_of_long_reservations_leaves_no_free_slot(
    executor: ThreadPoolExecutor,
) -> None:
    """Free rows are not free slots when the budget cannot take another row as long as the
    batch's longest reservation: a newcomer at the hogs' priority is told it would wait (and is
    refused on arrival past its deadline), not admitted to hang until its deadline. A more urgent
    one, which preempts them, is not."""
    sch = make(executor, FakeDecoder(decode_s=0.01), max_running=8, kv_cache_bytes=4000, preemption=True)
    first = seq([1], 20)
    sch.submit(first)
    await drain(first)  # a measured time per sequence
    hogs = [seq([i], 240) for i in (2, 3)]  # 241 tokens x 8 bytes each: two fill 4,000 bytes
    for h in hogs:
        sch.submit(h, priority=3)
    await until(lambda: sch.generation_snapshot()["running"] == 2)
    assert sch.predicted_wait(3) and sch.predicted_wait(3) > 0  # six rows free, but no room
    with pytest.raises(WouldMissDeadline):
        sch.submit(seq([4], 2), priority=3, timeout_ms=5)
    assert sch.predicted_wait(1) == 0.0  # priority 1 evicts a hog instead
    await sch.close(drain=False)


async def test_invalid_priority_and_queue_full(executor: ThreadPoolExecutor) -> None:
    sch = make(executor, FakeDecoder(decode_s=0.01), max_running=1, max_queue_size=1)
    for bad in (0, 4, True):
        with pytest.raises(InvalidPriority):
            sch.submit(seq([1], 2), priority=bad)  # type: ignore[arg-type]
    running, waiting = seq([1], 50), seq([2], 2)
    sch.submit(running, priority=3)
    await until(lambda: sch.generation_snapshot()["running"] == 1)
    sch.submit(waiting, priority=3)
    with pytest.raises(QueueFull) as info:
        sch.submit(seq([3], 2), priority=3)
    assert info.value.retry_after_s and info.value.retry_after_s > 0
    sch.submit(seq([4], 1), priority=1)  # another level has its own bound
    assert sch.snapshot()["rejections"]["queue_full"] == 1
    await sch.close(drain=False)


async def test_waiting_request_times_out_on_its_own_timer(executor: ThreadPoolExecutor) -> None:
    sch = make(executor, FakeDecoder(decode_s=0.01), max_running=1)
    blocker = seq([1], 200)
    sch.submit(blocker)
    await until(lambda: sch.generation_snapshot()["running"] == 1)
    late = seq([2], 2)
    started = time.monotonic()
    sch.submit(late, timeout_ms=60)
    _, fin = await drain(late)
    assert isinstance(fin, Failed) and isinstance(fin.error, DeadlineExceeded)
    assert time.monotonic() - started < 0.5
    assert sch.generation_snapshot()["waiting"] == 0
    await sch.close(drain=False)


async def test_higher_priority_is_admitted_first(executor: ThreadPoolExecutor) -> None:
    sch = make(executor, FakeDecoder(decode_s=0.005), max_running=1)
    blocker = seq([1], 20)
    sch.submit(blocker, priority=3)
    await until(lambda: sch.generation_snapshot()["running"] == 1)
    low, high = seq([2], 2), seq([3], 2)
    sch.submit(low, priority=3)
    sch.submit(high, priority=1)
    await asyncio.gather(drain(blocker), drain(low), drain(high))
    assert high.admitted_at is not None and low.admitted_at is not None
    assert high.admitted_at < low.admitted_at
    await sch.close()


async def test_preemption_evicts_lower_priority_and_resumes_identically(
    executor: ThreadPoolExecutor,
) -> None:
    dec = FakeDecoder(decode_s=0.005)
    sch = make(executor, dec, max_running=1, preemption=True)
    victim = seq([5, 6, 7], 30, temperature=1.0, seed=7)
    sch.submit(victim, priority=3)
    await until(lambda: len(victim.generated) >= 5)
    urgent = seq([1, 1], 4)
    sch.submit(urgent, priority=1)
    (vtext, vfin), (utext, ufin) = await asyncio.gather(drain(victim), drain(urgent))
    assert isinstance(vfin, Finished) and isinstance(ufin, Finished)
    assert victim.preemptions == 1 and sch.generation_snapshot()["preempted"] == 1
    assert utext == text_of(reference([1, 1], 4))
    # The same seeded request without contention gives the same tokens.
    alone = seq([5, 6, 7], 30, temperature=1.0, seed=7)
    sch.submit(alone, priority=3)
    atext, _ = await drain(alone)
    assert vtext == atext and victim.generated == alone.generated
    await sch.close()


async def test_by_default_an_urgent_request_preempts_low_priority_hogs_of_the_kv_budget(
    executor: ThreadPoolExecutor,
) -> None:
    """Two priority-3 generations with a long max_tokens reserve the KV budget (a batch is charged
    rows x the longest reservation, as its KV is one padded tensor); a short priority-1 request
    that does not fit evicts one of them at once (a probe's two 120-byte requests held every
    priority-1 chat back for minutes), and the evicted one resumes with the same output."""
    from appliance import settings

    dec = FakeDecoder(decode_s=0.002)
    preemption = bool(settings.REGISTRY["generation.preemption"].default)
    # 8 bytes a token (fake); each hog reserves 2 + 200 tokens: two fit in 4,000 bytes, three not.
    sch = make(executor, dec, kv_cache_bytes=4000, preemption=preemption)
    hogs = [seq([i, i + 1], 200) for i in (1, 3)]
    for h in hogs:
        sch.submit(h, priority=3)
    await until(lambda: all(len(h.generated) >= 2 for h in hogs))
    urgent = seq([5, 6], 3)
    sch.submit(urgent, priority=1)
    text, fin = await asyncio.wait_for(drain(urgent), 5)
    assert isinstance(fin, Finished) and text == text_of(reference([5, 6], 3))
    assert min(len(h.generated) for h in hogs) < 200  # it did not wait for a hog to finish
    results = await asyncio.wait_for(asyncio.gather(*(drain(h) for h in hogs)), 20)
    for (htext, _), h in zip(results, hogs, strict=True):
        assert htext == text_of(reference(h.prompt, 200))
    assert sch.generation_snapshot()["preempted"] >= 1
    await sch.close()


async def test_fewer_priority_levels_live_then_a_preemption_keeps_the_driver_alive(
    executor: ThreadPoolExecutor,
) -> None:
    """A probe lowered queue.priority_levels from 3 to 2 while a priority-3 stream ran, then a
    priority-1 request preempted it: requeued on a level that no longer existed, the IndexError
    killed the driver and failed every stream it held. The running row moves down with its queue
    and resumes with its own output."""
    dec = FakeDecoder(decode_s=0.003)
    sch = make(executor, dec, max_running=1, preemption=True)
    victim = seq([3, 4], 40)
    sch.submit(victim, priority=3)
    await until(lambda: len(victim.generated) >= 3)
    sch.policy = BatchPolicy(priority_levels=2, default_priority=2)
    urgent = seq([5, 6], 3)
    sch.submit(urgent, priority=1)
    (vtext, vfin), (utext, ufin) = await asyncio.wait_for(asyncio.gather(drain(victim), drain(urgent)), 10)
    assert isinstance(vfin, Finished) and isinstance(ufin, Finished), (vfin, ufin)
    assert vtext == text_of(reference([3, 4], 40)) and utext == text_of(reference([5, 6], 3))
    snap = sch.generation_snapshot()
    assert snap["driver_failures"] == 0 and snap["preempted"] == 1 and victim.priority == 2
    await sch.close()


async def test_equal_priority_is_never_preempted(executor: ThreadPoolExecutor) -> None:
    sch = make(executor, FakeDecoder(decode_s=0.005), max_running=1, preemption=True)
    a, b = seq([1], 10), seq([2], 2)
    sch.submit(a, priority=2)
    await until(lambda: len(a.generated) >= 2)
    sch.submit(b, priority=2)
    await asyncio.gather(drain(a), drain(b))
    assert a.preemptions == 0
    await sch.close()


# ---------------------------------------------------------------------------------- cancellation


async def test_cancel_while_waiting_and_while_running(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(decode_s=0.01)
    sch = make(executor, dec, max_running=1)
    running, waiting, after = seq([1], 500), seq([2], 5), seq([3], 3)
    sch.submit(running)
    await until(lambda: sch.generation_snapshot()["running"] == 1)
    sch.submit(waiting)
    sch.cancel(waiting)
    assert sch.generation_snapshot()["waiting"] == 0
    assert sch.snapshot()["rejections"]["cancelled"] == 1
    sch.submit(after)
    steps = sch.generation_snapshot()["steps"]
    sch.cancel(running)
    _, fin = await drain(after)  # the freed slot goes to the next request
    assert isinstance(fin, Finished)
    assert sch.generation_snapshot()["steps"] - steps <= 2 + 3  # one step to drop it, then `after`
    assert len(running.generated) < 500
    await sch.close()


async def test_cancel_during_prefill_drops_the_result(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(prefill_s=0.2)
    sch = make(executor, dec)
    s = seq([1, 2, 3], 5)
    sch.submit(s)
    await until(lambda: sch.generation_snapshot()["prefilling"] == 1)
    sch.cancel(s)
    await until(lambda: sch.generation_snapshot()["prefilling"] == 0)
    await asyncio.sleep(0.05)
    snap = sch.generation_snapshot()
    assert snap["running"] == 0 and snap["kv_cache_bytes"] == 0
    assert s.generated == [] and s.events.empty()  # never joined, never decoded
    assert dec.decode_sizes == []
    await sch.close()


# ---------------------------------------------------------------------------------- failures


async def test_engine_errors_fail_only_the_affected_sequences(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(decode_s=0.005)
    sch = make(executor, dec)
    good = seq([1, 2], 20)
    sch.submit(good)
    await until(lambda: len(good.generated) >= 2)
    dec.fail_prefill = lambda p: 13 in p
    bad = seq([13], 3)
    sch.submit(bad)
    _, fin = await drain(bad)
    assert isinstance(fin, Failed) and isinstance(fin.error, EngineError)
    text, fin = await drain(good)  # the running sequence was not touched by the failed prefill
    assert isinstance(fin, Finished) and text == text_of(reference([1, 2], 20))
    # A failed decode fails the batch it ran, and the scheduler keeps serving.
    s1 = seq([4], 10)
    sch.submit(s1)
    await until(lambda: len(s1.generated) >= 1)
    dec.fail_decodes = 1
    _, fin = await drain(s1)
    assert isinstance(fin, Failed) and isinstance(fin.error, EngineError)
    s2 = seq([4], 3)
    sch.submit(s2)
    text, fin = await drain(s2)
    assert isinstance(fin, Finished) and text == text_of(reference([4], 3))
    await sch.close()


async def test_a_hung_step_times_out(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(prefill_s=0.3)
    sch = make(executor, dec, engine_timeout_ms=150)
    s = seq([1], 3)
    sch.submit(s)
    _, fin = await drain(s)
    assert isinstance(fin, Failed) and isinstance(fin.error, EngineTimeout)
    dec.prefill_s = 0.0
    # Queued behind the hung call (still running for ~150 ms): not blamed for it.
    ok = seq([1], 3)
    sch.submit(ok)
    _, fin = await drain(ok)
    assert isinstance(fin, Finished)
    await sch.close()


async def test_a_step_whose_decode_timed_out_is_no_execution(executor: ThreadPoolExecutor) -> None:
    """Triton's ``execution_count`` and ``batch_stats`` count successful executions: a step whose
    decode call timed out (failing its rows) had counted as one."""
    metrics = Metrics()
    sch = make(executor, FakeDecoder(decode_s=0.3), metrics=metrics, engine_timeout_ms=150)
    s = seq([1], 3)
    sch.submit(s)
    _, fin = await drain(s)
    assert isinstance(fin, Failed) and isinstance(fin.error, EngineTimeout)
    stats = metrics.model_stats.triton("fake")
    assert (stats["execution_count"], stats["batch_stats"]) == (0, [])
    await sch.close()


async def test_an_abandoned_call_leaves_no_exception_unretrieved(executor: ThreadPoolExecutor) -> None:
    """A call given up on while it waited behind a hung one later ends with "abandoned before it
    started", and nobody awaited it: asyncio logged "Future exception was never retrieved" with a
    traceback at ERROR, a dozen times a minute under a tiny engine.timeout_ms."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    loop.set_exception_handler(lambda _, ctx: seen.append(str(ctx.get("message"))))
    try:
        dec = FakeDecoder(prefill_s=1.0)
        sch = make(executor, dec, engine_timeout_ms=150)
        hung = seq([1], 3)
        sch.submit(hung)
        _, fin = await drain(hung)
        assert isinstance(fin, Failed)
        behind = seq([2], 3)
        sch.submit(behind)  # waits behind the hung call past 2 x 150 ms: abandoned
        _, fin = await drain(behind)
        assert isinstance(fin, Failed) and isinstance(fin.error, EngineTimeout)
        del fin, hung, behind  # their errors' tracebacks hold the call's frame, and so its future
        dec.prefill_s = 0.0
        await asyncio.sleep(1.2)  # the hung call ends; the worker skips the abandoned one
        await sch.close()
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not [m for m in seen if "never retrieved" in m], seen


# ---------------------------------------------------------------------------------- fault injection
# Faults outside the engine calls (sampler, detokenizer, a MemoryError joining KV rows, the
# driver itself) are injected with monkeypatch; each must end every admitted, running and waiting
# sequence with a terminal event within a bound, and the scheduler must serve the next request.

BOUND_S = 3.0


class Boom(Exception):
    pass


class BrokenTokenizer(FakeTokenizer):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "detokenizer broke")


def worker_metric(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"worker": "scheduler:fake"})


async def ends(seqs: Sequence[Seq]) -> list[Finished | Failed]:
    """Every sequence's terminal event, each within BOUND_S."""
    results = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in seqs)), BOUND_S)
    return [fin for _, fin in results]


@pytest.mark.parametrize("phase", ["prefill", "decode", "join", "sampler", "detokenizer"])
async def test_a_fault_in_any_phase_ends_every_sequence(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    import appliance.llm.scheduler as scheduler_module

    dec = FakeDecoder(decode_s=0.002)
    metrics = Metrics()
    sch = make(executor, dec, max_running=2, metrics=metrics)
    running = seq([1, 2], 200)
    sch.submit(running)
    await until(lambda: len(running.generated) >= 3)
    armed = threading.Event()
    armed.set()
    if phase == "prefill":
        dec.fail_prefill = lambda p: 13 in p
    elif phase == "decode":
        real_decode = dec.decode

        def decode(next_ids: Sequence[int] | np.ndarray, state: KVState) -> np.ndarray:
            if state.batch > 1 and armed.is_set():  # the first decode with the newcomer joined
                armed.clear()
                raise RuntimeError("decode exploded")
            return real_decode(next_ids, state)

        monkeypatch.setattr(dec, "decode", decode)
    elif phase == "join":
        real_join = KVState.join

        def join(states: Sequence[KVState]) -> KVState:
            if armed.is_set():
                armed.clear()
                raise MemoryError("no room to join the rows")
            return real_join(states)

        monkeypatch.setattr(KVState, "join", staticmethod(join))
    elif phase == "sampler":
        real_sample = scheduler_module.sample

        def faulty(
            logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, banned: Sequence[int] = ()
        ) -> int:
            if params.max_tokens == 13 and armed.is_set():
                armed.clear()
                raise Boom("sampler broke")
            return real_sample(logits, params, rng, banned)

        monkeypatch.setattr(scheduler_module, "sample", faulty)

    newcomer, waiting = seq([13], 13), seq([3], 5)
    if phase == "detokenizer":
        newcomer.processor = OutputProcessor.create(newcomer.params, BrokenTokenizer(), [])
    sch.submit(newcomer)
    sch.submit(waiting)  # max_running=2: waits for a slot
    results = await ends([running, newcomer, waiting])
    assert isinstance(results[1], Failed)  # the sequence the fault hit always fails
    assert all(isinstance(r, Finished | Failed) for r in results)
    # A fault outside the engine calls kills the driver: counted once, and it is restarted.
    died = phase in ("join", "sampler", "detokenizer")
    assert worker_metric(metrics, "appliance_worker_failures_total") == (1.0 if died else None)
    monkeypatch.undo()
    dec.fail_prefill = None
    after = seq([4], 3)
    sch.submit(after)
    text, fin = await drain(after)
    assert isinstance(fin, Finished) and text == text_of(reference([4], 3))
    if died:
        assert worker_metric(metrics, "appliance_worker_up") == 1.0
    snap = sch.generation_snapshot
    await until(lambda: snap()["running"] == 0 and snap()["waiting"] == 0 and snap()["kv_cache_bytes"] == 0)
    await sch.close()


@pytest.mark.parametrize("method", ["_plan", "_set_gauges"])
async def test_a_driver_that_keeps_dying_fails_waiting_sequences(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """``_plan`` broken: the driver dies at every turn, and the second death that made no
    progress fails the waiting sequences. ``_set_gauges`` broken (as a counter that went
    backwards once did): the driver's clean-up, which sets the same gauges, dies too; the
    supervisor must outlive both and fail everything at once, or the sequences it holds wait
    forever. Either way a fixed driver serves again."""
    metrics = Metrics()
    sch = make(executor, FakeDecoder(), metrics=metrics)
    broken = True
    real = getattr(Scheduler, method)

    def breaks(self: Scheduler) -> Any:
        if broken:
            raise Boom(f"{method} broke")
        return real(self)

    monkeypatch.setattr(Scheduler, method, breaks)
    waiting = [seq([i], 3) for i in range(3)]  # no deadline: only the supervisor can end them
    for s in waiting:
        sch.submit(s)
    results = await ends(waiting)
    assert all(isinstance(r, Failed) and f"{method} broke" in str(r.error) for r in results)
    deaths = 2 if method == "_plan" else 1
    assert (worker_metric(metrics, "appliance_worker_failures_total") or 0) >= deaths
    assert worker_metric(metrics, "appliance_worker_up") == 0.0
    assert sch._task is not None and not sch._task.done()  # still supervising
    broken = False
    ok = seq([5], 3)
    sch.submit(ok)
    (fin,) = await ends([ok])
    assert isinstance(fin, Finished)
    assert worker_metric(metrics, "appliance_worker_up") == 1.0
    await sch.close()


@pytest.mark.parametrize("max_tokens", [1, 8])
async def test_a_fault_delivering_tokens_fails_those_sequences_at_once(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, max_tokens: int
) -> None:
    """Tokens reach the loop in callbacks from the worker, outside the driver's supervision. A
    delivery that raises must fail the sequences it carried at once (they waited for their
    deadline, or a 200 came back missing its first token), be counted as the scheduler's fault,
    and leave the other sequences running."""
    metrics = Metrics()
    sch = make(executor, FakeDecoder(decode_s=0.002), metrics=metrics)
    running = seq([1, 2], 60)
    sch.submit(running)
    await until(lambda: len(running.generated) >= 2)
    newcomer = seq([13], max_tokens)
    real = Scheduler._deliver
    armed = True

    def faulty(self: Scheduler, batch: list[tuple[Seq, Any]]) -> None:
        nonlocal armed
        if armed and any(s is newcomer for s, _ in batch):  # its first token
            armed = False
            raise Boom("delivery broke")
        real(self, batch)

    monkeypatch.setattr(Scheduler, "_deliver", faulty)
    sch.submit(newcomer)
    (fin,) = await ends([newcomer])
    assert isinstance(fin, Failed) and isinstance(fin.error, EngineError)
    assert "delivery broke" in str(fin.error)
    assert worker_metric(metrics, "appliance_worker_failures_total") == 1.0
    assert worker_metric(metrics, "appliance_worker_up") == 1.0  # the driver itself never stopped
    text, fin = await drain(running)  # untouched by the fault
    assert isinstance(fin, Finished) and text == text_of(reference([1, 2], 60))
    after = seq([4], 3)
    sch.submit(after)
    text, fin = await drain(after)
    assert isinstance(fin, Finished) and text == text_of(reference([4], 3))
    snap = sch.generation_snapshot
    await until(lambda: snap()["running"] == 0 and snap()["kv_cache_bytes"] == 0)
    await sch.close()


async def test_a_hung_engine_ends_running_admitted_and_waiting_sequences(
    executor: ThreadPoolExecutor,
) -> None:
    """A decode that never returns (the worker thread is stuck): the rows it held fail at the
    engine timeout, the next call gives up waiting for the worker, nobody hangs."""
    release = threading.Event()
    dec = FakeDecoder(decode_s=0.002)
    sch = make(executor, dec, max_running=2, engine_timeout_ms=100)
    running = seq([1, 2], 500)
    sch.submit(running)
    await until(lambda: len(running.generated) >= 2)
    real_decode = dec.decode

    def stuck(next_ids: Sequence[int] | np.ndarray, state: KVState) -> np.ndarray:
        release.wait(10)
        return real_decode(next_ids, state)

    dec.decode = stuck  # type: ignore[method-assign]
    admitted, waiting = seq([7], 5), seq([8], 5)
    sch.submit(admitted)
    sch.submit(waiting)
    started = time.monotonic()
    try:
        results = await ends([running, admitted, waiting])
        assert all(isinstance(r, Failed) and isinstance(r.error, EngineTimeout) for r in results)
        # Each engine call is bounded: timeout for a call, twice it waiting for a busy worker.
        assert time.monotonic() - started < 1.5
    finally:
        release.set()
    dec.decode = real_decode  # type: ignore[method-assign]
    ok = seq([4], 3)
    sch.submit(ok)
    text, fin = await drain(ok)
    assert isinstance(fin, Finished) and text == text_of(reference([4], 3))
    await sch.close()


async def test_every_engine_call_takes_a_grant_at_its_most_urgent_level(
    executor: ThreadPoolExecutor,
) -> None:
    levels: list[int] = []
    held = 0

    @contextlib.asynccontextmanager
    async def grant(level: int) -> AsyncIterator[None]:
        nonlocal held
        levels.append(level)
        held += 1
        try:
            yield
        finally:
            held -= 1

    dec = FakeDecoder(decode_s=0.01)
    ungranted: list[str] = []  # engine calls made while no grant was held
    for name in ("prefill", "decode"):
        call = getattr(dec, name)

        def checked(*args: Any, _call: Any = call, _name: str = name, **kw: Any) -> Any:
            if held <= 0:
                ungranted.append(_name)
            return _call(*args, **kw)

        setattr(dec, name, checked)
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    sch = Scheduler("fake", dec, executor, policy, GenerationConfig(), grant=grant)
    low = seq([1], 6)
    sch.submit(low, priority=3)
    await until(lambda: len(low.generated) >= 2)
    high = seq([2], 3)
    sch.submit(high, priority=1)
    await asyncio.gather(drain(low), drain(high))
    assert levels[0] == 3  # the low request's prefill
    assert 1 in levels  # the high one's prefill, and the decode calls it shares with the low one
    await sch.close()  # the last step may still hold its grant when the last token is out
    # Every call ran under a grant; a step whose rows all ended meanwhile may hold one unused.
    assert ungranted == [] and held == 0
    assert len(levels) >= len(dec.prefill_sizes) + len(dec.decode_sizes)


async def test_no_compute_grant_in_time_is_overload_not_an_engine_fault(executor: ThreadPoolExecutor) -> None:
    """More urgent work holding every grant past ``engine.timeout_ms`` fails the generation with a
    503-kind refusal (ComputeStarved, with a retry hint), not an EngineTimeout that the breaker
    would count against a healthy engine (it opened on a probe's strict-priority overload)."""
    held_by_others = asyncio.Event()  # never set: more urgent work keeps the engines

    @contextlib.asynccontextmanager
    async def grant(level: int) -> AsyncIterator[None]:
        await held_by_others.wait()
        yield

    policy = BatchPolicy(priority_levels=3, default_priority=2)
    sch = Scheduler(
        "fake",
        FakeDecoder(),
        executor,
        policy,
        GenerationConfig(),
        grant=grant,
        tunables=lambda: {"engine.timeout_ms": 100.0},
    )
    s = seq([1, 2], 4)
    sch.submit(s, priority=3)
    _, fin = await drain(s)
    assert isinstance(fin, Failed) and isinstance(fin.error, ComputeStarved), fin
    assert fin.error.retry_after_s is not None and fin.error.retry_after_s >= 1
    assert sch.engine_call_s() == 0.0  # no engine call ran: nothing to blame the engine for
    await sch.close(drain=False)


async def chunks_of_a_100_token_prompt(sch: Scheduler, dec: FakeDecoder) -> list[int]:
    """A 40-token prompt first (it measures the prefill rate: ~40 tokens in >= 10 ms, <= 4000
    tokens/s), then the prefill chunks of a 100-token one at priority 2, whose answer must be
    the same as if prefilled whole."""
    first = seq(list(range(1, 41)), 1)
    sch.submit(first)
    await drain(first)
    assert dec.prefill_tokens == [40]
    long = seq(list(range(1, 101)), 1)
    sch.submit(long, priority=2)
    text, fin = await drain(long)
    assert isinstance(fin, Finished) and text == text_of(reference(list(range(1, 101)), 1))
    return dec.prefill_tokens[1:]


@pytest.mark.parametrize("pressed", [True, False])
async def test_prefill_is_cut_to_urgent_prefill_ms_while_more_urgent_work_is_about(
    executor: ThreadPoolExecutor, pressed: bool
) -> None:
    """A priority-1 embedding batch waits for the engine call running when it arrives; while the
    arbiter says such work is about, a prompt is prefilled in chunks of about
    ``urgent_prefill_ms`` (from the measured prefill rate), not of ``prefill_chunk_tokens``."""
    dec = FakeDecoder(prefill_s=0.01)  # every prefill call takes ~10 ms, whatever its size
    config = GenerationConfig(prefill_chunk_tokens=512, urgent_prefill_ms=2.0)
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    asked: list[int] = []

    def arbiter_says(level: int) -> bool:
        asked.append(level)
        return pressed

    sch = Scheduler("fake", dec, executor, policy, config, pressed=arbiter_says)
    chunks = await chunks_of_a_100_token_prompt(sch, dec)
    if pressed:  # ~2 ms at <= 4000 tokens/s is < 16 tokens: the smallest chunk, 16
        assert chunks == [16] * 6 + [4]
    else:
        assert chunks == [100]
    assert 2 in asked
    await sch.close()


async def test_prefill_is_cut_to_max_prefill_ms_with_nothing_urgent_about(
    executor: ThreadPoolExecutor,
) -> None:
    """Urgent work that arrives while a chunk runs waits for all of it: even while the arbiter
    says nothing more urgent is about, a chunk is about ``max_prefill_ms`` of measured prefill,
    not a whole ``prefill_chunk_tokens``."""
    dec = FakeDecoder(prefill_s=0.01)  # every prefill call takes ~10 ms, whatever its size
    config = GenerationConfig(prefill_chunk_tokens=512, urgent_prefill_ms=2.0, max_prefill_ms=5.0)
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    sch = Scheduler("fake", dec, executor, policy, config, pressed=lambda level: False)
    chunks = await chunks_of_a_100_token_prompt(sch, dec)
    # ~5 ms at <= 4000 tokens/s is <= 20 tokens a chunk (16 at least).
    assert sum(chunks) == 100 and len(chunks) >= 5 and max(chunks) <= 20
    await sch.close()


async def test_prefill_is_sized_when_its_grant_comes_not_when_it_asks(executor: ThreadPoolExecutor) -> None:
    """A prefill that waited for the engine runs when more urgent work came meanwhile: its chunk
    is sized from the arbiter's word once the grant is held. Here the prompt asks while only
    priority-3 work holds the engine (nothing more urgent about: a whole 100-token chunk), then a
    priority-1 call takes the engine first; the prefill that follows it is cut to the smallest
    chunk (before, the 1.1-1.9 s prefill of 8 prompts that opened each overload run)."""
    arbiter = ComputeArbiter(concurrency=1, aging_ms=0)
    dec = FakeDecoder(prefill_s=0.01)  # every prefill call takes ~10 ms, whatever its size
    config = GenerationConfig(prefill_chunk_tokens=512, urgent_prefill_ms=2.0)
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    sch = Scheduler(
        "fake",
        dec,
        executor,
        policy,
        config,
        grant=lambda level: arbiter.grant("fake", level),
        pressed=arbiter.pressed,
    )
    first = seq(list(range(1, 41)), 1)  # measures the rate: ~40 tokens in ~10 ms (<= 4000/s)
    sch.submit(first)
    await drain(first)
    assert dec.prefill_tokens == [40]
    low = await arbiter.acquire("embedder", 3)
    long = seq(list(range(1, 101)), 1)
    sch.submit(long, priority=2)
    await until(lambda: arbiter.waiting() == 1)  # the prefill asks; nothing more urgent is about
    assert not arbiter.pressed(2)
    urgent = arbiter.ask("embedder", 1)
    arbiter.release(low)  # the priority-1 call goes first ...
    arbiter.release(await arbiter.wait(urgent))  # ... and is done
    text, fin = await drain(long)
    assert isinstance(fin, Finished) and text == text_of(reference(list(range(1, 101)), 1))
    assert dec.prefill_tokens[1:] == [16] * 6 + [4]
    await sch.close()


async def test_close_without_drain_fails_everything(executor: ThreadPoolExecutor) -> None:
    sch = make(executor, FakeDecoder(decode_s=0.01), max_running=1)
    a, b = seq([1], 500), seq([2], 5)
    sch.submit(a)
    await until(lambda: sch.generation_snapshot()["running"] == 1)
    sch.submit(b)
    await sch.close(drain=False)
    for s in (a, b):
        _, fin = await drain(s)
        assert isinstance(fin, Failed)
    assert sch.snapshot()["queue_depth"] == {1: 0, 2: 0, 3: 0}


# ---------------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_and_bounded() -> None:
    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=5)
    draws = [sample(logits, p, make_rng(5)) for _ in range(3)]
    assert len(set(draws)) == 1
    many = {sample(logits, p, make_rng(s)) for s in range(50)}
    assert len(many) > 5
    best = int(np.argmax(logits))
    assert sample(logits, SamplingParams(max_tokens=1, temperature=0.0), make_rng(None)) == best
    assert sample(logits, SamplingParams(max_tokens=1, temperature=1.0, top_k=1), make_rng(1)) == best
    assert sample(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6), make_rng(1)) == best
    top3 = set(np.argsort(-logits)[:3].tolist())
    rng = make_rng(2)
    assert {sample(logits, SamplingParams(1, 2.0, top_k=3), rng) for _ in range(200)} <= top3
    assert sample(logits, SamplingParams(1, 1.0, seed=-3), make_rng(-3)) >= 0  # negative seeds work
    # A vanishing temperature is greedy (vLLM's rule); divided by 1e-320 the logits overflowed and
    # every draw was the last token id.
    for tiny in (1e-320, 1e-300, 1e-6):
        assert sample(logits, SamplingParams(1, tiny, seed=1), make_rng(1)) == best


def test_stop_strings_hold_back_possible_starts() -> None:
    m = StopMatcher(["STOP", "xy"])
    assert m.feed("abc S") == ("abc ", False)  # "S" may begin STOP
    assert m.feed("T") == ("", False)
    assert m.feed("ate") == ("STate", False)  # not a stop after all: released
    assert m.feed(" x") == (" ", False)
    assert m.feed("yz") == ("", True)  # "xy" found: nothing of it is released
    assert m.text == "abc STate "
    m2 = StopMatcher(["end"])
    assert m2.feed("the e") == ("the ", False)
    assert m2.finish() == "e"  # the sequence ended: the held tail was never a stop


def _first_stop(text: str, stops: Sequence[str], armed_from: int) -> int | None:
    """The naive reference: where the text is cut, scanning its ends left to right (a stop string
    counts once it is complete and ends past ``armed_from``; of two ending at one character, the
    longer)."""
    for end in range(armed_from + 1, len(text) + 1):
        starts = [end - len(s) for s in stops if s and text.endswith(s, 0, end)]
        if starts:
            return min(starts)
    return None


def _held(text: str, stops: Sequence[str]) -> int:
    """The naive reference: the longest proper prefix of a stop string that the text ends with."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@settings(max_examples=400, deadline=None)
@given(
    stops=st.lists(st.text("abc", min_size=1, max_size=6), min_size=1, max_size=4),
    text=st.text("abc", max_size=80),
    cuts=st.lists(st.integers(0, 80), max_size=30),
    unarmed=st.integers(0, 6),
)
def test_stop_matcher_equals_the_naive_cut_whatever_the_pieces(
    stops: list[str], text: str, cuts: list[int], unarmed: int
) -> None:
    """Streamed in any pieces (empty ones too, the first ``unarmed`` of them not yet armed, as
    before min_tokens), the released text is the text cut before the first stop string completed,
    and while none is, all of it but the longest tail that could still begin one."""
    bounds = sorted(min(c, len(text)) for c in cuts)
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    armed_from = sum(len(p) for p in pieces[:unarmed])
    cut = _first_stop(text, stops, armed_from)
    m = StopMatcher(stops)
    released, fed, found = "", "", False
    for i, piece in enumerate(pieces):
        out, found = m.feed(piece, armed=i >= unarmed)
        released += out
        fed += piece
        if found:
            break
        assert released == fed[: len(fed) - _held(fed, stops)]
    if not found:
        released += m.finish()
    assert found == (cut is not None)
    assert released == m.text == text[:cut]


def test_stop_matcher_work_is_linear_in_the_text() -> None:
    """200,000 one-character pieces against long stop strings cost a bounded number of reads of
    the stop strings per character. Testing every prefix of each stop string against the text's
    end per piece read them O(L^2) times a piece (and made a long stream quadratic)."""
    reads = [0]
    budget = 200_000 * 2 * 8

    class Counted(str):
        def __getitem__(self, key: Any) -> str:  # type: ignore[override]
            reads[0] += 1
            if reads[0] > budget:
                raise AssertionError("more than 8 reads of each stop string per character")
            return str.__getitem__(self, key)

    # One never begins in the text; one runs along it for 2,000 characters and then fails.
    stops = [Counted("z" * 5_000), Counted("ab" * 1_000 + "c")]
    m = StopMatcher(stops)
    text = "ab" * 100_000
    released = "".join(m.feed(ch)[0] for ch in text)
    assert released == text[:-2000]  # "abab...ab" may still grow into the second
    assert released + m.finish() == text


def test_stop_token_ids_end_the_sequence_and_min_tokens_holds_every_end_back() -> None:
    eos = 25  # "z"
    # A stop token id ends the sequence as EOS does: it is not text.
    proc = OutputProcessor.create(SamplingParams(max_tokens=9, stop_token_ids=(3,)), FakeTokenizer(), [eos])
    assert proc.push(0).text == "a"
    out = proc.push(3)
    assert (out.finish_reason, out.text) == ("stop", "")
    # Before min_tokens tokens EOS and the stop ids are banned from sampling, and a stop string
    # that ends in them is text (vLLM's min_tokens); from the token after, all of them end it.
    p = SamplingParams(max_tokens=9, stop=("b",), stop_token_ids=(3,), min_tokens=2)
    proc = OutputProcessor.create(p, FakeTokenizer(), [eos])
    assert proc.suppressed() == (3, eos)
    assert proc.push(1).text == "b"  # the stop string "b", within the first 2 tokens
    assert proc.suppressed() == (3, eos)
    assert proc.push(0).text == "a"
    assert proc.suppressed() == ()
    out = proc.push(1)
    assert (out.finish_reason, out.text) == ("stop", "") and proc.text == "ba"
    # ignore_eos leaves EOS out of what is banned (it is sampled as any token).
    p = SamplingParams(max_tokens=9, stop_token_ids=(3,), min_tokens=2, ignore_eos=True)
    assert OutputProcessor.create(p, FakeTokenizer(), [eos]).suppressed() == (3,)
    # The banned ids are never sampled, greedy or not.
    logits = np.zeros(V, dtype=np.float32)
    logits[[3, eos]] = 10.0
    logits[7] = 5.0
    assert sample(logits, SamplingParams(1, 0.0), make_rng(0), (3, eos)) == 7
    draws = {sample(logits, SamplingParams(1, 1.0), make_rng(s), (3, eos)) for s in range(50)}
    assert 3 not in draws and eos not in draws
    assert logits[3] == 10.0  # the batch's row is left as it was


def test_a_ban_on_every_token_is_ignored_without_nan_or_warning() -> None:
    """Found by fuzzing: min_tokens with stop_token_ids holding the whole vocabulary banned every
    id; greedy took token 0 of all -inf, sampling a NaN distribution's last id, with a numpy
    RuntimeWarning on stderr. The service refuses such a request; here the sampler ignores a
    ban that leaves nothing, and so picks as if there were none."""
    logits = np.random.default_rng(0).normal(size=V).astype(np.float32)
    best = int(np.argmax(logits))
    everything = tuple(range(V))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning fails the test
        assert sample(logits, SamplingParams(1, 0.0), make_rng(0), everything) == best
        for s in range(20):
            p = SamplingParams(1, 1.0, top_k=3 * (s % 2), top_p=0.5 + 0.5 * (s % 3 == 0))
            assert sample(logits, p, make_rng(s), everything) == sample(logits, p, make_rng(s))
        # A row with no finite logit at all has no distribution: its argmax, as greedy.
        dead = np.full(V, -np.inf, dtype=np.float32)
        assert sample(dead, SamplingParams(1, 1.0), make_rng(0)) == 0
        # A ban leaving a single token: that token, whatever top-k or top-p keeps.
        all_but_7 = tuple(i for i in range(V) if i != 7)
        for p in (SamplingParams(1, 0.0), SamplingParams(1, 1.0), SamplingParams(1, 1.0, top_k=5)):
            assert sample(logits, p, make_rng(1), all_but_7) == 7
        assert sample(logits, SamplingParams(1, 1.0, top_p=0.999999), make_rng(1), all_but_7) == 7
    # Top-k and top-p choose among the tokens left, never a banned one of zero mass.
    banned = tuple(np.argsort(-logits)[:5].tolist())
    for s in range(100):
        p = SamplingParams(1, 2.0, top_k=(0, 1, 3, V - 1)[s % 4], top_p=(1.0, 0.3, 0.999999)[s % 3])
        assert sample(logits, p, make_rng(s), banned) not in banned


def test_a_banned_id_outside_the_vocabulary_is_no_fault() -> None:
    """An EOS id past the vocabulary (a generation config that disagrees with the exported head)
    or a negative one: banning it raised IndexError, or banned the last token, and the fault
    failed every sequence of the decode step."""
    logits = np.random.default_rng(1).normal(size=V).astype(np.float32)
    best = int(np.argmax(logits))
    greedy = SamplingParams(1, 0.0)
    assert sample(logits, greedy, make_rng(0), (V, V + 7)) == best
    logits[V - 1] = logits.max() + 1.0
    assert sample(logits, greedy, make_rng(0), (-1,)) == V - 1  # -1 is no id, not the last one


def test_output_processor_length_and_stop() -> None:
    p = SamplingParams(max_tokens=3, stop=("c",))
    proc = OutputProcessor.create(p, FakeTokenizer(), [])
    assert proc.push(0).text == "a"
    out = proc.push(2)
    assert out.finish_reason == "stop" and out.text == ""
    proc = OutputProcessor.create(SamplingParams(max_tokens=2), FakeTokenizer(), [])
    proc.push(0)
    assert proc.push(1).finish_reason == "length"


def test_detokenizer_never_splits_a_character(smollm_folder: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm_folder / "tokenizer.json"))
    text = "héllo 🌊 wörld 日本語 ok"
    ids = tok.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert len(ids) > len([d for d in deltas if d])  # some tokens were half a character
    # A sequence that ends inside a character (a length cut through the emoji) ends without it,
    # not with a U+FFFD the model never wrote (found by a chat probe).
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok)
    text = "".join([detok.push(i) for i in ids[:cut]] + [detok.flush()])
    assert text == tok.decode(ids[:cut]).rstrip("\ufffd") and "\ufffd" not in text


async def test_real_model_greedy_matches_the_reference_fixture(
    smollm_folder: Path, executor: ThreadPoolExecutor
) -> None:
    import json

    from tokenizers import Tokenizer

    from appliance.llm.runtime import DecoderSession

    ref = json.loads((Path(__file__).parent / "fixtures" / "smollm2_reference.json").read_text())
    session = DecoderSession(smollm_folder, intra_op_threads=2)
    tok = Tokenizer.from_file(str(smollm_folder / "tokenizer.json"))
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    sch = Scheduler("smollm", session, executor, policy, GenerationConfig())
    seqs = []
    for case in ref["cases"]:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        s = Seq(case["prompt_ids"], params, OutputProcessor.create(params, tok, session.eos_ids))
        sch.submit(s)
        seqs.append(s)
    await asyncio.gather(*(drain(s) for s in seqs))
    for s, case in zip(seqs, ref["cases"], strict=True):
        assert s.generated == case["greedy_new_ids"][:12]
    assert sch.bytes_per_token == 30 * 2 * 3 * 64 * 4
    await sch.close()


# ------------------------------------------------------------- several decode steps per call


def multi(
    executor: ThreadPoolExecutor,
    dec: FakeDecoder,
    *,
    steps: int = 8,
    contended: Callable[[], bool] | None = None,
    engine_timeout_ms: float = 0.0,
    max_running: int = 8,
) -> tuple[Scheduler, list[bool]]:
    """A scheduler with ``decode_steps_per_call = steps``; the list holds, per engine call, True
    while its grant is held (one entry per call, cleared when released)."""
    calls: list[bool] = []

    @contextlib.asynccontextmanager
    async def grant(level: int) -> AsyncIterator[None]:
        calls.append(True)
        try:
            yield
        finally:
            calls[-1] = False

    policy = BatchPolicy(priority_levels=3, default_priority=2)
    config = GenerationConfig(max_running=max_running, decode_steps=steps)
    tunables = (lambda: {"engine.timeout_ms": engine_timeout_ms}) if engine_timeout_ms else None
    sch = Scheduler(
        "fake", dec, executor, policy, config, grant=grant, contended=contended, tunables=tunables
    )
    return sch, calls


async def test_several_decode_steps_per_call_still_stream_token_by_token(
    executor: ThreadPoolExecutor,
) -> None:
    dec = FakeDecoder(decode_s=0.005)
    sch, calls = multi(executor, dec, steps=8)
    s = seq([3, 1, 4], 20)
    sch.submit(s)
    counts, during_a_call = [], 0
    while True:
        ev = await asyncio.wait_for(s.events.get(), 10)
        if not isinstance(ev, Token):
            break
        counts.append(ev.completion_tokens)
        during_a_call += bool(calls and calls[-1])
    assert isinstance(ev, Finished) and ev.completion_tokens == 20
    assert counts == list(range(1, 21)), "one event per token, in order"
    assert len(dec.decode_sizes) == 19 and len(calls) == 1 + 3, "prefill, then 19 steps in 8 + 8 + 3"
    assert during_a_call >= 10, "tokens reach the request while their call is still running"
    await sch.close()


async def test_a_newcomer_joins_a_multi_step_call_within_one_step(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(decode_s=0.01)
    sch, _ = multi(executor, dec, steps=64)
    long = seq([1, 2], 200)
    sch.submit(long)
    await until(lambda: len(long.generated) >= 5)
    late = seq([5, 6], 3)
    sch.submit(late)
    at_submit = len(long.generated)
    await until(lambda: bool(late.generated))
    assert len(long.generated) - at_submit <= 2, "the running call ended at the next step boundary"
    text, fin = await drain(late)
    assert isinstance(fin, Finished) and text == text_of(reference([5, 6], 3))
    sch.cancel(long)
    await sch.close()


async def test_cancel_stop_and_eos_end_a_multi_step_call(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(decode_s=0.01)
    sch, _ = multi(executor, dec, steps=64)
    ref = reference([7, 7], 30)
    at = max(i for i in range(30) if ref[i] not in ref[:i])  # the latest first occurrence (3 here)
    ends = seq([7, 7], 30, eos=[ref[at]])
    sch.submit(ends)
    text, fin = await drain(ends)
    assert isinstance(fin, Finished) and fin.finish_reason == "stop" and fin.completion_tokens == at + 1
    assert text == text_of(ref[:at]) and len(dec.decode_sizes) == at, "no step after the EOS"
    stopped = seq([7, 7], 30, stop=(text_of(ref[2:4]),))
    sch.submit(stopped)
    text, fin = await drain(stopped)
    assert isinstance(fin, Finished) and fin.finish_reason == "stop" and text == text_of(ref[:2])
    assert fin.completion_tokens == 4 and len(dec.decode_sizes) == at + 3, "no step after the stop"
    cancelled = seq([1], 500)
    sch.submit(cancelled)
    await until(lambda: len(cancelled.generated) >= 5)
    sch.cancel(cancelled)
    steps = len(dec.decode_sizes)
    await until(lambda: sch.generation_snapshot()["running"] == 0)
    assert len(dec.decode_sizes) - steps <= 1, "a cancelled row stops the call at the step boundary"
    await sch.close()


@pytest.mark.parametrize("waiting", [True, False])
async def test_a_call_waiting_for_the_grant_gets_it_within_one_step(
    executor: ThreadPoolExecutor, waiting: bool
) -> None:
    """While the arbiter has a waiter (another model's batch, any priority), every engine call is
    one decode step, as before; otherwise up to ``decode_steps_per_call``."""
    dec = FakeDecoder(decode_s=0.002)
    sch, calls = multi(executor, dec, steps=4, contended=lambda: waiting)
    s = seq([2, 7], 13)
    sch.submit(s)
    text, fin = await drain(s)
    assert isinstance(fin, Finished) and text == text_of(reference([2, 7], 13))
    assert len(dec.decode_sizes) == 12
    assert len(calls) - 1 == (12 if waiting else 3)
    await sch.close()


async def test_the_steps_of_one_call_stay_within_a_quarter_of_the_engine_timeout(
    executor: ThreadPoolExecutor,
) -> None:
    dec = FakeDecoder(decode_s=0.02)  # a quarter of 100 ms holds one 20 ms step, not two
    sch, calls = multi(executor, dec, steps=8, engine_timeout_ms=100)
    s = seq([4], 6)
    sch.submit(s)
    _, fin = await drain(s)
    assert isinstance(fin, Finished) and len(dec.decode_sizes) == 5 and len(calls) - 1 == 5
    await sch.close()
