"""The worker pool: one engine per core in its own process, each fed whole batches by the front's
one batcher (a :class:`~app.scorer.Scorer`, the default on CPU).

Why processes: tokenising is pure Python (the GIL serialises it), and on CPU one LSTM pass per core
at one torch thread beats one pass spread over all cores (measured; docs/architecture.md, "Serving on every core"). So the front process keeps HTTP, the batcher, metrics and readiness, and each worker process
holds its own :class:`~sentiment.engine.SentimentEngine` and runs ``engine.score`` (tokenise +
forward) on the batches it is given. The front loads no model: each worker reports what it loaded
(a :class:`~app.scorer.ModelSummary`), and a replacement that loaded another version is refused. The same engine code runs in every worker, so a text's result
does not depend on which worker or batch scored it.

Workers are started as ``python -m app.workers <fd>`` (not with multiprocessing's spawn, which would
re-import the parent's ``__main__``: a script that calls ``uvicorn.run(app)`` without a
``__main__`` guard would start itself again); batches and results cross a socket pair as pickles.

A worker that dies is replaced at once; the batch it held fails with :class:`WorkerDiedError`
(its texts get a 503 that says to retry), and readiness is false until the replacement is warm.
Workers ignore SIGINT and SIGTERM: the front drains first, then tells them to exit, so a signal to
the whole process group (Ctrl-C, ``kill -- -pgid``) cannot cut a batch short. A worker whose front
disappears reads end-of-file and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from app.resources import resident_bytes, tune_gc
from app.scorer import BatchLostError
from sentiment.engine import ScoredBatch, ScoreRequest

if TYPE_CHECKING:
    from app.scorer import ModelSummary
    from app.settings import Settings

log = logging.getLogger("app.workers")
START_TIMEOUT_S = 300.0  # load + warm-up of one worker; a slow disk or a cold page cache can take a while
# Workers run at a lower CPU priority than the front: with one worker per core, the front's event
# loop (HTTP, JSON, handing out batches) would otherwise wait for a time slice behind busy workers,
# and every request's latency with it. The front is light, so the workers lose little.
WORKER_NICE = 5


class WorkerDiedError(BatchLostError):
    """The model-worker process running this batch exited; its texts can be retried."""


class WorkerStartError(RuntimeError):
    """A model-worker process could not load or warm up the model."""


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to build its engine (plain values: it crosses a process boundary)."""

    artifacts_dir: str
    device: str
    precision: str
    max_tokens: int | None
    max_explain_tokens: int | None
    max_batch_tokens: int
    warmup: bool

    @classmethod
    def of(cls, settings: Settings) -> "WorkerConfig":
        """The worker's share of the service's settings."""
        s = settings
        return cls(str(s.artifacts_dir), s.device, s.precision, s.max_tokens, s.max_explain_tokens,
                   s.max_batch_tokens, s.warmup)


def _serve(conn: Connection) -> None:
    """A worker's life: read its config, load, warm up, say ready; then score each batch received
    until told to stop (``None``) or until the front is gone (end of file)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.nice(WORKER_NICE)
    except OSError:  # not permitted here: run at the front's priority
        pass
    import torch

    torch.set_num_threads(1)  # one core per worker: the workers together use them all
    from app.scorer import ModelSummary
    from sentiment.engine import SentimentEngine

    try:
        config: WorkerConfig = conn.recv()
        engine = SentimentEngine.load(config.artifacts_dir, config.device, precision=config.precision,
                                      max_tokens=config.max_tokens, max_explain_tokens=config.max_explain_tokens,
                                      max_batch_tokens=config.max_batch_tokens)
        if config.warmup:
            engine.warm_up()
    except Exception as exc:  # the front logs it and fails start-up
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    tune_gc()
    conn.send(("ready", ModelSummary.of(engine)))
    while True:
        try:
            requests = conn.recv()
        except (EOFError, OSError):  # the front is gone
            return
        if requests is None:
            return
        conn.send(_picklable(engine.score(requests)))


def _picklable(batch: ScoredBatch) -> ScoredBatch:
    """Replace per-text exceptions that cannot cross the pipe (some library errors cannot be
    pickled) by a RuntimeError naming their type: the front maps either to the same 500."""
    for i in batch.errors:
        try:
            pickle.loads(pickle.dumps(batch.results[i]))
        except Exception:
            batch.results[i] = RuntimeError(type(batch.results[i]).__name__)
    return batch


def _worker_env() -> dict[str, str]:
    """This process's environment, with this checkout first on the import path (the front may have
    found ``app`` through its working directory rather than an installed package)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


class _Worker:
    def __init__(self, index: int, process: subprocess.Popen, conn: Connection) -> None:
        self.index, self.process, self.conn = index, process, conn

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout_s: float) -> int | None:
        """The exit code once the process has ended within ``timeout_s``, else None."""
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None


