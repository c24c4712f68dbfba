"""The micro-batcher alone: batching under load, no delay at idle, bounded queue, cancellation, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batcher import BatcherClosedError, MicroBatcher, QueueFullError


class Recorder:
    """A process function that doubles numbers, records batch sizes and can be slowed or blocked."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[int]) -> list[object]:
        self.gate.wait(5)
        time.sleep(self.delay)
        self.batches.append(list(items))
        return [ValueError(f"bad item {x}") if x < 0 else x * 2 for x in items]


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1) as ex:
        yield ex


async def test_concurrent_callers_share_batches_and_get_their_own_results(executor) -> None:
    rec = Recorder(delay=0.02)
    batcher = MicroBatcher(rec, executor, max_batch_size=16, max_wait_s=0.005, max_queue=1000)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit_many([i, i + 1000]) for i in range(100)))
    assert results == [[2 * i, 2 * (i + 1000)] for i in range(100)]
    assert max(len(b) for b in rec.batches) == 16 and len(rec.batches) < 40
    await batcher.stop()


async def test_lone_request_does_not_wait_for_the_batch_delay(executor) -> None:
    rec = Recorder()
    batcher = MicroBatcher(rec, executor, max_batch_size=64, max_wait_s=0.5, max_queue=100)
    batcher.start()
    for _ in range(3):  # sequential callers: never concurrent, so never delayed
        started = time.perf_counter()
        assert await batcher.submit_many([1]) == [2]
        assert time.perf_counter() - started < 0.25  # far below the 0.5 s linger
    await batcher.stop()


async def test_full_queue_refuses_whole_submission(executor) -> None:
    rec = Recorder()
    rec.gate.clear()  # block the model so that the queue fills
    batcher = MicroBatcher(rec, executor, max_batch_size=2, max_wait_s=0, max_queue=4)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit_many([1, 2]))  # taken by the (blocked) worker
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(batcher.submit_many([3, 4, 5]))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFullError):
        await batcher.submit_many([6, 7])  # 3 queued + 2 > 4
    assert batcher.depth == 3  # the refused request left nothing in the queue
    rec.gate.set()
    assert await first == [2, 4] and await queued == [6, 8, 10]
    await batcher.stop()


async def test_cancelled_caller_leaves_no_work_behind(executor) -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher = MicroBatcher(rec, executor, max_batch_size=8, max_wait_s=0, max_queue=100)
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit_many([1]))
    await asyncio.sleep(0.05)
    doomed = asyncio.ensure_future(batcher.submit_many([100, 101]))
    survivor = asyncio.ensure_future(batcher.submit_many([5]))
    await asyncio.sleep(0.01)
    doomed.cancel()
    rec.gate.set()
    assert await blocker == [2] and await survivor == [10]
    assert all(100 not in b and 101 not in b for b in rec.batches)
    await batcher.stop()


async def test_an_item_error_reaches_only_its_caller(executor) -> None:
    batcher = MicroBatcher(Recorder(delay=0.01), executor, max_batch_size=8, max_wait_s=0.01, max_queue=100)
    batcher.start()
    good, bad = await asyncio.gather(batcher.submit_many([3]), batcher.submit_many([4, -1]))
    assert good == [6]
    assert bad[0] == 8 and isinstance(bad[1], ValueError)  # per-item outcome, the neighbour still answered
    await batcher.stop()


async def test_a_crashing_batch_fails_every_caller_instead_of_hanging(executor) -> None:
    def crash(items):
        raise RuntimeError("device lost")

    batcher = MicroBatcher(crash, executor, max_batch_size=8, max_wait_s=0, max_queue=100)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit_many([i]) for i in range(5)))
    assert all(isinstance(r[0], RuntimeError) for r in results)
    await batcher.stop()


async def test_stop_drains_accepted_work_then_refuses_new(executor) -> None:
    rec = Recorder(delay=0.01)
    batcher = MicroBatcher(rec, executor, max_batch_size=4, max_wait_s=0, max_queue=100)
    batcher.start()
    pending = [asyncio.ensure_future(batcher.submit_many([i])) for i in range(10)]
    await asyncio.sleep(0)
    await batcher.stop(drain=True)
    assert await asyncio.wait_for(asyncio.gather(*pending), 1) == [[2 * i] for i in range(10)]
    with pytest.raises(BatcherClosedError):
        await batcher.submit_many([1])


async def test_the_least_served_request_goes_first(executor) -> None:
    rec = Recorder()
    rec.gate.clear()  # hold the worker so that everything below queues up
    batcher = MicroBatcher(rec, executor, max_batch_size=4, max_wait_s=0, max_queue=100)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit_many([0]))
    await asyncio.sleep(0.05)  # the worker has taken [0] and waits on the gate
    heavy = asyncio.ensure_future(batcher.submit_many(list(range(100, 140))))  # one caller's backlog
    await asyncio.sleep(0)
    light = asyncio.ensure_future(batcher.submit_many([7]))
    await asyncio.sleep(0)
    rec.gate.set()
    await asyncio.gather(first, heavy, light)
    assert rec.batches[0] == [0]
    assert 7 in rec.batches[1], rec.batches[:3]  # the light request rides the very next batch
    await batcher.stop()


async def test_a_batch_stops_at_its_cost_budget(executor) -> None:
    rec = Recorder()
    batcher = MicroBatcher(rec, executor, max_batch_size=64, max_wait_s=0, max_queue=100, max_batch_cost=10)
    rec.gate.clear()
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit_many([0]))
    await asyncio.sleep(0.05)
    work = asyncio.ensure_future(batcher.submit_many(list(range(1, 9)), costs=[4] * 8))
    await asyncio.sleep(0)
    assert batcher.queued_cost == 32 and batcher.depth == 8
    rec.gate.set()
    await asyncio.gather(blocker, work)
    assert all(len(b) <= 3 for b in rec.batches[1:])  # 3 × 4 ≥ 10: never more per batch
    await batcher.stop()


