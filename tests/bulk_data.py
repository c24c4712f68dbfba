"""Inputs and helpers shared by the bulk-scoring tests (tests/test_bulk.py, tests/test_bulk_ray.py):
IMDB test reviews with bad rows among them, the command run as a user runs it, outputs read back."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

ARCHIVE = REPO.parent / "shared" / "data" / "aclImdb_v1.tar.gz"
TOLERANCE = 1e-5  # the bar for "the same probability" (fp32, any batch)


@dataclass(frozen=True)
class Expected:
    """One input row: the id the output must carry, and its text or the error it must get."""

    id: Any
    text: str | None
    error: str | None = None


def imdb_sample(n: int = 2000, seed: int = 27) -> list[Expected]:
    """``n`` IMDB test reviews (id: their key, e.g. test/pos/123), one line each; skips the test
    without the archive (CI has it at ../shared/data)."""
    if not ARCHIVE.is_file():
        pytest.skip(f"the IMDB archive is not at {ARCHIVE}")
    from sentiment.imdb import read_imdb

    reviews = read_imdb(ARCHIVE, ("test",))["test"]
    random.Random(seed).shuffle(reviews)
    # One line each, so that the same texts go into .txt files (the model reads "<br />" as a space anyway).
    return [Expected(r.key, " ".join(r.text.splitlines())) for r in reviews[:n]]


# Texts the service refuses or cannot score, with the error both give them (the service's code).
BAD_TEXTS = {
    "": "empty_text",
    " \t  ": "empty_text",
    "<br /><br />": "empty_text",  # no tokens once the line breaks are cleaned away (the engine's error)
    "good " * 4001: "text_too_long",  # 20,005 characters; the limit is 20,000
    "a" * 201 + " film": "word_too_long",
    "\ud800 a good film": "invalid_unicode",
}


def interleave(good: list[Expected], bad: list[Expected]) -> list[Expected]:
    """``bad`` rows spread evenly among ``good`` ones (the first at the very start)."""
    rows = list(good)
    step = max(1, len(good) // max(1, len(bad)))
    for k, row in enumerate(bad):
        rows.insert(min(len(rows), k * (step + 1)), row)
    return rows


def jsonl_input(path: Path, good: list[Expected]) -> list[Expected]:
    """A JSONL file of ``good`` rows and every kind of bad JSONL row; what the output must hold."""
    bad = [Expected(f"bad-{i}", text, error) for i, (text, error) in enumerate(BAD_TEXTS.items())]
    rows = interleave(good, bad + [Expected("bad-missing", None, "missing_field"),
                                   Expected("bad-null", None, "missing_field"),
                                   Expected("bad-number", None, "not_a_string")])
    lines: list[bytes] = []
    expected: list[Expected] = []
    for number, row in enumerate(rows, 1):
        record: dict[str, Any] = {"id": row.id, "text": row.text}
        if row.id == "bad-missing":
            record = {"id": row.id, "review": "the text is under another name"}
        elif row.id == "bad-number":
            record["text"] = 42
        lines.append(json.dumps(record).encode())  # ASCII: a lone surrogate travels as "\ud800"
        expected.append(row)
    for raw, error in ((b'{"id": "bad-json", "text": "unterminated', "invalid_row"),
                       (b'{"id": "bad-utf8", "text": "caf\xe9 au lait"}', "invalid_utf8"), (b"", "invalid_row")):
        at = len(lines) // 2
        lines.insert(at, raw)
        expected.insert(at, Expected(None, None, error))
    path.write_bytes(b"\n".join(lines) + b"\n")
    # Rows the reader cannot parse are known by their line number.
    return [row if row.id is not None else Expected(n, None, row.error) for n, row in enumerate(expected, 1)]


def csv_input(path: Path, good: list[Expected]) -> list[Expected]:
    """A CSV file (id, stars, text) of ``good`` rows and bad ones: empty, whitespace, a short
    record, bytes that are not UTF-8."""
    bad = [Expected(f"bad-{i}", text, error) for i, (text, error) in enumerate(BAD_TEXTS.items())
           if error != "invalid_unicode"]  # a lone surrogate cannot be written as UTF-8 at all
    rows = interleave(good, bad + [Expected("bad-short", None, "missing_field"),
                                   Expected("bad-utf8", None, "invalid_utf8")])
    with path.open("wb") as f:
        f.write(b"id,stars,text\n")
        for row in rows:
            if row.id == "bad-short":
                f.write(b"bad-short,3\n")
            elif row.id == "bad-utf8":
                f.write(b'bad-utf8,3,"caf\xe9 au lait, tr\xe8s bon"\n')
            else:
                f.write(_csv_line([row.id, "5", row.text]))
    return rows


def txt_input(path: Path, good: list[Expected]) -> list[Expected]:
    """A text file, one review per line, with an empty line, a whitespace line, one of HTML breaks
    only and one that is not UTF-8; ids are line numbers."""
    rows = interleave(good, [Expected(None, "", "empty_text"), Expected(None, "   ", "empty_text"),
                             Expected(None, "<br />", "empty_text"), Expected(None, None, "invalid_utf8")])
    lines = [row.text.encode() if row.text is not None else b"caf\xe9 au lait" for row in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return [Expected(n, row.text, row.error) for n, row in enumerate(rows, 1)]


def _csv_line(values: list[str]) -> bytes:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue().encode()


def score_command(*args: Any, timeout: float = 600, **popen: Any) -> subprocess.CompletedProcess[str]:
    """``sentiment score ARGS`` as a user runs it (``python -m app.cli``: the console script's target)."""
    return subprocess.run([sys.executable, "-m", "app.cli", "score", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **popen)


def read_output(path: Path) -> list[dict[str, Any]]:
    """The output's rows as dicts with typed values, whatever its format."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    typed = {"probability": float, "num_tokens": int, "truncated": lambda v: v == "true"}

    def value(column: str, text: str) -> Any:
        if column == "id":
            return text
        return None if text == "" else typed.get(column, str)(text)

    return [{k: value(k, v) for k, v in row.items()} for row in rows]


def check_rows(rows: list[dict[str, Any]], expected: list[Expected], reference: dict[str, dict[str, Any]],
               id_type: Any = None) -> None:
    """One output row per input row, in order, each with its id; bad rows carry their error and no
    score; good rows match ``reference`` (text → the service's prediction) within TOLERANCE."""
    assert len(rows) == len(expected), f"{len(rows)} output rows for {len(expected)} input rows"
    for row, exp in zip(rows, expected):
        want_id = id_type(exp.id) if id_type is not None else exp.id
        assert row["id"] == want_id, f"row for {exp.id!r} is {row['id']!r}: order or ids lost"
        if exp.error is not None:
            assert (row["error"], row["probability"], row["label"]) == (exp.error, None, None), (exp, row)
            continue
        assert row["error"] is None, (exp.id, row["error"])
        ref = reference[exp.text]  # type: ignore[index]
        assert abs(row["probability"] - ref["probability"]) <= TOLERANCE, (exp.id, row["probability"], ref)
        assert (row["label"], row["num_tokens"], row["truncated"]) == (ref["label"], ref["num_tokens"],
                                                                      ref["truncated"]), (exp.id, row, ref)
