"""API keys for the data plane: generation, hashing at rest, verification and per-key limits.

Key format: ``apl_`` + 8-character key id + 43-character secret, all base64url
(e.g. ``apl_Xk3v9QaZ_tM0...``), 55 characters. The id is random too; it is stored in clear so a
presented key is checked against one record only, which keeps a flood of made-up keys from
costing a KDF run each.

Stored hash format (the ``hash`` field of an ``auth.keys`` entry in appliance.yaml)::

    scrypt$<key id>$<N>$<r>$<p>$<salt, base64url>$<derived key, base64url>

scrypt with N=2**14, r=8, p=1 costs ~30 ms and 16 MiB. The secret already carries 256 bits of
entropy, so the KDF is defence in depth for a leaked config file, not the primary barrier.
Only the first use of a key pays it: a verified key is remembered by the SHA-256 of the
presented string, so later requests cost one hash and one dict lookup.

A key id is not secret (it is the start of every key its holder sends), so whoever has seen one
could send it with made-up secrets, each costing a KDF run: a CPU and memory flood aimed at the
engines' cores. So the KDF runs at most ``kdf_rate`` times a second per key id (after a burst of
``kdf_burst``); past that, presented keys not verified before are answered :class:`Throttled`
without running it. A key already verified is never throttled, and simultaneous first uses of the
same key share one KDF run.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "KEY_PREFIX",
    "ApiKeyRecord",
    "KeyRateLimiter",
    "KeyStore",
    "ScryptParams",
    "Throttled",
    "TokenBucket",
    "generate_key",
    "hash_key",
    "presented_key",
    "verify_key",
]

KEY_PREFIX = "apl_"
_ID_LEN = 8
_SECRET_BYTES = 32
_SECRET_LEN = 43  # len(base64url(32 bytes)) without padding
_KEY_RE = re.compile(rf"^{KEY_PREFIX}[A-Za-z0-9_-]{{{_ID_LEN + _SECRET_LEN}}}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Longer header values are rejected before hashing anything.
_MAX_PRESENTED = 256
# Seconds of the key's rate a client may spend at once after being idle.
BURST_SECONDS = 2.0


@dataclass(frozen=True)
class ScryptParams:
    n: int = 2**14
    r: int = 8
    p: int = 1

    def validate(self) -> None:
        # Bounds keep a hand-edited config from asking for gigabytes per verification.
        if self.n < 2 or self.n & (self.n - 1) or self.n > 2**20:
            raise ValueError(f"scrypt N must be a power of two in [2, 2**20], got {self.n}")
        if not 1 <= self.r <= 32 or not 1 <= self.p <= 16:
            raise ValueError(f"scrypt r/p out of range: r={self.r} p={self.p}")

    @property
    def maxmem(self) -> int:
        return 128 * self.r * self.n * self.p + 2**20


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_key() -> str:
    """A new random key in the documented format."""
    key_id = secrets.token_urlsafe(6)  # 6 bytes -> exactly 8 characters
    return KEY_PREFIX + key_id + secrets.token_urlsafe(_SECRET_BYTES)


def _key_id(key: str) -> str:
    return key[len(KEY_PREFIX) : len(KEY_PREFIX) + _ID_LEN]


def _scrypt(key: str, salt: bytes, params: ScryptParams) -> bytes:
    return hashlib.scrypt(
        key.encode(), salt=salt, n=params.n, r=params.r, p=params.p, maxmem=params.maxmem, dklen=32
    )


def hash_key(key: str, params: ScryptParams | None = None) -> str:
    """The storable hash string of ``key`` (fresh random salt each call)."""
    if not _KEY_RE.match(key):
        raise ValueError("not an appliance API key")
    params = params or ScryptParams()
    params.validate()
    salt = secrets.token_bytes(16)
    derived = _scrypt(key, salt, params)
    return f"scrypt${_key_id(key)}${params.n}${params.r}${params.p}${_b64e(salt)}${_b64e(derived)}"


@dataclass(frozen=True)
class _ParsedHash:
    key_id: str
    params: ScryptParams
    salt: bytes
    derived: bytes


def _parse_hash(stored: str) -> _ParsedHash:
    parts = stored.split("$")
    if len(parts) != 7 or parts[0] != "scrypt":
        raise ValueError("unsupported key hash (expected scrypt$id$N$r$p$salt$hash)")
    _, key_id, n, r, p, salt, derived = parts
    if len(key_id) != _ID_LEN:
        raise ValueError("key hash has a malformed key id")
    try:
        params = ScryptParams(int(n), int(r), int(p))
        salt_raw, derived_raw = _b64d(salt), _b64d(derived)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed key hash: {exc}") from None
    params.validate()
    if len(salt_raw) < 16 or len(derived_raw) != 32:
        raise ValueError("key hash has a short salt or digest")
    return _ParsedHash(key_id, params, salt_raw, derived_raw)


def verify_key(key: str, stored: str) -> bool:
    """Recompute the KDF and compare in constant time (slow path; ``KeyStore`` caches)."""
    if not _KEY_RE.match(key):
        return False
    parsed = _parse_hash(stored)
    if not hmac.compare_digest(_key_id(key).encode(), parsed.key_id.encode()):
        return False
    return hmac.compare_digest(_scrypt(key, parsed.salt, parsed.params), parsed.derived)


@dataclass(frozen=True)
class ApiKeyRecord:
    """One key as stored in the config; never holds the plaintext.

    ``max_priority``: requests made with this key are capped at this priority (larger number =
    more urgent). ``rate_per_s``: sustained requests per second, None for unlimited.
    """

    name: str
    hash: str
    max_priority: int | None = None
    rate_per_s: float | None = None
    revoked: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"invalid key name {self.name!r} (letters, digits, . _ -; max 64)")
        _parse_hash(self.hash)
        if self.rate_per_s is not None and not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"rate_per_s must be a positive number, got {self.rate_per_s!r}")
        if self.max_priority is not None and not (type(self.max_priority) is int and self.max_priority >= 1):
            raise ValueError(
                f"max_priority must be an integer of at least 1 (1 = top), got {self.max_priority!r}"
            )

    @property
    def key_id(self) -> str:
        """Non-secret id (characters 5-12 of the key): safe to log, unlike the key."""
        return self.hash.split("$", 2)[1]

    def effective_priority(self, requested: int) -> int:
        """``requested`` lowered to ``max_priority`` (level 1 is the most urgent, as in Triton)."""
        if self.max_priority is None:
            return requested
        return max(requested, self.max_priority)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hash": self.hash,
            "max_priority": self.max_priority,
            "rate_per_s": self.rate_per_s,
            "revoked": self.revoked,
        }

    @classmethod
    def from_dict(cls, item: Mapping[str, Any]) -> ApiKeyRecord:
        unknown = set(item) - {"name", "hash", "max_priority", "rate_per_s", "revoked"}
        if unknown:
            raise ValueError(f"unknown key record fields: {sorted(unknown)}")
        if "name" not in item or "hash" not in item:
            raise ValueError("a key record needs name and hash")
        max_priority = item.get("max_priority")
        rate = item.get("rate_per_s")
        revoked = item.get("revoked", False)
        if max_priority is not None and (isinstance(max_priority, bool) or not isinstance(max_priority, int)):
            raise ValueError("max_priority must be an integer or null")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))):
            raise ValueError("rate_per_s must be a number or null")
        if not isinstance(revoked, bool):
            raise ValueError("revoked must be true or false")
        return cls(
            name=str(item["name"]),
            hash=str(item["hash"]),
            max_priority=max_priority,
            rate_per_s=None if rate is None else float(rate),
            revoked=revoked,
        )


@dataclass(frozen=True)
class Throttled:
    """A presented key was not checked: its key id's KDF budget is spent (answer 429)."""

    key_id: str
    retry_after_s: float


