"""The engine's one scoring entry: raw texts in, one result or one error per text out."""

from __future__ import annotations

import random

import pytest

from sentiment.engine import EmptyTextError, Score, ScoreRequest, SentimentEngine
from tests.conftest import TINY_WORDS


def test_bucketed_batch_equals_each_text_alone(tiny_artifacts) -> None:
    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    rng = random.Random(5)
    texts = [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(1, 40))) for _ in range(50)]
    requests = [ScoreRequest(t, trace=True) for t in texts]
    together = engine.score(requests)
    assert together.forward_passes > 1  # the batch really was split by length
    assert together.tokenize_seconds > 0 and together.forward_seconds > 0 and not together.errors
    for req, score in zip(requests, together.results):
        alone = engine.score([req]).results[0]
        assert isinstance(score, Score) and isinstance(alone, Score)
        assert score.probability == pytest.approx(alone.probability, abs=1e-5)
        assert score.trace == pytest.approx(alone.trace, abs=1e-5)
        assert score.trace[-1] == pytest.approx(score.probability, abs=1e-6)


def test_a_bad_text_fails_alone(tiny_artifacts) -> None:
    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    batch = engine.score([ScoreRequest("good film"), ScoreRequest("<br /><br />"), ScoreRequest("bad movie")])
    assert batch.errors == [1] and isinstance(batch.results[1], EmptyTextError)
    alone = engine.score([ScoreRequest("bad movie")]).results[0]
    assert batch.results[2].probability == pytest.approx(alone.probability, abs=1e-6)


def test_a_failing_forward_pass_is_retried_text_by_text(tiny_artifacts) -> None:
    class Flaky(SentimentEngine):
        def _forward(self, encoded, requests):
            if any(e.tokens == ["awful"] for e in encoded):
                raise RuntimeError("boom")
            return super()._forward(encoded, requests)

    engine = Flaky.load(tiny_artifacts, "cpu")
    batch = engine.score([ScoreRequest("good"), ScoreRequest("awful"), ScoreRequest("bad")])
    assert batch.errors == [1] and str(batch.results[1]) == "boom"
    assert all(isinstance(batch.results[i], Score) for i in (0, 2))


def test_max_tokens_only_tightens_the_trained_limit(tiny_artifacts) -> None:
    assert SentimentEngine.load(tiny_artifacts, "cpu").max_tokens == 32
    assert SentimentEngine.load(tiny_artifacts, "cpu", max_tokens=8).max_tokens == 8
    assert SentimentEngine.load(tiny_artifacts, "cpu", max_tokens=1000).max_tokens == 32
    score = SentimentEngine.load(tiny_artifacts, "cpu", max_tokens=8).score([ScoreRequest("good " * 20)]).results[0]
    assert score.num_tokens == 8 and score.truncated and score.total_tokens == 20


def test_a_text_the_tokenizer_cannot_take_fails_alone(tiny_artifacts) -> None:
    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    texts = ["good film", "bad \ud800 movie", "awful"]  # spaCy cannot hash a lone surrogate
    batch = engine.score([ScoreRequest(t) for t in texts])
    assert batch.errors == [1] and isinstance(batch.results[1], UnicodeError)
    for i in (0, 2):
        alone = engine.score([ScoreRequest(texts[i])]).results[0]
        assert batch.results[i].probability == pytest.approx(alone.probability, abs=1e-6)


@pytest.mark.parametrize("precision, bound", [("bf16", 0.05), ("int8", 0.05)])
def test_cheaper_precisions_stay_close_to_fp32(tiny_artifacts, precision: str, bound: float) -> None:
    from sentiment.artifacts import cpu_has_bf16

    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no AVX-512 BF16 or AMX (see test_bf16_is_refused_without_bf16_instructions)")
    texts = ["good", "the movie was awful !", "a great film , the film was good . " * 4]
    exact = SentimentEngine.load(tiny_artifacts, "cpu", precision="fp32").score([ScoreRequest(t, trace=True) for t in texts]).results
    cheap_engine = SentimentEngine.load(tiny_artifacts, "cpu", precision=precision)
    assert cheap_engine.precision == precision
    cheap = cheap_engine.score([ScoreRequest(t, trace=True) for t in texts]).results
    for e, c in zip(exact, cheap):
        assert abs(e.probability - c.probability) <= bound
        assert len(c.trace) == e.num_tokens and max(abs(a - b) for a, b in zip(e.trace, c.trace)) <= bound
        assert c.trace[-1] == pytest.approx(c.probability, abs=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_is_batch_invariant_bit_for_bit(tiny_artifacts, threads: int) -> None:
    """A text's bf16 probability, trace and explanation are the same bits alone, beside longer and
    shorter neighbours (so at any padding) and in batches of any size, on one torch thread or two."""
    import random

    import torch

    from sentiment.artifacts import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no AVX-512 BF16 or AMX (see test_bf16_is_refused_without_bf16_instructions)")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = SentimentEngine.load(tiny_artifacts, "cpu", precision="bf16")
        rng = random.Random(threads)
        words = ["good", "bad", "film", "movie", "great", "awful", "the", "was", ",", ".", "not", "plot"]
        texts = [" ".join(rng.choices(words, k=rng.randint(1, 120))) for _ in range(70)]
        alone = [engine.score([ScoreRequest(t, trace=True)]).results[0] for t in texts]
        for size in (2, 17, 64):
            order = rng.sample(range(len(texts)), size)
            batch = engine.score([ScoreRequest(texts[i], trace=True) for i in order]).results
            for i, got in zip(order, batch):
                assert got.probability == alone[i].probability and got.trace == alone[i].trace
        explained = ScoreRequest(texts[3], explain=True)
        solo = engine.score([explained]).results[0].explanation
        mixed = engine.score([ScoreRequest(texts[5]), explained, ScoreRequest(texts[9], trace=True)]).results[1].explanation
        assert solo == mixed
    finally:
        torch.set_num_threads(before)


def test_unknown_precision_is_refused(tiny_artifacts) -> None:
    with pytest.raises(ValueError, match="precision must be auto or one of fp32, bf16, int8"):
        SentimentEngine.load(tiny_artifacts, "cpu", precision="fp8")


def test_model_endpoint_reports_precision_and_workers(make_client) -> None:
    info = make_client(precision="int8").get("/v1/model").json()  # int8 runs on any CPU; bf16 may not
    assert info["precision"] == "int8" and info["workers"] == 0


def test_bf16_is_refused_without_bf16_instructions(tiny_artifacts, monkeypatch) -> None:
    monkeypatch.setattr("sentiment.engine.cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="AVX-512 BF16 or AMX"):
        SentimentEngine.load(tiny_artifacts, "cpu", precision="bf16")


def test_warm_up_caches_the_vocabulary_words_and_changes_no_token(tiny_artifacts) -> None:
    from sentiment.text import Tokenizer

    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    words = engine.artifacts.vocab.itos[2:]
    assert not set(words) & set(engine.encoder.tokenizer.cached_words)
    engine.warm_up()
    assert set(words) <= set(engine.encoder.tokenizer.cached_words)
    texts = [" ".join(words[i:i + 7]) + "!" for i in range(0, len(words), 7)]
    plain = Tokenizer(engine.artifacts.vocab.settings, keep_recent_words=False)
    assert engine.encoder.tokenizer.tokenize_many(texts) == [plain.tokenize_whole(t) for t in texts]
