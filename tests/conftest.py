"""Shared fixtures: real models built from their wheels, and a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from aiohttp import web

from appliance.build.pull import pull
from appliance.config import parse
from appliance.engines.base import Engine, EngineError, EngineOutOfMemory, TensorSpec
from appliance.llm.runtime import DecoderBase
from appliance.models import ModelManager
from appliance.repository import ModelKind
from appliance.server import Server, new_event_loop

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "engines"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 model, built once (idempotent) in the repository's engines/."""
    return pull("all-minilm-l6-v2", ENGINES)


@pytest.fixture(scope="session")
def smollm_folder() -> Path:
    """The real SmolLM2-135M-Instruct decoder, built once (idempotent) in the repository's engines/."""
    return pull("smollm2-135m-instruct", ENGINES)


class ServerThread:
    """The real aiohttp server, on its own event loop in a thread, listening on 127.0.0.1.

    Running it in a thread lets tests use blocking clients (openai, tritonclient) as LAN apps do.
    """

    def __init__(
        self, config: dict[str, Any], config_path: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.env = env or {}
        config = {"admin": {"port": 0}, **config}
        self.cfg = parse(config, config_path, env={})
        self.server: Server | None = None
        self.loop = new_event_loop()  # the loop production serves on (uvloop where installed)
        self.port = 0
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="test-server", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self.error = exc
            self._started.set()

    @property
    def app(self) -> web.Application:
        assert self.server is not None
        return self.server.app

    @property
    def admin_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.admin_port}"

    async def _serve(self) -> None:
        self.cfg.server.port = 0
        self.cfg.server.drain_timeout_s = 5
        self.server = Server(self.cfg, env=self.env)
        await self.server.start()
        self.port = self.server.port
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()
        await self.server.stop()

    def start(self, wait_ready: bool = True, timeout: float = 120) -> ServerThread:
        self._thread.start()
        self._started.wait(timeout)
        if self.error:
            raise self.error
        if wait_ready:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                status, body = self.get("/readyz")
                if status == 200:
                    return self
                time.sleep(0.05)
            raise TimeoutError(f"server not ready: {body}")
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (to inspect or poke services) and return its result."""

        async def wrapper() -> Any:
            r = fn()
            return await r if asyncio.iscoroutine(r) else r

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        data = None
        hdrs = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw, status, rh = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            raw, status, rh = err.read(), err.code, dict(err.headers)
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return status, parsed, rh

    def get(self, path: str) -> tuple[int, Any]:
        status, body, _ = self.request("GET", path)
        return status, body

    def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        return self.request("POST", path, body, headers)


def metric(srv: ServerThread, line_start: str) -> float:
    """The value of the first /metrics line that starts with ``line_start`` (0.0 when none does)."""
    _, text = srv.get("/metrics")
    for line in text.decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def build_tensor_model(
    folder: Path,
    nodes: Sequence[Any],
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    initializers: Sequence[Any] = (),
    batching: str = "{max_batch_size: 4}",
) -> Path:
    """A tiny real ONNX model (``onnx.helper`` nodes and value infos) as a ``kind: tensor`` folder
    named after ``folder``."""
    import onnx
    from onnx import helper

    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(list(nodes), folder.name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    (folder / "model.yaml").write_text(
        f"name: {folder.name}\nkind: tensor\nartefacts: {{model: model.onnx}}\nbatching: {batching}\n"
    )
    return folder


def serve_identity_models(start_server: Any, tmp_path: Path, names: Sequence[str]) -> Any:
    """A server with one tiny ONNX model (y = x, FLOAT [b, 4]) under each of ``names``: for what
    grows with the number of models, at little cost per model."""
    from onnx import TensorProto, helper

    folder = build_tensor_model(
        tmp_path / "src" / "tiny",
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
    )
    return start_server(dict.fromkeys(names, folder), overrides={n: {"name": n} for n in names})


def make_repository(
    tmp: Path, models: dict[str, Path], overrides: dict[str, dict[str, Any]] | None = None
) -> Path:
    """A model repository in ``tmp`` whose folders link to built models' artefacts.

    ``overrides`` patches each model's model.yaml, so tests tune queues without touching engines/.
    """
    repo = tmp / "engines"
    repo.mkdir(exist_ok=True)
    for name, folder in models.items():
        dest = repo / name
        dest.mkdir()
        for f in folder.iterdir():
            if f.name == "model.yaml":
                continue
            (dest / f.name).symlink_to(f)
        spec = yaml.safe_load((folder / "model.yaml").read_text())
        for section, values in (overrides or {}).get(name, {}).items():
            if isinstance(values, dict):
                spec.setdefault(section, {}).update(values)
            else:
                spec[section] = values
        (dest / "model.yaml").write_text(yaml.safe_dump(spec))
    return repo


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(
        models: dict[str, Path],
        *,
        overrides: dict[str, dict[str, Any]] | None = None,
        config: dict[str, Any] | None = None,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
    ) -> ServerThread:
        # Each server of a test gets its own repository folder (a test may start several).
        home = tmp_path / f"server-{len(servers)}"
        home.mkdir()
        repo = make_repository(home, models, overrides)
        cfg: dict[str, Any] = {
            "model_repository": str(repo),
            "data_dir": str(tmp_path / "data"),
            "admin": {"port": 0, "socket": str(tmp_path / "data" / "admin.sock")},
        }
        cfg.update(config or {})
        srv = ServerThread(cfg, env=env).start(wait_ready=wait_ready)
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.stop()


class FaultyEngine(Engine):
    """Test-only fault hook around a real engine.

    Engine failures (exceptions, hangs, out-of-memory) cannot be produced on demand from a healthy
    ONNX model; this wrapper produces them when a test sets ``mode`` or ``delay_s``.
    """

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.mode: str | None = None
        self.delay_s = 0.0
        self.rows = 0  # sentences that reached the engine
        self.oom_above: int | None = None  # batches with more rows than this run out of memory
        self.batches: list[int] = []
        self.release = threading.Event()  # ends a "hang"
        self.fail_every = 0  # every n-th call raises (0: none)
        self.fail_above: int | None = None  # batches with more rows than this raise
        # Rewrites a healthy run's outputs (NaN, a wrong shape or dtype, rows missing).
        self.corrupt: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
        self.calls = 0
        self.backend = inner.backend
        self.backend_reason = inner.backend_reason

    @property
    def on_gpu(self) -> bool:
        return self.inner.on_gpu

    @property
    def backend_name(self) -> str:
        return self.inner.backend_name

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self.inner.inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self.inner.outputs

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        rows = int(next(iter(feeds.values())).shape[0])
        self.rows += rows
        self.batches.append(rows)
        if self.oom_above is not None and rows > self.oom_above:
            raise EngineOutOfMemory(f"injected: a batch of {rows} does not fit")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.mode == "hang":  # until the test releases it (a minute at most)
            self.release.wait(60)
        if self.mode == "raise":
            raise EngineError("injected engine failure")
        if self.mode == "oom":
            raise EngineOutOfMemory("injected out of memory")
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise EngineError(f"injected failure of call {self.calls}")
        if self.fail_above is not None and rows > self.fail_above:
            raise EngineError(f"injected failure of a batch of {rows}")
        out = self.inner.run(feeds, output_names)
        return self.corrupt(out) if self.corrupt is not None else out

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FaultyEngine]]:
    engines: list[FaultyEngine] = []
    original = ModelManager._open_engine

    def open_engine(entry: Any, values: Any) -> Engine:
        e = FaultyEngine(original(entry, values))
        engines.append(e)
        return e

    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(open_engine))
    yield engines


class FaultyDecoder(DecoderBase):
    """Test-only fault hook around a real decoder (ONNX Runtime's ``DecoderSession``), the
    ``FaultyEngine`` of a generate model.

    The scheduler never calls a generate model's ``Engine.run``: it drives the engine's decoder
    session (``prefill`` / ``decode``), whose real work is the session's own ``_run`` (patching
    ``DecoderBase._run`` reaches nothing, as every backend overrides it). This wraps that
    ``_run``: ``prefill`` and ``decode`` stay ``DecoderBase``'s, so their checks hold, and a
    healthy call runs on the real session (which checks the context). Faults come as the real
    backend raises them: ONNX Runtime's untyped errors (an out-of-memory one by its message).

    ``only`` limits the faults to "prefill" or "decode" calls; ``corrupt`` rewrites a healthy
    call's logits (NaN, a wrong shape).
    """

    def __init__(self, inner: DecoderBase) -> None:
        object.__setattr__(self, "inner", inner)
        self.mode: str | None = None  # "raise", "oom" or "hang" (until ``release`` is set)
        self.only: str | None = None
        self.fail_every = 0  # every n-th call (of those ``only`` admits) raises (0: none)
        self.delay_s = 0.0
        self.release = threading.Event()
        self.corrupt: Callable[[np.ndarray], np.ndarray] | None = None
        self.calls = 0  # calls ``only`` admits
        self.steps: list[tuple[str, int]] = []  # (step, rows) of every call that reached the hook
        self.hung = threading.Event()  # set while a "hang" holds a call

    _OWN = frozenset(
        {"inner", "mode", "only", "fail_every", "delay_s", "release", "corrupt", "calls", "steps", "hung"}
    )

    def __getattr__(self, name: str) -> Any:
        # Shape facts (layers, vocab, eos_ids, generation, kv ...) are the real decoder's.
        return getattr(object.__getattribute__(self, "inner"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        # DecoderEngine.close() drops the session's ORT sessions: they must go from the real one.
        target = self if name in self._OWN else self.inner
        object.__setattr__(target, name, value)

    def _run(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: Any, step: str
    ) -> tuple[np.ndarray, Any]:
        self.steps.append((step, int(ids.shape[0])))
        if self.only is None or self.only == step:
            self._inject(step)
        logits, state = self.inner._run(ids, positions, mask, past, step)
        if self.corrupt is not None and (self.only is None or self.only == step):
            logits = self.corrupt(logits)
        return logits, state

    def _inject(self, step: str) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.mode == "hang":  # until the test releases it (a minute at most)
            self.hung.set()
            self.release.wait(60)
            self.hung.clear()
        if self.mode == "raise":
            raise RuntimeError(f"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected {step} failure")
        if self.mode == "oom":
            raise RuntimeError(
                "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested "
                f"buffer of size 1073741824 (injected in {step})"
            )
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError(
                f"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected failure of call {self.calls}"
            )


@pytest.fixture
def faulty_decoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FaultyDecoder]]:
    """Each generate model the server opens gets its decoder wrapped in a ``FaultyDecoder`` (one
    per load: a restart's fresh engine appends another, healthy until the test sets it)."""
    decoders: list[FaultyDecoder] = []
    original = ModelManager._open_engine

    def open_engine(entry: Any, values: Any) -> Engine:
        engine = original(entry, values)
        if entry.kind is ModelKind.generate:
            hook = FaultyDecoder(engine.session)  # type: ignore[attr-defined]
            engine.session = hook  # type: ignore[attr-defined]
            decoders.append(hook)
        return engine

    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(open_engine))
    yield decoders


