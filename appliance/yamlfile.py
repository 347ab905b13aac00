"""Reading the operator's YAML files (appliance.yaml, each model.yaml) strictly and within bounds.

These files are small, hand-edited mappings. What PyYAML's safe loader allows beyond that only
hurts here: an alias bomb (a few lines of ``&a [*b, *b, ...]`` that expand to billions of items)
hung start-up, ``check-config`` and a SIGHUP reload on the event loop; a duplicated key silently
let the last one win; a 200-MB file blocked the loop for minutes; a 5,000-digit integer (Python's
int-to-string limit: ValueError) or a few thousand ``[`` (RecursionError) escaped as tracebacks and
kept the server from starting. So: at most ``MAX_BYTES``, UTF-8, no aliases, no duplicate keys, at
most ``MAX_DEPTH`` nested collections, and every failure is one :class:`YamlFileError` naming the
file and, where the parser knows it, the line, whatever it was (unreadable, a directory, a symlink
loop, not UTF-8, not YAML, a value Python cannot hold).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
# Nested mappings and lists: a configuration needs a handful. The composer recurses once per level,
# so far below the interpreter's recursion limit, whatever the caller's stack already holds.
MAX_DEPTH = 64


class YamlFileError(ValueError):
    """``path: reason``; callers that name the file their own way use ``reason``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class _StrictLoader(yaml.SafeLoader):
    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here", mark)
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {str(key)[:80]!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def loads(text: str) -> Any:
    """``yaml.safe_load`` without aliases, duplicate keys or deep nesting (raises yaml.YAMLError,
    or ValueError for a value Python refuses, such as an integer of more than 4,300 digits)."""
    return yaml.load(text, Loader=_StrictLoader)


def read(path: Path, *, max_bytes: int = MAX_BYTES) -> Any:
    """The parsed file; YamlFileError naming ``path`` for anything that keeps it from parsing."""
    return parse(path, read_text(path, max_bytes=max_bytes))


def read_text(path: Path, *, max_bytes: int = MAX_BYTES) -> str:
    """The file's text, within the same bounds as :func:`read` (for a caller that also needs the
    exact text it parsed, read once)."""
    try:
        # Non-blocking, and a regular file only: opening a FIFO named model.yaml blocked the event
        # loop (a rescan runs there) until a writer came, and the whole server with it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise YamlFileError(path, "not a regular file")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise YamlFileError(path, f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise YamlFileError(path, f"larger than {max_bytes} bytes; not a configuration file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlFileError(path, f"not UTF-8 text (byte {exc.start})") from None
    return text


def parse(path: Path, text: str) -> Any:
    """``text``, read from ``path``, parsed as :func:`read` does."""
    try:
        return loads(text)
    except yaml.YAMLError as exc:
        raise YamlFileError(path, f"not valid YAML: {exc}") from None
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        # Raised by a constructor (int(), a timestamp, base64) without a line: still this file's
        # fault, and one broken file must not escape as a traceback that stops the server.
        if isinstance(exc, RecursionError):
            detail = "nested too deep"
        elif isinstance(exc, ValueError) and "int_max_str_digits" in str(exc):
            detail = "an integer too long to read: more than 4,300 digits"
        else:
            detail = f"{type(exc).__name__}: {str(exc)[:200]}"
        # Not Python's own advice (sys.set_int_max_str_digits), which a user cannot act on.
        raise YamlFileError(path, f"a value cannot be read ({detail})") from None
