"""The server's YAML configuration: load, validate, override from the environment, save atomically.

Errors name the file, the field path and what was expected; unknown keys are errors, because a
typo that is silently ignored is the worst kind of configuration bug.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import reprlib
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, FiniteFloat, StrictBool, ValidationError
from pydantic_core import PydanticCustomError

from appliance import settings, yamlfile

DEFAULT_CONFIG_NAME = "appliance.yaml"

# The few settings deployments change without editing the file (systemd EnvironmentFile, CI).
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "APPLIANCE_HOST": ("server", "host"),
    "APPLIANCE_PORT": ("server", "port"),
    "APPLIANCE_MODEL_REPOSITORY": ("model_repository",),
    "APPLIANCE_DATA_DIR": ("data_dir",),
    "APPLIANCE_LOG_LEVEL": ("server", "log_level"),
    "APPLIANCE_ADMIN_TOKEN": ("admin", "token"),
}


class ConfigError(ValueError):
    pass


def _not_a_bool(expected: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        # YAML's true/false are Python bools, and pydantic takes a bool for the number 1 or 0:
        # `server.port: true` bound port 1. Numeric strings stay accepted (APPLIANCE_PORT is one).
        if isinstance(value, bool):
            raise PydanticCustomError("number_type", f"input should be {expected}, not true or false")
        return value

    return BeforeValidator(check)


# The sections' numbers and switches, as strict as the settings registry's (settings.Setting.check):
# an int or float is never a bool, a bool is only true or false (not 1, "yes" or "off").
Int = Annotated[int, _not_a_bool("an integer")]
# Finite too: `drain_timeout_s: .inf` let a drain wait for ever, and NaN passes no bound check.
Float = Annotated[FiniteFloat, _not_a_bool("a number")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSection(_Strict):
    host: str = "127.0.0.1"
    port: Int = Field(8000, ge=0, le=65535)
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    log_format: str = Field("json", pattern="^(json|text)$")
    max_body_bytes: Int = Field(16 * 1024 * 1024, ge=1024)
    # Models /readyz waits for; None means every model in the repository that is built.
    default_models: list[str] | None = None
    drain_timeout_s: Float = Field(30.0, ge=0)
    # A client must send its whole body within this (aiohttp has no body deadline of its own).
    read_timeout_s: Float = Field(30.0, gt=0)
    # Idle and header-trickling connections are closed after this (slowloris).
    keepalive_timeout_s: Float = Field(15.0, gt=0)
    max_connections: Int = Field(1024, ge=1)
    # A connection whose client has received nothing of a pending response for this long is
    # aborted (nginx's send_timeout): a client that stops reading would otherwise hold its
    # handler, its buffered response and a busy connection slot forever.
    send_timeout_s: Float = Field(60.0, gt=0)
    # Cheap protection for the event loop, before a body is read: past these request rates a
    # minimal 503 with Retry-After is answered at once (0 = no ceiling).
    max_request_rate: Float = Field(20000.0, ge=0)
    max_connection_request_rate: Float = Field(5000.0, ge=0)
    # A stream waiting in the queue sends an SSE comment this often until its first token.
    sse_keepalive_s: Float = Field(15.0, gt=0)
    # How long a thread may hold the GIL while another waits for it (sys.setswitchinterval;
    # Python's default is 5 ms). An engine worker whose call has returned waits that long for the
    # GIL behind a busy event loop before it can hand its batch back and start the next one.
    gil_switch_interval_ms: Float = Field(0.5, gt=0, le=100)


class AdminSection(_Strict):
    # The admin plane listens on loopback only; over TCP it also wants this token. Without one
    # configured, a random token is written to <data_dir>/admin.token (mode 0600) at start.
    token: str | None = None
    # Unix socket path (relative to the config file); unset: <data_dir>/admin.sock (the one
    # place the service may write under ProtectSystem=strict); "" disables it.
    socket: str | None = None
    # Loopback TCP port; 0 picks a free one, -1 disables TCP.
    port: Int = Field(8001, ge=-1, le=65535)


class KeyEntry(_Strict):
    name: str
    hash: str
    max_priority: Int | None = Field(None, ge=1)
    rate_per_s: Float | None = Field(None, gt=0)
    revoked: StrictBool = False


class AuthSection(_Strict):
    # Only salted scrypt hashes live here; `appliance keys add NAME` prints a key once.
    keys: list[KeyEntry] = Field(default_factory=list)
    # None: keys are required as soon as one exists (a fresh dev checkout stays open).
    required: StrictBool | None = None
    metrics_public: StrictBool = True


class TlsSection(_Strict):
    certificate: str | None = None
    key: str | None = None


class FileConfig(_Strict):
    server: ServerSection = ServerSection()
    admin: AdminSection = AdminSection()
    auth: AuthSection = AuthSection()
    tls: TlsSection = TlsSection()
    model_repository: str = "engines"
    data_dir: str = "data"
    defaults: dict[str, Any] = Field(default_factory=dict)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)


@dataclass
class Config:
    """The validated configuration, with paths resolved against the file's directory."""

    path: Path | None
    file: FileConfig
    defaults: dict[str, settings.SettingValue] = field(default_factory=dict)
    model_overrides: dict[str, dict[str, settings.SettingValue]] = field(default_factory=dict)

    @property
    def server(self) -> ServerSection:
        return self.file.server

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    @property
    def model_repository(self) -> Path:
        return (self.base_dir / self.file.model_repository).resolve()

    @property
    def data_dir(self) -> Path:
        return (self.base_dir / self.file.data_dir).resolve()

    @property
    def admin_socket(self) -> Path | None:
        socket = self.file.admin.socket
        if socket is None:
            return self.data_dir / "admin.sock"
        return (self.base_dir / socket).resolve() if socket else None

    def tunables_for(self, model: str, model_yaml: Mapping[str, Any]) -> dict[str, Any]:
        """Registry defaults < appliance.yaml defaults < model.yaml < appliance.yaml models.<m>."""
        values: dict[str, Any] = settings.defaults()
        values.update(self.defaults)
        values.update(model_yaml)
        values.update(self.model_overrides.get(model, {}))
        return values

    def setting_for(self, model: str, model_yaml: Mapping[str, Any], name: str) -> Any:
        """``tunables_for(model, model_yaml)[name]`` without building them all: the keep-alive
        check reads one setting of each model every second, and ~60-setting dicts for 2,000
        models were a few ms of the event loop's each second."""
        for layer in (self.model_overrides.get(model, {}), model_yaml, self.defaults):
            if name in layer:
                return layer[name]
        return settings.REGISTRY[name].default


