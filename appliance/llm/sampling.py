"""Turning logits into tokens and tokens into text, one sequence at a time.

- ``sample``: greedy at temperature 0, otherwise temperature, top-k and top-p with the request's
  own ``numpy`` generator, one draw per token, so what shares the batch never changes a
  sequence's random numbers. A seed fixes those draws, not the logits: on the CPU with
  ``generation.q4_int8_decode`` on (the default) the int8 kernels sum a row in an order that
  depends on the rows in the step, so a near-tie may flip and a seeded (or greedy) completion can
  differ with what shares its batch; with it off, the logits move with the batch by at most ~2e-4.
- ``IncrementalDetokenizer``: text deltas that never split a multi-byte UTF-8 character (a byte
  level BPE token may hold half of one; the decoder shows that as U+FFFD until the rest arrives).
- ``StopMatcher``: stop strings on the decoded text, holding back any tail that could still grow
  into a stop string so that a stream never shows part of one (incrementally: the work per token
  is proportional to its characters, however long the stop strings or the text).
- ``OutputProcessor``: the three together plus EOS, ``stop_token_ids``, ``min_tokens`` and
  ``max_tokens``: one call per sampled token, and, for reasoning models, the split of the released
  text into thinking and answer (``appliance.llm.reasoning``; stop strings apply to the raw text,
  as in vLLM).
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
    # vLLM's extensions: the sequence also ends when one of these ids is sampled (not text, as
    # EOS), and neither they, EOS nor stop strings end it before min_tokens tokens.
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0

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


def sample(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, banned: Sequence[int] = ()
) -> int:
    """One token id from a row of logits [vocab], never one of ``banned``. Draws exactly one
    random number when sampling, so a seeded sequence draws the same numbers token by token (also
    across preemption); whether they pick the same tokens depends on its logits (see above)."""
    vocab = logits.shape[-1]
    # Only ids of this vocabulary: an EOS id past it (a generation config that disagrees with the
    # exported head) raised IndexError here and failed the whole decode step's batch.
    banned = [i for i in banned if 0 <= i < vocab]
    if banned:
        masked = logits.copy()  # the row is the batch's
        masked[banned] = -np.inf
        # A ban that leaves no token possible (the service refuses such a request; this is the
        # backstop) is ignored: banned, argmax took token 0 of all -inf, and sampling divided by
        # a NaN sum and took the last id, with a numpy RuntimeWarning on stderr.
        if masked.max() > -np.inf:
            logits = masked
    if params.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    ids = np.arange(x.shape[0])
    k = params.top_k
    if 0 < k < x.shape[0]:
        ids = np.argpartition(x, -k)[-k:]
        x = x[ids]
    u = rng.random()  # drawn whatever follows, so that the next token's draw is the same
    top = x.max()
    if not np.isfinite(top):
        # No distribution to draw from (every logit -inf, or an inf or NaN among them; a model
        # gives none of these): the argmax, as greedy, rather than NaN probabilities.
        return int(ids[np.argmax(x)])
    probs = np.exp(x - top)
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # The smallest set whose mass reaches top_p; always at least the most likely token.
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]
        ids, probs = ids[keep], probs[keep]
    cdf = np.cumsum(probs)
    pick = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
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
    """Finds the first stop string in the text; says how much text is safe to show so far.

    The first stop string is the one completed first (the sequence ends there; of two that end at
    the same character, the longer), whatever the pieces the text arrives in. Per stop string the
    matcher keeps the length of its longest prefix that the text ends with (the state of the
    Knuth-Morris-Pratt matcher), advanced by the new characters only; the tail held back is the
    longest of these. Testing every prefix against the text's end instead cost O(L^2) per token
    for stop strings of L characters, and appending each piece to one string copied the whole
    text per token: the work per piece is now proportional to its characters, however long the
    stop strings or the text. The failure function is built lazily, as far as the text has
    matched, so a long stop string costs nothing up front.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.sent = 0  # characters of the text already released
        self._pieces: list[str] = []  # the text as fed (cut where a stop string starts)
        self._length = 0
        self._at = 0  # the first piece not wholly released...
        self._off = 0  # ...and how many of its characters are
        self._matched = [0] * len(self.stops)  # per stop: its longest prefix the text ends with
        self._fail: list[list[int]] = [[0] for _ in self.stops]  # its prefix function, so far
        self._found = False

    @property
    def text(self) -> str:
        """The text so far, without a stop string found and what followed it."""
        return "".join(self._pieces)

    def _border(self, i: int, q: int) -> int:
        """The longest proper prefix of stop ``i``'s first ``q`` characters that is also their
        suffix (the KMP failure function), extending the table as far as ``q``."""
        s, fail = self.stops[i], self._fail[i]
        while len(fail) < q:
            j, k = len(fail), fail[-1]
            while k and s[j] != s[k]:
                k = fail[k - 1]
            fail.append(k + 1 if s[j] == s[k] else k)
        return fail[q - 1]

    def _release(self, upto: int) -> str:
        """The text from ``sent`` to ``upto``, now released (it walks the pieces it releases only)."""
        parts: list[str] = []
        k = upto - self.sent
        while k > 0:
            piece = self._pieces[self._at]
            rest = len(piece) - self._off
            if rest <= k:
                parts.append(piece[self._off :])
                self._at, self._off = self._at + 1, 0
                k -= rest
            else:
                parts.append(piece[self._off : self._off + k])
                self._off += k
                k = 0
        self.sent = max(self.sent, upto)
        return "".join(parts)

    def feed(self, delta: str, *, armed: bool = True) -> tuple[str, bool]:
        """Add ``delta``; return (text now safe to release, whether a stop string was found).
        Unless ``armed``, a stop string that ends inside ``delta`` is text (vLLM's min_tokens:
        stop strings count from the token after it); one that began in it may still end later."""
        if self._found:
            raise RuntimeError("feed after a stop string was found")
        base = self._length
        self._pieces.append(delta)
        self._length += len(delta)
        if not self.stops:
            return self._release(self._length), False
        first: tuple[int, int] | None = None  # (end, -length) of the stop string completed first
        for i, s in enumerate(self.stops):
            q, n = self._matched[i], len(s)
            for j, c in enumerate(delta):
                while q and s[q] != c:
                    q = self._border(i, q)
                if s[q] == c:
                    q += 1
                if q == n:
                    if armed:
                        hit = (base + j + 1, -n)
                        first = hit if first is None else min(first, hit)
                        break  # its later ends in the delta come after this one
                    q = self._border(i, q)
            self._matched[i] = q
        if first is not None:
            self._found = True
            out = self._release(first[0] + first[1])
            # The text ends where the stop string starts.
            if self._off:
                self._pieces[self._at] = self._pieces[self._at][: self._off]
                self._at, self._off = self._at + 1, 0
            del self._pieces[self._at :]
            self._length = self.sent
            return out, True
        return self._release(self._length - max(self._matched)), False

    def finish(self) -> str:
        """The held-back tail, released because the sequence ended without completing a stop."""
        return self._release(self._length)


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
        self._stop_ids = frozenset(self.params.stop_token_ids)
        # The ids that would end the sequence, kept from being sampled before min_tokens.
        enders = self._stop_ids if self.params.ignore_eos else self._stop_ids | self.eos_ids
        self._enders = tuple(sorted(enders))

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

    def suppressed(self) -> tuple[int, ...]:
        """The token ids the next token must not be (vLLM's min_tokens: EOS and the stop token
        ids until that many tokens)."""
        return self._enders if self.count < self.params.min_tokens else ()

    @property
    def _armed(self) -> bool:
        """Whether EOS, stop token ids and stop strings may end the sequence at the latest token."""
        return self.count > self.params.min_tokens

    def push(self, token: int) -> Output:
        if self.finish_reason is not None:
            raise RuntimeError("push after the sequence finished")
        self.count += 1
        if self._armed and (
            token in self._stop_ids or (token in self.eos_ids and not self.params.ignore_eos)
        ):
            # The EOS (or stop) token itself is not text; whatever was held back is final now.
            return self._end(FINISH_STOP, "")
        piece = self.detok.push(token)
        self._count_reasoning(piece)
        out, stopped = self.stops.feed(piece, armed=self._armed)
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
        tail, stopped = self.stops.feed(self.detok.flush(), armed=self._armed)
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
