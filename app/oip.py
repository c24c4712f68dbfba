"""The Open Inference Protocol (KServe v2) over REST, beside the service's own API.

It shares everything behind the HTTP layer with ``/v1/predict``: the batcher, the limits, admission,
the metrics. Only the wire format differs:

* input: one ``BYTES`` tensor named ``text`` of shape ``[N]`` (or ``[N, 1]``), as JSON strings or in
  the binary tensor data extension (``Inference-Header-Content-Length``, which ``tritonclient``
  sends by default);
* outputs: ``probability`` (FP32 ``[N]``), ``label`` (BYTES ``[N]``), ``num_tokens`` (INT32 ``[N]``),
  ``truncated`` (BOOL ``[N]``); with ``"parameters": {"trace": true}``, or when one of them is asked
  for by name, ``trace_tokens`` (BYTES ``[N, T]``) and ``trace_probabilities`` (FP32 ``[N, T]``),
  where ``T`` is the longest text's token count and shorter rows are padded with ``""`` and ``0.0``
  (``num_tokens`` says where each row ends); with ``"parameters": {"explain": "occlusion"}`` (or when
  asked for by name), ``attributions`` (FP32 ``[N, T]``, padded with ``0.0``), as in ``/v1``;
* errors: ``{"error": "<message>"}`` (the protocol's error object; see :mod:`app.errors`), with the
  same statuses as the v1 API.

Outputs are always JSON (``"data"``), also when a client asks for binary outputs; clients read both.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import ApiError, Errors, openapi_responses
from app.routes import PARSE_IN_THREAD_BYTES, wait_for_disconnect
from app.service import LONE_SURROGATE, SentimentService
from sentiment import label_of

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

SERVER_NAME = "lstm-sentiment"
PLATFORM = "pytorch_torchscript"
INPUT_NAME = "text"
SCORE_OUTPUTS = ("probability", "label", "num_tokens", "truncated")
TRACE_OUTPUTS = ("trace_tokens", "trace_probabilities")
EXPLAIN_OUTPUTS = ("attributions",)
BINARY_HEADER = "inference-header-content-length"


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None  # absent when the tensor travels in the binary extension


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """An inference request object of the Open Inference Protocol (REST)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "42", "inputs": [{"name": INPUT_NAME, "shape": [2], "datatype": "BYTES",
                                "data": ["A moving, beautiful film.", "Dull and far too long."]}]}]})

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(..., min_length=1)
    outputs: list[RequestOutput] | None = None


def _service(request: Request) -> SentimentService:
    return request.app.state.service


def _invalid(summary: str) -> ApiError:
    return ApiError(Errors.INVALID_INFER_REQUEST, summary=summary)


def _check_model(request: Request, name: str, version: str | None, loading_ok: bool = False) -> None:
    """404 unless ``name`` (and ``version``, when given) is the served model. While no model is
    loaded the version cannot be checked: 503 (retry later), or nothing with ``loading_ok``."""
    service = _service(request)
    served = service.settings.model_name
    engine = service.engine
    if name != served:
        raise ApiError(Errors.MODEL_NOT_FOUND, detail=f"unknown model {name!r}; this server serves {served!r}")
    if engine is None:
        if not loading_ok:
            service.require_ready()  # loading or failed: the 503 that says so (with Retry-After), not a 404
    elif version is not None and version != engine.version:
        raise ApiError(Errors.MODEL_NOT_FOUND,
                       detail=f"model {name!r} has no version {version!r}; the loaded version is {engine.version!r}")


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
    try:
        data = json.loads(header)
    except json.JSONDecodeError as exc:
        raise ApiError(Errors.MALFORMED_JSON, reason=exc.msg) from None
    except (RecursionError, ValueError) as exc:  # ValueError: not UTF-8, or an integer over 4,300 digits
        reason = ("nesting too deep" if isinstance(exc, RecursionError) else "body is not UTF-8"
                  if isinstance(exc, UnicodeDecodeError) else "a number is too long")
        raise ApiError(Errors.MALFORMED_JSON, reason=reason) from None
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
    return req, texts


