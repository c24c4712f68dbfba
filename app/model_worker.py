"""One model-worker process: ``python -m app.model_worker <fd>``, started by :class:`app.workers.WorkerPool`.

It reads its :class:`~app.workers.WorkerConfig` from the socket ``fd``, loads and warms up its own
engine, reports the :class:`~app.scorer.ModelSummary` of what it loaded (version and checksum, which
the pool checks), then scores each batch it receives until told to stop (``None``) or until the front
is gone. Started as a module (not with multiprocessing's spawn, which would re-import the parent's
``__main__``); batches and results cross the socket pair as pickles.

It ignores SIGINT and SIGTERM (the front drains first, then tells it to exit, so a signal to the
whole process group cannot cut a batch short), and it exits on its own when the front dies, however
it dies: end of file on the socket, or a new parent process (checked every second, so a SIGKILL of
the front while this worker is busy also ends it). Its log lines use the front's format and level
and never contain review text.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

# Workers run at a lower CPU priority than the front: with one worker per core, the front's event
# loop (HTTP, JSON, handing out batches) would otherwise wait for a time slice behind busy workers,
# and every request's latency with it. The front is light, so the workers lose little.
WORKER_NICE = 5
PARENT_CHECK_S = 1.0
log = logging.getLogger("app.model_worker")


def watch_parent(parent: int, check_s: float = PARENT_CHECK_S) -> None:
    """Exit this process at once when ``parent`` is no longer its parent (the front died)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(check_s)
        os._exit(0)  # no clean-up: the front that would read our answer is gone

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(conn: Connection) -> None:
    """A worker's life: config → load → warm up → report → score batches until told to stop."""
    watch_parent(os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        config = conn.recv()
    except (EOFError, OSError):
        return
    try:
        os.nice(WORKER_NICE + config.extra_nice)
    except OSError:  # not permitted here: run at the front's priority
        pass
    import torch

    torch.set_num_threads(1)  # one core per worker: the workers together use them all
    from app.logs import configure_logging
    from app.resources import tune_gc
    from app.scorer import ModelSummary
    from sentiment.engine import SentimentEngine

    try:
        configure_logging(config.log_format, config.log_level)
        started = time.perf_counter()
        engine = SentimentEngine.load(config.artifacts_dir, config.device, precision=config.precision,
                                      max_tokens=config.max_tokens, max_explain_tokens=config.max_explain_tokens,
                                      max_batch_tokens=config.max_batch_tokens, version=config.version)
        warm = engine.warm_up() if config.warmup else 0.0
        log.info("model worker (pid %d) loaded %s in %.2fs (warm-up %.2fs)", os.getpid(), engine.version,
                 time.perf_counter() - started, warm)
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
        batch = engine.score(requests)
        for i in batch.errors:  # some library errors cannot be pickled: send their type's name instead
            try:
                pickle.loads(pickle.dumps(batch.results[i]))
            except Exception:
                batch.results[i] = RuntimeError(type(batch.results[i]).__name__)
        conn.send(batch)


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
