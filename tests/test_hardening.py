"""Hostile and careless clients, stuck models and faults, against the real app (TestClient runs the
lifespan) with the tiny model, or with a fault-injecting engine where HTTP cannot reach the fault.

Every test that needs no injected fault runs against both scorers: the in-process engine and the
worker pool (one model-worker process per core: what ``python -m app`` runs by default)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from app.settings import Settings
from sentiment.engine import SentimentEngine

GOOD = ["a great film", "awful , bad movie", "the film was a movie"]
HOSTILE = {
    "nul": "good\x00film",
    "controls": "good \x01\x02\x07\x1b[31m film\x7f",
    "rtl": "good \u202e mlif \u202c film \u200f",
    "emoji": "👍🏽 great 🎬🍿 film 👨‍👩‍👧",
    "combining": "goo\u0301\u0301\u0301d f\u0336i\u0336l\u0336m",
    "zero_width": "go\u200bod\ufeff film",
    "long_word_at_limit": "a" * 200,
    "many_long_words": " ".join(["x" * 200] * 99),
    "lone_high_surrogate": "good \ud800 film",
    "lone_low_surrogate": "\udfff",
    "long_word": "good " + "!" * 19_000,
}


SCORERS = {"in_process": 0, "worker_pool": 2}  # SENTIMENT_WORKERS of each


@pytest.fixture(params=list(SCORERS))
def make_served_client(request, make_client):
    """``make_client`` for each scorer in turn."""
    def make(**overrides):
        client = make_client(workers=SCORERS[request.param], **overrides)
        assert client.get("/v1/model").json()["workers"] == SCORERS[request.param]
        return client

    return make


@pytest.fixture(scope="module", params=list(SCORERS))
def served_client(request, tiny_artifacts):
    """One client with default settings per scorer, shared by the module's tests."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import wait_ready

    with TestClient(create_app(Settings(artifacts_dir=tiny_artifacts, workers=SCORERS[request.param]))) as client:
        wait_ready(client)
        assert client.get("/v1/model").json()["workers"] == SCORERS[request.param]
        yield client


def post_raw(client, texts: list[str], **extra):
    # ensure_ascii escapes lone surrogates as "\ud800", which is valid JSON (as a hostile client sends it)
    body = json.dumps({"texts": texts, **extra}, ensure_ascii=True).encode()
    return client.post("/v1/predict", content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("name", list(HOSTILE))
def test_any_string_gets_an_answer_or_a_4xx_that_names_it(served_client, name: str) -> None:
    client = served_client
    r = post_raw(client, ["good film", HOSTILE[name]])
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        assert len(r.json()["predictions"]) == 2
    else:
        error = r.json()["error"]
        assert error["details"][0]["loc"] == ["body", "texts", 1], error  # names the text
        expected = {"lone_high_surrogate": (422, "invalid_unicode"), "lone_low_surrogate": (422, "invalid_unicode"),
                    "long_word": (413, "word_too_long")}
        assert (r.status_code, error["code"]) == expected[name]
    assert client.get("/health/live").status_code == 200


def test_a_hostile_request_does_not_touch_its_batch_neighbours(make_served_client) -> None:
    client = make_served_client(max_wait_ms=20)
    alone = {t: client.post("/v1/predict", json={"texts": [t]}).json()["predictions"][0]["probability"] for t in GOOD}
    payloads = [[HOSTILE[n]] for n in HOSTILE] * 3 + [[t] for t in GOOD] * 6
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda texts: post_raw(client, texts), payloads))
    for texts, r in zip(payloads, responses):
        assert r.status_code < 500, r.text
        if texts[0] in alone:
            assert r.json()["predictions"][0]["probability"] == pytest.approx(alone[texts[0]], abs=1e-6)


@given(texts=st.lists(st.text(st.characters(blacklist_categories=()), max_size=60), min_size=1, max_size=4))
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_never_a_5xx_and_neighbours_unaffected(make_client_once, texts: list[str]) -> None:
    client, reference = make_client_once
    r = post_raw(client, [GOOD[0], *texts])
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        assert r.json()["predictions"][0]["probability"] == pytest.approx(reference, abs=1e-6)
    else:
        assert r.json()["error"]["code"] in {"invalid_unicode", "empty_text", "word_too_long"}


