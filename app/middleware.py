"""ASGI middleware: request timing, the body limit, security headers. Pure ASGI (no
BaseHTTPMiddleware), so ``request.receive`` stays usable for disconnect detection."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError, Errors
from app.metrics import ServiceMetrics

KNOWN_ROUTES = {"/v1/predict", "/v1/model", "/health/live", "/health/ready", "/metrics", "/", "/docs",
                "/openapi.json"}
PREFIX_ROUTES = ("/static/", "/docs-assets/")  # labelled by prefix to keep the metric's label set small


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
            path = scope.get("path", "")
            route = path if path in KNOWN_ROUTES else next(
                (prefix.rstrip("/") for prefix in PREFIX_ROUTES if path.startswith(prefix)), "other")
            self.metrics.request_duration.labels(route=route, status=str(status["code"])).observe(
                time.perf_counter() - started)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413 before anything parses it: at once from
    ``Content-Length``, or, for a chunked body, as soon as the bytes received pass the limit. The
    body read here is replayed to the app, and later messages (a disconnect) pass through."""

    def __init__(self, app: ASGIApp, limit: int, metrics: ServiceMetrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(Errors.BODY_TOO_LARGE, limit=self.limit)
        self.metrics.errors.labels(kind=error.code).inc()
        response = error.response()
        response.headers["Connection"] = "close"  # do not read the rest of an oversized body
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
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
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, None, receive), send)


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
