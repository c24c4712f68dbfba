"""Tracing with the SDK's in-memory exporter: a server span per request, queue_wait / tokenize /
forward children timed by the batch worker, W3C traceparent honoured, and nothing at all when the
OTLP variables are absent."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk", reason='the otel extra is not installed (pip install -e ".[otel]")')
from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

import app.tracing  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests.conftest import REPO, wait_ready  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """OTEL_EXPORTER_OTLP_ENDPOINT set as an operator would; spans go to memory instead of OTLP."""
    spans = InMemorySpanExporter()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.setattr(app.tracing, "make_exporter", lambda: spans)
    return spans


@pytest.fixture
def traced(make_client, exporter: InMemorySpanExporter):
    """make_client with tracing on; returns (make, finished spans of the client's app)."""
    clients = []

    def make(**overrides):
        client = make_client(**overrides)
        assert client.app.state.tracing is not None
        clients.append(client)
        return client

    def finished() -> list[ReadableSpan]:
        for c in clients:
            c.app.state.tracing.provider.force_flush()
        return list(exporter.get_finished_spans())

    yield make, finished
    for c in clients:
        c.app.state.tracing.shutdown()


def server_span(spans: list[ReadableSpan], request_id: str) -> ReadableSpan:
    [span] = [s for s in spans if s.kind is SpanKind.SERVER and s.attributes.get("request.id") == request_id]
    return span


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
                  key=lambda s: (s.start_time, s.name != "queue_wait", s.name != "tokenize"))


def test_a_prediction_has_a_server_span_with_timed_children(traced) -> None:
    make, finished = traced
    client = make()
    r = client.post("/v1/predict", json={"texts": ["good film", "bad", "great"]}, headers={"X-Request-ID": "p-1"})
    assert r.status_code == 200
    spans = finished()
    server = server_span(spans, "p-1")
    assert server.name == "POST /v1/predict" and server.parent is None
    attrs = dict(server.attributes)
    assert attrs["http.method"] == "POST" and attrs["http.route"] == "/v1/predict"
    assert attrs["http.status_code"] == 200 and attrs["http.response.status_code"] == 200
    assert attrs["sentiment.texts"] == 3 and server.status.status_code is not StatusCode.ERROR
    kids = children(spans, server)
    assert [k.name for k in kids] == ["queue_wait", "tokenize", "forward"]
    assert all(k.context.trace_id == server.context.trace_id and k.kind is SpanKind.INTERNAL for k in kids)
    wait, tokenize, forward = kids
    # In order, without overlap, inside the request's span.
    assert server.start_time <= wait.start_time <= wait.end_time <= tokenize.start_time
    assert tokenize.start_time < tokenize.end_time <= forward.start_time < forward.end_time <= server.end_time
    assert tokenize.attributes["sentiment.batch.request_texts"] == 3
    assert wait.attributes["sentiment.batched"] is True


def test_a_request_split_over_batches_gets_each_batch_s_spans(traced) -> None:
    make, finished = traced
    client = make(max_batch_size=2, max_wait_ms=0)
    assert client.post("/v1/predict", json={"texts": ["good", "bad", "great", "awful", "film"]},
                       headers={"X-Request-ID": "split"}).status_code == 200
    spans = finished()
    kids = children(spans, server_span(spans, "split"))
    names = [k.name for k in kids]
    assert names == ["queue_wait"] + ["tokenize", "forward"] * 3, names
    assert [k.attributes["sentiment.batch.request_texts"] for k in kids if k.name == "forward"] == [2, 2, 1]


def test_other_requests_get_a_server_span_without_children(traced) -> None:
    make, finished = traced
    client = make()
    client.get("/health/ready", headers={"X-Request-ID": "h-1"})
    client.get("/no/such/path", headers={"X-Request-ID": "404-1"})
    client.post("/v1/predict", json={"texts": []}, headers={"X-Request-ID": "bad-1"})
    spans = finished()
    health = server_span(spans, "h-1")
    assert health.name == "GET /health/ready" and children(spans, health) == []
    missing = server_span(spans, "404-1")
    assert missing.name == "GET" and "http.route" not in missing.attributes  # no route: method only
    assert missing.attributes["http.status_code"] == 404
    refused = server_span(spans, "bad-1")
    assert refused.attributes["http.status_code"] == 422 and children(spans, refused) == []


def test_an_incoming_traceparent_is_the_parent(traced) -> None:
    make, finished = traced
    client = make()
    client.post("/v1/predict", json={"texts": ["good"]},
                headers={"X-Request-ID": "tp-1", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    spans = finished()
    server = server_span(spans, "tp-1")
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT_ID
    assert server.parent.is_remote
    assert all(format(k.context.trace_id, "032x") == TRACE_ID for k in children(spans, server))


def test_the_access_log_names_the_trace(traced) -> None:
    from tests.test_logging import capture

    make, finished = traced
    client = make()
    for logs in capture("json"):
        client.get("/v1/model", headers={"X-Request-ID": "log-1"})
        [access] = logs.access("log-1")
    assert access["trace_id"] == format(server_span(finished(), "log-1").context.trace_id, "032x")


def test_a_5xx_marks_the_span_as_an_error(exporter: InMemorySpanExporter, tiny_artifacts: Path) -> None:
    app_ = create_app(Settings(artifacts_dir=tiny_artifacts))

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    with TestClient(app_, raise_server_exceptions=False) as client:
        wait_ready(client)
        app_.state.service.predict = broken
        assert client.post("/v1/predict", json={"texts": ["good"]}, headers={"X-Request-ID": "e-1"}).status_code == 500
    app_.state.tracing.shutdown()  # flushes
    server = server_span(list(exporter.get_finished_spans()), "e-1")
    assert server.status.status_code is StatusCode.ERROR and server.attributes["http.status_code"] == 500
    assert server.attributes["error.type"] == "RuntimeError" and not server.events  # no message recorded


# ---- off ---------------------------------------------------------------------------------------

def test_nothing_is_set_up_without_the_otlp_variables(monkeypatch: pytest.MonkeyPatch, make_client) -> None:
    for name in app.tracing.ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    assert app.tracing.setup_tracing() is None
    client = make_client()
    assert client.app.state.tracing is None
    assert client.post("/v1/predict", json={"texts": ["good"]}).status_code == 200
    assert client.app.state.service._traced == {}
    assert app.tracing.setup_tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}) is None


def test_with_tracing_off_no_opentelemetry_sdk_is_imported(tiny_artifacts: Path) -> None:
    """In a fresh interpreter: serve a prediction, then list what got imported."""
    code = f"""
import sys
from fastapi.testclient import TestClient
from app.main import create_app
from app.settings import Settings
from tests.conftest import wait_ready
app = create_app(Settings(artifacts_dir={str(tiny_artifacts)!r}))
with TestClient(app) as client:
    wait_ready(client)
    assert client.post("/v1/predict", json={{"texts": ["good film"]}}).status_code == 200
print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')) == []


def test_variables_set_but_packages_missing_warn_once(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if the extra were not installed
    with caplog.at_level(logging.WARNING, logger="app.tracing"):
        assert app.tracing.setup_tracing({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}) is None
    [warning] = [r for r in caplog.records if r.name == "app.tracing"]
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in warning.getMessage() and ".[otel]" in warning.getMessage()
