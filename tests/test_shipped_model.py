"""The shipped model in model_artifacts/: loadable, documented, small, and right on clear reviews."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import SHIPPED, shipped_available
from tests.test_api import wait_ready

pytestmark = pytest.mark.skipif(not shipped_available(), reason="no shipped model in model_artifacts/")

CLEAR = {
    "One of the best films I have seen in years. Brilliant acting, a moving story, and a perfect ending.": 1,
    "A masterpiece. I laughed, I cried, and I will watch it again and again. Highly recommended!": 1,
    "Wonderful performances from the whole cast; the direction is superb and the music unforgettable.": 1,
    "Utterly boring. The plot makes no sense, the acting is wooden and I wanted my money back.": 0,
    "The worst movie I have ever seen. Awful script, terrible dialogue, a complete waste of time.": 0,
    "I fell asleep halfway through. Dull, predictable and badly acted. Avoid this one.": 0,
}


def test_model_card_reports_the_full_test_set() -> None:
    card = json.loads((SHIPPED / "model_card.json").read_text())
    test = card["metrics"]["test"]
    assert test["n"] == 25_000
    assert test["accuracy"] >= 0.925  # issue 12's bar (the TF-IDF + logistic regression baseline: 0.906)
    # Validated on movies that no training review shares (IMDB's test movies are disjoint from train's).
    assert card["data"]["split"]["kind"] == "movie" and card["metrics"]["validation"]["split"] == "movie"
    assert set(test) >= {"accuracy", "precision", "recall", "f1", "confusion_matrix"}
    assert card["data"]["archive_sha256"] and card["training"]["hardware"]
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 30 * 1024 * 1024


def test_shipped_model_is_right_on_clear_reviews_and_its_trace_moves() -> None:
    with TestClient(create_app(Settings(artifacts_dir=SHIPPED))) as client:
        wait_ready(client, timeout=60)
        r = client.post("/v1/predict", json={"texts": list(CLEAR), "trace": True})
        assert r.status_code == 200
        preds = r.json()["predictions"]
        assert [int(p["label"] == "positive") for p in preds] == list(CLEAR.values())
        for p in preds:
            trace = p["trace"]["probabilities"]
            assert trace[-1] == pytest.approx(p["probability"], abs=1e-6)
            assert max(trace) - min(trace) > 0.1  # the running sentiment really moves as it reads
        info = client.get("/v1/model").json()
        assert info["metrics"]["test"]["accuracy"] >= 0.925
