"""An asyncio micro-batcher: callers await their own futures; one worker runs batches off the loop.

It knows neither HTTP nor tensors: it gathers *items* from concurrent callers, hands a list of them
to a blocking ``process`` function in an executor, and gives every caller its own result or
exception. Policy:

* The worker takes what is queued (up to ``max_batch_size`` items and ``max_batch_cost``) as soon
  as the model is free, so under load the batch grows by itself while the previous batch runs.
* **Fairness, lanes, deadlines** (:mod:`app.lanes`): interactive work first, batch work with a bounded
  share; within a lane least-served submission first, so a one-word request goes into the very next
  batch however much others have queued. An item past its deadline is never handed out.
* A lone request at idle runs at once: the worker only lingers (up to ``max_wait_s``) for more
  items when the previous batch showed concurrent traffic (it had more than one item).
* **Batches in flight**: up to ``max_in_flight`` batches run at once (one per model-worker process);
  a new batch starts as soon as one of them is free, so each worker is fed while the others run.
  While another slot is also free, a batch takes at most its share of the outstanding work (queued
  + running items ÷ ``max_in_flight``): on CPU a batch costs about the sum of its texts, so one
  worker given all that is queued would make those callers wait for all of it while another worker
  idles. When this batch takes the last free slot it takes all that is queued (up to
  ``max_batch_size`` and ``max_batch_cost``): whatever it left behind would wait for a whole
  running batch to end, and those leftovers were the tail at high concurrency.
* **Admission by cost**: each item carries a cost (work, not a count); the queue is bounded in
  items and in cost (each lane on its own), and a submission that does not fit is refused whole with
  :class:`QueueFullError`, so a request is never half-queued. :meth:`estimated_wait_s` predicts the
  wait from the measured cost throughput, so callers can shed at once instead of timing out.
* A cancelled caller (timeout, disconnect, server shutdown) leaves nothing behind: its queued items
  are removed at once and stop counting in :attr:`depth` and :attr:`queued_cost`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from concurrent.futures import Executor
from typing import Callable, Generic, Protocol, Sequence, TypeVar

from app.fair_queue import Pending
from app.lanes import BATCH, INTERACTIVE, Lane, LaneQueue
from app.throughput import Throughput

T = TypeVar("T")
R = TypeVar("R")
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)
log = logging.getLogger(__name__)

class QueueFullError(RuntimeError):
    """The queue cannot take the submission now; retry later."""


class BatcherClosedError(RuntimeError):
    """The batcher is draining or stopped and takes no new work."""


class BatchProcessor(Protocol[T_contra, R_co]):
    """What the batcher runs on its executor: items → one result per item, in order, each a value or
    the Exception for that item alone. (The service's is ``SentimentService.score_batch``.)"""

    def __call__(self, items: list[T_contra]) -> Sequence[R_co | Exception]: ...


BatchObserver = Callable[[int, list[float], float], None]  # (batch size, queue waits s, process s)


class MicroBatcher(Generic[T, R]):
    """Dynamic, fair batching of items from concurrent callers into calls of ``process``."""

    def __init__(
        self,
        process: BatchProcessor[T, R],
        executor: Executor,
        max_batch_size: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
        on_batch: BatchObserver | None = None,
        max_queue_cost: float = math.inf,
        max_batch_cost: float = math.inf,
        max_in_flight: int = 1,
        batch_lane_share: float = 0.2,
        batch_lane_batch_cost: float = math.inf,
    ) -> None:
        if (max_batch_size < 1 or max_queue < 1 or max_in_flight < 1 or max_wait_s < 0 or max_queue_cost <= 0
                or max_batch_cost <= 0):
            raise ValueError("max_batch_size, max_queue, max_in_flight ≥ 1, max_wait_s ≥ 0 and costs > 0 are required")
        self._process = process
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_cost = max_queue_cost
        self.max_batch_cost = max_batch_cost
        self.max_in_flight = max_in_flight
        self._on_batch = on_batch
        self._queue: LaneQueue[T] = LaneQueue(batch_lane_share, batch_lane_batch_cost)
        self._ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._last_batch_size = 0
        # Running batches: id → (time.monotonic() at start, cost); their tasks.
        self._running: dict[int, tuple[float, float]] = {}
        self._running_items = 0
        self._batch_tasks: set[asyncio.Task] = set()
        self._throughput = Throughput(max_in_flight, max_batch_size, max_batch_cost)

    @property
    def depth(self) -> int:
        """Live items waiting in the queue (not yet in a running batch)."""
        return self._queue.depth

    @property
    def queued_cost(self) -> float:
        """Total cost of the live items waiting in the queue."""
        return self._queue.cost

    @property
    def lanes(self) -> LaneQueue[T]:
        """The queue by lane (:meth:`LaneQueue.configure` sets the lane policy)."""
        return self._queue

    @property
    def closed(self) -> bool:
        """True once :meth:`stop` was called: new submissions are refused."""
        return self._closing

    @property
    def task(self) -> asyncio.Task | None:
        """The worker task (the service watches it: a dead worker means no answers)."""
        return self._task

    @property
    def running_since(self) -> float | None:
        """``time.monotonic()`` when the oldest running batch started (None when none runs)."""
        return min((since for since, _ in self._running.values()), default=None)

    @property
    def in_flight(self) -> int:
        """Batches running now."""
        return len(self._running)

    @property
    def cost_per_s(self) -> float | None:
        """Best recent throughput, in cost units per second, of all batch slots together."""
        return self._throughput.cost_per_s

    def estimated_wait_s(self, extra_cost: float = 0.0, lane: Lane = INTERACTIVE) -> float:
        """Predicted time until ``extra_cost`` more work of ``lane`` would be done (0 before any measurement)."""
        return self._throughput.wait_s(self._running.values(), self._queue.cost_ahead(lane), extra_cost)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return not self._running and not self._queue

    def start(self) -> None:
        """Start the worker task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def submit_many(self, items: Sequence[T], costs: Sequence[float] | None = None, lane: Lane = INTERACTIVE,
                          deadline: float | None = None) -> list[R | Exception]:
        """Queue ``items`` together in ``lane`` and wait for their outcomes, in order: each a result or
        the exception ``process`` gave for that item alone. ``costs`` (default 1 each) is their work;
        an item still queued at ``deadline`` (``time.monotonic()``) fails with DeadlineExceededError.

        Raises :class:`QueueFullError` when they do not fit and :class:`BatcherClosedError` when
        draining. Cancelling the awaiting task removes the caller's items that have not started.
        """
        costs = [1.0] * len(items) if costs is None else list(costs)
        if self._closing:
            raise BatcherClosedError("the service is shutting down")
        total = sum(costs)
        # An empty lane takes any one submission (an explained text is several items), so a valid
        # request on an idle service is never refused; each lane has its own bounds.
        queue = self._queue.lanes[lane]
        if queue.depth and queue.depth + len(items) > self.max_queue:
            raise QueueFullError(f"queue is full ({queue.depth} of {self.max_queue} items waiting)")
        if queue.depth and queue.cost + total > self.max_queue_cost:
            raise QueueFullError(f"queue is full ({queue.cost:.0f} of {self.max_queue_cost:.0f} work units waiting)")
        loop = asyncio.get_running_loop()
        group = next(self._ids)
        pending = [Pending(item, loop.create_future(), cost, group, lane=lane, deadline=deadline)
                   for item, cost in zip(items, costs)]
        self._queue.add(lane, group, pending)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending), return_exceptions=True))
        except BaseException:
            self._queue.forget(group)  # its waiting items go now, so depth and cost count live work only
            for p in pending:
                p.future.cancel()  # no-op for finished ones
            raise

    async def stop(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Refuse new work; finish what is queued (``drain``) or fail it; stop the worker.

        With ``timeout_s``, the drain is bounded: what is still queued then fails with
        :class:`BatcherClosedError` (a running batch cannot be interrupted; it is not waited for).
        """
        self._closing = True
        if not drain:
            self._fail_queued()
        self._wakeup.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain did not finish within %.1fs; failing %d queued texts", timeout_s, self._queue.depth)
            self._fail_queued()
        except Exception:  # the worker had already died (logged by whoever watches it)
            pass
        self._task = None

    def _fail_queued(self, reason: str = "the service is shutting down") -> None:
        for group in self._queue.groups():
            for p in self._queue.forget(group):
                if not p.future.done():
                    p.future.set_exception(BatcherClosedError(reason))

    def _limits(self, taken: int = 0, taken_cost: float = 0.0) -> tuple[int, float]:
        """Most items and most cost for the next batch (``taken`` items of ``taken_cost`` already in
        it). The last free slot takes up to ``max_batch_size`` / ``max_batch_cost``; while other
        slots are free too, a batch takes no more than an even share, in items and in cost, of the
        outstanding work (queued + running): batches of equal work take equal time."""
        if len(self._running) >= self.max_in_flight - 1:
            return self.max_batch_size, self.max_batch_cost
        share = math.ceil((self._queue.depth + self._running_items + taken) / self.max_in_flight)
        running_cost = sum(c for _, c in self._running.values())
        cost_share = (self._queue.cost + running_cost + taken_cost) / self.max_in_flight
        return max(1, min(self.max_batch_size, share)), min(self.max_batch_cost, cost_share)

    def _take(self, batch: list[Pending[T]]) -> None:
        """Add items (by lane, least-served submission first) until the batch is full (count or cost)."""
        cost = sum(p.cost for p in batch)
        limit, cost_limit = self._limits(len(batch), cost)
        limit = max(len(batch), limit)
        now = time.monotonic()
        room = self._queue.batch_lane_room(now, cost if batch and batch[0].lane == BATCH else 0.0)
        while len(batch) < limit and (not batch or cost < cost_limit):
            p = self._queue.pop(now, batch[0].lane if batch else None, room)  # one lane per batch
            if p is None:
                break
            batch.append(p)
            cost += p.cost
            room -= p.cost if p.lane == BATCH else 0.0

    async def _run(self) -> None:
        try:
            await self._loop()
        except BaseException:
            # A bug in the worker itself: nobody would ever answer the queued callers, so fail them now.
            self._closing = True
            self._fail_queued("the batch worker stopped")
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and self._closing:
                # Draining: what is queued has been handed out; wait for the batches still running.
                while self._batch_tasks:
                    await asyncio.wait(set(self._batch_tasks))
                return
            if not self._queue or len(self._running) >= self.max_in_flight:
                self._wakeup.clear()
                await self._wakeup.wait()  # set by a submission, a finished batch, or stop()
                continue
            batch: list[Pending[T]] = []
            self._take(batch)
            # Linger for more only when traffic is concurrent; a lone request never waits.
            if self._last_batch_size > 1 and len(batch) < self._limits(len(batch))[0] and self.max_wait_s > 0:
                deadline = loop.time() + self.max_wait_s
                while len(batch) < self._limits(len(batch))[0] and not self._closing:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
                    self._take(batch)
            batch = self._queue.live(batch, time.monotonic())  # none whose deadline passed while it gathered
            if not batch:
                continue
            self._last_batch_size = len(batch)
            batch_id = next(self._ids)
            self._running[batch_id] = (time.monotonic(), sum(p.cost for p in batch))
            self._running_items += len(batch)
            task = loop.create_task(self._run_batch(loop, batch_id, batch), name="micro-batch")
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task) -> None:
        self._batch_tasks.discard(task)
        self._wakeup.set()  # a slot is free
        if not task.cancelled() and task.exception() is not None:  # a bug in _run_batch itself
            log.error("batch task failed", exc_info=task.exception())

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch_id: int, batch: list[Pending[T]]) -> None:
        started = time.perf_counter()
        waits = [started - p.enqueued for p in batch]
        cost = self._running[batch_id][1]
        try:
            results = await loop.run_in_executor(self._executor, self._process, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # the whole batch failed: every caller hears why, none hangs
            log.exception("batch of %d items failed", len(batch))
            results = [exc] * len(batch)
        finally:
            del self._running[batch_id]
            self._running_items -= len(batch)
        elapsed = time.perf_counter() - started
        self._throughput.record(len(batch), cost, elapsed)
        for p, result in zip(batch, results):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch), waits, elapsed)
            except Exception:  # metrics must never break serving
                log.exception("batch observer failed")
