"""``generation.decode_spin_us``: the chat decoder's ONNX Runtime threads spin a bounded time for
their next kernel before sleeping (``appliance.engines.onnxruntime.spinning``).

Promised: both of the decoder's sessions (the float graph and the 4-bit decode companion) get the
bound; the answers are the same tokens (only waiting changes, not arithmetic); a millisecond or so
after a run the threads sleep, so an idle decoder does not keep a core busy (which
``engine.spin_wait``'s unbounded spinning does); 0 leaves the threads sleeping at once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import onnxruntime as ort
import pytest

from appliance.llm.runtime import DecoderSession, greedy_generate
from appliance.settings import REGISTRY

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_reference.json"


@pytest.fixture(scope="module")
def folder(smollm_folder: Path) -> Path:
    if not (smollm_folder / "q4" / "model.onnx").exists():
        pytest.skip("the SmolLM2 build has no 4-bit companion")
    return smollm_folder


def _open(folder: Path, spin_us: int) -> DecoderSession:
    return DecoderSession(
        folder,
        intra_op_threads=2,
        single_stream=folder / "q4",
        q4_int8_decode=True,
        fused_decode=True,
        spin_us=spin_us,
    )


def _entry(options: ort.SessionOptions, key: str) -> str:
    try:
        return str(options.get_session_config_entry(key))
    except Exception:  # ORT raises a plain RuntimeError-like error for a key never set
        return ""


def _config(session: DecoderSession) -> list[tuple[str, str]]:
    """(allow_spinning, spin_duration_us) of the float session and of the decode companion."""
    out = []
    for sess in (session.session, session.single):
        assert sess is not None
        options = sess.get_session_options()
        out.append(
            (
                _entry(options, "session.intra_op.allow_spinning"),
                _entry(options, "session.intra_op.spin_duration_us"),
            )
        )
    return out


def test_the_setting_is_bounded_and_on_by_default() -> None:
    setting = REGISTRY["generation.decode_spin_us"]
    # On by default since session 31's measurement (README, Performance): 1.2x the tokens/s at
    # one stream with the appliance alone on the box; 0 stays for a box shared with other work.
    assert setting.default == 200 and setting.minimum == 0 and setting.maximum == 100000
    assert setting.reload, "thread options apply when the model is loaded"


def test_a_bounded_spin_reaches_both_sessions_and_keeps_the_answers(folder: Path) -> None:
    case = json.loads(FIXTURE.read_text())["cases"][0]
    spinning = _open(folder, 1000)
    assert _config(spinning) == [("1", "1000"), ("1", "1000")]
    assert greedy_generate(spinning, [case["prompt_ids"]], 20)[0] == case["greedy_new_ids"]
    assert _config(_open(folder, 0)) == [("0", ""), ("0", "")], "0: threads sleep at once, as before"


def test_an_idle_decoder_stops_spinning_soon_after_a_step(folder: Path) -> None:
    case = json.loads(FIXTURE.read_text())["cases"][0]
    session = _open(folder, 1000)
    logits, state = session.prefill([case["prompt_ids"]])
    session.decode(logits.argmax(-1), state)
    cpu = time.process_time()
    time.sleep(0.3)
    # An unbounded spin (engine.spin_wait) keeps a worker thread busy for the whole pause (~0.3 s
    # of CPU); bounded to 1 ms it sleeps right after the step.
    assert time.process_time() - cpu < 0.1