def _where(path: Path | None) -> str:
    return f"{path.name if path else '<defaults>'}: "


def _format_pydantic(where: str, exc: ValidationError, from_env: Mapping[str, str] | None = None) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        var = (from_env or {}).get(loc)
        source = f"{var} (overrides {loc})" if var else f"{where}{loc}"
        if err["type"] == "extra_forbidden":
            parts.append(f"{source}: unknown key")
        else:
            parts.append(f"{source}: {err['msg'].lower()}, got {reprlib.repr(err.get('input'))}")
    return "; ".join(parts)


def parse(raw: Any, path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    where = _where(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}expected a mapping at the top level, got {type(raw).__name__}")
    environ = os.environ if env is None else env
    raw = _apply_env(dict(raw), environ)
    try:
        file = FileConfig.model_validate(raw)
    except ValidationError as exc:
        # A value an environment variable set is that variable's fault, not the file's.
        from_env = {".".join(keys): var for var, keys in ENV_OVERRIDES.items() if var in environ}
        raise ConfigError(_format_pydantic(where, exc, from_env)) from None
    try:
        defaults = settings.validate(settings.flatten(file.defaults), where=f"{where}defaults.")
        overrides = {
            name: settings.validate(settings.flatten(tree), where=f"{where}models.{name}.", per_model=True)
            for name, tree in file.models.items()
        }
    except settings.SettingError as exc:
        raise ConfigError(exc.detail) from None
    return Config(path=path, file=file, defaults=defaults, model_overrides=overrides)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    for var, keys in ENV_OVERRIDES.items():
        if var not in env:
            continue
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{var}: cannot override {'.'.join(keys)}, it is not a mapping")
        node[keys[-1]] = env[var]
    return raw


def load(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (or built-in defaults when None)."""
    if path is None:
        return parse({}, None, env)
    if not os.path.lexists(path):
        raise ConfigError(f"{path}: no such configuration file")
    try:
        raw = yamlfile.read(path)
    except yamlfile.YamlFileError as exc:
        raise ConfigError(str(exc)) from None
    return parse(raw, path.resolve(), env)


def changed_sections(
    cfg: Config,
    defaults: Mapping[str, settings.SettingValue],
    overrides: Mapping[str, Mapping[str, settings.SettingValue]],
) -> list[str]:
    """Which of ``defaults`` and ``models`` differ from the running configuration's. A model with
    no override left counts as absent, as the file leaves it out."""
    changed = ["defaults"] if dict(defaults) != cfg.defaults else []
    if {m: dict(v) for m, v in overrides.items() if v} != {m: v for m, v in cfg.model_overrides.items() if v}:
        changed.append("models")
    return changed


def _on_disk(cfg: Config) -> tuple[dict[str, Any], str]:
    """The configuration file as it is now, to rewrite one part of it. Refuses (ConfigError)
    when it is gone, empty or no longer a valid mapping: rewriting it from the running values
    would silently drop the server, admin and path sections, or an operator's edit."""
    assert cfg.path is not None
    if not os.path.lexists(cfg.path):
        raise ConfigError(f"{cfg.path}: the configuration file is gone; restore it, nothing was saved")
    try:
        text = yamlfile.read_text(cfg.path)
        raw = yamlfile.parse(cfg.path, text)
    except yamlfile.YamlFileError as exc:
        raise ConfigError(f"{exc}; fix it (or reload), nothing was saved") from None
    if raw is None or raw == {}:
        # As a reload refuses it: an empty file (or one of comments only) is most likely one being
        # rewritten, or truncated by a full disk. Rewritten from it, the file would keep only the
        # part being saved, and the .bak would hold the empty file.
        raise ConfigError(
            f"{cfg.path}: the file is empty (being rewritten, or truncated?); restore it, nothing was saved"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg.path}: expected a mapping at the top level; fix it, nothing was saved")
    return raw, text


# The first line of a file this program rewrote, with the digest of the rest. A file that still
# matches it is the program's own copy; one that does not (or has no such line) was written or
# edited by hand, and it is what the .bak keeps. In the file itself, it holds across restarts and
# between the server and the `appliance keys` commands.
_WRITTEN_BY = (
    "# Written by appliance, which does not keep comments: the last hand-edited file is {bak}. "
    "sha256:{digest}\n"
)
_WRITTEN_BY_RE = re.compile(r"# Written by appliance\b[^\n]* sha256:([0-9a-f]{64})\n")


def _written_by_us(text: str) -> bool:
    """Whether ``text`` is a file this program wrote that nobody has edited since."""
    match = _WRITTEN_BY_RE.match(text)
    return match is not None and hashlib.sha256(text[match.end() :].encode()).hexdigest() == match[1]


def _rewrite(path: Path, raw: dict[str, Any], before: str) -> None:
    """Write ``raw`` over ``path``, whose text was ``before``: atomically, and with ``before`` kept
    as ``.bak`` unless it is only this program's own copy (see save_settings)."""
    body = yaml.safe_dump(raw, sort_keys=False, default_flow_style=False)
    header = _WRITTEN_BY.format(bak=f"{path.name}.bak", digest=hashlib.sha256(body.encode()).hexdigest())
    atomic_write(path, (header + body).encode("utf-8"), backup=not _written_by_us(before))


def _refuse_edits_not_reloaded(cfg: Config, raw: dict[str, Any]) -> None:
    """Refuses (ConfigError) when the file's defaults or models are not the running ones: edited
    on disk and not reloaded yet. A save rewrites those sections from the running values, so it
    would silently revert such an edit."""
    reload = "reload first (systemctl reload appliance, or SIGHUP), then apply the change again"
    try:
        on_disk = parse({k: raw[k] for k in ("defaults", "models") if k in raw}, cfg.path, env={})
    except ConfigError as exc:
        raise ConfigError(f"{exc} (edited and not reloaded?); fix it, {reload}; nothing was saved") from None
    changed = changed_sections(cfg, on_disk.defaults, on_disk.model_overrides)
    if changed:
        raise ConfigError(
            f"{cfg.path}: {' and '.join(changed)} in the file differ from the running configuration "
            f"(edited and not reloaded?); {reload}; nothing was saved"
        )


def save_settings(
    cfg: Config,
    defaults: Mapping[str, settings.SettingValue],
    overrides: Mapping[str, Mapping[str, settings.SettingValue]],
) -> None:
    """Persist tunables (server-wide and per model) into the config file atomically, with a backup.

    PyYAML does not keep comments, so the operator's last hand-written file stays next to it as
    ``.bak`` (the README says so). A save replaces ``.bak`` only when the file on disk is not
    this program's own last copy (its first line's digest no longer matches, or it has none):
    saving over the program's copy keeps the ``.bak`` as it is, or a second save would replace
    the operator's file, comments and all, with the first save's copy. Callers save only what
    changes (a no-op PATCH writes nothing), so an untouched file keeps its comments in place.

    Refuses (ConfigError, nothing written) when the file's ``defaults`` or ``models`` are not the
    running ones: an edit on disk that a reload has not applied yet would be reverted.
    """
    if cfg.path is None:
        return
    raw, before = _on_disk(cfg)
    _refuse_edits_not_reloaded(cfg, raw)
    for key, tree in (
        ("defaults", settings.nest(defaults)),
        ("models", {m: settings.nest(v) for m, v in sorted(overrides.items()) if v}),
    ):
        if tree:
            raw[key] = tree
        else:
            raw.pop(key, None)
    _rewrite(cfg.path, raw, before)


def atomic_write(path: Path, data: bytes, *, backup: bool = False) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            # The new file keeps the old one's mode and, where allowed, its owner (the config
            # is root:appliance 0660 on an installed box, whoever rewrites it).
            st = path.stat()
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            with contextlib.suppress(PermissionError):
                os.chown(tmp, st.st_uid, st.st_gid)
        if backup and path.exists():
            bak = path.with_name(path.name + ".bak")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bak)
            os.link(path, bak)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_keys(cfg: Config, records: list[dict[str, Any]]) -> None:
    """Write ``auth.keys`` into the config file atomically (with a backup as save_settings
    keeps one), nothing else."""
    if cfg.path is None:
        raise ConfigError("no configuration file to store keys in; pass --config")
    raw, before = _on_disk(cfg)
    auth = raw.setdefault("auth", {})
    if not isinstance(auth, dict):
        raise ConfigError(f"{cfg.path}: auth: expected a mapping; fix it, nothing was saved")
    auth["keys"] = records
    _rewrite(cfg.path, raw, before)


def find_default_config() -> Path | None:
    """``./appliance.yaml`` if present; the CLI passes ``--config`` otherwise."""
    p = Path.cwd() / DEFAULT_CONFIG_NAME
    return p if p.exists() else None
