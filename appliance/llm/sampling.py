"""Turning logits into tokens and tokens into text, one sequence at a time.

- ``sample``: greedy at temperature 0, otherwise temperature, top-k and top-p with the request's
  own ``numpy`` generator, so a seed reproduces a completion whatever else shares the batch.
- ``IncrementalDetokenizer``: text deltas that never split a multi-byte UTF-8 character (a byte
  level BPE token may hold half of one; the decoder shows that as U+FFFD until the rest arrives).
- ``StopMatcher``: stop strings on the decoded text, holding back any tail that could still grow
  into a stop string so that a stream never shows part of one.
- ``OutputProcessor``: the three together plus EOS and ``max_tokens``: one call per sampled token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides which tokens a sequence gets (validated by the service)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: benchmarks want exactly max_tokens tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def deterministic(self) -> bool:
        """Whether the same request always gets the same tokens (so a cached answer is valid)."""
        return self.greedy or self.seed is not None


def make_rng(seed: int | None) -> np.random.Generator:
    # numpy seeds must be non-negative; folding keeps every int a client may send usable.
    return np.random.default_rng(None if seed is None else seed % (1 << 64))


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from a row of logits [vocab]. Draws exactly one random number when sampling,
    so a seeded sequence is reproducible token by token (also across preemption)."""
    if params.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    ids = np.arange(x.shape[0])
    k = params.top_k
    if 0 < k < x.shape[0]:
        ids = np.argpartition(x, -k)[-k:]
        x = x[ids]
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # The smallest set whose mass reaches top_p; always at least the most likely token.
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]
        ids, probs = ids[keep], probs[keep]
    cdf = np.cumsum(probs)
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(ids[min(pick, len(ids) - 1)])


class TokenDecoder(Protocol):
    """The part of ``tokenizers.Tokenizer`` used here."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Decode a growing token list into text deltas.

    Decoding token by token is wrong for byte-level BPE (a token may be half a character), and
    decoding everything each time is quadratic. So, as TGI and vLLM do, decode a short window:
    the tokens since the last emitted text (``read``) plus those before it back to ``prefix``, and
    emit the new part only once it does not end in a replacement character.
    """

    def __init__(self, tokenizer: TokenDecoder) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of the sequence, even a lone U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Finds the first stop string in the text; says how much text is safe to show so far."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0  # characters of ``text`` already released

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add ``delta``; return (text now safe to release, whether a stop string was found)."""
        if not self.stops:
            self.text += delta
            self.sent = len(self.text)
            return delta, False
        # A stop string not found before can only start in the last longest-1 old characters.
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.sent : end]
            self.text = self.text[:end]
            self.sent = end
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        safe = len(self.text) - hold
        out = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, False

    def finish(self) -> str:
        """The held-back tail, released because the sequence ended without completing a stop."""
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


@dataclass
class Output:
    """What one sampled token adds: text to release, and the finish reason if it ended the sequence."""

    text: str
    finish_reason: str | None = None


@dataclass
class OutputProcessor:
    """Per-sequence bookkeeping of generated tokens: text, stop strings, EOS and length."""

    params: SamplingParams
    eos_ids: frozenset[int]
    detok: IncrementalDetokenizer
    stops: StopMatcher = field(init=False)
    count: int = 0
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.params.stop)

    @classmethod
    def create(
        cls, params: SamplingParams, tokenizer: TokenDecoder, eos_ids: Sequence[int]
    ) -> OutputProcessor:
        return cls(params, frozenset(eos_ids), IncrementalDetokenizer(tokenizer))

    @property
    def text(self) -> str:
        return self.stops.text

    def push(self, token: int) -> Output:
        if self.finish_reason is not None:
            raise RuntimeError("push after the sequence finished")
        self.count += 1
        if token in self.eos_ids and not self.params.ignore_eos:
            # The EOS token itself is not text; whatever was held back is final now.
            return self._end(FINISH_STOP, "")
        out, stopped = self.stops.feed(self.detok.push(token))
        if stopped:
            self.finish_reason = FINISH_STOP
            return Output(out, FINISH_STOP)
        if self.count >= self.params.max_tokens:
            return self._end(FINISH_LENGTH, out)
        return Output(out)

    def _end(self, reason: str, out: str) -> Output:
        tail, stopped = self.stops.feed(self.detok.flush())
        self.finish_reason = FINISH_STOP if stopped else reason
        return Output(out + tail + ("" if stopped else self.stops.finish()), self.finish_reason)
