"""The KV store (``appliance.llm.kv``), the prefix cache and chunked prefill.

The device store's row edits are one-node ONNX graphs run through I/O binding; here they run on
the CPU provider (``OrtKVOps("cpu")``), which is the device code path with host placement, and
must agree bit for bit with the NumPy host store. On a GPU only the placement changes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_llm_scheduler import FakeDecoder, drain, reference, seq, text_of, until

from appliance.batcher import BatchPolicy
from appliance.llm.kv import HOST, KVOps, KVState, OrtKVOps
from appliance.llm.prefix import PrefixCache
from appliance.llm.runtime import DecoderSession
from appliance.llm.sampling import OutputProcessor, SamplingParams
from appliance.llm.scheduler import Finished, GenerationConfig, Scheduler, Seq
from appliance.telemetry import Metrics

REFERENCE = Path(__file__).parent / "fixtures" / "smollm2_reference.json"


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    ex = ThreadPoolExecutor(1)
    yield ex
    ex.shutdown(wait=True)


def state(ops: KVOps, lengths: list[int], width: int, dtype: Any, seed: int, layers: int = 2) -> KVState:
    """Right-aligned rows of the given lengths, random K/V (padding columns hold zeros)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for r, n in enumerate(lengths):
        mask[r, width - n :] = 1
    arrays = []
    for _ in range(2 * layers):
        a = rng.standard_normal((len(lengths), 3, width, 4)).astype(dtype)
        arrays.append(a * mask[:, None, :, None].astype(dtype))
    place = (lambda a: a) if ops is HOST else ops.from_host  # type: ignore[attr-defined]
    return KVState([place(a) for a in arrays[::2]], [place(a) for a in arrays[1::2]], mask, ops)


def host_arrays(s: KVState) -> list[np.ndarray]:
    return [s.ops.to_host(a) for a in s.keys + s.values]


