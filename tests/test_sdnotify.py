"""sd_notify against a fake systemd: a real AF_UNIX datagram socket, by path and abstract."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from appliance.sdnotify import Notifier, ProgressWatchdog, notify, watchdog_interval_s, watchdog_loop


@dataclass
class FakeSystemd:
    sock: socket.socket
    address: str  # the NOTIFY_SOCKET value

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def messages(self, timeout: float = 1.0) -> list[str]:
        """Every datagram received so far (waits up to ``timeout`` for the first)."""
        self.sock.settimeout(timeout)
        try:
            first = self.sock.recv(4096).decode()
        except TimeoutError:
            return []
        return [first, *self.drain()]

    def drain(self) -> list[str]:
        """What is queued now, without waiting (safe to call from a coroutine)."""
        out: list[str] = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def path_socket() -> Iterator[FakeSystemd]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    folder = tempfile.mkdtemp(prefix="sdn")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield FakeSystemd(sock, path)
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def abstract_socket() -> Iterator[FakeSystemd]:
    name = f"appliance-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield FakeSystemd(sock, "@" + name)
    finally:
        sock.close()


@pytest.fixture(params=["path", "abstract"])
def fake_systemd(request: pytest.FixtureRequest) -> FakeSystemd:
    fixture = "path_socket" if request.param == "path" else "abstract_socket"
    fake: FakeSystemd = request.getfixturevalue(fixture)
    return fake


def test_lifecycle_messages_reach_systemd(fake_systemd: FakeSystemd) -> None:
    n = Notifier(fake_systemd.env(WATCHDOG_USEC="30000000"))
    assert n.enabled
    assert n.extend_timeout(120)
    assert n.ready("serving 2 models")
    assert n.status("loading\nsmollm2")
    assert n.watchdog_ping()
    assert n.stopping()
    assert fake_systemd.messages() == [
        "EXTEND_TIMEOUT_USEC=120000000",
        "READY=1\nSTATUS=serving 2 models",
        "STATUS=loading smollm2",  # a newline would have started a second assignment
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_module_notify_reads_the_environment(
    path_socket: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.address)
    assert notify("READY=1", "STATUS=up")
    assert path_socket.messages() == ["READY=1\nSTATUS=up"]


def test_no_socket_is_a_silent_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog_ping() is False


def test_unreachable_socket_does_not_raise() -> None:
    missing = os.path.join(tempfile.gettempdir(), f"no-such-{uuid.uuid4().hex}")
    assert notify("READY=1", env={"NOTIFY_SOCKET": missing}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "relative/path"}) is False


def test_malformed_state_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        notify("READY=1\nWATCHDOG=1", env={})
    with pytest.raises(ValueError):
        notify("READY", env={})


def test_watchdog_for_another_pid_is_not_pinged(path_socket: FakeSystemd) -> None:
    n = Notifier(path_socket.env(WATCHDOG_USEC="1000000", WATCHDOG_PID=str(os.getpid() + 1)))
    assert n.watchdog_interval_s() is None
    assert n.watchdog_ping() is False
    assert path_socket.messages(timeout=0.2) == []


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "400000"}, 0.4),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_parsing(env: dict[str, str], expected: float | None) -> None:
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert watchdog_interval_s(env) == expected
    assert Notifier(env).watchdog_interval_s() == expected


def test_notifier_captures_environment_once(
    path_socket: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.address)
    n = Notifier()
    # The server may scrub the variable so subprocesses cannot speak for the service.
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert n.ready()
    assert path_socket.messages() == ["READY=1"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_idle_components_stay_healthy() -> None:
    clock = FakeClock()
    wd = ProgressWatchdog(default_allowance_s=10, clock=clock)
    wd.register("engine:minilm")
    wd.beat("engine:smollm2")
    clock.advance(3600)  # a quiet night: nothing queued, nothing to prove
    assert wd.healthy()
    assert wd.stalls() == []


def test_busy_component_that_hangs_is_unhealthy_until_it_ends() -> None:
    clock = FakeClock()
    wd = ProgressWatchdog(default_allowance_s=10, clock=clock)
    wd.begin("engine:minilm")
    clock.advance(9)
    assert wd.healthy()
    clock.advance(2)
    assert not wd.healthy()
    [stall] = wd.stalls()
    assert stall.component == "engine:minilm"
    assert stall.silent_s == pytest.approx(11)
    assert stall.allowance_s == 10
    wd.end("engine:minilm")
    assert wd.healthy()
    clock.advance(100)
    assert wd.healthy()


def test_beats_keep_long_work_alive() -> None:
    clock = FakeClock()
    wd = ProgressWatchdog(default_allowance_s=5, clock=clock)
    wd.begin("engine:smollm2")
    for _ in range(20):  # a long generation, one beat per decode step
        clock.advance(4)
        wd.beat("engine:smollm2")
        assert wd.healthy()
    clock.advance(6)
    assert not wd.healthy()


def test_per_work_allowance_and_nesting() -> None:
    clock = FakeClock()
    wd = ProgressWatchdog(default_allowance_s=5, clock=clock)
    wd.begin("engine:trt", allowance_s=120)  # e.g. a first engine build
    wd.begin("engine:trt")
    clock.advance(60)
    assert wd.healthy()
    wd.end("engine:trt")
    clock.advance(100)
    assert wd.healthy()  # still inside the 120 s granted to the outer work
    clock.advance(30)
    assert not wd.healthy()
    wd.end("engine:trt")
    assert wd.healthy()
    wd.begin("engine:trt")
    clock.advance(6)
    assert not wd.healthy()  # the override ended with the work


def test_always_busy_component_must_beat() -> None:
    clock = FakeClock()
    wd = ProgressWatchdog(clock=clock)
    wd.register("event-loop", allowance_s=2, always_busy=True)
    clock.advance(1.5)
    assert wd.healthy()
    clock.advance(1)
    assert not wd.healthy()
    wd.beat("event-loop")
    assert wd.healthy()
    [state] = wd.snapshot()
    assert (state.component, state.busy, state.stalled) == ("event-loop", 1, False)


def test_working_context_ends_on_error_and_unregister_forgets() -> None:
    clock = FakeClock()
    wd = ProgressWatchdog(default_allowance_s=1, clock=clock)
    with pytest.raises(RuntimeError), wd.working("engine:x"):
        raise RuntimeError("CUDA error")
    clock.advance(10)
    assert wd.healthy()
    wd.begin("engine:y")
    clock.advance(10)
    assert not wd.healthy()
    wd.unregister("engine:y")
    assert wd.healthy()


def test_invalid_allowances_rejected() -> None:
    with pytest.raises(ValueError):
        ProgressWatchdog(default_allowance_s=0)
    wd = ProgressWatchdog()
    with pytest.raises(ValueError):
        wd.register("x", allowance_s=-1)
    with pytest.raises(ValueError):
        wd.begin("x", allowance_s=0)


def test_threads_beating_concurrently() -> None:
    wd = ProgressWatchdog(default_allowance_s=60)

    def worker(i: int) -> None:
        for _ in range(500):
            with wd.working(f"engine:{i % 3}"):
                wd.beat(f"engine:{i % 3}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s.busy == 0 for s in wd.snapshot())
    assert wd.healthy()


def test_watchdog_loop_pings_only_while_healthy(path_socket: FakeSystemd) -> None:
    notifier = Notifier(path_socket.env(WATCHDOG_USEC="40000"))  # ping every 20 ms
    wd = ProgressWatchdog(default_allowance_s=0.05)

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        task = asyncio.create_task(watchdog_loop(notifier, wd))
        await asyncio.sleep(0.15)
        healthy = path_socket.drain()
        wd.begin("engine:minilm")  # and never finishes: a hung CUDA call
        await asyncio.sleep(0.3)
        hung = path_socket.drain()
        wd.end("engine:minilm")
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        recovered = path_socket.drain()
        return healthy, hung, recovered

    healthy, hung, recovered = asyncio.run(scenario())
    assert healthy.count("WATCHDOG=1") >= 2
    stalled = [m for m in hung if m.startswith("STATUS=stalled")]
    assert len(stalled) == 1 and "engine:minilm" in stalled[0]
    # Pings stop once the stall is seen (a few may precede it, within the allowance).
    assert hung.index(stalled[0]) == len(hung) - 1
    assert "STATUS=ok" in recovered and "WATCHDOG=1" in recovered


def test_watchdog_loop_returns_when_watchdog_is_off() -> None:
    asyncio.run(asyncio.wait_for(watchdog_loop(Notifier({}), ProgressWatchdog()), timeout=1))
