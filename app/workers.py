"""The worker pool: one engine per core in its own process (:mod:`app.model_worker`), each fed whole
batches by the front's one batcher. The default :class:`~app.scorer.Scorer` on CPU.

Why processes: tokenising is pure Python (the GIL serialises it), and on CPU one LSTM pass per core
at one torch thread beats one pass spread over all cores (measured; docs/architecture.md, "Serving
on every core"). The same engine code runs in every worker, so a text's result does not depend on
which worker or batch scored it. The front loads no model: each worker reports what it loaded, and
one whose model (version and checksum) differs from the pool's is refused.

A worker is trusted with a batch for a bounded time. Every batch has a deadline (its predicted
duration from the measured throughput, × ``DEADLINE_FACTOR``, between the floor and cap settings);
a worker that misses it (frozen, deadlocked, swapping), exits, or answers anything but a well-formed
reply is killed and replaced. Its batch is then scored again, each text alone, on whichever worker is
free: a text that fails a second time, alone, is the one that breaks workers, and is refused
(:class:`~app.scorer.TextRejectedError`) and remembered for ``poison_ttl_s``, so it never reaches a
worker again; its batch neighbours are answered normally. The pool serves while any worker serves;
a replacement that cannot start is retried with a backoff, and is fatal only when nothing serves.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Sequence

from app.poison import PoisonMemory
from app.resources import resident_bytes
from app.scorer import BatchLostError, TextRejectedError
from app.throughput import Throughput
from app.worker_process import WorkerConfig, WorkerProcess, WorkerStartError
from sentiment.engine import ScoredBatch, ScoreRequest

if TYPE_CHECKING:
    from app.scorer import ModelSummary

__all__ = ["WorkerConfig", "WorkerDiedError", "WorkerPool", "WorkerStartError"]
log = logging.getLogger("app.workers")
# A batch's deadline is this many times its predicted duration at the best recent throughput (an
# optimistic rate: a busy machine, the front's share of the CPU and garbage collection all slow it).
DEADLINE_FACTOR = 8.0
RESTART_BACKOFF_S = (1.0, 5.0, 15.0, 60.0)  # between attempts to replace a worker that cannot start


class WorkerDiedError(BatchLostError):
    """No model worker could take this batch (the pool is closing, or every worker is gone)."""


class WorkerPool:
    """``count`` model-worker processes behind the :class:`~app.scorer.Scorer` protocol: the
    blocking :meth:`score` is called from up to ``count`` threads at once, and each call takes a
    free worker for one batch."""

    command = [sys.executable, "-m", "app.model_worker"]  # + the socket's fd (tests start faulty workers)

    def __init__(self, config: WorkerConfig, count: int, on_restart: Callable[[], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None, deadline_floor_s: float = 2.0,
                 deadline_cap_s: float = 20.0, poison_ttl_s: float = 3600.0,
                 on_failure: Callable[[str], None] | None = None, on_poison: Callable[[], None] | None = None,
                 on_retry: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.count = self.slots = count
        self.restarts = 0
        self.model: ModelSummary | None = None  # what every worker must have loaded
        self.deadline_floor_s, self.deadline_cap_s, self.poison_ttl_s = deadline_floor_s, deadline_cap_s, poison_ttl_s
        self._on_restart, self._on_fatal = on_restart, on_fatal
        self._on_failure, self._on_poison, self._on_retry = on_failure, on_poison, on_retry
        self._workers: dict[int, WorkerProcess] = {}  # index → its live, ready worker
        self._idle: queue.SimpleQueue[WorkerProcess | None] = queue.SimpleQueue()  # None: closing, stop waiting
        self._lock = threading.Lock()
        self._closed = False
        # One worker's cost per second over batches of any size (small ones are slow per text, which
        # only errs towards longer deadlines).
        self._throughput = Throughput(1, 1, float("inf"))
        self._poison = PoisonMemory(poison_ttl_s)

    # ---- the Scorer protocol ------------------------------------------------------------------
    @property
    def ready(self) -> int:
        """Workers loaded, warm and serving."""
        return len(self._workers)

    def unready_detail(self) -> str | None:
        if self.ready or self._closed:
            return None
        return f"all {self.count} model workers are restarting"

    def degraded_detail(self) -> str | None:
        missing = self.count - self.ready
        if not missing or not self.ready or self._closed:
            return None
        return f"{missing} of {self.count} model workers restarting (requests are served by the others)"

    def start(self) -> ModelSummary:
        """Start every worker and wait until all are ready (raises :class:`WorkerStartError`); the
        summary of the model they loaded."""
        pending = [self._spawn(i) for i in range(self.count)]  # they load in parallel
        try:
            summaries = [self._await_ready(worker) for worker in pending]
        except BaseException:
            for worker in pending:
                worker.kill()
            raise
        self.model = dataclasses.replace(summaries[0], workers=self.count)
        for worker, summary in zip(pending, summaries):
            if (summary.version, summary.checksum) != (self.model.version, self.model.checksum):
                for w in pending:
                    w.kill()
                raise WorkerStartError(f"model workers loaded different models ({summary.version!r} and "
                                       f"{self.model.version!r}): did the artifacts change during start-up?")
            self._workers[worker.index] = worker
            self._idle.put(worker)
        log.info("%d model workers ready (pids %s)", self.count, ", ".join(str(w.pid) for w in pending))
        return self.model

    def score(self, requests: list[ScoreRequest]) -> ScoredBatch:
        """Score one batch; a text fails only when it cannot be scored at all (see the module doc)."""
        results: list = [None] * len(requests)
        todo = [i for i, r in enumerate(requests) if not self._poison.refuses(r.text)]
        for i in set(range(len(requests))) - set(todo):
            results[i] = TextRejectedError(self.poison_ttl_s)
        if not todo:
            return ScoredBatch(results, errors=list(range(len(requests))))
        first = self._attempt([requests[i] for i in todo])
        if isinstance(first, ScoredBatch):
            parts = [(todo, first)]
        else:  # the worker failed: each text again, alone; one that fails again is the poison
            if self._on_retry is not None:
                self._on_retry(len(todo))
            parts = []
            for i in todo:
                again = self._attempt([requests[i]])
                if isinstance(again, ScoredBatch):
                    parts.append(([i], again))
                else:
                    results[i] = self._remember_poison(requests[i].text, again)
        merged = ScoredBatch(results)
        for indices, batch in parts:
            for i, result in zip(indices, batch.results):
                results[i] = result
            merged.tokenize_seconds += batch.tokenize_seconds
            merged.forward_seconds += batch.forward_seconds
            merged.forward_passes += batch.forward_passes
        merged.errors = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        return merged

    def resident_bytes(self) -> int:
        return sum(self.worker_bytes().values())

    def close(self, timeout_s: float = 5.0) -> None:
        """Tell every worker to exit (after the batcher has drained); kill those that do not."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
        for _ in range(self.count):
            self._idle.put(None)  # wakes any caller still waiting for a worker
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            if worker.wait(max(0.0, deadline - time.monotonic())) is None:  # a hung batch: no asking nicely
                worker.kill()
            worker.conn.close()

    # ---- one batch on one worker --------------------------------------------------------------
    def _attempt(self, requests: list[ScoreRequest]) -> ScoredBatch | str:
        """The batch scored by a free worker, or why that worker failed (it is then replaced)."""
        worker = self._take_worker()
        cost = self._cost(requests)
        deadline = self._deadline_s(cost)
        started = time.perf_counter()
        try:
            worker.conn.send(requests)
            if not worker.conn.poll(deadline):
                reason, detail = "deadline", f"no answer within its {deadline:.1f}s deadline"
            else:
                batch = worker.conn.recv()
                if isinstance(batch, ScoredBatch) and len(batch.results) == len(requests):
                    self._throughput.record(len(requests), cost, time.perf_counter() - started)
                    self._idle.put(worker)
                    return batch
                reason, detail = "bad_reply", f"a malformed reply ({type(batch).__name__})"
        except (EOFError, OSError):
            reason, detail = "exit", "exited while scoring"
        except Exception as exc:  # a reply that cannot be decoded (unpickling, MemoryError, ...)
            reason, detail = "bad_reply", f"an undecodable reply ({type(exc).__name__})"
        self._replace(worker, reason, detail)
        return detail

    def _take_worker(self) -> WorkerProcess:
        """A free, live worker (blocks until one is free); :class:`WorkerDiedError` when closing."""
        while True:
            worker = self._idle.get()
            if worker is None or self._closed:
                self._idle.put(None)  # let the next waiter out too
                raise WorkerDiedError("the model workers are shutting down")
            if worker.process.poll() is None:
                return worker
            self._replace(worker, "exit", "exited while idle")  # an OOM kill, say: nothing was lost, take another

    def _cost(self, requests: Sequence[ScoreRequest]) -> float:
        from app.admission import item_cost  # the admission's cost model, in the same units as its queue

        assert self.model is not None
        return sum(item_cost(r, self.model) for r in requests)

    def _deadline_s(self, cost: float) -> float:
        """How long a worker may take for ``cost``: the cap until a throughput has been measured."""
        rate = self._throughput.cost_per_s
        if not rate:
            return self.deadline_cap_s
        return min(self.deadline_cap_s, max(self.deadline_floor_s, DEADLINE_FACTOR * cost / rate))

    # ---- texts that break workers -------------------------------------------------------------
    def _remember_poison(self, text: str, reason: str) -> TextRejectedError:
        key = self._poison.remember(text)
        log.error("a text failed a model worker twice, the second time alone (%s); refusing it for %.0fs "
                  "(sha256 %s)", reason, self.poison_ttl_s, key[:16])
        if self._on_poison is not None:
            self._on_poison()
        return TextRejectedError(self.poison_ttl_s)

    # ---- replacing workers --------------------------------------------------------------------
    def _spawn(self, index: int) -> WorkerProcess:
        return WorkerProcess.spawn(self.command, self.config, index)

    def _await_ready(self, worker: WorkerProcess) -> ModelSummary:
        return worker.await_ready(self.model)

    def _replace(self, worker: WorkerProcess, reason: str, detail: str) -> None:
        """Kill a worker that failed (``reason``: exit, deadline, bad_reply) and start its replacement
        in the background (ready once warm)."""
        with self._lock:
            self._workers.pop(worker.index, None)
            closed = self._closed
        code = worker.kill()
        if closed:
            return
        log.error("model worker %d (pid %s) failed: %s (exit code %s); starting a replacement",
                  worker.index, worker.pid, detail, code)
        self.restarts += 1
        if self._on_restart is not None:
            self._on_restart()
        if self._on_failure is not None:
            self._on_failure(reason)
        threading.Thread(target=self._restart, args=(worker.index,), name=f"restart-worker-{worker.index}",
                         daemon=True).start()

    def _restart(self, index: int) -> None:
        for attempt in itertools.count():
            try:
                worker = self._spawn(index)
                self._await_ready(worker)
                break
            except Exception as exc:  # e.g. the artifacts changed or vanished
                if self._closed:
                    return
                if not self.ready:  # nothing serves, and nothing here can heal it: let the pod restart
                    log.critical("could not replace model worker %d and none serves: %s", index, exc)
                    if self._on_fatal is not None:
                        self._on_fatal(f"no model worker could be started: {exc}")
                    return
                pause = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                log.critical("could not replace model worker %d (%s); the others serve; retrying in %.0fs",
                             index, exc, pause)
                time.sleep(pause)
        with self._lock:
            if self._closed:
                worker.conn.send(None)
                return
            self._workers[index] = worker
        self._idle.put(worker)
        log.info("model worker %d replaced (pid %s)", index, worker.pid)

    def worker_bytes(self) -> dict[int, int]:
        """Resident memory of each live worker (index → bytes), from /proc."""
        return {index: resident_bytes(worker.pid) for index, worker in list(self._workers.items())}

    def pids(self) -> Sequence[int]:
        return [w.pid for w in self._workers.values()]
