"""The service's life cycle: load → warm up → ready → serve → drain, and what readiness and
liveness report at each step.

It owns the scorer (built by :func:`app.scorer.build_scorer`, the one place that knows which kind),
the batcher and the threads that feed it. It knows nothing of HTTP or of individual requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any, Callable

from app.batcher import BatchProcessor, MicroBatcher
from app.errors import ApiError, Errors
from app.lanes import LANES, Lane
from app.metrics import ServiceMetrics
from app.resources import resident_bytes, tune_gc
from app.scorer import EngineFactory, ModelSummary, build_scorer
from app.settings import Settings
from sentiment.engine import Score, ScoreRequest

log = logging.getLogger("app")


class State(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


class Lifecycle:
    """Readiness state, the scorer, and the batcher that feeds it."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = State.LOADING
        self.detail: str | None = "model is loading"
        self.model: ModelSummary | None = None  # set once the scorer has loaded
        self.batcher: MicroBatcher[ScoreRequest, Score] | None = None
        self.on_fatal: Callable[[], None] | None = None  # set by ``python -m app``: stop the process
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scorer = build_scorer(settings, metrics, self._fail_from_thread, engine_factory)
        # Loads the model off the event loop; then one thread per batch slot waits on the scorer.
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._batch_threads = ThreadPoolExecutor(self.scorer.slots, thread_name_prefix="batch")
        metrics.queue_depth.set_function(lambda: self._by_lane(lambda b, lane: b.lanes.depth_of(lane)))
        metrics.queue_cost.set_function(lambda: self._by_lane(lambda b, lane: b.lanes.cost_of(lane)))
        metrics.estimated_wait.set_function(lambda: self._by_lane(lambda b, lane: b.estimated_wait_s(0, lane)))
        metrics.ready.set_function(lambda: 1.0 if self.is_ready() else 0.0)
        metrics.resident_memory.set_function(lambda: resident_bytes() + self.scorer.resident_bytes())

    async def start(self, process: BatchProcessor[ScoreRequest, Score]) -> None:
        """Load and warm up the model off the event loop, then batch into ``process`` and report ready."""
        loop = self._loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(self._loader, self.scorer.start)
        except Exception:
            # The reason (with file paths) goes to the log only; clients see a fixed detail.
            log.critical("model failed to load from %s", self.settings.artifacts_dir, exc_info=True)
            self._fail("model failed to load (see the service log)")
            return
        self.model = model
        tune_gc()  # the loaded model and libraries are never garbage: keep collections short and rare
        s = self.settings
        self.batcher = MicroBatcher(process, self._batch_threads, max_batch_size=s.max_batch_size,
                                    max_wait_s=s.max_wait_ms / 1000, max_queue=s.max_queue, max_queue_cost=s.max_queue_cost,
                                    on_batch=self._observe_batch, max_batch_cost=s.max_batch_cost,
                                    max_in_flight=self.scorer.slots, batch_lane_share=s.batch_lane_share,
                                    batch_lane_batch_cost=s.batch_lane_batch_cost)
        self.batcher.start()
        assert self.batcher.task is not None
        self.batcher.task.add_done_callback(self._on_batcher_exit)
        self.serve(model)
        if self.state is State.LOADING:
            self.state, self.detail = State.READY, None

    def serve(self, model: ModelSummary) -> None:
        """``model`` is the one served from now on (at start, and when a model swap promotes another
        version: :class:`app.model_control.ModelControl` calls this under its version pins' lock)."""
        self.model = model
        test_accuracy = model.card.get("metrics", {}).get("test", {}).get("accuracy", "")
        self.metrics.model_info.info({"version": model.version, "device": model.device, "precision": model.precision,
                                      "workers": str(model.workers), "vocab_size": str(model.vocab_size),
                                      "test_accuracy": str(test_accuracy)})

    def _by_lane(self, read: Callable[[MicroBatcher, Lane], float]) -> dict[str, float]:
        """A queue gauge's value for each lane (0 before the batcher exists)."""
        batcher = self.batcher
        return {lane: read(batcher, lane) if batcher is not None else 0.0 for lane in LANES}

    def _fail(self, detail: str) -> None:
        """Serving is impossible (load failed, the batcher died, a worker cannot be replaced):
        readiness and liveness fail, and under ``python -m app`` the process exits non-zero so that
        the orchestrator restarts it."""
        self.state, self.detail = State.FAILED, detail
        if self.on_fatal is not None:
            self.on_fatal()

    def _fail_from_thread(self, detail: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail, detail)
        else:  # still loading: the loader's failure path reports it
            self.state, self.detail = State.FAILED, detail

    def _on_batcher_exit(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            log.critical("the batch worker stopped unexpectedly", exc_info=None if task.cancelled() else task.exception())
            self._fail("the batch worker stopped (see the service log)")

    def _observe_batch(self, size: int, waits: list[float], seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_duration.observe(seconds)
        for w in waits:
            self.metrics.queue_wait.observe(w)

    # ---- what the probes report ---------------------------------------------------------------
    def stuck_for_s(self) -> float:
        """How long the running batch has been running beyond ``stuck_batch_s`` (0 if not stuck)."""
        since = self.batcher.running_since if self.batcher else None
        if since is None:
            return 0.0
        return max(0.0, time.monotonic() - since - self.settings.stuck_batch_s)

    def is_ready(self) -> bool:
        return self.readiness()[0]

    def is_alive(self) -> bool:
        """False when only a restart can help: serving failed, or a batch has hung past the bound."""
        if self.state is State.FAILED:
            return False
        return self.stuck_for_s() <= self.settings.stuck_liveness_s - self.settings.stuck_batch_s

    def readiness(self) -> tuple[bool, str, str | None]:
        """(ready, status, detail) for ``/health/ready``; details never carry paths or exception text."""
        if self.state is State.READY and self.stuck_for_s() > 0:
            since = self.batcher.running_since if self.batcher else None
            running = time.monotonic() - since if since is not None else 0.0
            return False, "stuck", f"a batch has been running for {running:.0f}s"
        if self.state is State.READY and (detail := self.scorer.unready_detail()) is not None:
            return False, "restarting", detail
        if self.state is State.READY:  # ready while anything serves; a shortfall is reported, not fatal
            return True, "ready", self.scorer.degraded_detail()
        return False, self.state.value, self.detail

    def require_serving(self) -> ModelSummary:
        """The model being served, or the 503 that says why no prediction can be taken now."""
        # While draining, requests that still arrive (load balancers take a moment to notice the
        # 503 readiness) are served until the batcher closes; only then are they refused.
        serving = self.state is State.READY or (self.state is State.DRAINING and self.batcher is not None
                                                 and not self.batcher.closed)
        if serving and self.model is not None and self.stuck_for_s() == 0:
            return self.model
        _, status, detail = self.readiness()
        kind = {"loading": Errors.NOT_READY_LOADING, "failed": Errors.NOT_READY_FAILED,
                "stuck": Errors.NOT_READY_STUCK}.get(status, Errors.NOT_READY_DRAINING)
        raise ApiError(kind, detail=detail)

    # ---- shutting down ------------------------------------------------------------------------
    def begin_draining(self) -> None:
        """Readiness turns 503 at once; accepted work still finishes."""
        if self.state is not State.FAILED:
            self.state, self.detail = State.DRAINING, "shutting down"
        log.info("draining: readiness now 503, finishing accepted work")

    async def shutdown(self) -> None:
        """Finish every accepted text, then release the scorer and the threads."""
        self.begin_draining()
        if self.batcher is not None:
            await self.batcher.stop(drain=True, timeout_s=self.settings.graceful_timeout_s)
        # A hung batch must not hold the process forever: do not wait for its thread.
        stuck = self.stuck_for_s() > 0
        self._loader.shutdown(wait=not stuck, cancel_futures=True)
        self.scorer.close()  # after the drain: every accepted text has its answer (a hung worker is killed)
        self._batch_threads.shutdown(wait=not stuck, cancel_futures=True)
        log.info("shutdown complete")

    def install_sigterm_hook(self, loop: asyncio.AbstractEventLoop) -> None:
        """On SIGTERM: report not-ready, wait ``shutdown_delay_s`` (for load balancers), then let the
        server's own handler (uvicorn's) stop accepting connections and finish in-flight requests."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (not under TestClient)
        previous = signal.getsignal(signal.SIGTERM)

        def forward(signum: int, frame: Any) -> None:
            if callable(previous):
                previous(signum, frame)
            else:  # no server handler: restore the default and re-deliver
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            self.begin_draining()
            delay = self.settings.shutdown_delay_s
            if delay > 0:
                loop.call_soon_threadsafe(loop.call_later, delay, forward, signum, frame)
            else:
                forward(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
