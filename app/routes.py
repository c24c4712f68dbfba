"""HTTP endpoints: thin translations between JSON and :class:`app.service.SentimentService`."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.edge import in_flight, read_json_body, validate_v1, wait_for_disconnect
from app.errors import ApiError, Errors, openapi_responses
from app.schemas import (Explanation, GateTrace, Health, ModelInfo, ModelRef, Prediction, PredictRequest,
                         PredictResponse, Trace, inline_schema)
from app.service import SentimentService
from app.settings import Settings
from sentiment import label_of

router = APIRouter()
parse_predict_request = validate_v1(PredictRequest)


def _service(request: Request) -> SentimentService:
    return request.app.state.service


async def predict_body(request: Request) -> PredictRequest:
    """The JSON body as a :class:`PredictRequest` (415, 400 and 422 from :mod:`app.edge`)."""
    return await read_json_body(request, parse_predict_request)


def max_timeout_ms(settings: Settings) -> int:
    """The longest deadline a request may ask for: the request timeout, in whole milliseconds."""
    return int(settings.request_timeout_s * 1000)


def document_setting_limits(app: FastAPI, settings: Settings) -> None:
    """Write the request limits that are settings into the OpenAPI document (``timeout_ms``'s maximum),
    so that clients and schema-driven tests know them."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None or "x-setting-limits" not in app.openapi_schema.get("info", {}):
            # A copy: the request schema inside is the route's own (shared by every app built here).
            spec = copy.deepcopy(build())
            body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            body["properties"]["timeout_ms"]["anyOf"][0]["maximum"] = max_timeout_ms(settings)
            spec["info"]["x-setting-limits"] = True
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


@router.post("/v1/predict", response_model=PredictResponse, tags=["predict"],
             responses=openapi_responses(400, 401, 413, 415, 422, 499, 500, 503, 504),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": inline_schema(PredictRequest)}}}},
             summary="Probability of positive sentiment for each text, with an optional per-token trace")
async def predict(request: Request, body: PredictRequest = Depends(predict_body)) -> Response:
    service = _service(request)
    if body.timeout_ms is not None and body.timeout_ms > (limit := max_timeout_ms(service.settings)):
        msg = f"at most {limit} (the request timeout, SENTIMENT_REQUEST_TIMEOUT_S × 1000)"
        raise ApiError(Errors.INVALID_REQUEST, [{"loc": ["body", "timeout_ms"], "msg": msg}], summary=f"body.timeout_ms: {msg}")
    with in_flight(service.metrics):
        model, scores = await service.predict(body.texts, body.trace, lambda: wait_for_disconnect(request),
                                              gates=body.gates, explain=body.explain is not None,
                                              timeout_s=body.timeout_ms / 1000 if body.timeout_ms else None,
                                              lane=body.priority)
    answer = PredictResponse(
        model=ModelRef(version=model.version, device=model.device),
        predictions=[
            Prediction(
                label=label_of(s.probability),
                probability=s.probability,
                num_tokens=s.num_tokens,
                truncated=s.truncated,
                total_tokens=s.total_tokens,
                trace=Trace(tokens=s.tokens, probabilities=s.trace,
                            gates=GateTrace(**s.gates) if s.gates is not None else None)
                if s.trace is not None else None,
                explanation=Explanation(method=s.explanation.method, tokens=s.explanation.tokens,
                                        attributions=s.explanation.attributions)
                if s.explanation is not None else None,
            )
            for s in scores
        ],
    )
    # Serialised by pydantic-core directly: FastAPI's response_model path re-validates and walks the
    # answer in Python, which for 64 texts with gate traces (~180k floats) held the event loop for
    # hundreds of milliseconds, stalling every other request. The schema in the docs is unchanged.
    return Response(answer.model_dump_json(), media_type="application/json",
                    headers={"X-Model-Version": model.version})


@router.get("/v1/model", response_model=ModelInfo, responses=openapi_responses(503), tags=["model"],
            summary="Version, architecture, vocabulary, device and metrics of the loaded model")
async def model_info(request: Request) -> ModelInfo:
    service = _service(request)
    model = service.lifecycle.require_serving()
    card = model.card
    return ModelInfo(
        version=model.version,
        device=model.device,
        precision=model.precision,
        workers=model.workers,
        architecture=card.get("architecture", {}),
        vocab_size=model.vocab_size,
        # The truncation length in force is max_tokens below; the card's trained value is its ceiling.
        tokenizer={k: v for k, v in card.get("tokenizer", {}).items() if k != "max_tokens"},
        max_tokens=model.max_tokens,
        limits={"max_texts": service.settings.max_texts, "max_text_chars": service.settings.max_text_chars,
                "max_explain_texts": service.settings.max_explain_texts,
                "max_explain_tokens": model.max_explain_tokens},
        metrics=card.get("metrics", {}),
        training={k: card.get("training", {}).get(k) for k in ("train_seconds", "epochs_run", "best_epoch", "hardware")},
        shadow=service.control.shadow.summary() if service.control.shadow is not None else None,
    )


@router.get("/health/live", response_model=Health, responses={503: {"model": Health}}, tags=["health"],
            summary="The process can still serve: 503 once only a restart can help (load failed, a batch hung)")
async def live(request: Request) -> JSONResponse:
    lifecycle = _service(request).lifecycle
    if lifecycle.is_alive():
        return JSONResponse(Health(status="alive").model_dump())
    _, status, detail = lifecycle.readiness()
    return JSONResponse(Health(status=status, detail=detail).model_dump(), status_code=503)


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health}}, tags=["health"],
            summary="The model is loaded and warmed up, no batch is stuck, and the service is not draining")
async def ready(request: Request) -> JSONResponse:
    lifecycle = _service(request).lifecycle
    model = lifecycle.model
    is_ready, status, detail = lifecycle.readiness()
    health = Health(status=status, detail=detail,
                    model_version=model.version if model else None, device=model.device if model else None)
    return JSONResponse(health.model_dump(), status_code=200 if is_ready else 503)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
