"""The batcher's queue: waiting items grouped by submission, handed out least-served submission first.

Start-time fair queuing by cost: the next item always comes from the waiting submission that has
been served the least work so far, and a newcomer starts level with the least-served one (no credit
for having been away). So a one-word request goes into the very next batch however much work other
callers have queued, and heavy callers share the model in proportion to nothing but their turn.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import time
from dataclasses import dataclass, field
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


@dataclass
class Pending(Generic[T]):
    """One queued item and the future its caller awaits."""

    item: T
    future: asyncio.Future
    cost: float
    group: int  # which submission it came from (fairness, cancellation)
    enqueued: float = field(default_factory=time.perf_counter)
    lane: str = "interactive"  # app.lanes: which lane it waits in
    deadline: float | None = None  # time.monotonic() after which it must not be handed out


class FairQueue(Generic[T]):
    """Items of live submissions; :attr:`depth` and :attr:`cost` count only what is still waiting."""

    def __init__(self) -> None:
        # submission id → its items not yet taken; work served to it so far; who is next (least served).
        self._groups: dict[int, collections.deque[Pending[T]]] = {}
        self._served: dict[int, float] = {}
        self._turns: list[tuple[float, int]] = []  # heap of (served, group); stale entries are skipped
        self.depth = 0
        self.cost = 0.0

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __contains__(self, group: int) -> bool:
        """Whether the submission still has items waiting."""
        return group in self._groups

    def add(self, group: int, pending: list[Pending[T]]) -> None:
        """Queue one submission's items, in order."""
        self._groups[group] = collections.deque(pending)
        self._served[group] = min((self._served[g] for g in self._groups if g != group), default=0.0)
        heapq.heappush(self._turns, (self._served[group], group))
        self.depth += len(pending)
        self.cost += sum(p.cost for p in pending)

    def forget(self, group: int) -> list[Pending[T]]:
        """Drop a submission's waiting items (cancelled, or failed at shutdown); they are returned."""
        left = self._groups.pop(group, None)
        self._served.pop(group, None)
        if not left:
            return []
        self.depth -= len(left)
        self.cost -= sum(p.cost for p in left)
        if not self._groups:
            self.cost = 0.0
            self._turns.clear()
        return list(left)

    def groups(self) -> Iterator[int]:
        """The submissions with items waiting."""
        return iter(list(self._groups))

    def pop(self) -> Pending[T] | None:
        """The next item of the least-served submission (None when nothing waits)."""
        while self._turns:
            served, group = heapq.heappop(self._turns)
            items = self._groups.get(group)
            if items is None or self._served.get(group) != served:
                continue  # a cancelled submission, or an outdated turn
            p = items.popleft()
            self.depth -= 1
            self.cost -= p.cost
            if items:
                self._served[group] = served + p.cost
                heapq.heappush(self._turns, (served + p.cost, group))
            else:
                del self._groups[group]
                del self._served[group]
            if not self._groups:
                self.cost = 0.0  # no float drift when the queue empties
                self._turns.clear()
            return p
        return None
