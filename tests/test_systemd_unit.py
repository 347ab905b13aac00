"""systemd/appliance.service: the directives we rely on, `verify` clean, exposure score gated.

`systemd-analyze` needs no running systemd (CI installs the `systemd` package for it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "appliance.service"
EXEC = "/opt/appliance/venv/bin/appliance"
# Exposure as `systemd-analyze security` prints it (0.0 best .. 10.0 worst); "OK" ends at 3.9.
MAX_EXPOSURE = 2.5

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    analyze is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections to ordered (key, value) pairs; systemd allows repeated keys (DeviceAllow=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"directive outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line}"
        current.append((key.strip(), value.strip()))
    return sections


UNIT_TEXT = UNIT.read_text()
SECTIONS = parse_unit(UNIT_TEXT)


def values(section: str, key: str) -> list[str]:
    return [v for k, v in SECTIONS.get(section, []) if k == key]


def one(section: str, key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"[{section}] {key}= expected once, found {found}"
    return found[0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert match, value
    return float(match[1]) * (60 if match[2] in ("min", "m") else 1)


def test_supervision_directives() -> None:
    assert one("Service", "Type") == "notify"
    assert one("Service", "NotifyAccess") == "main"
    assert seconds(one("Service", "WatchdogSec")) == 30
    assert one("Service", "Restart") == "on-failure"
    assert int(one("Unit", "StartLimitBurst")) >= 2
    assert seconds(one("Unit", "StartLimitIntervalSec")) >= 60
    # The server drains for 30 s; systemd must not SIGKILL it before that is over.
    assert seconds(one("Service", "TimeoutStopSec")) >= 45
    assert seconds(one("Service", "TimeoutStartSec")) >= 120
    assert "network-online.target" in one("Unit", "After").split()
    assert "network-online.target" in one("Unit", "Wants").split()
    assert one("Install", "WantedBy") == "multi-user.target"


def test_runs_the_installed_program_as_the_service_user() -> None:
    assert one("Service", "User") == "appliance"
    assert one("Service", "EnvironmentFile") == "-/etc/appliance/appliance.env"
    argv = one("Service", "ExecStart").split()
    assert argv[0] == EXEC
    assert argv[1:] == ["--config", "/etc/appliance/appliance.yaml", "serve"]
    assert "/var/lib/appliance" in one("Service", "ReadWritePaths").split()


def test_hardening_keeps_gpu_reachable() -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "DevicePolicy": "closed",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert one("Service", key) == value, key
    # PrivateDevices=yes would hide /dev/nvidia*; W^X would break CUDA's PTX JIT.
    assert values("Service", "PrivateDevices") in ([], ["no"])
    assert values("Service", "MemoryDenyWriteExecute") in ([], ["no"])
    allowed = {v.split()[0]: v.split()[1] for v in values("Service", "DeviceAllow")}
    for device in (
        "char-nvidia-frontend",
        "char-nvidia",
        "char-nvidia-uvm",
        "char-nvidia-caps",
        "/dev/nvidiactl",
    ):
        assert allowed.get(device) == "rw", device
    families = one("Service", "RestrictAddressFamilies").split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)


def _stub_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a stub, because `verify` requires an executable."""
    stub = tmp_path / "bin" / "appliance"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "appliance.service"
    unit.write_text(UNIT_TEXT.replace(EXEC, str(stub)))
    return unit


@needs_analyze
def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    unit = _stub_unit(tmp_path)
    proc = subprocess.run(
        [str(analyze), "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify returns 0 even for "Unknown key" / "Failed to parse" warnings, so any output fails.
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr


def _analyze_version() -> int:
    out = subprocess.run([str(analyze), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"systemd (\d+)", out)
    return int(match[1]) if match else 0


@needs_analyze
def test_security_exposure_recorded_and_below_threshold(tmp_path: Path) -> None:
    version = _analyze_version()
    if version < 250:
        pytest.skip(f"systemd {version} has no `security --offline`")
    unit = _stub_unit(tmp_path)
    # v252 compares --threshold on the internal 0-100 scale: 25 means an exposure of 2.5.
    proc = subprocess.run(
        [str(analyze), "security", "--offline=true", f"--threshold={round(MAX_EXPOSURE * 10)}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for appliance\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    measured = float(match[1])
    assert measured <= MAX_EXPOSURE
    assert proc.returncode == 0, proc.stdout[-2000:]

    recorded = re.search(r"systemd (\d+)\):\n#\s+Overall exposure level: (\d+\.\d+)", UNIT_TEXT)
    assert recorded, "the unit's header must record the exposure score"
    if int(recorded[1]) == version:
        assert float(recorded[2]) == measured, "update the score recorded at the top of the unit"
