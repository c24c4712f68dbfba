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

from starlette.concurrency import run_in_threadpool

from app.admission import Plan, plan, text_problems, validate_texts
from app.batcher import BatcherClosedError, QueueFullError
from app.errors import ApiError, ErrorKind, Errors
from app.lanes import INTERACTIVE, DeadlineExceededError, Lane
from app.lifecycle import Lifecycle, State
from app.logs import note_explained, note_texts
from app.metrics import ServiceMetrics
from app.model_control import ModelControl, VersionPins
from app.scorer import BatchLostError, EngineFactory, ModelSummary, TextRejectedError
from app.settings import Settings
from app.tracing import RequestTimings, current_timings, record_batch
from sentiment import label_of
from sentiment.engine import EmptyTextError, ExplainTooLongError, Score, ScoreRequest

log = logging.getLogger("app")

# Requests with more characters than this are validated on a worker thread: the checks are linear,
# but 64 texts of 20,000 characters still take tens of milliseconds, which on the event loop would
# stall every other request (as a large body's JSON parse would; app.edge.PARSE_IN_THREAD_BYTES).
VALIDATE_IN_THREAD_CHARS = 64 * 1024


class SentimentService:
    """Admits, queues and waits for predictions; owns the :class:`Lifecycle` that serves them."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.lifecycle = Lifecycle(settings, metrics, engine_factory)
        self.pins = VersionPins()  # requests outstanding per model version (a swap drains the old one)
        self.control = ModelControl(settings, self.lifecycle, metrics, self.pins)
        # id(ScoreRequest) → its traced request's timings, while it waits (empty unless tracing is on).
        self._traced: dict[int, RequestTimings] = {}

    # The life cycle, as the app's lifespan and the tests drive it.
    async def start(self) -> None:
        await self.lifecycle.start(self.score_batch)

    async def shutdown(self) -> None:
        self.control.close()
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
        shadow = self.control.shadow
        if shadow is not None:  # a candidate also scores some of these texts, on its own thread
            shadow.offer(requests, batch.results)
        if started_ns:  # a traced request waits on this batch: its spans need the batch's times
            record_batch(self._traced, requests, started_ns, batch.tokenize_seconds, batch.forward_seconds)
        return batch.results

    async def predict(self, texts: Sequence[str], trace: bool,
                      disconnected: Callable[[], Awaitable[None]] | None = None,
                      gates: bool = False, explain: bool = False, timeout_s: float | None = None,
                      lane: Lane = INTERACTIVE) -> tuple[ModelSummary, list[Score]]:
        """Queue the texts for a batch in ``lane``; wait until the deadline (the request's own
        ``timeout_s``, or else the request timeout) with a disconnect watch, so a caller who leaves
        or runs out of time leaves no work behind. Returns the model that scored them and the scores.

        A request whose predicted wait (queued work ahead of it in its lane plus its own, ÷ the best
        recent measured throughput) exceeds its own deadline gets 504 deadline_exceeded at once, and
        one that exceeds the request timeout is shed at once with 503 + Retry-After, instead of
        waiting in vain; on an idle service every request is admitted.
        """
        started = time.monotonic()
        note_texts(len(texts))  # for the access log line and the span: the count only, never the texts
        if explain:
            note_explained()
        self.metrics.lane_requests.labels(lane=lane).inc()
        try:
            model = self.pins.hold(self.lifecycle.require_serving)  # this request's version, to the end
        except ApiError as error:
            self._count_lane_error(error, lane)
            raise
        try:
            if sum(map(len, texts)) > VALIDATE_IN_THREAD_CHARS:
                await run_in_threadpool(validate_texts, texts, self.settings, explain)
            else:
                validate_texts(texts, self.settings, explain)
            work = plan(texts, trace, gates, explain, model)
            outcomes = await self._wait_for(work, disconnected, lane, started, timeout_s)
        except ApiError as error:
            self._count_lane_error(error, lane)
            raise
        finally:
            self.pins.release(model.version)
        scores = self._scores_or_error(work.merge(outcomes))
        self._count(scores)
        return model, scores

    def _count_lane_error(self, error: ApiError, lane: Lane) -> None:
        if error.kind in (Errors.OVERLOADED, Errors.DEADLINE_EXCEEDED, Errors.TIMEOUT):
            self.metrics.lane_errors.labels(lane=lane, kind=error.code).inc()

    def _admit(self, work: Plan, lane: Lane, own_s: float | None, left_s: float) -> None:
        """Refuse at once what would wait in vain: past the request's own deadline ``own_s`` (``left_s``
        of it left) or the request timeout. An idle service always admits: refusing cannot make that
        request any faster."""
        batcher = self.lifecycle.batcher
        assert batcher is not None
        wait = batcher.estimated_wait_s(work.cost, lane)
        if batcher.idle:
            return
        if own_s is not None and wait > left_s:
            raise ApiError(Errors.DEADLINE_EXCEEDED, deadline_ms=own_s * 1000,
                           reason=f"the estimated wait is {wait * 1000:.0f} ms")
        if wait > self.settings.request_timeout_s:
            raise ApiError(Errors.OVERLOADED, reason=f"the estimated wait is {wait:.0f}s, over the "
                           f"{self.settings.request_timeout_s:g}s request timeout")

    async def _wait_for(self, work: Plan, disconnected: Callable[[], Awaitable[None]] | None, lane: Lane,
                        started: float, timeout_s: float | None) -> list[Score | Exception]:
        """Submit the plan's items and wait for their outcomes, the deadline or the client's
        departure; whichever comes first, nothing of this request stays queued.

        The deadline is ``started`` + the request's own ``timeout_s`` when it is at most the request
        timeout (504 deadline_exceeded when it passes), else + the request timeout (504 timeout)."""
        own = timeout_s if timeout_s is not None and timeout_s <= self.settings.request_timeout_s else None
        limit_s = own if own is not None else self.settings.request_timeout_s
        deadline = started + limit_s
        late: ErrorKind = Errors.DEADLINE_EXCEEDED if own is not None else Errors.TIMEOUT
        self._admit(work, lane, own, deadline - time.monotonic())
        batcher = self.lifecycle.batcher
        assert batcher is not None
        timings = current_timings()  # None unless this request is traced (app.tracing)
        if timings is not None:
            timings.watch(work.requests, self._traced)
        submitted = asyncio.ensure_future(batcher.submit_many(work.requests, work.costs, lane, deadline))
        waiters: set[asyncio.Future] = {submitted}
        watcher = asyncio.ensure_future(disconnected()) if disconnected else None
        if watcher is not None:
            waiters.add(watcher)
        try:
            done, _ = await asyncio.wait(waiters, timeout=max(0.0, deadline - time.monotonic()),
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
            raise self._late(late, limit_s, "no answer by then (its texts still queued were dropped)")
        try:
            outcomes = submitted.result()
        except QueueFullError as exc:
            raise ApiError(Errors.OVERLOADED, reason=str(exc)) from exc
        except BatcherClosedError as exc:
            raise ApiError(Errors.NOT_READY_DRAINING, detail=str(exc)) from exc
        if any(isinstance(o, DeadlineExceededError) for o in outcomes):  # the batcher dropped its texts
            raise self._late(late, limit_s, "its texts were dropped from the queue")
        return outcomes

    @staticmethod
    def _late(kind: ErrorKind, limit_s: float, reason: str) -> ApiError:
        if kind is Errors.TIMEOUT:
            return ApiError(Errors.TIMEOUT, seconds=limit_s)
        return ApiError(Errors.DEADLINE_EXCEEDED, deadline_ms=limit_s * 1000, reason=reason)

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
