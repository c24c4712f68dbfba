"""The scorer: what turns a batch of :class:`ScoreRequest` into a :class:`ScoredBatch`.

The rest of the front (readiness, admission, the batcher, the routes) talks to one small protocol,
:class:`Scorer`, and never asks which implementation it has:

* :class:`InProcessScorer`: one engine in this process (CUDA, ``SENTIMENT_WORKERS=0``, tests);
* :class:`app.workers.WorkerPool`: one engine per core in ``python -m app.workers`` processes
  (the default on CPU).

:func:`build_scorer` is the one place that chooses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from app.metrics import ServiceMetrics
from app.resources import usable_cpus
from app.settings import Settings
from sentiment.engine import ScoredBatch, ScoreRequest, SentimentEngine

log = logging.getLogger("app")

EngineFactory = Callable[[Settings], SentimentEngine]


class BatchLostError(RuntimeError):
    """No answer could be had for this batch (the scorer is shutting down); its texts can be retried."""


class TextRejectedError(RuntimeError):
    """The scorer refuses this text: it made a model worker fail twice, the second time alone."""

    def __init__(self, ttl_s: float) -> None:
        super().__init__(f"this text made a model worker fail twice; it is refused for {ttl_s:.0f}s")
        self.ttl_s = ttl_s

    def __reduce__(self) -> tuple[Any, tuple[float]]:
        return TextRejectedError, (self.ttl_s,)


@dataclass(frozen=True)
class ModelSummary:
    """What the front reports about the model it serves (``/v1/model``, ``/v2`` metadata, metrics)
    and needs for admission (its token limits). Plain values: it crosses a process boundary, so the
    front need not load the model itself when workers score."""

    version: str
    device: str
    precision: str
    card: dict[str, Any]
    vocab_size: int
    max_tokens: int
    max_explain_tokens: int
    workers: int = 0  # model-worker processes scoring for the front (0: it scores in-process)
    checksum: str = ""  # sha256 of model.pt, verified against the card when it was loaded

    @classmethod
    def of(cls, engine: SentimentEngine, workers: int = 0) -> "ModelSummary":
        """The summary of a loaded engine."""
        card = engine.artifacts.card
        return cls(engine.version, str(engine.device), engine.precision, card, len(engine.artifacts.vocab),
                   engine.max_tokens, engine.max_explain_tokens, workers, str(card.get("files", {}).get("model.pt", "")))


class Scorer(Protocol):
    """Scores batches for the front. ``score`` is blocking and may be called from up to ``slots``
    threads at once; ``start`` loads (blocking) and returns what was loaded."""

    slots: int

    def start(self) -> ModelSummary: ...

    def score(self, requests: list[ScoreRequest]) -> ScoredBatch: ...

    def unready_detail(self) -> str | None:
        """Why it cannot score anything now (None: it can)."""
        ...

    def degraded_detail(self) -> str | None:
        """Why it scores with less than its full capacity now (None: it has all of it)."""
        ...

    def resident_bytes(self) -> int:
        """Resident memory of the processes it runs beyond the front (0 for none)."""
        ...

    def close(self) -> None: ...


def load_engine(settings: Settings) -> SentimentEngine:
    """The engine the settings describe (artifacts, device, limits, precision)."""
    return SentimentEngine.load(settings.artifacts_dir, settings.device, max_tokens=settings.max_tokens,
                                max_explain_tokens=settings.max_explain_tokens,
                                max_batch_tokens=settings.max_batch_tokens, precision=settings.precision)


class InProcessScorer:
    """One engine in the front process; torch uses its own intra-op threads for each batch."""

    slots = 1  # the engine is not thread-safe: one batch at a time

    def __init__(self, settings: Settings, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self._factory = engine_factory or load_engine
        self.engine: SentimentEngine | None = None

    def start(self) -> ModelSummary:
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        started = time.perf_counter()
        engine = self._factory(self.settings)
        warm = engine.warm_up() if self.settings.warmup else 0.0
        log.info("model %s loaded on %s in %.2fs (warm-up %.2fs)", engine.version, engine.device,
                 time.perf_counter() - started, warm)
        self.engine = engine
        return ModelSummary.of(engine)

    def score(self, requests: list[ScoreRequest]) -> ScoredBatch:
        assert self.engine is not None, "score() before start()"
        return self.engine.score(requests)

    def unready_detail(self) -> str | None:
        return None

    def degraded_detail(self) -> str | None:
        return None

    def resident_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.engine = None


def worker_count(settings: Settings) -> int:
    """Model-worker processes to run: the setting, else one per usable core on CPU and none on CUDA
    (one GPU wants big batches from one process, not several processes sharing it)."""
    if settings.workers is not None:
        return settings.workers
    from sentiment.artifacts import resolve_device

    return usable_cpus() if resolve_device(settings.device).type == "cpu" else 0


def build_scorer(settings: Settings, metrics: ServiceMetrics, on_fatal: Callable[[str], None],
                 engine_factory: EngineFactory | None = None) -> Scorer:
    """The scorer the settings ask for. A test's ``engine_factory`` always scores in-process (a
    factory cannot be rebuilt in a worker process)."""
    count = 0 if engine_factory is not None else worker_count(settings)
    if count == 0:
        return InProcessScorer(settings, engine_factory)
    from app.workers import WorkerConfig, WorkerPool

    pool = WorkerPool(WorkerConfig.of(settings), count, on_restart=metrics.worker_restarts.inc, on_fatal=on_fatal,
                      deadline_floor_s=settings.batch_deadline_floor_s, deadline_cap_s=settings.batch_deadline_cap_s,
                      poison_ttl_s=settings.poison_ttl_s,
                      on_failure=lambda reason: metrics.worker_failures.labels(reason=reason).inc(),
                      on_poison=metrics.poison_texts.inc, on_retry=metrics.retried_texts.inc)
    metrics.workers.set(count)
    metrics.workers_ready.set_function(lambda: pool.ready)
    for i in range(count):
        metrics.worker_memory.labels(worker=str(i)).set_function(lambda i=i: pool.worker_bytes().get(i, 0))
    return pool

