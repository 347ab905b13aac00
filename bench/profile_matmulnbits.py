"""One row through one 4-bit projection of the decode graph, in the forms a faster decode might use.

    .venv/bin/python bench/profile_matmulnbits.py [--shapes 576x3072 576x960 576x576 1536x576]
        [--rounds 5] [--runs 200]

ONNX Runtime's ``MatMulNBits`` with int8 activations (``accuracy_level`` 4), random weights of
SmolLM2's projection shapes (K x N), a batch of one row; each form is timed as the median of
``--runs`` session runs, forms alternating within each round, and the table gives the median over
rounds minus the run of an empty graph (``Identity``), i.e. the kernels' own time plus their
dispatch. The forms:

- ``q4+offsets``: what the exact 4-bit companion computes for a Q4_1 weight ``d*q + m``: the
  4-bit kernel (``d*(q-8)``) plus the offset term (Reshape, ReduceSum per 32-value block, a float
  MatMul with the per-block offsets, Add) -- 5 kernels.
- ``q4``: the 4-bit kernel alone (what the offset term costs is the difference).
- ``q4 N-split``: two kernels over the two halves of the output columns and a Concat (bit for bit
  the same columns), sequentially or under the parallel executor (``ORT_PARALLEL``, 2 inter-op
  threads of 1 intra-op thread each), i.e. the two halves on the two cores.
- ``q4 float zp``: the offset folded into the kernel as a float zero point (``w = d*(q - zp)``,
  ``zp = -m/d``; not bit for bit the same).
- ``q8 u8 zp``: an 8-bit kernel with integer zero points (what a Q4_1 weight rounded to 8 bits
  would cost; not the same weights).

Each at 1 and 2 intra-op threads (sleeping between kernels, as served).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCK = 32


def projection(k: int, n: int, form: str, rng: np.random.Generator) -> bytes:
    blocks = k // BLOCK
    inits = []
    nodes = []

    def nbits(name: str, out: str, cols: int, bits: int = 4, zp: str | None = None) -> None:
        per_block = BLOCK * bits // 8
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (cols, blocks, per_block), np.uint8), name))
        inits.append(numpy_helper.from_array(rng.random(cols * blocks, dtype=np.float32) * 0.01, name + ".s"))
        inputs = ["x", name, name + ".s"]
        if zp == "float":
            inits.append(
                numpy_helper.from_array(rng.random(cols * blocks, dtype=np.float32) * 8, name + ".z")
            )
            inputs.append(name + ".z")
        elif zp == "u8":
            inits.append(numpy_helper.from_array(rng.integers(0, 256, cols * blocks, np.uint8), name + ".z"))
            inputs.append(name + ".z")
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [out],
                domain="com.microsoft",
                K=k,
                N=cols,
                bits=bits,
                block_size=BLOCK,
                accuracy_level=4,
            )
        )

    if form == "empty":
        nodes.append(helper.make_node("Identity", ["x"], ["y"]))
    elif form == "q4":
        nbits("w", "y", n)
    elif form == "q4+offsets":
        nbits("w", "nb", n)
        inits += [
            numpy_helper.from_array(np.array([0, 0, blocks, BLOCK], np.int64), "blocked"),
            numpy_helper.from_array(np.array([-1], np.int64), "last"),
            numpy_helper.from_array(rng.random((blocks, n), dtype=np.float32) * 0.01, "offsets"),
        ]
        nodes += [
            helper.make_node("Reshape", ["x", "blocked"], ["xb"]),
            helper.make_node("ReduceSum", ["xb", "last"], ["sums"], keepdims=0),
            helper.make_node("MatMul", ["sums", "offsets"], ["off"]),
            helper.make_node("Add", ["nb", "off"], ["y"]),
        ]
    elif form == "q4 N-split":
        nbits("w0", "y0", n // 2)
        nbits("w1", "y1", n - n // 2)
        nodes.append(helper.make_node("Concat", ["y0", "y1"], ["y"], axis=-1))
    elif form == "q4 float zp":
        nbits("w", "y", n, zp="float")
    elif form == "q8 u8 zp":
        nbits("w", "y", n, bits=8, zp="u8")
    else:
        raise ValueError(form)
    graph = helper.make_graph(
        nodes,
        "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return model.SerializeToString()


def session(graph: bytes, threads: int, parallel: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1 if parallel else threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as served
    if parallel:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = threads
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["576x3072", "576x960", "576x576", "1536x576"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    forms = ["empty", "q4+offsets", "q4", "q4 N-split", "q4 float zp", "q8 u8 zp"]
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((1, 1, k), dtype=np.float32)
        graphs = {f: projection(k, n, f, rng) for f in forms}
        runs = {(f, f"{t} threads"): session(g, t) for f, g in graphs.items() for t in (1, 2)}
        runs[("q4 N-split", "parallel executor, 2")] = session(graphs["q4 N-split"], 2, parallel=True)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, sess in runs.items():
                runs_us = []
                for _ in range(args.runs if key[0] != "q4 float zp" else max(args.runs // 20, 5)):
                    started = time.perf_counter()
                    sess.run(None, {"x": x})
                    runs_us.append((time.perf_counter() - started) * 1e6)
                times[key].append(float(np.median(runs_us)))
        print(f"K={k} N={n}, one row, us per run minus an empty run (median of {args.rounds} rounds):")
        for (form, mode), ts in times.items():
            if form != "empty":
                empty = np.median(times[("empty", mode if "parallel" not in mode else "1 threads")])
                print(f"  {form:12s} {mode:22s} {np.median(ts) - empty:8.1f}")


if __name__ == "__main__":
    main()
