"""Specification of the per-model circuit breaker (appliance.breaker); time is a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import replace

import pytest

from appliance.breaker import BreakerConfig, BreakerOpen, BreakerState, CircuitBreaker, Permit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Transition = tuple[str, BreakerState, BreakerState, str]


def make(**overrides: object) -> tuple[CircuitBreaker, FakeClock, list[Transition]]:
    clock = FakeClock()
    seen: list[Transition] = []
    config = replace(BreakerConfig(), **overrides)  # type: ignore[arg-type]
    breaker = CircuitBreaker("m", config, clock=clock, on_transition=lambda *event: seen.append(event))
    return breaker, clock, seen


def record(breaker: CircuitBreaker, successes: int = 0, failures: int = 0, duration_s: float = 0.01) -> None:
    for _ in range(successes):
        breaker.acquire().success(duration_s)
    for _ in range(failures):
        breaker.acquire().failure("exception")


def trip(breaker: CircuitBreaker) -> None:
    while breaker.state is BreakerState.CLOSED:
        breaker.acquire().failure("exception")
    assert breaker.state is BreakerState.OPEN


# -- configuration ---------------------------------------------------------------------------


def test_defaults_follow_hystrix_and_slow_calls_are_off() -> None:
    cfg = BreakerConfig()
    assert (cfg.window_s, cfg.buckets, cfg.min_requests, cfg.failure_rate_threshold) == (10.0, 10, 20, 0.5)
    assert (cfg.open_duration_s, cfg.half_open_probes, cfg.slow_call_ms) == (5.0, 1, 0.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("window_s", 0.0),
        ("buckets", 0),
        ("buckets", 2.5),
        ("min_requests", 0),
        ("failure_rate_threshold", 0.0),
        ("failure_rate_threshold", 1.5),
        ("slow_call_ms", -1.0),
        ("slow_call_rate_threshold", 0.0),
        ("open_duration_s", 0.0),
        ("half_open_probes", 0),
        ("probe_timeout_s", float("nan")),
        ("open_backoff_factor", 0.5),
        ("max_open_duration_s", 1.0),
    ],
)
def test_validate_names_the_field_and_bound(field: str, value: object) -> None:
    cfg = replace(BreakerConfig(), **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"BreakerConfig\.{field} must be .*got"):
        cfg.validate()


def test_reconfigure_is_validated_and_atomic() -> None:
    breaker, _, _ = make()
    with pytest.raises(ValueError, match="failure_rate_threshold"):
        breaker.reconfigure(min_requests=5, failure_rate_threshold=2.0)
    assert breaker.config.min_requests == 20
    with pytest.raises(ValueError, match="unknown"):
        breaker.reconfigure(nope=1)
    breaker.reconfigure(min_requests=5)
    record(breaker, failures=5)
    assert breaker.state is BreakerState.OPEN


def test_an_open_period_follows_an_open_duration_changed_while_it_runs() -> None:
    """Found probing live retuning: lowered while the breaker was open, the new duration applied
    only from the next trip; the open period running now follows it, either way."""
    breaker, clock, _ = make(open_duration_s=30.0)
    trip(breaker)
    clock.advance(2)
    breaker.reconfigure(open_duration_s=5.0)
    assert breaker.snapshot()["open_remaining_s"] == pytest.approx(3.0)
    clock.advance(3)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.acquire().failure("exception")  # the probe fails: open again, for 5 s x backoff
    assert breaker.state is BreakerState.OPEN
    opened = breaker.snapshot()["open_remaining_s"]
    breaker.reconfigure(open_duration_s=1.0)
    assert breaker.snapshot()["open_remaining_s"] == pytest.approx(opened / 5.0)
    breaker.reconfigure(open_duration_s=20.0)
    assert breaker.snapshot()["open_remaining_s"] == pytest.approx(opened * 4.0)


# -- tripping --------------------------------------------------------------------------------


def test_below_min_requests_never_trips_even_at_100_percent_failures() -> None:
    breaker, _, _ = make()
    record(breaker, failures=19)  # the Hystrix doc example
    assert breaker.state is BreakerState.CLOSED
    record(breaker, failures=1)
    assert breaker.state is BreakerState.OPEN


def test_trips_exactly_when_failure_rate_reaches_threshold() -> None:
    breaker, _, seen = make()
    record(breaker, successes=11, failures=9)  # 45 %
    assert breaker.state is BreakerState.CLOSED
    record(breaker, failures=1)  # 10/21 = 47.6 %
    assert breaker.state is BreakerState.CLOSED
    record(breaker, failures=1)  # 11/22 = 50 %: >= threshold
    assert breaker.state is BreakerState.OPEN
    assert "failure rate 11/22" in seen[-1][3]


@pytest.mark.parametrize("kind", ["exception", "timeout", "oom"])
def test_every_failure_kind_counts(kind: str) -> None:
    breaker, _, _ = make(min_requests=3)
    for _ in range(3):
        breaker.acquire().failure(kind)
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot()["totals"][kind] == 3


def test_slow_calls_trip_at_rate_threshold_and_boundary_duration_is_not_slow() -> None:
    breaker, _, seen = make(slow_call_ms=100, slow_call_rate_threshold=1.0)
    record(breaker, successes=19, duration_s=0.5)
    record(breaker, successes=1, duration_s=0.1)  # exactly 100 ms: not slow
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["slow_call_rate"] == pytest.approx(19 / 20)

    breaker, _, seen = make(slow_call_ms=100, slow_call_rate_threshold=0.8)
    record(breaker, successes=4, duration_s=0.01)
    record(breaker, successes=16, duration_s=0.2)  # 16/20 = 80 %
    assert breaker.state is BreakerState.OPEN
    assert "slow-call rate 16/20" in seen[-1][3]


def test_slow_calls_are_ignored_when_slow_call_ms_is_zero() -> None:
    breaker, _, _ = make()
    record(breaker, successes=50, duration_s=600.0)
    assert breaker.state is BreakerState.CLOSED


def test_success_duration_defaults_to_clock_time_since_acquire() -> None:
    breaker, clock, _ = make(slow_call_ms=1000, min_requests=2)
    for _ in range(2):
        permit = breaker.acquire()
        clock.advance(1.5)
        permit.success()
    assert breaker.state is BreakerState.OPEN


def test_old_buckets_roll_out_of_the_window() -> None:
    breaker, clock, _ = make()
    record(breaker, failures=10)  # bucket [1000, 1001)
    clock.advance(9.0)
    record(breaker, failures=9)  # bucket [1009, 1010): all 19 still in the 10 s window
    assert breaker.snapshot()["calls_in_window"] == 19
    clock.advance(1.0)  # t=1010: the first bucket has rolled out
    assert breaker.snapshot()["calls_in_window"] == 9
    record(breaker, failures=1)
    assert breaker.state is BreakerState.CLOSED  # 10 calls < 20
    clock.advance(10.0)
    assert breaker.snapshot()["calls_in_window"] == 0


# -- outcomes that must never count ----------------------------------------------------------


def test_ignored_outcomes_never_count() -> None:
    breaker, _, _ = make(min_requests=1)
    for _ in range(100):
        breaker.acquire().ignore()  # 4xx, client disconnect, admission rejection
    for _ in range(100):
        with breaker.acquire():
            pass  # never resolved: the context manager ignores it
    with pytest.raises(asyncio.CancelledError), breaker.acquire():
        raise asyncio.CancelledError  # what a client disconnect looks like
    snap = breaker.snapshot()
    assert breaker.state is BreakerState.CLOSED
    assert snap["calls_in_window"] == 0
    assert snap["totals"]["ignored"] == 201


def test_a_permit_resolves_once_first_answer_wins() -> None:
    breaker, _, _ = make(min_requests=1)
    permit = breaker.acquire()
    permit.success(0.01)
    permit.failure("exception")
    permit.ignore()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["calls_in_window"] == 1


def test_unknown_failure_kind_counts_as_exception_without_raising() -> None:
    breaker, _, _ = make(min_requests=1)
    breaker.acquire().failure("segfault")
    assert breaker.snapshot()["totals"]["exception"] == 1


# -- open and half-open ----------------------------------------------------------------------


def test_open_rejects_with_shrinking_retry_after() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    with pytest.raises(BreakerOpen) as first:
        breaker.acquire()
    assert first.value.state is BreakerState.OPEN
    assert first.value.retry_after_s == pytest.approx(5.0)
    clock.advance(3.5)
    with pytest.raises(BreakerOpen) as later:
        breaker.acquire()
    assert later.value.retry_after_s == pytest.approx(1.5)
    assert breaker.snapshot()["open_remaining_s"] == pytest.approx(1.5)
    assert breaker.snapshot()["totals"]["rejected"] == 2


@pytest.mark.parametrize("probes", [1, 3])
async def test_half_open_admits_exactly_n_probes_in_a_concurrent_burst(probes: int) -> None:
    breaker, clock, _ = make(half_open_probes=probes)
    trip(breaker)
    clock.advance(5.0)

    async def caller() -> Permit | BreakerOpen:
        await asyncio.sleep(0)  # all 50 are scheduled before any acquires
        try:
            return breaker.acquire()
        except BreakerOpen as exc:
            return exc

    results = await asyncio.gather(*(caller() for _ in range(50)))
    permits = [r for r in results if isinstance(r, Permit)]
    rejected = [r for r in results if isinstance(r, BreakerOpen)]
    assert len(permits) == probes
    assert all(p.is_probe for p in permits)
    assert {r.state for r in rejected} == {BreakerState.HALF_OPEN}
    assert breaker.snapshot()["probes_in_flight"] == probes


def test_half_open_admits_exactly_one_probe_across_threads() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    clock.advance(5.0)
    barrier = threading.Barrier(32)
    admitted: list[Permit] = []

    def worker() -> None:
        barrier.wait()
        with contextlib.suppress(BreakerOpen):
            admitted.append(breaker.acquire())

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 1


def test_all_probes_succeeding_closes_and_clears_the_window() -> None:
    breaker, clock, seen = make(half_open_probes=2)
    trip(breaker)
    clock.advance(5.0)
    first, second = breaker.acquire(), breaker.acquire()
    first.success(0.01)
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(BreakerOpen):
        breaker.acquire()  # a succeeded probe still holds its slot
    second.success(0.01)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["calls_in_window"] == 0
    assert [(old, new) for _, old, new, _ in seen] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


@pytest.mark.parametrize("kind", ["exception", "timeout", "oom"])
def test_a_failed_probe_reopens_for_a_fresh_period(kind: str) -> None:
    breaker, clock, _ = make(half_open_probes=2)
    trip(breaker)
    clock.advance(5.0)
    good, bad = breaker.acquire(), breaker.acquire()
    good.success(0.01)
    bad.failure(kind)
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot()["open_remaining_s"] == pytest.approx(5.0)


def test_a_slow_probe_reopens_when_slow_calls_are_on() -> None:
    breaker, clock, _ = make(slow_call_ms=100)
    trip(breaker)
    clock.advance(5.0)
    breaker.acquire().success(0.5)
    assert breaker.state is BreakerState.OPEN


def test_open_period_backs_off_after_failed_probes_and_resets_on_close() -> None:
    breaker, clock, _ = make(open_backoff_factor=2.0, max_open_duration_s=15.0)
    trip(breaker)
    for expected in (10.0, 15.0, 15.0):  # 5 s, then doubled, capped at 15 s
        clock.advance(60.0)
        breaker.acquire().failure("exception")
        assert breaker.snapshot()["open_remaining_s"] == pytest.approx(expected)
    clock.advance(60.0)
    breaker.acquire().success(0.01)
    trip(breaker)
    assert breaker.snapshot()["open_remaining_s"] == pytest.approx(5.0)


def test_an_ignored_or_abandoned_probe_frees_its_slot() -> None:
    breaker, clock, _ = make()
    trip(breaker)
    clock.advance(5.0)
    breaker.acquire().ignore()  # e.g. the probe's client disconnected
    with breaker.acquire():
        pass  # the handler forgot to resolve it
    probe = breaker.acquire()
    assert probe.is_probe
    probe.success(0.01)
    assert breaker.state is BreakerState.CLOSED


def test_a_probe_that_never_answers_is_failed_at_its_deadline() -> None:
    breaker, clock, seen = make(probe_timeout_s=30.0)
    trip(breaker)
    clock.advance(5.0)
    hung = breaker.acquire()
    clock.advance(29.0)
    with pytest.raises(BreakerOpen):
        breaker.acquire()
    clock.advance(1.0)
    with pytest.raises(BreakerOpen) as exc:
        breaker.acquire()  # the deadline passes: re-opened rather than pinned half-open
    assert exc.value.state is BreakerState.OPEN
    assert "no answer within 30 s" in seen[-1][3]
    clock.advance(5.0)
    hung.success(0.01)  # its late answer belongs to an old period and must not close the breaker
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.acquire().success(0.01)
    assert breaker.state is BreakerState.CLOSED


def test_late_results_from_before_a_trip_do_not_count() -> None:
    breaker, clock, _ = make()
    early = breaker.acquire()  # in flight while the breaker trips and recovers
    trip(breaker)
    clock.advance(5.0)
    early.success(0.01)  # not a probe: must not close the breaker
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.acquire().success(0.01)
    assert breaker.state is BreakerState.CLOSED
    before_reset = breaker.acquire()
    breaker.reset()
    before_reset.failure("exception")  # evidence about the pre-reset backend: dropped
    assert breaker.snapshot()["calls_in_window"] == 0


# -- operator overrides ----------------------------------------------------------------------


def test_forced_open_rejects_everything_until_reset() -> None:
    breaker, clock, _ = make()
    breaker.force_open()
    clock.advance(3600.0)
    with pytest.raises(BreakerOpen) as exc:
        breaker.acquire()
    assert exc.value.state is BreakerState.FORCED_OPEN
    assert exc.value.retry_after_s > 0
    breaker.reset()
    breaker.acquire().success(0.01)
    assert breaker.state is BreakerState.CLOSED


def test_disabled_admits_everything_and_never_trips() -> None:
    breaker, _, _ = make()
    breaker.disable()
    record(breaker, failures=500)
    assert breaker.state is BreakerState.DISABLED
    assert breaker.snapshot()["calls_in_window"] == 0


def test_reset_closes_an_open_breaker_with_an_empty_window() -> None:
    breaker, _, seen = make()
    trip(breaker)
    breaker.reset("operator test")
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["calls_in_window"] == 0
    assert seen[-1] == ("m", BreakerState.OPEN, BreakerState.CLOSED, "operator test")
    record(breaker, failures=19)
    assert breaker.state is BreakerState.CLOSED


# -- observation -----------------------------------------------------------------------------


def test_transitions_are_logged_and_a_failing_listener_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker("gpt", BreakerConfig(min_requests=1), clock=FakeClock(), on_transition=broken)
    with caplog.at_level(logging.INFO, logger="appliance.breaker"):
        breaker.acquire().failure("oom")
    assert breaker.state is BreakerState.OPEN
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("gpt: closed -> open" in r.getMessage() for r in warnings)
    assert any("listener failed" in r.getMessage() for r in caplog.records)


def test_snapshot_reports_state_rates_and_counts() -> None:
    breaker, clock, _ = make(half_open_probes=1)
    record(breaker, successes=3, failures=1)
    snap = breaker.snapshot()
    assert snap["state"] == "closed"
    assert snap["calls_in_window"] == 4
    assert snap["failure_rate"] == pytest.approx(0.25)
    assert snap["slow_call_rate"] == 0.0
    assert snap["open_remaining_s"] == 0.0
    trip(breaker)
    clock.advance(5.0)
    breaker.acquire()
    snap = breaker.snapshot()
    assert snap["state"] == "half_open"
    assert snap["probes_in_flight"] == 1
    assert snap["transitions"] == 2


# -- a call that fails after its first output ---------------------------------------------------


def test_a_call_failing_after_its_first_output_counts_once_as_failed() -> None:
    """A generation is a success at its first token (judged by time to first token), and may
    fail later. That is one failed call: it counted a success and a second, failed call, so a
    model failing every generation after its first token read a failure rate of 0.5 at most and
    never tripped a breaker set above it."""
    breaker, _, _ = make(min_requests=4, failure_rate_threshold=0.6)
    for _ in range(3):
        permit = breaker.acquire()
        permit.success(0.01)
        permit.failed_after("exception")
        permit.failed_after("exception")  # once at most
    snap = breaker.snapshot()
    assert (snap["calls_in_window"], snap["failures_in_window"]) == (3, 3)
    permit = breaker.acquire()
    permit.success(0.01)
    permit.failed_after("timeout")
    assert breaker.state is BreakerState.OPEN, "4 of 4 calls failed"


def test_a_late_failure_whose_success_left_the_window_is_a_failure_of_its_own() -> None:
    """A generation longer than the window: its success is no longer counted, so its failure is
    counted as a call of its own (there is nothing left to amend); one unresolved is a failure."""
    breaker, clock, _ = make(window_s=10.0, buckets=10, min_requests=100)
    permit = breaker.acquire()
    permit.success(0.01)
    clock.advance(30)
    permit.failed_after("exception")
    snap = breaker.snapshot()
    assert (snap["calls_in_window"], snap["failures_in_window"]) == (1, 1)
    unresolved = breaker.acquire()
    unresolved.failed_after("oom")
    snap = breaker.snapshot()
    assert (snap["calls_in_window"], snap["failures_in_window"]) == (2, 2)


@pytest.mark.parametrize("probes", [1, 2])
def test_a_probe_that_fails_after_its_first_output_opens_the_breaker_again(probes: int) -> None:
    """A half-open probe that is a generation succeeds at its first token, which closes the
    breaker (or counts towards it), then fails. The engine is not mended: the breaker opens
    again at once. Before, the failure was counted in the fresh closed window, and the breaker
    admitted every caller until min_requests more had failed."""
    breaker, clock, _ = make(half_open_probes=probes, min_requests=20, open_duration_s=5.0)
    trip(breaker)
    clock.advance(5.0)
    probe = breaker.acquire()
    assert probe.is_probe
    probe.success(0.01)
    assert breaker.state is (BreakerState.CLOSED if probes == 1 else BreakerState.HALF_OPEN)
    if probes == 1:
        record(breaker, successes=3)  # other calls meanwhile do not make the probe's verdict right
    probe.failed_after("exception")
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(BreakerOpen):
        breaker.acquire()