async def test_a_cancelled_caller_stops_counting_at_once(executor) -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher = MicroBatcher(rec, executor, max_batch_size=4, max_wait_s=0, max_queue=100)
    batcher.start()
    blocker = asyncio.ensure_future(batcher.submit_many([0]))
    await asyncio.sleep(0.05)
    doomed = asyncio.ensure_future(batcher.submit_many([1, 2, 3], costs=[5, 5, 5]))
    survivor = asyncio.ensure_future(batcher.submit_many([4]))
    await asyncio.sleep(0)
    assert batcher.depth == 4 and batcher.queued_cost == 16
    doomed.cancel()
    for _ in range(3):  # a few loop steps for the cancellation to reach the awaiting caller
        await asyncio.sleep(0)
    assert batcher.depth == 1 and batcher.queued_cost == 1  # before the worker ever looks at them
    rec.gate.set()
    assert await survivor == [8]
    await blocker
    assert all(x not in (1, 2, 3) for b in rec.batches for x in b)
    await batcher.stop()


async def test_estimated_wait_follows_measured_throughput(executor) -> None:
    rec = Recorder(delay=0.05)
    batcher = MicroBatcher(rec, executor, max_batch_size=1, max_wait_s=0, max_queue=100)
    batcher.start()
    assert batcher.estimated_wait_s(100) == 0.0  # nothing measured yet: admit
    await batcher.submit_many([1], costs=[10])  # 10 units in ~0.05 s: ~200 units/s
    assert 0.2 < batcher.estimated_wait_s(100) < 1.0
    await batcher.submit_many([2], costs=[1000])  # a faster batch: the estimate takes the best rate
    assert batcher.estimated_wait_s(100) < 0.05
    await batcher.stop()


async def test_the_drain_is_bounded_when_a_batch_hangs(executor) -> None:
    rec = Recorder()
    rec.gate.clear()  # the running batch hangs (until the gate's 5 s timeout)
    batcher = MicroBatcher(rec, executor, max_batch_size=1, max_wait_s=0, max_queue=100)
    batcher.start()
    hung = asyncio.ensure_future(batcher.submit_many([1]))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(batcher.submit_many([2]))
    await asyncio.sleep(0)
    started = time.perf_counter()
    await batcher.stop(drain=True, timeout_s=0.2)
    assert time.perf_counter() - started < 1.0
    assert isinstance((await queued)[0], BatcherClosedError)
    rec.gate.set()
    await hung


async def test_batches_run_side_by_side_up_to_max_in_flight_and_stop_waits_for_them() -> None:
    """With two model workers, two batches run at once (a barrier only two concurrent batches can
    pass), never a third, and a draining stop waits for both."""
    barrier = threading.Barrier(2, timeout=5)
    running, most = [0], [0]
    lock = threading.Lock()

    def process(items: list[int]) -> list[int]:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            barrier.wait()  # raises BrokenBarrierError after 5 s if the other batch never comes
            time.sleep(0.05)
        finally:
            with lock:
                running[0] -= 1
        return [x * 2 for x in items]

    with ThreadPoolExecutor(3) as ex:
        batcher = MicroBatcher(process, ex, max_batch_size=2, max_wait_s=0, max_queue=100, max_in_flight=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit_many([1, 2]))
        second = asyncio.ensure_future(batcher.submit_many([3, 4]))
        await asyncio.sleep(0.02)
        assert batcher.in_flight == 2 and batcher.running_since is not None
        await batcher.stop(drain=True)
        assert first.result() == [2, 4] and second.result() == [6, 8]
        assert most[0] == 2 and batcher.in_flight == 0 and batcher.idle
        # Four batches' worth at once: still never more than two running.
        batcher = MicroBatcher(process, ex, max_batch_size=1, max_wait_s=0, max_queue=100, max_in_flight=2)
        batcher.start()
        assert await asyncio.gather(*(batcher.submit_many([i]) for i in range(4))) == [[0], [2], [4], [6]]
        assert most[0] == 2
        await batcher.stop()


async def test_last_free_slot_takes_all_that_is_queued_while_free_slots_share_it() -> None:
    """Two batch slots. Both free: ten waiting texts are split evenly (5 + 5), so neither worker
    idles. One busy: the last free slot takes all ten, because any left behind would wait for the
    busy batch to end (the straggler tail at high concurrency)."""
    started: list[list[int]] = []
    release = threading.Event()

    def process(items: list[int]) -> list[int]:
        started.append(list(items))
        release.wait(5)
        return items

    with ThreadPoolExecutor(2) as ex:
        batcher = MicroBatcher(process, ex, max_batch_size=64, max_wait_s=0, max_queue=100, max_in_flight=2)
        batcher.start()
        both_free = asyncio.gather(*(batcher.submit_many([i]) for i in range(10)))
        while len(started) < 2:
            await asyncio.sleep(0.005)
        assert sorted(len(b) for b in started) == [5, 5]
        release.set()
        await both_free

        release.clear()
        started.clear()
        busy = asyncio.ensure_future(batcher.submit_many([100]))
        while not started:
            await asyncio.sleep(0.005)
        burst = asyncio.gather(*(batcher.submit_many([i]) for i in range(10)))
        while len(started) < 2:
            await asyncio.sleep(0.005)
        assert started == [[100], list(range(10))]
        release.set()
        assert await burst == [[i] for i in range(10)] and await busy == [100]
        await batcher.stop()
