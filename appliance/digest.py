"""The one SHA-256 of files in this code base: artefact digests, TensorRT plan keys, build sources.
No dependencies, so every layer may use it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sha256_files(paths: Any, *, labelled: bool = False) -> str:
    """The one SHA-256 of files in this code base (artefact digests, plan keys, build sources).

    Each ONNX file's ``<name>.data`` external weights count with it: a model whose weights change
    but whose graph file does not must not keep its identity. Missing ``.data`` files are skipped.
    ``labelled`` mixes each file's name in, so renaming an artefact changes the digest too.
    """
    h = hashlib.sha256()
    for path in paths:
        p = Path(path)
        for part in (p, p.with_name(p.name + ".data")):
            if part is not p and not part.exists():
                continue
            if labelled:
                h.update(part.name.encode())
            with part.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()
