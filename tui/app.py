"""Entry points of the console: ``appliance-tui`` (``main``) and ``appliance tui`` (``run``).

Only the standard library and the admin client are imported at module level, so a missing
``[tui]`` extra (textual) is reported as one line with the fix instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from appliance.config import Config, ConfigError, find_default_config, load
from tui.client import AdminClient

DEFAULT_URL = "http://127.0.0.1:8001"
TOKEN_ENV = "APPLIANCE_ADMIN_TOKEN"


def discover(
    url: str | None = None,
    socket: str | None = None,
    token: str | None = None,
    config: str | None = None,
) -> AdminClient:
    """Find the admin plane the way the server publishes it.

    An explicit ``--socket`` or ``--url`` wins. Otherwise the server's config file (``--config`` or
    ./appliance.yaml) names the Unix socket, which needs no token and is used when this user may
    open it; else loopback TCP on the configured port, with the token from the config, the
    environment or ``<data_dir>/admin.token``.
    """
    if socket:
        return AdminClient(socket=socket, token=token)
    cfg = _load_config(config)
    path = cfg.admin_socket if url is None and cfg is not None else None
    if path is not None and path.exists() and os.access(path, os.R_OK | os.W_OK):
        return AdminClient(socket=path, token=token)
    if url is None:
        port = cfg.file.admin.port if cfg is not None and cfg.file.admin.port > 0 else 8001
        url = f"http://127.0.0.1:{port}"
    if not token:
        token = os.environ.get(TOKEN_ENV) or _token_from(cfg)
    return AdminClient(url, token=token)


def _load_config(config: str | None) -> Config | None:
    try:
        return load(Path(config) if config else find_default_config())
    except (ConfigError, OSError):
        # No readable config here (the console run from another directory): flags, env, defaults.
        return None


def _token_from(cfg: Config | None) -> str | None:
    if cfg is None:
        return None
    if cfg.file.admin.token:
        return cfg.file.admin.token
    try:
        return (cfg.data_dir / "admin.token").read_text().strip() or None
    except OSError:  # not there yet, or this user may not read it: the header will say 401
        return None


def run(
    *,
    url: str | None = None,
    socket: str | None = None,
    token: str | None = None,
    read_only: bool = False,
    interval: float = 1.0,
    config: str | None = None,
) -> int:
    try:
        from tui.console import ConsoleApp
    except ImportError as exc:
        print(
            f"appliance tui: the console needs the [tui] extra ({exc}); pip install 'appliance[tui]'",
            file=sys.stderr,
        )
        return 1
    if interval <= 0:
        print("appliance tui: --interval must be > 0", file=sys.stderr)
        return 2
    client = discover(url, socket, token, config)
    ConsoleApp(client, read_only=read_only, interval=interval).run()
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The console's flags, shared by ``appliance-tui`` and ``appliance tui``."""
    p.add_argument("--url", help=f"admin API base URL (default: from the config, else {DEFAULT_URL})")
    p.add_argument("--socket", help="admin Unix socket path (no token needed)")
    p.add_argument(
        "--token", help=f"admin token for TCP (default: ${TOKEN_ENV}, else <data_dir>/admin.token)"
    )
    p.add_argument("--read-only", action="store_true", help="hide every action that changes the server")
    p.add_argument("--interval", type=float, default=1.0, help="refresh interval in seconds (default 1)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="appliance-tui", description="Operator console for the appliance.")
    p.add_argument("--config", "-c", help="the server's appliance.yaml, to find its admin socket and token")
    add_arguments(p)
    return run_from(p.parse_args(argv))


def run_from(args: argparse.Namespace) -> int:
    """Run with the flags ``add_arguments`` defined (plus ``config``)."""
    return run(
        url=args.url,
        socket=args.socket,
        token=args.token,
        read_only=args.read_only,
        interval=args.interval,
        config=args.config,
    )


if __name__ == "__main__":
    sys.exit(main())
