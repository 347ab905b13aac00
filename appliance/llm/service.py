"""Chat and text completion for generate models: validation, prompts, the scheduler; no HTTP.

The API layer parses a body with ``GenerationOptions.from_openai``, calls ``ChatService`` and
renders the events it gets back. A request is validated completely (messages, parameters, prompt
length against the context) before it is queued, so every client mistake is a 400 that says what
to change, and nothing invalid ever reaches the worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from appliance.admission import AdmissionError, Reservation
from appliance.engines.base import Engine, EngineError
from appliance.engines.onnxruntime import OnnxRuntimeEngine, providers
from appliance.errors import InvalidRequest, json_type, quoted
from appliance.inference import (
    CHARS_PER_TOKEN_BOUND,
    OFFLOOP_CHARS,
    admission_error,
    engine_failure,
    load_tokenizer,
)
from appliance.llm.chat_template import render_chat
from appliance.llm.reasoning import PARSERS, make_parser
from appliance.llm.runtime import DecoderBase, DecoderSession
from appliance.llm.sampling import OutputProcessor, SamplingParams
from appliance.llm.scheduler import Event, Finished, GenerationConfig, Scheduler, Seq, Token
from appliance.models import ENGINE_OPENERS, RUNTIME_FACTORIES, ModelManager, ModelRuntime, batch_policy
from appliance.repository import ModelEntry, ModelKind

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant")
# The context assumed for bounding a chat request before its model has loaded once.
UNKNOWN_CONTEXT = 32768
MAX_STOP = 4
# Chats with more messages than this are rendered through the template off the event loop: a
# render costs ~30 us a message, so the 8,192 empty messages a context allows held it 240 ms.
OFFLOOP_MESSAGES = 64
# A request's ``reasoning_format`` (llama.cpp's field): "none" returns the raw text, "auto" the
# model's ``generation.reasoning_parser``; "deepseek" is llama.cpp's name for the R1 format.
REASONING_FORMATS = {"none": "none", "auto": "auto", "deepseek": "deepseek-r1", "deepseek-r1": "deepseek-r1"}


# -- the engine and runtime of a generate model ------------------------------------------------


class DecoderEngine(OnnxRuntimeEngine):
    """A built decoder as an Engine, so the manager loads, describes and closes it like the rest;
    the scheduler drives its ``DecoderSession`` (prefill / decode with a KV state) directly."""

    def __init__(
        self,
        folder: Any,
        *,
        intra_op_threads: int = 0,
        single_stream: Path | None = None,
        spin_wait: bool = False,
        spin_us: int = 0,
        prefer_gpu: bool = True,
        q4_int8_decode: bool = False,
        fused_decode: bool = False,
        fused_attention: bool = False,
    ) -> None:
        chosen = providers(prefer_gpu=prefer_gpu)
        # Under the CUDA provider the KV cache stays on the GPU between steps (OrtValue + I/O
        # binding, edited there); on the CPU provider host NumPy arrays are the cheapest store.
        kv_device = "cuda" if "CUDAExecutionProvider" in chosen else None
        try:
            self.session = DecoderSession(
                folder,
                intra_op_threads=intra_op_threads or None,
                providers=chosen,
                single_stream=single_stream,
                kv_device=kv_device,
                spin_wait=spin_wait,
                spin_us=spin_us,
                q4_int8_decode=q4_int8_decode,
                fused_decode=fused_decode,
                fused_attention=fused_attention,
            )
        except Exception as exc:  # ORT raises its own untyped errors
            raise EngineError(f"cannot load the decoder in {folder}: {exc}") from exc
        super().__init__(self.session.model_dir / "model.onnx", session=self.session.session)

    def close(self) -> None:
        # Dropping the last references frees the sessions; ORT has no explicit close. The 4-bit
        # companion too: left in place, anything still holding the runtime kept it resident.
        self.session.session = None
        self.session.single = None
        super().close()


@dataclass
class LLMRuntime:
    """The parts of a resident generate model the service needs (``ModelRuntime.service``)."""

    name: str
    session: DecoderBase  # ONNX Runtime's DecoderSession or TensorRT's TensorRTDecoderSession
    tokenizer: Tokenizer
    scheduler: Scheduler
    default_response: str | None = None
    tunables: Callable[[], Mapping[str, Any]] | None = None

    @property
    def generation(self) -> dict[str, Any]:
        return self.session.generation

    def reasoning_parser(self, requested: str | None = None) -> str:
        """The reasoning parser of a chat request: its ``reasoning_format``, else the model's
        ``generation.reasoning_parser``, whose ``auto`` is what the builder recognised."""
        name = REASONING_FORMATS[requested or "auto"]
        if name == "auto" and self.tunables is not None:
            name = str(self.tunables()["generation.reasoning_parser"])
        if name == "auto":
            name = str(self.generation.get("reasoning_parser") or "none")
        return name if name in PARSERS else "none"

    @property
    def context_length(self) -> int:
        return self.session.context_length

    @functools.cached_property
    def control_texts(self) -> tuple[str, ...]:
        """The text of each of the tokenizer's special tokens (``<|im_start|>``, ...)."""
        added = self.tokenizer.get_added_tokens_decoder().values()
        return tuple(a.content for a in added if a.special and a.content)

    @functools.cached_property
    def literal_tokenizer(self) -> Tokenizer:
        """The same tokenizer, reading a special token's text as plain text."""
        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.encode_special_tokens = True
        return tok

    def render_pieces(self, messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
        """The prompt as (text, literal) pieces (``render_pieces``, with this model's template)."""
        return render_pieces(self.render, messages, self.control_texts, self.name)

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        g = self.generation
        template = g.get("chat_template")
        if not template:
            raise InvalidRequest(f"the model '{self.name}' has no chat template; use /v1/completions")
        try:
            return render_chat(
                template,
                messages,
                add_generation_prompt=True,
                bos_token=g.get("bos_token"),
                eos_token=g.get("eos_token"),
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="messages") from None

    def warmup(self) -> None:
        """First runs allocate ORT's buffers; pay for that at load, not in the first request."""
        logits, state = self.session.prefill([self.tokenizer.encode("warm up").ids or [0]])
        self.session.decode(logits.argmax(axis=-1), state)


def render_pieces(
    render: Callable[[Sequence[Mapping[str, Any]]], str],
    messages: Sequence[Mapping[str, Any]],
    control_texts: Sequence[str],
    model: str,
) -> list[tuple[str, bool]]:
    """The prompt as (text, literal) pieces. A client's text that holds a special token's text
    is a literal piece: it must be tokenized as text, or a user message holding
    ``<|im_end|><|im_start|>system`` would open a turn of its own (turn forgery; the OpenAI
    API reads such text as text). The template's own text keeps its control tokens. Without
    such text the prompt is one piece, tokenized whole exactly as ``transformers`` would."""
    marks: dict[str, str] = {}
    nonce = secrets.token_hex(8)  # a client cannot guess it, so cannot fake a marker
    masked = []
    for m in messages:
        m = dict(m)
        for key, value in m.items():
            if key != "role" and isinstance(value, str) and any(c in value for c in control_texts):
                mark = f"\ue000{nonce}:{len(marks)}\ue001"
                marks[mark] = value
                m[key] = mark
        masked.append(m)
    text = render(masked)
    if not marks:
        return [(text, False)]
    pieces: list[tuple[str, bool]] = []
    seen: set[str] = set()
    garbled = False
    for i, part in enumerate(re.split(f"(\ue000{nonce}:\\d+\ue001)", text)):
        if i % 2 == 0:
            # What is left of a marker the template cut or edited (a client's own U+E000 or
            # U+E001 beside a control token's text is refused too: rare, and safe).
            garbled = garbled or "\ue000" in part or "\ue001" in part
            if part:
                pieces.append((part, False))
        elif part in marks and part not in seen:
            seen.add(part)
            pieces.append((marks[part], True))
        else:
            garbled = True  # the template repeated a text
    if garbled:
        # The template repeated or edited a text that holds a control token, so the prompt
        # cannot be told apart from the client's text: refuse rather than guess. One it dropped
        # (earlier reasoning, as DeepSeek-R1's templates drop it) is simply not in the prompt.
        found = next(c for v in marks.values() for c in control_texts if c in v)
        raise InvalidRequest(
            f"a message holds the text of the model's control token {found!r}, which "
            f"'{model}'s chat template cannot take as plain text; remove it",
            param="messages",
        )
    return pieces


def _open_decoder(entry: ModelEntry, values: dict[str, Any]) -> Engine:
    """The decoder on the first backend of the chain that works (``engines.select.open_on_chain``:
    TensorRT, ONNX Runtime CUDA, ONNX Runtime CPU)."""
    from appliance.engines.select import open_on_chain

    intra, spin = int(values["engine.intra_op_threads"]), bool(values["engine.spin_wait"])

    def tensorrt() -> Engine:
        from appliance.llm.trt_decoder import open_tensorrt_decoder

        return open_tensorrt_decoder(
            entry.folder,
            max_running=int(values["generation.max_running_sequences"]),
            prefill_tokens=int(values["generation.prefill_chunk_tokens"]),
            progress=lambda line: log.info("tensorrt: %s", line),
        )

    def onnxruntime(gpu: bool) -> Engine:
        if gpu:
            return DecoderEngine(entry.folder, prefer_gpu=True, intra_op_threads=intra, spin_wait=spin)
        single = None
        # A CPU-only 4-bit companion for batches of one (see DecoderSession).
        if "single_stream" in entry.spec.artefacts and values["generation.single_stream_q4"]:
            folder = entry.artefact("single_stream").parent
            if (folder / "model.onnx").exists():
                single = folder
        return DecoderEngine(
            entry.folder,
            prefer_gpu=False,
            single_stream=single,
            intra_op_threads=intra,
            spin_wait=spin,
            spin_us=int(values["generation.decode_spin_us"]),
            q4_int8_decode=bool(values["generation.q4_int8_decode"]),
            fused_decode=bool(values["generation.fused_decode"]),
            fused_attention=bool(values["generation.fused_attention"]),
        )

    return open_on_chain(entry, tensorrt, onnxruntime)


def _generate_runtime(
    mgr: ModelManager, entry: ModelEntry, engine: Engine, executor: ThreadPoolExecutor
) -> ModelRuntime:
    from appliance.llm.trt_decoder import TensorRTDecoderEngine

    if not isinstance(engine, DecoderEngine | TensorRTDecoderEngine):
        raise TypeError(f"a generate model needs a decoder engine, got {type(engine).__name__}")
    session: DecoderBase = engine.session
    roles = entry.spec.artefacts
    tok = load_tokenizer(
        entry.artefact("tokenizer") if "tokenizer" in roles else entry.folder / "tokenizer.json"
    )
    tok.no_padding()
    tok.no_truncation()
    values = mgr.tunables(entry.name)
    component = f"engine:{entry.name}"
    scheduler = Scheduler(
        entry.name,
        session,
        executor,
        batch_policy(values),
        GenerationConfig.from_values(values),
        metrics=mgr.metrics,
        tunables=lambda: mgr.tunables(entry.name),
        progress=lambda allowance: mgr.progress.working(component, allowance),
        # Every prefill chunk and decode step takes engine time from the arbiter, by priority.
        grant=lambda level: mgr.arbiter.grant(entry.name, level),
        pressed=mgr.arbiter.pressed,
        # Several decode steps run in one engine call only while nobody waits for a grant.
        contended=lambda: mgr.arbiter.waiting() > 0,
    )
    fallback = entry.spec.default_response
    rt = LLMRuntime(
        entry.name,
        session,
        tok,
        scheduler,
        fallback if isinstance(fallback, str) else None,
        tunables=lambda: mgr.tunables(entry.name),
    )
    return ModelRuntime(
        entry,
        engine,
        executor,
        scheduler,
        entry.digest(),
        service=rt,
        warmup=rt.warmup,
        generation_snapshot=scheduler.generation_snapshot,
        context_length=rt.context_length,
    )


ENGINE_OPENERS[ModelKind.generate] = _open_decoder
RUNTIME_FACTORIES[ModelKind.generate] = _generate_runtime


# -- request options ---------------------------------------------------------------------------


def _number(
    body: Mapping[str, Any], name: str, lo: float, hi: float, default: float, *, lo_open: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"'{name}' must be a number", param=name)
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
        raise InvalidRequest(f"'{name}' must be {bound} and at most {hi:g}, got {value!r}", param=name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        # (An integer past 64 bits arrives as a float: JSON parsers make it one.)
        shown = json.dumps(value) if isinstance(value, int | float) else json_type(value)
        raise InvalidRequest(f"'{name}' must be an integer of at most 64 bits, got {shown[:40]}", param=name)
    return value


# OpenAI parameters this server cannot honour: a request that sets one is refused, not answered as
# if it had not (a client relying on tools or logprobs must not get plain prose back).
_UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "echo",
    "suffix",
    "best_of",
    "logit_bias",
    "tools",
    "functions",
    "audio",
)

# vLLM's and OpenAI's parameters that would change the output, with the values that change
# nothing: clients (vLLM's own among them) send those as defaults, so they are accepted, and any
# other value is refused rather than ignored. null is unset for each. Fields no server here knows
# of are ignored, as vLLM ignores them.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "repetition_penalty": (1.0,),
    "length_penalty": (1.0,),
    "min_p": (0.0,),
    "use_beam_search": (False,),
    "early_stopping": (False,),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "bad_words": ([],),
    "logits_processors": ([],),
    "allowed_token_ids": (),
    "truncate_prompt_tokens": (),
    "prompt_logprobs": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
}
# The same for the chat API only (the completions API has no template and no such fields).
_NEUTRAL_CHAT: dict[str, tuple[object, ...]] = {
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "add_special_tokens": (False,),  # the template writes them (the completions API adds them)
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "documents": ([],),
    "include_reasoning": (True,),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
}
_NEUTRAL_COMPLETIONS: dict[str, tuple[object, ...]] = {"add_special_tokens": (True,)}


