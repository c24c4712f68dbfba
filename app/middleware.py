"""ASGI middleware: request ids and the access log, request timing, the body limit, security
headers. Pure ASGI (no BaseHTTPMiddleware), so ``request.receive`` stays usable for disconnect
detection."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.edge import send_error
from app.errors import ApiError, Errors
from app.logs import access_log, bind_request, request_fields, unbind_request
from app.metrics import ServiceMetrics
from app.tracing import RequestTracing

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

# Route labels for metrics, the access log and span names: the exact paths below, else the template
# a path matches (the Open Inference Protocol's /v2/models/<name>[/versions/<v>]/…, one label each
# whatever the name or version), else the prefix below, else "other": the label set stays small.
KNOWN_ROUTES = {"/v1/predict", "/v1/model", "/health/live", "/health/ready", "/metrics", "/", "/docs",
                "/openapi.json", "/v2", "/v2/health/live", "/v2/health/ready", "/v2/repository/index"}
TEMPLATE_ROUTES = (
    (re.compile(r"/v2/repository/models/[^/]+/load"), "/v2/repository/models/{name}/load"),
    (re.compile(r"/v2/repository/models/[^/]+/unload"), "/v2/repository/models/{name}/unload"),
    (re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer"), "/v2/models/{name}/infer"),
    (re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/ready"), "/v2/models/{name}/ready"),
    (re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?"), "/v2/models/{name}"),
)
PREFIX_ROUTES = ("/static/", "/docs-assets/")  # labelled by prefix to keep the metric's label set small
OTHER_ROUTE = "other"
EXPLAIN_SUFFIX = " (explain)"  # the latency of requests with explanations, e.g. "/v1/predict (explain)"


def route_label(path: str) -> str:
    """The label of ``path`` for metrics, logs and spans (KNOWN_ROUTES, TEMPLATE_ROUTES, PREFIX_ROUTES)."""
    if path in KNOWN_ROUTES:
        return path
    template = next((label for pattern, label in TEMPLATE_ROUTES if pattern.fullmatch(path)), None)
    if template is not None:
        return template
    return next((prefix.rstrip("/") for prefix in PREFIX_ROUTES if path.startswith(prefix)), OTHER_ROUTE)


REQUEST_ID_HEADER = b"x-request-id"
# An incoming id is kept only if it is 1-128 visible ASCII characters (no spaces or control
# characters): it goes into log lines and headers verbatim, so nothing else may pass.
_SANE_REQUEST_ID = re.compile(rb"[!-~]{1,128}")


def request_id_from(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is sane, else a new one (32 hex digits, uuid4)."""
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER:
            if _SANE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class RequestContext:
    """The outermost layer: gives each request an id (echoed in ``X-Request-ID`` on every response,
    and on every log line written while serving it), writes the access log line, and, when tracing
    is on, opens and closes the request's server span.

    Installed with :func:`outermost`, outside even Starlette's error middleware, so that a 500 from
    an unhandled exception carries the id and gets its access line too.
    """

    def __init__(self, app: ASGIApp, tracing: RequestTracing | None = None) -> None:
        self.app, self.tracing = app, tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope)
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        fields, id_token, fields_token = bind_request(request_id)
        span = self.tracing.start(scope, request_id) if self.tracing is not None else None
        status = {"code": 500}  # what is logged if the app sends no response at all

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + [header]
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException as exc:
            error = exc
            raise
        finally:
            route = route_label(scope.get("path", ""))
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else None
            texts = fields.get("texts")
            if span is not None:
                try:
                    self.tracing.finish(span, None if route == OTHER_ROUTE else route, status["code"],  # type: ignore[union-attr]
                                        texts, error if isinstance(error, Exception) else None)
                except Exception:  # tracing must never break serving
                    log.exception("could not close the request's span")
            duration_ms = round((time.perf_counter() - started) * 1000, 2)
            access_log.info(
                "%s %s %d %.2fms texts=%s client=%s", scope.get("method", ""), route, status["code"], duration_ms,
                "-" if texts is None else texts, peer or "-",
                extra={"method": scope.get("method", ""), "route": route, "status": status["code"],
                       "duration_ms": duration_ms, "texts": texts,
                       "client": peer,
                       "trace_id": span.trace_id if span is not None else None})
            # After an exception the id stays bound: the server logs the traceback next, in this
            # request's task, and that line should carry it too. The task ends with the request.
            if error is None:
                unbind_request(id_token, fields_token)