class WorkerPool:
    """``count`` model-worker processes behind the :class:`~app.scorer.Scorer` protocol: the
    blocking :meth:`score` is called from up to ``count`` threads at once, and each call takes a
    free worker for one batch."""

    def __init__(self, config: WorkerConfig, count: int,
                 on_restart: Callable[[], None] | None = None, on_fatal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.count = self.slots = count
        self.restarts = 0
        self.model: ModelSummary | None = None  # what every worker reported loading
        self._on_restart = on_restart
        self._on_fatal = on_fatal
        self._workers: dict[int, _Worker] = {}  # index → its live, ready worker
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def ready(self) -> int:
        """Workers loaded, warm and serving."""
        return len(self._workers)

    def unready_detail(self) -> str | None:
        missing = self.count - self.ready
        if not missing or self._closed:
            return None
        return f"{missing} of {self.count} model workers restarting (requests are still served by the others)"

    def start(self) -> ModelSummary:
        """Start every worker and wait until all are ready (raises :class:`WorkerStartError`); the
        summary of the model they loaded."""
        pending = [self._spawn(i) for i in range(self.count)]  # they load in parallel
        try:
            summaries = [self._await_ready(worker) for worker in pending]
        except BaseException:
            for worker in pending:
                worker.process.kill()
                worker.wait(5)
            raise
        for worker in pending:
            self._workers[worker.index] = worker
            self._idle.put(worker)
        self.model = dataclasses.replace(summaries[0], workers=self.count)
        log.info("%d model workers ready (pids %s)", self.count, ", ".join(str(w.pid) for w in pending))
        return self.model

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        with theirs:
            process = subprocess.Popen([sys.executable, "-m", "app.workers", str(theirs.fileno())],
                                       pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_worker_env())
        conn = Connection(ours.detach())
        conn.send(self.config)
        return _Worker(index, process, conn)

    def _await_ready(self, worker: _Worker) -> ModelSummary:
        """The summary the worker reports once warm; a worker that fails, or that loaded another model
        version than the pool serves, is killed and reported as :class:`WorkerStartError`."""
        try:
            if not worker.conn.poll(START_TIMEOUT_S):
                raise WorkerStartError(f"model worker {worker.index} was not ready within {START_TIMEOUT_S:.0f}s")
            status, detail = worker.conn.recv()
        except (EOFError, OSError):
            status, detail = "failed", f"exited with code {worker.wait(5)}"
        if status == "ready" and self.model is not None and detail.version != self.model.version:
            status, detail = "failed", f"loaded model {detail.version!r}, not the served {self.model.version!r}"
        if status != "ready":
            worker.process.kill()
            worker.wait(5)
            raise WorkerStartError(f"model worker {worker.index} failed to start: {detail}")
        return detail

    def score(self, requests: list[ScoreRequest]) -> ScoredBatch:
        """Score one batch on a free worker (blocks until one is free)."""
        while True:
            worker = self._idle.get()
            if worker.process.poll() is None:
                break
            self._replace(worker)  # it died while idle (an OOM kill, say): nothing was lost, take another
        try:
            worker.conn.send(requests)
            batch = worker.conn.recv()
        except (EOFError, OSError) as exc:
            self._replace(worker)
            raise WorkerDiedError(f"model worker {worker.index} exited while scoring") from exc
        self._idle.put(worker)
        return batch

    def _replace(self, dead: _Worker) -> None:
        """Forget a dead worker and start its replacement in the background (ready once warm)."""
        with self._lock:
            self._workers.pop(dead.index, None)
            if self._closed:
                return
        log.error("model worker %d (pid %s) exited with code %s; starting a replacement",
                  dead.index, dead.pid, dead.wait(5))
        self.restarts += 1
        if self._on_restart is not None:
            self._on_restart()
        threading.Thread(target=self._restart, args=(dead.index,), name=f"restart-worker-{dead.index}",
                         daemon=True).start()

    def _restart(self, index: int) -> None:
        try:
            worker = self._spawn(index)
            self._await_ready(worker)
        except Exception as exc:  # e.g. the artifacts vanished: nothing here can heal that
            log.critical("could not replace model worker %d: %s", index, exc)
            if self._on_fatal is not None:
                self._on_fatal(f"a model worker could not be restarted: {exc}")
            return
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

    def resident_bytes(self) -> int:
        return sum(self.worker_bytes().values())

    def pids(self) -> Sequence[int]:
        return [w.pid for w in self._workers.values()]

    def close(self, timeout_s: float = 5.0) -> None:
        """Tell every worker to exit (after the batcher has drained); kill those that do not."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            if worker.wait(max(0.0, deadline - time.monotonic())) is None:  # a hung batch: no asking nicely
                worker.process.kill()
                worker.wait(1)
            worker.conn.close()


if __name__ == "__main__":  # python -m app.workers <fd>: one model worker, started by WorkerPool
    _serve(Connection(int(sys.argv[1])))
