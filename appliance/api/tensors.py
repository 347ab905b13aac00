"""KServe v2 tensor codec: JSON data and the binary tensor data extension, both directions."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from appliance.api.jsonbody import parse_object
from appliance.engines.base import DTYPES, datatype_of
from appliance.errors import InvalidRequest, json_type, quoted

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIMS = 32  # numpy's own limit is 64; no model here has more than a handful
# Values converted to an array per numpy call: each call holds the GIL throughout, so a large
# body is decoded (on a worker thread: see kserve.infer) in slices that let the event loop run.
_SLICE = 1 << 16


_DECIMAL = re.compile(r"[0-9]{1,18}")


def header_length_of(text: str) -> int | None:
    """The JSON part's length from ``Inference-Header-Content-Length``: ASCII digits only, as
    HTTP's Content-Length (``int()`` would also take ``1_0``, ``+5`` and other scripts' digits)."""
    return int(text) if _DECIMAL.fullmatch(text) else None


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """JSON part and binary tail of an infer request."""
    if header_length is None:
        json_part, tail = body, b""
    else:
        n = header_length_of(header_length)
        if n is None:
            raise InvalidRequest(f"{HEADER_LENGTH} must be a decimal byte count, got {header_length[:40]!r}")
        if n > len(body):
            raise InvalidRequest(f"{HEADER_LENGTH} {n} exceeds the body length {len(body)}")
        json_part, tail = body[:n], body[n:]
    return parse_object(json_part, "the request's JSON part"), tail


def decode_inputs(doc: dict[str, Any], tail: bytes) -> dict[str, np.ndarray]:
    """The request's input tensors. Every field's type is checked before it is used, the
    request-level fields too (``id``, ``parameters``, ``outputs``), so that no malformed request
    gets further than here."""
    check_request(doc)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("'inputs' must be a non-empty list")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise InvalidRequest(f"inputs[{i}] must be an object")
        name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(name, str):
            raise InvalidRequest(f"inputs[{i}].name must be a string")
        label = quoted(name)  # the name as its errors quote it
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            # A literal past 64 bits reaches here as a float (orjson's reading): say the bound.
            raise InvalidRequest(
                f"input '{label}': shape must be a list of non-negative integers (each below 2**63)"
            )
        if len(shape) > MAX_DIMS:
            raise InvalidRequest(f"input '{label}': shape has {len(shape)} dimensions; at most {MAX_DIMS}")
        if not isinstance(datatype, str) or datatype not in DTYPES:
            raise InvalidRequest(
                f"input '{label}': unknown datatype {_datatype(datatype)}; expected one of {sorted(DTYPES)}"
            )
        if name in out:
            raise InvalidRequest(f"input '{label}' given twice")
        params = parameters_of(t, f"input '{label}'")
        size = params.get("binary_data_size")
        # Python integers: np.prod would wrap around in int64 ([2**32, 2**32] -> 0 elements).
        count = math.prod(shape)
        if size is not None:
            if not _is_uint(size):
                raise InvalidRequest(
                    f"input '{label}': parameters.binary_data_size must be a non-negative integer, "
                    f"got {_spelled(size)}"
                )
            if "data" in t:
                # Triton refuses it too; which of the two was meant cannot be told.
                raise InvalidRequest(
                    f"input '{label}' has both 'data' and parameters.binary_data_size; give one of them"
                )
            if offset + size > len(tail):
                raise InvalidRequest(f"input '{label}': binary_data_size exceeds the binary data")
            raw = tail[offset : offset + size]
            offset += size
            arr = _from_binary(label, raw, datatype, count)
        else:
            if "data" not in t:
                raise InvalidRequest(f"input '{label}' has neither 'data' nor binary_data_size")
            arr = _from_json(label, t["data"], datatype, shape, count)
        try:
            out[name] = arr.reshape(shape)
        except (ValueError, OverflowError) as exc:  # a dimension beyond what numpy can index
            raise InvalidRequest(f"input '{label}': shape {shape} cannot be used: {exc}") from None
    if offset != len(tail):
        raise InvalidRequest("the binary data is longer than the inputs declare")
    return out


def declared_inputs(doc: dict[str, Any]) -> dict[str, tuple[np.dtype, list[int]]] | None:
    """Each input's dtype and shape as the request declares them, read without its data, so that
    they can be checked against the model before the data is decoded; None when any of them is
    malformed (decoding says how)."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        return None
    out: dict[str, tuple[np.dtype, list[int]]] = {}
    for t in inputs:
        if not isinstance(t, dict):
            return None
        name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
        if (
            not isinstance(name, str)
            or name in out
            or not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(_is_uint(d) for d in shape)
            or not isinstance(datatype, str)
            or datatype not in DTYPES
        ):
            return None
        out[name] = (DTYPES[datatype], shape)
    return out


