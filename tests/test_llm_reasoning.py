"""Reasoning content for the DeepSeek-R1 family: ``<think>…</think>`` as ``reasoning_content``.

The parser alone; then scripted generations served for real: the tiny R1-style model (DeepSeek's
chat template and tokenizer layout, see conftest.write_tiny_r1) runs its real KV cache under the
real scheduler, SSE writer and ``openai`` client, and only the choice of each next token is
scripted (``ScriptedDecoder``), because a random model cannot be made to think on demand.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import openai
import pytest
from conftest import R1_EOS, ServerThread, make_repository

from appliance.llm.reasoning import DeepSeekR1Parser, make_parser
from appliance.llm.runtime import KVState
from appliance.llm.sampling import OutputProcessor, SamplingParams
from appliance.llm.service import _open_decoder
from appliance.models import ENGINE_OPENERS
from appliance.repository import ModelKind

# ----------------------------------------------------------------------------- the parser


def split(chunks: Sequence[str]) -> tuple[str, str]:
    parser = DeepSeekR1Parser()
    reasoning = content = ""
    for chunk in chunks:
        r, c = parser.feed(chunk)
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


CASES = [
    # the template opened <think>: the output starts inside the thinking
    ("The user wants X.\nSo Y.\n</think>\n\nHere is Y.", ("The user wants X.\nSo Y.", "Here is Y.")),
    # the model opens it itself
    ("<think>\nHmm.\n</think>\n\nAnswer", ("Hmm.", "Answer")),
    # never closed (cut off by max_tokens): all of it is thinking
    ("Still thinking about </thi", ("Still thinking about </thi", "")),
    ("<think>\n\n</think>\n\nDirect.", ("", "Direct.")),
    ("</think>", ("", "")),
    ("a < b, and <think> is just text here </think> done", ("a < b, and <think> is just text here", "done")),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_parser_splits_the_same_however_the_text_is_cut(text: str, expected: tuple[str, str]) -> None:
    assert split([text]) == expected
    assert split(list(text)) == expected  # one character at a time: every tag split
    for cut in range(len(text) + 1):
        assert split([text[:cut], text[cut:]]) == expected, cut


def test_parser_never_lets_a_tag_out_early() -> None:
    parser = DeepSeekR1Parser()
    seen = ""
    for ch in "Plan.\n</think>\n\nOK":
        r, c = parser.feed(ch)
        seen += r + c
        assert "<" not in seen and "\n" not in seen.rstrip("OK")
    assert make_parser("none") is None
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        make_parser("qwen3")


# ----------------------------------------------------------------------------- scripted tokens


def encode(tok: Any, *pieces: str) -> list[int]:
    """Ids of each piece encoded on its own, so "</th" + "ink>" spells the tag in byte tokens."""
    return [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]


def test_output_processor_counts_reasoning_tokens_through_the_real_tokenizer(tiny_r1: dict[str, Any]) -> None:
    tok = tiny_r1["tokenizer"]
    thinking = encode(tok, "Check the order", "</th", "ink>")
    ids = thinking + encode(tok, "\n\nShipped.")
    eos = tok.token_to_id(R1_EOS)
    proc = OutputProcessor.create(SamplingParams(max_tokens=100), tok, [eos], make_parser("deepseek-r1"))
    outs = [proc.push(i) for i in [*ids, eos]]
    assert "".join(o.reasoning for o in outs) == "Check the order"
    assert "".join(o.text for o in outs) == "Shipped."
    assert proc.reasoning_tokens == len(thinking) and outs[-1].finish_reason == "stop"


class ScriptedDecoder:
    """The real decoder session of the model with its next-token choice scripted: prefill and
    decode run on the real ONNX graph (KV cache, batching), and the logits are replaced by a row
    that makes greedy sampling pick ``script[step]``. Test-only; an empty script passes through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.script: list[int] = []
        self.step = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _choose(self, logits: np.ndarray) -> np.ndarray:
        if not self.script:
            return logits
        out = np.full_like(logits, -1e9)
        out[:, self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return out

    def prefill(
        self, prompts: Sequence[Sequence[int]], past: KVState | None = None
    ) -> tuple[np.ndarray, KVState]:
        # One whole prefill per request here: the fixture turns chunking and the prefix cache off.
        logits, state = self.inner.prefill(prompts, past)
        self.step = 0
        return self._choose(logits), state

    def decode(self, next_ids: Sequence[int] | np.ndarray, state: KVState) -> np.ndarray:
        return self._choose(self.inner.decode(next_ids, state))


@pytest.fixture(scope="module")
def scripted(
    tiny_r1: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, list[ScriptedDecoder]]]:
    decoders: list[ScriptedDecoder] = []

    def open_scripted(entry: Any, values: Any) -> Any:
        engine = _open_decoder(entry, values)
        engine.session = ScriptedDecoder(engine.session)  # type: ignore[attr-defined]
        decoders.append(engine.session)  # type: ignore[attr-defined]
        return engine

    tmp = tmp_path_factory.mktemp("scripted")
    folder = tiny_r1["folder"]
    repo = make_repository(
        tmp,
        {"tiny-r1": folder, "tiny-r1-raw": folder},
        {
            "tiny-r1": {"generation": {"prefill_chunk_tokens": 0, "prefix_cache": False}},
            "tiny-r1-raw": {
                "name": "tiny-r1-raw",
                "generation": {"reasoning_parser": "none", "prefill_chunk_tokens": 0, "prefix_cache": False},
            },
        },
    )
    cfg = {
        "model_repository": str(repo),
        "data_dir": str(tmp / "data"),
        "admin": {"port": 0, "socket": str(tmp / "data" / "admin.sock")},
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ENGINE_OPENERS, ModelKind.generate, open_scripted)
        srv = ServerThread(cfg).start()
        try:
            yield srv, decoders
        finally:
            srv.stop()


