"""Bulk scoring: files and tables on one machine (``sentiment score``), and columns of texts inside
Ray Data or Spark (:class:`SentimentPredictor`). docs/bulk.md is the user's guide.

Both use the service's engine, per-text checks and (on one machine) its worker pool; nothing here
is a second implementation of either.

* :mod:`app.bulk.rows`: a row as read, the checks it must pass, the columns it gains;
* :mod:`app.bulk.readers`: JSONL, CSV, Parquet, text lines, IMDB-layout folders, streamed;
* :mod:`app.bulk.writers`: JSONL, CSV, Parquet, and the progress record behind ``--resume``;
* :mod:`app.bulk.run`: the streaming run on the scorer, in order, with its progress bar and summary;
* :mod:`app.bulk.predictor`: the callable class for ``map_batches`` and ``predict_batch_udf``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BulkJob", "BulkRun", "SentimentPredictor"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import app.bulk.predictor` on a Ray worker does not import the run's machinery.
    if name == "SentimentPredictor":
        from app.bulk.predictor import SentimentPredictor

        return SentimentPredictor
    if name in ("BulkJob", "BulkRun"):
        from app.bulk import run

        return getattr(run, name)
    raise AttributeError(name)
