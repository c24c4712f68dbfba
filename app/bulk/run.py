"""The bulk run: read rows → check them → score them on the service's scorer → write them, in order.

The scorer is the service's own (:func:`app.scorer.build_scorer`): on CPU the worker pool, one
model-worker process per usable core, each running the engine on whole chunks; ``--workers 0`` (the
default on CUDA) the engine in this process. This process only reads, checks and writes, and keeps
``2 × workers`` chunks in flight, so every worker always has its next chunk waiting and memory is
bounded by those chunks, whatever the input's size.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.bulk.readers import InputError, Source, open_source
from app.bulk.rows import SCORE_COLUMNS, TRACE_COLUMNS, InputRow, check, score_columns, writable_id
from app.bulk.writers import Progress, ResumeError, Sink, default_output, open_sink, output_format
from app.metrics import ServiceMetrics
from app.scorer import Scorer, build_scorer
from app.settings import Settings
from sentiment.engine import ScoredBatch, ScoreRequest

CHUNK_ROWS = 256  # texts per scorer call: the engine sorts a chunk by length into passes (the offline ceiling's size)


@dataclass
class BulkJob:
    """What ``sentiment score`` was asked to do (its command-line options)."""

    input: Path
    output: Path | None = None
    text_field: str = "text"
    id_field: str = "id"
    trace: bool = False
    workers: int | None = None  # None: the service's default (one per usable core on CPU, 0 on CUDA)
    device: str | None = None
    artifacts: Path | None = None
    resume: bool = False
    chunk_rows: int = CHUNK_ROWS
    progress_bar: bool = True


@dataclass
class Summary:
    """What a run did: rows written (over the whole run, across resumes), errors by code, accuracy
    for labelled input, and this invocation's timings."""

    output: str
    rows: int = 0
    scored: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    labelled: int = 0
    correct: int = 0
    resumed_from: int = 0
    model: str = ""
    precision: str = ""  # the forward pass's arithmetic (fp32, bf16, int8)
    workers: int = 0
    startup_seconds: float = 0.0
    scoring_seconds: float = 0.0  # from the model being ready to the last row committed

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def rows_per_s(self) -> float:
        """Rows read, checked, scored and written per second by this invocation."""
        done = self.rows - self.resumed_from
        return done / self.scoring_seconds if self.scoring_seconds else 0.0

    def add(self, row: InputRow, columns: dict[str, Any]) -> None:
        self.rows += 1
        if columns["error"] is not None:
            self.errors[columns["error"]] = self.errors.get(columns["error"], 0) + 1
            return
        self.scored += 1
        if row.expected is not None:
            self.labelled += 1
            self.correct += int((columns["label"] == "positive") == bool(row.expected))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy, "rows_per_s": self.rows_per_s}

    def counts(self) -> dict[str, Any]:
        """The counts that a progress record carries over to ``--resume``."""
        return {k: getattr(self, k) for k in ("rows", "scored", "errors", "labelled", "correct")}


def output_columns(source: Source, trace: bool) -> list[str]:
    """The output's columns: the id (under the input's id field name), the score columns, the
    expected label for labelled input, the trace when asked."""
    return [source.id_field, *SCORE_COLUMNS, *(["expected"] if source.labelled else []),
            *(TRACE_COLUMNS if trace else [])]


def bulk_settings(job: BulkJob) -> Settings:
    """The service's settings (``SENTIMENT_*`` variables) with the command's options on top."""
    options: dict[str, Any] = {"log_level": os.environ.get("SENTIMENT_LOG_LEVEL", "warning")}
    for name, value in (("artifacts_dir", job.artifacts), ("device", job.device), ("workers", job.workers)):
        if value is not None:
            options[name] = value
    return Settings(**options)


def _service_scorer(settings: Settings, failures: list[str]) -> Scorer:
    """The service's scorer for these settings. If no model worker can be (re)started, the pool
    calls on_fatal: the reason is kept and the pool closed, which fails the chunks waiting for it."""
    def on_fatal(reason: str) -> None:
        failures.append(reason)
        scorer.close()

    scorer = build_scorer(settings, ServiceMetrics(), on_fatal)
    return scorer


