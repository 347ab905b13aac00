"""GPU layer: CUDA probe, NVML sampler and scripts/gpu-check.

The TensorRT backend has its own files: tests/test_tensorrt_plan.py (plan cache, profiles) and
tests/test_tensorrt_wiring.py (the engine's calls against a fake TensorRT that enforces NVIDIA's
documented contract). What only a real GPU can show is in the ``@pytest.mark.gpu`` tests at the
end, skipped when the CUDA probe finds no device.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import types
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.gpu import cuda, nvml
from appliance.gpu.cuda import CudaError

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu-check"
PROBE = cuda.probe()
needs_gpu = pytest.mark.skipif(not PROBE.ok, reason=f"needs an NVIDIA GPU ({PROBE.error})")
no_gpu_here = pytest.mark.skipif(PROBE.ok, reason="this machine has a GPU")


def load_gpu_check() -> types.ModuleType:
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(GPU_CHECK))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# --- ONNX Runtime's CUDA libraries ----------------------------------------------------------------


def test_cuda_libraries_are_loaded_once_before_the_first_cuda_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """install.sh's onnxruntime-gpu finds CUDA and cuDNN in the nvidia-* wheels only once they are
    loaded (``preload_dlls``); otherwise its CUDA provider quietly falls back to the CPU. Picking
    the CUDA provider loads them, once per process; a CPU-only choice never does. (onnxruntime-gpu
    cannot install here: the provider list and ``preload_dlls`` are stand-ins with ORT's
    signatures.)"""
    import onnxruntime as ort

    from appliance.engines import onnxruntime as ort_engine

    calls: list[bool] = []
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(
        ort, "preload_dlls", lambda cuda=True, cudnn=True, msvc=True, directory=None: calls.append(cuda)
    )
    ort_engine.load_cuda_libraries.cache_clear()
    try:
        assert ort_engine.providers(prefer_gpu=False) == ["CPUExecutionProvider"]
        assert calls == []
        assert ort_engine.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        assert ort_engine.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        assert calls == [True]
    finally:
        ort_engine.load_cuda_libraries.cache_clear()


def test_a_failed_preload_is_logged_and_leaves_the_choice_to_the_loader(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    from appliance.engines import onnxruntime as ort_engine

    def broken(**_: object) -> None:
        raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "preload_dlls", broken)
    ort_engine.load_cuda_libraries.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="appliance.engines.onnxruntime"):
            assert ort_engine.providers()[0] == "CUDAExecutionProvider"
    finally:
        ort_engine.load_cuda_libraries.cache_clear()
    assert "libcudnn.so.9" in caplog.text


# --- CUDA layer without a GPU --------------------------------------------------------------------


@no_gpu_here
def test_probe_reports_an_error_instead_of_raising() -> None:
    p = cuda.probe(refresh=True)
    assert not p.ok and p.count == 0 and p.error
    if cuda.available():
        assert p.error.startswith("cuda") and p.error_code is not None  # e.g. cudaErrorInsufficientDriver
    assert p.describe().startswith("no CUDA device: ")
    json.dumps(p.as_dict())


@no_gpu_here
@pytest.mark.skipif(not cuda.available(), reason="cuda-python is not installed (extra gpu)")
def test_cuda_calls_without_a_device_raise_cuda_error() -> None:
    for fn in (
        lambda: cuda.DeviceBuffer(16),
        lambda: cuda.PinnedBuffer(16),
        cuda.Stream,
        lambda: cuda.mem_info(0),
    ):
        with pytest.raises(CudaError) as info:
            fn()
        assert info.value.name.startswith("cudaError")
    with cuda.DeviceBuffer(0) as empty:  # needs no call at all
        assert empty.ptr == 0


@pytest.mark.skipif(not cuda.available(), reason="cuda-python is not installed (extra gpu)")
def test_check_unwraps_results_and_names_errors() -> None:
    from cuda.bindings import runtime as rt

    ok = rt.cudaError_t.cudaSuccess
    assert cuda.check((ok, 7)) == 7 and cuda.check((ok, 1, 2)) == (1, 2) and cuda.check(ok) is None
    with pytest.raises(CudaError, match=r"cudaMalloc: cudaErrorMemoryAllocation \(2\)") as info:
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")
    assert info.value.out_of_memory


def test_probe_without_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_rt", None)
    monkeypatch.setattr(cuda, "_IMPORT_ERROR", "cuda-python is not installed (test)")
    p = cuda.probe(refresh=True)
    assert not p.ok and "not installed" in (p.error or "")
    with pytest.raises(CudaError, match="PythonBindingsMissing"):
        cuda.DeviceBuffer(1)
    monkeypatch.undo()
    cuda.probe(refresh=True)


# --- NVML ----------------------------------------------------------------------------------------


def _nvml_works() -> bool:
    return bool(nvml.GpuSampler().available)


@pytest.mark.skipif(_nvml_works(), reason="NVML works on this machine")
def test_sampler_reports_no_gpu_once(caplog: pytest.LogCaptureFixture) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    caplog.set_level(logging.INFO, logger="appliance.gpu.nvml")
    sampler = nvml.GpuSampler(interval_s=0.01)
    sampler.start()
    snaps = [sampler.sample(), sampler.snapshot(), sampler.sample()]
    assert sampler._thread is None  # nothing to sample: no thread
    sampler.stop()
    assert all(s["available"] is False and s["reason"] for s in snaps)
    assert snaps[0]["reason"].startswith(("NVMLError", "RuntimeError"))
    records = [r for r in caplog.records if r.name == "appliance.gpu.nvml"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    registry = CollectorRegistry()
    nvml.register_gpu_metrics(registry, sampler)
    text = generate_latest(registry).decode()
    assert "# TYPE appliance_gpu_power_watts gauge" in text and 'gpu="' not in text


class FakeNvml(types.SimpleNamespace):
    """pynvml as seen on a one-GPU box where temperature is not supported."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0


