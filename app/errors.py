"""The API's error vocabulary and its mapping to HTTP responses, in one place.

Every error the service answers with is one :class:`ErrorKind` below: a status, a stable ``code``,
one message template and, for retryable ones, a ``Retry-After``. A v1 error body is
``{"error": {"code", "message", "details"}}``; a v2 one is the Open Inference Protocol's
``{"error": "<message>"}`` with the code in ``X-Error-Code``. :mod:`app.edge` picks the shape and
counts every error in ``sentiment_errors_total{kind=<code>}``. The OpenAPI responses are built from
this table too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

# Retry-After policy (seconds): a loading or draining replica needs a few seconds (or another
# replica); an overloaded queue frees up within a batch or two.
RETRY_AFTER_NOT_READY_S = 5
RETRY_AFTER_OVERLOADED_S = 1


@dataclass(frozen=True)
class ErrorKind:
    """One entry of the vocabulary: ``template`` is filled with the fields given at the raise site."""

    status: int
    code: str
    template: str
    retry_after_s: int | None = None


class Errors:
    """Every error the API can return."""

    MALFORMED_JSON = ErrorKind(400, "malformed_json", "request body is not valid JSON: {reason}")
    INVALID_INFER_REQUEST = ErrorKind(400, "invalid_infer_request", "invalid inference request: {summary}")
    INVALID_REPOSITORY_REQUEST = ErrorKind(400, "invalid_repository_request", "invalid repository request: {summary}")
    UNAUTHORIZED = ErrorKind(401, "unauthorized", "{detail}")
    FORBIDDEN = ErrorKind(403, "forbidden", "{detail}")
    NOT_FOUND = ErrorKind(404, "not_found", "{detail}")
    MODEL_NOT_FOUND = ErrorKind(404, "model_not_found", "{detail}")
    METHOD_NOT_ALLOWED = ErrorKind(405, "method_not_allowed", "{detail}")
    BODY_TOO_LARGE = ErrorKind(413, "body_too_large", "request body is over the {limit}-byte limit")
    TOO_MANY_TEXTS = ErrorKind(413, "too_many_texts", "{count} texts in one request; the limit is {limit}")
    TEXT_TOO_LONG = ErrorKind(413, "text_too_long", "{count} invalid text(s): {summary}")
    WORD_TOO_LONG = ErrorKind(413, "word_too_long", "{count} invalid text(s): {summary}")
    TOO_MANY_EXPLAINED = ErrorKind(413, "too_many_explained_texts",
                                   "{count} texts to explain in one request; the limit is {limit}")
    EXPLAIN_TOO_LONG = ErrorKind(413, "explain_too_long", "{count} text(s) too long to explain: {summary}")
    REPOSITORY_CONFLICT = ErrorKind(409, "repository_conflict", "{detail}")
    UNSUPPORTED_MEDIA_TYPE = ErrorKind(
        415, "unsupported_media_type", "send the body as JSON with 'Content-Type: application/json' (got {content_type!r})")
    INVALID_REQUEST = ErrorKind(422, "invalid_request", "invalid request: {summary}")
    EMPTY_TEXT = ErrorKind(422, "empty_text", "{count} invalid text(s): {summary}")
    INVALID_UNICODE = ErrorKind(422, "invalid_unicode", "{count} invalid text(s): {summary}")
    INVALID_MODEL_VERSION = ErrorKind(422, "invalid_model_version",
                                      "model version {version!r} cannot be served, nothing was changed: {reason}")
    TEXT_CRASHED_WORKER = ErrorKind(422, "text_crashed_worker", "{count} text(s) cannot be scored: {summary}")
    CLIENT_DISCONNECTED = ErrorKind(499, "client_disconnected", "client closed the connection before the answer")
    INTERNAL_ERROR = ErrorKind(500, "internal_error", "internal error; see the service log")
    TEXT_FAILED = ErrorKind(500, "text_failed", "texts[{index}] could not be scored; see the service log")
    NOT_READY_LOADING = ErrorKind(503, "not_ready_loading", "service is not ready: {detail}", RETRY_AFTER_NOT_READY_S)
    NOT_READY_FAILED = ErrorKind(503, "not_ready_failed", "service is not ready: {detail}")
    NOT_READY_DRAINING = ErrorKind(503, "not_ready_draining", "service is not ready: {detail}", RETRY_AFTER_NOT_READY_S)
    NOT_READY_STUCK = ErrorKind(503, "not_ready_stuck", "service is not ready: {detail}", RETRY_AFTER_NOT_READY_S)
    WORKER_RESTARTED = ErrorKind(503, "worker_restarted", "no model worker could score this request (its workers "
                                 "are being replaced, or it is shutting down); retry", RETRY_AFTER_NOT_READY_S)
    OVERLOADED = ErrorKind(503, "overloaded", "service is overloaded: {reason}; retry shortly", RETRY_AFTER_OVERLOADED_S)
    TIMEOUT = ErrorKind(504, "timeout", "no answer within {seconds:g}s; the service is overloaded or the request too large")
    DEADLINE_EXCEEDED = ErrorKind(504, "deadline_exceeded", "the request's own deadline of {deadline_ms:g} ms passed "
                                  "before its answer: {reason}")

    @classmethod
    def all(cls) -> list[ErrorKind]:
        return [v for v in vars(cls).values() if isinstance(v, ErrorKind)]


class ApiError(Exception):
    """An error of the vocabulary, with the fields its template needs and optional per-item details."""

    def __init__(self, kind: ErrorKind, details: list[dict[str, Any]] | None = None, **fields: Any) -> None:
        self.kind = kind
        self.message = kind.template.format(**fields)
        self.details = details or []
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return self.kind.status

    @property
    def code(self) -> str:
        return self.kind.code

    def response(self, protocol: str = "v1") -> JSONResponse:
        """The JSON answer: the v1 error object, or for the Open Inference Protocol (``"v2"``) its
        ``{"error": "<message>"}``; the code is also in ``X-Error-Code`` for v2 clients."""
        headers = {"Retry-After": str(self.kind.retry_after_s)} if self.kind.retry_after_s is not None else {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if protocol == "v2":
            headers["X-Error-Code"] = self.code
            return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)
        body = {"error": {"code": self.code, "message": self.message, "details": self.details}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def openapi_responses(*statuses: int, protocol: str = "v1") -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given statuses, each listing the codes it can carry, with the
    protocol's error body: ``ErrorResponse`` for v1, the OIP error object for v2."""
    from app.schemas import ErrorResponse, OipError  # schemas import nothing from here; avoid a cycle

    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = [k.code for k in Errors.all() if k.status == status]
        retry = any(k.retry_after_s is not None for k in Errors.all() if k.status == status)
        where = "X-Error-Code header" if protocol == "v2" else "error codes"
        out[status] = {"model": OipError if protocol == "v2" else ErrorResponse,
                       "description": f"{where}: " + ", ".join(codes) + ("; see Retry-After" if retry else "")}
    return out
