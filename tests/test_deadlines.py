"""Per-request deadlines: ``timeout_ms`` (/v1) and Triton's ``timeout`` parameter in µs (/v2). A request
whose deadline passes is answered 504 deadline_exceeded at once, and its queued texts are dropped
before the engine sees them. Nothing here measures time: each test holds the model with an engine
that blocks until released, and checks what was answered while it was still blocked."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batcher import MicroBatcher
from app.lanes import BATCH, DeadlineExceededError
from sentiment.engine import SentimentEngine


class HoldingEngine(SentimentEngine):
    """Records every text it is handed; a batch holding "hold" blocks until ``release`` is set."""

    release = threading.Event()
    seen: list[str] = []
    holding = False

    def score(self, requests):
        HoldingEngine.seen += [r.text for r in requests]
        if any(r.text == "hold" for r in requests):
            HoldingEngine.holding = True
            HoldingEngine.release.wait(10)
            HoldingEngine.holding = False
        return super().score(requests)


@pytest.fixture
def held_client(make_client):
    """A client whose model is held by a request for "hold" (one batch slot, one text per batch)."""
    HoldingEngine.release.clear()
    HoldingEngine.seen = []
    client = make_client(lambda s: HoldingEngine.load(s.artifacts_dir, "cpu"), warmup=False, max_batch_size=1,
                         max_wait_ms=0)
    pool = ThreadPoolExecutor(1)
    held = pool.submit(client.post, "/v1/predict", json={"texts": ["hold"]})
    deadline = time.time() + 10
    while not HoldingEngine.holding and time.time() < deadline:
        time.sleep(0.005)
    assert HoldingEngine.holding
    yield client
    HoldingEngine.release.set()
    assert held.result().status_code == 200
    pool.shutdown()


def metric(client, line: str) -> bool:
    return line in client.get("/metrics").text


def test_a_queued_request_past_its_deadline_gets_504_at_once_and_is_never_scored(held_client) -> None:
    client = held_client
    r = client.post("/v1/predict", json={"texts": ["doomed film"], "timeout_ms": 200})
    assert HoldingEngine.holding  # answered at its deadline, while the model is still busy
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert "200 ms" in r.json()["error"]["message"] and "retry-after" not in r.headers
    assert client.app.state.service.batcher.depth == 0  # dropped from the queue at once
    HoldingEngine.release.set()
    assert client.post("/v1/predict", json={"texts": ["after"]}).status_code == 200
    assert "doomed film" not in HoldingEngine.seen and "after" in HoldingEngine.seen
    assert metric(client, 'sentiment_errors_total{kind="deadline_exceeded"} 1.0')
    assert metric(client, 'sentiment_lane_errors_total{kind="deadline_exceeded",lane="interactive"} 1.0')


def test_v2_timeout_parameter_is_a_deadline_in_microseconds(held_client) -> None:
    client = held_client
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["doomed film"]}],
            "parameters": {"timeout": 200_000, "priority": 2}}
    r = client.post("/v2/models/sentiment/infer", json=body)
    assert HoldingEngine.holding
    assert r.status_code == 504 and r.headers["x-error-code"] == "deadline_exceeded"
    assert set(r.json()) == {"error"} and "200 ms" in r.json()["error"]
    HoldingEngine.release.set()
    assert client.post("/v1/predict", json={"texts": ["after"]}).status_code == 200
    assert "doomed film" not in HoldingEngine.seen
    assert metric(client, 'sentiment_lane_errors_total{kind="deadline_exceeded",lane="batch"} 1.0')


def test_without_a_deadline_a_queued_request_waits_for_its_turn(held_client) -> None:
    client = held_client
    with ThreadPoolExecutor(2) as pool:
        v1 = pool.submit(client.post, "/v1/predict", json={"texts": ["patient film"]})
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["patient movie"]}],
                "parameters": {"timeout": 0}}  # 0: no deadline of its own
        v2 = pool.submit(client.post, "/v2/models/sentiment/infer", json=body)
        time.sleep(0.3)
        HoldingEngine.release.set()
        assert v1.result().status_code == 200 and v2.result().status_code == 200


def test_a_deadline_that_passes_while_the_batch_runs_is_answered_at_the_deadline(make_client) -> None:
    HoldingEngine.release.clear()
    HoldingEngine.seen = []
    client = make_client(lambda s: HoldingEngine.load(s.artifacts_dir, "cpu"), warmup=False)
    r = client.post("/v1/predict", json={"texts": ["hold"], "timeout_ms": 300})
    assert HoldingEngine.holding  # the batch is still running: the answer did not wait for it
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    HoldingEngine.release.set()


class SlowEngine(SentimentEngine):
    delay = 0.05
    seen: list[str] = []

    def score(self, requests):
        SlowEngine.seen += [r.text for r in requests]
        time.sleep(self.delay)
        return super().score(requests)


def test_a_request_that_cannot_meet_its_deadline_gets_504_at_once(make_client) -> None:
    SlowEngine.seen = []
    client = make_client(lambda s: SlowEngine.load(s.artifacts_dir, "cpu"), warmup=False, max_batch_size=1,
                         max_wait_ms=0)
    assert client.post("/v1/predict", json={"texts": ["good film"]}).status_code == 200  # measures throughput
    with ThreadPoolExecutor(1) as pool:
        backlog = pool.submit(client.post, "/v1/predict", json={"texts": ["good film " * 10] * 64})  # ~3 s
        deadline = time.time() + 5
        while len(SlowEngine.seen) < 3 and time.time() < deadline:
            time.sleep(0.005)
        r = client.post("/v1/predict", json={"texts": ["hopeless film"], "timeout_ms": 1000})
        assert not backlog.done()  # refused long before the backlog (and so its own turn) ended
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert "estimated wait" in r.json()["error"]["message"]
        # Batch-lane work waits behind the interactive backlog too.
        r = client.post("/v1/predict", json={"texts": ["hopeless"], "timeout_ms": 1000, "priority": "batch"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert backlog.result().status_code == 200
    assert "hopeless film" not in SlowEngine.seen and "hopeless" not in SlowEngine.seen


@pytest.mark.parametrize("bad", [0, -5, "100", 1.5, True])
def test_v1_timeout_ms_must_be_a_positive_integer(make_client, bad) -> None:
    r = make_client().post("/v1/predict", json={"texts": ["a film"], "timeout_ms": bad})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["loc"] == ["body", "timeout_ms"]


def test_v1_timeout_ms_is_at_most_the_request_timeout_and_the_openapi_says_so(make_client) -> None:
    client = make_client(request_timeout_s=2.5)
    assert client.post("/v1/predict", json={"texts": ["a film"], "timeout_ms": 2500}).status_code == 200
    assert client.post("/v1/predict", json={"texts": ["a film"], "timeout_ms": 2500.0}).status_code == 200  # JSON's integer
    r = client.post("/v1/predict", json={"texts": ["a film"], "timeout_ms": 2501})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert "at most 2500" in r.json()["error"]["message"] and "SENTIMENT_REQUEST_TIMEOUT_S" in r.json()["error"]["message"]
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["timeout_ms"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 2500}


@pytest.mark.parametrize("bad", [-1, "1000", 1.5, True])
def test_v2_timeout_must_be_a_non_negative_integer(make_client, bad) -> None:
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a film"]}],
            "parameters": {"timeout": bad}}
    r = make_client().post("/v2/models/sentiment/infer", json=body)
    assert r.status_code == 400 and r.headers["x-error-code"] == "invalid_infer_request"
    assert "timeout" in r.json()["error"]


def test_v2_timeout_longer_than_the_request_timeout_is_bounded_by_it(make_client) -> None:
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a film"]}],
            "parameters": {"timeout": 10 ** 12}}  # 11.6 days
    assert make_client().post("/v2/models/sentiment/infer", json=body).status_code == 200


# ---- the batcher alone: it never hands out an item whose deadline has passed ----------------------

async def test_the_batcher_drops_expired_items_instead_of_handing_them_out() -> None:
    handed: list[str] = []
    gate = threading.Event()

    def process(items: list[str]) -> list[str]:
        handed.extend(items)
        gate.wait(5)
        return items

    with ThreadPoolExecutor(1) as executor:
        batcher = MicroBatcher(process, executor, max_batch_size=1, max_wait_s=0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit_many(["running"]))
        while not handed:
            await asyncio.sleep(0.005)
        soon = time.monotonic() + 0.05
        # The expired request is first in line (interactive); the live one waits in the batch lane.
        late = asyncio.ensure_future(batcher.submit_many(["late-1", "late-2"], deadline=soon))
        alive = asyncio.ensure_future(batcher.submit_many(["alive"], lane=BATCH, deadline=time.monotonic() + 60))
        while time.monotonic() < soon + 0.01:
            await asyncio.sleep(0.01)
        gate.set()
        assert await running == ["running"] and await alive == ["alive"]
        outcomes = await late
        assert all(isinstance(o, DeadlineExceededError) for o in outcomes)
        assert handed == ["running", "alive"] and batcher.depth == 0
        await batcher.stop()


def test_a_deadline_holds_in_worker_mode_while_every_worker_is_frozen(tiny_artifacts) -> None:
    """As users run it (``python -m app``, model workers): with both workers frozen, a request with
    ``timeout_ms`` gets 504 deadline_exceeded at its deadline, not after the batch deadline."""
    import os
    import signal

    import httpx

    from app.process import ServiceProcess
    from tests.test_workers import worker_pids

    with ServiceProcess(tiny_artifacts, {"SENTIMENT_WORKERS": "2"}) as server:
        pids = worker_pids(server.proc.pid)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            r = httpx.post(server.base_url + "/v1/predict", json={"texts": ["a great film"], "timeout_ms": 300}, timeout=30)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
        assert httpx.post(server.base_url + "/v1/predict", json={"texts": ["a great film"]}, timeout=60).status_code == 200
