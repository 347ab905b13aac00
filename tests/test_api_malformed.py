"""Malformed requests are client errors in the API's own shape, never server errors.

Each case here was a 500 before (found by tests/test_fuzz.py or by reading the parsing code): a
field used before its type was checked, an integer too large for numpy or a float, a header that
``str.isdigit`` accepts and ``int`` refuses, a body nested past the recursion limit, an unpaired
surrogate that no tokenizer takes. Over loopback against the real server and real models.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.api.jsonbody import _depth
from appliance.api.tensors import decode_inputs
from appliance.errors import InvalidRequest
from appliance.logs import JsonFormatter, quiet_malformed_requests
from tests.conftest import ServerThread, make_repository, metric
from tests.test_api_kserve import build_affine_model

EMB, AFFINE = "all-minilm-l6-v2", "affine"
X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
IDS = {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, minilm_folder: Path) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("malformed")
    repo = make_repository(tmp, {EMB: minilm_folder, AFFINE: build_affine_model(tmp / "src" / AFFINE)})
    cfg = {
        "model_repository": str(repo),
        "data_dir": str(tmp / "data"),
        "admin": {"port": 0, "socket": str(tmp / "data" / "admin.sock")},
    }
    srv = ServerThread(cfg).start()
    yield srv
    srv.stop()


def _nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(
            {"inputs": [X, IDS], "parameters": [1]},
            "'parameters' must be an object, got an array",
            id="params-list",
        ),
        pytest.param(
            {"inputs": [X, IDS], "parameters": "fast"},
            "'parameters' must be an object, got a string",
            id="params-str",
        ),
        pytest.param(
            {"inputs": [X, IDS], "outputs": [{"name": "y", "parameters": [1]}]},
            "output 'y': 'parameters' must be an object",
            id="output-params-list",
        ),
        pytest.param(
            {"inputs": [{**X, "parameters": 7}, IDS]}, "input 'x': 'parameters'", id="input-params-int"
        ),
        pytest.param({"inputs": [{**X, "datatype": ["FP32"]}, IDS]}, "datatype", id="datatype-list"),
        pytest.param({"inputs": [{**X, "datatype": {"a": 1}}, IDS]}, "datatype", id="datatype-object"),
        pytest.param(
            {"inputs": [{**X, "shape": [1] * 40, "data": [1]}, IDS]}, "dimensions", id="too-many-dims"
        ),
        pytest.param({"id": {"a": 1}, "inputs": [X, IDS]}, "'id' must be a string", id="id-object"),
        pytest.param(
            {"inputs": [X, IDS], "parameters": {"binary_data_output": "yes"}},
            "binary_data_output",
            id="binary-output-str",
        ),
        pytest.param(
            {"inputs": [X, IDS], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]},
            "binary_data",
            id="output-binary-int",
        ),
        pytest.param({"inputs": [X, IDS], "parameters": {"timeout": 10**30}}, "timeout", id="timeout-huge"),
        pytest.param(
            {"inputs": [{**X, "parameters": {"binary_data_size": True}}, IDS]},
            "binary_data_size",
            id="size-bool",
        ),
        pytest.param(_nested(100_000), "nested", id="nested-past-recursion-limit"),
        pytest.param(_nested(900), "nested", id="nested-below-the-parser-limit"),
    ],
)
def test_malformed_infer_requests_are_400_in_kserve_shape(
    server: ServerThread, body: dict[str, Any] | bytes, fragment: str
) -> None:
    status, resp, _ = server.post(f"/v2/models/{AFFINE}/infer", body)
    assert status == 400, resp
    assert set(resp) == {"error"} and fragment in resp["error"], resp


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        # numpy only warns where a float overflows its type, and answers inf.
        ({"datatype": "FP16", "shape": [1], "data": [1e6]}, "a value is out of range for FP16"),
        # np.prod wraps around in int64: 2**32 * 2**32 "holds" 0 elements.
        ({"shape": [4294967296, 4294967296], "data": []}, "18446744073709551616 elements"),
        # Zero elements, so the count matches; numpy cannot make the shape.
        ({"shape": [2**63, 0], "data": []}, "cannot be used"),
    ],
)
def test_decoding_refuses_what_numpy_would_take_wrongly_or_fail_on(
    tensor: dict[str, Any], fragment: str
) -> None:
    """Decoding on its own: a resident model refuses a shape or datatype it does not take before
    the data is decoded (tests/test_api_kserve.py), so these reach decoding over loopback only
    for a model not loaded yet, or one whose shapes allow them."""
    with pytest.raises(InvalidRequest, match=f"input 'x': .*{re.escape(fragment)}"):
        decode_inputs({"inputs": [{**X, **tensor}]}, b"")


def test_a_malformed_binary_request_header_part_is_400(server: ServerThread) -> None:
    head = _nested(5000)
    status, resp, _ = server.post(
        f"/v2/models/{AFFINE}/infer",
        head,
        {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )
    assert status == 400 and "nested" in resp["error"], resp


@pytest.mark.parametrize("length", ["1_0", "+10", "\u0661\u0660", "-1", "ten", ""])
def test_the_binary_header_length_is_ascii_digits_only(server: ServerThread, length: str) -> None:
    """As HTTP's Content-Length: Python's int() would also take underscores, signs and other
    scripts' digits (X-Timeout-Ms and X-Priority are held to ASCII the same way)."""
    raw = (
        b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Inference-Header-Content-Length: %s\r\nContent-Length: 12\r\n\r\n{}0123456789"
    ) % (AFFINE.encode(), length.encode())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400") and b"decimal byte count" in reply, reply


