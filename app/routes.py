"""HTTP endpoints: thin translations between JSON and :class:`app.service.SentimentService`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.edge import in_flight, read_json_body, validate_v1, wait_for_disconnect
from app.errors import openapi_responses
from app.schemas import (Explanation, GateTrace, Health, ModelInfo, ModelRef, Prediction, PredictRequest,
                         PredictResponse, Trace, inline_schema)
from app.service import SentimentService
from sentiment import label_of

router = APIRouter()
parse_predict_request = validate_v1(PredictRequest)


def _service(request: Request) -> SentimentService:
    return request.app.state.service


async def predict_body(request: Request) -> PredictRequest:
    """The JSON body as a :class:`PredictRequest` (415, 400 and 422 from :mod:`app.edge`)."""
    return await read_json_body(request, parse_predict_request)


@router.post("/v1/predict", response_model=PredictResponse, tags=["predict"],
             responses=openapi_responses(400, 401, 413, 415, 422, 499, 500, 503, 504),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": inline_schema(PredictRequest)}}}},
             summary="Probability of positive sentiment for each text, with an optional per-token trace")
async def predict(request: Request, body: PredictRequest = Depends(predict_body)) -> Response:
    service = _service(request)
    with in_flight(service.metrics):
        model, scores = await service.predict(body.texts, body.trace, lambda: wait_for_disconnect(request),
                                              gates=body.gates, explain=body.explain is not None)
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
