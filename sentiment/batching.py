"""Length bucketing: group texts of similar length so that padded batches waste little work.

One algorithm for training (shuffled pools of fixed-size batches), evaluation and serving (sorted,
cut by a padded-token budget and a length ratio). On CPU an LSTM step costs about the same per row
whether the row is real or padding, so a batch padded to its longest text wastes the difference.
"""

from __future__ import annotations

import math
import random
from typing import Sequence


def length_buckets(
    lengths: Sequence[int],
    max_rows: int | None = None,
    *,
    max_padded_tokens: float = math.inf,
    max_length_ratio: float = math.inf,
    min_rows: int = 1,
    seed: int | None = None,
    pool_batches: int = 50,
) -> list[list[int]]:
    """Cut the indices of ``lengths`` into batches of similar length; every index exactly once.

    Indices are sorted by length (ascending) and cut into consecutive batches. A batch ends when it
    holds ``max_rows`` indices, when the next text would take it past ``max_padded_tokens`` padded
    tokens (rows × longest), or, once it holds ``min_rows`` indices, when the next text is more than
    ``max_length_ratio`` × its shortest.

    With a ``seed`` (training) the indices are first shuffled and sorted within pools of
    ``pool_batches × max_rows`` only, and the batches are shuffled, so every epoch sees a new order.
    Without one (evaluation, serving) the result is deterministic: one sorted pool, batches in order.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
        pool = (max_rows or len(order) or 1) * pool_batches
    else:
        pool = len(order) or 1
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        current: list[int] = []
        for i in sorted(order[start : start + pool], key=lambda i: lengths[i]):
            # Sorted ascending, so the newest item is the longest: padded size = rows × its length.
            full = max_rows is not None and len(current) >= max_rows
            too_big = (len(current) + 1) * lengths[i] > max_padded_tokens
            too_long = len(current) >= min_rows and lengths[i] > max_length_ratio * lengths[current[0]] if current else False
            if current and (full or too_big or too_long):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    if seed is not None:
        rng.shuffle(batches)
    return batches
