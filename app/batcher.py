"""An asyncio micro-batcher: callers await their own futures; one worker runs batches off the loop.

It knows neither HTTP nor tensors: it gathers *items* from concurrent callers, hands a list of them
to a blocking ``process`` function in an executor, and gives every caller its own result or
exception. Policy:

* The worker takes everything queued (up to ``max_batch_size``) as soon as the model is free, so
  under load the batch grows by itself while the previous batch runs.
* A lone request at idle runs at once: the worker only lingers (up to ``max_wait_s``) for more
  items when the previous batch showed concurrent traffic (it had more than one item).
* The queue is bounded (``max_queue`` items); a submission that does not fit is refused whole with
  :class:`QueueFullError`, so a request is never half-queued.
* A cancelled caller (timeout, disconnect) leaves nothing behind: its items are skipped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)
log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue cannot take the submission now; retry later."""


class BatcherClosedError(RuntimeError):
    """The batcher is draining or stopped and takes no new work."""


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class BatchProcessor(Protocol[T_contra, R_co]):
    """What the batcher runs on its executor: items → one result per item, in order, each a value or
    the Exception for that item alone. (The service's is ``SentimentService.score_batch``.)"""

    def __call__(self, items: list[T_contra]) -> Sequence[R_co | Exception]: ...


BatchObserver = Callable[[int, list[float], float], None]  # (batch size, queue waits s, process s)


class MicroBatcher(Generic[T, R]):
    """Dynamic batching of items from concurrent callers into calls of ``process``."""

    def __init__(
        self,
        process: BatchProcessor[T, R],
        executor: Executor,
        max_batch_size: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be ≥ 1 and max_wait_s ≥ 0")
        self._process = process
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: collections.deque[_Pending[T]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._last_batch_size = 0

    @property
    def depth(self) -> int:
        """Items waiting in the queue (not yet in a running batch)."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        """True once :meth:`stop` was called: new submissions are refused."""
        return self._closing

    def start(self) -> None:
        """Start the worker task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def submit_many(self, items: Sequence[T]) -> list[R | Exception]:
        """Queue ``items`` together and wait for their outcomes, in order: each a result or the
        exception ``process`` gave for that item alone.

        Raises :class:`QueueFullError` when they do not fit and :class:`BatcherClosedError` when
        draining. Cancelling the awaiting task cancels the caller's items that have not started yet.
        """
        if self._closing:
            raise BatcherClosedError("the service is shutting down")
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFullError(f"queue is full ({len(self._queue)} of {self.max_queue} texts waiting)")
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future()) for item in items]
        self._queue.extend(pending)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending), return_exceptions=True))
        except BaseException:
            for p in pending:
                p.future.cancel()  # no-op for finished ones; queued ones get skipped
            raise

    async def stop(self, drain: bool = True) -> None:
        """Refuse new work; finish what is queued (``drain``) or fail it; stop the worker."""
        self._closing = True
        if not drain:
            while self._queue:
                p = self._queue.popleft()
                if not p.future.done():
                    p.future.set_exception(BatcherClosedError("the service is shutting down"))
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    def _take(self, batch: list[_Pending[T]]) -> None:
        while self._queue and len(batch) < self.max_batch_size:
            p = self._queue.popleft()
            if not p.future.done():  # cancelled callers leave no work behind
                batch.append(p)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch: list[_Pending[T]] = []
            self._take(batch)
            # Linger for more only when traffic is concurrent; a lone request never waits.
            if self._last_batch_size > 1 and len(batch) < self.max_batch_size and self.max_wait_s > 0:
                deadline = loop.time() + self.max_wait_s
                while len(batch) < self.max_batch_size and not self._closing:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
                    self._take(batch)
            if not batch:
                continue
            self._last_batch_size = len(batch)
            await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T]]) -> None:
        started = time.perf_counter()
        waits = [started - p.enqueued for p in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._process, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # the whole batch failed: every caller hears why, none hangs
            log.exception("batch of %d items failed", len(batch))
            results = [exc] * len(batch)
        elapsed = time.perf_counter() - started
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
