"""Backend choice per model (``appliance.engines.select``): TensorRT → ONNX Runtime CUDA → ONNX
Runtime CPU, with every step down named and logged once.

Run with the real MiniLM model and the real ONNX Runtime. Where a step needs what this machine
lacks (a GPU, TensorRT), the availability check is replaced to inject the fault that step meets on
a GPU box, and the test says so; the engine that ends up serving is always real.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance import settings
from appliance.engines import select
from appliance.engines.base import EngineError
from appliance.gpu import cuda
from appliance.repository import ModelEntry, scan
from tests.conftest import make_repository

cpu_only = pytest.mark.skipif(cuda.probe().ok, reason="this machine has a GPU")


def entry_for(minilm_folder: Path, tmp_path: Path, backend: str = "auto") -> ModelEntry:
    repo = make_repository(
        tmp_path, {"minilm": minilm_folder}, {"minilm": {"backend": backend, "name": "minilm"}}
    )
    (entry,) = list(scan(repo))
    return entry


def run_once(engine: Any) -> None:
    ids = np.ones((1, 4), np.int64)
    out = engine.run({s.name: ids for s in engine.inputs})
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.fixture(autouse=True)
def fresh_log_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select, "_logged", set())


@cpu_only
def test_cpu_box_serves_on_onnxruntime_cpu_and_names_both_step_downs(
    minilm_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.engines.select")
    entry = entry_for(minilm_folder, tmp_path)
    engines = [select.open_engine(entry, settings.defaults()) for _ in range(2)]
    for engine in engines:
        assert engine.backend_name == "onnxruntime-cpu" and not engine.on_gpu
        reason = engine.backend_reason or ""
        assert reason.startswith("TensorRT: no CUDA device") and "; ONNX Runtime CUDA: " in reason
        run_once(engine)
        engine.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, "each step down is logged once, not on every load"  # TensorRT, ORT CUDA
    assert all(r.levelno == logging.INFO for r in caplog.records)  # expected on a CPU box: no warning
    assert lines[0].startswith("model minilm: not on TensorRT: no CUDA device")


@cpu_only
def test_model_pinned_to_onnxruntime_skips_tensorrt_without_a_step_down(
    minilm_folder: Path, tmp_path: Path
) -> None:
    engine = select.open_engine(entry_for(minilm_folder, tmp_path, "onnxruntime"), settings.defaults())
    assert (engine.backend_reason or "").startswith("ONNX Runtime CUDA: ")  # TensorRT was not asked for
    engine.close()


def test_failed_tensorrt_load_steps_down_with_its_reason(
    minilm_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Injected: TensorRT "available" and its plan build failing, as a parse error does on a GPU box.
    monkeypatch.setattr(select, "tensorrt_unavailable", lambda: None)

    def failing_plan(entry: ModelEntry, values: dict[str, Any], *, force: bool = False) -> Path:
        raise EngineError("TensorRT build of model.onnx failed (exit 3): parse error: Gather")

    monkeypatch.setattr(select, "plan_for", failing_plan)
    caplog.set_level(logging.INFO, logger="appliance.engines.select")
    engine = select.open_engine(entry_for(minilm_folder, tmp_path, "tensorrt"), settings.defaults())
    assert engine.backend_name in ("onnxruntime-cpu", "onnxruntime-cuda")
    assert (engine.backend_reason or "").startswith(
        "TensorRT: TensorRT failed: TensorRT build of model.onnx failed (exit 3)"
    )
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "asks" not in warned[0].getMessage() and "parse error" in warned[0].getMessage()
    run_once(engine)
    engine.close()


@cpu_only
def test_cuda_provider_that_does_not_load_is_a_step_down(
    minilm_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Injected: the check passes as with onnxruntime-gpu installed; the real ORT here then opens the
    # session on the CPU, exactly what onnxruntime-gpu does when the CUDA libraries do not load.
    monkeypatch.setattr(select, "onnxruntime_cuda_unavailable", lambda: None)
    engine = select.open_engine(entry_for(minilm_folder, tmp_path), settings.defaults())
    assert engine.backend_name == "onnxruntime-cpu"
    assert "ONNX Runtime CUDA: the CUDA provider did not load" in (engine.backend_reason or "")
    run_once(engine)
    engine.close()


@cpu_only
def test_no_gpu_engine_means_no_device_budget() -> None:
    assert not select.gpu_engines_available()
    assert select.onnxruntime_cuda_unavailable() is not None and select.tensorrt_unavailable() is not None


def _spin_config(engine: Any) -> tuple[str, str]:
    """(allow_spinning, spin_duration_us) of the engine's ONNX Runtime session."""
    options = engine._session.get_session_options()
    found = []
    for key in ("session.intra_op.allow_spinning", "session.intra_op.spin_duration_us"):
        try:
            found.append(str(options.get_session_config_entry(key)))
        except Exception:  # ORT raises a plain RuntimeError-like error for a key never set
            found.append("")
    return found[0], found[1]


@cpu_only
def test_engine_spin_us_bounds_how_long_the_encoder_threads_wait_awake(
    minilm_folder: Path, tmp_path: Path
) -> None:
    entry = entry_for(minilm_folder, tmp_path, "onnxruntime")
    values = settings.defaults()
    assert values["engine.spin_us"] == 500, "on by default: measured faster at every load (README)"
    spinning = select.open_engine(entry, values | {"engine.spin_us": 400})
    sleeping = select.open_engine(entry, values | {"engine.spin_us": 0})
    assert _spin_config(spinning) == ("1", "400")
    stop = spinning._session.get_session_options().get_session_config_entry("session.force_spinning_stop")
    assert stop == "1", "the threads stop spinning when a run ends: models taking turns get the cores"
    assert _spin_config(sleeping) == ("0", ""), "0: the threads sleep at once"
    ids = np.array([[101, 7592, 2088, 102]], np.int64)
    feeds = {s.name: ids if s.name == "input_ids" else np.ones_like(ids) for s in spinning.inputs}
    # Only the waiting changes, never the arithmetic.
    for name, value in spinning.run(feeds).items():
        assert np.array_equal(value, sleeping.run(feeds)[name])
    cpu = time.process_time()
    time.sleep(0.3)
    # Bounded, an idle model's threads sleep soon after its last run; an unbounded spin
    # (engine.spin_wait) would keep one busy for the whole pause (~0.3 s of CPU).
    assert time.process_time() - cpu < 0.1
    spinning.close()
    sleeping.close()
