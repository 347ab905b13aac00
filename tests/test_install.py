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
    for bad, message in (
        (("--gpu", "--cpu"), "contradict"),
        (("--cuda", "11"), "--cuda must be 12 or 13"),
        (("--wheels", "/nonexistent/wheels"), "no such directory"),
    ):
        proc = run_installer("--dry-run", *bad)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert all(o in run_installer("--help").stdout for o in ("--gpu", "--cuda", "--wheels"))


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


def fake_nvidia_smi(bin_dir: Path, cuda: str, driver: str) -> dict[str, str]:
    """An nvidia-smi that answers as a driver supporting CUDA ``cuda`` would (its banner, and the
    CSV query the installer makes); returns the environment that puts it first on PATH."""
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *--query-gpu*) echo "NVIDIA H200, 143771 MiB, {driver}" ;;\n'
        f'  *) echo "| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {cuda}     |" ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_dry_run_gpu_prints_the_whole_plan_on_a_box_without_one(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    proc = run_installer("--dry-run", "--gpu", "--cuda", "12", "--prefix", str(prefix), "--no-models")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    pip = f"[dry-run] {prefix}/opt/appliance/venv/bin/python -m pip"
    expected = [
        "GPU plan for CUDA 12 (--cuda):",
        # Quoted as a shell needs them: a dry run's lines can be pasted and run.
        f"{pip} install --quiet --disable-pip-version-check --upgrade 'cuda-python>=12.3,<13' 'nvidia-ml-py",
        f"{pip} uninstall --quiet -y onnxruntime onnxruntime-gpu",  # the CPU and GPU builds collide
        f"{pip} install --quiet --disable-pip-version-check 'onnxruntime-gpu[cuda,cudnn]>=1.18,<1.27'",
        "--extra-index-url https://pypi.nvidia.com 'tensorrt-cu12>=10,<12'",
        "Air-gapped? Fetch them elsewhere, then install with --wheels DIR:",
    ]
    for text in expected:
        assert text in out, text
    # The base install stays the CPU one; the GPU engines come after, one step each.
    assert out.index("[tui]") < out.index("GPU plan") < out.index("tensorrt-cu12")
    assert not prefix.exists()


def test_gpu_plan_follows_the_drivers_cuda_major_and_uses_local_wheels(tmp_path: Path) -> None:
    env = fake_nvidia_smi(tmp_path / "bin", "13.0", "580.65.06")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc = run_installer(
        "--dry-run", "--prefix", str(tmp_path / "r"), "--no-models", "--wheels", str(wheels), **env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "GPU: NVIDIA NVIDIA H200, 143771 MiB, 580.65.06" in out  # detected: no --gpu needed
    assert "GPU plan for CUDA 13 (the driver (nvidia-smi)):" in out
    local = f"--no-index --find-links {wheels}"
    for spec in ("cuda-python>=13.0,<14", "onnxruntime-gpu[cuda,cudnn]>=1.27", "tensorrt-cu13>=10,<12"):
        line = next(
            line for line in out.splitlines() if line.startswith("[dry-run]") and f" '{spec}'" in line
        )
        assert local in line, line
    assert "pypi.nvidia.com" not in out  # air-gapped: nothing from NVIDIA's index
    cuda12 = run_installer(
        "--dry-run",
        "--prefix",
        str(tmp_path / "r"),
        "--no-models",
        **fake_nvidia_smi(tmp_path / "b12", "12.4", "550.54.15"),
    )
    assert (
        "GPU plan for CUDA 12 (the driver (nvidia-smi)):" in cuda12.stdout
        and "tensorrt-cu12" in cuda12.stdout
    )
    forced_cpu = run_installer("--dry-run", "--prefix", str(tmp_path / "r"), "--no-models", "--cpu", **env)
    assert (
        "--cpu given: skipping the GPU packages" in forced_cpu.stdout and "GPU plan" not in forced_cpu.stdout
    )


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
    # The console is shown with the config: run from anywhere else it found no token (a new
    # user's every admin call was a 401).
    assert f"Console:  {entry} --config {config} tui\n" in first.stdout

    # The operator edits the config and drops data in; a re-run is an upgrade that keeps both.
    edited = config.read_text().replace("port: 8000", "port: 8123") + "# edited by hand\n"
    config.write_text(edited)
    env_file.write_text("APPLIANCE_LOG_LEVEL=debug\n")
    (data / "cache.sqlite").write_bytes(b"precious")
    # The upgrade also tries the GPU plan, from an empty wheel folder: each GPU step fails, says
    # which and why, and the install carries on with the CPU engine in place.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    gpu_args = (
        "--prefix",
        str(prefix),
        "--gpu",
        "--cuda",
        "12",
        "--wheels",
        str(empty),
        "--no-start",
        "--no-models",
    )
    second = run_installer(*gpu_args, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    for step in (
        "CUDA bindings (cuda-python>=12.3,<13)",
        "ONNX Runtime CUDA (onnxruntime-gpu)",
        "TensorRT (tensorrt-cu12)",
    ):
        assert f"WARNING: GPU step '{step}' failed: " in second.stderr, step
        assert f"{step}: FAILED (" in second.stdout, step
    assert "No matching distribution" in second.stderr or "Could not find a version" in second.stderr
    ort = subprocess.run(
        [str(venv / "bin/python"), "-c", "import onnxruntime as o; print(o.get_available_providers())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ort.returncode == 0 and "CPUExecutionProvider" in ort.stdout, ort.stderr  # put back
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