@pytest.fixture(scope="module")
def make_client_once(served_client):
    reference = served_client.post("/v1/predict", json={"texts": [GOOD[0]]}).json()["predictions"][0]["probability"]
    return served_client, reference


# ---- bodies -------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_refused_before_parsing(make_served_client) -> None:
    client = make_served_client(max_body_bytes=1000)
    big = json.dumps({"texts": ["good film " * 150]}).encode()
    r = client.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large" and "1000" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: refused while streaming, once past the limit
        for _ in range(100):
            yield b'{"texts": ["' + b"good " * 20

    r = client.post("/v1/predict", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert 'sentiment_errors_total{kind="body_too_large"} 2.0' in client.get("/metrics").text
    assert client.post("/v1/predict", json={"texts": ["good film"]}).status_code == 200


def test_the_default_limit_admits_the_largest_legal_request(tiny_artifacts) -> None:
    s = Settings(artifacts_dir=tiny_artifacts)
    worst = json.dumps({"texts": ["😀" * s.max_text_chars] * s.max_texts, "trace": True, "gates": True},
                       ensure_ascii=True)
    assert len(worst) <= s.body_limit < 17_000_000


def test_deep_nesting_is_malformed_json_not_a_crash(served_client) -> None:
    client = served_client
    for body in (b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"[" * 1_000_000):
        r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json", r.text[:200]


def test_large_bodies_are_parsed_off_the_event_loop(served_client, monkeypatch) -> None:
    import app.edge as edge
    import app.routes as routes

    threads: list[str] = []
    original = edge.run_in_threadpool

    async def recording(fn, *args):
        threads.append(fn.__qualname__)
        return await original(fn, *args)

    monkeypatch.setattr(edge, "run_in_threadpool", recording)
    client = served_client
    assert client.post("/v1/predict", json={"texts": ["good film"]}).status_code == 200
    assert threads == []  # small: parsed inline
    assert client.post("/v1/predict", json={"texts": ["good film " * 2000] * 8}).status_code == 200
    assert threads == [routes.parse_predict_request.__qualname__]


# ---- fairness and admission --------------------------------------------------------------------

class RecordingSlowEngine(SentimentEngine):
    delay = 0.05
    batches: list[list[str]] = []

    def score(self, requests):
        RecordingSlowEngine.batches.append([r.text for r in requests])
        time.sleep(self.delay)
        return super().score(requests)


def test_a_light_request_is_not_stuck_behind_a_heavy_backlog(make_client) -> None:
    RecordingSlowEngine.batches = []
    client = make_client(lambda s: RecordingSlowEngine.load(s.artifacts_dir, "cpu"), warmup=False,
                         max_batch_size=8, max_wait_ms=0)
    with ThreadPoolExecutor(4) as pool:
        heavy = [pool.submit(post_raw, client, [f"good film {i} {j}" for j in range(64)]) for i in range(3)]
        time.sleep(0.15)  # the heavy backlog is queued: 192 texts, 24 batches of 8
        started = time.perf_counter()
        light = post_raw(client, ["awful"])
        light_s = time.perf_counter() - started
        assert all(f.result().status_code == 200 for f in heavy)
    assert light.status_code == 200
    where = next(i for i, b in enumerate(RecordingSlowEngine.batches) if "awful" in b)
    assert where <= 6, f"the light text waited for {where} batches of a 24-batch backlog"
    assert light_s < 24 * RecordingSlowEngine.delay  # well before the backlog drained


def test_work_that_cannot_finish_in_time_is_shed_at_once(make_client) -> None:
    client = make_client(lambda s: RecordingSlowEngine.load(s.artifacts_dir, "cpu"), warmup=False,
                         max_batch_size=1, max_wait_ms=0, request_timeout_s=1.0)
    assert post_raw(client, ["good film"]).status_code == 200  # measures the throughput
    with ThreadPoolExecutor(2) as pool:
        backlog = pool.submit(post_raw, client, ["good film " * 100] * 64)  # ~64 × 0.05 s > 1 s
        time.sleep(0.2)
        started = time.perf_counter()
        shed = post_raw(client, ["good film " * 100] * 8)
        assert time.perf_counter() - started < 0.5  # refused at once, not after the 1 s timeout
        backlog.result()
    assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
    assert shed.headers["retry-after"] == "1" and "estimated wait" in shed.json()["error"]["message"]


# ---- faults -------------------------------------------------------------------------------------

class HangingEngine(SentimentEngine):
    release = threading.Event()

    def score(self, requests):
        if any(r.text == "hang" for r in requests):
            HangingEngine.release.wait(10)
        return super().score(requests)


def test_a_hung_forward_pass_fails_readiness_then_liveness(make_client) -> None:
    HangingEngine.release.clear()
    client = make_client(lambda s: HangingEngine.load(s.artifacts_dir, "cpu"), warmup=False,
                         stuck_batch_s=0.3, stuck_liveness_s=0.8, request_timeout_s=5)
    with ThreadPoolExecutor(1) as pool:
        hung = pool.submit(post_raw, client, ["hang"])
        time.sleep(0.5)
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "stuck"
        assert client.get("/health/live").status_code == 200  # not yet past the liveness bound
        refused = post_raw(client, ["good"])
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready_stuck"
        time.sleep(0.5)
        assert client.get("/health/live").status_code == 503  # an orchestrator restarts the replica now
        assert 'sentiment_ready 0.0' in client.get("/metrics").text
        HangingEngine.release.set()
        assert hung.result().status_code == 200
    assert client.get("/health/ready").status_code == 200 and client.get("/health/live").status_code == 200


def test_a_dead_batch_worker_fails_readiness_and_liveness(make_served_client) -> None:
    client = make_served_client()
    batcher = client.app.state.service.batcher

    def broken(batch):
        raise RuntimeError("worker bug")

    batcher._take = broken
    started = time.perf_counter()
    r = post_raw(client, ["good"])  # wakes the worker, which dies: the caller hears it at once
    assert r.status_code == 503 and r.json()["error"]["code"] in ("not_ready_failed", "not_ready_draining")
    assert time.perf_counter() - started < 5
    deadline = time.time() + 5
    while client.get("/health/live").status_code == 200 and time.time() < deadline:
        time.sleep(0.02)
    assert client.get("/health/live").status_code == 503
    assert client.get("/health/ready").json()["status"] == "failed"


async def test_a_request_cancelled_by_the_server_drops_its_queued_texts(tiny_artifacts) -> None:
    import asyncio

    from app.metrics import ServiceMetrics
    from app.service import SentimentService

    HangingEngine.release.clear()
    service = SentimentService(Settings(artifacts_dir=tiny_artifacts, warmup=False, max_batch_size=1),
                               ServiceMetrics(), lambda s: HangingEngine.load(s.artifacts_dir, "cpu"))
    await service.start()
    hung = asyncio.ensure_future(service.predict(["hang"], trace=False))
    await asyncio.sleep(0.1)
    victim = asyncio.ensure_future(service.predict(["good", "bad", "film"], trace=False))
    await asyncio.sleep(0.05)
    assert service.batcher.depth == 3
    victim.cancel()  # what uvicorn does to in-flight requests when the graceful timeout runs out
    with pytest.raises(asyncio.CancelledError):
        await victim
    for _ in range(3):  # the same loop tick, give or take a step: long before the hung batch ends
        await asyncio.sleep(0)
    assert service.batcher.depth == 0 and service.batcher.queued_cost == 0
    HangingEngine.release.set()
    await hung
    await service.shutdown()


# ---- leak nothing, invite nothing ---------------------------------------------------------------

def test_pages_carry_security_headers_and_redoc_is_gone(served_client) -> None:
    client = served_client
    for path in ("/", "/docs", "/v1/model", "/static/viewer.js"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "'unsafe-inline'" not in client.get("/").headers["content-security-policy"]
    assert client.get("/redoc").status_code == 404


def test_process_metrics_are_exported(served_client) -> None:
    text = served_client.get("/metrics").text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "sentiment_queue_cost",
                 "sentiment_queue_estimated_wait_seconds"):
        assert name in text, name