def fake_pynvml() -> FakeNvml:
    def unsupported(*args: Any) -> None:
        raise FakeNvml.NVMLError("Not Supported")

    proc = types.SimpleNamespace
    return FakeNvml(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlSystemGetDriverVersion=lambda: "580.1",
        nvmlDeviceGetName=lambda h: b"NVIDIA H100",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37, memory=5),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 << 30, total=80 << 30, free=77 << 30),
        nvmlDeviceGetTemperatureV=unsupported,
        nvmlDeviceGetTemperature=unsupported,
        nvmlDeviceGetPowerUsage=lambda h: 123_456,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            proc(pid=os.getpid(), usedGpuMemory=1 << 30),
            proc(pid=1, usedGpuMemory=2 << 30),
        ],
    )


def test_sampler_readings_and_prometheus_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    monkeypatch.setattr(nvml, "_nvml", fake_pynvml())
    sampler = nvml.GpuSampler(interval_s=0.01)
    sampler.start()
    try:
        snap = sampler.snapshot()
        assert snap["available"] and snap["driver_version"] == "580.1"
        (gpu,) = snap["gpus"]
        assert gpu == {
            "index": 0,
            "name": "NVIDIA H100",
            "utilization_ratio": 0.37,
            "memory_used_bytes": 3 << 30,
            "memory_total_bytes": 80 << 30,
            "temperature_celsius": None,
            "power_watts": 123.456,
            "process_memory_bytes": 1 << 30,
        }
        registry = CollectorRegistry()
        nvml.register_gpu_metrics(registry, sampler)
        text = generate_latest(registry).decode()
    finally:
        sampler.stop()
    assert 'appliance_gpu_utilization_ratio{gpu="0"} 0.37' in text
    assert 'appliance_gpu_process_memory_bytes{gpu="0"} 1.073741824e+09' in text
    assert 'appliance_gpu_power_watts{gpu="0"} 123.456' in text
    assert 'appliance_gpu_temperature_celsius{gpu="0"}' not in text  # unsupported: no sample, not 0