def _well_formed(presented: str) -> bool:
    """In the key format (ASCII only, so it can be hashed; anything else is no key of ours)."""
    return len(presented) <= _MAX_PRESENTED and _KEY_RE.fullmatch(presented) is not None


class KeyStore:
    """The set of API keys, with a verification cache so only a key's first use runs scrypt, and
    a budget of KDF runs per key id so that made-up secrets for a known id cannot flood it."""

    def __init__(
        self,
        records: Iterable[ApiKeyRecord] = (),
        *,
        params: ScryptParams | None = None,
        cache_size: int = 4096,
        kdf_rate: float = 1.0,
        kdf_burst: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._params = params or ScryptParams()
        self._params.validate()
        self._records: dict[str, ApiKeyRecord] = {}
        self._version = 0  # bumped on every change of the records
        self._active: tuple[dict[str, ApiKeyRecord], int, int] | None = None
        self._lock = threading.Lock()
        # sha256(presented key) -> the record's stored hash string. Holding the hash string
        # (not the record) means a revoked, removed or re-issued key misses on its own.
        self._verified: OrderedDict[bytes, str] = OrderedDict()
        self._cache_size = cache_size
        # key id -> its budget of KDF runs (taken under _lock: TokenBucket is not thread-safe).
        self._kdf_budget: dict[str, TokenBucket] = {}
        self._kdf_rate, self._kdf_burst, self._clock = kdf_rate, kdf_burst, clock
        # sha256(presented key) -> the KDF run in progress for it (event loop only).
        self._checking: dict[bytes, asyncio.Future[ApiKeyRecord | Throttled | None]] = {}
        for record in records:
            if record.name in self._records:
                raise ValueError(f"duplicate key name {record.name!r}")
            self._records[record.name] = record
            self._version += 1

    @classmethod
    def from_records(cls, items: Iterable[Mapping[str, Any]] | None, **kwargs: Any) -> KeyStore:
        """Load the ``auth.keys`` list from the config (None or empty: no keys)."""
        return cls((ApiKeyRecord.from_dict(item) for item in items or ()), **kwargs)

    def to_records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [record.to_dict() for record in self._records.values()]

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[ApiKeyRecord]:
        with self._lock:
            return list(self._records.values())

    def get(self, name: str) -> ApiKeyRecord | None:
        return self._records.get(name)

    def active_count(self) -> int:
        # Asked on every request (are keys required?): counted once per change of the records.
        cached = self._active
        if cached is not None and cached[0] is self._records and cached[1] == self._version:
            return cached[2]
        with self._lock:
            n = sum(1 for record in self._records.values() if not record.revoked)
            self._active = (self._records, self._version, n)
            return n

    def add(
        self, name: str, max_priority: int | None = None, rate: float | None = None
    ) -> tuple[str, ApiKeyRecord]:
        """Create a key. Returns the plaintext (shown once, never stored) and its record."""
        plaintext = generate_key()
        record = ApiKeyRecord(name, hash_key(plaintext, self._params), max_priority, rate)
        with self._lock:
            existing = self._records.get(name)
            if existing is not None:
                raise ValueError(
                    f"a{' revoked' if existing.revoked else ''} key named {name!r} already exists: "
                    f"remove it to use the name again (appliance keys remove {name})"
                )
            self._records[name] = record
            self._version += 1
        return plaintext, record

    def revoke(self, name: str) -> ApiKeyRecord:
        """Mark a key revoked; it stays in the config so the revocation is visible."""
        with self._lock:
            record = self._records[name]
            revoked = replace(record, revoked=True)
            self._records[name] = revoked
            self._version += 1
            self._forget(record.hash)
        return revoked

    def remove(self, name: str) -> ApiKeyRecord:
        with self._lock:
            record = self._records.pop(name)
            self._version += 1  # active_count() is cached by version
            self._forget(record.hash)
        return record

    def adopt(self, other: KeyStore) -> None:
        """Take ``other``'s keys (a reload). The store stays the same object: aiohttp wants an
        application's state set before it starts. A verified key whose record is gone, revoked
        or re-issued misses the cache on its own (it holds the record's hash)."""
        with other._lock:
            records = dict(other._records)
        with self._lock:
            self._records = records
            self._version += 1

    def _forget(self, stored: str) -> None:
        for digest in [d for d, h in self._verified.items() if h == stored]:
            del self._verified[digest]

    def _cached(self, digest: bytes) -> ApiKeyRecord | None:
        with self._lock:
            stored = self._verified.get(digest)
            if stored is None:
                return None
            for record in self._records.values():
                if record.hash == stored and not record.revoked:
                    self._verified.move_to_end(digest)
                    return record
            del self._verified[digest]
            return None

    def _candidates(self, presented: str) -> list[ApiKeyRecord]:
        key_id = _key_id(presented)
        with self._lock:
            return [r for r in self._records.values() if not r.revoked and r.key_id == key_id]

    def is_cached(self, presented: str) -> bool:
        """True when ``authenticate`` will not need the KDF (lets async code skip a thread hop)."""
        if not _well_formed(presented):
            return False
        return self._cached(hashlib.sha256(presented.encode()).digest()) is not None

    def authenticate(self, presented: str) -> ApiKeyRecord | Throttled | None:
        """The active record matching ``presented``, None (unknown, wrong or revoked), or
        :class:`Throttled` when its key id's KDF budget is spent.

        An unknown key id is refused without running the KDF. That reveals whether an id
        exists, which is harmless: the id is not the secret, and refusing cheaply is what
        keeps random keys from being a CPU-exhaustion attack.
        """
        if not _well_formed(presented):
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        hit = self._cached(digest)
        if hit is not None:
            return hit
        candidates = self._candidates(presented)
        if not candidates:
            return None
        wait = self._take_kdf(_key_id(presented))
        if wait > 0:
            return Throttled(_key_id(presented), wait)
        for record in candidates:
            if verify_key(presented, record.hash):
                with self._lock:
                    # Re-check: a revoke may have raced the ~30 ms KDF.
                    current = self._records.get(record.name)
                    if current is None or current.hash != record.hash or current.revoked:
                        return None
                    self._verified[digest] = record.hash
                    while len(self._verified) > self._cache_size:
                        self._verified.popitem(last=False)
                return current
        return None

    def _take_kdf(self, key_id: str) -> float:
        with self._lock:
            bucket = self._kdf_budget.get(key_id)
            if bucket is None:  # only ids of existing keys get here: the table stays small
                bucket = self._kdf_budget[key_id] = TokenBucket(
                    self._kdf_rate, self._kdf_burst, clock=self._clock
                )
            return bucket.try_take()

    async def authenticate_async(self, presented: str) -> ApiKeyRecord | Throttled | None:
        """``authenticate`` that runs a first-use KDF in a thread, off the event loop; callers
        presenting the same key meanwhile wait for that run instead of starting their own."""
        if not _well_formed(presented) or self.is_cached(presented):
            return self.authenticate(presented)  # refused or found at once: no thread hop
        digest = hashlib.sha256(presented.encode()).digest()
        check = self._checking.get(digest)
        if check is None:
            # A task of its own: a caller that gives up (its deadline, its client gone) must not
            # cancel the run the others wait for.
            check = asyncio.ensure_future(asyncio.to_thread(self.authenticate, presented))
            self._checking[digest] = check
            check.add_done_callback(lambda _: self._checking.pop(digest, None))
        return await asyncio.shield(check)


class TokenBucket:
    """Classic token bucket: ``rate`` tokens per second, holding at most ``burst``.

    Not thread-safe: meant to be used from the event loop only.
    """

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive number")
        if not burst >= 1:
            raise ValueError("burst must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def try_take(self, cost: float = 1.0, keep: float = 0.0) -> float:
        """Take ``cost`` tokens, leaving at least ``keep`` (held back for more urgent takers): 0.0
        when allowed, else the seconds until it would be (Retry-After)."""
        if cost > self.burst:
            raise ValueError(f"cost {cost} exceeds the bucket size {self.burst}")
        # _refill() inlined: the rate ceilings take from two buckets on every POST.
        now = self._clock()
        tokens = self._tokens
        if now > self._stamp:
            tokens += (now - self._stamp) * self.rate
            if tokens > self.burst:
                tokens = self.burst
        self._stamp = now
        if tokens - keep >= cost:
            self._tokens = tokens - cost
            return 0.0
        self._tokens = tokens
        return (cost + keep - tokens) / self.rate


class KeyRateLimiter:
    """One token bucket per key name, sized from the key's ``rate_per_s``."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, record: ApiKeyRecord) -> float:
        """0.0 to admit the request, else seconds to put in ``Retry-After`` (answer 429)."""
        if record.rate_per_s is None:
            return 0.0
        bucket = self._buckets.get(record.name)
        if bucket is None or bucket.rate != record.rate_per_s:
            burst = max(1.0, record.rate_per_s * BURST_SECONDS)
            bucket = TokenBucket(record.rate_per_s, burst, clock=self._clock)
            self._buckets[record.name] = bucket
        return bucket.try_take()

    def forget(self, name: str) -> None:
        self._buckets.pop(name, None)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, else None.

    Works with aiohttp's case-insensitive headers and with a plain dict. ``Authorization``
    wins when both are present; any other auth scheme (Basic, ...) yields None.
    """
    authorization: str | None = None
    api_key: str | None = None
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == "authorization" and authorization is None:
            authorization = value
        elif lowered == "x-api-key" and api_key is None:
            api_key = value
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            token = token.strip()
            return token if 0 < len(token) <= _MAX_PRESENTED else None
        return None
    if api_key is not None:
        api_key = api_key.strip()
        return api_key if 0 < len(api_key) <= _MAX_PRESENTED else None
    return None