def nan_logits(logits: np.ndarray) -> np.ndarray:
    return np.full_like(logits, np.nan)


def copy_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


__all__ = [
    "ENGINES",
    "FIXTURES",
    "ROOT",
    "ServerThread",
    "copy_fixture",
    "make_repository",
    "shutil",
    "write_tiny_r1",
]


# -- a tiny random Qwen2 checkpoint in DeepSeek-R1-Distill-Qwen's format ----------------------------

R1_TEMPLATE = (FIXTURES / "deepseek_r1_chat_template.jinja").read_text(encoding="utf-8")
R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_USER, R1_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
# (token, special): as in DeepSeek-R1-Distill-Qwen's tokenizer.json, the role markers and the
# think tags are added tokens that decode as text; only BOS and EOS are special.
R1_ADDED = [(R1_EOS, True), (R1_USER, False), (R1_ASSISTANT, False), (R1_BOS, True)]
R1_ADDED += [("<think>", False), ("</think>", False)]
R1_MERGES = [("t", "h"), ("i", "n"), ("th", "in"), ("thin", "k"), ("Ġ", "t")]
# Qwen2's pre-tokenizer split, as written in its tokenizer.json (llama.cpp's deepseek-r1-qwen).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
R1_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "torch_dtype": "float32",
}


