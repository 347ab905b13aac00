"""SQLite response cache: the breaker's fallback and a plain response cache.

Threading model (``reliability-anchors.md`` §3.3): ONE writer thread owns the only write
connection and applies queued puts, hit bookkeeping, purges, expiry and LRU eviction in batched
transactions; reads run on a small thread pool, one read-only connection per thread (WAL lets
them read while the writer writes). The event loop never waits on a write.

Durability of an acknowledged entry (``flush()`` / ``put_and_wait()`` returned True):

* ``synchronous="NORMAL"`` (default): WAL without a sync per commit. Survives a crash or SIGKILL of
  the process, but the last commits may be lost on power loss or a kernel crash. The file is never
  corrupted either way. Right for a cache: a lost entry is only a miss.
* ``synchronous="FULL"``: the WAL is fsynced on every commit, so an acknowledged entry also
  survives power loss (as far as the disk honours flushes). Costs one fsync per writer batch.

Each value is stored with its CRC-32 and checked on every read: a value changed on disk (a bit
flip in the BLOB, which ``PRAGMA integrity_check`` does not see) is a miss, counted as
``corrupt``, and deleted, never served.

Any other SQLite or OS error (disk full, EFBIG, I/O error, corruption found at run time) switches
the cache off with one warning: ``get()`` then returns None, ``put()`` does nothing, serving goes
on. So does the file being removed or replaced under the open connections (``rm``, the data
folder deleted, its ``-wal`` or ``-shm`` removed): SQLite would go on writing to the unlinked
inodes, every entry lost at the next restart and a reader opened meanwhile seeing another file.
The writer thread then opens the file again as ``open()`` does (a corrupt one moved aside): at
once for a removed file, else after ``RETRY_S``, doubling up to ``RETRY_MAX_S`` while it fails.
So the cache comes back on its own once the disk has room again, the folder is writable again
or the file is gone (it used to stay off until the process restarted); likewise a cache that
could not open at start-up. Only ``switch_off()`` (the supervisor gave up on the writer) is for good. A lock held by
another process (``sqlite3`` in a shell, a backup) is not such an error: past ``BUSY_TIMEOUT_S``
a read is a miss and a write batch is dropped (counted in ``busy_writes``, warned once per spell),
and the cache goes on as soon as the lock is gone (switched off for it, a lock of a few seconds
kept the cache off until the next restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from appliance.timeouts import within

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: a checksum per value
_OLD_VERSIONS = (1,)  # layouts open() empties into this one (a lost entry is only a miss)
_EVICT_TO = 0.9  # evict down to 90 % of max_bytes, so eviction scans run once per 10 % of turnover
_BATCH_MAX = 256  # ops per writer transaction (group commit amortises FULL's fsync)
_IDLE_TICK_S = 1.0  # the writer wakes this often to write buffered hit times
_SWEEP_EVERY_S = 60.0
_WAL_MAGIC = (0x377F0682, 0x377F0683)
CLOSE_TIMEOUT_S = 5.0
BUSY_TIMEOUT_S = 5.0  # how long a connection waits for another one's lock before SQLITE_BUSY
# How long purge(), expire() and flush() wait for the writer: a wedged disk (or a writer stuck
# in a batch) held POST /admin/cache/purge open forever while /readyz said 200.
REQUEST_TIMEOUT_S = 10.0
# The writer completes a loop at least every _IDLE_TICK_S, even idle; silent this long, it is stuck.
STALL_S = 30.0
# A cache switched off by a fault opens its file again after this long, doubling to RETRY_MAX_S
# while it keeps failing (a disk still full would otherwise warn every RETRY_S).
RETRY_S = 30.0
RETRY_MAX_S = 300.0
_WATCH_EVERY_S = 1.0  # how often the writer checks that its files are still the ones at the path
_BUSY_CODES = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary codes; extended ones carry them in the low byte)
_BUSY_MESSAGES = ("database is locked", "database table is locked")  # their sqlite3_errstr() texts

CacheEventHook = Callable[[str, int], None]


def cache_key(model_identity: str, request: Mapping[str, Any], blobs: Sequence[bytes] = ()) -> str:
    """Hex SHA-256 of the model identity, the canonical JSON of ``request`` and ``blobs``.

    ``model_identity`` must change whenever the answer could (model name + digest of its
    artefacts). Canonical JSON = sorted keys, no whitespace, so dict order does not matter.
    Canonicalisation is JSON-level on purpose: ``1`` and ``1.0`` give different keys. A spurious
    miss is harmless, a wrong hit is not. Every part is length-prefixed, so no two different
    inputs concatenate to the same bytes. Raises TypeError for values JSON cannot encode; pass
    binary inputs (images, tensors) as ``blobs``.
    """
    canonical = json.dumps(
        request, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    digest = hashlib.sha256()
    for part in (model_identity.encode(), canonical.encode(), *blobs):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheHit:
    value: bytes
    content_type: str
    model: str
    age_s: float
    fresh: bool  # False: older than ttl_s but within max_stale_s (fallback use only)


@dataclass(slots=True)
class _Op:
    kind: str  # put | flush | purge | expire | drop (a corrupt entry: key, created_at) | stop
    future: Future[Any] | None = None
    key: str = ""
    model: str | None = None
    value: bytes = b""
    content_type: str = ""
    created_at: float = 0.0


# What each op's future gets when its work was not done (cache off or failed).
# What a waiter gets when its op was not carried out (the cache is off, the writer died, another
# process held the file's lock): a purge or expiry that did nothing is None, not "0 deleted".
_FAILED = {"put": False, "flush": False, "stop": False, "purge": None, "expire": None, "drop": 0}


class ResponseCache:
    """Size-bounded (LRU) TTL cache of responses in one SQLite file. See the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        ttl_s: float,
        max_stale_s: float,
        synchronous: str = "NORMAL",
        reader_threads: int = 2,
        max_pending_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.time,
        on_event: CacheEventHook | None = None,
    ) -> None:
        """``on_event(event, count)`` gets hit, stale, miss, corrupt (on the event loop) and
        eviction, expired, busy_write, disabled, reopen (on the writer thread): feed thread-safe counters,
        never block.
        """
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        if max_bytes <= 0 or ttl_s <= 0 or max_stale_s < 0 or reader_threads < 1:
            raise ValueError("need max_bytes > 0, ttl_s > 0, max_stale_s >= 0, reader_threads >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_stale_s = max_stale_s
        self.synchronous = synchronous.upper()
        self._reader_threads = reader_threads
        self._max_pending_bytes = max_pending_bytes
        self._clock = clock  # wall clock: ages must survive restarts, so monotonic will not do
        self._on_event = on_event
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._enabled = False
        self._closed = False
        self._given_up = False  # switch_off(): off for good, never opened again
        self._retry_s = RETRY_S
        self._retry_at = float("inf")  # when the writer next tries to open a cache switched off
        self._generation = 0  # bumped when the writer opens the file again: readers reconnect
        self._identity: dict[Path, tuple[int, int]] = {}  # (device, inode) of db, -wal, -shm
        self._watched = 0.0
        self._busy_spell = False  # the writer found the file locked and has not committed since
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._pending_bytes = 0
        self._touches: dict[str, float] = {}
        self._entries = 0
        self._bytes = 0
        self._writer: threading.Thread | None = None
        self._beat = time.monotonic()  # when the writer last completed a loop (stats: a stall)
        self._current: list[_Op] = []
        self._wconn: sqlite3.Connection | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []

    # -- life cycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Check the file, set it up and start the writer. Blocking: integrity_check reads every page.

        Never raises for a bad or unwritable file: a corrupt one is moved aside and replaced, and
        if even a fresh one cannot be created the cache stays off (logged).
        """
        try:
            self._wconn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            # The writer still starts: it tries again in RETRY_S (a folder made writable, a disk
            # given room), so the cache comes on without a restart.
            self._retry_at = time.monotonic() + self._retry_s
            log.warning(
                "response cache %s unavailable, serving without it (trying again in %g s): %s",
                self.path,
                self._retry_s,
                exc,
            )
        else:
            self._enabled = True
        self._readers = ThreadPoolExecutor(self._reader_threads, thread_name_prefix="cache-read")
        self._start_writer()

    def _connect(self) -> sqlite3.Connection:
        """Check the file (moving a corrupt one aside), set it up, remember which inodes it is."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._quarantine_bad_files()
        conn = self._setup_writer()
        self._identity = {f: ident for f in self._files() if (ident := _identity(f)) is not None}
        return conn

    def _files(self) -> tuple[Path, Path, Path]:
        return self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")

    def _start_writer(self) -> None:
        self._beat = time.monotonic()
        self._writer = threading.Thread(target=self._writer_main, name="cache-writer", daemon=True)
        self._writer.start()

    def _writer_main(self) -> None:
        try:
            self._writer_loop()
        except BaseException:
            # A bug past the loop's own guard: everything queued is answered "not stored" so that
            # nobody waits on a dead thread, and the supervisor sees writer_alive() go False.
            log.exception("response cache writer thread died")
            for op in self._current:
                _resolve(op.future, _FAILED[op.kind])
            with contextlib.suppress(queue.Empty):
                while True:
                    op = self._queue.get_nowait()
                    _resolve(op.future, _FAILED[op.kind])
            raise

    def writer_alive(self) -> bool:
        """False when the writer thread died while the cache is open (the supervisor restarts it),
        also while the cache is off: the writer is what opens it again."""
        if self._closed or self._given_up or self._writer is None:
            return True
        return self._writer.is_alive()

    def restart_writer(self) -> None:
        if self.writer_alive():
            return
        log.warning("response cache %s: restarting the writer thread", self.path)
        self._start_writer()

    def _quarantine_bad_files(self) -> None:
        wal = Path(f"{self.path}-wal")
        if wal.exists() and wal.stat().st_size > 0 and not _wal_header_ok(wal):
            # SQLite would silently ignore it; keep it for forensics, but out of the way.
            self._move_aside([wal], "the -wal file has no valid WAL header", "keeping the database")
        if not self.path.exists():
            return
        problem = None
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                rows = conn.execute("PRAGMA integrity_check").fetchall()
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            finally:
                conn.close()
            if rows != [("ok",)]:
                problem = "integrity_check: " + "; ".join(str(r[0]) for r in rows[:5])
            elif version not in (0, *_OLD_VERSIONS, SCHEMA_VERSION):
                problem = f"schema version {version}, expected {SCHEMA_VERSION}"
        except sqlite3.OperationalError:
            # Locked by another process, unreadable, an I/O error: not a corrupt file, and
            # moving it aside would throw away a good cache. open() fails; the writer retries.
            raise
        except sqlite3.DatabaseError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            self._move_aside([self.path, wal], problem, "starting an empty cache")

    def _move_aside(self, files: list[Path], problem: str, outcome: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists() or Path(f"{aside}-wal").exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        for f in files:
            if f.exists():
                # db and -wal keep their pairing, so sqlite3 on the aside file replays its WAL.
                os.replace(f, Path(str(f).replace(str(self.path), str(aside), 1)))
        Path(f"{self.path}-shm").unlink(missing_ok=True)  # volatile index, rebuilt on open
        log.warning(
            "response cache %s failed its start-up check (%s): moved aside to %s, %s",
            self.path,
            problem,
            aside,
            outcome,
        )

    def _setup_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
        )
        try:
            db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
            db.enable_wal()
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA journal_size_limit=67108864")  # cap the -wal left after a checkpoint
            # By layout, not only by version: a file at version 0 may hold an entries table
            # already (a crash between creating it and stamping the version), which if_not_exists
            # below would keep, stamped as the current layout, its first put failing for good.
            old = conn.execute("PRAGMA user_version").fetchone()[0] in _OLD_VERSIONS
            if old or ("entries" in db.table_names() and "checksum" not in db["entries"].columns_dict):
                # Their values have no checksum to check: a cache can start empty instead.
                log.info("response cache %s: older layout, starting it empty", self.path)
                conn.execute("DROP TABLE IF EXISTS entries")
            table = db.table("entries")
            table.create(
                {
                    "key": str,
                    "model": str,
                    "content_type": str,
                    "value": bytes,
                    "checksum": int,
                    "size": int,
                    "created_at": float,
                    "last_access": float,
                },
                pk="key",
                not_null=["model", "content_type", "value", "checksum", "size", "created_at", "last_access"],
                if_not_exists=True,
            )
            for column in ("last_access", "created_at", "model"):
                table.create_index([column], if_not_exists=True)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._entries, self._bytes = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries"
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Stop reads, commit everything queued, checkpoint and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._readers is not None:
            # Readers go first so the writer is the last connection and can truncate the WAL.
            await loop.run_in_executor(None, self._readers.shutdown)
            for conn in self._reader_conns:
                conn.close()
        if self._writer is not None and self._writer.is_alive():
            future: Future[Any] = Future()
            self._queue.put(_Op("stop", future))
            # Bounded: a wedged disk must not hold the shutdown past systemd's stop timeout.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.wrap_future(future), CLOSE_TIMEOUT_S)
            await loop.run_in_executor(None, self._writer.join, CLOSE_TIMEOUT_S)

    async def __aenter__(self) -> ResponseCache:
        self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def enabled(self) -> bool:
        return self._enabled and not self._closed

    # -- reads -------------------------------------------------------------------------------

    async def get(self, key: str) -> CacheHit | None:
        """Fresh or stale hit, or None (miss, expired, or cache off). Never raises for I/O errors."""
        if not self.enabled or self._readers is None:
            return None
        try:
            row = await asyncio.get_running_loop().run_in_executor(self._readers, self._read, key)
        except (sqlite3.Error, OSError) as exc:
            if _busy(exc):
                self._count("miss")
            else:
                self._fail("read", exc)
            return None
        except RuntimeError:  # executor shut down by a concurrent close()
            return None
        now = self._clock()
        if row is None:
            self._count("miss")
            return None
        value, content_type, model, created_at, intact = row
        if not intact:
            # Changed on disk since it was written: never served, and deleted by the writer so that
            # it is not read and counted again (this very version: a put of the key meanwhile stays).
            self._count("corrupt")
            self._count("miss")
            self._queue.put(_Op("drop", key=key, created_at=created_at))
            return None
        age = max(0.0, now - created_at)  # a wall clock stepped backwards must not make ages negative
        if age > self.ttl_s + self.max_stale_s:
            self._count("miss")  # the writer's sweep deletes it
            return None
        fresh = age <= self.ttl_s
        with self._lock:
            self._touches[key] = now  # written by the writer in its next batch: reads stay reads
        self._count("hit" if fresh else "stale")
        return CacheHit(bytes(value), content_type, model, age, fresh)

    def _read(self, key: str) -> tuple[bytes, str, str, float, bool] | None:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is not None and self._reader_local.generation != self._generation:
            # The writer opened the file again: this connection may be to a removed or corrupt one.
            with contextlib.suppress(sqlite3.Error):
                conn.close()  # closed by the writer already, as a rule
            conn = None
        if conn is None:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )
            self._reader_local.conn = conn
            self._reader_local.generation = self._generation
            with self._lock:
                self._reader_conns.append(conn)
        # Autocommit: the read transaction ends with the statement, so no reader pins the WAL.
        row = conn.execute(
            "SELECT value, content_type, model, created_at, checksum FROM entries WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        value, content_type, model, created_at, checksum = row
        # Checked here, off the event loop: a CRC of a large value takes a while. A value whose
        # type changed (a BLOB become TEXT) is as corrupt as one whose bytes did.
        intact = (
            isinstance(value, bytes)
            and isinstance(content_type, str)
            and _checksum(value, content_type) == checksum
        )
        return value, content_type, model, created_at, intact

    # -- writes ------------------------------------------------------------------------------

    def put(self, key: str, model: str, value: bytes, content_type: str) -> None:
        """Queue an entry for the writer and return at once (thread-safe, never blocks)."""
        self._enqueue(_Op("put", None, key, model, bytes(value), content_type, self._clock()))

    async def put_and_wait(self, key: str, model: str, value: bytes, content_type: str) -> bool:
        """Queue an entry and wait until it is committed; True = durable as the module docstring says."""
        future: Future[Any] = Future()
        if not self._enqueue(_Op("put", future, key, model, bytes(value), content_type, self._clock())):
            return False
        return bool(await asyncio.wrap_future(future))

    async def flush(self) -> bool:
        """Wait until everything queued before this call is committed. False if the cache is off."""
        return bool(await self._request("flush"))

    async def purge(self, model: str | None = None) -> int | None:
        """Delete every entry, or those of one model; returns how many were deleted, None when it
        was not carried out (the cache is off, or another process held the file's lock)."""
        deleted: int | None = await self._request("purge", model)
        return deleted

    async def expire(self) -> int | None:
        """Delete entries older than ttl_s + max_stale_s now (the writer also does it every
        minute); how many, or None as for :meth:`purge`."""
        deleted: int | None = await self._request("expire")
        return deleted

    async def _request(self, kind: str, model: str | None = None) -> Any:
        """The writer's answer to ``kind``. Raises ``asyncio.TimeoutError`` when it has not come
        within ``REQUEST_TIMEOUT_S`` (a stuck writer); the request stays queued and is carried
        out if the writer gets going again."""
        if not self.enabled or self._writer is None or not self._writer.is_alive():
            return _FAILED[kind]
        future: Future[Any] = Future()
        self._queue.put(_Op(kind, future, model=model))
        try:
            return await within(asyncio.wrap_future(future), REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning(
                "response cache %s: the writer has not answered a %s in %g s (last progress %.0f s ago)",
                self.path,
                kind,
                REQUEST_TIMEOUT_S,
                time.monotonic() - self._beat,
            )
            raise

    def _enqueue(self, op: _Op) -> bool:
        if not self.enabled or self._writer is None or not self._writer.is_alive():
            return False
        size = _entry_size(op)
        with self._lock:
            # A response bigger than the whole cache would evict everything; a writer that fell
            # behind (slow disk under FULL) must not grow memory without bound: drop, count.
            if size > self.max_bytes or self._pending_bytes + size > self._max_pending_bytes:
                self._counts["dropped"] += 1
                return False
            self._pending_bytes += size
        self._queue.put(op)
        return True

    # -- the writer thread -------------------------------------------------------------------

    def _writer_loop(self) -> None:
        next_sweep = 0.0
        while True:
            batch: list[_Op] = []
            try:
                batch.append(self._queue.get(timeout=_IDLE_TICK_S))
                while len(batch) < _BATCH_MAX:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            self._current = batch  # what a dying thread still owes an answer
            sweep = time.monotonic() >= next_sweep
            if sweep:
                next_sweep = time.monotonic() + _SWEEP_EVERY_S
            try:
                results = self._apply(batch, sweep)
            except Exception as exc:  # a bug must not kill the thread and strand every waiter
                log.exception("response cache writer failed")
                self._fail("write", exc)
                results = [_FAILED[op.kind] for op in batch]
            stopping = any(op.kind == "stop" for op in batch)
            if stopping:
                self._shutdown_writer()
                # A put that raced close() would otherwise wait forever.
                with contextlib.suppress(queue.Empty):
                    while True:
                        late = self._queue.get_nowait()
                        batch.append(late)
                        results.append(_FAILED[late.kind])
            for op, result in zip(batch, results, strict=True):
                _resolve(op.future, result)
            if stopping:
                self._beat = time.monotonic()
                return
            self._watch()
            self._beat = time.monotonic()

    def _watch(self) -> None:
        """On the writer thread: switch the cache off when its files are no longer the ones at
        the path; open a cache that is off again once its retry time has come."""
        now = time.monotonic()
        if self._enabled and not self._closed:
            if now - self._watched < _WATCH_EVERY_S:
                return
            self._watched = now
            for f, ident in self._identity.items():
                if _identity(f) != ident:
                    # Writes would go on into the unlinked inode: lost at the next restart. No
                    # reason to wait for a retry: a fresh file at the path is set up at once.
                    self._fail("write", FileNotFoundError(f"{f} was removed or replaced"))
                    self._reopen()
                    return
        elif not self._given_up and not self._closed and now >= self._retry_at:
            self._reopen()

    def _reopen(self) -> None:
        # The readers' connections first: one still holding a removed -shm made every new
        # connection to the file fail ("disk I/O error"). A read still running on one ends with
        # an error, a miss, as the cache is off meanwhile.
        with self._lock:
            readers, self._reader_conns = self._reader_conns, []
        for conn in readers:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        old, self._wconn = self._wconn, None
        if old is not None:
            # Closing checkpoints what it holds into the file it has open (a removed -wal's
            # entries reach the database file still at the path).
            with contextlib.suppress(sqlite3.Error):
                old.close()
        self._generation += 1  # readers drop their connections to the old file
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            with self._lock:
                self._retry_at = time.monotonic() + self._retry_s
                self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            log.info("response cache %s still unavailable (%s); trying again later", self.path, exc)
            return
        self._wconn = conn
        self._busy_spell = False
        with self._lock:
            self._enabled = True
            self._retry_at = float("inf")
        self._count("reopen")
        log.warning(
            "response cache %s is back ON (%d entries); serving with it again", self.path, self._entries
        )

    def _apply(self, batch: list[_Op], sweep: bool) -> list[Any]:
        """Run one batch in one transaction; returns each op's result. Never raises."""
        with self._lock:
            touches, self._touches = self._touches, {}
            self._pending_bytes -= sum(_entry_size(op) for op in batch if op.kind == "put")
        conn = self._wconn
        if conn is None or not self._enabled:
            return [_FAILED[op.kind] for op in batch]
        if not batch and not touches and not sweep:
            return []
        results: list[Any] = []
        entries, size = self._entries, self._bytes
        evicted = expired = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if op.kind == "put":
                    old = conn.execute(
                        "DELETE FROM entries WHERE key = ? RETURNING size", (op.key,)
                    ).fetchall()
                    n = _entry_size(op)
                    conn.execute(
                        "INSERT INTO entries"
                        " (key, model, content_type, value, checksum, size, created_at, last_access)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            op.key,
                            op.model,
                            op.content_type,
                            op.value,
                            _checksum(op.value, op.content_type),
                            n,
                            op.created_at,
                            op.created_at,
                        ),
                    )
                    entries += 1 - len(old)
                    size += n - sum(r[0] for r in old)
                    results.append(True)
                elif op.kind in ("purge", "expire", "drop"):
                    if op.kind == "drop":
                        gone = conn.execute(
                            "DELETE FROM entries WHERE key = ? AND created_at = ? RETURNING size",
                            (op.key, op.created_at),
                        ).fetchall()
                    elif op.kind == "expire":
                        gone = _delete_expired(conn, self._clock() - self.ttl_s - self.max_stale_s)
                        expired += len(gone)
                    elif op.model is None:
                        gone = conn.execute("DELETE FROM entries RETURNING size").fetchall()
                    else:
                        gone = conn.execute(
                            "DELETE FROM entries WHERE model = ? RETURNING size", (op.model,)
                        ).fetchall()
                    entries -= len(gone)
                    size -= sum(r[0] for r in gone)
                    results.append(len(gone))
                else:  # flush, stop: done when the commit below is
                    results.append(True)
            if touches:
                conn.executemany(
                    "UPDATE entries SET last_access = MAX(last_access, ?) WHERE key = ?",
                    [(t, k) for k, t in touches.items()],
                )
            if sweep:
                gone = _delete_expired(conn, self._clock() - self.ttl_s - self.max_stale_s)
                expired += len(gone)
                entries -= len(gone)
                size -= sum(r[0] for r in gone)
            if size > self.max_bytes:
                gone = conn.execute(
                    "DELETE FROM entries WHERE key IN (SELECT key FROM (SELECT key,"
                    " SUM(size) OVER (ORDER BY last_access DESC, rowid DESC) AS kept FROM entries)"
                    " WHERE kept > ?) RETURNING size",
                    (int(self.max_bytes * _EVICT_TO),),
                ).fetchall()
                evicted = len(gone)
                entries -= len(gone)
                size -= sum(r[0] for r in gone)
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have ended it already
                conn.execute("ROLLBACK")
            if _busy(exc):
                self._write_busy(exc)
            else:
                self._fail("write", exc)
            return [_FAILED[op.kind] for op in batch]
        if self._busy_spell:
            self._busy_spell = False
            log.info("response cache %s: the file is writable again", self.path)
        if batch and self._retry_s != RETRY_S:
            with self._lock:
                self._retry_s = RETRY_S  # it commits again: a later fault retries soon again
        self._entries, self._bytes = entries, size
        if evicted:
            self._count("eviction", evicted)
        if expired:
            self._count("expired", expired)
        return results

    def _shutdown_writer(self) -> None:
        conn, self._wconn = self._wconn, None
        if conn is None:
            return
        try:
            if self._enabled:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("response cache %s: final checkpoint failed: %s", self.path, exc)
        finally:
            conn.close()

    # -- failure and bookkeeping -------------------------------------------------------------

    def _fail(self, where: str, exc: BaseException) -> None:
        with self._lock:
            self._counts[f"{where}_errors"] += 1
            if not self._enabled:
                return
            self._enabled = False
            if not self._given_up:
                self._retry_at = time.monotonic() + self._retry_s
                self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
        log.warning(
            "response cache %s switched OFF after a %s error (%s: %s); serving continues without it",
            self.path,
            where,
            type(exc).__name__,
            exc,
        )
        self._emit("disabled", 1)

    def switch_off(self, why: str) -> None:
        """Serve without the cache from now on: its writer could not be kept running."""
        self._given_up = True
        self._fail("write", RuntimeError(why))

    def _write_busy(self, exc: BaseException) -> None:
        """Another process held the file's lock for ``BUSY_TIMEOUT_S``: this batch is lost (a
        miss later, as a dropped put is), the cache stays on. One warning per spell."""
        self._count("busy_write")
        if not self._busy_spell:
            self._busy_spell = True
            log.warning(
                "response cache %s is locked by another connection (%s); dropping writes until it is not",
                self.path,
                exc,
            )

    def _count(self, event: str, n: int = 1) -> None:
        with self._lock:
            self._counts[event] += n
        self._emit(event, n)

    def _emit(self, event: str, n: int) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event, n)
            except Exception:
                log.exception("response cache event hook failed")

    def stats(self) -> dict[str, Any]:
        """Counters for metrics. ``hits`` are fresh hits; ``stale_hits`` are counted apart.
        ``entries`` and ``bytes`` are 0 while the cache is off (nothing is served from it).
        ``writer_stalled``: the writer thread is alive but has not completed a loop in
        ``STALL_S`` (a wedged disk): puts pile up until dropped, purges time out."""
        silent = time.monotonic() - self._beat
        alive = self._writer is not None and self._writer.is_alive()
        enabled = self.enabled
        with self._lock:
            c = self._counts
            return {
                "enabled": enabled,
                # What is served: none while off. The file's last counts (kept until a reopen
                # counts the file again) made a cache given up for good look full on /metrics.
                "entries": self._entries if enabled else 0,
                "bytes": self._bytes if enabled else 0,
                "max_bytes": self.max_bytes,
                "hits": c["hit"],
                "stale_hits": c["stale"],
                "misses": c["miss"],
                "evictions": c["eviction"],
                "expired": c["expired"],
                "dropped": c["dropped"],
                "busy_writes": c["busy_write"],
                "reopens": c["reopen"],
                "corrupt": c["corrupt"],
                "write_errors": c["write_errors"],
                "read_errors": c["read_errors"],
                "pending_bytes": self._pending_bytes,
                "writer_silent_s": round(silent, 1),
                "writer_stalled": enabled and alive and silent > STALL_S,
            }


