"""Priorities: two lanes (interactive first, batch with a bounded share), small batch-lane batches
while interactive work is about, per-lane admission and metrics. The batcher alone with a gated
process function (exact orders, no timing), then over HTTP against the real app."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import app.lanes as lanes
from app.batcher import MicroBatcher, QueueFullError
from app.lanes import BATCH, INTERACTIVE
from app.process import ServiceProcess
from sentiment.engine import SentimentEngine


class Gated:
    """A process function that records each batch and waits for ``gate`` before returning."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()

    def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.gate.wait(5)
        return items


async def until(condition, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1) as ex:
        yield ex


def batcher_of(process, executor, **options) -> MicroBatcher:
    batcher = MicroBatcher(process, executor, max_wait_s=0, max_queue=1000, **options)
    batcher.lanes.configure(0.2, float("inf"))
    batcher.start()
    return batcher


async def test_interactive_work_overtakes_queued_batch_work(executor) -> None:
    gated = Gated()
    batcher = batcher_of(gated, executor, max_batch_size=1)
    bulk = asyncio.ensure_future(batcher.submit_many([f"b{i}" for i in range(10)], lane=BATCH))
    await until(lambda: len(gated.batches) == 1)  # b0 runs; b1..b9 wait
    urgent = asyncio.ensure_future(batcher.submit_many(["i0"], lane=INTERACTIVE))
    await asyncio.sleep(0.01)
    gated.gate.set()
    assert await urgent == ["i0"]
    await bulk
    assert [b[0] for b in gated.batches[:3]] == ["b0", "i0", "b1"]  # the very next item handed out
    await batcher.stop()


async def test_batch_work_keeps_its_share_while_interactive_work_saturates(executor) -> None:
    gated = Gated()
    batcher = batcher_of(gated, executor, max_batch_size=1)
    first = asyncio.ensure_future(batcher.submit_many(["first"], lane=INTERACTIVE))
    await until(lambda: len(gated.batches) == 1)
    # Both lanes full of equal-cost items; the batch lane's share is 0.2: one item in five.
    bulk = asyncio.ensure_future(batcher.submit_many([f"b{i}" for i in range(20)], lane=BATCH))
    chat = asyncio.ensure_future(batcher.submit_many([f"i{i}" for i in range(40)], lane=INTERACTIVE))
    await asyncio.sleep(0.01)
    gated.gate.set()
    await asyncio.gather(first, bulk, chat)
    served = [b[0][0] for b in gated.batches[1:41]]  # while both lanes had work waiting
    assert served.count("b") == 8, served  # 20 % of 40: never starved, never more than its share
    assert "bbb" not in "".join(served) and "iiiiii" not in "".join(served), served
    await batcher.stop()


async def test_batch_lane_batches_stay_small_only_while_interactive_work_is_about(executor, monkeypatch) -> None:
    gated = Gated()
    gated.gate.set()
    batcher = batcher_of(gated, executor, max_batch_size=64)
    batcher.lanes.configure(0.2, 30.0)  # items cost 10 each: at most 3 per batch-lane batch
    costs = [10.0] * 24
    monkeypatch.setattr(lanes, "INTERACTIVE_RECENT_S", 3600.0)  # "recent" for the whole test
    await batcher.submit_many([f"a{i}" for i in range(24)], costs, lane=BATCH)
    assert [len(b) for b in gated.batches] == [24]  # no interactive work yet: one full batch
    await batcher.submit_many(["i0"], [10.0], lane=INTERACTIVE)
    gated.batches.clear()
    await batcher.submit_many([f"c{i}" for i in range(24)], costs, lane=BATCH)
    assert max(len(b) for b in gated.batches) == 3 and sum(map(len, gated.batches)) == 24
    monkeypatch.setattr(lanes, "INTERACTIVE_RECENT_S", 0.0)  # interactive traffic has stopped
    gated.batches.clear()
    await batcher.submit_many([f"d{i}" for i in range(24)], costs, lane=BATCH)
    assert [len(b) for b in gated.batches] == [24]
    await batcher.stop()


