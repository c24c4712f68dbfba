"""The Open Inference Protocol's wire format for this model: the inference request (JSON, or JSON
plus the binary tensor data extension) → texts and options, and scores → output tensors.

See :mod:`app.oip` for the tensors this model takes and gives.
"""

from __future__ import annotations

import struct
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.admission import LONE_SURROGATE
from app.edge import parse_json
from app.errors import ApiError, Errors
from app.lanes import BATCH, INTERACTIVE, Lane
from app.schemas import whole_number
from sentiment import label_of

SERVER_NAME = "lstm-sentiment"
PLATFORM = "pytorch_torchscript"
INPUT_NAME = "text"
SCORE_OUTPUTS = ("probability", "label", "num_tokens", "truncated")
TRACE_OUTPUTS = ("trace_tokens", "trace_probabilities")
EXPLAIN_OUTPUTS = ("attributions",)
BINARY_HEADER = "inference-header-content-length"
TEXT_SCHEMA = {"type": "string", "minLength": 1, "pattern": r"\S"}  # a text holds more than whitespace (else 422)
# The request parameters this model reads; any others are ignored. "timeout" and "priority" are
# Triton's: a deadline in microseconds (0: none) and a priority level (1 highest; 0: the default).
REQUEST_PARAMETERS = {
    "trace": {"type": "boolean", "description": "also return trace_tokens and trace_probabilities"},
    "explain": {"enum": ["occlusion", None], "description": "\"occlusion\": also return attributions (null: none)"},
    "timeout": {"type": "integer", "minimum": 0, "description": (
        "this request's deadline in microseconds (Triton's timeout parameter; 0: none): a request not answered "
        "by then gets 504 (X-Error-Code deadline_exceeded), its texts still queued dropped unscored; one longer "
        "than the server's request timeout (SENTIMENT_REQUEST_TIMEOUT_S) is bounded by it")},
    "priority": {"type": "integer", "minimum": 0, "description": (
        "Triton's priority level: 0 (the model's default) and 1 are the interactive lane, 2 and above the batch "
        "lane (bulk work with a bounded share of the model, SENTIMENT_BATCH_LANE_SHARE)")},
}


# The schemas below are the protocol's (any names, shapes and types parse), documented with what this
# model takes, so that clients and schema-driven tests see it; anything else is a 400 that says why.
def _document_parameters(schema: dict[str, Any]) -> None:
    """The request parameters' object schema lists :data:`REQUEST_PARAMETERS` (others are allowed)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "object":
            branch["properties"] = REQUEST_PARAMETERS


class RequestInput(BaseModel):
    name: str = Field(..., json_schema_extra={"enum": [INPUT_NAME]})
    shape: list[int] = Field(..., description="[N] or [N, 1]: N texts",
                             json_schema_extra={"minItems": 1, "maxItems": 2, "items": {"type": "integer", "minimum": 1}})
    datatype: str = Field(..., json_schema_extra={"enum": ["BYTES"]})
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description=(
        "the N texts, flat or nested by shape; absent with the binary tensor extension"),
        json_schema_extra={"items": {"anyOf": [TEXT_SCHEMA, {"type": "array", "items": TEXT_SCHEMA}]}})


class RequestOutput(BaseModel):
    name: str = Field(..., json_schema_extra={"enum": list(SCORE_OUTPUTS + TRACE_OUTPUTS + EXPLAIN_OUTPUTS)})
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """An inference request object of the Open Inference Protocol (REST)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "42", "inputs": [{"name": INPUT_NAME, "shape": [2], "datatype": "BYTES",
                                "data": ["A moving, beautiful film.", "Dull and far too long."]}]}]})

    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, json_schema_extra=_document_parameters)
    inputs: list[RequestInput] = Field(..., min_length=1, json_schema_extra={"maxItems": 1})
    outputs: list[RequestOutput] | None = None


def _invalid(summary: str) -> ApiError:
    return ApiError(Errors.INVALID_INFER_REQUEST, summary=summary)


