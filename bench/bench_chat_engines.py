"""The chat engines side by side without HTTP: llama.cpp's libllama against the appliance's decoder.

    .venv/bin/python bench/bench_chat_engines.py --llama-python DIR --llama-lib DIR [--threads 2] [--rounds 3]

``--llama-python``: an unpacked llama-cpp-python source distribution (its ``llama_cpp`` package, the
ctypes bindings); ``--llama-lib``: the folder holding the ``libllama.so`` built from its vendored
llama.cpp (``bench/build-llama-server.sh`` leaves it in ``build/bin`` before ``llama-server`` is
linked). Both run the same GGUF's weights on the same 37-token chat prompt (from the greedy fixture), greedy, 128 tokens, in
one process, one engine at a time, interleaved each round; the same threads for both. Reports the
prompt's prefill (time to the first token's logits) and the decode time per token, medians over
rounds, and each appliance variant's ratio to llama.cpp. This isolates the kernels from the servers:
``bench/profile_chat.py`` shows what the appliance's HTTP and scheduling add (a few ms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.build.decoder import locate_gguf  # noqa: E402
from appliance.llm.runtime import DecoderSession  # noqa: E402

NEW_TOKENS = 128
# A ChatML chat prompt ("Write a haiku about the ocean.", 37 tokens), from the greedy fixture.
FIXTURE = ROOT / "tests" / "fixtures" / "smollm2_reference.json"
PROMPT: list[int] = json.loads(FIXTURE.read_text())["cases"][1]["prompt_ids"]

Run = tuple[float, float, list[int]]  # prefill s, decode s per token, tokens


def load_llama(python_dir: str, lib_dir: str, threads: int) -> Callable[[], Run]:
    os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
    sys.path.insert(0, python_dir)
    # llama_cpp imports diskcache for its optional prompt cache, which is not used here.
    sys.modules.setdefault("diskcache", types.SimpleNamespace(Cache=object))  # type: ignore[arg-type]
    import llama_cpp  # type: ignore[import-not-found]

    llm = llama_cpp.Llama(
        model_path=str(locate_gguf()), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def run() -> Run:
        llm.reset()
        t = time.perf_counter()
        llm.eval(PROMPT)
        first = time.perf_counter() - t
        tokens: list[int] = []
        for _ in range(NEW_TOKENS):
            tokens.append(int(llm.sample(temp=0.0)))
            llm.eval(tokens[-1:])
        return first, (time.perf_counter() - t - first) / NEW_TOKENS, tokens

    return run


def appliance(session: DecoderSession) -> Callable[[], Run]:
    def run() -> Run:
        t = time.perf_counter()
        logits, state = session.prefill([PROMPT])
        first = time.perf_counter() - t
        tokens = [int(logits[0].argmax())]
        for _ in range(NEW_TOKENS - 1):
            tokens.append(int(session.decode(tokens[-1:], state)[0].argmax()))
        return first, (time.perf_counter() - t - first) / (NEW_TOKENS - 1), tokens

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", required=True)
    ap.add_argument("--llama-lib", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model-dir", default=str(ROOT / "engines" / "smollm2-135m-instruct"))
    args = ap.parse_args()
    d = Path(args.model_dir)
    engines: dict[str, Callable[[], Run]] = {
        "llama.cpp": load_llama(args.llama_python, args.llama_lib, args.threads),
        "appliance (default)": appliance(
            DecoderSession(d, intra_op_threads=args.threads, single_stream=d / "q4")
        ),
        "appliance q4_int8_decode": appliance(
            DecoderSession(d, intra_op_threads=args.threads, single_stream=d / "q4", q4_int8_decode=True)
        ),
    }
    results: dict[str, list[Run]] = {name: [] for name in engines}
    for run in engines.values():
        run()  # warm-up
    for i in range(args.rounds):
        for name, run in engines.items():
            r = run()
            results[name].append(r)
            print(
                f"round {i} {name:26s} prefill {r[0] * 1e3:7.1f} ms  decode {r[1] * 1e3:6.2f} ms/token",
                flush=True,
            )
    ref: Any = results["llama.cpp"]
    print(f"\n{args.threads} threads, medians over {args.rounds} rounds (ratio: llama.cpp time / this time)")
    print("| engine | prefill 37 tokens ms | ratio | decode ms/token | tok/s | ratio | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        pre = float(np.median([r[0] for r in rs]))
        dec = float(np.median([r[1] for r in rs]))
        pre_ratio = float(np.median([b[0] / a[0] for a, b in zip(rs, ref, strict=True)]))
        dec_ratio = float(np.median([b[1] / a[1] for a, b in zip(rs, ref, strict=True)]))
        same = sum(a == b for a, b in zip(rs[0][2], ref[0][2], strict=True))
        print(
            f"| {name} | {pre * 1e3:.1f} | {pre_ratio:.2f} | {dec * 1e3:.2f} | {1 / dec:.1f} | {dec_ratio:.2f} | "
            f"{same}/{NEW_TOKENS} |"
        )


if __name__ == "__main__":
    main()
