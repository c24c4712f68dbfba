"""Errors the API reports, and their mapping to HTTP responses — in one place."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status, a stable code and a message a client can act on."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.headers = headers


def error_response(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers)


def _count(request: Request, kind: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(kind=kind).inc()


def install_error_handlers(app: FastAPI) -> None:
    """Give every error the same JSON shape: ``{"error": {"code", "message", "details"}}``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        _count(request, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            _count(request, "malformed_json")
            error = next(e for e in errors if e.get("type") == "json_invalid")
            reason = error.get("ctx", {}).get("error", "decode error")
            position = error.get("loc", ("body", None))[-1]  # character offset where parsing failed
            where = f" at character {position}" if isinstance(position, int) else ""
            return error_response(400, "malformed_json", f"request body is not valid JSON: {reason}{where}",
                                  [{"loc": ["body"], "msg": f"{reason}{where}"}])
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
            _count(request, "unsupported_media_type")
            return error_response(415, "unsupported_media_type",
                                  f"send the body as JSON with 'Content-Type: application/json' (got {content_type!r})")
        details = [{"loc": [str(x) if not isinstance(x, int) else x for x in e.get("loc", ())],
                    "msg": e.get("msg", "invalid")} for e in errors]
        summary = "; ".join(f"{'.'.join(str(x) for x in d['loc'])}: {d['msg']}" for d in details[:5])
        _count(request, "invalid_request")
        return error_response(422, "invalid_request", f"invalid request: {summary}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        _count(request, "internal_error")
        return error_response(500, "internal_error", "internal error; see the service log")
