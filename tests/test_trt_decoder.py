"""Wiring tests of chat on TensorRT (``appliance.llm.trt_decoder``) and of the decoder's backend
chain.

TensorRT cannot be installed on the CPU machines this project is built and tested on, and its
objects segfault without a GPU. So the TensorRT decoder runs here against
``tests/fake_tensorrt.py``: a fake TensorRT that enforces the call contract NVIDIA documents
(device memory set before enqueue and large enough for the active profile, input shapes set again
after a profile switch and inside the profile, an aligned address of a big enough live buffer for
every tensor) and fake CUDA streams whose copies run asynchronously, at the next synchronize, from
and into fake device memory (host memory at real aligned addresses). The fake engine's execution
is the real decoder ONNX graph on ONNX Runtime's CPU provider, reading and writing the bound
addresses, so the greedy tokens of the reference fixture prove the wiring end to end: profiles,
bindings, the device KV state and its row edits. They prove wiring, not TensorRT's numbers:
``scripts/gpu-check --require-gpu`` and ``pytest -m gpu`` do that on a GPU.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_llm_kv import generate_all, same_bits, state

from appliance import settings
from appliance.batcher import BatchPolicy
from appliance.engines import select
from appliance.engines.base import EngineError
from appliance.engines.tensorrt import build as build_mod
from appliance.engines.tensorrt import run as run_mod
from appliance.gpu import cuda
from appliance.gpu.cuda import DeviceInfo, GpuProbe
from appliance.llm import trt_decoder
from appliance.llm.kv import HOST, CudaKVOps, DeviceArray, KVState
from appliance.llm.runtime import greedy_generate
from appliance.llm.sampling import OutputProcessor, SamplingParams
from appliance.llm.scheduler import GenerationConfig, Scheduler, Seq
from appliance.repository import scan
from tests.conftest import make_repository
from tests.fake_tensorrt import (
    ContractViolation,
    FakeDecoderEngine,
    FakeStream,
    decoder_plan_bytes,
    fake_tensorrt_module,
    install_fake_cuda,
)

FAKE_GPU = GpuProbe(1, (DeviceInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, 132),), 13000, 13000)
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "smollm2_reference.json").read_text())
GENERATION = {"context_length": 64, "kv_heads": 3, "head_dim": 4, "layers": 2}


# --- profiles ------------------------------------------------------------------------------------


def test_trt_decoder_wiring_profiles_cover_prefill_and_decode_steps() -> None:
    prefill, decode = trt_decoder.decoder_profiles(GENERATION, max_running=8, prefill_tokens=16)
    names = set(trt_decoder.decoder_inputs(2))
    assert set(prefill) == set(decode) == names
    # prefill: 1..8 rows, 1..16 new tokens, past 0..63 (a step never holds more than the context)
    assert prefill["input_ids"].min == (1, 1) and prefill["input_ids"].max == (8, 16)
    assert prefill["attention_mask"].max == (8, 64)
    assert prefill["past_key_values.1.value"].min == (1, 3, 0, 4)
    assert prefill["past_key_values.1.value"].max == (8, 3, 63, 4)
    # decode: one new token per row, a past of at least one token
    assert decode["input_ids"].min == (1, 1) and decode["input_ids"].max == (8, 1)
    assert decode["past_key_values.0.key"].min == (1, 3, 1, 4)
    assert decode["attention_mask"].min == (1, 2) and decode["attention_mask"].max == (8, 64)
    # Unchunked prompts (prefill_chunk_tokens 0) may fill the context.
    whole, _ = trt_decoder.decoder_profiles(GENERATION, max_running=2, prefill_tokens=0)
    assert whole["input_ids"].max == (2, 64)
    with pytest.raises(ValueError, match="max_running >= 1"):
        trt_decoder.decoder_profiles(GENERATION, max_running=0, prefill_tokens=16)


# --- the device KV store -------------------------------------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_cuda(monkeypatch)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_trt_decoder_wiring_device_row_edits_are_bit_exact_with_the_host(fake_cuda: None, dtype: Any) -> None:
    stream = FakeStream()
    dev = CudaKVOps(np.dtype(dtype), stream)
    assert dev.placement == "cuda:0"

    def both(lengths: list[int], width: int, seed: int) -> tuple[KVState, KVState]:
        return state(HOST, lengths, width, dtype, seed), state(dev, lengths, width, dtype, seed)

    h, d = both([5, 2, 7], 7, 1)
    assert isinstance(d.keys[0], DeviceArray) and d.keys[0].ptr % 256 == 0
    same_bits(h, d)
    same_bits(h.select([2, 0]), d.select([2, 0]))
    same_bits(h.select([1]), d.select([1]))
    h2, d2 = both([3, 1], 4, 2)
    same_bits(KVState.join([h, h2]), KVState.join([d, d2]))
    same_bits(KVState.join([h2, h]), KVState.join([d2, d]))
    same_bits(h.columns(2, 6), d.columns(2, 6))
    blocks_h = [h.select([0]).columns(i, i + 1) for i in range(5)]
    blocks_d = [d.select([0]).columns(i, i + 1) for i in range(5)]
    same_bits(KVState.concat_columns(blocks_h), KVState.concat_columns(blocks_d))
    same_bits(h.pad_left(3), d.pad_left(3))
    assert h.nbytes() == d.nbytes()
    with pytest.raises(IndexError, match="row 3 of a batch of 3"):
        dev.take_rows(d.keys[0], np.array([3]))


def test_trt_decoder_wiring_edit_sources_live_until_the_stream_syncs(fake_cuda: None) -> None:
    """A device edit is only queued: its source must outlive the copy. The store keeps it until
    the owner synchronised the stream; the fake stream shows what dropping it early would do."""
    stream = FakeStream()
    dev = CudaKVOps(np.dtype(np.float32), stream)
    h, d = state(HOST, [4, 2], 4, np.float32, 3), state(dev, [4, 2], 4, np.float32, 3)
    picked = d.select([0])
    del d  # the scheduler drops the old batch right after the edit
    same_bits(h.select([0]), picked)  # to_host syncs: the held source was still there
    queued = dev.take_rows(picked.keys[0], np.array([0]))
    dev.synced()  # wrongly: nothing was synchronised
    del picked
    with pytest.raises(ContractViolation, match="at execution"):
        stream.synchronize()
    del queued


# --- the TensorRT decoder on the fake ------------------------------------------------------------


@pytest.fixture
def fake_trt(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, fake_cuda: None
) -> Iterator[list[list[str]]]:
    """A fake TensorRT (11.x unless a test asks for another major) on a fake GPU box; builds write
    a fake decoder plan holding the profiles the build was given. Yields the build commands run."""
    version = getattr(request, "param", "11.4.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_module(version))
    monkeypatch.setattr(run_mod, "_trt_logger", None)
    monkeypatch.setattr(cuda, "probe", lambda refresh=False: FAKE_GPU)
    builds: list[list[str]] = []

    def child(cmd: list[str], timeout_s: float, report: Any) -> tuple[int, list[str]]:
        builds.append(cmd)
        arg = dict(zip(cmd[4::2], cmd[5::2], strict=True))
        options = json.loads(arg["--options"])
        Path(arg["--out"]).write_bytes(decoder_plan_bytes(Path(arg["--onnx"]), options))
        return 0, []

    monkeypatch.setattr(build_mod, "_run_child", child)
    yield builds


@pytest.fixture
def model_dir(smollm_folder: Path, tmp_path: Path) -> Path:
    """The real decoder's files, linked into a folder the plan may be written to."""
    folder = tmp_path / "smollm"
    folder.mkdir()
    for f in ("model.onnx", "generation.json", "tokenizer.json"):
        (folder / f).symlink_to(smollm_folder / f)
    return folder


