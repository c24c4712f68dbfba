"""The FastAPI application: ``uvicorn app.main:app`` serves the shipped model from ``model_artifacts/``."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import install_error_handlers
from app.metrics import ServiceMetrics
from app.routes import router
from app.service import SentimentService
from app.settings import Settings, get_settings
from sentiment.engine import SentimentEngine

STATIC_DIR = Path(__file__).resolve().parent / "static"
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


def create_app(settings: Settings | None = None,
               engine_factory: Callable[[Settings], SentimentEngine] | None = None) -> FastAPI:
    """Build the app; tests pass their own settings (and may pass a factory for a tiny model)."""
    settings = settings or get_settings()
    metrics = ServiceMetrics()
    service = SentimentService(settings, metrics, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        service.install_sigterm_hook(loop)
        loading = loop.create_task(service.start(), name="model-load")  # liveness answers while loading
        try:
            yield
        finally:
            await loading
            await service.shutdown()

    app = FastAPI(
        title="LSTM sentiment service",
        version="0.1.0",
        description=(
            "Scores English movie reviews with an IMDB-trained LSTM. Texts from concurrent requests are "
            "batched dynamically. Ask for `trace: true` to get the model's running sentiment after every token."
        ),
        lifespan=lifespan,
        docs_url=None,  # served below from local assets: deployments may have no internet for a CDN
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(RequestTimer, metrics=metrics)
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} — API docs",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    if (STATIC_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

    return app


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
