"""Occlusion explanations: the definition (exact), tokens equal to the trace's, batch invariance,
signs on constructed examples with the shipped model, limits and metrics, over HTTP."""

from __future__ import annotations

import re

import pytest
import torch
from fastapi.testclient import TestClient

from app.admission import text_cost, work_items
from sentiment.engine import ScoreRequest, SentimentEngine
from sentiment.model import pad_batch
from tests.conftest import SHIPPED, shipped_available, wait_ready  # noqa: F401 (fixtures: make_client)

TEXT = "the film was good , the movie was awful !"
OTHERS = ["a great great film " * 12, "bad", "the movie was a film , a bad bad movie"]


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def explain(client: TestClient, texts: list[str], **extra) -> list[dict]:
    r = client.post("/v1/predict", json={"texts": texts, "explain": "occlusion", **extra})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def direct_probability(engine: SentimentEngine, ids: list[int]) -> float:
    """The model alone on one sequence (batch of one, no engine bucketing)."""
    with torch.inference_mode():
        padded, lengths = pad_batch([ids])
        return float(engine.model(padded, lengths)[0][0])


def test_attribution_is_the_probability_minus_the_probability_without_the_token(client: TestClient,
                                                                                 tiny_artifacts) -> None:
    (p,) = explain(client, [TEXT], trace=True)
    e = p["explanation"]
    assert e["method"] == "occlusion"
    assert e["tokens"] == p["trace"]["tokens"]  # the same tokens as the trace
    assert len(e["attributions"]) == p["num_tokens"] == len(e["tokens"])
    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    ids = engine.encoder.encode_many([TEXT], engine.max_tokens)[0].ids
    full = direct_probability(engine, ids)
    assert p["probability"] == pytest.approx(full, abs=1e-6)
    for j, a in enumerate(e["attributions"]):
        without = direct_probability(engine, ids[:j] + ids[j + 1:])
        assert a == pytest.approx(full - without, abs=1e-5), j


def test_a_one_token_text_is_compared_with_the_empty_input(client: TestClient, tiny_artifacts) -> None:
    (p,) = explain(client, ["good"])
    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    head_bias = engine.artifacts.model.state_dict()["head.bias"]
    assert p["explanation"]["attributions"] == pytest.approx([p["probability"] - float(torch.sigmoid(head_bias)[0])],
                                                              abs=1e-6)


def test_explanations_do_not_depend_on_the_batch(client: TestClient) -> None:
    (alone,) = explain(client, [TEXT])
    batched = explain(client, [OTHERS[0], TEXT, OTHERS[1], OTHERS[2]])[1]
    plain = client.post("/v1/predict", json={"texts": [TEXT, *OTHERS]}).json()["predictions"][0]
    assert batched["explanation"]["tokens"] == alone["explanation"]["tokens"]
    assert batched["explanation"]["attributions"] == pytest.approx(alone["explanation"]["attributions"], abs=1e-5)
    assert alone["probability"] == pytest.approx(plain["probability"], abs=1e-5)
    # In one engine call beside unexplained texts too (the model thread's view of a mixed batch).
    engine_batch = client.app.state.service.lifecycle.scorer.engine.score(
        [ScoreRequest(OTHERS[0]), ScoreRequest(TEXT, explain=True), ScoreRequest(OTHERS[2], trace=True)])
    mixed = engine_batch.results[1].explanation.attributions
    assert mixed == pytest.approx(alone["explanation"]["attributions"], abs=1e-5)
    assert engine_batch.results[0].explanation is None


