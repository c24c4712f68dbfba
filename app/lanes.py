"""The batcher's queue in two lanes, interactive and batch, and the deadlines of the items in it.

* **Within a lane**, items are handed out least-served request first (:class:`app.fair_queue.FairQueue`).
* **Between lanes**, weighted fair queuing by cost (start-time fair queuing, as within a lane): each
  lane has a virtual time that advances by the cost it is served ÷ its weight, and the lane with the
  smaller one goes next, interactive on a tie. The batch lane's weight is ``batch_share``: while
  both lanes have work waiting it gets that share of the work served, so it is never starved, and
  the interactive lane gets the rest; a lane alone gets everything. A lane that was idle starts at
  the virtual time of the last item served (no credit for having been away), so an interactive
  request that arrives while batch work streams through is the very next item handed out.
* **One lane per batch, and small batch-lane batches while interactive work is about**: on CPU a
  batch costs about the sum of its texts and cannot be interrupted, so an interactive request waits
  for a worker to finish its batch and then for its own batch. Its own batch therefore holds only
  interactive work, and while interactive work is waiting or arrived within
  ``INTERACTIVE_RECENT_S``, a batch stops taking batch-lane work once it holds
  ``batch_lane_batch_cost`` of it, so batch-lane batches stay short and a worker frees up soon; at
  other times batch work is batched as usual (large batches are more efficient per text).
* **Deadlines**: :meth:`LaneQueue.pop` never hands out an item whose deadline has passed: that
  request's waiting items are dropped, and its caller's futures get :class:`DeadlineExceededError`.
"""

from __future__ import annotations

import math
import time
from typing import Generic, Iterator, Literal, TypeVar

from app.fair_queue import FairQueue, Pending

T = TypeVar("T")
Lane = Literal["interactive", "batch"]
INTERACTIVE: Lane = "interactive"
BATCH: Lane = "batch"
LANES: tuple[Lane, ...] = (INTERACTIVE, BATCH)
# How long after an interactive request arrived batch-lane batches stay small. An interactive client
# sends its next request within this time (a person or a front end paging through results); a longer
# window would only cost batch work throughput once interactive traffic has stopped.
INTERACTIVE_RECENT_S = 1.0


class DeadlineExceededError(RuntimeError):
    """The item's deadline passed while it waited in the queue; it was never handed out."""


class LaneQueue(Generic[T]):
    """Queued items of both lanes; :attr:`depth` and :attr:`cost` count only what is still waiting."""

    def __init__(self, batch_share: float = 0.2, batch_lane_batch_cost: float = math.inf) -> None:
        self.lanes: dict[Lane, FairQueue[T]] = {lane: FairQueue() for lane in LANES}
        self._lane_of: dict[int, Lane] = {}  # submission → its lane, while it has items waiting
        self._vtime: dict[Lane, float] = {lane: 0.0 for lane in LANES}
        self._served_vtime = 0.0  # the virtual time of the last item handed out
        self._last_interactive = -math.inf
        self.configure(batch_share, batch_lane_batch_cost)

    def configure(self, batch_share: float, batch_lane_batch_cost: float) -> None:
        """Set the batch lane's share of served work (0 < share < 1) and its batch cost cap."""
        if not 0 < batch_share < 1 or batch_lane_batch_cost <= 0:
            raise ValueError("0 < batch_share < 1 and batch_lane_batch_cost > 0 are required")
        self._weight = {INTERACTIVE: 1.0 - batch_share, BATCH: batch_share}
        self.batch_lane_batch_cost = batch_lane_batch_cost

    def __bool__(self) -> bool:
        return any(self.lanes.values())

    @property
    def depth(self) -> int:
        return sum(q.depth for q in self.lanes.values())

    @property
    def cost(self) -> float:
        return sum(q.cost for q in self.lanes.values())

    def depth_of(self, lane: Lane) -> int:
        return self.lanes[lane].depth

    def cost_of(self, lane: Lane) -> float:
        return self.lanes[lane].cost

    def cost_ahead(self, lane: Lane) -> float:
        """Queued work that new work of ``lane`` waits behind: its own lane's, and for the batch lane
        the interactive lane's too (which goes first)."""
        return self.lanes[INTERACTIVE].cost + (self.lanes[BATCH].cost if lane == BATCH else 0.0)

    def add(self, lane: Lane, group: int, pending: list[Pending[T]]) -> None:
        """Queue one submission's items (each with ``lane`` and its deadline set) in ``lane``."""
        queue = self.lanes[lane]
        if not queue:  # an idle lane starts level with what is being served: no credit for its absence
            self._vtime[lane] = max(self._vtime[lane], self._served_vtime)
        if lane == INTERACTIVE:
            self._last_interactive = time.monotonic()
        queue.add(group, pending)
        self._lane_of[group] = lane

    def forget(self, group: int) -> list[Pending[T]]:
        """Drop a submission's waiting items (cancelled, expired, or failed at shutdown); they are returned."""
        lane = self._lane_of.pop(group, None)
        return self.lanes[lane].forget(group) if lane is not None else []

    def groups(self) -> Iterator[int]:
        """The submissions with items waiting."""
        return iter(list(self._lane_of))

    def batch_lane_room(self, now: float, taken: float) -> float:
        """How much more batch-lane work a batch that holds ``taken`` of it may take now."""
        if self.lanes[INTERACTIVE] or now - self._last_interactive < INTERACTIVE_RECENT_S:
            return self.batch_lane_batch_cost - taken
        return math.inf

    def pop(self, now: float, only: Lane | None = None, batch_room: float = math.inf) -> Pending[T] | None:
        """The next live item (None when nothing may go): from lane ``only`` when given (the lane of the
        batch being filled), else from the lane with the smaller virtual time; from the batch lane only
        while ``batch_room`` > 0. Items past their deadline are dropped on the way, with the rest of
        their request."""
        while True:
            ready = [lane for lane in LANES if self.lanes[lane] and only in (None, lane)
                     and (lane != BATCH or batch_room > 0)]
            if not ready:
                return None
            lane = min(ready, key=lambda name: self._vtime[name])  # LANES order: interactive wins a tie
            queue = self.lanes[lane]
            p = queue.pop()
            assert p is not None
            if p.group not in queue:
                self._lane_of.pop(p.group, None)
            if p.future.done():  # its caller has its answer already (it cannot be waiting for this item)
                continue
            if p.deadline is not None and p.deadline <= now:
                expire([p, *self.forget(p.group)])
                continue
            self._served_vtime = self._vtime[lane]
            self._vtime[lane] += p.cost / self._weight[lane]
            return p

    def live(self, batch: list[Pending[T]], now: float) -> list[Pending[T]]:
        """``batch`` without the items whose deadline passed while it gathered (their requests' other
        waiting items go too)."""
        late = [p for p in batch if p.deadline is not None and p.deadline <= now]
        for group in {p.group for p in late}:
            late += self.forget(group)
        expire(late)
        return [p for p in batch if p.deadline is None or p.deadline > now]


def expire(items: list[Pending[T]]) -> None:
    """Tell the callers of ``items`` that their deadline passed before the items were handed out."""
    for p in items:
        if not p.future.done():
            p.future.set_exception(DeadlineExceededError("the request's deadline passed while it was queued"))
