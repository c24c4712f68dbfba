"""Admission that holds under load: request-body bytes in memory are capped and always released, and
large requests are validated off the event loop (the queue's cost bound per lane: tests/test_lanes.py)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.process import ServiceProcess
from sentiment.engine import SentimentEngine


class HoldingEngine(SentimentEngine):
    """A batch holding "hold" blocks until ``release`` is set."""

    release = threading.Event()
    holding = False

    def score(self, requests):
        if any(r.text == "hold" for r in requests):
            HoldingEngine.holding = True
            HoldingEngine.release.wait(10)
            HoldingEngine.holding = False
        return super().score(requests)


def body_bytes_in_flight(metrics_text: str) -> float:
    return float(re.search(r"^sentiment_body_bytes_in_flight (\S+)$", metrics_text, re.M).group(1))


def v2_body(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


def test_body_bytes_in_flight_are_capped_and_released(make_client) -> None:
    HoldingEngine.release.clear()
    client = make_client(lambda s: HoldingEngine.load(s.artifacts_dir, "cpu"), warmup=False,
                         max_body_bytes_in_flight=600)
    held_body = json.dumps({"texts": ["hold", "good film " * 20]}).encode()
    big = {"texts": ["a great film " * 30]}  # ~410 bytes: does not fit beside the held request
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(client.post, "/v1/predict", content=held_body, headers={"content-type": "application/json"})
        deadline = time.time() + 10
        while not HoldingEngine.holding and time.time() < deadline:
            time.sleep(0.005)
        assert body_bytes_in_flight(client.get("/metrics").text) == len(held_body)
        refused = client.post("/v1/predict", json=big)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1" and "SENTIMENT_MAX_BODY_BYTES_IN_FLIGHT" in refused.json()["error"]["message"]
        refused_v2 = client.post("/v2/models/sentiment/infer", json=v2_body(big["texts"]))
        assert refused_v2.status_code == 503 and refused_v2.headers["x-error-code"] == "overloaded"
        assert set(refused_v2.json()) == {"error"} and refused_v2.headers["retry-after"] == "1"
        assert client.get("/v1/model").status_code == 200  # requests without a body pass
        HoldingEngine.release.set()
        assert held.result().status_code == 200
    assert body_bytes_in_flight(client.get("/metrics").text) == 0
    assert client.post("/v1/predict", json=big).status_code == 200  # alone, any legal body is taken
    assert client.post("/v1/predict", json={"texts": [""]}).status_code == 422
    assert client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/v1/predict", json={"texts": ["x"] * 65}).status_code == 413
    metrics = client.get("/metrics").text
    assert body_bytes_in_flight(metrics) == 0  # released after errors too
    assert 'sentiment_errors_total{kind="overloaded"} 2.0' in metrics


@pytest.mark.slow
def test_a_client_that_leaves_mid_body_releases_its_bytes(tiny_artifacts) -> None:
    with ServiceProcess(tiny_artifacts, {"SENTIMENT_WORKERS": "0"}) as server:
        def held() -> float:
            return body_bytes_in_flight(httpx.get(f"{server.base_url}/metrics").text)

        def until(value: float) -> None:
            deadline = time.time() + 10
            while held() != value and time.time() < deadline:
                time.sleep(0.02)
            assert held() == value

        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n" + b'{"texts": ["good')
        until(5000)  # counted from its Content-Length, before the body has arrived
        conn.close()
        until(0)
        r = httpx.post(f"{server.base_url}/v1/predict", json={"texts": ["good film"]})
        assert r.status_code == 200


def test_large_requests_are_validated_off_the_event_loop(make_client, monkeypatch) -> None:
    import app.service as service

    validated_on: list[str] = []
    original = service.run_in_threadpool

    async def recording(fn, *args):
        validated_on.append(fn.__name__)
        return await original(fn, *args)

    monkeypatch.setattr(service, "run_in_threadpool", recording)
    client = make_client()
    assert client.post("/v1/predict", json={"texts": ["good film"] * 64}).status_code == 200
    assert validated_on == []  # small: validated inline
    # 8 texts of 200-character words, 19,800 characters each: the worst case for the long-word check.
    texts = [" ".join(["x" * 199] * 99)] * 8
    assert client.post("/v1/predict", json={"texts": texts}).status_code == 200
    assert validated_on == ["validate_texts"]
    bad = client.post("/v1/predict", json={"texts": texts[:7] + ["y" * 201 + " " + "z" * 19_000]})
    assert bad.status_code == 413 and bad.json()["error"]["code"] == "word_too_long"  # errors cross the thread
    assert bad.json()["error"]["details"] == [{"loc": ["body", "texts", 7], "msg": (
        "201 characters without whitespace at character 0; the limit is 200")}]
    assert validated_on == ["validate_texts"] * 2