def test_a_body_that_is_not_utf8_is_400_saying_which_byte(server: ServerThread) -> None:
    """A Latin-1 body: orjson's own words were "str is not valid UTF-8: surrogates not allowed:
    line 1 column 1 (char 0)", naming neither the byte nor where it is."""
    raw = b'{"model": "%s", "input": "caf\xe9"}' % EMB.encode()
    expected = (
        f"the request body is not valid JSON: byte 0xe9 at offset {raw.index(0xE9)} is not UTF-8, "
        "which JSON is sent in"
    )
    status, resp, _ = server.post("/v1/embeddings", raw)
    assert status == 400 and resp["error"]["message"] == expected, resp
    raw = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\xff"]}]}'
    status, resp, _ = server.post(f"/v2/models/{EMB}/infer", raw)
    assert status == 400 and f"byte 0xff at offset {raw.index(0xFF)} is not UTF-8" in resp["error"], resp


def test_an_unpaired_surrogate_is_400_on_both_apis(server: ServerThread) -> None:
    raw = b'{"model": "%s", "input": "a\\ud800b"}' % EMB.encode()
    status, resp, _ = server.post("/v1/embeddings", raw)
    assert status == 400 and "surrogate" in resp["error"]["message"], resp
    raw = b'{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["\\udfff"]}]}'
    status, resp, _ = server.post(f"/v2/models/{EMB}/infer", raw)
    assert status == 400 and "surrogate" in resp["error"], resp
    # A valid pair is one character, and fine.
    status, _, _ = server.post("/v1/embeddings", b'{"model": "%s", "input": "\\ud83d\\ude00"}' % EMB.encode())
    assert status == 200


