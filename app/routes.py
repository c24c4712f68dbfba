"""HTTP endpoints: thin translations between JSON and :class:`app.service.SentimentService`."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from app.errors import ApiError, Errors, openapi_responses
from app.schemas import Explanation, GateTrace, Health, ModelInfo, ModelRef, Prediction, PredictRequest, PredictResponse, Trace
from app.service import SentimentService
from sentiment import label_of

router = APIRouter()

# Bodies larger than this are parsed and validated on a worker thread: a multi-megabyte body parsed
# on the event loop would stall every other request (health checks included) meanwhile.
PARSE_IN_THREAD_BYTES = 64 * 1024


def _service(request: Request) -> SentimentService:
    return request.app.state.service


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read, so the next message is a disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _parse_predict_request(raw: bytes) -> PredictRequest:
    """JSON bytes → :class:`PredictRequest`, every failure as a ``RequestValidationError``.

    The standard library's parser, because it keeps what JSON can carry but Unicode cannot (a lone
    surrogate escape such as "\\ud800"), so that the service can name the offending text (422)
    instead of failing the whole body; nesting too deep for it is a parse error (400).
    """
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                       "ctx": {"error": exc.msg}}]) from None
    except (RecursionError, ValueError) as exc:  # ValueError: not UTF-8, or an integer over 4,300 digits
        reason = ("nesting too deep" if isinstance(exc, RecursionError) else "body is not UTF-8"
                  if isinstance(exc, UnicodeDecodeError) else "a number is too long")
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                                       "ctx": {"error": reason}}]) from None
    try:
        return PredictRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False, include_input=False)]) from None


async def predict_body(request: Request) -> PredictRequest:
    """The JSON body as a :class:`PredictRequest`: 415 for another media type; parsed on a worker
    thread when large, so a multi-megabyte body never stalls the event loop."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise ApiError(Errors.UNSUPPORTED_MEDIA_TYPE, content_type=content_type)
    raw = await request.body()  # already bounded by the BodyLimit middleware
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await run_in_threadpool(_parse_predict_request, raw)
    return _parse_predict_request(raw)


@router.post("/v1/predict", response_model=PredictResponse, tags=["predict"],
             responses=openapi_responses(400, 401, 413, 415, 422, 499, 500, 503, 504),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": PredictRequest.model_json_schema()}}}},
             summary="Probability of positive sentiment for each text, with an optional per-token trace")
async def predict(request: Request, body: PredictRequest = Depends(predict_body)) -> Response:
    service = _service(request)
    service.metrics.requests_in_flight.inc()
    try:
        engine, scores = await service.predict(body.texts, body.trace, lambda: wait_for_disconnect(request),
                                               gates=body.gates, explain=body.explain is not None)
    finally:
        service.metrics.requests_in_flight.dec()
    answer = PredictResponse(
        model=ModelRef(version=engine.version, device=str(engine.device)),
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
                    headers={"X-Model-Version": engine.version})


@router.get("/v1/model", response_model=ModelInfo, responses=openapi_responses(503), tags=["model"],
            summary="Version, architecture, vocabulary, device and metrics of the loaded model")
async def model_info(request: Request) -> ModelInfo:
    service = _service(request)
    engine = service.require_ready()
    card = engine.artifacts.card
    return ModelInfo(
        version=engine.version,
        device=str(engine.device),
        precision=engine.precision,
        workers=service.workers.count if service.workers else 0,
        architecture=card.get("architecture", {}),
        vocab_size=len(engine.artifacts.vocab),
        # The truncation length in force is max_tokens below; the card's trained value is its ceiling.
        tokenizer={k: v for k, v in card.get("tokenizer", {}).items() if k != "max_tokens"},
        max_tokens=engine.max_tokens,
        limits={"max_texts": service.settings.max_texts, "max_text_chars": service.settings.max_text_chars,
                "max_explain_texts": service.settings.max_explain_texts,
                "max_explain_tokens": engine.max_explain_tokens},
        metrics=card.get("metrics", {}),
        training={k: card.get("training", {}).get(k) for k in ("train_seconds", "epochs_run", "best_epoch", "hardware")},
    )


@router.get("/health/live", response_model=Health, responses={503: {"model": Health}}, tags=["health"],
            summary="The process can still serve: 503 once only a restart can help (load failed, a batch hung)")
async def live(request: Request) -> JSONResponse:
    service = _service(request)
    if service.is_alive():
        return JSONResponse(Health(status="alive").model_dump())
    _, status, detail = service.readiness()
    return JSONResponse(Health(status=status, detail=detail).model_dump(), status_code=503)


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health}}, tags=["health"],
            summary="The model is loaded and warmed up, no batch is stuck, and the service is not draining")
async def ready(request: Request) -> JSONResponse:
    service = _service(request)
    engine = service.engine
    is_ready, status, detail = service.readiness()
    health = Health(status=status, detail=detail,
                    model_version=engine.version if engine else None, device=str(engine.device) if engine else None)
    return JSONResponse(health.model_dump(), status_code=200 if is_ready else 503)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
