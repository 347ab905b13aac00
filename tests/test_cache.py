"""Specification of the SQLite response cache (appliance.cache), on real files under tmp_path."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance import cache as cache_module
from appliance.cache import CacheHit, ResponseCache, cache_key

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, clock: FakeClock | None = None, **kw: Any) -> ResponseCache:
    opts: dict[str, Any] = {"max_bytes": 1 << 20, "ttl_s": 60.0, "max_stale_s": 600.0}
    opts.update(kw)
    if clock is not None:
        opts["clock"] = clock
    cache = ResponseCache(tmp_path / "cache.db", **opts)
    cache.open()
    return cache


def run_child(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# -- keys ------------------------------------------------------------------------------------

BASE = {"prompt": "hi", "max_tokens": 16, "temperature": 0.0, "stop": ["\n"], "opts": {"a": 1, "b": 2}}


def test_key_ignores_dict_order_at_every_level() -> None:
    shuffled = {
        "opts": {"b": 2, "a": 1},
        "stop": ["\n"],
        "temperature": 0.0,
        "max_tokens": 16,
        "prompt": "hi",
    }
    assert cache_key("m@1", BASE) == cache_key("m@1", shuffled)
    assert len(cache_key("m@1", BASE)) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "hi "},
        {"max_tokens": 17},
        {"temperature": 0.1},
        {"temperature": 0},  # JSON-level canonical form: 0 and 0.0 differ (a miss, never a wrong hit)
        {"stop": ["\n", "."]},
        {"opts": {"a": 1, "b": 3}},
        {"opts": {"a": 1}},
        {"seed": 1},
    ],
)
def test_any_parameter_change_changes_the_key(change: dict[str, Any]) -> None:
    assert cache_key("m@1", BASE) != cache_key("m@1", {**BASE, **change})


def test_model_identity_and_blobs_are_part_of_the_key() -> None:
    key = cache_key("m@sha-1", BASE, [b"ab", b"c"])
    assert key != cache_key("m@sha-2", BASE, [b"ab", b"c"])  # same model, new artefacts
    assert key != cache_key("m@sha-1", BASE, [b"a", b"bc"])  # blob boundaries matter
    assert key != cache_key("m@sha-1", BASE, [b"ab", b"d"])
    assert key != cache_key("m@sha-1", BASE)
    assert key == cache_key("m@sha-1", dict(reversed(list(BASE.items()))), (b"ab", b"c"))


def test_key_rejects_values_json_cannot_encode() -> None:
    with pytest.raises(TypeError):
        cache_key("m", {"image": b"raw"})  # binary goes in blobs
    with pytest.raises(ValueError):
        cache_key("m", {"temperature": float("nan")})


# -- basic behaviour -------------------------------------------------------------------------


async def test_put_flush_get_roundtrip(tmp_path: Path) -> None:
    clock = FakeClock()
    cache = make(tmp_path, clock)
    assert await cache.get("k") is None
    cache.put("k", "gpt", b'{"answer": 42}', "application/json")
    assert await cache.flush() is True
    clock.now += 2.5
    assert await cache.get("k") == CacheHit(b'{"answer": 42}', "application/json", "gpt", 2.5, True)
    assert await cache.put_and_wait("k", "gpt", b"v2", "text/plain") is True  # replace, not add
    stats = cache.stats()
    assert (stats["entries"], stats["hits"], stats["misses"], stats["enabled"]) == (1, 1, 1, True)
    assert stats["bytes"] == len("k") + len("gpt") + len(b"v2") + len("text/plain")
    await cache.close()
    assert cache.stats()["enabled"] is False
    cache.put("after", "gpt", b"v", "text/plain")  # closed: a silent no-op
    assert await cache.flush() is False
    assert await cache.get("k") is None


async def test_close_commits_queued_puts_and_a_reopen_finds_them(tmp_path: Path) -> None:
    cache = make(tmp_path)
    for i in range(50):
        cache.put(f"k{i}", "m", b"v%d" % i, "text/plain")
    await cache.close()
    assert (
        not Path(f"{tmp_path / 'cache.db'}-wal").exists()
        or os.path.getsize(f"{tmp_path / 'cache.db'}-wal") == 0
    )
    async with ResponseCache(tmp_path / "cache.db", max_bytes=1 << 20, ttl_s=60, max_stale_s=0) as again:
        hit = await again.get("k49")
        assert hit is not None and hit.value == b"v49"
        assert again.stats()["entries"] == 50


async def test_ttl_fresh_then_stale_then_gone(tmp_path: Path) -> None:
    clock = FakeClock()
    events: list[tuple[str, int]] = []
    cache = make(tmp_path, clock, ttl_s=10.0, max_stale_s=20.0, on_event=lambda e, n: events.append((e, n)))
    await cache.put_and_wait("k", "m", b"v", "text/plain")
    clock.now += 10.0
    hit = await cache.get("k")
    assert hit is not None and hit.fresh and hit.age_s == 10.0
    clock.now += 0.5
    hit = await cache.get("k")
    assert hit is not None and not hit.fresh
    clock.now += 19.5  # age 30 = ttl + max_stale: still served stale
    assert (await cache.get("k")) is not None
    clock.now += 0.5
    assert await cache.get("k") is None
    assert cache.stats()["entries"] == 1  # lazily expired: the row waits for a sweep
    assert await cache.expire() == 1
    stats = cache.stats()
    assert (stats["entries"], stats["bytes"], stats["expired"]) == (0, 0, 1)
    assert (stats["hits"], stats["stale_hits"], stats["misses"]) == (1, 2, 1)
    assert [e for e, _ in events] == ["hit", "stale", "stale", "miss", "expired"]
    await cache.close()


async def test_a_backwards_clock_step_never_gives_a_negative_age(tmp_path: Path) -> None:
    clock = FakeClock()
    cache = make(tmp_path, clock)
    await cache.put_and_wait("k", "m", b"v", "text/plain")
    clock.now -= 3600
    hit = await cache.get("k")
    assert hit is not None and hit.age_s == 0.0 and hit.fresh
    await cache.close()


async def test_lru_eviction_by_bytes_keeps_recently_read_entries(tmp_path: Path) -> None:
    clock = FakeClock()
    # Each entry is 1 000 value bytes + 1 key + 1 model + 10 content-type = 1 012 bytes.
    cache = make(tmp_path, clock, max_bytes=4000)
    for key in "abc":
        clock.now += 1
        cache.put(key, "m", b"x" * 1000, "text/plain")
    assert await cache.flush()
    clock.now += 1
    assert await cache.get("a") is not None  # a is now more recent than b and c
    clock.now += 1
    cache.put("d", "m", b"x" * 1000, "text/plain")  # 4 048 > 4 000: evict down to 90 %
    assert await cache.flush()
    assert await cache.get("b") is None
    for key in "acd":
        assert await cache.get(key) is not None, key
    stats = cache.stats()
    assert (stats["entries"], stats["evictions"]) == (3, 1)
    assert stats["bytes"] <= 0.9 * 4000
    await cache.close()


async def test_an_entry_larger_than_the_whole_cache_is_not_stored(tmp_path: Path) -> None:
    cache = make(tmp_path, max_bytes=1000)
    cache.put("small", "m", b"x" * 10, "text/plain")
    cache.put("huge", "m", b"x" * 5000, "text/plain")
    assert await cache.flush()
    assert await cache.get("huge") is None
    assert await cache.get("small") is not None
    assert cache.stats()["dropped"] == 1
    await cache.close()


async def test_purge_by_model_and_all(tmp_path: Path) -> None:
    cache = make(tmp_path)
    for i in range(3):
        cache.put(f"a{i}", "alpha", b"v", "text/plain")
    for i in range(2):
        cache.put(f"b{i}", "beta", b"v", "text/plain")
    assert await cache.purge("alpha") == 3
    assert await cache.get("a0") is None
    assert await cache.get("b0") is not None
    assert await cache.purge("nope") == 0
    assert await cache.purge() == 2
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0
    await cache.close()


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_synchronous_setting_is_applied(tmp_path: Path, synchronous: str) -> None:
    cache = make(tmp_path, synchronous=synchronous.lower())
    await cache.put_and_wait("k", "m", b"v", "text/plain")
    conn = sqlite3.connect(tmp_path / "cache.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert cache.synchronous == synchronous
    await cache.close()
    with pytest.raises(ValueError, match="synchronous"):
        ResponseCache(tmp_path / "x.db", max_bytes=1, ttl_s=1, max_stale_s=0, synchronous="OFF")


# -- damage and failure ----------------------------------------------------------------------


def corrupt_header(path: Path) -> None:
    with path.open("r+b") as f:
        f.write(b"this is not an sqlite file")


def corrupt_btree(path: Path) -> None:
    with path.open("r+b") as f:  # page 2 onwards: table and index b-tree pages
        f.seek(4096)
        f.write(os.urandom(3 * 4096))


@pytest.mark.parametrize("damage", [corrupt_header, corrupt_btree])
async def test_corrupt_file_is_moved_aside_and_a_fresh_cache_works(
    tmp_path: Path, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(tmp_path)
    for i in range(200):
        cache.put(f"k{i}", "m", os.urandom(100), "application/octet-stream")
    await cache.close()
    db = tmp_path / "cache.db"
    damage(db)
    damaged = db.read_bytes()

    with caplog.at_level(logging.WARNING, logger="appliance.cache"):
        cache = make(tmp_path)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("cache.db.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged  # kept intact for forensics
    assert any("moved aside" in r.getMessage() and str(aside[0]) in r.getMessage() for r in caplog.records)
    assert cache.stats()["entries"] == 0 and cache.enabled
    assert await cache.put_and_wait("new", "m", b"v", "text/plain")
    assert await cache.get("new") is not None
    await cache.close()
    assert integrity(db) == "ok"


async def test_garbage_wal_is_moved_aside_and_the_database_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(tmp_path)
    await cache.put_and_wait("k", "m", b"v", "text/plain")
    await cache.close()
    wal = Path(f"{tmp_path / 'cache.db'}-wal")
    wal.write_bytes(os.urandom(8192))
    with caplog.at_level(logging.WARNING, logger="appliance.cache"):
        cache = make(tmp_path)
    assert any("-wal file" in r.getMessage() for r in caplog.records)
    aside = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].endswith("-wal")
    assert await cache.get("k") is not None  # the committed entry survived
    await cache.close()


async def test_a_value_changed_on_disk_is_a_miss_deleted_and_counted(tmp_path: Path) -> None:
    """A bit flip inside a stored value leaves every page well formed, so the integrity check at
    open passes it, and it was served as is. Each value's checksum is checked on read: the entry
    is a miss, counted as corrupt, and deleted, so the next put stores it again."""
    cache = make(tmp_path)
    assert await cache.put_and_wait("k", "m", b'{"embedding": [0.25]}', "application/json")
    assert await cache.put_and_wait("other", "m", b"fine", "text/plain")
    other = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
    value = other.execute("SELECT value FROM entries WHERE key = 'k'").fetchone()[0]
    flipped = bytes([value[0] ^ 0x01]) + value[1:]
    other.execute("UPDATE entries SET value = ? WHERE key = 'k'", (flipped,))
    assert await cache.get("k") is None
    stats = cache.stats()
    assert (stats["corrupt"], stats["misses"], stats["hits"]) == (1, 1, 0)
    assert await cache.flush()
    assert other.execute("SELECT COUNT(*) FROM entries WHERE key = 'k'").fetchone() == (0,)
    other.close()
    assert cache.stats()["entries"] == 1
    got = await cache.get("other")
    assert got is not None and got.value == b"fine"  # its neighbours are served as before
    assert await cache.put_and_wait("k", "m", b'{"embedding": [0.25]}', "application/json")
    got = await cache.get("k")
    assert got is not None and got.value == b'{"embedding": [0.25]}' and cache.stats()["corrupt"] == 1
    await cache.close()


@pytest.mark.parametrize("version", [1, 0])
async def test_a_file_of_the_layout_without_checksums_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, version: int
) -> None:
    """A cache written before values had checksums (user_version 1) has nothing to check its values
    against: it starts empty in place, not moved aside as corrupt. So does one whose version was
    never stamped (0: a crash between creating the table and stamping it), which was kept, stamped
    2, and had every put fail and the cache switched off, at every start."""
    conn = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
    conn.execute(
        "CREATE TABLE entries (key TEXT PRIMARY KEY, model TEXT NOT NULL, content_type TEXT NOT NULL,"
        " value BLOB NOT NULL, size INTEGER NOT NULL, created_at FLOAT NOT NULL, last_access FLOAT NOT NULL)"
    )
    conn.execute("INSERT INTO entries VALUES ('k', 'm', 'text/plain', x'00', 5, 1e9, 1e9)")
    conn.execute(f"PRAGMA user_version={version}")
    conn.close()
    with caplog.at_level(logging.WARNING, logger="appliance.cache"):
        cache = make(tmp_path)
    assert not caplog.records and not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert cache.enabled and cache.stats()["entries"] == 0
    assert await cache.get("k") is None
    assert await cache.put_and_wait("k", "m", b"v", "text/plain")
    got = await cache.get("k")
    assert got is not None and got.value == b"v"
    await cache.close()


async def test_reader_io_error_switches_the_cache_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(tmp_path)
    await cache.put_and_wait("k", "m", b"v", "text/plain")

    def broken_connect(*_: object, **__: object) -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")

    # Readers connect lazily on their first get(), so this stands in for an I/O error there.
    monkeypatch.setattr(sqlite3, "connect", broken_connect)
    with caplog.at_level(logging.WARNING, logger="appliance.cache"):
        assert await cache.get("k") is None
        assert await cache.get("k") is None
    monkeypatch.undo()
    cache.put("k2", "m", b"v", "text/plain")  # a no-op now
    assert await cache.flush() is False
    stats = cache.stats()
    assert (stats["enabled"], stats["read_errors"]) == (False, 1)
    assert sum("switched OFF" in r.getMessage() for r in caplog.records) == 1
    await cache.close()


async def test_a_lock_held_by_another_process_drops_writes_and_keeps_the_cache_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLITE_BUSY is a wait that ran out, not a broken file: a BEGIN EXCLUSIVE held for 20 s by
    ``sqlite3`` in a shell switched the cache off until the next restart. The writes made while it
    is held are dropped and counted (one per writer batch); once it is gone, the cache stores and serves again."""
    monkeypatch.setattr(cache_module, "BUSY_TIMEOUT_S", 0.2)
    cache = make(tmp_path)
    other = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with caplog.at_level(logging.INFO, logger="appliance.cache"):
        for i in range(2):
            cache.put(f"locked{i}", "m", b"v", "text/plain")
            assert await cache.flush() is False
        other.execute("ROLLBACK")
        other.close()
        assert await cache.put_and_wait("k", "m", b"v", "text/plain") is True
    hit = await cache.get("k")
    assert hit is not None and hit.value == b"v"
    assert await cache.get("locked0") is None
    stats = cache.stats()
    assert stats["enabled"] is True and stats["busy_writes"] == 2 and stats["write_errors"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert not any("switched OFF" in m for m in messages)
    assert sum("locked by another connection" in m for m in messages) == 1  # one per spell
    assert any("writable again" in m for m in messages)
    await cache.close()


async def eventually_reopened(cache: ResponseCache, times: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while cache.stats()["reopens"] < times and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert cache.stats()["reopens"] >= times and cache.enabled, cache.stats()


def stored(db: Path, key: str) -> bool:
    """Whether ``key`` is in the file at ``db`` (a new connection: what a restart would find)."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None
    finally:
        conn.close()


@pytest.mark.parametrize("removed", ["db", "wal", "folder"])
async def test_a_file_removed_under_the_open_cache_is_set_up_again_at_once(
    tmp_path: Path, removed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``rm cache.db*``, ``rm cache.db-wal cache.db-shm``, or the data folder deleted while the
    server runs: SQLite went on writing to the unlinked inodes, the cache said it was on and held
    N entries, and every entry written since was lost at the next restart (the removed -wal's ones
    too). The writer notices within a second that the files at the path are not its own, switches
    the cache off and sets it up again from the path at once: what it writes then is on disk."""
    folder = tmp_path / "data"
    cache = make(folder)
    db = folder / "cache.db"
    assert await cache.put_and_wait("before", "m", b"v", "text/plain")
    assert await cache.get("before") is not None  # a reader holds its connection, -shm mapped
    with caplog.at_level(logging.WARNING, logger="appliance.cache"):
        if removed == "folder":
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
        else:
            for suffix in ("-wal", "-shm") if removed == "wal" else ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink()
        await eventually_reopened(cache)
    assert await cache.put_and_wait("after", "m", b"v", "text/plain") is True
    hit = await cache.get("after")
    assert hit is not None and hit.value == b"v"
    assert stored(db, "after")
    # A removed -wal's entries were checkpointed into the database still at the path.
    assert stored(db, "before") is (removed == "wal")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("switched OFF" in m for m in messages) == 1 and sum("back ON" in m for m in messages) == 1
    await cache.close()


async def test_a_cache_switched_off_by_corruption_comes_back_with_a_fresh_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corruption found at run time (the file overwritten in place) switched the cache off until
    the process restarted. After RETRY_S the writer opens the file again as open() does: the
    corrupt file is moved aside, a fresh one serves, with no restart."""
    monkeypatch.setattr(cache_module, "RETRY_S", 0.2)
    cache = make(tmp_path)
    db = tmp_path / "cache.db"
    for i in range(20):
        cache.put(f"k{i}", "m", os.urandom(3000), "application/octet-stream")
    assert await cache.flush()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the database file itself
    other.close()
    with db.open("r+b") as f:  # the header kept, every later page garbage
        f.seek(4096)
        f.write(os.urandom(db.stat().st_size - 4096))
    assert await cache.get("k3") is None
    assert cache.stats()["enabled"] is False and cache.stats()["read_errors"] == 1
    await eventually_reopened(cache)
    assert [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert cache.stats()["entries"] == 0
    assert await cache.put_and_wait("k", "m", b"v", "text/plain") is True
    hit = await cache.get("k")
    assert hit is not None and hit.value == b"v"
    await cache.close()


async def test_a_cache_that_cannot_open_at_start_up_comes_on_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data folder that cannot be made at start-up (here a file stands at its path) left the
    cache off until a restart. The writer tries again after RETRY_S, doubling while it fails."""
    monkeypatch.setattr(cache_module, "RETRY_S", 0.2)
    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    cache = make(blocker)
    assert not cache.enabled and cache.writer_alive()
    cache.put("k", "m", b"v", "text/plain")  # a no-op
    assert await cache.flush() is False
    blocker.unlink()
    await eventually_reopened(cache)
    assert await cache.put_and_wait("k", "m", b"v", "text/plain") is True
    assert stored(blocker / "cache.db", "k")
    await cache.close()


async def test_a_file_locked_at_start_up_is_not_taken_for_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open()'s integrity check took any SQLite error for corruption: a file another process held
    locked (a backup tool with an exclusive lock) was moved aside as corrupt, its entries gone.
    It is not a corrupt file: the cache starts off, and once the lock is gone comes on with them."""
    monkeypatch.setattr(cache_module, "BUSY_TIMEOUT_S", 0.2)
    monkeypatch.setattr(cache_module, "RETRY_S", 0.2)
    first = make(tmp_path)
    assert await first.put_and_wait("k", "m", b"v", "text/plain")
    await first.close()
    other = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")  # held until ROLLBACK: no other connection may even read
    cache = make(tmp_path)
    assert not cache.enabled
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    other.execute("ROLLBACK")
    other.close()
    await eventually_reopened(cache)
    hit = await cache.get("k")
    assert hit is not None and hit.value == b"v"
    await cache.close()


DISK_FULL_CHILD = r"""
import asyncio, json, logging, os, resource, signal, sys
from pathlib import Path
from appliance.cache import ResponseCache

logging.basicConfig(level=logging.WARNING)

async def main() -> None:
    path = Path(sys.argv[1])
    cache = ResponseCache(path, max_bytes=1 << 30, ttl_s=60, max_stale_s=60, synchronous="FULL")
    cache.open()
    before = await cache.put_and_wait("before", "m", b"kept", "text/plain")
    # From here on no file of this process may grow past 64 KiB more than the -wal is now.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of EFBIG
    limit = max(os.path.getsize(path), os.path.getsize(f"{path}-wal")) + 65536
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    for i in range(100):
        cache.put(f"k{i}", "m", os.urandom(4096), "application/octet-stream")
    flushed = await cache.flush()
    after_get = await cache.get("before")
    cache.put("late", "m", b"v", "text/plain")
    late_flush = await cache.flush()
    await cache.close()
    print(json.dumps({"before": before, "flushed": flushed, "after_get": after_get is None,
                      "late_flush": late_flush, "stats": cache.stats()}))

asyncio.run(main())
"""


def test_disk_full_switches_the_cache_off_without_raising(tmp_path: Path) -> None:
    # Disk full is simulated with RLIMIT_FSIZE in a child process: the kernel then fails
    # write() with EFBIG, so SQLite sees a real I/O error on the real code path (no mocks), and
    # the limit cannot touch the test runner's own files. PRAGMA max_page_count would only
    # exercise SQLite's own SQLITE_FULL check, never an OS write failure.
    db = tmp_path / "cache.db"
    proc = run_child(DISK_FULL_CHILD, str(db))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["before"] is True
    assert out["flushed"] is False and out["late_flush"] is False
    assert out["after_get"] is True  # off: every get() is a miss
    assert out["stats"]["enabled"] is False and out["stats"]["write_errors"] == 1
    assert proc.stderr.count("switched OFF") == 1
    assert "Traceback" not in proc.stderr
    assert integrity(db) == "ok"  # what was committed before the failure is intact
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM entries WHERE key = 'before'").fetchone() == (b"kept",)
    conn.close()


CRASH_CHILD = r"""
import asyncio, sys
from pathlib import Path
from appliance.cache import ResponseCache

async def main() -> None:
    cache = ResponseCache(Path(sys.argv[1]), max_bytes=1 << 30, ttl_s=3600, max_stale_s=0,
                          synchronous=sys.argv[2])
    cache.open()
    i = int(sys.argv[3])
    while True:
        keys = [f"k{i + j}" for j in range(1 + i % 5)]
        for key in keys:
            cache.put(key, "m", key.encode() * 64, "text/plain")
        if not await cache.flush():
            sys.exit(3)
        print(" ".join(keys), flush=True)  # acknowledged: only now may the parent rely on them
        i += len(keys)

asyncio.run(main())
"""


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_acknowledged_entries_survive_sigkill(tmp_path: Path, synchronous: str) -> None:
    db = tmp_path / "cache.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    acked: list[str] = []
    rng = random.Random(1234)
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(db), synchronous, str(round_ * 1_000_000)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        target, deadline = rng.randint(5, 60), time.monotonic() + 20
        lines = 0
        while lines < target and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked += line.split()
            lines += 1
        time.sleep(rng.random() * 0.05)  # land the kill at a random point of a batch
        child.send_signal(signal.SIGKILL)
        acked += child.stdout.read().split()  # acks printed before the kill count too
        child.wait()
        assert child.returncode == -signal.SIGKILL
        assert lines == target, "the child stopped acknowledging before the kill"

        assert integrity(db) == "ok"
        conn = sqlite3.connect(db)
        stored = {row[0] for row in conn.execute("SELECT key FROM entries")}
        conn.close()
        missing = [k for k in acked if k not in stored]
        assert not missing, f"round {round_}: {len(missing)} acknowledged entries lost: {missing[:5]}"
    assert len(acked) > 20


async def test_a_waiter_that_hangs_up_never_kills_the_writer(tmp_path: Path) -> None:
    """A client that disconnects cancels the future it waits on; the writer resolving it later
    must shrug that off (it used to die, stranding every later waiter)."""
    async with ResponseCache(
        tmp_path / "c.db", max_bytes=1 << 20, ttl_s=60, max_stale_s=0, synchronous="FULL"
    ) as cache:
        waits = [asyncio.ensure_future(cache.put_and_wait(f"k{i}", "m", b"v", "t")) for i in range(200)]
        await asyncio.sleep(0)
        for w in waits:
            w.cancel()  # every client hangs up while its entry is being committed
        await asyncio.gather(*waits, return_exceptions=True)
        assert await asyncio.wait_for(cache.put_and_wait("after", "m", b"v", "t"), 5) is True
        assert cache.writer_alive()
        hit = await cache.get("after")
        assert hit is not None and hit.value == b"v"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_dead_writer_fails_waiters_fast_and_can_be_restarted(tmp_path: Path) -> None:
    """A bug past the writer loop's own guard (injected: a BaseException from a batch) kills the
    thread; waiters get "not stored" at once instead of hanging, and restart_writer() revives it."""

    class Injected(BaseException):
        pass

    cache = ResponseCache(tmp_path / "c.db", max_bytes=1 << 20, ttl_s=60, max_stale_s=0, synchronous="FULL")
    cache.open()
    original = cache._apply
    calls = {"n": 0}

    def dying(batch: Any, sweep: bool) -> Any:
        calls["n"] += 1
        if calls["n"] == 1 and batch:
            raise Injected("injected writer death")
        return original(batch, sweep)

    cache._apply = dying  # type: ignore[method-assign]
    first = await asyncio.wait_for(cache.put_and_wait("k", "m", b"v", "t"), 5)
    assert first is False  # answered "not stored", not left waiting
    for _ in range(100):
        if not cache.writer_alive():
            break
        await asyncio.sleep(0.01)
    assert not cache.writer_alive()
    assert await asyncio.wait_for(cache.put_and_wait("k2", "m", b"v", "t"), 1) is False  # fails fast
    cache.restart_writer()
    assert cache.writer_alive()
    assert await asyncio.wait_for(cache.put_and_wait("k3", "m", b"v", "t"), 5) is True
    await asyncio.wait_for(cache.close(), 10)


def test_metrics_report_an_empty_cache_while_it_is_switched_off(
    start_server: Any, minilm_folder: Path
) -> None:
    """A scrape while the response cache is off (here the supervisor gave up on its writer, as
    ``switch_off`` does) must not report entries it no longer serves: the gauges kept the file's
    last counts, so a dashboard showed a full cache beside ``appliance_cache_enabled 0``. Off
    reads 0 (Prometheus' advice: export 0 rather than drop a series), as the admin stats do."""
    from appliance.api.common import RESILIENCE
    from tests.conftest import metric

    model = "all-minilm-l6-v2"
    srv = start_server({model: minilm_folder})
    for text in ("one", "two"):
        assert srv.post("/v1/embeddings", {"model": model, "input": text})[0] == 200
    cache = srv.app[RESILIENCE].cache
    assert srv.call(lambda: cache.flush()) is True
    assert metric(srv, "appliance_cache_entries ") == 2 and metric(srv, "appliance_cache_bytes ") > 0
    srv.call(lambda: cache.switch_off("injected for the test"))
    assert metric(srv, "appliance_cache_enabled ") == 0
    assert metric(srv, "appliance_cache_entries ") == 0
    assert metric(srv, "appliance_cache_bytes ") == 0
    from tests.test_admin import admin

    status, stats = admin(srv, "GET", "/admin/stats")
    assert status == 200 and stats["cache"]["entries"] == 0 and stats["cache"]["bytes"] == 0, stats
