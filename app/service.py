"""The service's life cycle and request path: load → warm up → ready → serve → drain.

How one review flows to its probability:

    routes.predict (HTTP → PredictRequest), or oip.infer (an inference request's BYTES tensor)
      → SentimentService.predict   validate limits, one ScoreRequest per text (an explanation: one per
                                   32 token positions, merged back), admission by cost, wait with timeout
      → MicroBatcher.submit_many   queue; the worker gathers a batch from concurrent callers
      → SentimentService.score_batch   on a batch thread; up to one batch in flight per model worker
      → ModelWorkers.score         hands the batch to a free model-worker process (app.workers) …
      → SentimentEngine.score      … which tokenises, text → tokens → ids (sentiment.text), and runs
                                   length-bucketed passes (with SENTIMENT_WORKERS=0: in this process)
      → SentimentLSTM (TorchScript) (B, T) ids → (B,) last-token probability, (B, T) trace
      → back to each caller's future → routes.predict shapes the JSON response

The engine knows tensors, the batcher knows asyncio, the routes know HTTP; this module ties them
together with the metrics and the readiness state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any, Awaitable, Callable, Sequence

import torch

from app.batcher import BatcherClosedError, MicroBatcher, QueueFullError
from app.errors import ApiError, Errors
from app.logs import note_explained, note_texts
from app.metrics import ServiceMetrics
from app.settings import Settings
from app.tracing import RequestTimings, current_timings, record_batch
from app.workers import ModelWorkers, WorkerConfig, WorkerDiedError, resident_bytes, tune_gc, usable_cpus
from sentiment import label_of
from sentiment.artifacts import resolve_device
from sentiment.engine import EmptyTextError, ExplainTooLongError, Score, ScoreRequest, ScoredBatch, SentimentEngine

log = logging.getLogger("app")

# Queue cost model (see SentimentService.text_cost). Measured with the shipped model on 2 CPU cores,
# 256 test reviews per call: ~5 µs per character (tokenising + forward), a gate trace 5.9× that
# (38.4 vs 6.5 ms per review); a one-word text costs ~0.09 ms in a batch of 64 (~18 characters' worth).
# Only ratios matter: the wait estimate divides by the throughput measured in the same units.
CHARS_PER_TOKEN = 8
TEXT_OVERHEAD_CHARS = 50
GATES_COST_FACTOR = 6
# An occlusion explanation scores the text once per token, each time without that token: about
# (tokens + 1) × the text's own work. Tokens are estimated from characters (IMDB: ~5 per token).
EXPLAIN_CHARS_PER_TOKEN = 5
# Positions per queue item of an explanation: small enough that other requests get a turn every
# ~100 ms (32 variants of a 400-token review), large enough that re-scoring the text once per item
# costs ~3 %.
EXPLAIN_CHUNK_TOKENS = 32

# JSON can carry "\ud800" alone; Python keeps it, but it is not Unicode and no encoder can take it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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
        self.batcher: MicroBatcher[ScoreRequest, Score] | None = None
        self._own_engine = engine_factory is None  # a test's factory cannot be rebuilt in a worker process
        self._engine_factory = engine_factory or self._load_engine
        self.workers: ModelWorkers | None = None
        # Loads the model; with SENTIMENT_WORKERS=0 it also runs every batch (tokenise + forward) off
        # the event loop, torch using its own intra-op threads. With workers, batch threads (one per
        # worker) each wait on a worker process instead.
        self._model_executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._batch_executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_fatal: Callable[[], None] | None = None  # set by ``python -m app``: stop the process
        # id(ScoreRequest) → its traced request's timings, while it waits (empty unless tracing is on).
        self._traced: dict[int, RequestTimings] = {}
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth if self.batcher else 0)
        self.metrics.queue_cost.set_function(lambda: self.batcher.queued_cost if self.batcher else 0)
        self.metrics.estimated_wait.set_function(lambda: self.batcher.estimated_wait_s() if self.batcher else 0)
        self.metrics.ready.set_function(lambda: 1.0 if self.is_ready() else 0.0)
        self.metrics.workers_ready.set_function(lambda: self.workers.ready if self.workers else 0)
        self.metrics.resident_memory.set_function(self._resident_bytes)

    # ---- life cycle -------------------------------------------------------------------------
    @staticmethod
    def _load_engine(settings: Settings) -> SentimentEngine:
        return SentimentEngine.load(settings.artifacts_dir, settings.device, max_tokens=settings.max_tokens,
                                    max_explain_tokens=settings.max_explain_tokens,
                                    max_batch_tokens=settings.max_batch_tokens, precision=settings.precision)

    def worker_count(self) -> int:
        """Model-worker processes to run: the setting, else one per usable core on CPU and none on
        CUDA (one GPU wants big batches from one process, not several processes sharing it)."""
        if not self._own_engine:
            return 0
        if self.settings.workers is not None:
            return self.settings.workers
        return usable_cpus() if resolve_device(self.settings.device).type == "cpu" else 0

    def _load_blocking(self) -> SentimentEngine:
        """Load the model here (its card, vocabulary and limits answer /v1/model; with no workers it
        also scores), then start and warm up the workers, all before readiness."""
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        started = time.perf_counter()
        engine = self._engine_factory(self.settings)
        count = self.worker_count()
        warm = engine.warm_up() if self.settings.warmup and count == 0 else 0.0
        log.info("model %s loaded on %s in %.2fs (warm-up %.2fs)", engine.version, engine.device,
                 time.perf_counter() - started, warm)
        if count:
            s = self.settings
            config = WorkerConfig(str(s.artifacts_dir), s.device, s.precision, s.max_tokens, s.max_explain_tokens,
                                  s.max_batch_tokens, s.warmup)
            loop = self._loop
            assert loop is not None
            workers = ModelWorkers(config, count, on_restart=self.metrics.worker_restarts.inc,
                                   on_fatal=lambda detail: loop.call_soon_threadsafe(self._fail, detail))
            self.workers = workers  # before start(): a failed start still closes what it began
            workers.start()
            for i in range(count):
                self.metrics.worker_memory.labels(worker=str(i)).set_function(
                    lambda i=i: workers.resident_bytes().get(i, 0))
            self._batch_executor = ThreadPoolExecutor(count, thread_name_prefix="batch")
        return engine

    def _resident_bytes(self) -> float:
        """This process's resident memory plus its workers'."""
        return resident_bytes() + (sum(self.workers.resident_bytes().values()) if self.workers else 0)

    async def start(self) -> None:
        """Load and warm up the model off the event loop, then start batching and report ready."""
        loop = self._loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(self._model_executor, self._load_blocking)
        except Exception:
            # The reason (with file paths) goes to the log only; clients see a fixed detail.
            log.critical("model failed to load from %s", self.settings.artifacts_dir, exc_info=True)
            self._fail("model failed to load (see the service log)")
            return
        self.engine = engine
        tune_gc()  # the loaded model and libraries are never garbage: keep collections short and rare
        self.batcher = MicroBatcher(
            self.score_batch, self._batch_executor or self._model_executor,
            max_batch_size=self.settings.max_batch_size, max_wait_s=self.settings.max_wait_ms / 1000,
            max_queue=self.settings.max_queue, on_batch=self._observe_batch,
            max_batch_cost=self.settings.max_batch_cost, max_in_flight=self.workers.count if self.workers else 1)
        self.batcher.start()
        assert self.batcher.task is not None
        self.batcher.task.add_done_callback(self._on_worker_exit)
        card = engine.artifacts.card
        self.metrics.model_info.info({"version": engine.version, "device": str(engine.device),
                                      "precision": engine.precision,
                                      "workers": str(self.workers.count if self.workers else 0),
                                      "vocab_size": str(len(engine.artifacts.vocab)),
                                      "test_accuracy": str(card.get("metrics", {}).get("test", {}).get("accuracy", ""))})
        if self.state is State.LOADING:
            self.state, self.detail = State.READY, None

    def _fail(self, detail: str) -> None:
        """Serving is impossible (load failed, batch worker died): readiness and liveness fail, and
        under ``python -m app`` the process exits non-zero so that the orchestrator restarts it."""
        self.state, self.detail = State.FAILED, detail
        if self.on_fatal is not None:
            self.on_fatal()

    def _on_worker_exit(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            log.critical("the batch worker stopped unexpectedly", exc_info=None if task.cancelled() else task.exception())
            self._fail("the batch worker stopped (see the service log)")

    def stuck_for_s(self) -> float:
        """How long the running batch has been running beyond ``stuck_batch_s`` (0 if not stuck)."""
        since = self.batcher.running_since if self.batcher else None
        if since is None:
            return 0.0
        return max(0.0, time.monotonic() - since - self.settings.stuck_batch_s)

    def is_ready(self) -> bool:
        return self.state is State.READY and self.stuck_for_s() == 0 and self._workers_missing() == 0

    def _workers_missing(self) -> int:
        """Model workers not serving now (one that died is being replaced)."""
        return self.workers.count - self.workers.ready if self.workers else 0

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
        if self.state is State.READY and (missing := self._workers_missing()):
            assert self.workers is not None
            return False, "restarting", (f"{missing} of {self.workers.count} model workers restarting "
                                         "(requests are still served by the others)")
        return self.state is State.READY, self.state.value, self.detail

    def begin_draining(self) -> None:
        """Readiness turns 503 at once; accepted work still finishes."""
        if self.state is not State.FAILED:
            self.state, self.detail = State.DRAINING, "shutting down"
        log.info("draining: readiness now 503, finishing accepted work")

    async def shutdown(self) -> None:
        """Finish every accepted text, then release the executors."""
        self.begin_draining()
        if self.batcher is not None:
            await self.batcher.stop(drain=True, timeout_s=self.settings.graceful_timeout_s)
        # A hung batch must not hold the process forever: do not wait for the model thread.
        stuck = self.stuck_for_s() > 0
        self._model_executor.shutdown(wait=not stuck, cancel_futures=True)
        if self.workers is not None:
            self.workers.close()  # after the drain: every accepted text has its answer
        if self._batch_executor is not None:
            self._batch_executor.shutdown(wait=not stuck, cancel_futures=True)
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
        """The engine, or the 503 that says why the service cannot take predictions now."""
        # While draining, requests that still arrive (load balancers take a moment to notice the
        # 503 readiness) are served until the batcher closes; only then are they refused.
        serving = self.state is State.READY or (self.state is State.DRAINING and self.batcher is not None
                                                 and not self.batcher.closed)
        if serving and self.engine is not None and self.stuck_for_s() == 0:
            return self.engine
        ready, status, detail = self.readiness()
        kind = {"loading": Errors.NOT_READY_LOADING, "failed": Errors.NOT_READY_FAILED,
                "stuck": Errors.NOT_READY_STUCK}.get(status, Errors.NOT_READY_DRAINING)
        raise ApiError(kind, detail=detail)

    def validate_texts(self, texts: Sequence[str]) -> None:
        """Per-request limits from settings; each problem names the text it is about."""
        s = self.settings
        if len(texts) > s.max_texts:
            raise ApiError(Errors.TOO_MANY_TEXTS, [{"loc": ["body", "texts"], "msg": f"at most {s.max_texts} texts per request"}],
                           count=len(texts), limit=s.max_texts)
        long_word = re.compile(r"\S{%d,}" % (s.max_word_chars + 1))
        problems = []
        for i, text in enumerate(texts):
            if len(text) > s.max_text_chars:
                problems.append((Errors.TEXT_TOO_LONG, i, f"text has {len(text)} characters; the limit is {s.max_text_chars}"))
            elif not text.strip():
                problems.append((Errors.EMPTY_TEXT, i, "text is empty or whitespace"))
            elif (bad := LONE_SURROGATE.search(text)) is not None:
                problems.append((Errors.INVALID_UNICODE, i, f"lone surrogate U+{ord(bad.group()):04X} at character "
                                 f"{bad.start()}: not valid Unicode (escape astral characters as a \\uD8xx\\uDCxx pair)"))
            elif (word := long_word.search(text)) is not None:
                problems.append((Errors.WORD_TOO_LONG, i, f"{len(word.group())} characters without whitespace at character "
                                 f"{word.start()}; the limit is {s.max_word_chars}"))
        if problems:
            raise self._text_problems(problems)

    @staticmethod
    def _text_problems(problems: list[tuple[Any, int, str]]) -> ApiError:
        """One error for a request's invalid texts: the first problem's kind, every text named."""
        details = [{"loc": ["body", "texts", i], "msg": msg} for _, i, msg in problems]
        summary = "; ".join(f"texts[{i}]: {msg}" for _, i, msg in problems[:5])
        return ApiError(problems[0][0], details, count=len(problems), summary=summary)

    def score_batch(self, requests: list[ScoreRequest]) -> list[Score | Exception]:
        """The batcher's processor, run on the model thread: one engine call per batch."""
        assert self.engine is not None
        started_ns = time.time_ns() if self._traced else 0
        batch: ScoredBatch = self.workers.score(requests) if self.workers else self.engine.score(requests)
        self.metrics.tokenize_duration.observe(batch.tokenize_seconds)
        if started_ns:  # a traced request waits on this batch: its spans need the batch's times
            record_batch(self._traced, requests, started_ns, batch.tokenize_seconds, batch.forward_seconds)
        return batch.results

    def work_items(self, text: str, trace: bool, gates: bool, explain: bool) -> list[tuple[ScoreRequest, float]]:
        """The queue items for one text, each with its cost (work in characters the tokenizer and
        model will see).

        A text is one item, costed at its characters up to what truncation keeps (about
        ``CHARS_PER_TOKEN`` × max_tokens) plus a fixed overhead; a gate trace (a step-by-step unrolled
        LSTM) costs ``GATES_COST_FACTOR`` ×. An explanation scores the text once more per token, so it
        is split into items of ``EXPLAIN_CHUNK_TOKENS`` positions each: the batcher can then serve
        other requests between them, and a light request never waits behind a whole explanation.
        """
        assert self.engine is not None
        kept = min(len(text), CHARS_PER_TOKEN * self.engine.max_tokens)
        chars = kept + TEXT_OVERHEAD_CHARS
        first = ScoreRequest(text, trace, gates)
        if not explain:
            return [(first, chars * (GATES_COST_FACTOR if gates else 1))]
        # Tokens, estimated: ~5 characters each, but never fewer than the whitespace-separated words
        # (a hostile text of one-letter words must not be charged for a fifth of its work).
        estimated = min(max(kept / EXPLAIN_CHARS_PER_TOKEN, len(text[:kept].split())), self.engine.max_explain_tokens)
        bound = min(len(text), self.engine.max_explain_tokens)  # a token has at least one character
        items = []
        for start in range(0, bound, EXPLAIN_CHUNK_TOKENS):
            stop = start + EXPLAIN_CHUNK_TOKENS
            request = ScoreRequest(text, trace and not start, gates and not start, True, (start, stop))
            base = chars * (GATES_COST_FACTOR if request.gates else 1)
            items.append((request, base + chars * max(0.0, min(stop, estimated) - start)))
        return items

    def text_cost(self, text: str, gates: bool, explain: bool = False) -> float:
        """The work one text brings to the queue (the sum of its items' costs)."""
        return sum(cost for _, cost in self.work_items(text, False, gates, explain))

    @staticmethod
    def _merge(outcomes: list[Score | Exception], groups: list[range]) -> list[Score | Exception]:
        """One outcome per text from its items: the first error, or the first item's score with the
        attributions of every item's span, in order."""
        merged: list[Score | Exception] = []
        for group in groups:
            parts = [outcomes[k] for k in group]
            error = next((o for o in parts if isinstance(o, BaseException)), None)
            if error is not None or len(parts) == 1:
                merged.append(error if error is not None else parts[0])
                continue
            head = parts[0]
            assert isinstance(head, Score) and head.explanation is not None
            attributions = [a for part in parts for a in part.explanation.attributions]  # type: ignore[union-attr]
            merged.append(dataclasses.replace(head, explanation=dataclasses.replace(
                head.explanation, attributions=attributions)))
        return merged

    async def predict(self, texts: Sequence[str], trace: bool,
                      disconnected: Callable[[], Awaitable[None]] | None = None,
                      gates: bool = False, explain: bool = False) -> tuple[SentimentEngine, list[Score]]:
        """Queue the texts for a batch (tokenised and scored on the model thread); wait with the
        request timeout and a disconnect watch, so a caller who leaves leaves no work behind.

        A request whose predicted wait (queued work ahead plus its own, ÷ the best recent measured
        throughput) exceeds the request timeout is shed at once with 503 + Retry-After instead of timing out
        later; on an idle service every request is admitted.
        """
        note_texts(len(texts))  # for the access log line and the span: the count only, never the texts
        if explain:
            note_explained()
        engine = self.require_ready()
        self.validate_texts(texts)
        if explain and len(texts) > self.settings.max_explain_texts:
            raise ApiError(Errors.TOO_MANY_EXPLAINED, [{"loc": ["body", "texts"], "msg": (
                f"at most {self.settings.max_explain_texts} texts per request with \"explain\"")}],
                count=len(texts), limit=self.settings.max_explain_texts)
        assert self.batcher is not None
        per_text = [self.work_items(t, trace, gates, explain) for t in texts]
        requests = [request for items in per_text for request, _ in items]
        costs = [cost for items in per_text for _, cost in items]
        groups, at = [], 0
        for items in per_text:
            groups.append(range(at, at + len(items)))
            at += len(items)
        wait = self.batcher.estimated_wait_s(sum(costs))
        # An idle service always admits: shedding cannot make that request any faster.
        if wait > self.settings.request_timeout_s and not self.batcher.idle:
            raise ApiError(Errors.OVERLOADED, reason=f"the estimated wait is {wait:.0f}s, over the "
                           f"{self.settings.request_timeout_s:g}s request timeout")
        timings = current_timings()  # None unless this request is traced (app.tracing)
        if timings is not None:
            timings.watch(requests, self._traced)
        work = asyncio.ensure_future(self.batcher.submit_many(requests, costs))
        waiters: set[asyncio.Future] = {work}
        watcher = asyncio.ensure_future(disconnected()) if disconnected else None
        if watcher is not None:
            waiters.add(watcher)
        try:
            done, _ = await asyncio.wait(waiters, timeout=self.settings.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled by the server (graceful-shutdown timeout): drop the queued texts
            work.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if timings is not None:
                timings.unwatch(requests, self._traced)
        if work not in done:
            work.cancel()  # the batcher drops the queued texts at once: no work left behind
            if watcher is not None and watcher in done:
                raise ApiError(Errors.CLIENT_DISCONNECTED)
            raise ApiError(Errors.TIMEOUT, seconds=self.settings.request_timeout_s)
        try:
            outcomes = work.result()
        except QueueFullError as exc:
            raise ApiError(Errors.OVERLOADED, reason=str(exc)) from exc
        except BatcherClosedError as exc:
            raise ApiError(Errors.NOT_READY_DRAINING, detail=str(exc)) from exc
        scores = self._scores_or_error(self._merge(outcomes, groups))
        self.metrics.texts.inc(len(scores))
        for s in scores:
            self.metrics.tokens_per_text.observe(s.num_tokens)
            self.metrics.probability.observe(s.probability)
            self.metrics.predictions.labels(label=label_of(s.probability)).inc()
            if s.truncated:
                self.metrics.truncated.inc()
            if s.explanation is not None:
                self.metrics.explained_texts.inc()
                self.metrics.explanation_variants.inc(s.num_tokens if s.num_tokens > 1 else 0)
        return engine, scores

    def _scores_or_error(self, outcomes: list[Score | Exception]) -> list[Score]:
        """The scores, or one error naming every text that could not be scored."""
        problems = []
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, EmptyTextError):
                problems.append((Errors.EMPTY_TEXT, i, "text contains no tokens after cleaning"))
            elif isinstance(outcome, ExplainTooLongError):
                problems.append((Errors.EXPLAIN_TOO_LONG, i, f"{outcome} (SENTIMENT_MAX_EXPLAIN_TOKENS); "
                                 "explain a shorter text or ask without \"explain\""))
            elif isinstance(outcome, WorkerDiedError):  # the batch's process died; a replacement is starting
                raise ApiError(Errors.WORKER_RESTARTED)
            elif isinstance(outcome, BatcherClosedError):  # drain out of time, or the worker died
                kind = Errors.NOT_READY_FAILED if self.state is State.FAILED else Errors.NOT_READY_DRAINING
                raise ApiError(kind, detail=str(outcome))
            elif isinstance(outcome, BaseException):
                # The type only: an exception's message could quote the text, and no text is ever logged.
                log.error("texts[%d] failed: %s", i, type(outcome).__name__)
                raise ApiError(Errors.TEXT_FAILED, index=i) from outcome
        if problems:
            raise self._text_problems(problems)
        return outcomes  # type: ignore[return-value]

    def _observe_batch(self, size: int, waits: list[float], seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_duration.observe(seconds)
        for w in waits:
            self.metrics.queue_wait.observe(w)