def _resolve(future: Future[Any] | None, result: Any) -> None:
    """Resolve a waiter's future unless it is done already: a client that hung up cancels the
    future it was waiting on, and resolving that one must not kill the writer thread."""
    if future is None or future.done():
        return
    with contextlib.suppress(InvalidStateError):  # cancelled between the check and the call
        future.set_result(result)


def _busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite waiting in vain for another connection's lock (extended codes,
    such as SQLITE_BUSY_SNAPSHOT, keep the primary code in their low byte)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # Python 3.10's sqlite3 errors carry no code: SQLite's own messages for the two are fixed.
        return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith(_BUSY_MESSAGES)
    return isinstance(code, int) and code & 0xFF in _BUSY_CODES


def _checksum(value: bytes, content_type: str) -> int:
    """CRC-32 of what a hit serves: the value and its content type."""
    return zlib.crc32(content_type.encode(), zlib.crc32(value))


def _entry_size(op: _Op) -> int:
    # Payload bytes only; SQLite's page overhead is not counted (a few % for large responses).
    return len(op.value) + len(op.key) + len(op.model or "") + len(op.content_type)


def _delete_expired(conn: sqlite3.Connection, cutoff: float) -> list[Any]:
    return conn.execute("DELETE FROM entries WHERE created_at < ? RETURNING size", (cutoff,)).fetchall()


def _identity(f: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(f)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _wal_header_ok(wal: Path) -> bool:
    with wal.open("rb") as f:
        header = f.read(32)
    return len(header) == 32 and int.from_bytes(header[:4], "big") in _WAL_MAGIC
