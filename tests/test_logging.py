"""Request ids and structured logs, over HTTP: the X-Request-ID header on every response, the id on
every log line of its request, our access log, JSON lines, and no review text in any log line."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from app.logs import configure_logging
from app.main import create_app
from app.process import ServiceProcess
from app.settings import Settings
from sentiment.engine import SentimentEngine
from tests.conftest import wait_ready

HEX_ID = re.compile(r"[0-9a-f]{32}")
MARKER = "Zq7xMARKERuniq"  # a word no log line may ever contain


class LogCapture:
    """The process's log lines, as the service's own handler writes them."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.text.splitlines()]  # every line must parse

    def access(self, request_id: str) -> list[dict]:
        return [r for r in self.json_lines() if r["logger"] == "app.access" and r["request_id"] == request_id]


def capture(log_format: str, level: str = "info") -> Iterator[LogCapture]:
    logs = LogCapture()
    configure_logging(log_format, level, stream=logs.stream)  # type: ignore[arg-type]
    try:
        yield logs
    finally:
        configure_logging("text", "info")  # back to stderr, as app.main set it up


@pytest.fixture
def json_logs() -> Iterator[LogCapture]:
    yield from capture("json")


@pytest.fixture
def text_logs() -> Iterator[LogCapture]:
    yield from capture("text")


class FailingEngine(SentimentEngine):
    """Fails every batch that holds a text starting with "fail" (so the service logs an error)."""

    def score(self, requests):
        if any(r.text.startswith("fail") for r in requests):
            raise RuntimeError("injected fault")
        return super().score(requests)


# ---- the header --------------------------------------------------------------------------------

def test_a_sane_request_id_is_echoed_on_every_kind_of_response(make_client) -> None:
    client = make_client(max_body_bytes=2000)
    cases = {
        "ok": lambda h: client.post("/v1/predict", json={"texts": ["good film"]}, headers=h),
        "not found": lambda h: client.get("/no/such/route", headers=h),
        "malformed": lambda h: client.post("/v1/predict", content=b"{not json", headers=h),
        "too large (BodyLimit)": lambda h: client.post("/v1/predict", json={"texts": ["good " * 1000]}, headers=h),
        "health": lambda h: client.get("/health/ready", headers=h),
        "oip": lambda h: client.get("/v2/health/ready", headers=h),
    }
    statuses = {}
    for name, call in cases.items():
        rid = f"client-{name.split()[0]}-42:a/b=c"
        r = call({"X-Request-ID": rid})
        statuses[name] = r.status_code
        assert r.headers["x-request-id"] == rid, name
    assert statuses["not found"] == 404 and statuses["malformed"] == 400 and statuses["too large (BodyLimit)"] == 413


def test_a_request_id_is_generated_when_absent(make_client) -> None:
    client = make_client()
    ids = [client.get("/health/live").headers["x-request-id"] for _ in range(3)]
    assert all(HEX_ID.fullmatch(i) for i in ids) and len(set(ids)) == 3


@pytest.mark.parametrize("bad", [b"", b"x" * 129, b"has space", b"caf\xc3\xa9", b"tab\tinside", b"line\x7f"])
def test_an_insane_request_id_is_replaced(make_client, bad: bytes) -> None:
    client = make_client()
    r = client.get("/health/live", headers=[(b"X-Request-ID", bad)])
    assert HEX_ID.fullmatch(r.headers["x-request-id"]), r.headers["x-request-id"]


def test_the_longest_sane_id_is_kept(make_client) -> None:
    rid = "a" * 128
    assert make_client().get("/health/live", headers={"X-Request-ID": rid}).headers["x-request-id"] == rid


def test_an_unhandled_error_500_still_carries_the_id_and_is_logged(tiny_artifacts: Path, json_logs: LogCapture) -> None:
    app = create_app(Settings(artifacts_dir=tiny_artifacts))

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        app.state.service.predict = broken
        r = client.post("/v1/predict", json={"texts": ["good"]}, headers={"X-Request-ID": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert [a["status"] for a in json_logs.access("bug-1")] == [500]
    errors = [rec for rec in json_logs.json_lines() if rec["level"] == "ERROR" and rec["request_id"] == "bug-1"]
    assert errors and "RuntimeError: a bug" in errors[0]["exception"]


# ---- the log lines -----------------------------------------------------------------------------

def test_the_access_line_and_the_app_lines_of_a_request_carry_its_id(make_client, json_logs: LogCapture) -> None:
    client = make_client(lambda s: FailingEngine.load(s.artifacts_dir, "cpu"), warmup=False)
    ok = client.post("/v1/predict", json={"texts": ["good film", "bad", "great"]}, headers={"X-Request-ID": "req-ok"})
    failed = client.post("/v1/predict", json={"texts": ["fail now"]}, headers={"X-Request-ID": "req-fail"})
    assert ok.status_code == 200 and failed.status_code == 500

    [access] = json_logs.access("req-ok")
    assert access["method"] == "POST" and access["route"] == "/v1/predict" and access["status"] == 200
    assert access["texts"] == 3 and access["duration_ms"] > 0 and access["client"].startswith("testclient:")
    assert access["level"] == "INFO" and "POST /v1/predict 200" in access["message"]
    # The service's error line for the failed text is written while serving req-fail: it has the id.
    app_lines = [r for r in json_logs.json_lines() if r["logger"] == "app" and r["request_id"] == "req-fail"]
    assert any("texts[0] failed" in r["message"] for r in app_lines), json_logs.text
    assert json_logs.access("req-fail")[0]["status"] == 500
    # The batch worker's line serves a batch, not a request: no id, and that is expected.
    batch = [r for r in json_logs.json_lines() if "batch of 1 items failed" in r["message"]]
    assert batch and batch[0]["request_id"] is None


def test_json_lines_have_the_documented_fields(make_client, json_logs: LogCapture) -> None:
    client = make_client()
    client.get("/v1/model", headers={"X-Request-ID": "m-1"})
    client.post("/v2/models/sentiment/infer", headers={"X-Request-ID": "oip-1"}, json={
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["good", "bad"]}]})
    lines = json_logs.json_lines()
    assert lines and all({"timestamp", "level", "logger", "message", "request_id"} <= set(r) for r in lines)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", r["timestamp"]) for r in lines)
    access_keys = {"timestamp", "level", "logger", "message", "request_id", "method", "route", "status",
                   "duration_ms", "texts", "client"}
    [model] = json_logs.access("m-1")
    assert set(model) == access_keys and model["texts"] is None and model["route"] == "/v1/model"
    [oip] = json_logs.access("oip-1")
    assert oip["status"] == 200 and oip["texts"] == 2  # the /v2 route counts its texts too