def _chunks(rows: Iterator[InputRow], size: int) -> Iterator[list[InputRow]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


class BulkRun:
    """One invocation of ``sentiment score``: :meth:`prepare` (input, output, resume), then :meth:`run`."""

    def __init__(self, job: BulkJob) -> None:
        self.job = job
        self.source = open_source(job.input, job.text_field, job.id_field)
        self.output = job.output or default_output(self.source)
        output_format(self.output)
        if self.output.resolve() == self.source.path.resolve():
            raise InputError("the output would overwrite the input: name another --output")
        self.columns = output_columns(self.source, job.trace)
        self.progress = Progress(self.output)
        self.summary = Summary(str(self.output))

    def prepare(self) -> Sink:
        """Open the output: afresh, or where the interrupted run's last commit left it."""
        fingerprint = {**self.source.fingerprint(), "columns": self.columns}
        record = self.progress.load() if self.job.resume else None
        if self.job.resume and record is None and self.output.exists():
            raise ResumeError(f"{self.output} exists but {self.progress.path} does not: the run that wrote it "
                              "finished (or it was not written by sentiment score); nothing to resume")
        if record is not None and record["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if record["fingerprint"].get(k) != fingerprint[k])
            raise ResumeError(f"cannot resume: {', '.join(changed)} changed since the interrupted run")
        sink = open_sink(self.output, self.columns, self.source)
        sink.start(record["position"] if record else None)
        if record is None:
            self.progress.save({"fingerprint": fingerprint, "position": sink.commit(), **self.summary.counts()})
        else:
            for key in ("rows", "scored", "errors", "labelled", "correct"):
                setattr(self.summary, key, record[key])
            self.summary.resumed_from = record["rows"]
        self.fingerprint = fingerprint
        return sink

    def run(self, scorer: Scorer | None = None) -> Summary:
        """Score the input into the output; the summary. ``scorer``: an already started one (tests,
        several runs); by default the service's, started here and closed at the end."""
        started = time.perf_counter()
        settings = bulk_settings(self.job)  # before the output is touched: bad SENTIMENT_* values fail first
        sink = self.prepare()
        own = scorer is None
        failure: list[str] = []
        try:
            if scorer is None:
                scorer = _service_scorer(settings, failure)
                model = scorer.start()
                self.summary.model, self.summary.precision = model.version, model.precision
            self.summary.workers = getattr(scorer, "count", 0)
            total = self.source.count()
            self.summary.startup_seconds = time.perf_counter() - started
            ready = time.perf_counter()
            self._score_all(scorer, sink, settings, total)
            sink.finish()
            self.progress.clear()
            self.summary.scoring_seconds = time.perf_counter() - ready
        except Exception as exc:
            if failure:
                raise RuntimeError(f"the model workers failed: {failure[0]}") from exc
            raise
        finally:
            sink.close()
            if own and scorer is not None:
                scorer.close()
        return self.summary

    def _score_all(self, scorer: Scorer, sink: Sink, settings: Settings, total: int) -> None:
        from tqdm import tqdm

        skip = self.summary.rows
        in_flight: deque[tuple[list[InputRow], list[str | None], Future[ScoredBatch] | None]] = deque()
        since_commit = 0
        bar = tqdm(total=total, initial=skip, unit=" reviews", dynamic_ncols=True, smoothing=0.1,
                   disable=not self.job.progress_bar, desc="scoring")

        def write_oldest() -> None:
            nonlocal since_commit
            rows, codes, future = in_flight.popleft()
            results = iter(future.result().results if future is not None else [])
            out = []
            for row, code in zip(rows, codes):
                columns = score_columns(code if code is not None else next(results), self.job.trace)
                self.summary.add(row, columns)
                record = {self.columns[0]: writable_id(row.id), **columns}
                if self.source.labelled:
                    record["expected"] = "positive" if row.expected else "negative"
                out.append({c: record[c] for c in self.columns})
            sink.write(out)
            since_commit += len(out)
            if since_commit >= sink.commit_rows:
                self._commit(sink)
                since_commit = 0
            bar.update(len(out))

        with bar, ThreadPoolExecutor(max(1, scorer.slots), thread_name_prefix="bulk-score") as pool:
            try:
                for chunk in _chunks(self.source.rows(skip), self.job.chunk_rows):
                    codes = [check(row, settings) for row in chunk]
                    requests = [ScoreRequest(row.text, trace=self.job.trace)  # type: ignore[arg-type]
                                for row, code in zip(chunk, codes) if code is None]
                    future = pool.submit(scorer.score, requests) if requests else None
                    in_flight.append((chunk, codes, future))
                    while len(in_flight) > 2 * scorer.slots:
                        write_oldest()
                while in_flight:
                    write_oldest()
            finally:
                for _, _, future in in_flight:  # a failure or Ctrl-C: queued chunks need not start
                    if future is not None:
                        future.cancel()
        self._commit(sink)

    def _commit(self, sink: Sink) -> None:
        position = sink.commit()
        self.progress.save({"fingerprint": self.fingerprint, "position": position, **self.summary.counts()})


def error_counts(summary: Summary) -> str:
    """``empty_text 3, missing_field 1`` (most frequent first), or ``none``."""
    return ", ".join(f"{code} {n}" for code, n in Counter(summary.errors).most_common()) or "none"
