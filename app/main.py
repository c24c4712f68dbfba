"""The FastAPI application: ``uvicorn app.main:app`` serves the shipped model from ``model_artifacts/``."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.auth import ApiKeyGate, load_keys
from app.edge import drop_framework_validation_errors, install_error_handlers
from app.logs import configure_logging
from app.metrics import ServiceMetrics
from app.middleware import BodyLimit, RequestContext, RequestTimer, SecurityHeaders, outermost
from app.oip import router as oip_router
from app.oip_repository import router as repository_router
from app.routes import document_setting_limits, router
from app.service import SentimentService
from app.settings import Settings, get_settings
from app.tracing import setup_tracing
from app.scorer import EngineFactory

STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(settings: Settings | None = None,
               engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the app; tests pass their own settings (and may pass a factory for a tiny model)."""
    settings = settings or get_settings()
    metrics = ServiceMetrics()
    service = SentimentService(settings, metrics, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        service.lifecycle.install_sigterm_hook(loop)
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
        redoc_url=None,  # ReDoc loads from a CDN; one offline docs page (Swagger UI) is enough
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.settings = settings
    install_error_handlers(app)
    drop_framework_validation_errors(app)
    document_setting_limits(app, settings)
    app.include_router(router)
    app.include_router(oip_router)
    prediction_keys = load_keys(settings.api_key.get_secret_value() if settings.api_key is not None else None,
                                settings.api_keys_file)
    admin_keys = load_keys(settings.admin_key.get_secret_value() if settings.admin_key is not None else None,
                           settings.admin_keys_file, ("SENTIMENT_ADMIN_KEY", "SENTIMENT_ADMIN_KEYS_FILE"))
    if set(admin_keys) & set(prediction_keys):
        raise ValueError("an admin key is also a prediction key: prediction keys must never open the model repository")
    app.state.prediction_digests, app.state.admin_digests = prediction_keys, admin_keys
    if admin_keys:  # the model-repository endpoints exist only with an admin key
        app.include_router(repository_router)
    # Outermost last: the timer sees every response, including the body limit's 413.
    app.add_middleware(BodyLimit, limit=settings.body_limit, metrics=metrics,
                       in_flight_limit=settings.body_bytes_in_flight_limit)
    # Outside the body limit: a request without a valid API key is refused before its body is read.
    app.add_middleware(ApiKeyGate, metrics=metrics, digests=prediction_keys)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestTimer, metrics=metrics)
    # Request id, access log and (with OTEL_EXPORTER_OTLP_*ENDPOINT set) the server span: outside
    # everything, Starlette's error middleware included, so every response has them, a 500 too.
    app.state.tracing = setup_tracing()
    outermost(app, RequestContext, tracing=app.state.tracing)
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


# Also when uvicorn imports this module (``uvicorn app.main:app``): our handler replaces its loggers'
# handlers, and its access log gives way to ours, which carries the request id.
configure_logging(get_settings().log_format, get_settings().log_level)
app = create_app()
