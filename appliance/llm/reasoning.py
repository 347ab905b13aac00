"""Split a reasoning model's output into its thinking and its answer, as text arrives.

DeepSeek-R1 and its distills write ``<think>…</think>`` before the answer; their chat template
usually opens the ``<think>`` itself (the generation prompt ends in ``<｜Assistant｜><think>\\n``),
so the output often starts inside the thinking with no opening tag. The parser follows vLLM's
``deepseek_r1`` reasoning parser and llama.cpp's ``--reasoning-format deepseek``: everything up to
``</think>`` is reasoning (an opening ``<think>`` at the start is dropped), everything after it is
content, and an output that never closes the tag is all reasoning. Whitespace around the tags is
trimmed (the models write ``\\n\\n`` after ``</think>``), as DeepSeek's API returns it.

The parser is fed text deltas and returns ``(reasoning_delta, content_delta)``; text that might be
the start of a tag, or whitespace that might precede ``</think>``, is held back until the next
delta decides it, so tags split across tokens never leak into either part.
"""

from __future__ import annotations

START = "<think>"
END = "</think>"
# Values of ``generation.reasoning_parser`` (``auto``: what the builder recorded for the model).
PARSERS = ("none", "deepseek-r1")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class DeepSeekR1Parser:
    """Incremental ``<think>…</think>`` splitter for one generation."""

    def __init__(self) -> None:
        self._state = "start"  # "start" (nothing decided yet), "reasoning", "content"
        self._held = ""
        self._lead = True  # strip whitespace at the start of the current part

    @property
    def in_reasoning(self) -> bool:
        return self._state != "content"

    def feed(self, delta: str) -> tuple[str, str]:
        text, self._held = self._held + delta, ""
        reasoning = ""
        if self._state == "start":
            text = text.lstrip()
            if not text or (START.startswith(text) and text != START):
                self._held = text  # maybe "<thi…": wait for the rest
                return "", ""
            if text.startswith(START):
                text = text[len(START) :]
            self._state = "reasoning"
        if self._state == "reasoning":
            if self._lead:
                text = text.lstrip()
                self._lead = not text
            end = text.find(END)
            if end < 0:
                hold = _partial_suffix(text, END)
                out = text[: len(text) - hold]
                kept = out.rstrip()  # whitespace that may turn out to precede </think>
                self._held = out[len(kept) :] + text[len(text) - hold :]
                return kept, ""
            reasoning, text = text[:end].rstrip(), text[end + len(END) :]
            self._state, self._lead = "content", True
        if self._lead:
            text = text.lstrip()
            self._lead = not text
        return reasoning, text

    def finish(self) -> tuple[str, str]:
        """Flush what was held back once the generation has ended."""
        held, self._held = self._held, ""
        if self._state == "content":
            return "", held
        # A partial tag or trailing whitespace inside thinking that never closed: reasoning.
        return held.rstrip(), ""


def make_parser(name: str) -> DeepSeekR1Parser | None:
    if name == "none":
        return None
    if name == "deepseek-r1":
        return DeepSeekR1Parser()
    raise ValueError(f"unknown reasoning parser {name!r}; expected one of {', '.join(PARSERS)}")


__all__ = ["END", "PARSERS", "START", "DeepSeekR1Parser", "make_parser"]
