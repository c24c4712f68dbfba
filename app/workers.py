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
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Sequence

from app.poison import PoisonMemory
from app.pool_versions import CandidateError, VersionedWorkers
from app.scorer import BatchLostError, TextRejectedError
from app.throughput import Throughput
from app.worker_process import WorkerConfig, WorkerProcess, WorkerStartError
from sentiment.engine import ScoredBatch, ScoreRequest

if TYPE_CHECKING:
    from app.scorer import ModelSummary

__all__ = ["CandidateError", "WorkerConfig", "WorkerDiedError", "WorkerPool", "WorkerStartError"]
log = logging.getLogger("app.workers")
# A batch's deadline is this many times its predicted duration at the best recent throughput (an
# optimistic rate: a busy machine, the front's share of the CPU and garbage collection all slow it).
DEADLINE_FACTOR = 8.0
RESTART_BACKOFF_S = (1.0, 5.0, 15.0, 60.0)  # between attempts to replace a worker that cannot start


class WorkerDiedError(BatchLostError):
    """No model worker could take this batch (the pool is closing, or every worker is gone)."""


class WorkerPool(VersionedWorkers):
    """``count`` model-worker processes behind the :class:`~app.scorer.Scorer` protocol: the
    blocking :meth:`score` is called from up to ``count`` threads at once, and each call takes a
    free worker of the version its requests are pinned to for one batch (model versions:
    :class:`~app.pool_versions.VersionedWorkers`)."""

    command = [sys.executable, "-m", "app.model_worker"]  # + the socket's fd (tests start faulty workers)

    def __init__(self, config: WorkerConfig, count: int, on_restart: Callable[[], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None, deadline_floor_s: float = 2.0,
                 deadline_cap_s: float = 20.0, poison_ttl_s: float = 3600.0,
                 on_failure: Callable[[str], None] | None = None, on_poison: Callable[[], None] | None = None,
                 on_retry: Callable[[int], None] | None = None) -> None:
        super().__init__(config, count)
        self.slots = count
        self.restarts = 0
        self.deadline_floor_s, self.deadline_cap_s, self.poison_ttl_s = deadline_floor_s, deadline_cap_s, poison_ttl_s
        self._on_restart, self._on_fatal = on_restart, on_fatal
        self._on_failure, self._on_poison, self._on_retry = on_failure, on_poison, on_retry
        # One worker's cost per second over batches of any size (small ones are slow per text, which
        # only errs towards longer deadlines).
        self._throughput = Throughput(1, 1, float("inf"))
        self._poison = PoisonMemory(poison_ttl_s)

    # ---- the Scorer protocol ------------------------------------------------------------------
    @property
    def ready(self) -> int:
        """Workers loaded, warm and serving (a shadow worker only once its version serves; during a swap
        the old and new versions' workers together count at most ``count``)."""
        served = self.model.version if self.model is not None else None
        return min(self.count, sum(1 for w in list(self._workers.values()) if not w.shadow or w.version == served))

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
        pending = [self._spawn(i, self.config) for i in range(self.count)]  # they load in parallel
        try:
            summaries = [worker.await_ready(None) for worker in pending]
        except BaseException:
            for worker in pending:
                worker.kill()
            raise
        model = dataclasses.replace(summaries[0], workers=self.count)
        for summary in summaries:
            if (summary.version, summary.checksum) != (model.version, model.checksum):
                for w in pending:
                    w.kill()
                raise WorkerStartError(f"model workers loaded different models ({summary.version!r} and "
                                       f"{model.version!r}): did the artifacts change during start-up?")
        self._register(model.version, self.config, model, pending)
        self.model = model
        log.info("%d model workers ready (pids %s)", self.count, ", ".join(str(w.pid) for w in pending))
        return self.model

    def score(self, requests: list[ScoreRequest], retry: bool = True) -> ScoredBatch:
        """Score one batch, each request on a worker of the version it is pinned to (the served one
        when not pinned); a text fails only when it cannot be scored at all (see the module doc).
        Without ``retry`` (shadow work) a failed worker's texts fail with :class:`BatchLostError`,
        and nothing is remembered as poison."""
        assert self.model is not None, "score() before start()"
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.version or self.model.version, []).append(i)
        if len(groups) == 1:  # almost always: one version serves
            return self._score_version(next(iter(groups)), requests, retry)
        # A batch formed while the served version changed: each version's requests on its own workers.
        return ScoredBatch.assemble([None] * len(requests), [
            (indices, self._score_version(version, [requests[i] for i in indices], retry))
            for version, indices in groups.items()])

    def _score_version(self, version: str, requests: list[ScoreRequest], retry: bool) -> ScoredBatch:
        if version not in self._idle and not self._closed:  # outlived its version (freed after the request timeout)
            lost = WorkerDiedError(f"model version {version!r} is no longer loaded")
            return ScoredBatch([lost] * len(requests), errors=list(range(len(requests))))
        results: list = [None] * len(requests)
        todo = [i for i, r in enumerate(requests) if not self._poison.refuses(r.text)]
        for i in set(range(len(requests))) - set(todo):
            results[i] = TextRejectedError(self.poison_ttl_s)
        if not todo:
            return ScoredBatch(results, errors=list(range(len(requests))))
        first = self._attempt(version, [requests[i] for i in todo])
        if isinstance(first, ScoredBatch):
            parts = [(todo, first)]
        elif not retry:
            for i in todo:
                results[i] = BatchLostError(first)
            parts = []
        else:  # the worker failed: each text again, alone; one that fails again is the poison
            if self._on_retry is not None:
                self._on_retry(len(todo))
            parts = []
            for i in todo:
                again = self._attempt(version, [requests[i]])
                if isinstance(again, ScoredBatch):
                    parts.append(([i], again))
                else:
                    results[i] = self._remember_poison(requests[i].text, again)
        return ScoredBatch.assemble(results, parts)

    # ---- one batch on one worker --------------------------------------------------------------
    def _attempt(self, version: str, requests: list[ScoreRequest]) -> ScoredBatch | str:
        """The batch scored by a free worker of ``version``, or why that worker failed (it is then replaced)."""
        worker = self._take_worker(version)
        cost = self._cost(requests)
        # A shadow worker runs niced, at a fraction of a busy core: only the cap says it is stuck.
        deadline = self.deadline_cap_s if worker.shadow else self._deadline_s(cost)
        started = time.perf_counter()
        try:
            worker.conn.send(requests)
            if not worker.conn.poll(deadline):
                reason, detail = "deadline", f"no answer within its {deadline:.1f}s deadline"
            else:
                batch = worker.conn.recv()
                if isinstance(batch, ScoredBatch) and len(batch.results) == len(requests):
                    if not worker.shadow:  # the shadow's pace (niced, a single worker) says nothing of serving
                        self._throughput.record(len(requests), cost, time.perf_counter() - started)
                    self._release(worker)
                    return batch
                reason, detail = "bad_reply", f"a malformed reply ({type(batch).__name__})"
        except (EOFError, OSError):
            reason, detail = "exit", "exited while scoring"
        except Exception as exc:  # a reply that cannot be decoded (unpickling, MemoryError, ...)
            reason, detail = "bad_reply", f"an undecodable reply ({type(exc).__name__})"
        self._replace(worker, reason, detail)
        return detail

    def _release(self, worker: WorkerProcess) -> None:
        """A worker that finished its batch is free again, unless its version was retired meanwhile."""
        idle = self._idle.get(str(worker.version))
        if idle is None or self._workers.get(worker.index) is not worker:
            worker.stop()
            return
        idle.put(worker)

    def _take_worker(self, version: str) -> WorkerProcess:
        """A free, live worker of ``version`` (blocks until one is free); :class:`WorkerDiedError`
        when closing or when no worker holds that version any more."""
        idle = self._idle.get(version)
        if idle is None:
            raise WorkerDiedError(f"no model worker holds version {version!r} any more")
        while True:
            worker = idle.get()
            if worker is None or self._closed:
                idle.put(None)  # let the next waiter out too
                raise WorkerDiedError("the model workers are shutting down" if self._closed else
                                      f"the model workers of version {version!r} were stopped")
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
    def _spawn(self, index: int, config: WorkerConfig) -> WorkerProcess:
        return WorkerProcess.spawn(self.command, config, index)

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
        if worker.config is None or worker.version is None:
            return
        threading.Thread(target=self._restart, args=(worker.index, worker.config, worker.version),
                         name=f"restart-worker-{worker.index}", daemon=True).start()

    def _restart(self, index: int, config: WorkerConfig, version: str) -> None:
        """Start a worker of ``version`` in slot ``index``, retrying with a backoff, unless the version
        is retired meanwhile (it must load the same model: version and checksum)."""
        for attempt in itertools.count():
            if not self.wanted(version):
                return
            try:
                worker = self._spawn(index, config)
                worker.await_ready(self.expected(version))
                break
            except Exception as exc:  # e.g. the artifacts changed or vanished
                if not self.wanted(version):
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
            idle = self._idle.get(version)
            if not self.wanted(version) or idle is None:  # closing, or the version was retired meanwhile
                worker.conn.send(None)
                return
            if index in self._workers:  # its slot was given to another worker meanwhile (after a swap)
                index = worker.index = next(self._next_index)
            self._workers[index] = worker
        idle.put(worker)
        log.info("model worker %d (version %s) started (pid %s)", index, version, worker.pid)
