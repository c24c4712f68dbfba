"""Input formats of ``sentiment score``: each a stream of :class:`~app.bulk.rows.InputRow`, in order.

Every reader holds one row (or one Parquet record batch) at a time, so memory does not grow with the
input, and turns what it cannot read into an error row rather than stopping: a JSONL line that is
not a JSON object, bytes that are not UTF-8, a record without the text field. What makes the whole
input unreadable (no such file, a CSV or Parquet file without the text column) is an
:class:`InputError`, before anything is scored.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.bulk.rows import INVALID_ROW, INVALID_UTF8, InputRow

FORMATS = ("jsonl", "csv", "parquet", "txt")
# csv's default limit (131,072 characters a field) would stop the run at one long review; the
# service's text limit (app.bulk.rows.check) decides instead, row by row.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
# What errors="surrogateescape" makes of bytes that are not UTF-8.
_ESCAPED = re.compile("[\udc80-\udcff]")
PARQUET_EXTRA = "pip install 'lstm-sentiment-service[parquet]' (pyarrow)"


class InputError(ValueError):
    """The input cannot be read at all (missing, unknown format, no text column)."""


@dataclass(frozen=True)
class Source:
    """An input: its format, how its rows are read, and what identifies it for ``--resume``."""

    path: Path
    format: str  # one of FORMATS, or "imdb" for a folder with pos/ and neg/
    text_field: str
    id_field: str
    id_kind: str  # "row" (row numbers), "str", "json" (any JSON value), "parquet" (the column's type)
    id_arrow_type: Any = None  # for id_kind "parquet"

    @property
    def labelled(self) -> bool:
        return self.format == "imdb"

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its ``--resume``."""
        if self.path.is_dir():
            size = sum(1 for _ in _imdb_files(self.path))
            mtime = max((self.path / d).stat().st_mtime_ns for d in ("pos", "neg"))
        else:
            stat = self.path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        return {"input": str(self.path.resolve()), "size": size, "mtime_ns": mtime,
                "text_field": self.text_field, "id_field": self.id_field}

    def count(self) -> int:
        """How many rows :meth:`rows` will yield (for the progress bar's ETA): one pass, no parsing
        where the format allows."""
        if self.format in ("jsonl", "txt"):
            return _count_lines(self.path)
        if self.format == "csv":
            with _csv_text(self.path) as text:
                return max(0, sum(1 for _ in csv.reader(text)) - 1)
        if self.format == "parquet":
            return _parquet(self.path).metadata.num_rows
        return sum(1 for _ in _imdb_files(self.path))

    def rows(self, skip: int = 0) -> Iterator[InputRow]:
        """The rows in input order, after the first ``skip`` (read, not parsed: ``--resume``)."""
        return {"jsonl": self._jsonl, "txt": self._txt, "csv": self._csv, "parquet": self._parquet,
                "imdb": self._imdb}[self.format](skip)

    # ---- one reader per format ----------------------------------------------------------------
    def _lines(self, skip: int) -> Iterator[tuple[int, str | None]]:
        """(line number, its text) after the first ``skip`` lines; None for a line that is not UTF-8
        (a byte-order mark on the first line is dropped)."""
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if number <= skip:
                    continue
                try:
                    yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    yield number, None

    def _jsonl(self, skip: int) -> Iterator[InputRow]:
        for number, line in self._lines(skip):
            if line is None:
                yield InputRow(number, None, INVALID_UTF8)
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):  # a blank line, bad JSON, a bare string or list
                yield InputRow(number, None, INVALID_ROW)
                continue
            yield InputRow(record.get(self.id_field, number), record.get(self.text_field))

    def _txt(self, skip: int) -> Iterator[InputRow]:
        for number, text in self._lines(skip):
            yield InputRow(number, None, INVALID_UTF8) if text is None else InputRow(number, text.rstrip("\r\n"))

    def _csv(self, skip: int) -> Iterator[InputRow]:
        with _csv_text(self.path) as text:
            reader = csv.reader(text)
            header = next(reader, [])
            text_at = header.index(self.text_field)
            id_at = header.index(self.id_field) if self.id_field in header else None
            for number, record in enumerate(reader, 1):
                if number <= skip:
                    continue
                value = record[text_at] if text_at < len(record) else None
                rid: Any = number
                if id_at is not None:
                    rid = record[id_at] if id_at < len(record) else None
                bad = any(isinstance(v, str) and _ESCAPED.search(v) for v in (value, rid))
                if bad:
                    rid = _repaired(rid) if isinstance(rid, str) else rid
                yield InputRow(rid, value, INVALID_UTF8 if bad else None)

    def _parquet(self, skip: int) -> Iterator[InputRow]:
        table = _parquet(self.path)
        columns = [self.text_field] + ([self.id_field] if self.id_kind == "parquet" else [])
        number = 0
        for batch in table.iter_batches(batch_size=1024, columns=columns):
            if number + batch.num_rows <= skip:
                number += batch.num_rows
                continue
            texts = batch.column(self.text_field).to_pylist()
            ids = batch.column(self.id_field).to_pylist() if self.id_kind == "parquet" else None
            for i, value in enumerate(texts):
                number += 1
                if number <= skip:
                    continue
                rid = ids[i] if ids is not None else number
                if isinstance(value, bytes):  # a binary column: its text must still be UTF-8
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        yield InputRow(rid, None, INVALID_UTF8)
                        continue
                yield InputRow(rid, value)

    def _imdb(self, skip: int) -> Iterator[InputRow]:
        for number, (label, path) in enumerate(_imdb_files(self.path), 1):
            if number <= skip:
                continue
            rid = f"{path.parent.name}/{path.stem}"
            try:
                yield InputRow(rid, path.read_bytes().decode("utf-8"), expected=label)
            except UnicodeDecodeError:
                yield InputRow(rid, None, INVALID_UTF8, expected=label)