def same_bits(a: KVState, b: KVState) -> None:
    assert np.array_equal(a.mask, b.mask)
    for x, y in zip(host_arrays(a), host_arrays(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert x.tobytes() == y.tobytes()


def _cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="no CUDA provider in ONNX Runtime")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_row_edits_are_bit_exact_with_the_host(dtype: Any, device: str) -> None:
    dev = OrtKVOps(np.dtype(dtype), device)
    assert dev.placement == f"{device}:0" and HOST.placement == "host"

    def both(lengths: list[int], width: int, seed: int) -> tuple[KVState, KVState]:
        return state(HOST, lengths, width, dtype, seed), state(dev, lengths, width, dtype, seed)

    h, d = both([5, 2, 7], 7, 1)
    same_bits(h, d)
    same_bits(h.select([2, 0]), d.select([2, 0]))  # drop a row, reorder
    same_bits(h.select([1]), d.select([1]))  # trimmed to the row's 2 columns
    assert h.select([1]).width == 2
    h2, d2 = both([3, 1], 4, 2)
    same_bits(KVState.join([h, h2]), KVState.join([d, d2]))  # the narrower side is left-padded
    same_bits(KVState.join([h2, h]), KVState.join([d2, d]))
    assert KVState.join([h2, h]).width == 7
    same_bits(h.columns(2, 6), d.columns(2, 6))
    blocks_h = [h.select([0]).columns(i, i + 1) for i in range(5)]
    blocks_d = [d.select([0]).columns(i, i + 1) for i in range(5)]
    same_bits(KVState.concat_columns(blocks_h), KVState.concat_columns(blocks_d))
    same_bits(KVState.concat_columns(blocks_h), h.select([0]))  # blocks put back = the row
    same_bits(h.pad_left(3), d.pad_left(3))
    assert h.nbytes() == d.nbytes()


def test_prefix_cache_reuses_blocks_after_the_same_prefix_only() -> None:
    cache = PrefixCache(block_tokens=4)
    tokens = list(range(10, 23))  # 13 tokens: 3 whole blocks
    row = state(HOST, [13], 13, np.float32, 3)
    assert cache.lookup(tokens) == [] and cache.insert(tokens, row) == 3
    hit = cache.lookup(tokens)  # all 3 blocks; at least one token is always left to compute
    assert [b.width for b in hit] == [4, 4, 4]
    same_bits(KVState.concat_columns(hit), row.columns(0, 12))
    assert len(cache.lookup(tokens[:12])) == 2  # 12 tokens: the last block stays to compute
    other = [99, 98, 97, 96, *tokens[4:]]  # the same later blocks after a different first one
    assert cache.lookup(other) == []
    assert cache.stats.hit_tokens == 12 + 8 and cache.stats.query_tokens == 13 * 3 + 12
    # Least recently used first, and among one prefix's blocks the later ones first.
    one_block = row.columns(0, 4).nbytes()
    assert cache.nbytes == 3 * one_block
    assert cache.shrink(2 * one_block) == 1
    assert len(cache.lookup(tokens)) == 2 and cache.stats.evictions == 1


def generate_all(sch: Scheduler, seqs: list[Seq]) -> Any:
    for s in seqs:
        sch.submit(s)
    return asyncio.gather(*(drain(s) for s in seqs))


async def test_shared_system_prompt_reuses_whole_blocks(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder()
    metrics = Metrics()
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    config = GenerationConfig(prefix_cache=True, prefix_block_tokens=4)
    sch = Scheduler("fake", dec, executor, policy, config, metrics=metrics)
    system = [5, 3, 8, 1, 9, 2, 6, 4, 7, 3]  # 10 tokens: 2 whole blocks
    first = seq([*system, 11, 12], 6)
    ((text, _),) = await generate_all(sch, [first])
    assert text == text_of(reference([*system, 11, 12], 6))
    turns = [[13, 14, 15], [16], [17, 18]]
    results = await generate_all(sch, [seq(system + t, 6) for t in turns])
    for (text, fin), t in zip(results, turns, strict=True):
        assert isinstance(fin, Finished) and text == text_of(reference(system + t, 6))
    # Each later request computed only its own turn: 8 system tokens came from 2 cached blocks.
    assert dec.prefill_tokens[1:] == [len(system) - 8 + len(t) for t in turns]
    snap = sch.generation_snapshot()["prefix_cache"]
    assert snap["hit_tokens"] == 3 * 8 and snap["blocks"] >= 2
    hits = metrics.registry.get_sample_value("appliance_prefix_cache_hit_tokens_total", {"model": "fake"})
    assert hits == 3 * 8
    await sch.close()


async def test_prefix_cache_stays_within_the_kv_budget(executor: ThreadPoolExecutor) -> None:
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    # 8 bytes per token (fake: 1 layer x K,V x 1 x 1 x float32); a 4-token block is 32 bytes.
    config = GenerationConfig(prefix_cache=True, prefix_block_tokens=4, kv_cache_bytes=8 * 40)
    sch = Scheduler("fake", FakeDecoder(), executor, policy, config)
    for first in range(1, 5):  # four different 16-token prompts, 4 blocks each
        s = seq([first] * 16, 2)
        await generate_all(sch, [s])
    assert sch.prefix is not None
    assert sch.prefix.nbytes <= 8 * 40 and sch.prefix.stats.evictions > 0
    await sch.close()


async def test_chunked_prefill_interleaves_with_decode(executor: ThreadPoolExecutor) -> None:
    dec = FakeDecoder(decode_s=0.002)
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    sch = Scheduler("fake", dec, executor, policy, GenerationConfig(prefill_chunk_tokens=8))
    stream = seq([1, 2], 40)
    sch.submit(stream)
    await until(lambda: len(stream.generated) >= 2)
    decoded = len(dec.decode_sizes)
    long_prompt = [(i * 7) % 30 + 1 for i in range(45)]
    big = seq(long_prompt, 5)
    sch.submit(big)
    (text, fin), (stext, _) = await asyncio.gather(drain(big), drain(stream))
    assert isinstance(fin, Finished) and text == text_of(reference(long_prompt, 5))
    assert stext == text_of(reference([1, 2], 40))
    assert dec.prefill_tokens[1:7] == [8, 8, 8, 8, 8, 5]  # 45 tokens in 6 chunks
    # The running stream decoded between the chunks: one decode per chunk step at least.
    assert len(dec.decode_sizes) - decoded >= 6
    await sch.close()


async def test_a_long_prompt_abandoned_part_way_resumes_from_its_computed_chunks(
    executor: ThreadPoolExecutor,
) -> None:
    """A client that hangs up (or runs out of deadline) during a long chunked prefill and asks
    again does not pay for the chunks already computed: they entered the prefix cache."""
    dec = FakeDecoder(prefill_s=0.05)
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    config = GenerationConfig(prefix_cache=True, prefix_block_tokens=4, prefill_chunk_tokens=8)
    sch = Scheduler("fake", dec, executor, policy, config)
    prompt = [(5 * i) % 31 + 1 for i in range(50)]
    first = seq(prompt, 4)
    sch.submit(first)
    await until(lambda: sum(dec.prefill_tokens) >= 24)  # three chunks computed, then it leaves
    sch.cancel(first)
    await until(lambda: sch.generation_snapshot()["prefilling"] == 0)
    computed = sum(dec.prefill_tokens)
    again = seq(prompt, 4)
    sch.submit(again)
    text, fin = await drain(again)
    assert isinstance(fin, Finished) and text == text_of(reference(prompt, 4))
    assert sch.prefix is not None and sch.prefix.stats.hit_tokens >= 24
    assert sum(dec.prefill_tokens) - computed == len(prompt) - (computed // 4) * 4
    await sch.close()


async def test_newcomers_beyond_the_chunk_budget_wait_their_turn(executor: ThreadPoolExecutor) -> None:
    """Several newcomers, a budget smaller than their prompts together: each is prefilled over
    the next steps in arrival order, none is lost, every output is exact."""
    dec = FakeDecoder()
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    sch = Scheduler("fake", dec, executor, policy, GenerationConfig(prefill_chunk_tokens=8))
    prompts = [[i, i + 1, i + 2, i + 3, i + 4, i + 5, i + 6, i + 7, i + 8, i + 9] for i in range(1, 6)]
    results = await asyncio.wait_for(generate_all(sch, [seq(p, 4) for p in prompts]), 5)
    for (text, fin), p in zip(results, prompts, strict=True):
        assert isinstance(fin, Finished) and text == text_of(reference(p, 4))
    assert max(dec.prefill_tokens) <= 8 and sum(dec.prefill_tokens) == 50
    await until(lambda: sch.generation_snapshot()["prefilling"] == 0)
    await sch.close()


async def test_preempted_sequence_resumes_from_its_cached_prompt(executor: ThreadPoolExecutor) -> None:
    """With the prefix cache and chunks on, an evicted sequence resumes exactly: its readmission
    starts from its own cached prompt blocks and recomputes only the rest."""
    dec = FakeDecoder(decode_s=0.003)
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    config = GenerationConfig(
        max_running=1, preemption=True, prefix_cache=True, prefix_block_tokens=4, prefill_chunk_tokens=8
    )
    sch = Scheduler("fake", dec, executor, policy, config)
    prompt = [(3 * i) % 29 + 1 for i in range(18)]
    victim = seq(prompt, 30, temperature=1.0, seed=3)
    sch.submit(victim, priority=3)
    await until(lambda: len(victim.generated) >= 6)
    urgent = seq([1, 1], 3)
    sch.submit(urgent, priority=1)
    (vtext, vfin), (utext, _) = await asyncio.wait_for(asyncio.gather(drain(victim), drain(urgent)), 10)
    assert isinstance(vfin, Finished) and victim.preemptions == 1
    assert utext == text_of(reference([1, 1], 3))
    assert sch.prefix is not None and sch.prefix.stats.hit_tokens >= 16  # its 4 whole prompt blocks
    alone = seq(prompt, 30, temperature=1.0, seed=3)
    sch.submit(alone)
    atext, _ = await drain(alone)
    assert vtext == atext and victim.generated == alone.generated
    await sch.close()


async def test_real_model_on_device_placement_with_prefix_cache_and_chunks(
    smollm_folder: Path, executor: ThreadPoolExecutor
) -> None:
    """The device code path (OrtValue KV, I/O binding, ONNX row edits) with host placement, with
    the prefix cache and chunked prefill on: the greedy tokens of the reference fixture."""
    from tokenizers import Tokenizer

    ref = json.loads(REFERENCE.read_text())
    session = DecoderSession(smollm_folder, intra_op_threads=2, kv_device="cpu")
    tok = Tokenizer.from_file(str(smollm_folder / "tokenizer.json"))
    policy = BatchPolicy(priority_levels=3, default_priority=2)
    config = GenerationConfig(prefix_cache=True, prefix_block_tokens=8, prefill_chunk_tokens=16)
    sch = Scheduler("smollm", session, executor, policy, config)
    n = 12
    for case in ref["cases"]:  # one after the other: the second finds the shared template blocks
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        s = Seq(case["prompt_ids"], params, OutputProcessor.create(params, tok, session.eos_ids))
        await generate_all(sch, [s])
        assert s.generated == case["greedy_new_ids"][:n]
    snap = sch.generation_snapshot()["prefix_cache"]
    assert snap["hit_tokens"] >= 8  # the chat template's shared opening was reused
    assert isinstance(session.kv, OrtKVOps)
    await sch.close()


def test_a_decoder_whose_cuda_provider_did_not_load_keeps_its_kv_on_the_host(smollm_folder: Path) -> None:
    """ONNX Runtime runs a session on the CPU when the CUDA provider cannot load (its libraries
    missing). Asked for a device KV cache, the decoder then keeps the cache on the host instead
    of failing at its first step, and still gives the reference fixture's greedy tokens. (The
    session here is a CPU one, which is what such a fallback leaves.)"""
    from appliance.llm.runtime import greedy_generate

    ref = json.loads(REFERENCE.read_text())
    session = DecoderSession(
        smollm_folder, intra_op_threads=2, providers=["CPUExecutionProvider"], kv_device="cuda"
    )
    assert session.kv is HOST
    case = ref["cases"][0]
    got = greedy_generate(session, [case["prompt_ids"]], 6)
    assert got[0] == case["greedy_new_ids"][:6]
