"""Turning logits into tokens and tokens into text, one sequence at a time.

- ``sample``: greedy at temperature 0, otherwise temperature, top-k and top-p with the request's
  own ``numpy`` generator, so a seed reproduces a completion whatever else shares the batch.
- ``IncrementalDetokenizer``: text deltas that never split a multi-byte UTF-8 character (a byte
  level BPE token may hold half of one; the decoder shows that as U+FFFD until the rest arrives).
- ``StopMatcher``: stop strings on the decoded text, holding back any tail that could still grow
  into a stop string so that a stream never shows part of one.
- ``OutputProcessor``: the three together plus EOS and ``max_tokens``: one call per sampled token,
  and, for reasoning models, the split of the released text into thinking and answer
  (``appliance.llm.reasoning``; stop strings apply to the raw text, as in vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from appliance.llm.reasoning import END, DeepSeekR1Parser

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS).
GREEDY_BELOW = 1e-5


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
        # vLLM's rule: a temperature this small is greedy. Divided by a subnormal one (1e-320)
        # the logits overflowed to inf, the probabilities to NaN, and every token was the last id.
        return self.temperature < GREEDY_BELOW

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
        """Whatever is still held back, at the end of the sequence. The bytes of a character
        the sequence ended in the middle of (a length cut through an emoji) are dropped: they
        would show as U+FFFD, a character the model never wrote."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :].rstrip("\ufffd")


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
    """What one sampled token adds: text to release (the answer part, for a reasoning model, and
    its thinking part in ``reasoning``), and the finish reason if it ended the sequence."""

    text: str
    finish_reason: str | None = None
    reasoning: str = ""


@dataclass
class OutputProcessor:
    """Per-sequence bookkeeping of generated tokens: text, stop strings, EOS and length."""

    params: SamplingParams
    eos_ids: frozenset[int]
    detok: IncrementalDetokenizer
    reasoning: DeepSeekR1Parser | None = None
    stops: StopMatcher = field(init=False)
    count: int = 0
    finish_reason: str | None = None
    # Tokens up to and including the one that closed the thinking (None without a parser).
    reasoning_tokens: int | None = None
    _raw_tail: str = ""  # the last characters of raw text, to see </think> split across tokens
    _thinking: bool = True

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.params.stop)
        if self.reasoning is not None:
            self.reasoning_tokens = 0

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        tokenizer: TokenDecoder,
        eos_ids: Sequence[int],
        reasoning: DeepSeekR1Parser | None = None,
    ) -> OutputProcessor:
        return cls(params, frozenset(eos_ids), IncrementalDetokenizer(tokenizer), reasoning)

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
        piece = self.detok.push(token)
        self._count_reasoning(piece)
        out, stopped = self.stops.feed(piece)
        if stopped:
            return self._split(out, FINISH_STOP)
        if self.count >= self.params.max_tokens:
            return self._end(FINISH_LENGTH, out)
        return self._split(out, None)

    def _count_reasoning(self, piece: str) -> None:
        """Count the token as thinking while no ``</think>`` has appeared in the raw text (the
        token that completes it counts too), ahead of any hold-back by stop strings."""
        if self.reasoning_tokens is None or not self._thinking:
            return
        self.reasoning_tokens += 1
        tail = self._raw_tail + piece
        self._thinking = END not in tail
        self._raw_tail = tail[-(len(END) - 1) :]

    def _end(self, reason: str, out: str) -> Output:
        tail, stopped = self.stops.feed(self.detok.flush())
        return self._split(
            out + tail + ("" if stopped else self.stops.finish()), FINISH_STOP if stopped else reason
        )

    def _split(self, out: str, finish_reason: str | None) -> Output:
        self.finish_reason = finish_reason
        if self.reasoning is None:
            return Output(out, finish_reason)
        reasoning, content = self.reasoning.feed(out)
        if finish_reason is not None:
            more_reasoning, more_content = self.reasoning.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        return Output(content, finish_reason, reasoning)
