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
import hashlib
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from app.resources import resident_bytes
from app.scorer import BatchLostError, TextRejectedError
from app.throughput import Throughput
from sentiment.engine import ScoredBatch, ScoreRequest

if TYPE_CHECKING:
    from app.scorer import ModelSummary
    from app.settings import Settings

log = logging.getLogger("app.workers")
START_TIMEOUT_S = 300.0  # load + warm-up of one worker; a slow disk or a cold page cache can take a while
# A batch's deadline is this many times its predicted duration at the best recent throughput (an
# optimistic rate: a busy machine, the front's share of the CPU and garbage collection all slow it).
DEADLINE_FACTOR = 8.0
RESTART_BACKOFF_S = (1.0, 5.0, 15.0, 60.0)  # between attempts to replace a worker that cannot start
POISON_MEMORY = 10_000  # texts remembered at most (the oldest are forgotten first)
# What a worker inherits: no secrets (API keys), only what Python, torch and the locale read.
ENV_NAMES = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LD_LIBRARY_PATH", "VIRTUAL_ENV"}
ENV_PREFIXES = ("LC_", "PYTHON", "OMP_", "MKL_", "KMP_", "ONEDNN_", "DNNL_", "TORCH_", "CUDA_", "NVIDIA_",
                "CUBLAS_", "PYTORCH_", "SPACY_")


class WorkerDiedError(BatchLostError):
    """No model worker could take this batch (the pool is closing, or every worker is gone)."""


class WorkerStartError(RuntimeError):
    """A model-worker process could not load or warm up the model, or loaded another one."""


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
    log_format: str = "text"
    log_level: str = "info"

    @classmethod
    def of(cls, settings: Settings) -> "WorkerConfig":
        """The worker's share of the service's settings."""
        s = settings
        return cls(str(s.artifacts_dir), s.device, s.precision, s.max_tokens, s.max_explain_tokens,
                   s.max_batch_tokens, s.warmup, s.log_format, s.log_level)


def worker_env(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """The environment of a worker: the allowed names of this one (no API keys, no tracing
    endpoints), with this checkout first on the import path (the front may have found ``app``
    through its working directory rather than an installed package)."""
    env = {k: v for k, v in environ.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + environ["PYTHONPATH"] if environ.get("PYTHONPATH") else "")
    return env


def text_key(text: str) -> str:
    """How a text is remembered: its SHA-256 (never the text itself)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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

    def kill(self) -> int | None:
        self.process.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
        code = self.wait(5)
        self.conn.close()
        return code


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
        self._workers: dict[int, _Worker] = {}  # index → its live, ready worker
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()  # None: closing, stop waiting
        self._lock = threading.Lock()
        self._closed = False
        # One worker's cost per second over batches of any size (small ones are slow per text, which
        # only errs towards longer deadlines).
        self._throughput = Throughput(1, 1, float("inf"))
        self._poison: OrderedDict[str, float] = OrderedDict()  # text key → when it may be tried again

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
        todo = [i for i, r in enumerate(requests) if not self._refuses(r.text)]
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

    def _take_worker(self) -> _Worker:
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
    def _refuses(self, text: str) -> bool:
        key = text_key(text)
        with self._lock:
            until = self._poison.get(key)
            if until is not None and until < time.monotonic():
                del self._poison[key]
                return False
            return until is not None

    def _remember_poison(self, text: str, reason: str) -> TextRejectedError:
        log.error("a text failed a model worker twice, the second time alone (%s); refusing it for %.0fs "
                  "(sha256 %s)", reason, self.poison_ttl_s, text_key(text)[:16])
        with self._lock:
            self._poison[text_key(text)] = time.monotonic() + self.poison_ttl_s
            while len(self._poison) > POISON_MEMORY:
                self._poison.popitem(last=False)
        if self._on_poison is not None:
            self._on_poison()
        return TextRejectedError(self.poison_ttl_s)

    # ---- replacing workers --------------------------------------------------------------------
    def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        with theirs:
            process = subprocess.Popen([*self.command, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                       stdin=subprocess.DEVNULL, env=worker_env())
        conn = Connection(ours.detach())
        conn.send(self.config)
        return _Worker(index, process, conn)

    def _await_ready(self, worker: _Worker) -> ModelSummary:
        """The summary the worker reports once warm; a worker that fails, or that loaded another model
        than the pool serves, is killed and reported as :class:`WorkerStartError`."""
        try:
            if not worker.conn.poll(START_TIMEOUT_S):
                raise WorkerStartError(f"model worker {worker.index} was not ready within {START_TIMEOUT_S:.0f}s")
            status, detail = worker.conn.recv()
        except (EOFError, OSError):
            status, detail = "failed", f"exited with code {worker.wait(5)}"
        if status == "ready" and self.model is not None and (detail.version, detail.checksum) != (
                self.model.version, self.model.checksum):
            status, detail = "failed", (f"loaded model {detail.version!r} ({detail.checksum[:12]}), not the "
                                        f"served {self.model.version!r} ({self.model.checksum[:12]})")
        if status != "ready":
            worker.kill()
            raise WorkerStartError(f"model worker {worker.index} failed to start: {detail}")
        return detail

    def _replace(self, worker: _Worker, reason: str, detail: str) -> None:
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