async def test_a_batch_holds_one_lane(executor) -> None:
    gated = Gated()
    batcher = batcher_of(gated, executor, max_batch_size=64)
    running = asyncio.ensure_future(batcher.submit_many(["x"]))
    await until(lambda: len(gated.batches) == 1)
    bulk = asyncio.ensure_future(batcher.submit_many([f"b{i}" for i in range(5)], lane=BATCH))
    chat = asyncio.ensure_future(batcher.submit_many(["i0", "i1"]))
    await asyncio.sleep(0.01)
    gated.gate.set()
    await asyncio.gather(running, bulk, chat)
    # An interactive request's batch is never lengthened by batch-lane work, nor the other way round.
    assert sorted(map(sorted, gated.batches[1:])) == [["b0", "b1", "b2", "b3", "b4"], ["i0", "i1"]]
    await batcher.stop()


async def test_each_lane_has_its_own_queue_bounds(executor) -> None:
    gated = Gated()
    batcher = batcher_of(gated, executor, max_batch_size=1, max_queue_cost=25)
    running = asyncio.ensure_future(batcher.submit_many(["r"], [10.0], lane=BATCH))
    await until(lambda: len(gated.batches) == 1)
    queued = asyncio.ensure_future(batcher.submit_many(["b1", "b2"], [10.0, 10.0], lane=BATCH))
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):  # 20 + 10 > 25 in the batch lane
        await batcher.submit_many(["b3"], [10.0], lane=BATCH)
    chat = asyncio.ensure_future(batcher.submit_many(["i1", "i2"], [10.0, 10.0], lane=INTERACTIVE))
    await asyncio.sleep(0)
    assert batcher.lanes.depth_of(INTERACTIVE) == 2 and batcher.lanes.depth_of(BATCH) == 2
    gated.gate.set()
    await asyncio.gather(running, queued, chat)
    await batcher.stop()


# ---- over HTTP --------------------------------------------------------------------------------------

class RecordingSlowEngine(SentimentEngine):
    """Scores like the engine, one batch at a time, slowly; records the texts of every batch."""

    delay = 0.02
    batches: list[list[str]] = []

    def score(self, requests):
        RecordingSlowEngine.batches.append([r.text for r in requests])
        time.sleep(self.delay)
        return super().score(requests)


def slow_client(make_client, **overrides):
    RecordingSlowEngine.batches = []
    return make_client(lambda s: RecordingSlowEngine.load(s.artifacts_dir, "cpu"), warmup=False, max_wait_ms=0,
                       **overrides)


def test_an_interactive_request_overtakes_a_batch_backlog_and_the_backlog_still_finishes(make_client) -> None:
    client = slow_client(make_client, max_batch_size=1)
    with ThreadPoolExecutor(2) as pool:
        bulk = pool.submit(client.post, "/v1/predict",
                           json={"texts": [f"good film {i}" for i in range(30)], "priority": "batch"})
        deadline = time.time() + 10
        while len(RecordingSlowEngine.batches) < 2 and time.time() < deadline:
            time.sleep(0.005)
        chat = client.post("/v1/predict", json={"texts": ["awful"]})
        assert chat.status_code == 200
        assert bulk.result().status_code == 200  # the batch lane is slower, not starved
    where = next(i for i, b in enumerate(RecordingSlowEngine.batches) if b == ["awful"])
    assert where <= 4, f"the interactive text waited for {where} batches of a 30-batch backlog"


def test_v2_priority_levels_map_to_lanes(make_client) -> None:
    client = make_client()

    def infer(**parameters):
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["good film"]}],
                "parameters": parameters}
        return client.post("/v2/models/sentiment/infer", json=body)

    for priority in (0, 1, 2, 7):
        assert infer(priority=priority).status_code == 200
    assert infer().status_code == 200
    assert client.post("/v1/predict", json={"texts": ["a film"], "priority": "batch"}).status_code == 200
    metrics = client.get("/metrics").text
    assert 'sentiment_lane_requests_total{lane="interactive"} 3.0' in metrics  # 0, 1 and none
    assert 'sentiment_lane_requests_total{lane="batch"} 3.0' in metrics  # 2, 7 and v1 "batch"
    for bad in (-1, "high", 1.5, True):
        r = infer(priority=bad)
        assert r.status_code == 400 and r.headers["x-error-code"] == "invalid_infer_request", bad
        assert "priority" in r.json()["error"]