def check_request(doc: dict[str, Any]) -> None:
    """The types of the request-level fields, before any of them is used."""
    if "id" in doc and not isinstance(doc["id"], str):
        raise InvalidRequest("'id' must be a string")
    params = parameters_of(doc, "the request")
    if "binary_data_output" in params and not isinstance(params["binary_data_output"], bool):
        raise InvalidRequest("parameters.binary_data_output must be true or false")
    outputs = doc.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise InvalidRequest("'outputs' must be a list")
    for i, o in enumerate(outputs or []):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidRequest(f"outputs[{i}] must be an object with a name")
        p = parameters_of(o, f"output '{quoted(o['name'])}'")
        if "binary_data" in p and not isinstance(p["binary_data"], bool):
            raise InvalidRequest(
                f"output '{quoted(o['name'])}': parameters.binary_data must be true or false"
            )


def parameters_of(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """``obj["parameters"]``: an object, or empty when absent or null."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidRequest(f"{where}: 'parameters' must be an object, got {json_type(params)}")
    return params


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _from_json(name: str, data: Any, datatype: str, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        flat: list[Any] = [data]
    elif data and isinstance(data[0], list):
        flat = _nested(name, data, shape)
    else:
        # Flat, the common case (tritonclient's): used as it is. A list further on is refused by
        # the element checks below, at no cost per element here.
        flat = data
    if len(flat) != count:
        nested = next((x for x in flat if isinstance(x, list)), None)
        if nested is not None:  # flat data with a list in it: the count says nothing
            raise InvalidRequest(f"input '{name}': {_unexpected(nested, datatype + ' value')}")
        raise InvalidRequest(f"input '{name}': shape holds {count} elements but data has {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(x, str | bytes) for x in flat):
            bad = next(x for x in flat if not isinstance(x, str | bytes))
            raise InvalidRequest(f"input '{name}': {_unexpected(bad, 'BYTES string')}")
        return _array([x.encode() if isinstance(x, str) else x for x in flat], np.dtype(object))
    dtype = DTYPES[datatype]
    want_bool = datatype == "BOOL"
    for x in flat:
        ok = isinstance(x, bool) if want_bool else (isinstance(x, int | float) and not isinstance(x, bool))
        if not ok or (dtype.kind in "iu" and isinstance(x, float) and not x.is_integer()):
            raise InvalidRequest(f"input '{name}': {_unexpected(x, datatype + ' value')}")
    try:
        # numpy only warns (on stderr) where a float overflows its type (1e308 as FP32, 1e6 as
        # FP16) and answers inf; raised here, it is refused like an integer out of range. An
        # underflow to zero is rounding, as for any other float.
        with np.errstate(over="raise", invalid="raise"):
            return _array(flat, dtype)
    except (OverflowError, FloatingPointError):
        raise InvalidRequest(f"input '{name}': a value is out of range for {datatype}") from None


def _array(flat: list[Any], dtype: np.dtype) -> np.ndarray:
    """``np.array(flat, dtype)``, a slice at a time: converting the 8 million values a 16 MB body
    can hold is one numpy call of 200+ ms that holds the GIL, and so the event loop, throughout,
    even on a worker thread. A slice's values convert (and overflow) as the whole list's would."""
    if len(flat) <= _SLICE:
        return np.array(flat, dtype=dtype)
    out = np.empty(len(flat), dtype=dtype)
    for i in range(0, len(flat), _SLICE):
        out[i : i + _SLICE] = flat[i : i + _SLICE]
    return out


def _nested(name: str, data: list[Any], shape: list[int]) -> list[Any]:
    """Nested data in row-major order, which must follow the shape exactly (the protocol's
    nested form): a ragged list or one that mixes depths would otherwise be flattened into
    elements the client did not place."""
    flat: list[Any] = []
    last = len(shape) - 1
    stack: list[tuple[list[Any], int]] = [(data, 0)]  # (a list, its depth); bounded by MAX_DIMS
    while stack:
        items, depth = stack.pop()
        if depth > last or len(items) != shape[depth]:
            raise InvalidRequest(
                f"input '{name}': nested data must follow the shape {shape} (or be flat); "
                f"a list at depth {depth + 1} has {len(items)} element{'' if len(items) == 1 else 's'}"
                + (f", the shape says {shape[depth]}" if depth <= last else ", the shape has no such depth")
            )
        if depth == last:
            if any(isinstance(x, list) for x in items):
                raise InvalidRequest(
                    f"input '{name}': nested data mixes depths: a list where a value is expected"
                )
            flat.extend(items)
        else:
            if not all(isinstance(x, list) for x in items):
                raise InvalidRequest(
                    f"input '{name}': nested data mixes depths: a value where a list is expected"
                )
            stack.extend((x, depth + 1) for x in reversed(items))
    return flat


def _unexpected(x: Any, wanted: str) -> str:
    if isinstance(x, list):
        return "a list where a value is expected (nested data must follow the shape)"
    return f"value {_spelled(x)} is not a valid {wanted}"


def _datatype(x: Any) -> str:
    """A datatype the server does not know, as its error quotes it: a string in Python's quotes,
    as before, cut short like any client-supplied name; anything else as JSON spells it."""
    return repr(quoted(x)) if isinstance(x, str) else _spelled(x)


def _spelled(x: Any) -> str:
    """A request's value as the client wrote it (JSON: null, true), cut short."""
    text = orjson.dumps(x).decode()
    return text if len(text) <= 40 else text[:37] + "..."


def _from_binary(name: str, raw: bytes, datatype: str, count: int) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise InvalidRequest(f"input '{name}': truncated BYTES element")
            (n,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + n > len(raw):
                raise InvalidRequest(f"input '{name}': truncated BYTES element")
            items.append(raw[pos : pos + n])
            pos += n
        if len(items) != count:
            raise InvalidRequest(f"input '{name}': shape holds {count} elements but data has {len(items)}")
        return _array(items, np.dtype(object))
    dtype = DTYPES[datatype].newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input '{name}': expected {count * dtype.itemsize} bytes of {datatype}, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).astype(DTYPES[datatype])


def requested_outputs(doc: dict[str, Any]) -> tuple[list[str] | None, dict[str, bool]]:
    """Names of requested outputs (None = all) and which of them go back as binary."""
    check_request(doc)
    default_binary: bool = parameters_of(doc, "the request").get("binary_data_output", False)
    outputs = doc.get("outputs")
    if outputs is None:
        return None, {"*": default_binary}
    names: list[str] = []
    seen: set[str] = set()  # not `in names`: a request may list many thousands of outputs
    binary: dict[str, bool] = {"*": default_binary}
    for o in outputs:
        if o["name"] in seen:
            # Triton refuses it; answered twice, the later one's binary_data applied to both.
            raise InvalidRequest(f"output '{quoted(o['name'])}' is requested twice; name each output once")
        names.append(o["name"])
        seen.add(o["name"])
        params = parameters_of(o, "output")
        if params.get("classification"):
            # Triton's classification extension (top-k "score:index" strings); not declared in
            # /v2's extensions. Silently returning the raw tensor broke clients expecting strings.
            raise InvalidRequest(
                f"output '{quoted(o['name'])}': parameters.classification is not supported (the server "
                "does not implement Triton's classification extension); request the raw output"
            )
        binary[o["name"]] = params.get("binary_data", default_binary)
    return names, binary


def encode_response(
    header: dict[str, Any], outputs: dict[str, np.ndarray], order: Sequence[str], binary: dict[str, bool]
) -> tuple[bytes, int | None]:
    """Response body and, when any output is binary, the JSON header's length."""
    out_docs, blobs = [], []
    for name in order:
        arr = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        if binary.get(name, binary.get("*", False)):
            blob = _to_binary(arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif arr.dtype == object:
            entry["data"] = [
                x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)
            ]
        else:
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                # orjson writes NaN and Infinity as null, and a client would read a wrong number
                # (Triton writes the bare words, which strict JSON parsers refuse). Raised before
                # anything is answered, so no such response is cached either.
                raise InvalidRequest(
                    f"output '{name}' holds NaN or Infinity, which JSON cannot carry; request it as "
                    'binary data: "parameters": {"binary_data": true} on the output, or '
                    '"parameters": {"binary_data_output": true} on the request'
                )
            entry["data"] = arr.reshape(-1).tolist()
        out_docs.append(entry)
    body = orjson.dumps({**header, "outputs": out_docs})
    if not blobs:
        return body, None
    return body + b"".join(blobs), len(body)


def _to_binary(arr: np.ndarray) -> bytes:
    if arr.dtype == object:
        parts = []
        for x in arr.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
