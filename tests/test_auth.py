"""API keys: hashing at rest, verification, revocation, rate limits, header extraction."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from multidict import CIMultiDict

from appliance import auth
from appliance.auth import (
    ApiKeyRecord,
    KeyRateLimiter,
    KeyStore,
    ScryptParams,
    Throttled,
    TokenBucket,
    generate_key,
    hash_key,
    presented_key,
    verify_key,
)

# Cheap parameters keep the suite fast; the stored hash carries them, so verification uses
# whatever a record was made with. One test below exercises the defaults.
FAST = ScryptParams(n=2**10, r=8, p=1)


@pytest.fixture
def store() -> KeyStore:
    return KeyStore(params=FAST)


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Any] = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_key_format() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert re.fullmatch(r"apl_[A-Za-z0-9_-]{51}", key)


def test_storage_never_contains_the_plaintext(store: KeyStore) -> None:
    plaintext, record = store.add("frontend", max_priority=5, rate=10.0)
    dumped = yaml.safe_dump({"auth": {"keys": store.to_records()}})
    secret = plaintext[len("apl_") + 8 :]
    assert plaintext not in dumped and secret not in dumped
    assert plaintext not in repr(record)
    assert record.hash.startswith(f"scrypt${plaintext[4:12]}$1024$8$1$")
    # Per-key salt: the same key hashes differently every time.
    assert hash_key(plaintext, FAST) != hash_key(plaintext, FAST)


def test_authenticate_right_wrong_unknown(store: KeyStore) -> None:
    plaintext, record = store.add("frontend")
    assert store.authenticate(plaintext) == record
    wrong_secret = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    assert store.authenticate(wrong_secret) is None
    assert store.authenticate(generate_key()) is None  # unknown key id
    for junk in ("", "apl_", "Bearer x", plaintext + "x", "apl_" + "!" * 51, "x" * 10_000):
        assert store.authenticate(junk) is None


def test_unknown_key_id_does_not_run_the_kdf(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("frontend")
    calls = _count_calls(monkeypatch, auth.hashlib, "scrypt")
    for _ in range(50):
        assert store.authenticate(generate_key()) is None
    assert calls == []


def test_revoked_key_is_refused_even_when_cached(store: KeyStore) -> None:
    plaintext, _ = store.add("old-client")
    assert store.authenticate(plaintext) is not None  # now cached
    revoked = store.revoke("old-client")
    assert revoked.revoked
    assert store.authenticate(plaintext) is None
    assert store.to_records()[0]["revoked"] is True
    with pytest.raises(KeyError):
        store.revoke("nobody")


def test_removed_key_is_refused(store: KeyStore) -> None:
    plaintext, _ = store.add("tmp")
    active = store.active_count()
    assert store.authenticate(plaintext) is not None
    store.remove("tmp")
    assert store.authenticate(plaintext) is None
    assert store.active_count() == active - 1  # counted anew (it is cached by version)


def test_a_reload_hands_its_keys_to_the_running_store(store: KeyStore) -> None:
    """The app's store object stays (aiohttp wants state set before start); its keys change."""
    kept, _ = store.add("kept")
    fresh = KeyStore(store.records(), params=FAST)
    new_plain, _ = fresh.add("new")
    fresh.revoke("kept")
    store.adopt(fresh)
    assert store.authenticate(new_plain) is not None and store.authenticate(kept) is None
    assert store.active_count() == fresh.active_count()