def open_session(
    model_dir: Path, max_running: int = 4, chunk: int = 16
) -> trt_decoder.TensorRTDecoderSession:
    generation = json.loads((model_dir / "generation.json").read_text())
    plan = trt_decoder.decoder_plan(model_dir, generation, max_running=max_running, prefill_tokens=chunk)
    return trt_decoder.TensorRTDecoderSession(model_dir, plan, gpu=FAKE_GPU)


@pytest.mark.slow
def test_trt_decoder_wiring_greedy_tokens_match_the_fixture(
    fake_trt: list[list[str]], model_dir: Path
) -> None:
    session = open_session(model_dir, chunk=64)
    assert len(fake_trt) == 1  # built once; the second open finds the cached plan
    again = open_session(model_dir, chunk=64)
    assert len(fake_trt) == 1
    again.close()
    engine: FakeDecoderEngine = session._engine
    ctx = session._context
    cases = REFERENCE["cases"]
    prompts = [c["prompt_ids"] for c in cases]
    n = 12
    # A left-padded batch of two prompts of different lengths, as the scheduler prefills them.
    assert greedy_generate(session, prompts, n) == [c["greedy_new_ids"][:n] for c in cases]
    # Every prefill ran on profile 0, every decode step on profile 1.
    profiles = [(p, shape[1] == 1) for p, shape in engine.runs]
    assert profiles[0] == (trt_decoder.PREFILL, False)
    assert all(p == trt_decoder.DECODE and one for p, one in profiles[1:]) and len(profiles) == n
    # The scratch block was set once, before the first execution, at the max over both profiles.
    assert ctx.calls.count("memory") == 1 and ctx.calls.index("memory") < ctx.calls.index("execute")
    assert ctx.memory[1] >= engine.device_memory_size_v2
    # A switch re-sets every input shape and address before the next execution.
    inputs = set(trt_decoder.decoder_inputs(session.layers))
    for at in (i for i, c in enumerate(ctx.calls) if c.startswith("profile ")):
        before = ctx.calls[at : ctx.calls.index("execute", at)]
        assert {f"shape {name}" for name in inputs} <= set(before)
        assert {f"address {name}" for name in engine.desc} <= set(before)
    # The KV state is device memory edited by device copies; one row alone decodes the same.
    logits, kv = session.prefill(prompts)
    assert isinstance(kv.ops, CudaKVOps) and isinstance(kv.keys[0], DeviceArray)
    row = kv.select([1])
    token = int(logits[1].argmax())
    assert token == cases[1]["greedy_new_ids"][0]
    assert int(session.decode([token], row)[0].argmax()) == cases[1]["greedy_new_ids"][1]
    session.close()


