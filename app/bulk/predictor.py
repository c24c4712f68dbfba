"""Scoring columns of texts inside a distributed engine: Ray Data's ``map_batches`` or Spark's
``predict_batch_udf`` (docs/bulk.md, "On a cluster").

:class:`SentimentPredictor` loads the artifacts once (once per Ray actor, once per Spark Python
worker) and scores a batch column of texts with the same engine, the same per-text checks and the
same output columns as ``sentiment score``; each engine uses one torch thread by default, so that a
cluster runs one predictor per CPU, as the service runs one model worker per core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.bulk.rows import SCORE_COLUMNS, TRACE_COLUMNS, InputRow, arrow_types, check, score_columns
from app.settings import Settings


class SentimentPredictor:
    """A callable for ``Dataset.map_batches(SentimentPredictor, fn_constructor_kwargs={...},
    concurrency=N, batch_format="numpy")``: each batch (a dict of columns) comes back, as an Arrow
    table, with the columns ``probability``, ``label``, ``num_tokens``, ``truncated`` and ``error``
    added (and ``tokens``, ``trace`` with ``trace=True``). A row that cannot be scored gets an
    ``error`` value, as in ``sentiment score``; it never fails the batch."""

    def __init__(self, artifacts_dir: str | Path | None = None, text_column: str = "text", device: str = "cpu",
                 trace: bool = False, torch_threads: int = 1) -> None:
        import torch

        from app.scorer import load_engine

        torch.set_num_threads(torch_threads)  # one CPU per actor, like a model worker
        overrides: dict[str, Any] = {"device": device}
        if artifacts_dir is not None:
            overrides["artifacts_dir"] = Path(artifacts_dir)
        self.settings = Settings(**overrides)
        self.engine = load_engine(self.settings)
        self.engine.warm_up()
        self.text_column, self.trace = text_column, trace
        self.columns = [*SCORE_COLUMNS, *(TRACE_COLUMNS if trace else [])]

    def predict(self, texts: Sequence[Any]) -> dict[str, np.ndarray]:
        """The output columns for a column of texts (any sequence: a NumPy array, a list, a pandas
        Series), in order. Also the predict function for Spark's ``predict_batch_udf``."""
        from sentiment.engine import ScoreRequest

        rows = [InputRow(i, None if _missing(t) else str(t) if isinstance(t, str) else t)  # np.str_ → str
                for i, t in enumerate(texts)]
        codes = [check(row, self.settings) for row in rows]
        scorable = [row.text for row, code in zip(rows, codes) if code is None]
        results = iter(self.engine.score([ScoreRequest(t, trace=self.trace) for t in scorable]).results  # type: ignore[arg-type]
                       if scorable else [])
        outcomes = [score_columns(code if code is not None else next(results), self.trace) for code in codes]
        return {name: _column([o[name] for o in outcomes]) for name in self.columns}

    def __call__(self, batch: Mapping[str, Any]) -> Any:
        """Ray Data's batch (a dict of column arrays) with the score columns added, as an Arrow table
        whose score columns have fixed types: left to inference, a batch without any error would
        get an ``error`` column of Arrow's null type, and blocks of two types cannot be written out
        as one dataset."""
        import pyarrow as pa

        scores = self.predict(batch[self.text_column])
        types = arrow_types(pa)
        columns = {name: pa.array(values, from_pandas=True) for name, values in batch.items()}
        columns.update({name: pa.array(list(values), type=types[name]) for name, values in scores.items()})
        return pa.table(columns)


def spark_schema(trace: bool = False) -> Any:
    """The Spark type of :meth:`SentimentPredictor.predict`'s columns: ``predict_batch_udf``'s
    ``return_type`` (a struct; select ``"score.*"`` to get the columns)."""
    from pyspark.sql.types import (ArrayType, BooleanType, DoubleType, LongType, StringType, StructField,
                                   StructType)

    fields = [StructField("probability", DoubleType()), StructField("label", StringType()),
              StructField("num_tokens", LongType()), StructField("truncated", BooleanType()),
              StructField("error", StringType())]
    if trace:
        fields += [StructField("tokens", ArrayType(StringType())), StructField("trace", ArrayType(DoubleType()))]
    return StructType(fields)


def _missing(value: Any) -> bool:
    # A null arrives as None (Ray's numpy batches of strings) or NaN (pandas object columns).
    return value is None or (isinstance(value, float) and math.isnan(value))


def _column(values: list[Any]) -> np.ndarray:
    """A NumPy column that keeps nulls as None: object dtype unless every value is present."""
    if any(v is None for v in values) or any(isinstance(v, (str, list)) for v in values):
        column = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):  # one by one: a slice assignment would unpack equal-length lists
            column[i] = value
        return column
    return np.asarray(values)