def test_only_first_use_pays_the_kdf(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    plaintext, _ = store.add("frontend")
    calls = _count_calls(monkeypatch, auth.hashlib, "scrypt")
    assert not store.is_cached(plaintext)
    for _ in range(100):
        assert store.authenticate(plaintext) is not None
    assert len(calls) == 1
    assert store.is_cached(plaintext)


def test_constant_time_comparison_is_used(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    plaintext, _ = store.add("frontend")
    calls = _count_calls(monkeypatch, auth.hmac, "compare_digest")
    wrong = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    assert store.authenticate(wrong) is None
    assert calls, "the derived key must be compared with hmac.compare_digest"
    calls.clear()
    assert store.authenticate(plaintext) is not None
    assert calls


def test_default_parameters_verify_quickly_enough() -> None:
    key = generate_key()
    stored = hash_key(key)
    assert stored.split("$")[2:5] == ["16384", "8", "1"]
    assert verify_key(key, stored)
    assert not verify_key(generate_key(), stored)


def test_records_round_trip_through_yaml(store: KeyStore) -> None:
    a_key, _ = store.add("a", max_priority=3, rate=2.5)
    b_key, _ = store.add("b")
    store.revoke("b")
    text = yaml.safe_dump({"auth": {"keys": store.to_records()}}, sort_keys=False)
    loaded = KeyStore.from_records(yaml.safe_load(text)["auth"]["keys"])
    assert loaded.records() == store.records()
    record = loaded.authenticate(a_key)
    assert record is not None and (record.max_priority, record.rate_per_s) == (3, 2.5)
    assert loaded.authenticate(b_key) is None
    assert len(KeyStore.from_records(None)) == 0


@pytest.mark.parametrize(
    "item",
    [
        {"name": "x"},
        {"name": "bad name", "hash": "HASH"},
        {"name": "x", "hash": "sha256$abc"},
        {"name": "x", "hash": "scrypt$short$1024$8$1$AAAA$AAAA"},
        {"name": "x", "hash": "HASH", "max_priority": True},
        {"name": "x", "hash": "HASH", "max_priority": "high"},
        {"name": "x", "hash": "HASH", "rate_per_s": 0},
        {"name": "x", "hash": "HASH", "rate_per_s": "fast"},
        {"name": "x", "hash": "HASH", "revoked": "no"},
        {"name": "x", "hash": "HASH", "owner": "bob"},
    ],
)
def test_invalid_records_are_rejected(item: dict[str, Any]) -> None:
    good = hash_key(generate_key(), FAST)
    item = {k: (good if v == "HASH" else v) for k, v in item.items()}
    with pytest.raises(ValueError):
        KeyStore.from_records([item])


def test_absurd_scrypt_cost_in_config_is_rejected() -> None:
    good = hash_key(generate_key(), FAST).split("$")
    good[2] = str(2**24)
    with pytest.raises(ValueError, match="scrypt N"):
        ApiKeyRecord("x", "$".join(good))


def test_duplicate_names_rejected(store: KeyStore) -> None:
    store.add("frontend")
    with pytest.raises(ValueError):
        store.add("frontend")
    records = store.to_records() * 2
    with pytest.raises(ValueError):
        KeyStore.from_records(records)


def test_priority_cap_and_rate_data(store: KeyStore) -> None:
    # Level 1 is the most urgent (Triton's convention): a cap of 3 lowers 1 and 2 to 3.
    _, capped = store.add("batch-jobs", max_priority=3, rate=0.5)
    _, free = store.add("frontend")
    assert capped.effective_priority(1) == 3
    assert capped.effective_priority(5) == 5
    assert free.effective_priority(1) == 1
    assert (capped.max_priority, capped.rate_per_s, free.max_priority, free.rate_per_s) == (
        3,
        0.5,
        None,
        None,
    )


def test_authenticate_async_runs(store: KeyStore) -> None:
    plaintext, record = store.add("frontend")

    async def go() -> list[ApiKeyRecord | None]:
        first = await store.authenticate_async(plaintext)  # KDF in a worker thread
        second = await store.authenticate_async(plaintext)  # cached, inline
        wrong = await store.authenticate_async(generate_key())
        return [first, second, wrong]

    assert asyncio.run(go()) == [record, record, None]


def _with_secret(plaintext: str, secret: str) -> str:
    """A key with ``plaintext``'s id and another secret: what a client that has seen a key can make."""
    return plaintext[: len(auth.KEY_PREFIX) + 8] + secret


def test_made_up_secrets_for_a_known_id_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key id is no secret, so made-up secrets with it must not each cost a KDF run: past the
    id's budget they are answered Throttled without one; a key verified before never is."""
    clock = FakeClock()
    store = KeyStore(params=FAST, kdf_rate=1.0, kdf_burst=3, clock=clock)
    plaintext, record = store.add("frontend")
    other, other_record = store.add("other")
    calls = _count_calls(monkeypatch, auth, "_scrypt")
    assert store.authenticate(other) == other_record  # verified: cached from now on
    clock.now += 10
    answers = [store.authenticate(_with_secret(plaintext, f"{i:043d}")) for i in range(10)]
    assert answers[:3] == [None, None, None]
    assert all(isinstance(a, Throttled) and a.key_id == record.key_id for a in answers[3:])
    assert all(0 < a.retry_after_s <= 1.0 for a in answers[3:] if isinstance(a, Throttled))
    assert len(calls) == 1 + 3
    assert isinstance(store.authenticate(plaintext), Throttled)  # not verified yet: waits its turn
    assert store.authenticate(other) == other_record  # another id's budget is its own
    clock.now += 1.0
    assert store.authenticate(plaintext) == record
    for i in range(5):
        store.authenticate(_with_secret(plaintext, f"{i:043d}"))
    assert store.authenticate(plaintext) == record  # cached: the spent budget does not matter
    assert len(calls) == 1 + 3 + 1


def test_simultaneous_first_uses_of_a_key_share_one_kdf_run(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    plaintext, record = store.add("fleet")
    calls = _count_calls(monkeypatch, auth, "_scrypt")

    async def go() -> list[ApiKeyRecord | Throttled | None]:
        return list(await asyncio.gather(*(store.authenticate_async(plaintext) for _ in range(30))))

    assert asyncio.run(go()) == [record] * 30
    assert len(calls) == 1


def test_a_caller_giving_up_does_not_cancel_the_check_others_wait_for(store: KeyStore) -> None:
    plaintext, record = store.add("fleet")

    async def go() -> ApiKeyRecord | Throttled | None:
        impatient = asyncio.ensure_future(store.authenticate_async(plaintext))
        patient = asyncio.ensure_future(store.authenticate_async(plaintext))
        await asyncio.sleep(0)
        impatient.cancel()
        return await patient

    assert asyncio.run(go()) == record


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_burst_then_refuses_with_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.try_take()
    assert wait == pytest.approx(0.5)
    clock.now += 0.25
    assert bucket.try_take() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.try_take() == 0.0
    clock.now += 100  # refills only up to the burst
    assert bucket.tokens == pytest.approx(3)
    with pytest.raises(ValueError):
        bucket.try_take(4)


def test_token_bucket_validation() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(float("inf"), 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0.5)


def test_per_key_rate_limiter(store: KeyStore) -> None:
    clock = FakeClock()
    limiter = KeyRateLimiter(clock=clock)
    _, slow = store.add("slow", rate=1.0)
    _, other = store.add("other", rate=1.0)
    _, free = store.add("free")
    assert [limiter.check(slow) for _ in range(2)] == [0.0, 0.0]  # burst = 2 s of rate
    assert limiter.check(slow) == pytest.approx(1.0)
    assert limiter.check(other) == 0.0  # buckets are per key
    assert all(limiter.check(free) == 0.0 for _ in range(1000))
    clock.now += 1
    assert limiter.check(slow) == 0.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer apl_abc"}, "apl_abc"),
        ({"authorization": "bearer   apl_abc  "}, "apl_abc"),
        ({"X-API-Key": "apl_xyz"}, "apl_xyz"),
        ({"x-api-key": " apl_xyz "}, "apl_xyz"),
        ({"Authorization": "Bearer apl_abc", "X-API-Key": "apl_xyz"}, "apl_abc"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer "}, None),
        ({"Authorization": "Bearer " + "a" * 1000}, None),
        ({"X-API-Key": ""}, None),
        ({}, None),
    ],
)
def test_presented_key(headers: dict[str, str], expected: str | None) -> None:
    assert presented_key(headers) == expected
    assert presented_key(CIMultiDict(headers)) == expected


def test_presented_key_then_authenticate(store: KeyStore) -> None:
    plaintext, record = store.add("frontend")
    key = presented_key(CIMultiDict({"AUTHORIZATION": f"Bearer {plaintext}"}))
    assert key is not None and store.authenticate(key) == record


def test_cache_is_bounded() -> None:
    store = KeyStore(params=FAST, cache_size=2)
    keys = [store.add(f"k{i}")[0] for i in range(4)]
    for key in keys:
        assert store.authenticate(key) is not None
    cached = [store.is_cached(key) for key in keys]
    assert cached == [False, False, True, True]
    assert hashlib.sha256(keys[0].encode()).digest() not in store._verified