@pytest.mark.parametrize(
    ("header", "value"),
    [
        # "²" reaches the server as UTF-8; str.isdigit() accepts it, int() does not.
        pytest.param("X-Priority", "²".encode().decode("latin-1"), id="priority-superscript"),
        pytest.param("X-Priority", "--5", id="priority-two-signs"),
        pytest.param("X-Priority", "1" * 5000, id="priority-past-int-digit-limit"),
        pytest.param("X-Timeout-Ms", "inf", id="timeout-inf"),
        pytest.param("X-Timeout-Ms", "1e400", id="timeout-overflows-to-inf"),
        pytest.param("X-Timeout-Ms", "nan", id="timeout-nan"),
        # float() takes these; no client means them, and a proxy or a log reads them otherwise.
        pytest.param("X-Timeout-Ms", "1_000", id="timeout-underscore"),
        pytest.param("X-Timeout-Ms", "١٠٠٠".encode().decode("latin-1"), id="timeout-arabic-indic-digits"),
        pytest.param("X-Timeout-Ms", "0x10", id="timeout-hex"),
    ],
)
def test_malformed_headers_are_400_naming_the_header(server: ServerThread, header: str, value: str) -> None:
    status, resp, _ = server.post("/v1/embeddings", {"model": EMB, "input": "x"}, {header: value})
    assert status == 400, resp
    assert header in resp["error"]["message"]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param(b"\xff\xfe", None, id="not-utf8"),
        pytest.param("caf\u00e9-1".encode(), "caf_-1", id="utf8"),
        pytest.param("abc/\u00e9".encode(), "abc/_", id="utf8-last"),  # was "abc/"
        pytest.param("\u00e9\u00e9".encode(), None, id="nothing-ascii"),  # a fresh id
        pytest.param(b"r" * 200, "r" * 64, id="long"),
        pytest.param(b"plain-id 7", "plain-id 7", id="printable"),
    ],
)
def test_a_request_id_is_printable_ascii_in_the_answer_and_the_log(
    server: ServerThread, caplog: pytest.LogCaptureFixture, sent: bytes, expected: str | None
) -> None:
    """Found by a probe: an X-Request-Id of bytes that are not UTF-8 (obs-text) reached the
    response's headers and the access log as lone surrogates; the response could not be encoded
    and the JSON log line was lost. The id the server uses is printable ASCII, at most 64
    characters: anything else in the client's is replaced (a fresh id when nothing is left)."""
    body = json.dumps({"model": EMB, "input": "x"}).encode()
    raw = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Request-Id: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (sent, len(body))
    ) + body
    with caplog.at_level(logging.INFO, logger="appliance.access"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(raw)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head = reply.partition(b"\r\n\r\n")[0].split(b"\r\n")
        assert head[0].startswith(b"HTTP/1.1 200 "), reply[:300]
        answered = next(line[len(b"X-Request-Id: ") :] for line in head if line.startswith(b"X-Request-Id: "))
        assert answered.isascii() and answered.decode().isprintable() and 0 < len(answered) <= 64
        if expected is not None:
            assert answered.decode() == expected
        deadline = time.monotonic() + 5
        while not (lines := [r for r in caplog.records if r.name == "appliance.access"]):
            assert time.monotonic() < deadline, "no access line"
            time.sleep(0.05)
    logged = json.loads(JsonFormatter().format(lines[-1]))
    assert logged["request_id"] == answered.decode(), logged


def test_a_token_id_beyond_int64_is_400(server: ServerThread) -> None:
    status, resp, _ = server.post("/v1/embeddings", {"model": EMB, "input": [[2**70, 1]]})
    # orjson reads an integer past 64 bits as a float: not a token id either way.
    assert status == 400 and resp["error"]["param"] == "input", resp


def test_a_shape_no_body_could_hold_is_400_saying_what_is_wrong_with_it(server: ServerThread) -> None:
    """A shape declaring more rows than any body holds is malformed, and says how: it had been
    admitted as "the request has 2147483648 inputs" (a capped count, quoted as the real one);
    a dimension past 64 bits reaches the server as a float, and the message says the bound."""
    text = {"name": "text", "datatype": "BYTES", "data": ["a"]}
    status, resp, _ = server.post(
        f"/v2/models/{EMB}/infer", {"inputs": [{**text, "shape": [10**12, 10**12]}]}
    )
    assert status == 400 and "2147483648" not in resp["error"], resp
    assert "text" in resp["error"] and "10000000000" in resp["error"], resp
    status, resp, _ = server.post(f"/v2/models/{EMB}/infer", {"inputs": [{**text, "shape": [10**20]}]})
    assert status == 400 and "below 2**63" in resp["error"], resp


def test_a_huge_timeout_that_fits_is_served(server: ServerThread) -> None:
    # The largest Triton timeout and a huge but finite header are deadlines, not errors.
    body = {"inputs": [X, IDS], "parameters": {"timeout": 2**64 - 1}}
    status, resp, _ = server.post(f"/v2/models/{AFFINE}/infer", body)
    assert status == 200, resp
    status, resp, _ = server.post("/v1/embeddings", {"model": EMB, "input": "x"}, {"X-Timeout-Ms": "1e300"})
    assert status == 200, resp
    assert len(resp["data"][0]["embedding"]) == 384


def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_server_error(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Headers and half a body, then the connection closes: the read fails with a reset. That is
    the client's doing (nginx's 499), not an unhandled error with a traceback and a 500."""
    body = b'{"model": "%s", "input": "%s"}' % (EMB.encode(), b"x" * 4000)
    counted = 'appliance_requests_total{api="openai",model="-",status="%d"}'  # no model read yet
    before_499, before_500 = metric(server, counted % 499), metric(server, counted % 500)
    with caplog.at_level(logging.ERROR):
        for cut in (0, 10, len(body) // 2):
            sock = socket.create_connection(("127.0.0.1", server.port))
            head = (
                f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body[:cut])
            time.sleep(0.05)  # the route is reading the rest when the client goes
            sock.close()
        deadline = time.monotonic() + 10
        while metric(server, counted % 499) < before_499 + 3:
            assert time.monotonic() < deadline, "the hang-ups were never counted"
            time.sleep(0.05)
    assert metric(server, counted % 500) == before_500
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]
    status, resp, _ = server.post("/v1/embeddings", {"model": EMB, "input": "still here"})
    assert status == 200, resp


def _raw_exchange(server: ServerThread, head: str, body: bytes = b"", wait_s: float = 5.0) -> bytes:
    """One request over a raw socket; what came back within ``wait_s`` (the server may keep the
    connection open to read a body it refused, so this does not wait for the close)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as sock:
        sock.sendall(head.encode() + body)
        got = b""
        deadline = time.monotonic() + wait_s
        while b"\r\n\r\n" not in got.split(b"100 Continue\r\n\r\n")[-1] and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_a_compressed_body_is_decoded_whole_on_both_apis(server: ServerThread) -> None:
    """Triton's and KServe's clients can gzip or deflate a request. The body's Content-Length
    counts compressed bytes; a body that decodes to far more than that is read whole (it was cut
    at the first decoded piece and refused as invalid JSON)."""
    # The padding comes first: a body cut short is then not valid JSON.
    body = b"{" + b" " * 4_000_000 + b'"model": "%s", "input": "a compressed request"}' % EMB.encode()
    plain = server.post("/v1/embeddings", body)
    assert plain[0] == 200, plain[1]
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        status, resp, _ = server.post(
            "/v1/embeddings", packed, {"Content-Encoding": encoding, "Cache-Control": "no-cache"}
        )
        assert status == 200, (encoding, resp)
        assert resp["data"][0]["embedding"] == pytest.approx(plain[1]["data"][0]["embedding"], abs=1e-6)
    infer = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}'
    status, resp, _ = server.post(
        f"/v2/models/{EMB}/infer", gzip.compress(b" " * 4_000_000 + infer), {"Content-Encoding": "gzip"}
    )
    assert status == 200 and resp["outputs"][0]["shape"] == [1, 384], resp


