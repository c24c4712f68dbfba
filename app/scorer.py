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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from app.metrics import ServiceMetrics
from app.resources import usable_cpus
from app.settings import Settings
from sentiment.engine import ScoredBatch, ScoreRequest, SentimentEngine

log = logging.getLogger("app")

EngineFactory = Callable[[Settings], SentimentEngine]


class BatchLostError(RuntimeError):
    """No answer could be had for this batch (the scorer is shutting down); its texts can be retried."""


class CandidateError(RuntimeError):
    """A model version failed its checks (files, checksums, vocabulary, TorchScript load, warm-up);
    nothing has changed. The message says what failed."""


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
    threads at once; ``start`` loads (blocking) and returns what was loaded.

    Each request is scored by the model version it is pinned to (``ScoreRequest.version``; the served
    one when None). The version operations (blocking, called by :class:`app.model_control.ModelControl`
    one at a time) load a version beside the served one, serve it, and free an old one."""

    slots: int

    def start(self) -> ModelSummary: ...

    def score(self, requests: list[ScoreRequest], retry: bool = True) -> ScoredBatch: ...

    def add_version(self, artifacts_dir: str, version: str, shadow: bool = False) -> ModelSummary:
        """Load and warm up ``version`` beside what is served (raises :class:`CandidateError`)."""
        ...

    def promote(self, version: str) -> ModelSummary:
        """Requests not pinned go to ``version`` from now on."""
        ...

    def retire(self, old: str) -> None:
        """Free ``old`` (no request pinned to it is outstanding), bringing the served one to full capacity."""
        ...

    def drop(self, version: str) -> None:
        """Free ``version`` (a shadow that ends)."""
        ...

    def versions(self) -> dict[str, int]:
        """Each version loaded → its workers (engines)."""
        ...

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


def load_engine(settings: Settings, version: str | None = None) -> SentimentEngine:
    """The engine the settings describe (artifacts, device, limits, precision), named ``version``
    (default: its model-repository name when the artifacts are a version of the repository)."""
    from app.repository import startup_version

    return SentimentEngine.load(settings.artifacts_dir, settings.device, max_tokens=settings.max_tokens,
                                max_explain_tokens=settings.max_explain_tokens,
                                max_batch_tokens=settings.max_batch_tokens, precision=settings.precision,
                                version=version or startup_version(settings))


class InProcessScorer:
    """One engine in the front process; torch uses its own intra-op threads for each batch.

    Model versions: a candidate is a second engine beside the first (two models in memory while it
    loads, is shadowed or takes over; the old one is freed once no request pinned to it is left)."""

    slots = 1  # an engine is not thread-safe: one batch at a time (a shadow engine has its own lock)

    def __init__(self, settings: Settings, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self._factory = engine_factory or load_engine
        self.engine: SentimentEngine | None = None  # the served one
        self._engines: dict[str, tuple[SentimentEngine, threading.Lock]] = {}

    def start(self) -> ModelSummary:
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        engine = self._load(lambda: self._factory(self.settings))
        self.engine = engine
        self._engines[engine.version] = (engine, threading.Lock())
        return ModelSummary.of(engine)

    def _load(self, make: Callable[[], SentimentEngine]) -> SentimentEngine:
        started = time.perf_counter()
        engine = make()
        warm = engine.warm_up() if self.settings.warmup else 0.0
        log.info("model %s loaded on %s in %.2fs (warm-up %.2fs)", engine.version, engine.device,
                 time.perf_counter() - started, warm)
        return engine

    def score(self, requests: list[ScoreRequest], retry: bool = True) -> ScoredBatch:
        assert self.engine is not None, "score() before start()"
        served = self.engine.version
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.version or served, []).append(i)
        results: list = [None] * len(requests)
        parts = []
        for version, indices in groups.items():
            engine, lock = self._engines.get(version, (None, None))
            if engine is None or lock is None:  # freed meanwhile: only requests that already left had it
                for i in indices:
                    results[i] = BatchLostError(f"model version {version!r} is no longer loaded")
                continue
            with lock:
                parts.append((indices, engine.score([requests[i] for i in indices])))
        return ScoredBatch.assemble(results, parts)

    def add_version(self, artifacts_dir: str, version: str, shadow: bool = False) -> ModelSummary:
        settings = self.settings.model_copy(update={"artifacts_dir": Path(artifacts_dir)})
        try:
            engine = self._load(lambda: load_engine(settings, version))
        except Exception as exc:  # ArtifactError, a TorchScript error, a failed warm-up …
            raise CandidateError(f"{type(exc).__name__}: {exc}") from None
        self._engines[version] = (engine, threading.Lock())
        return ModelSummary.of(engine)

    def promote(self, version: str) -> ModelSummary:
        self.engine = self._engines[version][0]
        return ModelSummary.of(self.engine)

    def retire(self, old: str) -> None:
        self._engines.pop(old, None)

    def drop(self, version: str) -> None:
        self._engines.pop(version, None)

    def versions(self) -> dict[str, int]:
        """Each version loaded → 1 (one engine each)."""
        return {version: 1 for version in self._engines}

    def unready_detail(self) -> str | None:
        return None

    def degraded_detail(self) -> str | None:
        return None

    def resident_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.engine = None
        self._engines.clear()


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