def say(scripted: tuple[ServerThread, list[ScriptedDecoder]], tiny_r1: dict[str, Any], *pieces: str) -> int:
    """Script the next generations of every loaded decoder: the pieces, then EOS."""
    tok = tiny_r1["tokenizer"]
    ids = [*encode(tok, *pieces), tok.token_to_id(R1_EOS)]
    for d in scripted[1]:
        d.script = ids
    return len(ids)


def client(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def ask(srv: ServerThread, model: str = "tiny-r1", **params: Any) -> tuple[Any, list[Any]]:
    """The same request whole and streamed (with usage), through the openai client."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Where is my order?"}],
        "temperature": 0,
        **params,
    }
    headers = {"Cache-Control": "no-cache, no-store"}
    whole = client(srv).chat.completions.create(**body, extra_headers=headers)
    stream = client(srv).chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}, extra_headers=headers
    )
    return whole, list(stream)


def streamed(chunks: list[Any]) -> tuple[str, str, list[Any]]:
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    return reasoning, "".join(d.content or "" for d in deltas), deltas


def test_reasoning_and_answer_whole_and_streamed(scripted: Any, tiny_r1: dict[str, Any]) -> None:
    srv, _ = scripted
    thinking = encode(tiny_r1["tokenizer"], "The user asks about an order.\nLook it up.\n", "</think>")
    n = say(
        scripted, tiny_r1, "The user asks about an order.\nLook it up.\n", "</think>", "\n\nIt ships today."
    )
    whole, chunks = ask(srv)
    message = whole.choices[0].message
    assert message.reasoning_content == "The user asks about an order.\nLook it up."  # type: ignore[attr-defined]
    assert message.content == "It ships today." and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == n
    assert whole.usage.completion_tokens_details.reasoning_tokens == len(thinking)
    reasoning, content, deltas = streamed(chunks)
    assert (reasoning, content) == (message.reasoning_content, message.content)  # type: ignore[attr-defined]
    assert all(
        "think>" not in (getattr(d, "reasoning_content", None) or "") + (d.content or "") for d in deltas
    )
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == len(thinking)


def test_tags_split_across_tokens_and_opened_by_the_model(scripted: Any, tiny_r1: dict[str, Any]) -> None:
    srv, _ = scripted
    say(scripted, tiny_r1, "<th", "ink>", "\nRefund?", " Yes.\n</", "think", ">\n\n", "Refund sent.")
    whole, chunks = ask(srv)
    message = whole.choices[0].message
    assert (message.reasoning_content, message.content) == ("Refund? Yes.", "Refund sent.")  # type: ignore[attr-defined]
    assert streamed(chunks)[:2] == ("Refund? Yes.", "Refund sent.")


def test_thinking_that_never_closes_is_all_reasoning(scripted: Any, tiny_r1: dict[str, Any]) -> None:
    srv, _ = scripted
    say(scripted, tiny_r1, "Let me think about this for a very long time")
    whole, chunks = ask(srv, max_tokens=10)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "length" and message.content == ""
    first_ten = tiny_r1["tokenizer"].decode(encode(tiny_r1["tokenizer"], "Let me think about this")[:10])
    assert message.reasoning_content == first_ten == "Let me think a"  # type: ignore[attr-defined]
    assert whole.usage.completion_tokens_details.reasoning_tokens == 10
    reasoning, content, _ = streamed(chunks)
    assert (reasoning, content) == (message.reasoning_content, "")  # type: ignore[attr-defined]
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stop_strings_apply_to_the_raw_text(scripted: Any, tiny_r1: dict[str, Any]) -> None:
    srv, _ = scripted
    say(scripted, tiny_r1, "Check stock.\n</think>\n\nIn stock. Anything else?")
    whole, chunks = ask(srv, stop=["Anything"])
    message = whole.choices[0].message
    assert (message.reasoning_content, message.content) == ("Check stock.", "In stock. ")  # type: ignore[attr-defined]
    assert streamed(chunks)[:2] == ("Check stock.", "In stock. ")
    # A stop string met while thinking ends the generation there: no answer at all.
    whole, _ = ask(srv, stop=["stock"])
    assert whole.choices[0].message.reasoning_content == "Check"  # type: ignore[attr-defined]
    assert whole.choices[0].message.content == "" and whole.choices[0].finish_reason == "stop"


def test_reasoning_format_none_and_the_model_setting_return_raw_text(
    scripted: Any, tiny_r1: dict[str, Any]
) -> None:
    srv, _ = scripted
    raw = "Think.\n</think>\n\nDone."
    say(scripted, tiny_r1, raw)
    for whole, chunks in (ask(srv, extra_body={"reasoning_format": "none"}), ask(srv, model="tiny-r1-raw")):
        message = whole.choices[0].message
        assert message.content == raw and getattr(message, "reasoning_content", None) is None
        assert whole.usage.completion_tokens_details is None
        assert streamed(chunks)[:2] == ("", raw)
    # llama.cpp's name turns the parser on even where the model's setting is off.
    whole, _ = ask(srv, model="tiny-r1-raw", extra_body={"reasoning_format": "deepseek"})
    assert whole.choices[0].message.content == "Done."
    status, body, _ = srv.post(
        "/v1/chat/completions",
        {"model": "tiny-r1", "messages": [{"role": "user", "content": "x"}], "reasoning_format": "hidden"},
    )
    assert status == 400 and body["error"]["param"] == "reasoning_format"
    assert "'none'" in body["error"]["message"]


def test_earlier_thinking_is_rendered_as_the_template_says(scripted: Any, tiny_r1: dict[str, Any]) -> None:
    """DeepSeek-R1's template drops an earlier assistant turn's thinking, whether it comes back as
    ``reasoning_content`` or inside the content: the prompt is the same three ways."""
    srv, _ = scripted
    say(scripted, tiny_r1, "ok</think>fine")

    def prompt_tokens(assistant: dict[str, Any]) -> int:
        messages = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", **assistant},
            {"role": "user", "content": "Where is my order?"},
        ]
        whole = client(srv).chat.completions.create(model="tiny-r1", messages=messages, temperature=0)  # type: ignore[arg-type]
        return int(whole.usage.prompt_tokens)  # type: ignore[union-attr]

    plain = prompt_tokens({"content": "Hello!"})
    assert prompt_tokens({"content": "Hello!", "reasoning_content": "A long greeting plan."}) == plain
    assert (
        prompt_tokens({"content": "<think>\nA long greeting plan.\n</think>\n\nHello!"}) == plain + 2
    )  # "\n\n"
    status, body, _ = srv.post(
        "/v1/chat/completions",
        {"model": "tiny-r1", "messages": [{"role": "user", "content": "x", "reasoning_content": 3}]},
    )
    assert status == 400 and body["error"]["param"] == "messages[0].reasoning_content"


def test_a_cached_answer_keeps_its_reasoning_whole_and_replayed(
    scripted: Any, tiny_r1: dict[str, Any]
) -> None:
    """A deterministic answer is cached as the whole response; a stream of the same request is
    replayed from it with the same split and usage."""
    srv, _ = scripted
    say(scripted, tiny_r1, "Cached plan.\n</think>\n\nCached answer.")
    body = {"model": "tiny-r1", "messages": [{"role": "user", "content": "Cache me"}], "temperature": 0}
    status, first, _ = srv.post("/v1/chat/completions", body)
    assert status == 200 and first["choices"][0]["message"]["reasoning_content"] == "Cached plan."
    say(scripted, tiny_r1, "Something else entirely")  # a cache miss would now say this
    stream = client(srv).chat.completions.with_raw_response.create(
        **body, stream=True, stream_options={"include_usage": True}
    )
    assert stream.headers["X-Appliance-Source"] == "cache"
    reasoning, content, _ = streamed(list(stream.parse()))
    assert (reasoning, content) == ("Cached plan.", "Cached answer.")
    status, again, _ = srv.post("/v1/chat/completions", body)
    assert again["choices"] == first["choices"] and again["usage"] == first["usage"]
    assert again["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