def outermost(app: FastAPI, middleware: type, **options: object) -> None:
    """Wrap ``app``'s whole middleware stack, Starlette's ServerErrorMiddleware included, in
    ``middleware`` (``add_middleware`` puts user middleware inside it, where an unhandled
    exception's 500 response never passes)."""
    build = app.build_middleware_stack

    def build_wrapped() -> ASGIApp:
        return middleware(build(), **options)

    app.build_middleware_stack = build_wrapped  # type: ignore[method-assign]


class RequestTimer:
    """Pure ASGI middleware (keeps ``request.receive`` untouched for disconnect detection) that
    records ``sentiment_request_duration_seconds`` by route and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                elapsed_ms = (time.perf_counter() - started) * 1000
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-process-time-ms", f"{elapsed_ms:.2f}".encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = route_label(scope.get("path", ""))
            if request_fields().get("explain"):  # explanations are ~n× slower by design: a label apart
                route += EXPLAIN_SUFFIX
            self.metrics.request_duration.labels(route=route, status=str(status["code"])).observe(
                time.perf_counter() - started)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413 before anything parses it: at once from
    ``Content-Length``, or, for a chunked body, as soon as the bytes received pass the limit. The
    body read here is replayed to the app, and later messages (a disconnect) pass through.

    It also caps the body bytes held in memory by all requests together at ``in_flight_limit``: a
    request's bytes count from when it is read (its ``Content-Length`` up front, a chunked body as it
    arrives) until its answer is sent, also when it fails or its client leaves; one that would go
    over the cap gets 503 ``overloaded`` with Retry-After (one request alone is always taken).
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: ServiceMetrics, in_flight_limit: int | None = None) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics
        self.in_flight_limit = in_flight_limit
        self.held = 0  # body bytes of all requests being served

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, busy: bool = False) -> None:
        # Connection: close: the rest of an unread body is never read.
        error = ApiError(Errors.OVERLOADED, reason=f"request bodies held in memory would pass {self.in_flight_limit} "
                         "bytes (SENTIMENT_MAX_BODY_BYTES_IN_FLIGHT)") if busy else ApiError(
                             Errors.BODY_TOO_LARGE, limit=self.limit)
        await send_error(scope, receive, send, error, self.metrics, close=True)

    def _hold(self, more: int, mine: int) -> bool:
        """Count ``more`` bytes for a request that holds ``mine`` already, unless that breaks the cap."""
        cap = self.in_flight_limit
        if cap is not None and self.held - mine > 0 and self.held + more > cap:
            return False
        self.held += more
        self.metrics.body_bytes_in_flight.inc(more)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        held = 0
        try:
            if declared is not None and declared.isdigit():
                if not self._hold(int(declared), held):
                    await self._refuse(scope, receive, send, busy=True)
                    return
                held = int(declared)
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # client gone before the body arrived
                    await self.app(scope, _replay([], message, receive), send)
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    await self._refuse(scope, receive, send)
                    return
                if size > held:  # chunked (or longer than declared: the server stops it)
                    if not self._hold(size - held, held):
                        await self._refuse(scope, receive, send, busy=True)
                        return
                    held = size
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            await self.app(scope, _replay(chunks, None, receive), send)
        finally:
            self.held -= held
            self.metrics.body_bytes_in_flight.dec(held)


def _replay(chunks: list[bytes], first: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that gives the buffered body (or ``first``) once, then the real messages."""
    pending: list[Message] = [first] if first is not None else [{"type": "http.request", "body": b"".join(chunks),
                                                                 "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


# The viewer page loads only its own script and styles and calls only this service's API.
VIEWER_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
              "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Swagger UI's page starts itself with an inline script.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class SecurityHeaders:
    """``nosniff`` and no framing on every response; a Content-Security-Policy on the HTML pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        csp = DOCS_CSP if path == "/docs" else VIEWER_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"), (b"content-security-policy", csp.encode())]
            await send(message)

        await self.app(scope, receive, send_with_headers)