def test_text_lines_carry_the_id_in_brackets(make_client, text_logs: LogCapture) -> None:
    client = make_client()
    client.post("/v1/predict", json={"texts": ["good film"]}, headers={"X-Request-ID": "t-77"})
    [line] = [ln for ln in text_logs.text.splitlines() if "[t-77]" in ln]
    assert re.search(r" INFO app\.access \[t-77\] POST /v1/predict 200 [\d.]+ms texts=1 client=testclient:\d+$", line)
    assert re.search(r"\[-\] model tiny-test loaded", text_logs.text)  # outside a request: "-"


def test_no_review_text_is_ever_logged(make_client, caplog: pytest.LogCaptureFixture) -> None:
    logs = LogCapture()
    configure_logging("json", "debug", stream=logs.stream)  # every level, debug included
    caplog.set_level(logging.DEBUG)
    try:
        client = make_client(lambda s: FailingEngine.load(s.artifacts_dir, "cpu"), warmup=False, max_text_chars=200)
        text = f"a good film {MARKER} !"
        requests = [
            {"json": {"texts": [text], "trace": True, "gates": True}},  # served
            {"content": f'{{"texts": ["{MARKER}" '.encode()},  # malformed JSON
            {"json": {"texts": [text, 5]}},  # invalid type
            {"json": {"texts": [MARKER * 20]}},  # too long, and a word too long
            {"json": {"texts": [f"fail {MARKER}"]}},  # the engine fails on it
            {"json": {"texts": ["   ", text]}},  # empty text
            {"json": {"texts": [text], "extra": MARKER}},  # unknown field
        ]
        statuses = [client.post("/v1/predict", **kw).status_code for kw in requests]
        statuses.append(client.post("/v2/models/sentiment/infer", json={"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}).status_code)
        statuses.append(client.post("/v2/models/sentiment/infer", content=f'{{"inputs": "{MARKER}'.encode(),
                                    headers={"content-type": "application/json"}).status_code)
    finally:
        configure_logging("text", "info")
    assert statuses[0] == 200 and statuses[-2] == 200 and all(s >= 400 for s in statuses[1:-2] + statuses[-1:])
    assert len([r for r in logs.json_lines() if r["logger"] == "app.access" and r["route"] != "/health/ready"]) == 9
    assert MARKER not in logs.text
    assert all(MARKER not in r.getMessage() and MARKER not in str(r.__dict__) for r in caplog.records)


# ---- the real server ---------------------------------------------------------------------------

@pytest.mark.slow
def test_the_server_process_writes_json_lines_only(tiny_artifacts: Path) -> None:
    with ServiceProcess(tiny_artifacts, {"SENTIMENT_LOG_FORMAT": "json", "SENTIMENT_WORKERS": "2"},
                        log_level="info") as server:
        r = httpx.post(server.base_url + "/v1/predict", json={"texts": ["good film", MARKER]},
                       headers={"X-Request-ID": "proc-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "proc-1"
        missing = httpx.get(server.base_url + "/nope")
        server.stop()
        output = server.output()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is JSON
    assert MARKER not in output
    [access] = [r for r in lines if r["logger"] == "app.access" and r["request_id"] == "proc-1"]
    assert access["status"] == 200 and access["texts"] == 2 and access["client"].startswith("127.0.0.1:")
    assert any(r["logger"] == "app.access" and r["request_id"] == missing.headers["x-request-id"]
               and r["status"] == 404 for r in lines)
    assert any(r["logger"] == "uvicorn.error" and "Uvicorn running" in r["message"] for r in lines)
    assert sum(r["logger"] == "app.model_worker" and "loaded" in r["message"] for r in lines) == 2  # workers too
    assert not any(r["logger"] == "uvicorn.access" for r in lines)  # ours replaces uvicorn's