def test_a_zip_bomb_is_a_413_and_the_server_keeps_serving(server: ServerThread) -> None:
    """64 MB of spaces gzip to ~64 kB: under the size limit on the wire, four times over it
    decoded. The decoder stops at the limit (server.max_body_bytes, 16 MB here)."""
    bomb = gzip.compress(b" " * (64 << 20), compresslevel=1)
    assert len(bomb) < 1 << 20
    status, resp, _ = server.post("/v1/embeddings", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and resp["error"]["code"] == "request_too_large", resp
    status, resp, _ = server.post("/v1/embeddings", {"model": EMB, "input": "still here"})
    assert status == 200, resp


def _zeros(encoding: str, mib: int) -> bytes:
    """``mib`` MiB of zeros, compressed: a few hundred kB on the wire."""
    if encoding == "br":
        # aiohttp decodes brotli where the package is installed (here tritonclient's client brings it).
        packer = pytest.importorskip("brotli").Compressor(quality=1)
        return b"".join(packer.process(bytes(1 << 22)) for _ in range(mib >> 2)) + packer.finish()
    # Deflate blocks after a full flush stand alone: one 4 MiB block, repeated, is a valid stream.
    zeros, crc = bytes(4 << 20), 0
    pack = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = pack.compress(zeros) + pack.flush(zlib.Z_FULL_FLUSH)
    for _ in range(mib >> 2):
        crc = zlib.crc32(zeros, crc)
    size = (mib << 20) & 0xFFFFFFFF
    return (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # gzip's header: deflate, no name, no time
        + block * (mib >> 2)
        + pack.flush()
        + crc.to_bytes(4, "little")
        + size.to_bytes(4, "little")
    )


@pytest.mark.parametrize(
    ("encoding", "mib", "path", "status"),
    [
        pytest.param("br", 4096, "/v1/embeddings", 415, id="brotli-refused-unread"),
        pytest.param("gzip", 2048, "/v1/no-such-route", 404, id="gzip-to-no-route"),
    ],
)
def test_a_compressed_body_answered_unread_is_not_decoded_and_others_are_served(
    server: ServerThread, encoding: str, mib: int, path: str, status: int
) -> None:
    """Found by a probe: after answering without reading the body (a 415, 404, 405, 401 or 413),
    aiohttp lingered up to 10 s reading and discarding it, and decoding a compressed one does not
    yield to the event loop: a brotli body of 4 GiB of zeros held the whole server for those
    10 s. The answer now comes with the connection closed, and nothing of the body is decoded."""
    bomb = _zeros(encoding, mib)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: {encoding}\r\nContent-Length: {len(bomb)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + bomb)
        slowest = 0.0
        for _ in range(20):  # another client, meanwhile
            started = time.monotonic()
            assert server.get("/healthz")[0] == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
        assert slowest < 0.5, f"a /healthz took {slowest:.2f} s while the body was being discarded"
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes
            reply += chunk
    head_lines = reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head_lines[0].startswith(b"HTTP/1.1 %d " % status), reply[:300]
    assert b"Connection: close" in head_lines, head_lines


@pytest.mark.parametrize(
    ("encoding", "body", "status", "fragment"),
    [
        pytest.param("deflate", b"not deflate data", 400, "could not be read", id="bad-deflate"),
        pytest.param("gzip", b"\x1f\x8b not gzip at all", 400, "could not be read", id="bad-gzip"),
        pytest.param("br", b"{}", 415, "'br' is not supported", id="brotli"),
        pytest.param("gzip, gzip", b"{}", 415, "is not supported", id="stacked"),
    ],
)
def test_a_body_that_does_not_decode_is_a_client_error(
    server: ServerThread, encoding: str, body: bytes, status: int, fragment: str
) -> None:
    """Undecodable data and encodings the server does not decode were 500s ("internal error:
    RequestPayloadError"): the client's mistake, said as such."""
    got, resp, _ = server.post("/v1/embeddings", body, {"Content-Encoding": encoding})
    assert got == status and fragment in resp["error"]["message"], resp
    got, resp, _ = server.post(f"/v2/models/{EMB}/infer", body, {"Content-Encoding": encoding})
    assert got == status and fragment in resp["error"], resp


def _until_closed(server: ServerThread, raw: bytes) -> tuple[bytes, bytes]:
    """A ``Connection: close`` request over a raw socket: the answer's head and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, answer = reply.partition(b"\r\n\r\n")
    return head, answer


def test_a_repeated_content_encoding_header_is_415(server: ServerThread) -> None:
    """Found by a probe: ``identity`` then ``br`` on two header lines passed the allow-list, which
    read the first line, while aiohttp decodes by the last. The lines are one list (RFC 9110,
    5.3), and more than one encoding is refused before any of the body is read."""
    body = json.dumps({"model": EMB, "input": "x"}).encode()
    for lines in (("identity", "br"), ("identity", "gzip")):
        raw = (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"".join(b"Content-Encoding: %s\r\n" % line.encode() for line in lines)
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        head, answer = _until_closed(server, raw)
        assert head.startswith(b"HTTP/1.1 415 "), head
        message = json.loads(answer)["error"]["message"]
        assert message.startswith(f"Content-Encoding '{', '.join(lines)}' is not supported"), message
        assert "in one Content-Encoding header" in message


def test_an_encoding_whose_decoder_is_not_installed_is_415_as_brotli_is(server: ServerThread) -> None:
    """Found by fuzzing: aiohttp decodes zstd only with backports.zstd (or Python 3.14); without
    it its parser refused the request as a 400 that told the client to install the package on
    the server. Now the 415 brotli gets (and any encoding the server does not decode), whichever
    answers it: aiohttp's parser (then as HTTP/1.0: it has not kept the request's version) or,
    where the package is installed, the route."""
    body = json.dumps({"model": EMB, "input": "x"}).encode()
    errors = {}
    for encoding in ("zstd", "br"):
        raw = (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (encoding.encode(), len(body))
        ) + body
        head, answer = _until_closed(server, raw)
        assert re.match(rb"HTTP/1\.[01] 415 ", head), head
        errors[encoding] = json.loads(answer)["error"]
    assert errors["zstd"]["code"] == errors["br"]["code"] == "unsupported_content_encoding", errors
    assert errors["zstd"]["message"] == errors["br"]["message"].replace("'br'", "'zstd'"), errors
    assert server.post("/v1/embeddings", {"model": EMB, "input": "still here"})[0] == 200


def test_a_body_declared_too_large_is_refused_before_it_is_sent(server: ServerThread) -> None:
    """A client that asks first (Expect: 100-continue) with a length over the limit gets its 413
    without a 100 Continue; one that does not ask gets the 413 before sending a byte of it."""
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 99999999999\r\n{}\r\n"
    )
    started = time.monotonic()
    asked = _raw_exchange(server, head.format("Expect: 100-continue\r\n"))
    assert asked.startswith(b"HTTP/1.1 413 "), asked[:200]
    assert b"99999999999 bytes" in asked and b"server.max_body_bytes" in asked
    unasked = _raw_exchange(server, head.format(""))
    assert unasked.startswith(b"HTTP/1.1 413 "), unasked[:200]
    assert time.monotonic() - started < 4  # no wait for a body that will never come
    # A body within the limit is asked for, and served.
    body = b'{"model": "%s", "input": "asked first"}' % EMB.encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            (
                "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_an_unknown_expectation_is_417_in_the_apis_shape(server: ServerThread) -> None:
    status, resp, _ = server.post("/v1/embeddings", {"model": EMB, "input": "x"}, {"Expect": "gimme"})
    assert status == 417 and "only 100-continue" in resp["error"]["message"], resp


def test_a_wrong_method_is_405_naming_the_allowed_ones(server: ServerThread) -> None:
    status, resp, headers = server.request("PUT", "/v1/embeddings", {"model": EMB, "input": "x"})
    assert status == 405 and headers["Allow"] == "POST", resp
    assert resp["error"]["message"] == "PUT is not allowed on /v1/embeddings; it takes POST"
    status, resp, headers = server.request("DELETE", f"/v2/models/{EMB}/infer")
    assert status == 405 and "it takes POST" in resp["error"], resp


def test_a_request_with_no_route_is_not_asked_for_its_body_and_gets_its_404_or_405(
    server: ServerThread,
) -> None:
    """Found by fuzzing: a 404 or 405 is aiohttp's own route, with aiohttp's Expect handler. A
    client that asked first was told "100 Continue" for a body the 404 or 405 then refused
    unread, and any other expectation got a text/plain 417. Neither asks for the body now, and
    the answer is the 404 or 405 in the API's shape."""
    for method, path, status in (
        ("PUT", "/v1/completions", 405),
        ("POST", "/v1/nowhere", 404),
        ("PUT", f"/v2/models/{EMB}/infer", 405),
    ):
        for expect in ("100-continue", "gimme"):
            head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nExpect: {expect}\r\nContent-Length: 5\r\n\r\n"
            reply = _raw_exchange(server, head)
            assert reply.startswith(f"HTTP/1.1 {status} ".encode()), (method, path, expect, reply[:200])
            error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
            assert isinstance(error, str if path.startswith("/v2") else dict), reply