def _tensor(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _outputs(wanted: list[str], scores: list[Any]) -> list[dict[str, Any]]:
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


# ---- health and metadata ----------------------------------------------------------------------
@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": []}


@router.get("/health/live", summary="Server live: 200 when live, 400 when only a restart can help")
async def server_live(request: Request) -> JSONResponse:
    live = _service(request).is_alive()
    return JSONResponse({"live": live}, status_code=200 if live else 400)


@router.get("/health/ready", summary="Server ready: 200 when the model can take requests, 400 otherwise")
async def server_ready(request: Request) -> JSONResponse:
    ready, _, _ = _service(request).readiness()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 400)


async def _model_ready(request: Request, name: str, version: str | None) -> JSONResponse:
    _check_model(request, name, version, loading_ok=True)
    ready, _, _ = _service(request).readiness()
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)


@router.get("/models/{name}/ready", summary="Model ready", responses=openapi_responses(404))
async def model_ready(request: Request, name: str) -> JSONResponse:
    return await _model_ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready",
            responses=openapi_responses(404))
async def model_version_ready(request: Request, name: str, version: str) -> JSONResponse:
    return await _model_ready(request, name, version)


async def _model_metadata(request: Request, name: str, version: str | None) -> dict[str, Any]:
    _check_model(request, name, version)
    engine = _service(request).require_ready()
    return {
        "name": name,
        "versions": [engine.version],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "probability", "datatype": "FP32", "shape": [-1]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "num_tokens", "datatype": "INT32", "shape": [-1]},
            {"name": "truncated", "datatype": "BOOL", "shape": [-1]},
            {"name": "trace_tokens", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "trace_probabilities", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "attributions", "datatype": "FP32", "shape": [-1, -1]},
        ],
    }


@router.get("/models/{name}", summary="Model metadata", responses=openapi_responses(404, 503))
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return await _model_metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata",
            responses=openapi_responses(404, 503))
async def model_version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return await _model_metadata(request, name, version)


# ---- inference ----------------------------------------------------------------------------------
async def _infer(request: Request, name: str, version: str | None) -> Response:
    _check_model(request, name, version)
    service = _service(request)
    header_size = request.headers.get(BINARY_HEADER)
    json_size = None
    if header_size is not None:
        if not re.fullmatch(r"[0-9]{1,15}", header_size):
            raise _invalid(f"Inference-Header-Content-Length must be a byte count, not {header_size[:40]!r}")
        json_size = int(header_size)
    else:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and media != "application/json" and not media.endswith("+json"):
            raise ApiError(Errors.UNSUPPORTED_MEDIA_TYPE, content_type=request.headers.get("content-type", ""))
    body = await request.body()  # bounded by the BodyLimit middleware
    if json_size is not None and json_size > len(body):
        raise _invalid(f"Inference-Header-Content-Length is {json_size} but the body has {len(body)} bytes")
    max_texts = service.settings.max_texts
    if len(body) > PARSE_IN_THREAD_BYTES:
        req, texts = await run_in_threadpool(parse_infer_request, body, json_size, max_texts)
    else:
        req, texts = parse_infer_request(body, json_size, max_texts)
    if req.outputs:  # only what is asked for is computed
        wanted = [o.name for o in req.outputs]
        trace = any(n in TRACE_OUTPUTS for n in wanted)
        explain = any(n in EXPLAIN_OUTPUTS for n in wanted)
    else:
        trace = bool((req.parameters or {}).get("trace"))
        explain = (req.parameters or {}).get("explain") is not None
        wanted = list(SCORE_OUTPUTS) + list(TRACE_OUTPUTS if trace else ()) + list(EXPLAIN_OUTPUTS if explain else ())
    service.metrics.requests_in_flight.inc()
    try:
        engine, scores = await service.predict(texts, trace, lambda: wait_for_disconnect(request), explain=explain)
    finally:
        service.metrics.requests_in_flight.dec()
    answer: dict[str, Any] = {"model_name": name, "model_version": engine.version}
    if req.id is not None:
        answer["id"] = req.id
    answer["outputs"] = _outputs(wanted, scores)
    return Response(json.dumps(answer, ensure_ascii=False, allow_nan=False), media_type="application/json",
                    headers={"X-Model-Version": engine.version})


INFER_DOC: dict[str, Any] = {
    "responses": openapi_responses(400, 401, 404, 413, 415, 422, 499, 500, 503, 504),
    "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": InferenceRequest.model_json_schema()}}}},
}


@router.post("/models/{name}/infer", summary="Inference (BYTES input 'text')", **INFER_DOC)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a given model version", **INFER_DOC)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)
