"""The worker pool's model versions: which worker holds which version, and how a version is added
beside the served one, made the served one, and retired, with a bounded number of processes.

:class:`VersionedWorkers` is the bookkeeping half of :class:`app.workers.WorkerPool` (the other half
scores batches and replaces failed workers). Every worker is tagged with the version it loaded, and
each version has its own queue of free workers, so a request pinned to a version
(:attr:`ScoreRequest.version <sentiment.engine.ScoreRequest>`) only ever reaches a worker of it.

Memory bound of a swap (``add_version`` then ``retire``): the pool never runs more than ``count + 1``
processes (one extra worker's resident memory). The candidate is one extra worker; each old worker is
stopped before its replacement is started. A shadow candidate is one extra worker too, at a lower CPU
priority; promoting it replaces every old worker with a normal one, then stops the shadow worker.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Sequence

from app.scorer import CandidateError
from app.resources import resident_bytes
from app.worker_process import START_TIMEOUT_S, WorkerConfig, WorkerProcess, WorkerStartError

if TYPE_CHECKING:
    from app.scorer import ModelSummary

__all__ = ["SHADOW_NICE", "CandidateError", "VersionedWorkers"]
log = logging.getLogger("app.workers")
# A shadow worker's extra niceness (over the workers' own 5): at nice 15 it gets ~10 % of a core that
# serving workers also want (CFS weights 36 against 335), so shadow work waits, not callers.
SHADOW_NICE = 10


class VersionedWorkers:
    """Workers by version; the state and the version operations of the pool."""

    def __init__(self, config: WorkerConfig, count: int) -> None:
        self.config = config  # the served version's (a replacement of one of its workers uses it)
        self.count = count
        self.model: ModelSummary | None = None  # the served version; every request not pinned goes to it
        self._workers: dict[int, WorkerProcess] = {}  # index → its live, ready worker
        self._idle: dict[str, queue.SimpleQueue[WorkerProcess | None]] = {}  # version → its free workers (None: stop)
        self._versions: dict[str, tuple[WorkerConfig, ModelSummary]] = {}  # versions whose workers are wanted
        self._next_index = itertools.count(count)  # extra workers' indices (the first count are the serving slots)
        self._lock = threading.Lock()
        self._closed = False

    # ---- hooks the pool provides ----------------------------------------------------------------
    def _spawn(self, index: int, config: WorkerConfig) -> WorkerProcess:
        raise NotImplementedError

    def _restart(self, index: int, config: WorkerConfig, version: str) -> None:
        raise NotImplementedError

    # ---- what the pool holds ------------------------------------------------------------------
    def _register(self, version: str, config: WorkerConfig, summary: ModelSummary, workers: list[WorkerProcess]) -> None:
        with self._lock:
            self._versions[version] = (config, summary)
            idle = self._idle.setdefault(version, queue.SimpleQueue())
            for worker in workers:
                self._workers[worker.index] = worker
        for worker in workers:
            idle.put(worker)

    def versions(self) -> dict[str, int]:
        """Each version the pool holds workers of → how many."""
        out: dict[str, int] = {}
        for worker in list(self._workers.values()):
            out[str(worker.version)] = out.get(str(worker.version), 0) + 1
        return out

    def wanted(self, version: str) -> bool:
        """Whether workers of ``version`` are still wanted (a replacement of a retired one is not)."""
        return version in self._versions and not self._closed

    def expected(self, version: str) -> ModelSummary | None:
        """What a new worker of ``version`` must report (version and checksum), if it is still wanted."""
        entry = self._versions.get(version)
        return entry[1] if entry is not None else None

    # ---- the processes --------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        return sum(self.worker_bytes().values())

    def close(self, timeout_s: float = 5.0) -> None:
        """Tell every worker to exit (after the batcher has drained); kill those that do not."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            self._workers.clear()
        for idle in list(self._idle.values()):
            idle.put(None)  # wakes any caller still waiting for a worker
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

    def worker_bytes(self) -> dict[int, int]:
        """Resident memory of each live worker (index → bytes), from /proc."""
        return {index: resident_bytes(worker.pid) for index, worker in list(self._workers.items())}

    def pids(self) -> Sequence[int]:
        return [w.pid for w in self._workers.values()]

    # ---- the version operations (blocking: the model-control thread calls them) ---------------
    def add_version(self, artifacts_dir: str, version: str, shadow: bool = False) -> ModelSummary:
        """Start one extra worker of ``version`` and wait until it is warm: the candidate's complete
        check (checksums, vocabulary, TorchScript load, warm-up). :class:`CandidateError` says what
        failed, and nothing has changed then."""
        if version in self._versions:
            raise CandidateError(f"version {version!r} is already loaded")
        config = dataclasses.replace(self.config, artifacts_dir=artifacts_dir, version=version,
                                     extra_nice=SHADOW_NICE if shadow else 0)
        worker = self._spawn(next(self._next_index), config)
        try:
            summary = worker.await_ready(None)  # a failure kills it
        except WorkerStartError as exc:
            raise CandidateError(str(exc)) from None
        with self._lock:
            closed = self._closed
        if closed:
            worker.stop()
            raise CandidateError("the service is shutting down")
        summary = dataclasses.replace(summary, workers=self.count)
        self._register(version, config, summary, [worker])
        log.info("model version %s loaded in model worker %d (pid %d)%s", version, worker.index, worker.pid,
                 " as a shadow" if shadow else "")
        return summary

    def promote(self, version: str) -> ModelSummary:
        """Serve ``version`` (already added): requests not pinned go to it, and a replacement of one of
        its workers starts at normal priority."""
        config, summary = self._versions[version]
        self.config = dataclasses.replace(config, extra_nice=0)
        self.model = summary
        return summary

    def retire(self, old: str, timeout_s: float = 60.0) -> None:
        """Stop every worker of ``old`` (each once it is free), starting a worker of the served version in
        each one's place until the served version has ``count`` normal workers; then stop its shadow
        worker, if it was promoted from a shadow. At most ``count + 1`` processes at any time."""
        new = self.model.version if self.model is not None else None
        with self._lock:
            self._versions.pop(old, None)  # from now on, a failed worker of ``old`` is not replaced
            olds = [w for w in self._workers.values() if w.version == old]
            normal = sum(1 for w in self._workers.values() if w.version == new and not w.shadow)
        loaders: dict[int, threading.Thread] = {}  # slot → the thread starting a new worker in it
        for worker in olds:
            self._stop(worker, timeout_s)
            if normal < self.count and new is not None:
                normal += 1
                loaders[worker.index] = threading.Thread(target=self._restart, args=(worker.index, self.config, new),
                                                         name=f"load-worker-{worker.index}", daemon=True)
                loaders[worker.index].start()
        self._forget(old)
        for loader in loaders.values():  # a replacement that cannot start keeps retrying in the background
            loader.join(START_TIMEOUT_S)
        for worker in [w for w in list(self._workers.values()) if w.version == new and w.shadow]:
            if normal >= self.count:
                self._stop(worker, timeout_s)
        self._renumber(busy={index for index, loader in loaders.items() if loader.is_alive()})

    def drop(self, version: str, timeout_s: float = 60.0) -> None:
        """Stop every worker of ``version`` (a shadow that ends), each once it is free."""
        with self._lock:
            self._versions.pop(version, None)
            workers = [w for w in self._workers.values() if w.version == version]
        for worker in workers:
            self._stop(worker, timeout_s)
        self._forget(version)

    # ---- helpers --------------------------------------------------------------------------------
    def _forget(self, version: str) -> None:
        """No worker of ``version`` remains: anyone still waiting for one hears so."""
        idle = self._idle.pop(version, None)
        if idle is not None:
            idle.put(None)

    def _take_this(self, worker: WorkerProcess, timeout_s: float) -> bool:
        """Wait until ``worker`` is free and take it out of its queue; False if it died (and was
        replaced) or did not come free within ``timeout_s``."""
        idle = self._idle.get(str(worker.version))
        deadline = time.monotonic() + timeout_s
        while idle is not None and time.monotonic() < deadline:
            if self._workers.get(worker.index) is not worker:
                return False  # it failed meanwhile: the pool has already dealt with it
            try:
                taken = idle.get(timeout=0.05)
            except queue.Empty:
                continue
            if taken is worker:
                return True
            idle.put(taken)  # another one (or None, closing): back where it was
            if taken is None:
                return False
            time.sleep(0.005)
        return False

    def _stop(self, worker: WorkerProcess, timeout_s: float) -> None:
        """Stop ``worker`` once it is free (or kill it after ``timeout_s``: its batch is then retried or lost)."""
        free = self._take_this(worker, timeout_s)
        with self._lock:
            if self._workers.get(worker.index) is not worker:
                return
            del self._workers[worker.index]
        if free:
            worker.stop()
        else:
            log.warning("model worker %d (version %s) still busy after %.0fs; killing it", worker.index,
                        worker.version, timeout_s)
            worker.kill()
        log.info("model worker %d (version %s, pid %d) stopped", worker.index, worker.version, worker.pid)

    def _renumber(self, busy: set[int]) -> None:
        """Give the served version's extra workers the free indices below ``count`` (not those a
        worker is still starting in: ``busy``), so that the per-worker metrics (labelled 0 … count-1)
        keep showing every worker."""
        with self._lock:
            free = [i for i in range(self.count) if i not in self._workers and i not in busy]
            for worker in [w for w in self._workers.values() if w.index >= self.count and not w.shadow]:
                if not free:
                    break
                del self._workers[worker.index]
                worker.index = free.pop(0)
                self._workers[worker.index] = worker
