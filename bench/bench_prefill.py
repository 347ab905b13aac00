"""Prefix cache and chunked prefill, measured on the real SmolLM2-135M decoder.

    .venv/bin/python bench/bench_prefill.py [--rounds 3] [--json out.json]

Drives the continuous-batching scheduler directly (the server adds the same HTTP cost to both
sides of each comparison), with the model as the appliance serves it on a CPU (host KV store,
2 ONNX Runtime threads).

1. Prefix cache: time to first token (p50) of a chat request whose ~400-token system prompt an
   earlier request already sent, against the same requests with the prefix cache off (cold), at
   concurrency 1 and 8. Every request has its own user turn; one token is generated.
2. Chunked prefill: inter-token latency p99 of 4 streams that are decoding when a ~1500-token
   prompt arrives, with ``generation.prefill_chunk_tokens`` 0 (the prompt prefilled in one step),
   512 (the default) and 128; the gaps counted are those between the streams' tokens from the last
   one before the long prompt's arrival to the first one after its first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizers import Tokenizer  # noqa: E402

from appliance.batcher import BatchPolicy  # noqa: E402
from appliance.llm.chat_template import render_chat  # noqa: E402
from appliance.llm.runtime import DecoderSession  # noqa: E402
from appliance.llm.sampling import OutputProcessor, SamplingParams  # noqa: E402
from appliance.llm.scheduler import GenerationConfig, Scheduler, Seq, Token  # noqa: E402

MODEL = ROOT / "engines" / "smollm2-135m-instruct"
SYSTEM = (
    "You are the customer-service assistant of Northwind Appliances. Answer politely and briefly. "
    "Our opening hours are 8 to 18 on weekdays and 9 to 13 on Saturdays. Orders ship within two "
    "working days; returns are free within 30 days with the receipt. Warranty is two years on all "
    "appliances and five years on compressors. Never promise refunds beyond the policy; escalate "
    "complaints about safety to a human agent at once. "
)
QUESTIONS = [
    "Where is my order?",
    "Can I return a kettle I bought last week?",
    "Is the fridge compressor covered?",
    "Are you open on Sunday?",
    "My toaster sparks, what should I do?",
    "How long does shipping take?",
    "Do you ship abroad?",
    "Can I change my delivery address?",
]


class Bench:
    def __init__(self) -> None:
        self.session = DecoderSession(MODEL, intra_op_threads=2)
        self.tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
        self.template = self.session.generation["chat_template"]
        self.executor = ThreadPoolExecutor(1)

    def chat(self, system: str, user: str) -> list[int]:
        text = render_chat(
            self.template,
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            add_generation_prompt=True,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
        )
        return self.tok.encode(text, add_special_tokens=False).ids

    def scheduler(self, **config: Any) -> Scheduler:
        policy = BatchPolicy(priority_levels=3, default_priority=2)
        return Scheduler("bench", self.session, self.executor, policy, GenerationConfig(**config))

    def seq(self, prompt: list[int], max_tokens: int) -> Seq:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return Seq(prompt, params, OutputProcessor.create(params, self.tok, self.session.eos_ids))


async def ttft(sch: Scheduler, seqs: list[Seq]) -> list[float]:
    """Submit together; seconds from submission to each one's first token."""
    started = time.perf_counter()
    for s in seqs:
        sch.submit(s)

    async def first(s: Seq) -> float:
        await s.events.get()  # the first token (or a failure, which the drain below ends on)
        at = time.perf_counter() - started
        await drain(s)
        return at

    return list(await asyncio.gather(*(first(s) for s in seqs)))


async def drain(s: Seq) -> None:
    while True:
        ev = await s.events.get()
        if not isinstance(ev, Token):
            return


async def follow(s: Seq, stamps: list[float]) -> None:
    """Record when each token of ``s`` arrives."""
    while True:
        ev = await s.events.get()
        if not isinstance(ev, Token):
            return
        stamps.append(time.perf_counter())