def _exchange_closing(server: ServerThread, method: str, path: str) -> tuple[list[bytes], bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def test_every_get_route_answers_head_with_its_headers_and_no_body(server: ServerThread) -> None:
    """HEAD is GET without the body (RFC 9110, 9.3.2): the data plane's routes were added GET
    only, so a monitor probing with HEAD got a 405 (the admin plane's and /healthz had it)."""
    paths = {
        route.resource.canonical.replace("{model}", EMB).replace("{version}", "1")
        for route in server.app.router.routes()
        if route.method == "GET" and route.resource is not None
    }
    assert f"/v2/models/{EMB}/versions/1/config" in paths and "/v1/models" in paths
    for path in sorted(paths - {"/metrics"}):  # the metrics change between two requests
        got, got_body = _exchange_closing(server, "GET", path)
        head, head_body = _exchange_closing(server, "HEAD", path)
        assert head[0] == got[0] and head[0].startswith(b"HTTP/1.1 200 "), (path, head[0], got[0])
        # The GET's length (an empty answer's HEAD may leave it out).
        lengths = [line for line in head if line.lower().startswith(b"content-length:")]
        assert all(line in got and int(line.split(b":")[1]) == len(got_body) for line in lengths)
        assert lengths or not got_body, (path, head)
        assert head_body == b"", path
    head, head_body = _exchange_closing(server, "HEAD", "/metrics")
    assert head[0].startswith(b"HTTP/1.1 200 ") and head_body == b""


def test_a_request_the_http_parser_refuses_is_one_info_line_not_a_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp answers 400 to a request it cannot parse and logs an error with a traceback; a
    fuzzer turned that into a flood of tracebacks. The serving process's logging (logs.setup)
    makes each one info line naming what was wrong."""
    quiet_malformed_requests()
    bad = [
        (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\x01b\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ]
    with caplog.at_level(logging.INFO, logger="aiohttp.server"):
        for raw, status in bad:
            head, body = _until_closed(server, raw)
            # Answered in the APIs' JSON error shape, not aiohttp's text/plain.
            assert b" %d " % status in head.split(b"\r\n")[0] and b"application/json" in head, head
            error = json.loads(body)["error"]
            assert error["code"] == "malformed_request" and error["message"].startswith(
                "the request could not"
            )
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if "malformed request refused (400)" in r.getMessage()]) < 3:
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records and all(r.levelno == logging.INFO and not r.exc_info for r in records)
    assert "Invalid character in chunk size" in records[0].getMessage()


def test_a_body_that_does_not_decode_is_a_400_naming_it_and_logs_no_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A gzip label over a plain body, or gzip data with garbage after it: the route answers 400
    saying so. aiohttp then drained the rest of the body, met the decoding error again and logged
    it as an error with a traceback; the rest is now dropped undecoded and the connection ends."""
    quiet_malformed_requests()
    plain = json.dumps({"model": EMB, "input": "x"}).encode()
    bodies = [plain, gzip.compress(plain) + b"garbage" * 100]
    with caplog.at_level(logging.INFO, logger="aiohttp.server"):
        for body in bodies:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(
                    b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                )
                reply = b""
                while chunk := sock.recv(4096):  # until the server closes
                    reply += chunk
            head, _, answer = reply.partition(b"\r\n\r\n")
            assert b" 400 " in head.split(b"\r\n", 1)[0], reply
            message = json.loads(answer)["error"]["message"]
            assert message == (
                "the request body could not be read: it is not valid gzip data, as its Content-Encoding says"
            ), message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_a_client_hanging_up_before_its_100_continue_logs_no_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a hang-up probe: a client that sent ``Expect: 100-continue`` and reset the
    connection before the 100 came made aiohttp log an error with a traceback, one per hang-up
    (the 100 is written outside the middlewares, where nothing caught it)."""
    body = json.dumps({"model": EMB, "input": "x"}).encode()
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.sendall(head)
            sock.close()  # linger 0: a reset, before the server's 100
            time.sleep(0.02)
        time.sleep(0.5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]
    status, _, _ = server.post("/v1/embeddings", {"model": EMB, "input": "still serving"})
    assert status == 200


_JSON = st.recursive(
    st.none() | st.integers() | st.text(alphabet='[]{}"\\ab'),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet='[]{}"\\k'), inner, max_size=4)
    ),
    max_leaves=40,
)


def _tree_depth(doc: Any) -> int:
    if isinstance(doc, dict):
        return 1 + max((_tree_depth(v) for v in doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max((_tree_depth(v) for v in doc), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(_JSON, st.booleans())
def test_the_nesting_depth_is_read_from_the_bytes_as_the_document_has_it(doc: Any, indent: bool) -> None:
    """Brackets and quotes inside strings (escaped or not) nest nothing. Measured from the bytes:
    walking the parsed document took 2.7 s of the event loop for 350,000 small objects."""
    raw = json.dumps(doc, indent=1 if indent else None).encode()
    assert _depth(raw) == _tree_depth(doc)
