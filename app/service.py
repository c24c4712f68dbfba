"""The service's life cycle and request path: load → warm up → ready → serve → drain.

Ties the engine (tensors), the batcher (asyncio) and the metrics together; the routes only
translate HTTP to calls on :class:`SentimentService` and back.
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
from functools import partial
from typing import Any, Awaitable, Callable, Sequence

import torch

from app.batcher import BatcherClosedError, MicroBatcher, QueueFullError
from app.engine import EmptyTextError, Score, SentimentEngine, TextRequest
from app.errors import ApiError
from app.metrics import ServiceMetrics
from app.settings import Settings

log = logging.getLogger("app")


class State(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


class SentimentService:
    """Owns the engine, the batcher, the executors and the readiness state."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics,
                 engine_factory: Callable[[Settings], SentimentEngine] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = State.LOADING
        self.detail: str | None = "model is loading"
        self.engine: SentimentEngine | None = None
        self.batcher: MicroBatcher[TextRequest, Score] | None = None
        self._engine_factory = engine_factory or self._load_engine
        # One model thread: each batch is tokenised and run there, off the event loop; torch uses its
        # own intra-op threads for the forward pass.
        self._model_executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth if self.batcher else 0)
        self.metrics.ready.set_function(lambda: 1.0 if self.state is State.READY else 0.0)

    # ---- life cycle -------------------------------------------------------------------------
    @staticmethod
    def _load_engine(settings: Settings) -> SentimentEngine:
        return SentimentEngine.load(settings.artifacts_dir, settings.device, max_tokens=settings.max_tokens,
                                    max_batch_tokens=settings.max_batch_tokens)

    def _load_blocking(self) -> SentimentEngine:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        started = time.perf_counter()
        engine = self._engine_factory(self.settings)
        warm = engine.warm_up() if self.settings.warmup else 0.0
        log.info("model %s loaded on %s in %.2fs (warm-up %.2fs)", engine.version, engine.device,
                 time.perf_counter() - started, warm)
        return engine

    async def start(self) -> None:
        """Load and warm up the model off the event loop, then start batching and report ready."""
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(self._model_executor, self._load_blocking)
        except Exception as exc:
            self.state, self.detail = State.FAILED, f"model failed to load: {exc}"
            log.critical("%s (artifacts: %s) — readiness stays 503", self.detail, self.settings.artifacts_dir)
            return
        self.engine = engine
        self.batcher = MicroBatcher(
            partial(engine.score, on_tokenized=self.metrics.tokenize_duration.observe), self._model_executor,
            max_batch_size=self.settings.max_batch_size, max_wait_s=self.settings.max_wait_ms / 1000,
            max_queue=self.settings.max_queue, on_batch=self._observe_batch)
        self.batcher.start()
        card = engine.artifacts.card
        self.metrics.model_info.info({"version": engine.version, "device": str(engine.device),
                                      "vocab_size": str(len(engine.artifacts.vocab)),
                                      "test_accuracy": str(card.get("metrics", {}).get("test", {}).get("accuracy", ""))})
        if self.state is State.LOADING:
            self.state, self.detail = State.READY, None

    def begin_draining(self) -> None:
        """Readiness turns 503 at once; accepted work still finishes."""
        if self.state is not State.FAILED:
            self.state, self.detail = State.DRAINING, "shutting down"
        log.info("draining: readiness now 503, finishing accepted work")

    async def shutdown(self) -> None:
        """Finish every accepted text, then release the executors."""
        self.begin_draining()
        if self.batcher is not None:
            await self.batcher.stop(drain=True)
        self._model_executor.shutdown(wait=True)
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

    # ---- request path -----------------------------------------------------------------------
    def require_ready(self) -> SentimentEngine:
        # While draining, requests that still arrive (load balancers take a moment to notice the
        # 503 readiness) are served until the batcher closes; only then are they refused.
        serving = self.state is State.READY or (self.state is State.DRAINING and self.batcher is not None
                                                 and not self.batcher.closed)
        if serving and self.engine is not None:
            return self.engine
        headers = {"Retry-After": "5"} if self.state in (State.LOADING, State.DRAINING) else None
        raise ApiError(503, f"not_ready_{self.state.value}", f"service is not ready: {self.detail}", headers=headers)

    def validate_texts(self, texts: Sequence[str]) -> None:
        """Per-request limits from settings; each problem names the text it is about."""
        s = self.settings
        if len(texts) > s.max_texts:
            raise ApiError(413, "too_many_texts", f"{len(texts)} texts in one request; the limit is {s.max_texts}",
                           [{"loc": ["body", "texts"], "msg": f"at most {s.max_texts} texts per request"}])
        problems = []
        for i, text in enumerate(texts):
            if len(text) > s.max_text_chars:
                problems.append((413, "text_too_long", {"loc": ["body", "texts", i],
                                 "msg": f"text has {len(text)} characters; the limit is {s.max_text_chars}"}))
            elif not text.strip():
                problems.append((422, "empty_text", {"loc": ["body", "texts", i], "msg": "text is empty or whitespace"}))
        if problems:
            status, code, _ = problems[0]
            details = [p[2] for p in problems]
            raise ApiError(status, code, f"{len(problems)} invalid text(s): " + "; ".join(
                f"texts[{d['loc'][2]}]: {d['msg']}" for d in details[:5]), details)

    async def predict(self, texts: Sequence[str], trace: bool,
                      disconnected: Callable[[], Awaitable[None]] | None = None,
                      gates: bool = False) -> tuple[SentimentEngine, list[Score]]:
        """Queue the texts for a batch (tokenised and scored on the model thread); wait with the
        request timeout and a disconnect watch, so a caller who leaves leaves no work behind."""
        engine = self.require_ready()
        self.validate_texts(texts)
        assert self.batcher is not None
        work = asyncio.ensure_future(self.batcher.submit_many(
            [TextRequest(text, trace, gates, i) for i, text in enumerate(texts)]))
        waiters: set[asyncio.Future] = {work}
        watcher = asyncio.ensure_future(disconnected()) if disconnected else None
        if watcher is not None:
            waiters.add(watcher)
        try:
            done, _ = await asyncio.wait(waiters, timeout=self.settings.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watcher is not None:
                watcher.cancel()
        if work not in done:
            work.cancel()  # cancelled items are skipped by the batcher: no work left behind
            if watcher is not None and watcher in done:
                raise ApiError(499, "client_disconnected", "client closed the connection before the answer")
            raise ApiError(504, "timeout", f"no answer within {self.settings.request_timeout_s:g}s; "
                           "the service is overloaded or the request too large", headers={"Retry-After": "1"})
        try:
            scores = work.result()
        except EmptyTextError as exc:
            raise ApiError(422, "empty_text", str(exc)) from exc
        except QueueFullError as exc:
            raise self._overloaded(exc) from exc
        except BatcherClosedError as exc:
            raise ApiError(503, "not_ready_draining", str(exc), headers={"Retry-After": "5"}) from exc
        self.metrics.texts.inc(len(scores))
        for s in scores:
            self.metrics.tokens_per_text.observe(s.num_tokens)
            if s.truncated:
                self.metrics.truncated.inc()
        return engine, scores

    def _overloaded(self, exc: Exception) -> ApiError:
        return ApiError(503, "overloaded", f"service is overloaded: {exc}; retry shortly", headers={"Retry-After": "1"})

    def _observe_batch(self, size: int, waits: list[float], seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_duration.observe(seconds)
        for w in waits:
            self.metrics.queue_wait.observe(w)