async def prefix_figure(b: Bench, rounds: int) -> dict[str, Any]:
    system = SYSTEM * 4  # ~400 tokens with the chat template
    n_system = len(b.chat(system, ""))
    out: dict[str, Any] = {"system_prompt_tokens": n_system}
    for concurrency in (1, 8):
        for cached in (False, True):
            sch = b.scheduler(prefix_cache=cached, prefix_block_tokens=16, prefill_chunk_tokens=512)
            times: list[float] = []
            for r in range(rounds):
                if cached:  # an earlier request sent the same system prompt
                    warm = b.seq(b.chat(system, "Hello."), 1)
                    sch.submit(warm)
                    await drain(warm)
                for start in range(0, len(QUESTIONS), concurrency):
                    group = [
                        b.seq(b.chat(system, f"{q} (ticket {r}-{i})"), 1)
                        for i, q in enumerate(QUESTIONS[start : start + concurrency])
                    ]
                    times += await ttft(sch, group)
            await sch.close()
            key = f"c{concurrency}_{'cached' if cached else 'cold'}_ttft_p50_s"
            out[key] = float(np.median(times))
            print(key, round(out[key], 3), file=sys.stderr, flush=True)
        out[f"c{concurrency}_ratio"] = (
            out[f"c{concurrency}_cached_ttft_p50_s"] / out[f"c{concurrency}_cold_ttft_p50_s"]
        )
    return out


async def chunk_figure(b: Bench, rounds: int) -> dict[str, Any]:
    long_prompt = b.chat(SYSTEM * 15, "Summarise our policies.")  # ~1500 tokens
    out: dict[str, Any] = {"long_prompt_tokens": len(long_prompt)}
    for chunk in (0, 512, 128):
        gaps: list[float] = []
        for _ in range(rounds):
            sch = b.scheduler(prefill_chunk_tokens=chunk)
            streams = [b.seq(b.chat("Be brief.", q), 400) for q in QUESTIONS[:4]]
            stamps: list[list[float]] = [[] for _ in streams]

            followers = [asyncio.ensure_future(follow(s, t)) for s, t in zip(streams, stamps, strict=True)]
            for s in streams:
                sch.submit(s)
            while min(len(t) for t in stamps) < 5:
                await asyncio.sleep(0.01)
            big = b.seq(long_prompt, 1)
            arrived = time.perf_counter()
            sch.submit(big)
            await drain(big)
            first = time.perf_counter()
            # The decode after the long prompt's last prefill call: every stream's next token.
            while any(t[-1] < first for t in stamps):
                await asyncio.sleep(0.005)
            for t in stamps:
                before = [x for x in t if x < arrived][-1:]
                after = [x for x in t if x >= arrived]
                upto = next(i for i, x in enumerate(after) if x >= first)
                gaps += list(np.diff(before + after[: upto + 1]))
            for s in streams:
                sch.cancel(s)  # a cancelled sequence gets no further event: stop following it
            for f in followers:
                f.cancel()
            await sch.close(drain=False)
        out[f"chunk{chunk}_itl_p99_s"] = float(np.percentile(gaps, 99)) if gaps else None
        print(
            f"chunk {chunk}: {len(gaps)} gaps, p99 {out[f'chunk{chunk}_itl_p99_s']}",
            file=sys.stderr,
            flush=True,
        )
        out[f"chunk{chunk}_itl_p50_s"] = float(np.median(gaps)) if gaps else None
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", choices=["prefix", "chunk"], help="measure one figure")
    args = ap.parse_args()
    b = Bench()
    result: dict[str, Any] = {}
    if args.only in (None, "prefix"):
        result["prefix_cache"] = await prefix_figure(b, args.rounds)
    if args.only in (None, "chunk"):
        result["chunked_prefill"] = await chunk_figure(b, args.rounds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