@pytest.mark.slow
async def test_trt_decoder_wiring_scheduler_with_prefix_cache_and_chunks(
    fake_trt: list[list[str]], model_dir: Path
) -> None:
    """The scheduler on the TensorRT decoder: chunked prefill continues from a device past, the
    prefix cache cuts and rejoins device blocks, finished rows leave the batch (select/trim)."""
    from tokenizers import Tokenizer

    session = open_session(model_dir, chunk=16)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    executor = ThreadPoolExecutor(1)
    config = GenerationConfig(
        prefix_cache=True, prefix_block_tokens=8, prefill_chunk_tokens=16, max_running=4
    )
    sch = Scheduler("smollm", session, executor, BatchPolicy(priority_levels=3, default_priority=2), config)
    n = 8
    try:
        for case in REFERENCE["cases"]:
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            s = Seq(case["prompt_ids"], params, OutputProcessor.create(params, tok, session.eos_ids))
            await generate_all(sch, [s])
            assert s.generated == case["greedy_new_ids"][:n]
        assert sch.generation_snapshot()["prefix_cache"]["hit_tokens"] >= 8
        assert all(p == trt_decoder.PREFILL for p, shape in session._engine.runs if shape[1] > 1)
    finally:
        await sch.close()
        executor.shutdown(wait=True)
        session.close()


@pytest.mark.slow
def test_trt_decoder_wiring_refuses_steps_outside_its_profiles(
    fake_trt: list[list[str]], model_dir: Path
) -> None:
    session = open_session(model_dir, max_running=2, chunk=8)
    ctx = session._context
    # The fake holds the decoder to the contract too: a tensor left without an address is refused.
    bind = session._address
    session._address = lambda name, ptr: None if name == "logits" else bind(name, ptr)  # type: ignore[method-assign]
    with pytest.raises(ContractViolation, match="no address for 'logits'"):
        session.prefill([[1, 2, 3]])
    session._address = bind  # type: ignore[method-assign]
    ctx.calls.clear()
    with pytest.raises(
        EngineError, match=r"prefill step outside the plan's prefill profile: input_ids \(1, 9\)"
    ):
        session.prefill([list(range(1, 10))])  # longer than the 8-token chunk the plan was built for
    with pytest.raises(EngineError, match=r"input_ids \(3, 2\) not in \[1, 1\]..\[2, 8\]"):
        session.prefill([[1, 2], [3, 4], [5, 6]])  # more rows than max_running
    assert "execute" not in ctx.calls
    logits, kv = session.prefill([[1, 2, 3]])  # and it still serves
    session.decode([int(logits[0].argmax())], kv)
    with pytest.raises(EngineError, match="not in this decoder's device memory"):
        session.decode([1], KVState(list(kv.keys), list(kv.values), kv.mask, HOST))
    session.close()
    with pytest.raises(EngineError, match="closed"):
        session.decode([1], kv)


