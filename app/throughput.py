"""The batcher's measured throughput, and the wait it predicts for new work (admission sheds on it)."""

from __future__ import annotations

import collections
import time
from typing import Iterable

# Throughput for the wait estimate: the best cost rate of the last RATE_WINDOW batches that held at
# least min(max_batch_size, RATE_MIN_ITEMS) items or reached max_batch_cost. Small batches are
# dominated by fixed overhead (one short text alone costs ~30× its share of a batch of 64) and would
# overstate waits; the best recent rate errs the other way, so a request is shed only when even
# that rate cannot serve it in time.
RATE_WINDOW = 32
RATE_MIN_ITEMS = 8


class Throughput:
    """Cost served per second by ``slots`` batches running side by side."""

    def __init__(self, slots: int, max_batch_size: int, max_batch_cost: float) -> None:
        self.slots = slots
        self._min_items = min(max_batch_size, RATE_MIN_ITEMS)
        self._max_batch_cost = max_batch_cost
        self._rates: collections.deque[float] = collections.deque(maxlen=RATE_WINDOW)

    def record(self, items: int, cost: float, seconds: float) -> None:
        """One finished batch; only batches big enough to be representative are kept."""
        if seconds > 0 and (items >= self._min_items or cost >= self._max_batch_cost):
            self._rates.append(cost / seconds)

    @property
    def cost_per_s(self) -> float | None:
        """Best recent throughput of all slots together (None before a representative batch)."""
        return max(self._rates) * self.slots if self._rates else None

    def wait_s(self, running: Iterable[tuple[float, float]], queued_cost: float, extra_cost: float = 0.0) -> float:
        """Predicted time until ``extra_cost`` more work would be done: what is queued plus the rest
        of the ``running`` batches (``(time.monotonic() at start, cost)`` each); 0 before any
        representative batch was measured."""
        rate = self.cost_per_s
        if not rate:
            return 0.0
        slot_rate = rate / self.slots
        now = time.monotonic()
        running_left = sum(max(0.0, cost - slot_rate * (now - since)) for since, cost in running)
        return (running_left + queued_cost + extra_cost) / rate
