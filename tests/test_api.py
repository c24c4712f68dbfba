"""The HTTP contract against the real app (TestClient runs the lifespan: load → warm up → ready)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from sentiment.engine import SentimentEngine
from tests.conftest import wait_ready  # noqa: F401 (fixtures: make_client)

TEXTS = ["A great film, good and great!", "An awful movie. Bad, bad, bad.", "the film was a movie"]


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def test_predict_contract(client: TestClient) -> None:
    r = client.post("/v1/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"version": "tiny-test", "device": "cpu"}
    assert r.headers["x-model-version"] == "tiny-test" and float(r.headers["x-process-time-ms"]) > 0
    preds = body["predictions"]
    assert len(preds) == 3
    for p in preds:
        assert set(p) == {"label", "probability", "num_tokens", "truncated", "total_tokens", "trace", "explanation"}
        assert 0 <= p["probability"] <= 1 and p["trace"] is None and p["truncated"] is False
        assert p["explanation"] is None
        assert p["label"] == ("positive" if p["probability"] >= 0.5 else "negative")
    assert preds[2]["num_tokens"] == 5


def test_trace_is_per_token_and_ends_at_the_prediction(client: TestClient) -> None:
    plain = client.post("/v1/predict", json={"texts": TEXTS}).json()["predictions"]
    traced = client.post("/v1/predict", json={"texts": TEXTS, "trace": True}).json()["predictions"]
    for p, t in zip(plain, traced):
        assert len(t["trace"]["tokens"]) == len(t["trace"]["probabilities"]) == t["num_tokens"]
        assert t["trace"]["probabilities"][-1] == pytest.approx(t["probability"], abs=1e-6)
        assert t["probability"] == pytest.approx(p["probability"], abs=1e-6)
    assert traced[2]["trace"]["tokens"] == ["the", "film", "was", "a", "movie"]


def test_order_is_kept_and_padding_does_not_change_results(client: TestClient) -> None:
    alone = [client.post("/v1/predict", json={"texts": [t]}).json()["predictions"][0]["probability"] for t in TEXTS]
    long = "good bad movie film " * 7
    together = client.post("/v1/predict", json={"texts": [long, *TEXTS, long]}).json()["predictions"]
    assert [p["probability"] for p in together[1:4]] == pytest.approx(alone, abs=1e-5)


def test_truncation_is_reported(client: TestClient) -> None:
    p = client.post("/v1/predict", json={"texts": ["good " * 50 + "awful"], "trace": True}).json()["predictions"][0]
    assert p["truncated"] is True and p["num_tokens"] == 32  # the tiny model's limit
    assert p["total_tokens"] == 51
    assert p["trace"]["tokens"][-1] == "awful"  # the end of the review is kept


def test_model_info_and_health(client: TestClient) -> None:
    info = client.get("/v1/model").json()
    assert info["version"] == "tiny-test" and info["device"] == "cpu"
    assert info["vocab_size"] == 14 and info["max_tokens"] == 32
    assert info["limits"] == {"max_texts": 64, "max_text_chars": 20000, "max_explain_texts": 8, "max_explain_tokens": 32}
    assert info["architecture"]["config"]["hidden_size"] == 12
    assert info["metrics"]["validation"]["accuracy"] == 0.5
    assert client.get("/health/live").json()["status"] == "alive"
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["model_version"] == "tiny-test"


@pytest.mark.parametrize("payload, status, code, loc", [
    ({}, 422, "invalid_request", ["body", "texts"]),
    ({"texts": []}, 422, "invalid_request", ["body", "texts"]),
    ({"texts": "not a list"}, 422, "invalid_request", ["body", "texts"]),
    ({"texts": [""]}, 422, "empty_text", ["body", "texts", 0]),
    ({"texts": ["fine", " \n\t "]}, 422, "empty_text", ["body", "texts", 1]),
    ({"texts": ["fine", 42]}, 422, "invalid_request", ["body", "texts", 1]),
    ({"texts": [None]}, 422, "invalid_request", ["body", "texts", 0]),
    ({"texts": ["ok"], "trace": "maybe"}, 422, "invalid_request", ["body", "trace"]),
    ({"texts": ["ok"], "unknown": 1}, 422, "invalid_request", ["body", "unknown"]),
    ({"texts": ["x"] * 9}, 413, "too_many_texts", ["body", "texts"]),
    ({"texts": ["ok", "y" * 201]}, 413, "text_too_long", ["body", "texts", 1]),
])
def test_bad_input_gets_a_clear_4xx(make_client, payload, status, code, loc) -> None:
    client = make_client(max_texts=8, max_text_chars=200)
    r = client.post("/v1/predict", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert loc in [d["loc"] for d in err["details"]]


def test_text_with_no_tokens_is_rejected(client: TestClient) -> None:
    r = client.post("/v1/predict", json={"texts": ["fine", "<br /><br />"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "empty_text"
    assert "texts[1]" in r.json()["error"]["message"]


def test_malformed_json_and_wrong_content_type(client: TestClient) -> None:
    r = client.post("/v1/predict", content=b'{"texts": ["unclosed"', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
    assert "at character 21" in r.json()["error"]["message"]  # says where parsing failed
    r = client.post("/v1/predict", content=b"texts=hello", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert client.get("/v1/nope").json()["error"]["code"] == "not_found"
    assert client.get("/v1/predict").status_code == 405


def test_bad_requests_do_not_disturb_concurrent_good_ones(client: TestClient) -> None:
    expected = client.post("/v1/predict", json={"texts": TEXTS}).json()["predictions"]
    payloads = [{"texts": TEXTS} if i % 2 else {"texts": ["ok", ""]} for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda p: client.post("/v1/predict", json=p), payloads))
    for i, r in enumerate(responses):
        if i % 2:
            assert r.status_code == 200 and r.json()["predictions"] == expected
        else:
            assert r.status_code == 422


def test_metrics_expose_what_an_operator_needs(client: TestClient) -> None:
    client.post("/v1/predict", json={"texts": TEXTS})
    client.post("/v1/predict", json={"texts": ["good " * 40]})
    client.post("/v1/predict", json={"texts": []})
    text = client.get("/metrics").text
    for needle in [
        'sentiment_request_duration_seconds_bucket{le="0.005",route="/v1/predict",status="200"}',
        'sentiment_request_duration_seconds_count{route="/v1/predict",status="422"} 1.0',
        "sentiment_batch_size_bucket", 'sentiment_queue_depth{lane="interactive"} 0.0', "sentiment_texts_total 4.0",
        "sentiment_queue_wait_seconds_bucket", "sentiment_tokens_per_text_bucket",
        "sentiment_truncated_texts_total 1.0", 'sentiment_errors_total{kind="invalid_request"} 1.0',
        'sentiment_model_info{device="cpu"', "sentiment_ready 1.0", "sentiment_batch_duration_seconds_bucket",
    ]:
        assert needle in text, needle


class SlowEngine(SentimentEngine):
    """The tiny engine with a slow forward pass, to fill the queue."""

    delay = 0.3

    def _forward(self, encoded, requests):
        time.sleep(self.delay)
        return super()._forward(encoded, requests)


def slow_factory(settings: Settings) -> SentimentEngine:
    return SlowEngine.load(settings.artifacts_dir, settings.device, max_tokens=settings.max_tokens)


def test_overload_is_shed_with_503_and_retry_after(make_client) -> None:
    client = make_client(slow_factory, max_queue=4, max_texts=4, max_batch_size=2, warmup=False)
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda i: client.post("/v1/predict", json={"texts": ["good film"]}), range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= 4
    shed = next(r for r in responses if r.status_code == 503)
    assert shed.headers["retry-after"] == "1" and shed.json()["error"]["code"] == "overloaded"
    assert 'sentiment_errors_total{kind="overloaded"}' in client.get("/metrics").text


def test_slow_answer_times_out_with_504(make_client) -> None:
    client = make_client(slow_factory, request_timeout_s=0.1, warmup=False)
    r = client.post("/v1/predict", json={"texts": ["good film"]})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert "retry-after" not in r.headers  # a timeout says nothing about when a retry would succeed
    # The service is not wedged by the abandoned request.
    SlowEngine.delay = 0.0
    try:
        client.app.state.settings.request_timeout_s = 5
        assert client.post("/v1/predict", json={"texts": ["good film"]}).status_code == 200
    finally:
        SlowEngine.delay = 0.3


def test_readiness_is_503_while_loading_then_200(make_client, tiny_artifacts) -> None:
    release = threading.Event()

    def gated_factory(settings: Settings) -> SentimentEngine:
        release.wait(10)
        return SentimentEngine.load(settings.artifacts_dir, settings.device)

    client = make_client(gated_factory, wait=False)
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    assert client.get("/health/live").status_code == 200
    busy = client.post("/v1/predict", json={"texts": ["good"]})
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "not_ready_loading"
    assert "retry-after" in busy.headers
    release.set()
    wait_ready(client)
    assert client.post("/v1/predict", json={"texts": ["good"]}).status_code == 200


@pytest.mark.parametrize("damage", ["missing_dir", "corrupt_model", "mismatched_vocab"])
def test_bad_artifacts_fail_loudly_and_readiness_stays_503(make_client, tiny_artifacts, tmp_path, damage, caplog) -> None:
    import shutil

    target = tmp_path / "art"
    if damage != "missing_dir":
        shutil.copytree(tiny_artifacts, target)
    if damage == "corrupt_model":
        (target / "model.pt").write_bytes(b"\x00" * 100)
    if damage == "mismatched_vocab":
        vocab = json.loads((target / "vocab.json").read_text())
        vocab["itos"].append("extra")
        (target / "vocab.json").write_text(json.dumps(vocab))
    client = make_client(wait=False, artifacts_dir=target)
    deadline = time.time() + 10
    while client.get("/health/ready").json()["status"] == "loading" and time.time() < deadline:
        time.sleep(0.02)
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json()["status"] == "failed" and "failed to load" in r.json()["detail"]
    refused = client.post("/v1/predict", json={"texts": ["good"]})
    assert refused.json()["error"]["code"] == "not_ready_failed" and "retry-after" not in refused.headers
    assert client.get("/health/live").status_code == 503  # only a restart can help
    for body in (r.text, refused.text, client.get("/health/live").text):  # no paths or exception text leak
        assert str(tmp_path) not in body and "Error" not in body and "model.pt" not in body
    assert any(rec.levelname == "CRITICAL" and str(target) in rec.getMessage() for rec in caplog.records)


def test_draining_turns_readiness_503_and_finishes_accepted_work(make_client) -> None:
    client = make_client()
    service = client.app.state.service
    service.begin_draining()
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json()["status"] == "draining"
    # Until the batcher closes, requests still routed here (load balancers lag) are served ...
    assert client.post("/v1/predict", json={"texts": ["good"]}).status_code == 200
    client.portal.call(service.batcher.stop)
    # ... and once it has closed they are refused with a retryable 503.
    r = client.post("/v1/predict", json={"texts": ["good"]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready_draining"
    assert r.headers["Retry-After"] == "5"


def test_openapi_documents_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/v1/predict"]["post"]
    assert {"400", "413", "422", "503", "504"} <= set(predict["responses"])
    body_schema = predict["requestBody"]["content"]["application/json"]["schema"]
    assert "examples" in json.dumps(body_schema) and "texts" in body_schema["required"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text  # works without internet
    assert "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


class RecordingEngine(SlowEngine):
    """Remembers the token lists it scored, to prove abandoned work never reaches the model."""

    seen: list[list[str]] = []

    def _forward(self, encoded, requests):
        RecordingEngine.seen.extend(e.tokens for e in encoded)
        return super()._forward(encoded, requests)


def test_client_disconnect_leaves_no_work_behind(make_client) -> None:
    client = make_client(lambda s: RecordingEngine.load(s.artifacts_dir, s.device), warmup=False)
    app = client.app
    body = json.dumps({"texts": ["awful awful awful"]}).encode()

    async def call_then_disconnect() -> list[dict]:
        import anyio

        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await anyio.sleep(0.05)  # the client hangs up while its text waits behind the busy model
            return {"type": "http.disconnect"}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80), "root_path": "", "state": {}}
        await app(scope, receive, send)
        return sent

    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(client.post, "/v1/predict", json={"texts": ["good film"]})  # occupies the model
        time.sleep(0.1)
        sent = client.portal.call(call_then_disconnect)
        assert blocker.result().status_code == 200
    assert sent[0]["status"] == 499
    time.sleep(0.4)  # give the batcher time to (not) run the abandoned text
    assert ["awful", "awful", "awful"] not in RecordingEngine.seen
    assert 'sentiment_errors_total{kind="client_disconnected"} 1.0' in client.get("/metrics").text


def test_gate_trace_is_opt_in_and_consistent(client: TestClient) -> None:
    plain = client.post("/v1/predict", json={"texts": TEXTS, "trace": True}).json()["predictions"]
    assert all(p["trace"]["gates"] is None for p in plain)
    r = client.post("/v1/predict", json={"texts": TEXTS, "trace": True, "gates": True})
    assert r.status_code == 200, r.text
    for p, q in zip(r.json()["predictions"], plain):
        g = p["trace"]["gates"]
        n = len(p["trace"]["tokens"])
        assert {k: len(v) for k, v in g.items()} == {"input": n, "forget": n, "output": n, "cell_norm": n}
        assert all(0 < v < 1 for k in ("input", "forget", "output") for v in g[k])
        assert p["probability"] == pytest.approx(q["probability"], abs=1e-6)  # same answer, more detail
    r = client.post("/v1/predict", json={"texts": TEXTS, "gates": True})
    assert r.status_code == 422 and "trace" in r.json()["error"]["message"]


def test_settings_that_contradict_each_other_fail_fast(tiny_artifacts: Path) -> None:
    with pytest.raises(ValueError, match="SENTIMENT_MAX_QUEUE"):
        Settings(artifacts_dir=tiny_artifacts, max_queue=8, max_texts=16)


def test_every_error_uses_the_vocabulary_is_counted_and_documented(client: TestClient) -> None:
    from app.errors import Errors

    by_code = {k.code: k for k in Errors.all()}
    calls = [
        lambda: client.post("/v1/predict", content=b"{", headers={"content-type": "application/json"}),
        lambda: client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}),
        lambda: client.post("/v1/predict", json={"texts": ["a"] * 65}),
        lambda: client.post("/v1/predict", json={"texts": ["a" * 20_001]}),
        lambda: client.post("/v1/predict", json={"texts": ["good", " "]}),
        lambda: client.post("/v1/predict", json={"texts": "good"}),
        lambda: client.get("/v1/nope"),
        lambda: client.delete("/v1/predict"),
    ]
    seen = set()
    for call in calls:
        r = call()
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
        kind = by_code[body["error"]["code"]]  # a code from the vocabulary…
        assert r.status_code == kind.status  # …with its status
        assert ("retry-after" in r.headers) == (kind.retry_after_s is not None)
        seen.add(kind.code)
    metrics = client.get("/metrics").text
    for code in seen:
        assert f'sentiment_errors_total{{kind="{code}"}}' in metrics, code
    assert seen >= {"malformed_json", "unsupported_media_type", "too_many_texts", "text_too_long", "empty_text",
                    "invalid_request", "not_found", "method_not_allowed"}
    documented = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["responses"]
    # Every status a prediction can fail with (403 and 409 belong to the model-repository endpoints only).
    repository_only = {Errors.FORBIDDEN, Errors.REPOSITORY_CONFLICT}
    statuses = {str(k.status) for k in Errors.all() if k.status not in (404, 405) and k not in repository_only}
    assert statuses <= set(documented), statuses - set(documented)
    assert "unsupported_media_type" in documented["415"]["description"]


def test_prediction_distribution_metrics_follow_what_is_served(client: TestClient) -> None:
    import re

    metrics = client.get("/metrics").text
    assert 'sentiment_predictions_total{label="positive"} 0.0' in metrics  # both series exist at 0
    assert 'sentiment_predictions_total{label="negative"} 0.0' in metrics
    probabilities = []
    for texts in (TEXTS, TEXTS[:1], ["good good good", "awful bad"]):
        probabilities += [p["probability"] for p in client.post("/v1/predict", json={"texts": texts}).json()["predictions"]]
    client.post("/v1/predict", json={"texts": ["good", ""]})  # refused: nothing served, nothing counted
    metrics = client.get("/metrics").text

    def value(name: str) -> float:
        return float(re.search(re.escape(name) + r" ([0-9.e+-]+)", metrics).group(1))

    positives = sum(p >= 0.5 for p in probabilities)
    assert value('sentiment_predictions_total{label="positive"}') == positives
    assert value('sentiment_predictions_total{label="negative"}') == len(probabilities) - positives
    assert value("sentiment_prediction_probability_count") == len(probabilities)
    assert value("sentiment_prediction_probability_sum") == pytest.approx(sum(probabilities))
    assert value('sentiment_prediction_probability_bucket{le="0.5"}') == sum(p <= 0.5 for p in probabilities)