def _is_neutral(value: object, neutral: tuple[object, ...]) -> bool:
    for n in neutral:
        if isinstance(n, bool):
            if value is n:
                return True
        elif isinstance(n, float):
            if isinstance(value, int | float) and not isinstance(value, bool) and value == n:
                return True
        elif type(value) is type(n) and value == n:
            return True
    return False


def _refuse_unneutral(body: Mapping[str, Any], fields: Mapping[str, tuple[object, ...]]) -> None:
    for name, neutral in fields.items():
        value = body.get(name)
        if value is not None and not _is_neutral(value, neutral):
            accepted = f"{json.dumps(neutral[0])} (no effect) or null" if neutral else "null (unset)"
            raise InvalidRequest(
                f"'{name}' is not supported: only {accepted} is accepted, got {json.dumps(value)[:40]}",
                param=name,
            )


@dataclass(frozen=True)
class GenerationOptions:
    """Generation parameters of an OpenAI request, checked for type and range. ``max_tokens`` stays
    None when unset: its default depends on the model's context and the prompt."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    reasoning_format: str | None = None  # chat only; see REASONING_FORMATS
    max_tokens_field: str = "max_tokens"  # the field the client set it with, for its errors

    @classmethod
    def from_openai(cls, body: Mapping[str, Any], *, chat: bool = True) -> GenerationOptions:
        """The options of a chat (``chat``) or text completion body."""
        n = body.get("n")
        if n is not None and type(n) is not int:  # (True == 1 in Python)
            got = repr(n) if isinstance(n, float) else json_type(n)
            raise InvalidRequest(f"'n' must be an integer, got {got}", param="n")
        if n is not None and n != 1:
            raise InvalidRequest("only n=1 is supported (one choice per request)", param="n")
        for name in _UNSUPPORTED:
            value = body.get(name)
            # The completions API's logprobs is a count: 0 asks for the sampled tokens' own.
            asked = value is not None and value is not False if name == "logprobs" else bool(value)
            if asked and not (name == "best_of" and type(value) is int and value == 1):
                raise InvalidRequest(f"'{name}' is not supported", param=name)
        for name in ("tool_choice", "function_call"):
            # Without tools only "none" (or "auto", which then means none) can be honoured; a
            # client that requires a call must hear that none will come rather than get prose.
            value = body.get(name)
            if value is not None and value not in ("none", "auto"):
                raise InvalidRequest(
                    f"'{name}' must be 'none' or 'auto': tools are not supported", param=name
                )
        user = body.get("user")  # an end-user id for abuse tracking; unused here, but typed
        if user is not None and not isinstance(user, str):
            raise InvalidRequest("'user' must be a string", param="user")
        modalities = body.get("modalities")
        if modalities is not None and modalities != ["text"]:
            raise InvalidRequest("only modalities ['text'] is supported", param="modalities")
        _refuse_unneutral(body, _NEUTRAL)
        _refuse_unneutral(body, _NEUTRAL_CHAT if chat else _NEUTRAL_COMPLETIONS)
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
                raise InvalidRequest(f"'{name}' is not supported (only 0)", param=name)
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise InvalidRequest(
                "only response_format {'type': 'text'} is supported", param="response_format"
            )
        max_tokens = _integer(body, "max_completion_tokens")
        name = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, name = _integer(body, "max_tokens"), "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequest(f"'{name}' must be at least 1, got {max_tokens}", param=name)
        top_k = _integer(body, "top_k") or 0
        if top_k < -1:
            raise InvalidRequest("'top_k' must be -1 or 0 (off) or a positive integer", param="top_k")
        min_tokens = _integer(body, "min_tokens") or 0
        if min_tokens < 0:
            raise InvalidRequest(f"'min_tokens' must be at least 0, got {min_tokens}", param="min_tokens")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise InvalidRequest("'ignore_eos' must be true or false", param="ignore_eos")
        reasoning_format = body.get("reasoning_format")
        if reasoning_format is not None and (
            not isinstance(reasoning_format, str) or reasoning_format not in REASONING_FORMATS
        ):
            raise InvalidRequest(
                "'reasoning_format' must be one of " + ", ".join(repr(f) for f in REASONING_FORMATS),
                param="reasoning_format",
            )
        return cls(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
            top_p=_number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
            top_k=max(top_k, 0),
            seed=_integer(body, "seed"),
            stop=_stops(body.get("stop")),
            ignore_eos=ignore_eos,
            stop_token_ids=_stop_token_ids(body.get("stop_token_ids")),
            min_tokens=min_tokens,
            reasoning_format=reasoning_format,
            max_tokens_field=name,
        )


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise InvalidRequest("'stop' must be a string or a list of strings", param="stop")
    if len(items) > MAX_STOP:
        raise InvalidRequest(f"'stop' may hold at most {MAX_STOP} strings, got {len(items)}", param="stop")
    if any(not s for s in items):
        raise InvalidRequest("'stop' strings must not be empty", param="stop")
    return tuple(items)


def _stop_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        raise InvalidRequest("'stop_token_ids' must be a list of token ids", param="stop_token_ids")
    return tuple(sorted(set(value)))


def normalize_messages(raw: Any, context: int = UNKNOWN_CONTEXT) -> list[dict[str, str]]:
    """OpenAI chat messages as {role, content} with text content; 'developer' is a system message.
    An assistant turn sent back with its ``reasoning_content`` keeps it: the chat template decides
    whether the model sees it (DeepSeek-R1's templates drop earlier thinking).

    Messages that cannot fit a ``context`` of that many tokens (more messages than tokens, or more
    text than ``CHARS_PER_TOKEN_BOUND`` characters a token) are refused here, before any of them
    is templated: 350,000 empty messages held the event loop for seconds, every stream with it."""
    if not isinstance(raw, list):
        raise InvalidRequest("'messages' must be a list of messages", param="messages")
    if not raw:
        raise InvalidRequest("'messages' must not be empty", param="messages")
    if len(raw) > context:
        raise InvalidRequest(
            f"'messages' has {len(raw)} messages; the model's context of {context} tokens cannot hold them",
            param="messages",
        )
    chars, bound = 0, context * CHARS_PER_TOKEN_BOUND
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(f"{where}.role must be a string", param=f"{where}.role")
        if role not in ROLES:
            raise InvalidRequest(
                f"{where}.role {quoted(role)!r} is not supported; expected one of {', '.join(ROLES)}",
                param=f"{where}.role",
            )
        for calls in ("tool_calls", "function_call"):
            # Checked before the content, which such a message leaves null.
            if m.get(calls):
                raise InvalidRequest(
                    f"{where}.{calls}: tool calls are not supported", param=f"{where}.{calls}"
                )
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(f"{where}.name must be a string", param=f"{where}.name")
        message = {
            "role": "system" if role == "developer" else role,
            "content": _content(m.get("content"), where),
        }
        thinking = m.get("reasoning_content")
        if thinking is not None:
            if role != "assistant" or not isinstance(thinking, str):
                raise InvalidRequest(
                    f"{where}.reasoning_content must be a string, and only on an assistant message",
                    param=f"{where}.reasoning_content",
                )
            message["reasoning_content"] = thinking
        chars += len(message["content"]) + len(thinking or "")
        if chars > bound:
            raise InvalidRequest(
                f"the messages hold over {bound} characters; the model's context is {context} tokens, "
                f"and prompts over {bound} characters are refused before tokenizing",
                param="messages",
            )
        out.append(message)
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise InvalidRequest(
                    f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                    param=f"{where}.content",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequest(
        f"{where}.content must be a string or a list of text parts", param=f"{where}.content"
    )


# -- results -----------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A validated request: the model, its prompt tokens and the resolved sampling parameters."""

    model: str
    llm: LLMRuntime
    prompt: list[int]
    params: SamplingParams
    reasoning: str = "none"  # the reasoning parser that splits the output (chat only)


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None  # the thinking, when a reasoning parser split the output
    reasoning_tokens: int | None = None


class GenerationStream:
    """The events of one queued generation: ``Token`` deltas then one ``Finished``.

    Failures raise the mapped ApplianceError. Leaving early (``close()``, or the consuming task
    being cancelled, which is how a client disconnect arrives) frees the sequence's slot.
    """

    def __init__(self, prepared: Prepared, seq: Seq) -> None:
        self.prepared = prepared
        self.seq = seq
        self._pending: Event | None = None
        self._done = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Token | Finished:
        if self._done:
            raise StopAsyncIteration
        ev: Event
        if self._pending is not None:
            ev, self._pending = self._pending, None
        else:
            try:
                ev = await self.seq.events.get()
            except asyncio.CancelledError:
                self.close()
                raise
        if isinstance(ev, Token):
            # A slow reader gets what piled up as one delta rather than one write per token.
            q = self.seq.events
            while not q.empty():
                nxt = q.get_nowait()
                if not isinstance(nxt, Token):
                    self._pending = nxt
                    break
                ev = Token(ev.text + nxt.text, nxt.completion_tokens, ev.reasoning + nxt.reasoning)
            return ev
        self._done = True
        if isinstance(ev, Finished):
            return ev
        raise engine_failure(ev.error)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.prepared.llm.scheduler.cancel(self.seq)

    def engine_stalled(self, seconds: float) -> bool:
        """Whether the model's engine call in progress has run for ``seconds`` or more."""
        return self.prepared.llm.scheduler.engine_call_s() >= seconds

    async def collect(self) -> Completion:
        parts, thinking = [], []
        try:
            async for ev in self:
                if isinstance(ev, Token):
                    parts.append(ev.text)
                    thinking.append(ev.reasoning)
                else:
                    return Completion(
                        "".join(parts),
                        ev.finish_reason,
                        ev.prompt_tokens,
                        ev.completion_tokens,
                        None if ev.reasoning_tokens is None else "".join(thinking),
                        ev.reasoning_tokens,
                    )
        finally:
            self.close()
        raise RuntimeError("generation ended without a finish event")


class ChatService:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    @staticmethod
    def _llm(runtime: ModelRuntime) -> LLMRuntime:
        llm = runtime.service
        if not isinstance(llm, LLMRuntime):
            kind = runtime.entry.kind.value
            article = "an" if kind[:1] in "aeiou" else "a"
            raise InvalidRequest(
                f"The model '{runtime.entry.name}' is {article} {kind} model; chat and "
                "completions need a generate model",
                param="model",
            )
        return llm

    @staticmethod
    async def _encode(
        llm: LLMRuntime, pieces: Sequence[tuple[str, bool]], *, special: bool, param: str
    ) -> list[int]:
        """Token ids of the text ``pieces`` (literal ones read special tokens' text as text); an
        absurd text is refused unread, a large one is tokenized off the event loop so that it
        stalls nobody else."""
        size = sum(len(text) for text, _ in pieces)
        bound = llm.context_length * CHARS_PER_TOKEN_BOUND
        if size > bound:
            raise InvalidRequest(
                f"the prompt has {size} characters; the model's context is {llm.context_length} "
                f"tokens, and prompts over {bound} characters are refused before tokenizing",
                param=param,
            )

        def encode() -> list[int]:
            ids: list[int] = []
            for text, literal in pieces:
                tok = llm.literal_tokenizer if literal else llm.tokenizer
                ids += tok.encode(text, add_special_tokens=special).ids
            return ids

        if size <= OFFLOOP_CHARS:
            return encode()
        return await asyncio.get_running_loop().run_in_executor(None, encode)

    async def prepare_chat(
        self, runtime: ModelRuntime, messages: Any, options: GenerationOptions
    ) -> Prepared:
        llm = self._llm(runtime)
        normalized = normalize_messages(messages, llm.context_length)
        if len(normalized) > OFFLOOP_MESSAGES:
            loop = asyncio.get_running_loop()
            pieces = await loop.run_in_executor(None, llm.render_pieces, normalized)
        else:
            pieces = llm.render_pieces(normalized)
        # The template writes the special tokens itself; the tokenizer must not add more.
        prompt = await self._encode(llm, pieces, special=False, param="messages")
        self.manager.metrics.child(self.manager.metrics.input_tokens, llm.name).observe(len(prompt))
        prepared = self._prepared(llm, prompt, options, {"messages": normalized})
        prepared.reasoning = llm.reasoning_parser(options.reasoning_format)
        return prepared

    async def prepare_completion(
        self, runtime: ModelRuntime, prompt: Any, options: GenerationOptions
    ) -> Prepared:
        llm = self._llm(runtime)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # the client's one-element batch form
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("'prompt' must not be empty", param="prompt")
            # A raw prompt is the client's own template: its special tokens' text is meant.
            ids = await self._encode(llm, [(prompt, False)], special=True, param="prompt")
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            vocab = llm.session.vocab
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise InvalidRequest(f"'prompt' has a token id outside 0..{vocab - 1}", param="prompt")
            ids = list(prompt)
        else:
            raise InvalidRequest(
                "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt"
            )
        if not ids:
            raise InvalidRequest("'prompt' encodes to no tokens", param="prompt")
        self.manager.metrics.child(self.manager.metrics.input_tokens, llm.name).observe(len(ids))
        return self._prepared(llm, ids, options, {"prompt": prompt})

    def _prepared(
        self, llm: LLMRuntime, prompt: list[int], options: GenerationOptions, source: dict[str, Any]
    ) -> Prepared:
        cfg = llm.scheduler.config
        context = llm.context_length
        name = options.max_tokens_field
        if options.max_tokens is not None and options.max_tokens > cfg.max_tokens_limit:
            raise InvalidRequest(
                f"'{name}' is {options.max_tokens}; this server allows at most {cfg.max_tokens_limit}",
                param=name,
            )
        if len(prompt) >= context:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens, {len(prompt) - context + 1} more than the model's "
                f"context of {context} allows (it must leave room for at least one new token)",
                param="messages" if "messages" in source else "prompt",
            )
        if options.max_tokens is None:
            # The limit bounds the default too (an operator may lower it below the default).
            max_tokens = min(cfg.max_tokens_default, cfg.max_tokens_limit, context - len(prompt))
        else:
            max_tokens = options.max_tokens
            over = len(prompt) + max_tokens - context
            if over > 0:
                raise InvalidRequest(
                    f"the prompt ({len(prompt)} tokens) plus {name} ({max_tokens}) exceeds the model's "
                    f"context of {context} tokens by {over}; shorten the prompt or lower {name}",
                    param=name,
                )
        need = llm.scheduler.kv_bytes(len(prompt) + max_tokens)
        if need > cfg.kv_cache_bytes:
            raise InvalidRequest(
                f"the prompt plus max_tokens needs {need} bytes of KV cache; generation.kv_cache_bytes "
                f"is {cfg.kv_cache_bytes}",
                param=name,
            )
        if options.min_tokens > max_tokens:
            raise InvalidRequest(
                f"'min_tokens' ({options.min_tokens}) must be at most the {name} the generation runs "
                f"with ({max_tokens})",
                param="min_tokens",
            )
        vocab = llm.session.vocab
        if options.stop_token_ids and options.stop_token_ids[-1] >= vocab:
            raise InvalidRequest(
                f"'stop_token_ids' has a token id outside 0..{vocab - 1}", param="stop_token_ids"
            )
        if options.min_tokens:
            # Until min_tokens, the stop ids and EOS are banned from sampling; banning every id
            # left nothing to sample (greedy gave token 0, sampling garbage).
            banned = set(options.stop_token_ids)
            if not options.ignore_eos:
                banned.update(i for i in llm.session.eos_ids if 0 <= i < vocab)
            if len(banned) >= vocab:
                raise InvalidRequest(
                    f"'stop_token_ids' (with the model's EOS ids) holds all {vocab} token ids, so "
                    f"none could be sampled before 'min_tokens' ({options.min_tokens}); leave at "
                    "least one token id out, or set 'min_tokens' to 0",
                    param="stop_token_ids",
                )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            seed=options.seed,
            stop=options.stop,
            ignore_eos=options.ignore_eos,
            stop_token_ids=options.stop_token_ids,
            min_tokens=options.min_tokens,
        )
        return Prepared(llm.name, llm, prompt, params)

    def start(
        self,
        prepared: Prepared,
        *,
        priority: int | None = None,
        timeout_ms: float | None = None,
        reservation: Reservation | None = None,
    ) -> GenerationStream:
        """Queue a prepared request; admission refusals raise at once (429 / 503 / 400)."""
        llm = prepared.llm
        processor = OutputProcessor.create(
            prepared.params, llm.tokenizer, llm.session.eos_ids, make_parser(prepared.reasoning)
        )
        seq = Seq(list(prepared.prompt), prepared.params, processor)
        try:
            llm.scheduler.submit(seq, priority=priority, timeout_ms=timeout_ms, reservation=reservation)
        except AdmissionError as exc:
            raise admission_error(exc) from None
        return GenerationStream(prepared, seq)


__all__ = [
    "ChatService",
    "Completion",
    "DecoderEngine",
    "GenerationOptions",
    "GenerationStream",
    "LLMRuntime",
    "Prepared",
]
