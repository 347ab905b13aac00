"""The prefix cache of one generate model: KV of whole prompt blocks, reused across requests.

As vLLM's automatic prefix caching does, a prompt is cut into blocks of ``block_tokens`` tokens
and each whole block is identified by its tokens together with the identity of the block before
it, so a block is only ever reused after exactly the same prefix (the KV of a token depends on
every token before it). Identities are exact (the parent's serial number and the block's token
tuple, compared by value), never a lossy hash. A hit hands back the blocks' KV, which the
scheduler puts in front of the prompt's remaining tokens instead of recomputing them.

The cache is bounded in bytes by what the running batch leaves of ``generation.kv_cache_bytes``
(``shrink``); the least recently used blocks go first, and among blocks used together the later
ones of a prefix go before the earlier ones (a lookup touches a prefix's blocks last to first), so
eviction eats prefixes from their tail and never strands a block behind a missing parent for long.
Blocks are copies cut from a row (``KVState.columns``), so an eviction never touches the running
batch. Entries live where the model's KV lives (host or device). Thread-safe: lookups and inserts
run on the model's worker thread, ``snapshot`` on the event loop.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.llm.kv import KVState

_ROOT = 0


@dataclass
class _Block:
    serial: int
    kv: KVState  # one row, block_tokens columns
    nbytes: int


@dataclass
class PrefixStats:
    query_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of which were served from cached blocks
    evictions: int = 0  # blocks evicted


class PrefixCache:
    def __init__(self, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()  # LRU first
        self._serial = itertools.count(1)
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = PrefixStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, tokens: Sequence[int], limit: int) -> list[tuple[int, tuple[int, ...]]]:
        """Keys of the first ``limit`` whole blocks, as long as each one's parent is cached (only
        a cached parent has a serial to name it by); the first key not cached ends the list."""
        b = self.block_tokens
        keys: list[tuple[int, tuple[int, ...]]] = []
        parent = _ROOT
        for j in range(limit):
            key = (parent, tuple(tokens[j * b : (j + 1) * b]))
            keys.append(key)
            block = self._blocks.get(key)
            if block is None:
                break
            parent = block.serial
        return keys

    def lookup(self, tokens: Sequence[int]) -> list[KVState]:
        """The cached KV of the longest run of whole leading blocks of ``tokens``, leaving at least
        one token to compute (its logits give the next token)."""
        limit = (len(tokens) - 1) // self.block_tokens
        with self._lock:
            hits = [self._blocks[k] for k in self._keys(tokens, limit) if k in self._blocks]
            for key in reversed(self._keys(tokens, len(hits))):  # later blocks are evicted first
                self._blocks.move_to_end(key)
            self.stats.query_tokens += len(tokens)
            self.stats.hit_tokens += len(hits) * self.block_tokens
            return [h.kv for h in hits]

    def insert(self, tokens: Sequence[int], row: KVState) -> int:
        """Cache the whole blocks of ``tokens`` from ``row`` (one row whose last ``len(tokens)``
        columns hold their KV) that are not cached yet; returns how many were added."""
        b = self.block_tokens
        limit = len(tokens) // b
        offset = row.width - len(tokens)
        added = 0
        with self._lock:
            parent = _ROOT
            for j in range(limit):
                key = (parent, tuple(tokens[j * b : (j + 1) * b]))
                block = self._blocks.get(key)
                if block is None:
                    kv = row.columns(offset + j * b, offset + (j + 1) * b)
                    block = _Block(next(self._serial), kv, kv.nbytes())
                    self._blocks[key] = block
                    self._bytes += block.nbytes
                    added += 1
                parent = block.serial
            for key in reversed(self._keys(tokens, limit)):
                if key in self._blocks:
                    self._blocks.move_to_end(key)
        return added

    def shrink(self, max_bytes: int) -> int:
        """Evict least recently used blocks until at most ``max_bytes`` are held."""
        evicted = 0
        with self._lock:
            while self._blocks and self._bytes > max(max_bytes, 0):
                _, block = self._blocks.popitem(last=False)
                self._bytes -= block.nbytes
                evicted += 1
            self.stats.evictions += evicted
        return evicted

    def clear(self) -> None:
        self.shrink(0)
