"""The engine's forward passes: length-bucketed, within the token budget, and invisible in the results."""

from __future__ import annotations

import random

import pytest

from app.engine import MIN_PASS_ROWS, PASS_LENGTH_RATIO, ScoreRequest, SentimentEngine
from tests.conftest import TINY_WORDS


def test_passes_group_similar_lengths_within_the_token_budget(tiny_artifacts) -> None:
    engine = SentimentEngine.load(tiny_artifacts, "cpu", max_batch_tokens=200)
    rng = random.Random(3)
    lengths = [rng.randint(1, 32) for _ in range(100)]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks = engine._chunks(order, lengths)
    assert [i for c in chunks for i in c] == order  # every text once, in length order
    for c in chunks:
        longest, shortest = lengths[c[-1]], lengths[c[0]]
        assert len(c) * longest <= 200 or len(c) == 1
        # Past MIN_PASS_ROWS texts, a pass never mixes lengths more than PASS_LENGTH_RATIO apart.
        assert all(lengths[i] <= PASS_LENGTH_RATIO * shortest for i in c[MIN_PASS_ROWS:])
    assert len(chunks) > 1


def test_bucketed_batch_equals_each_text_alone(tiny_artifacts) -> None:
    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    rng = random.Random(5)
    texts = [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(1, 40))) for _ in range(50)]
    requests = [ScoreRequest(e, trace=True) for e in engine.encode(texts)]
    before = engine.forward_passes
    together = engine.predict(requests)
    assert engine.forward_passes - before > 1  # the batch really was split by length
    for req, score in zip(requests, together):
        alone = engine.predict([req])[0]
        assert score.probability == pytest.approx(alone.probability, abs=1e-5)
        assert score.trace == pytest.approx(alone.trace, abs=1e-5)
