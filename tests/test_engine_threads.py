"""Specifications for the ONNX Runtime engines' threads (appliance.engines.onnxruntime): with the
shared pool (``compute.shared_cpu_pool``, the default) every model's sessions run on one pool of
intra-op threads, so models taking turns never leave idle threads spinning on each other's cores;
without it each session has its own. Each case runs in a fresh process, since ONNX Runtime makes
its shared pool once, with its environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = """
import os, sys
import numpy as np
from appliance.engines.onnxruntime import OnnxRuntimeEngine, share_cpu_threads
shared = sys.argv[2] == "shared"
if shared:
    assert share_cpu_threads(2) == 2
    assert share_cpu_threads(8) == 2  # once per process: the first size stays
before = len(os.listdir("/proc/self/task"))
from pathlib import Path
engines = [OnnxRuntimeEngine(Path(sys.argv[1]), intra_op_threads=2) for _ in range(3)]
feeds = {"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64)}
outs = [e.run(feeds, ["sentence_embedding"])["sentence_embedding"] for e in engines]
assert all(np.allclose(outs[0], o) for o in outs)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux /proc")
@pytest.mark.parametrize(("mode", "expected"), [("shared", 0), ("own", 3)])
def test_sessions_share_one_pool_of_intra_op_threads(minilm_folder: Path, mode: str, expected: int) -> None:
    """Three sessions with 2 intra-op threads each: 3 new threads of their own (the caller is
    the second), or, sharing, none: the shared pool's thread is made with the pool, before any
    session, whatever each session asks for."""
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(minilm_folder / "model.onnx"), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert int(out.stdout.strip().splitlines()[-1]) == expected, out.stderr
