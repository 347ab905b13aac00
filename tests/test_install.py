"""install.sh: lint, dry run, and a real unprivileged --prefix install, upgrade and uninstall."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "install.sh"
# pip's own messages when it cannot reach an index: the environment is offline, not the
# installer broken.
OFFLINE = re.compile(
    r"Temporary failure in name resolution|NewConnectionError|Network is unreachable"
    r"|No matching distribution found|Could not find a version that satisfies"
)


def run_installer(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    full_env.pop("DESTDIR", None)
    return subprocess.run(
        ["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
    )


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)"
)
def test_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_posix_syntax_and_truncation_guard() -> None:
    for shell in ("sh", "dash", "bash"):
        if shutil.which(shell):
            proc = subprocess.run([shell, "-n", str(SCRIPT)], capture_output=True, text=True)
            assert proc.returncode == 0, f"{shell}: {proc.stderr}"
    lines = [line for line in SCRIPT.read_text().splitlines() if line.strip()]
    assert lines[0] == "#!/bin/sh"
    assert "set -eu" in lines
    # Nothing but definitions before this line: a truncated download runs nothing.
    assert lines[-1] == 'main "$@"'
    assert SCRIPT.read_text().count('main "$@"') == 1


def test_help_and_bad_options() -> None:
    proc = run_installer("--help")
    assert proc.returncode == 0
    for option in ("--prefix", "--dry-run", "--cpu", "--no-start", "--no-models", "--uninstall", "--purge"):
        assert option in proc.stdout
    assert run_installer("--frobnicate").returncode != 0
    assert run_installer("--purge").returncode != 0  # only with --uninstall
    assert run_installer("--prefix").returncode != 0


def test_dry_run_prints_actions_and_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    proc = run_installer("--dry-run", "--prefix", str(prefix), "--no-start", "--cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert not prefix.exists()
    venv = f"{prefix}/opt/appliance/venv"
    expected = [
        f"[dry-run] install -d -m 0750 {prefix}/var/lib/appliance/engines",
        f"[dry-run] install -d -m 0750 {prefix}/var/lib/appliance/data",
        f"-m venv {venv}",
        f"[dry-run] {venv}/bin/python -m pip install",
        f"{ROOT}[tui]",  # --cpu: no GPU extra
        f"[dry-run] write {prefix}/etc/appliance/appliance.yaml (mode 0660)",
        f"[dry-run] write {prefix}/etc/appliance/appliance.env (mode 0640)",
        f"[dry-run] write {prefix}/etc/systemd/system/appliance.service (mode 0644)",
        f"{venv}/bin/appliance --config {prefix}/etc/appliance/appliance.yaml models pull all-minilm-l6-v2"
        f" --repository {prefix}/var/lib/appliance/engines",
        "models pull smollm2-135m-instruct",
        "keys add default",
        "dry run: nothing was changed",
    ]
    for text in expected:
        assert text in out, text
    assert "[gpu" not in out and "gpu,tui" not in out
    # The config it would write points into the prefix.
    assert f"model_repository: {prefix}/var/lib/appliance/engines" in out
    # --prefix: no system user, no systemd.
    for command in ("useradd", "usermod", "chown", "systemctl"):
        assert f"[dry-run] {command}" not in out, command


def test_dry_run_no_models(tmp_path: Path) -> None:
    proc = run_installer("--dry-run", "--prefix", str(tmp_path / "r"), "--no-models", "--cpu")
    assert proc.returncode == 0
    assert "models pull" not in proc.stdout


def test_dry_run_uninstall_purge_removes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    for d in ("opt/appliance/venv/bin", "etc/appliance", "var/lib/appliance/data", "etc/systemd/system"):
        (prefix / d).mkdir(parents=True)
    (prefix / "etc/systemd/system/appliance.service").write_text("[Unit]\n")
    before = listing(prefix)
    proc = run_installer("--dry-run", "--prefix", str(prefix), "--uninstall", "--purge")
    assert proc.returncode == 0, proc.stderr
    assert f"[dry-run] rm -rf {prefix}/opt/appliance" in proc.stdout
    assert f"[dry-run] rm -rf {prefix}/etc/appliance {prefix}/var/lib/appliance" in proc.stdout
    assert listing(prefix) == before


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_prefix_install_upgrade_uninstall(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    args = ("--prefix", str(prefix), "--cpu", "--no-start", "--no-models")
    first = run_installer(*args, timeout=600)
    if first.returncode != 0 and OFFLINE.search(first.stderr):
        pytest.skip("pip cannot reach a package index here: " + first.stderr.strip().splitlines()[-1])
    assert first.returncode == 0, first.stdout + first.stderr

    venv = prefix / "opt/appliance/venv"
    entry = venv / "bin/appliance"
    config = prefix / "etc/appliance/appliance.yaml"
    env_file = prefix / "etc/appliance/appliance.env"
    unit = prefix / "etc/systemd/system/appliance.service"
    data = prefix / "var/lib/appliance/data"
    for path in (config, env_file, unit):
        assert path.is_file(), path
    assert (prefix / "var/lib/appliance/engines").is_dir() and data.is_dir()
    assert os.access(entry, os.X_OK)
    version = subprocess.run([str(entry), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "appliance" in version.stdout
    assert stat.S_IMODE(config.stat().st_mode) == 0o660  # key hashes: root and the service only

    cfg = yaml.safe_load(config.read_text())
    assert cfg["server"] == {"host": "0.0.0.0", "port": 8000}
    assert cfg["model_repository"] == f"{prefix}/var/lib/appliance/engines"
    assert cfg["data_dir"] == str(data)
    # The repository starts from the shipped model.yaml files, ready for `models pull`.
    listed = subprocess.run(
        [str(entry), "--config", str(config), "models", "list"], capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert "all-minilm-l6-v2" in listed.stdout and "smollm2-135m-instruct" in listed.stdout
    assert "no (missing" in listed.stdout
    unit_text = unit.read_text()
    assert f"ExecStart={entry} --config {config} serve" in unit_text
    assert f"EnvironmentFile=-{env_file}" in unit_text
    assert "Run it:" in first.stdout and str(entry) in first.stdout

    # The operator edits the config and drops data in; a re-run is an upgrade that keeps both.
    edited = config.read_text().replace("port: 8000", "port: 8123") + "# edited by hand\n"
    config.write_text(edited)
    env_file.write_text("APPLIANCE_LOG_LEVEL=debug\n")
    (data / "cache.sqlite").write_bytes(b"precious")
    second = run_installer(*args, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "keeping the existing" in second.stdout
    assert config.read_text() == edited
    assert env_file.read_text() == "APPLIANCE_LOG_LEVEL=debug\n"
    assert (data / "cache.sqlite").read_bytes() == b"precious"
    assert os.access(entry, os.X_OK)

    removed = run_installer("--prefix", str(prefix), "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not (prefix / "opt/appliance").exists()
    assert not unit.exists()
    assert config.read_text() == edited
    assert (data / "cache.sqlite").read_bytes() == b"precious"

    purged = run_installer("--prefix", str(prefix), "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not (prefix / "etc/appliance").exists()
    assert not (prefix / "var/lib/appliance").exists()
