"""The request path: admit a request's texts, queue them, wait for their scores, count them.

How one review flows to its probability:

    app.edge (HTTP: bounded body, media type, JSON errors) → routes.predict or oip.infer
      → SentimentService.predict   admission (app.admission: limits, cost, explanation items),
                                   shedding, then wait with the request timeout and a disconnect watch
      → MicroBatcher.submit_many   queue; the batcher gathers a batch from concurrent callers
      → SentimentService.score_batch   on a batch thread, one per scorer slot
      → Scorer.score               app.scorer: in this process, or a model-worker process (app.workers)
      → SentimentEngine.score      tokenise (sentiment.text), length-bucketed TorchScript passes
      → back to each caller's future → the route shapes the answer in its protocol

The life cycle (load, readiness, drain) is :class:`app.lifecycle.Lifecycle`; nothing here knows
which scorer is in use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Sequence

from app.admission import Plan, plan, text_problems, validate_texts
from app.batcher import BatcherClosedError, QueueFullError
from app.errors import ApiError, Errors
from app.lifecycle import Lifecycle, State
from app.logs import note_explained, note_texts
from app.metrics import ServiceMetrics
from app.scorer import BatchLostError, EngineFactory, ModelSummary, TextRejectedError
from app.settings import Settings
from app.tracing import RequestTimings, current_timings, record_batch
from sentiment import label_of
from sentiment.engine import EmptyTextError, ExplainTooLongError, Score, ScoreRequest

log = logging.getLogger("app")


class SentimentService:
    """Admits, queues and waits for predictions; owns the :class:`Lifecycle` that serves them."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.lifecycle = Lifecycle(settings, metrics, engine_factory)
        # id(ScoreRequest) → its traced request's timings, while it waits (empty unless tracing is on).
        self._traced: dict[int, RequestTimings] = {}

    # The life cycle, as the app's lifespan and the tests drive it.
    async def start(self) -> None:
        await self.lifecycle.start(self.score_batch)

    async def shutdown(self) -> None:
        await self.lifecycle.shutdown()

    def begin_draining(self) -> None:
        self.lifecycle.begin_draining()

    @property
    def batcher(self):  # noqa: ANN201 (the lifecycle's MicroBatcher, or None before loading)
        return self.lifecycle.batcher

    def score_batch(self, requests: list[ScoreRequest]) -> list[Score | Exception]:
        """The batcher's processor, run on a batch thread: one scorer call per batch."""
        started_ns = time.time_ns() if self._traced else 0
        batch = self.lifecycle.scorer.score(requests)
        self.metrics.tokenize_duration.observe(batch.tokenize_seconds)
        if started_ns:  # a traced request waits on this batch: its spans need the batch's times
            record_batch(self._traced, requests, started_ns, batch.tokenize_seconds, batch.forward_seconds)
        return batch.results

    async def predict(self, texts: Sequence[str], trace: bool,
                      disconnected: Callable[[], Awaitable[None]] | None = None,
                      gates: bool = False, explain: bool = False) -> tuple[ModelSummary, list[Score]]:
        """Queue the texts for a batch; wait with the request timeout and a disconnect watch, so a
        caller who leaves leaves no work behind. Returns the model that scored them and the scores.

        A request whose predicted wait (queued work ahead plus its own, ÷ the best recent measured
        throughput) exceeds the request timeout is shed at once with 503 + Retry-After instead of
        timing out later; on an idle service every request is admitted.
        """
        note_texts(len(texts))  # for the access log line and the span: the count only, never the texts
        if explain:
            note_explained()
        model = self.lifecycle.require_serving()
        validate_texts(texts, self.settings, explain)
        work = plan(texts, trace, gates, explain, model)
        batcher = self.lifecycle.batcher
        assert batcher is not None
        wait = batcher.estimated_wait_s(work.cost)
        # An idle service always admits: shedding cannot make that request any faster.
        if wait > self.settings.request_timeout_s and not batcher.idle:
            raise ApiError(Errors.OVERLOADED, reason=f"the estimated wait is {wait:.0f}s, over the "
                           f"{self.settings.request_timeout_s:g}s request timeout")
        outcomes = await self._wait_for(work, disconnected)
        scores = self._scores_or_error(work.merge(outcomes))
        self._count(scores)
        return model, scores

    async def _wait_for(self, work: Plan, disconnected: Callable[[], Awaitable[None]] | None) -> list[Score | Exception]:
        """Submit the plan's items and wait for their outcomes, the timeout or the client's departure;
        whichever comes first, nothing of this request stays queued."""
        batcher = self.lifecycle.batcher
        assert batcher is not None
        timings = current_timings()  # None unless this request is traced (app.tracing)
        if timings is not None:
            timings.watch(work.requests, self._traced)
        submitted = asyncio.ensure_future(batcher.submit_many(work.requests, work.costs))
        waiters: set[asyncio.Future] = {submitted}
        watcher = asyncio.ensure_future(disconnected()) if disconnected else None
        if watcher is not None:
            waiters.add(watcher)
        try:
            done, _ = await asyncio.wait(waiters, timeout=self.settings.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled by the server (graceful-shutdown timeout): drop the queued texts
            submitted.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if timings is not None:
                timings.unwatch(work.requests, self._traced)
        if submitted not in done:
            submitted.cancel()  # the batcher drops the queued texts at once: no work left behind
            if watcher is not None and watcher in done:
                raise ApiError(Errors.CLIENT_DISCONNECTED)
            raise ApiError(Errors.TIMEOUT, seconds=self.settings.request_timeout_s)
        try:
            return submitted.result()
        except QueueFullError as exc:
            raise ApiError(Errors.OVERLOADED, reason=str(exc)) from exc
        except BatcherClosedError as exc:
            raise ApiError(Errors.NOT_READY_DRAINING, detail=str(exc)) from exc

    def _scores_or_error(self, outcomes: list[Score | Exception]) -> list[Score]:
        """The scores, or one error naming every text that could not be scored."""
        problems = []
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, EmptyTextError):
                problems.append((Errors.EMPTY_TEXT, i, "text contains no tokens after cleaning"))
            elif isinstance(outcome, ExplainTooLongError):
                problems.append((Errors.EXPLAIN_TOO_LONG, i, f"{outcome} (SENTIMENT_MAX_EXPLAIN_TOKENS); "
                                 "explain a shorter text or ask without \"explain\""))
            elif isinstance(outcome, TextRejectedError):  # it broke a model worker twice: retrying cannot help
                problems.append((Errors.TEXT_CRASHED_WORKER, i, str(outcome)))
            elif isinstance(outcome, BatchLostError):  # no worker could take the batch (shutting down)
                raise ApiError(Errors.WORKER_RESTARTED)
            elif isinstance(outcome, BatcherClosedError):  # drain out of time, or the batcher died
                kind = Errors.NOT_READY_FAILED if self.lifecycle.state is State.FAILED else Errors.NOT_READY_DRAINING
                raise ApiError(kind, detail=str(outcome))
            elif isinstance(outcome, BaseException):
                # The type only: an exception's message could quote the text, and no text is ever logged.
                log.error("texts[%d] failed: %s", i, type(outcome).__name__)
                raise ApiError(Errors.TEXT_FAILED, index=i) from outcome
        if problems:
            raise text_problems(problems)
        return outcomes  # type: ignore[return-value]

    def _count(self, scores: list[Score]) -> None:
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