def test_v1_priority_is_interactive_or_batch(make_client) -> None:
    client = make_client()
    for bad in ("urgent", 1, None):
        r = client.post("/v1/predict", json={"texts": ["a film"], "priority": bad})
        assert r.status_code == 422 and r.json()["error"]["details"][0]["loc"] == ["body", "priority"], bad


def test_queue_cost_limit_is_per_lane_and_wired_from_settings(make_client) -> None:
    RecordingSlowEngine.delay = 0.3
    try:
        client = slow_client(make_client, max_batch_size=1, max_queue_cost=500)
        text = "good film " * 90  # cost 306: the 256 characters the tiny model's 32 tokens can keep, + 50
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(client.post, "/v1/predict", json={"texts": ["first"], "priority": "batch"})
            while not RecordingSlowEngine.batches:
                time.sleep(0.005)
            queued = pool.submit(client.post, "/v1/predict", json={"texts": [text], "priority": "batch"})
            deadline = time.time() + 5
            while client.app.state.service.batcher.lanes.depth_of(BATCH) == 0 and time.time() < deadline:
                time.sleep(0.005)
            refused = client.post("/v1/predict", json={"texts": [text], "priority": "batch"})
            interactive = pool.submit(client.post, "/v1/predict", json={"texts": [text]})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
            assert "500 work units" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "1"
            assert running.result().status_code == queued.result().status_code == 200
            assert interactive.result().status_code == 200  # the interactive lane had room
        metrics = client.get("/metrics").text
        assert 'sentiment_lane_errors_total{kind="overloaded",lane="batch"} 1.0' in metrics
        assert 'sentiment_lane_errors_total{kind="overloaded",lane="interactive"} 0.0' in metrics
    finally:
        RecordingSlowEngine.delay = 0.02


def test_queue_metrics_carry_the_lane(make_client) -> None:
    client = make_client()
    metrics = client.get("/metrics").text
    for name in ("sentiment_queue_depth", "sentiment_queue_cost", "sentiment_queue_estimated_wait_seconds"):
        for lane in ("interactive", "batch"):
            assert f'{name}{{lane="{lane}"}} 0.0' in metrics, (name, lane)
        assert f'{name}{{lane="all"}}' not in metrics


# ---- a real server with model-worker processes ---------------------------------------------------

@pytest.mark.slow
def test_lanes_and_deadlines_through_a_real_server(tiny_artifacts) -> None:
    with ServiceProcess(tiny_artifacts, {"SENTIMENT_WORKERS": "2"}) as server:
        body = {"texts": ["a great film", "an awful movie"]}
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            plain = c.post("/v1/predict", json=body).json()["predictions"]
            assert c.post("/v1/predict", json={**body, "priority": "batch"}).json()["predictions"] == plain
            assert c.post("/v1/predict", json={**body, "timeout_ms": 30_000}).json()["predictions"] == plain
            over = c.post("/v1/predict", json={**body, "timeout_ms": 30_001})
            assert over.status_code == 422 and "at most 30000" in over.json()["error"]["message"]
            v2 = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": body["texts"]}],
                  "parameters": {"priority": 2, "timeout": 10_000_000}}
            outputs = c.post("/v2/models/sentiment/infer", json=v2).json()["outputs"]
            probability = next(o for o in outputs if o["name"] == "probability")["data"]
            assert probability == pytest.approx([p["probability"] for p in plain], abs=1e-5)
            metrics = c.get("/metrics").text
            assert 'sentiment_lane_requests_total{lane="batch"} 2.0' in metrics
            assert 'sentiment_lane_requests_total{lane="interactive"} 2.0' in metrics  # the 422 was not admitted
            spec = c.get("/openapi.json").json()
            schema = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert schema["properties"]["timeout_ms"]["anyOf"][0]["maximum"] == 30_000
            assert json.dumps(schema["properties"]["priority"]).count("batch") >= 1