def test_trt_decoder_wiring_refuses_without_a_gpu_before_touching_tensorrt(tmp_path: Path) -> None:
    (tmp_path / "generation.json").write_text(
        json.dumps({**GENERATION, "vocab": 10, "eos_ids": [2], "pad": 2, "dtype": "float32"})
    )
    no_gpu = GpuProbe(error="cudaErrorNoDevice", error_code=100)
    was_imported = "tensorrt" in sys.modules
    with pytest.raises(EngineError, match="no CUDA device: cudaErrorNoDevice"):
        trt_decoder.TensorRTDecoderSession(tmp_path, tmp_path / "x.plan", gpu=no_gpu)
    assert ("tensorrt" in sys.modules) == was_imported


# --- the decoder's backend chain -----------------------------------------------------------------


@pytest.fixture
def decoder_entry(smollm_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(select, "_logged", set())
    repo = make_repository(tmp_path, {"smollm": smollm_folder}, {"smollm": {"name": "smollm"}})
    (entry,) = list(scan(repo))
    return entry


def values(**overrides: Any) -> dict[str, Any]:
    return {**settings.defaults(), "engine.intra_op_threads": 2, **overrides}


@pytest.mark.skipif(cuda.probe().ok, reason="this machine has a GPU")
def test_trt_decoder_wiring_cpu_box_names_both_step_downs(decoder_entry: Any) -> None:
    from appliance.llm.service import _open_decoder

    engine = _open_decoder(decoder_entry, values())
    try:
        assert engine.backend_name == "onnxruntime-cpu" and not engine.on_gpu
        reason = engine.backend_reason or ""
        assert reason.startswith("TensorRT: no CUDA device") and "; ONNX Runtime CUDA: " in reason
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("fake_trt", ["10.16.1.11"], indirect=True)  # 11.x: the tests above
def test_trt_decoder_wiring_gpu_box_serves_chat_on_tensorrt(
    fake_trt: list[list[str]], decoder_entry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.llm.service import _open_decoder

    engine = _open_decoder(decoder_entry, values(**{"generation.max_running_sequences": 2}))
    try:
        assert engine.backend_name == "tensorrt" and engine.on_gpu and engine.backend_reason is None
        session = engine.session  # type: ignore[attr-defined]
        assert session.profiles[trt_decoder.PREFILL]["input_ids"].max[0] == 2  # from the settings
        ids = REFERENCE["cases"][0]["prompt_ids"]
        assert greedy_generate(session, [ids], 3) == [REFERENCE["cases"][0]["greedy_new_ids"][:3]]
    finally:
        engine.close()
    # A plan TensorRT refuses: the decoder steps down to ONNX Runtime and says why.
    monkeypatch.setattr(build_mod, "_run_child", lambda cmd, t, r: (-11, ["parsing model.onnx"]))
    for plan in decoder_entry.folder.glob("*.plan"):
        plan.unlink()
    engine = _open_decoder(decoder_entry, values())
    try:
        assert engine.backend_name.startswith("onnxruntime")
        assert (engine.backend_reason or "").startswith(
            "TensorRT: TensorRT failed: TensorRT build of model.onnx crashed"
        )
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.skipif(cuda.probe().ok, reason="this machine has a GPU")
def test_decoder_backend_and_reason_in_models_and_stats(smollm_folder: Path, tmp_path: Path) -> None:
    """The real server on this CPU box: a chat model says where it runs and why not faster, in
    ``/v1/models/{m}`` and ``/admin/stats``, as the encoders do."""
    from tests.conftest import ServerThread
    from tests.test_admin import admin

    repo = make_repository(tmp_path, {"smollm": smollm_folder}, {"smollm": {"name": "smollm"}})
    srv = ServerThread(
        {"model_repository": str(repo), "data_dir": str(tmp_path / "data"), "admin": {"port": 0}}
    ).start()
    try:
        body = {"model": "smollm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        status, _, _ = srv.post("/v1/chat/completions", body)
        assert status == 200
        status, model = srv.get("/v1/models/smollm")
        assert status == 200 and model["backend"] == "onnxruntime-cpu"
        assert model["backend_reason"].startswith("TensorRT: no CUDA device")
        assert "; ONNX Runtime CUDA: " in model["backend_reason"]
        status, stats = admin(srv, "GET", "/admin/stats")
        m = stats["models"]["smollm"]
        assert (m["backend"], m["backend_reason"]) == (model["backend"], model["backend_reason"])
    finally:
        srv.stop()


def test_trt_decoder_wiring_module_import_never_imports_tensorrt() -> None:
    import subprocess

    code = (
        "import sys, appliance.llm.trt_decoder, appliance.llm.service; assert 'tensorrt' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