def open_source(path: str | Path, text_field: str = "text", id_field: str = "id") -> Source:
    """The input at ``path``, its format from its extension (or an IMDB-layout folder); raises
    :class:`InputError` when it cannot be read at all."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file or folder: {path}")
    if path.is_dir():
        if not ((path / "pos").is_dir() and (path / "neg").is_dir()):
            raise InputError(f"{path} is a folder but not in the IMDB layout: it needs pos/ and neg/ "
                             "subfolders of .txt files (e.g. aclImdb/test)")
        return Source(path, "imdb", text_field, id_field, "str")
    fmt = path.suffix.lower().lstrip(".")
    if fmt == "ndjson":
        fmt = "jsonl"
    if fmt not in FORMATS:
        raise InputError(f"cannot read {path}: the extension must be one of .jsonl, .csv, .parquet, .txt "
                         "(or give an IMDB-layout folder)")
    if fmt == "jsonl":
        return Source(path, fmt, text_field, id_field, "json")
    if fmt == "txt":
        return Source(path, fmt, text_field, id_field, "row")
    if fmt == "csv":
        with _csv_text(path) as text:
            header = next(csv.reader(text), [])
        if text_field not in header:
            raise InputError(f"{path} has no column {text_field!r} (its header: {header[:10]}); "
                             "name the text column with --text-field")
        return Source(path, fmt, text_field, id_field, "str" if id_field in header else "row")
    schema = _parquet(path).schema_arrow
    if text_field not in schema.names:
        raise InputError(f"{path} has no column {text_field!r} (its columns: {schema.names[:10]}); "
                         "name the text column with --text-field")
    if id_field in schema.names:
        return Source(path, fmt, text_field, id_field, "parquet", schema.field(id_field).type)
    return Source(path, fmt, text_field, id_field, "row")


def _csv_text(path: Path) -> io.TextIOWrapper:
    # Bytes that are not UTF-8 become lone surrogates (surrogateescape), so that one bad record is
    # an error row instead of a UnicodeDecodeError that ends the run; newline="" as csv requires.
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _repaired(value: str) -> str:
    """A CSV value with its bytes that are not UTF-8 shown as U+FFFD (so that it can be written)."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _count_lines(path: Path) -> int:
    lines, last = 0, b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")  # a last line without its newline is a row too


def _parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"reading Parquet needs pyarrow: {PARQUET_EXTRA}") from exc
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError: not a Parquet file
        raise InputError(f"cannot read {path} as Parquet: {exc}") from exc


def _imdb_files(folder: Path) -> Iterator[tuple[int, Path]]:
    """(label, file) for every review of an IMDB-layout folder: neg/ then pos/, by review number."""
    def number(p: Path) -> tuple[int, str]:
        head = p.stem.split("_", 1)[0]
        return (int(head) if head.isdigit() else -1, p.name)

    for label, name in ((0, "neg"), (1, "pos")):
        for path in sorted((folder / name).glob("*.txt"), key=number):
            yield label, path
