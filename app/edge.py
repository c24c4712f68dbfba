"""The HTTP edge shared by the v1 API and the Open Inference Protocol (v2).

One place decides a request's protocol (:func:`protocol_of`), and every error leaves through
:func:`error_response`, which counts it once (``sentiment_errors_total{kind}``) and shapes it in that
protocol. One place reads a request body: :func:`read_json_body` checks the media type, takes the
body (already bounded by :class:`app.middleware.BodyLimit`) and parses JSON, turning every failure
into an API error; large bodies are parsed on a worker thread so the event loop never stalls.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from app.errors import ApiError, ErrorKind, Errors
from app.metrics import ServiceMetrics

log = logging.getLogger("app.edge")

Protocol = Literal["v1", "v2"]
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# Bodies larger than this are parsed and validated on a worker thread: a multi-megabyte body parsed
# on the event loop would stall every other request (health checks included) meanwhile.
PARSE_IN_THREAD_BYTES = 64 * 1024


def protocol_of(path: str) -> Protocol:
    """The API a path belongs to: ``v2`` (Open Inference Protocol) under ``/v2``, else ``v1``."""
    return "v2" if path == "/v2" or path.startswith("/v2/") else "v1"


def error_response(path: str, error: ApiError, metrics: ServiceMetrics | None) -> JSONResponse:
    """The response for ``error`` in the protocol of ``path``, counted in the error metric."""
    if metrics is not None:
        metrics.errors.labels(kind=error.code).inc()
    return error.response(protocol_of(path))


async def send_error(scope: Scope, receive: Receive, send: Send, error: ApiError, metrics: ServiceMetrics,
                     close: bool = False) -> None:
    """Answer ``error`` from ASGI middleware (before any route runs); ``close`` drops the connection
    after it (an oversized body is not read)."""
    response = error_response(scope.get("path", ""), error, metrics)
    if close:
        response.headers["Connection"] = "close"
    await response(scope, receive, send)


# ---- request bodies -----------------------------------------------------------------------------
def check_media_type(request: Request) -> None:
    """415 unless the body is sent as JSON (``application/json`` or ``*+json``; none given is taken as JSON)."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise ApiError(Errors.UNSUPPORTED_MEDIA_TYPE, content_type=content_type)


def parse_json(raw: bytes) -> Any:
    """JSON bytes → Python values, every failure a 400 ``malformed_json`` that says what and where.

    The standard library's parser, because it keeps what JSON can carry but Unicode cannot (a lone
    surrogate escape such as "\\ud800"), so that the service can name the offending text (422)
    instead of failing the whole body; nesting too deep for it is a parse error too.
    """
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        reason = f"{exc.msg} at character {exc.pos}"
    except (RecursionError, ValueError) as exc:  # ValueError: not UTF-8, or an integer over 4,300 digits
        reason = ("nesting too deep" if isinstance(exc, RecursionError) else "body is not UTF-8"
                  if isinstance(exc, UnicodeDecodeError) else "a number is too long")
    raise ApiError(Errors.MALFORMED_JSON, [{"loc": ["body"], "msg": reason}], reason=reason)


def invalid_request(errors: list[dict[str, Any]], prefix: tuple[str, ...] = ()) -> ApiError:
    """A 422 ``invalid_request`` from pydantic's errors, each detail naming its place in the body."""
    details = [{"loc": [*prefix, *(x if isinstance(x, int) else str(x) for x in e.get("loc", ()))],
                "msg": e.get("msg", "invalid")} for e in errors]
    summary = "; ".join(f"{'.'.join(str(x) for x in d['loc'])}: {d['msg']}" for d in details[:5])
    return ApiError(Errors.INVALID_REQUEST, details, summary=summary)


def validate_v1(model: type[M]) -> Callable[[bytes], M]:
    """A parser of JSON bytes into ``model``: 400 for bad JSON, 422 naming each invalid field."""
    def parse(raw: bytes) -> M:
        data = parse_json(raw)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise invalid_request(exc.errors(include_url=False, include_input=False), ("body",)) from None
    return parse


async def read_json_body(request: Request, parse: Callable[[bytes], T], check_media: bool = True) -> T:
    """The body, checked (media type) and parsed by ``parse`` (on a worker thread when large)."""
    if check_media:
        check_media_type(request)
    raw = await request.body()  # already bounded by the BodyLimit middleware
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await run_in_threadpool(parse, raw)
    return parse(raw)


@contextmanager
def in_flight(metrics: ServiceMetrics) -> Iterator[None]:
    """Count a prediction request in ``sentiment_requests_in_flight`` while it runs."""
    metrics.requests_in_flight.inc()
    try:
        yield
    finally:
        metrics.requests_in_flight.dec()


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read, so the next message is a disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- exceptions → errors ------------------------------------------------------------------------
def install_error_handlers(app: FastAPI) -> None:
    """Turn every exception into a vocabulary error in the request's protocol, counted once."""
    def answer(request: Request, error: ApiError) -> JSONResponse:
        return error_response(request.url.path, error, getattr(request.app.state, "metrics", None))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, invalid_request(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: Errors.NOT_FOUND, 405: Errors.METHOD_NOT_ALLOWED}.get(exc.status_code)
        if kind is None:  # Starlette raises no other status for this app; keep the shape regardless
            kind = ErrorKind(exc.status_code, "http_error", "{detail}")
        response = answer(request, ApiError(kind, detail=str(exc.detail)))
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return answer(request, ApiError(Errors.INTERNAL_ERROR))


def drop_framework_validation_errors(app: FastAPI) -> None:
    """Remove the 422 ``HTTPValidationError`` that FastAPI documents on every route with parameters:
    this app's path parameters are plain strings that cannot fail validation, and any error it does
    send leaves through :func:`error_response` in its protocol's documented shape."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            for operations in spec.get("paths", {}).values():
                for operation in operations.values():
                    response = operation.get("responses", {}).get("422", {})
                    if "HTTPValidationError" in json.dumps(response):
                        del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