class BlockingNvml(FakeNvml):
    """pynvml with NVML's contract enforced (device calls only between ``nvmlInit`` and
    ``nvmlShutdown``, on handles it gave out) whose utilisation call can be made to hang, as one
    does when the driver wedges or the GPU falls off the bus."""

    class NVMLError_Uninitialized(FakeNvml.NVMLError):  # pynvml's name
        pass

    def __init__(self) -> None:
        base = fake_pynvml()
        super().__init__(**vars(base))
        self.inits = 0
        self.hang = threading.Event()  # set: the next utilisation call blocks until released
        self.release = threading.Event()
        self.blocked = threading.Event()  # a call is blocked now

        def checked(fn: Any, takes_handle: bool = True) -> Any:
            def call(*args: Any) -> Any:
                if self.inits <= 0:
                    raise BlockingNvml.NVMLError_Uninitialized("Uninitialized")
                if takes_handle and args[0] != "h0":
                    raise FakeNvml.NVMLError("Invalid Argument")
                return fn(*args)

            return call

        def utilization(h: Any) -> Any:
            if self.hang.is_set():
                self.blocked.set()
                self.release.wait()
            return base.nvmlDeviceGetUtilizationRates(h)

        def init() -> None:
            self.inits += 1

        def shutdown() -> None:
            if self.inits <= 0:
                raise BlockingNvml.NVMLError_Uninitialized("Uninitialized")
            self.inits -= 1

        self.nvmlInit = init
        self.nvmlShutdown = shutdown
        for name in list(vars(base)):
            if name.startswith(("nvmlDevice", "nvmlSystem")):
                by_handle = name not in ("nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex")
                setattr(self, name, checked(getattr(self, name), name.startswith("nvmlDevice") and by_handle))
        self.nvmlDeviceGetUtilizationRates = checked(utilization)


