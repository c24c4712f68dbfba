"""Length bucketing, the one algorithm training, evaluation and serving share."""

from __future__ import annotations

import random

from sentiment.batching import length_buckets


def test_training_batches_cover_everything_with_little_padding() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    batches = length_buckets(lengths, 32, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste / sum(lengths) < 0.1
    assert length_buckets(lengths, 32, seed=3) == batches  # reproducible per seed
    assert length_buckets(lengths, 32, seed=4) != batches  # and a new order per epoch


def test_serving_passes_group_similar_lengths_within_the_token_budget() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(1, 32) for _ in range(100)]
    chunks = length_buckets(lengths, max_padded_tokens=200, max_length_ratio=1.5, min_rows=4)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    assert [i for c in chunks for i in c] == order  # every text once, in length order
    for c in chunks:
        longest, shortest = lengths[c[-1]], lengths[c[0]]
        assert len(c) * longest <= 200 or len(c) == 1
        # Past min_rows texts, a pass never mixes lengths more than the ratio apart.
        assert all(lengths[i] <= 1.5 * shortest for i in c[4:])
    assert len(chunks) > 1


def test_a_text_longer_than_the_budget_gets_a_pass_of_its_own() -> None:
    assert length_buckets([5, 500, 6], max_padded_tokens=100) == [[0, 2], [1]]
    assert length_buckets([]) == []