def r1_tokenizer() -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*alphabet, *("".join(m) for m in R1_MERGES)])}
    tok = Tokenizer(models.BPE(vocab, R1_MERGES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for text, special in R1_ADDED:
        added = AddedToken(text, special=special, normalized=False)
        tok.add_special_tokens([added]) if special else tok.add_tokens([added])
    bos = tok.token_to_id(R1_BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{R1_BOS} $A", pair=f"{R1_BOS} $A {R1_BOS} $B:1", special_tokens=[(R1_BOS, bos)]
    )
    return tok


def r1_weights(cfg: dict[str, Any], seed: int = 13) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vec(size: int, base: float = 0.0) -> np.ndarray:
        return (base + 0.2 * rng.standard_normal(size)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32)}
    w |= {"model.norm.weight": vec(d, 1.0), "lm_head.weight": mat(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": vec(d, 1.0), p + "post_attention_layernorm.weight": vec(d, 1.0)}
        w |= {p + "self_attn.q_proj.weight": mat(q, d), p + "self_attn.q_proj.bias": vec(q)}
        w |= {p + "self_attn.k_proj.weight": mat(kv, d), p + "self_attn.k_proj.bias": vec(kv)}
        w |= {p + "self_attn.v_proj.weight": mat(kv, d), p + "self_attn.v_proj.bias": vec(kv)}
        w |= {p + "self_attn.o_proj.weight": mat(d, q)}
        w |= {p + "mlp.gate_proj.weight": mat(f, d), p + "mlp.up_proj.weight": mat(f, d)}
        w |= {p + "mlp.down_proj.weight": mat(d, f)}
    return w


def write_tiny_r1(root: Path) -> dict[str, Any]:
    """A random Qwen2 checkpoint folder laid out as DeepSeek-R1-Distill-Qwen's (config.json,
    safetensors, tokenizer.json, tokenizer_config.json with DeepSeek's chat template,
    generation_config.json). Returns the config and weights (to write the same model as a GGUF)."""
    from safetensors.numpy import save_file

    tok = r1_tokenizer()
    bos, eos = tok.token_to_id(R1_BOS), tok.token_to_id(R1_EOS)
    cfg = {**R1_CONFIG, "vocab_size": tok.get_vocab_size(), "bos_token_id": eos, "eos_token_id": eos}
    weights = r1_weights(cfg)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(weights, str(root / "model.safetensors"))
    tok.save(str(root / "tokenizer.json"))
    tcfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"content": R1_BOS, "lstrip": False, "normalized": True, "rstrip": False},
        "eos_token": {"content": R1_EOS, "lstrip": False, "normalized": True, "rstrip": False},
        "pad_token": {"content": R1_EOS, "lstrip": False, "normalized": True, "rstrip": False},
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": R1_TEMPLATE,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1, ensure_ascii=False))
    gen = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (root / "generation_config.json").write_text(json.dumps(gen))
    return {"cfg": cfg, "weights": weights, "tokenizer": tok}


@pytest.fixture(scope="session")
def tiny_r1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny R1-style checkpoint, added with `appliance models add` to a repository of its own."""
    from appliance.build.local import add

    root = tmp_path_factory.mktemp("tiny-r1")
    info = write_tiny_r1(root / "checkpoint")
    repo = root / "engines"
    info["folder"] = add("tiny-r1", root / "checkpoint", repo)
    info["checkpoint"] = root / "checkpoint"
    return info


def self_signed(cert: Path, key: Path, *, passphrase: str | None = None) -> None:
    """A self-signed certificate for 127.0.0.1 and its key (under ``passphrase``, if one), made by
    the openssl tool; the test is skipped where it is not installed."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed to make a test certificate")
    secret = ["-passout", f"pass:{passphrase}"] if passphrase is not None else ["-nodes"]
    names = ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            *secret,
            "-days",
            "1",
            *names,
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )


def copy_in(repo: Path, name: str, built: Path, extra: str = "") -> Path:
    """An embedding model folder ``name`` put in ``repo`` as a user copies one in: links to the
    artefacts of the built model ``built`` and a model.yaml of that name (plus ``extra`` YAML)."""
    folder = repo / name
    folder.mkdir()
    for f in ("model.onnx", "tokenizer.json"):
        (folder / f).symlink_to(built / f)
    spec = f"name: {name}\nkind: embedding\nartefacts: {{model: model.onnx, tokenizer: tokenizer.json}}\n"
    (folder / "model.yaml").write_text(spec + extra)
    return folder
