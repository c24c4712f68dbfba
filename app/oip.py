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
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.edge import in_flight, read_json_body, wait_for_disconnect
from app.errors import ApiError, Errors, openapi_responses
from app.oip_codec import (BINARY_HEADER, EXPLAIN_OUTPUTS, INPUT_NAME, PLATFORM, SCORE_OUTPUTS, SERVER_NAME,
                           TRACE_OUTPUTS, InferenceRequest, deadline_and_lane, outputs, parse_infer_request)
from app.schemas import inline_schema
from app.service import SentimentService

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])


def _service(request: Request) -> SentimentService:
    return request.app.state.service


def _check_model(request: Request, name: str, version: str | None, loading_ok: bool = False) -> None:
    """404 unless ``name`` (and ``version``, when given) is the served model. While no model is
    loaded the version cannot be checked: 503 (retry later), or nothing with ``loading_ok``."""
    service = _service(request)
    served = service.settings.model_name
    model = service.lifecycle.model
    if name != served:
        raise ApiError(Errors.MODEL_NOT_FOUND, detail=f"unknown model {name!r}; this server serves {served!r}")
    if model is None:
        if not loading_ok:
            service.lifecycle.require_serving()  # loading or failed: the 503 that says so, not a 404
    elif version is not None and version != model.version:
        raise ApiError(Errors.MODEL_NOT_FOUND,
                       detail=f"model {name!r} has no version {version!r}; the loaded version is {model.version!r}")


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


def v2_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a /v2 route: the OIP error object for each status."""
    return openapi_responses(*statuses, protocol="v2")


# ---- health and metadata ----------------------------------------------------------------------
@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": []}


@router.get("/health/live", summary="Server live: 200 when live, 400 when only a restart can help",
            response_model=ServerLive, responses={400: {"model": ServerLive}})
async def server_live(request: Request) -> JSONResponse:
    live = _service(request).lifecycle.is_alive()
    return JSONResponse({"live": live}, status_code=200 if live else 400)


@router.get("/health/ready", summary="Server ready: 200 when the model can take requests, 400 otherwise",
            response_model=ServerReady, responses={400: {"model": ServerReady}})
async def server_ready(request: Request) -> JSONResponse:
    ready, _, _ = _service(request).lifecycle.readiness()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 400)


async def _model_ready(request: Request, name: str, version: str | None) -> JSONResponse:
    _check_model(request, name, version, loading_ok=True)
    ready, _, _ = _service(request).lifecycle.readiness()
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 400)


READY_DOC: dict[str, Any] = {"response_model": ModelReady, "responses": {**v2_errors(404), 400: {"model": ModelReady}}}


@router.get("/models/{name}/ready", summary="Model ready", **READY_DOC)
async def model_ready(request: Request, name: str) -> JSONResponse:
    return await _model_ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready", **READY_DOC)
async def model_version_ready(request: Request, name: str, version: str) -> JSONResponse:
    return await _model_ready(request, name, version)


async def _model_metadata(request: Request, name: str, version: str | None) -> dict[str, Any]:
    _check_model(request, name, version)
    model = _service(request).lifecycle.require_serving()
    return {
        "name": name,
        "versions": [model.version],
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


@router.get("/models/{name}", summary="Model metadata", responses=v2_errors(404, 503))
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return await _model_metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata", responses=v2_errors(404, 503))
async def model_version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return await _model_metadata(request, name, version)


# ---- inference ----------------------------------------------------------------------------------
def _binary_header_size(request: Request) -> int | None:
    """The JSON part's length when the binary tensor extension is used (its header), else None."""
    value = request.headers.get(BINARY_HEADER)
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,15}", value):
        raise ApiError(Errors.INVALID_INFER_REQUEST,
                       summary=f"Inference-Header-Content-Length must be a byte count, not {value[:40]!r}")
    return int(value)


def _parse(json_size: int | None, max_texts: int, body: bytes) -> tuple[InferenceRequest, list[str]]:
    if json_size is not None and json_size > len(body):
        raise ApiError(Errors.INVALID_INFER_REQUEST,
                       summary=f"Inference-Header-Content-Length is {json_size} but the body has {len(body)} bytes")
    return parse_infer_request(body, json_size, max_texts)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    _check_model(request, name, version)
    service = _service(request)
    json_size = _binary_header_size(request)
    # With the binary extension the body is not JSON as a whole, whatever its media type says.
    req, texts = await read_json_body(request, partial(_parse, json_size, service.settings.max_texts),
                                      check_media=json_size is None)
    if req.outputs:  # only what is asked for is computed
        wanted = [o.name for o in req.outputs]
        trace = any(n in TRACE_OUTPUTS for n in wanted)
        explain = any(n in EXPLAIN_OUTPUTS for n in wanted)
    else:
        trace = bool((req.parameters or {}).get("trace"))
        explain = (req.parameters or {}).get("explain") is not None
        wanted = list(SCORE_OUTPUTS) + list(TRACE_OUTPUTS if trace else ()) + list(EXPLAIN_OUTPUTS if explain else ())
    timeout_s, lane = deadline_and_lane(req)
    with in_flight(service.metrics):
        model, scores = await service.predict(texts, trace, lambda: wait_for_disconnect(request), explain=explain,
                                              timeout_s=timeout_s, lane=lane)
    answer: dict[str, Any] = {"model_name": name, "model_version": model.version}
    if req.id is not None:
        answer["id"] = req.id
    answer["outputs"] = outputs(wanted, scores)
    return Response(json.dumps(answer, ensure_ascii=False, allow_nan=False), media_type="application/json",
                    headers={"X-Model-Version": model.version})


INFER_DOC: dict[str, Any] = {
    "responses": v2_errors(400, 401, 404, 413, 415, 422, 499, 500, 503, 504),
    "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(InferenceRequest)}}}},
}


@router.post("/models/{name}/infer", summary="Inference (BYTES input 'text')", **INFER_DOC)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a given model version", **INFER_DOC)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)
