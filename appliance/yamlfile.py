"""Reading the operator's YAML files (appliance.yaml, each model.yaml) strictly and within bounds.

These files are small, hand-edited mappings. What PyYAML's safe loader allows beyond that only
hurts here: an alias bomb (a few lines of ``&a [*b, *b, ...]`` that expand to billions of items)
hung start-up, ``check-config`` and a SIGHUP reload on the event loop; a duplicated key silently
let the last one win; a 200-MB file blocked the loop for minutes. So: at most ``MAX_BYTES``, UTF-8,
no aliases, no duplicate keys, and every failure is one :class:`YamlFileError` naming the file and
the line, whatever it was (unreadable, a directory, a symlink loop, not UTF-8, not YAML).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20


class YamlFileError(ValueError):
    """``path: reason``; callers that name the file their own way use ``reason``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here", mark)
        return super().compose_node(parent, index)

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
    """``yaml.safe_load`` without aliases or duplicate keys (raises yaml.YAMLError)."""
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