def test_a_hung_nvml_call_leaves_scrapes_and_health_answering(
    monkeypatch: pytest.MonkeyPatch, start_server: Any, minilm_folder: Path
) -> None:
    """NVML is only ever waited on by the sampling thread: with a call hung, /metrics and /healthz
    (the loop) still answer at once; the sampler counts as down (``worker_up`` 0, its readings
    withheld as stale in /admin/stats) without making the node unready; when the call returns it
    is up again. The scrape used to wait on the lock the hung sample held, and froze the loop."""
    fake = BlockingNvml()
    monkeypatch.setattr(nvml, "_nvml", fake)
    srv = start_server(
        {"all-minilm-l6-v2": minilm_folder}, config={"defaults": {"gpu": {"sample_interval_s": 0.2}}}
    )
    up = 'appliance_worker_up{worker="gpu-sampler"}'

    def get(url: str) -> tuple[int, str, float]:
        t0 = time.monotonic()
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {srv.server.admin_token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode(), time.monotonic() - t0

    def wait_for(what: Callable[[], bool], why: str) -> None:
        deadline = time.monotonic() + 10
        while not what():
            assert time.monotonic() < deadline, why
            time.sleep(0.05)

    assert 'appliance_gpu_utilization_ratio{gpu="0"} 0.37' in get(srv.url + "/metrics")[1]
    fake.hang.set()
    try:
        assert fake.blocked.wait(5)
        for _ in range(3):
            for path in ("/metrics", "/healthz"):
                status, _, took = get(srv.url + path)
                assert status == 200 and took < 1.0, (path, took)
        wait_for(lambda: f"{up} 0.0" in get(srv.url + "/metrics")[1], "the stall never showed")
        metrics = get(srv.url + "/metrics")[1]
        assert "appliance_gpu_utilization_ratio{" not in metrics  # stale readings are not exported
        gpu = json.loads(get(srv.admin_url + "/admin/stats")[1])["gpu"]
        assert gpu["stale"] is True and gpu["reason"] == "the sampling thread stuck in an NVML call"
        assert gpu["gpus"] == [] and gpu["sample_age_s"] >= 1.0
        status, body = srv.get("/readyz")
        assert status == 200 and body["workers_down"] == []  # telemetry is optional
    finally:
        fake.hang.clear()
        fake.release.set()
    wait_for(lambda: f"{up} 1.0" in get(srv.url + "/metrics")[1], "the sampler never came back")
    assert 'appliance_gpu_utilization_ratio{gpu="0"} 0.37' in get(srv.url + "/metrics")[1]


# --- gpu-check -----------------------------------------------------------------------------------


def test_gpu_check_cpu_run_skips_cleanly_without_server_dependencies(tmp_path: Path) -> None:
    # Block the server's own dependencies: the script must run on a box that has none of them.
    runner = (
        "import sys, runpy\n"
        "for m in ('aiohttp', 'yaml', 'pydantic', 'prometheus_client'): sys.modules[m] = None\n"
        f"sys.argv = [{str(GPU_CHECK)!r}]\n"
        f"runpy.run_path({str(GPU_CHECK)!r}, run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", runner], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    steps = [line for line in lines if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIPPED")]
    assert len(steps) == 12 and not any(line.startswith("FAIL") for line in steps)
    assert lines[-1].startswith("gpu-check: ")
    if not PROBE.ok:
        skipped = {line.split(":")[0].split(None, 1)[1] for line in steps if line.startswith("SKIPPED")}
        assert {"cuda probe", "cuda round trip", "memory manager", "nvml under load", "tensorrt"} <= skipped
        # Chat on the device: each step says SKIPPED with its reason on a CPU box.
        assert {"device kv edits", "onnxruntime cuda decoder", "tensorrt decoder"} <= skipped
        assert "SKIPPED  tensorrt decoder: no CUDA device: " in r.stdout
        assert "SKIPPED  cuda probe: no CUDA device: " in r.stdout
        assert (
            "PASS     backend chain: models run on onnxruntime-cpu (not tensorrt: no CUDA device" in r.stdout
        )


def test_gpu_check_is_importable() -> None:
    module = load_gpu_check()
    assert callable(module.main) and callable(module.tiny_model)


@no_gpu_here
def test_gpu_check_require_gpu_fails_on_a_cpu_box_and_records_nothing(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    before = readme.read_text()
    r = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--require-gpu", "--record", str(readme)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL     cuda probe: RuntimeError: no CUDA device" in r.stdout
    assert "FAIL     backend chain: RuntimeError: models run on onnxruntime-cpu" in r.stdout
    assert "not recorded in" in r.stdout and readme.read_text() == before  # keeps the last real run


def test_gpu_verification_table_is_written_from_a_gpu_run(tmp_path: Path) -> None:
    module = load_gpu_check()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{module.TABLE_START}\nold\n{module.TABLE_END}\n\nafter\n")
    check = module.Check(True, tmp_path)
    # A run as a GPU box reports it (the probe is the only input this test stands in for).
    check.probe = cuda.GpuProbe(1, (cuda.DeviceInfo(0, "NVIDIA H200", (9, 0), 141 << 30, 132),), 13000, 13000)
    check.results = [("PASS", "cuda probe", "1 device(s) [0.1s]"), ("SKIPPED", "tensorrt", "a | b [0.0s]")]
    assert "recorded in" in module.record(readme, check)
    text = readme.read_text()
    assert "Last run on a GPU: " in text and "NVIDIA H200, driver " in text and "old" not in text
    assert (
        "| cuda probe | PASS | 1 device(s) [0.1s] |" in text
        and "| tensorrt | SKIPPED | a / b [0.0s] |" in text
    )
    assert text.endswith("\n\nafter\n")
    (tmp_path / "bare.md").write_text("no table here\n")
    with pytest.raises(SystemExit, match="no <!-- gpu-verification:start -->"):
        module.record(tmp_path / "bare.md", check)


def test_readme_gpu_verification_table_says_whether_a_gpu_run_happened() -> None:
    module = load_gpu_check()
    text = (ROOT / "README.md").read_text()
    block = text[text.index(module.TABLE_START) : text.index(module.TABLE_END)]
    assert "## GPU verification" in text
    assert "No run on a GPU yet" in block or "Last run on a GPU: " in block


# --- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
def test_gpu_round_trip_and_nvml(tmp_path: Path) -> None:
    check = load_gpu_check().Check(True, tmp_path)
    check.run("cuda probe", check.cuda_probe)
    check.run("nvml", check.nvml)
    check.run("cuda round trip", check.round_trip)
    check.run("memory manager", check.memory_manager)  # device-pool eviction on real device memory
    check.run("nvml under load", check.nvml_under_load)
    check.run("backend chain", check.backend_chain)  # a GPU box must not serve from its CPU
    assert [r[0] for r in check.results] == ["PASS"] * 6, check.results


@pytest.mark.gpu
@needs_gpu
def test_gpu_onnxruntime_cuda_matches_the_cpu(tmp_path: Path) -> None:
    from appliance.engines.availability import onnxruntime_cuda_unavailable

    why = onnxruntime_cuda_unavailable()
    if why is not None:
        pytest.skip(why)
    check = load_gpu_check().Check(True, tmp_path)
    check.run("cuda probe", check.cuda_probe)
    check.run("onnx model", check.onnx_model)
    check.run("onnxruntime cuda", check.onnxruntime_cuda)
    assert [r[0] for r in check.results] == ["PASS"] * 3, check.results


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed")
def test_gpu_tensorrt_matches_onnxruntime(tmp_path: Path) -> None:
    check = load_gpu_check().Check(True, tmp_path)
    check.run("cuda probe", check.cuda_probe)
    check.run("onnx model", check.onnx_model)
    check.run("tensorrt", check.tensorrt)
    assert [r[0] for r in check.results] == ["PASS"] * 3, check.results


# Chat on the device: the KV store's device edits, then the real decoder on each GPU engine, whose
# greedy tokens must equal the CPU reference fixture (tests/test_trt_decoder.py has the wiring).


@pytest.mark.gpu
@needs_gpu
def test_gpu_device_kv_edits_are_bit_exact(tmp_path: Path) -> None:
    check = load_gpu_check().Check(True, tmp_path)
    check.run("cuda probe", check.cuda_probe)
    check.run("device kv edits", check.device_kv_edits)
    assert [r[0] for r in check.results] == ["PASS"] * 2, check.results


@pytest.mark.gpu
@needs_gpu
def test_gpu_onnxruntime_cuda_decoder_greedy_tokens(tmp_path: Path, smollm_folder: Path) -> None:
    from appliance.engines.availability import onnxruntime_cuda_unavailable

    why = onnxruntime_cuda_unavailable()
    if why is not None:
        pytest.skip(why)
    check = load_gpu_check().Check(True, tmp_path, smollm_folder)
    check.run("cuda probe", check.cuda_probe)
    check.run("onnxruntime cuda decoder", check.onnxruntime_cuda_decoder)
    assert [r[0] for r in check.results] == ["PASS"] * 2, check.results


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed")
def test_gpu_tensorrt_decoder_greedy_tokens(tmp_path: Path, smollm_folder: Path) -> None:
    check = load_gpu_check().Check(True, tmp_path, smollm_folder)
    check.run("cuda probe", check.cuda_probe)
    check.run("tensorrt decoder", check.tensorrt_decoder)
    assert [r[0] for r in check.results] == ["PASS"] * 2, check.results
