"""One row of bulk work: what was read, and what is written for it.

The one place that turns a row's text into a :class:`~sentiment.engine.ScoreRequest` (or an error,
under the service's per-text checks) and a :class:`~sentiment.engine.Score` or an exception into the
output columns. The command (:mod:`app.bulk.run`) and the Ray/Spark predictor
(:mod:`app.bulk.predictor`) both use it, so a row gets the same columns whichever path scored it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.admission import LONE_SURROGATE, text_problem
from app.scorer import TextRejectedError
from app.settings import Settings
from sentiment import label_of
from sentiment.engine import EmptyTextError, Score

# Every error value a row can carry (docs/bulk.md, "Rows that cannot be scored"). The service's
# codes where the service has the same check; the rest are about reading a row.
INVALID_ROW = "invalid_row"  # a JSONL line that is not a JSON object
MISSING_FIELD = "missing_field"  # no text field (absent, null, a short CSV record)
NOT_A_STRING = "not_a_string"  # the text field holds a number, a list, ...
INVALID_UTF8 = "invalid_utf8"  # the bytes of the row (or its text) are not UTF-8
EMPTY_TEXT = "empty_text"  # empty, whitespace, or no tokens after cleaning (e.g. only "<br />")
TEXT_CRASHED_WORKER = "text_crashed_worker"  # broke a model worker twice, the second time alone
TEXT_FAILED = "text_failed"  # any other failure of the engine on this text alone
# ... and the service's own: text_too_long, word_too_long, invalid_unicode (app.admission.text_problem).

# The columns every output row gains, in order (after the id).
SCORE_COLUMNS = ("probability", "label", "num_tokens", "truncated", "error")
TRACE_COLUMNS = ("tokens", "trace")


def arrow_types(pa: Any) -> dict[str, Any]:
    """The Arrow type of every column a row can gain (Parquet output, Ray Data blocks): fixed, so that a
    part or block without any error still has a string ``error`` column, not Arrow's null type."""
    return {"probability": pa.float64(), "label": pa.string(), "num_tokens": pa.int64(), "truncated": pa.bool_(),
            "error": pa.string(), "expected": pa.string(), "tokens": pa.list_(pa.string()),
            "trace": pa.list_(pa.float64())}


@dataclass(frozen=True)
class InputRow:
    """A row as read: its id, its text (None when it has none) or the error found while reading it,
    and for labelled input (an IMDB folder) its expected label (1 positive, 0 negative)."""

    id: Any
    text: str | None
    error: str | None = None
    expected: int | None = None


def check(row: InputRow, settings: Settings) -> str | None:
    """The error code of a row that must not reach the model (reading error, or the service's
    per-text checks), or None when its text can be scored."""
    if row.error is not None:
        return row.error
    if row.text is None:
        return MISSING_FIELD
    if not isinstance(row.text, str):
        return NOT_A_STRING
    problem = text_problem(row.text, settings)
    return problem[0].code if problem is not None else None


def error_code(exc: BaseException) -> str:
    """The error value of a text the engine or the worker pool could not score."""
    if isinstance(exc, EmptyTextError):
        return EMPTY_TEXT
    if isinstance(exc, TextRejectedError):
        return TEXT_CRASHED_WORKER
    return TEXT_FAILED


def score_columns(result: Score | BaseException | str, trace: bool = False) -> dict[str, Any]:
    """The columns a row gains from its outcome: a score, the exception of its text, or an error code."""
    if isinstance(result, Score):
        columns: dict[str, Any] = {"probability": result.probability, "label": label_of(result.probability),
                                   "num_tokens": result.num_tokens, "truncated": result.truncated, "error": None}
    else:
        code = result if isinstance(result, str) else error_code(result)
        columns = {"probability": None, "label": None, "num_tokens": None, "truncated": None, "error": code}
    if trace:
        scored = isinstance(result, Score)
        columns["tokens"] = result.tokens if scored else None  # type: ignore[union-attr]
        columns["trace"] = result.trace if scored else None  # type: ignore[union-attr]
    return columns


def writable_id(value: Any) -> Any:
    """A row's id as it can be written out: a JSON id with a lone surrogate ("\\ud800") gets "?" in
    its place, since no output format can hold one; any other id is kept as it is."""
    if isinstance(value, str) and LONE_SURROGATE.search(value):
        return value.encode("utf-8", "replace").decode("utf-8")
    return value