def _flatten(data: list[Any]) -> list[Any]:
    """Tensor data may be nested by shape (row-major) or flat; the protocol allows both."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: deep nesting cannot exhaust the Python stack
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _decode_binary_bytes(raw: bytes, count: int) -> list[str]:
    """The binary extension's BYTES layout: per element, a little-endian uint32 length, then the bytes."""
    texts, at = [], 0
    for i in range(count):
        if at + 4 > len(raw):
            raise _invalid(f"binary data of input {INPUT_NAME!r} ends before element {i}")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise _invalid(f"binary data of input {INPUT_NAME!r} ends inside element {i}")
        try:
            texts.append(raw[at:at + size].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _invalid(f"element {i} of input {INPUT_NAME!r} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        at += size
    if at != len(raw):
        raise _invalid(f"binary data of input {INPUT_NAME!r} has {len(raw) - at} bytes after its {count} elements")
    return texts


def parse_infer_request(body: bytes, json_size: int | None, max_texts: int) -> tuple[InferenceRequest, list[str]]:
    """Body bytes → the request and its texts; every problem is a 400 that says what is wrong (413
    for more than ``max_texts`` elements, checked before any element is decoded)."""
    header, binary = (body, b"") if json_size is None else (body[:json_size], body[json_size:])
    data = parse_json(header)
    try:
        req = InferenceRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False)[:5])
        raise _invalid(problems) from None
    if len(req.inputs) != 1 or req.inputs[0].name != INPUT_NAME:
        names = [i.name for i in req.inputs]
        raise _invalid(f"expected one input named {INPUT_NAME!r} (BYTES, shape [N]); got {names}")
    tensor = req.inputs[0]
    if tensor.datatype != "BYTES":
        raise _invalid(f"input {INPUT_NAME!r} must have datatype BYTES, not {tensor.datatype!r}")
    if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)) or tensor.shape[0] < 1:
        raise _invalid(f"input {INPUT_NAME!r} must have shape [N] or [N, 1] with N >= 1; got {tensor.shape}")
    count = tensor.shape[0]
    if count > max_texts:
        raise ApiError(Errors.TOO_MANY_TEXTS, count=count, limit=max_texts)
    if req.id is not None and LONE_SURROGATE.search(req.id):
        raise _invalid("'id' holds a lone surrogate (not valid Unicode)")
    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if json_size is None:
            raise _invalid("binary_data_size given without the Inference-Header-Content-Length header")
        if not isinstance(binary_size, int) or binary_size != len(binary):
            raise _invalid(f"binary_data_size is {binary_size!r} but {len(binary)} bytes follow the JSON header")
        texts = _decode_binary_bytes(binary, count)
    else:
        if binary:
            raise _invalid(f"{len(binary)} bytes follow the JSON header, but no input has binary_data_size")
        if tensor.data is None:
            raise _invalid(f"input {INPUT_NAME!r} has no data")
        texts = _flatten(tensor.data)
        if len(texts) != count:
            raise _invalid(f"input {INPUT_NAME!r} has shape {tensor.shape} but {len(texts)} elements")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise _invalid(f"element {bad} of input {INPUT_NAME!r} is {type(texts[bad]).__name__}, not a string")
    known = SCORE_OUTPUTS + TRACE_OUTPUTS + EXPLAIN_OUTPUTS
    unknown = [o.name for o in req.outputs or [] if o.name not in known]
    if unknown:
        raise _invalid(f"unknown output(s) {unknown}; this model has {list(known)}")
    trace = (req.parameters or {}).get("trace", False)
    if not isinstance(trace, bool):
        raise _invalid(f"parameter 'trace' must be true or false, not {trace!r}")
    explain = (req.parameters or {}).get("explain")
    if explain not in (None, "occlusion"):
        raise _invalid(f"parameter 'explain' must be \"occlusion\", not {explain!r}")
    for name in ("timeout", "priority"):
        value = (req.parameters or {}).get(name, 0)
        try:
            number = whole_number(value)
        except ValueError:
            number = None
        if number is None or number < 0:
            raise _invalid(f"parameter {name!r} must be a non-negative integer, not {value!r}")
        if req.parameters and name in req.parameters:
            req.parameters[name] = number  # 2.0 → 2
    return req, texts


def deadline_and_lane(req: InferenceRequest) -> tuple[float | None, Lane]:
    """The request's own deadline in seconds (None: the server's request timeout) and its lane, from
    Triton's ``timeout`` (µs, 0 = none) and ``priority`` (0 and 1 interactive, 2 and above batch)
    parameters, already checked by :func:`parse_infer_request`."""
    parameters = req.parameters or {}
    timeout_us, priority = parameters.get("timeout", 0), parameters.get("priority", 0)
    return (timeout_us / 1e6 if timeout_us else None), (BATCH if priority >= 2 else INTERACTIVE)


def _tensor(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def outputs(wanted: list[str], scores: list[Any]) -> list[dict[str, Any]]:
    n = len(scores)
    width = max((s.num_tokens for s in scores), default=0)
    build = {
        "probability": lambda: _tensor("probability", "FP32", [n], [s.probability for s in scores]),
        "label": lambda: _tensor("label", "BYTES", [n], [label_of(s.probability) for s in scores]),
        "num_tokens": lambda: _tensor("num_tokens", "INT32", [n], [s.num_tokens for s in scores]),
        "truncated": lambda: _tensor("truncated", "BOOL", [n], [s.truncated for s in scores]),
        "trace_tokens": lambda: _tensor("trace_tokens", "BYTES", [n, width], _flatten(
            [s.tokens + [""] * (width - len(s.tokens)) for s in scores])),
        "trace_probabilities": lambda: _tensor("trace_probabilities", "FP32", [n, width], _flatten(
            [s.trace + [0.0] * (width - len(s.trace)) for s in scores])),
        "attributions": lambda: _tensor("attributions", "FP32", [n, width], _flatten(
            [s.explanation.attributions + [0.0] * (width - len(s.explanation.attributions)) for s in scores])),
    }
    return [build[name]() for name in wanted]