def test_limits_are_413s_that_name_the_limit(make_client) -> None:
    client = make_client(max_explain_tokens=5, max_explain_texts=2)
    limits = client.get("/v1/model").json()["limits"]
    assert limits["max_explain_tokens"] == 5 and limits["max_explain_texts"] == 2
    explain(client, ["the film was good !"])  # 5 tokens: fine
    r = client.post("/v1/predict", json={"texts": ["good", "the film was very good !"], "explain": "occlusion"})
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "explain_too_long" and "limit is 5" in err["message"]
    assert err["details"][0]["loc"] == ["body", "texts", 1]
    # Without "explain" the same text is fine.
    assert client.post("/v1/predict", json={"texts": ["the film was very good !"]}).status_code == 200
    r = client.post("/v1/predict", json={"texts": ["good"] * 3, "explain": "occlusion"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_explained_texts"
    assert "limit is 2" in r.json()["error"]["message"]
    r = client.post("/v1/predict", json={"texts": ["good"], "explain": "lime"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_explanations_are_counted(client: TestClient) -> None:
    explain(client, [TEXT, "good"])
    client.post("/v1/predict", json={"texts": [TEXT]})
    metrics = client.get("/metrics").text

    def value(name: str) -> float:
        return float(re.search(re.escape(name) + r" ([0-9.e+-]+)", metrics).group(1))

    assert value("sentiment_explained_texts_total") == 2
    assert value("sentiment_explanation_variants_total") == len(TEXT.split())  # "good" alone needs no variant


def test_an_explanation_costs_more_admission_than_a_plain_text(client: TestClient) -> None:
    model = client.app.state.service.lifecycle.model
    review = "a good film , " * 100
    plain, explained = text_cost(review, False, model), text_cost(review, False, model, explain=True)
    # The tiny model reads at most 32 tokens: the explanation adds 32 copies of the text's work.
    assert explained == pytest.approx(plain * (1 + 32))
    # Two words: two variants and the text itself.
    assert text_cost("good film", False, model, explain=True) == pytest.approx(3 * text_cost("good film", False, model))


@pytest.mark.slow
@pytest.mark.skipif(not shipped_available(), reason="needs the shipped model in model_artifacts/")
def test_signs_on_constructed_examples_with_the_shipped_model(make_client) -> None:
    client = make_client(artifacts_dir=SHIPPED)
    frame = "I watched this movie last week with my brother . The film was {} ."
    good, bad = explain(client, [frame.format("good"), frame.format("terrible")])
    for p, word, sign in ((good, "good", 1), (bad, "terrible", -1)):
        tokens, attributions = p["explanation"]["tokens"], p["explanation"]["attributions"]
        a = attributions[tokens.index(word)]
        assert sign * a > 0, (word, a)
        # The sentiment word decides: it has the largest attribution towards the verdict.
        assert sign * a == max(sign * x for x in attributions), (word, list(zip(tokens, attributions)))
    (neg,) = explain(client, ["The plot was not bad at all , I enjoyed it ."])
    tokens, attributions = neg["explanation"]["tokens"], neg["explanation"]["attributions"]
    assert neg["label"] == "positive" and attributions[tokens.index("enjoyed")] > 0


def test_an_explanation_split_into_queue_items_equals_the_whole(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.admission

    client = make_client()
    whole = explain(client, [TEXT, "good", OTHERS[0]], trace=True)
    monkeypatch.setattr(app.admission, "EXPLAIN_CHUNK_TOKENS", 3)  # TEXT's 11 tokens → 4 items with work
    items = work_items(TEXT, True, False, True, client.app.state.service.lifecycle.model)
    assert [r.explain_span for r, _ in items][:4] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert items[0][0].trace and not any(r.trace for r, _ in items[1:])  # the trace is computed once
    split = explain(client, [TEXT, "good", OTHERS[0]], trace=True)
    for a, b in zip(whole, split):
        assert b["explanation"]["tokens"] == a["explanation"]["tokens"]
        assert b["explanation"]["attributions"] == pytest.approx(a["explanation"]["attributions"], abs=1e-6)
        assert b["trace"]["tokens"] == a["trace"]["tokens"]
        assert b["trace"]["probabilities"] == pytest.approx(a["trace"]["probabilities"], abs=1e-5)
        assert b["probability"] == pytest.approx(a["probability"], abs=1e-5)
    client_small = make_client(max_explain_tokens=5)
    monkeypatch.setattr(app.admission, "EXPLAIN_CHUNK_TOKENS", 2)
    r = client_small.post("/v1/predict", json={"texts": ["the film was very good !"], "explain": "occlusion"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "explain_too_long"


def test_an_explanation_with_more_items_than_the_queue_holds_is_served_when_idle(
        make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.admission

    client = make_client(max_queue=8, max_texts=8)
    monkeypatch.setattr(app.admission, "EXPLAIN_CHUNK_TOKENS", 2)  # 16 items per long text
    r = client.post("/v1/predict", json={"texts": [TEXT] * 3, "explain": "occlusion"})
    assert r.status_code == 200, r.text


def test_one_letter_words_are_charged_as_words(client: TestClient) -> None:
    model = client.app.state.service.lifecycle.model
    hostile, prose = "a " * 30, "wonderful " * 6  # same characters, 30 vs 6 tokens (the tiny model reads 32)
    assert text_cost(hostile, False, model, explain=True) > 2 * text_cost(prose, False, model, explain=True)


def test_explained_requests_have_their_own_latency_label(client: TestClient) -> None:
    explain(client, ["good film"])
    client.post("/v1/predict", json={"texts": ["good film"]})
    metrics = client.get("/metrics").text
    assert 'sentiment_request_duration_seconds_count{route="/v1/predict (explain)",status="200"} 1.0' in metrics
    assert 'sentiment_request_duration_seconds_count{route="/v1/predict",status="200"} 1.0' in metrics
