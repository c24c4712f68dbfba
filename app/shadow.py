"""The shadow phase: a candidate model version scores a fraction of live texts off the callers'
critical path, and the service measures how often it agrees with the served version.

After each batch the served version scored, :meth:`Shadow.offer` (on the batch thread: a random draw
and a non-blocking put per text, microseconds) picks about ``fraction`` of its plain texts
(explanation items are slices of work, not texts) with their served probabilities, into a small
bounded queue. A full queue drops the text and counts it: under load shadow work is dropped first,
callers never wait for it. One thread scores the queue on the candidate, in batches, and records
agreement (same label), |Δ probability| and the candidate's latency. Callers get the served answer
either way; the candidate's answers are only counted.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Any, Callable, Sequence

from app.metrics import ServiceMetrics
from sentiment import label_of
from sentiment.engine import Score, ScoredBatch, ScoreRequest

log = logging.getLogger("app.shadow")
SHADOW_QUEUE = 256  # texts waiting for the candidate at most; beyond it they are dropped (and counted)
SHADOW_BATCH = 32  # texts per candidate batch at most


class Shadow:
    """A running shadow of ``version`` on ``fraction`` of live texts; ``score`` scores on the candidate."""

    def __init__(self, version: str, fraction: float, score: Callable[[list[ScoreRequest]], ScoredBatch],
                 metrics: ServiceMetrics, draw: Callable[[], float] = random.random) -> None:
        self.version, self.fraction = version, fraction
        self._score, self._metrics, self._draw = score, metrics, draw
        self._queue: queue.Queue[tuple[str, float]] = queue.Queue(SHADOW_QUEUE)
        self._lock = threading.Lock()
        self.texts = self.agreements = self.dropped = self.failed = 0
        self._delta_sum = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shadow-{version}", daemon=True)
        self._thread.start()
        metrics.shadow_fraction.set(fraction)

    def offer(self, requests: Sequence[ScoreRequest], results: Sequence[Score | Exception]) -> None:
        """Hand about ``fraction`` of a served batch's plain texts to the candidate; never blocks."""
        for request, result in zip(requests, results):
            if request.explain or not isinstance(result, Score) or self._draw() >= self.fraction:
                continue
            try:
                self._queue.put_nowait((request.text, result.probability))
            except queue.Full:  # the candidate is behind: drop shadow work, never delay serving
                with self._lock:
                    self.dropped += 1
                self._metrics.shadow_dropped.inc()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                batch = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < SHADOW_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._compare(batch)

    def _compare(self, batch: list[tuple[str, float]]) -> None:
        started = time.perf_counter()
        try:
            scored = self._score([ScoreRequest(text, version=self.version) for text, _ in batch]).results
        except Exception as exc:  # the candidate failed (a worker died, or it was stopped): count it, go on
            log.warning("shadow batch of %d texts failed on %s: %s", len(batch), self.version, type(exc).__name__)
            scored = [exc] * len(batch)
        self._metrics.shadow_duration.observe(time.perf_counter() - started)
        for (_, served), result in zip(batch, scored):
            if not isinstance(result, Score):
                with self._lock:
                    self.failed += 1
                self._metrics.shadow_failed.inc()
                continue
            delta = abs(result.probability - served)
            agree = label_of(result.probability) == label_of(served)
            with self._lock:
                self.texts += 1
                self.agreements += agree
                self._delta_sum += delta
            self._metrics.shadow_texts.inc()
            if agree:
                self._metrics.shadow_agreements.inc()
            self._metrics.shadow_delta.observe(delta)

    def stop(self) -> None:
        """Stop comparing: what is queued is dropped, the batch being scored is still counted (:meth:`join`)."""
        self._stopping.set()
        self._metrics.shadow_fraction.set(0)

    def join(self, timeout_s: float = 30.0) -> None:
        """Wait until the thread has finished its last batch (after :meth:`stop`)."""
        self._thread.join(timeout_s)

    def summary(self) -> dict[str, Any]:
        """Version, fraction, and what was measured since the shadow started."""
        with self._lock:
            texts, agreements, delta = self.texts, self.agreements, self._delta_sum
            dropped, failed = self.dropped, self.failed
        return {"version": self.version, "fraction": self.fraction, "texts": texts, "agreements": agreements,
                "agreement_rate": agreements / texts if texts else None,
                "mean_abs_delta": delta / texts if texts else None, "dropped": dropped, "failed": failed}
