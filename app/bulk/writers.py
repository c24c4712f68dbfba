"""Output formats of ``sentiment score``, and the progress record that makes ``--resume`` exact.

Rows are written in input order. Every so often the run *commits*: the output is flushed and synced,
then ``<output>.progress`` is replaced (atomically) with how many rows are in it and where they end.
A run killed at any moment leaves an output whose committed part is whole; ``--resume`` cuts off
whatever was written after the last commit and scores from the next row, so no row is missing or
written twice. JSONL and CSV are appended to; Parquet cannot be (its footer is written last), so
its rows go to part files under ``<output>.parts/``, joined into the output at the end.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from app.bulk.readers import PARQUET_EXTRA, InputError, Source
from app.bulk.rows import arrow_types

OUTPUT_FORMATS = ("jsonl", "csv", "parquet")
PARQUET_PART_ROWS = 8192  # rows per part file (and per row group of the output)


class ResumeError(InputError):
    """``--resume`` cannot continue: no record of the run, or its input or options changed."""


def output_format(path: Path) -> str:
    """The format an output path asks for, from its extension."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"cannot write {path}: the output's extension must be .jsonl, .csv or .parquet")
    return fmt


def default_output(source: Source) -> Path:
    """Beside the input, in its format (JSONL for a .txt file or a folder): ``reviews.scored.csv``."""
    fmt = source.format if source.format in OUTPUT_FORMATS else "jsonl"
    name = source.path.name if source.path.is_dir() else source.path.stem
    return source.path.parent / f"{name}.scored.{fmt}"


class Progress:
    """``<output>.progress``: the last commit of a run (rows, the sink's position, the counts so far)."""

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(output.name + ".progress")

    def load(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, record: dict[str, Any]) -> None:
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(json.dumps(record))
        os.replace(partial, self.path)  # atomic: a kill leaves the old record or the new one

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class Sink:
    """Where scored rows go. ``write`` appends rows; ``commit`` makes them durable and returns the
    position to record; ``finish`` completes the file."""

    commit_rows = 1  # commit after every chunk: appending formats lose nothing by it

    def __init__(self, path: Path, columns: list[str], source: Source) -> None:
        self.path, self.columns, self.source = path, columns, source

    def start(self, position: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def write(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def commit(self) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (after a failure too); what was committed stays."""


class TextSink(Sink):
    """JSONL or CSV, appended to; the position is the byte offset of the end of the last commit."""

    def start(self, position: dict[str, Any] | None) -> None:
        if position is None:
            self.file = self.path.open("wb")
        else:
            if not self.path.exists() or self.path.stat().st_size < position["bytes"]:
                raise ResumeError(f"{self.path} is shorter than its progress record says: it was changed "
                                  "since the interrupted run; score again without --resume")
            self.file = self.path.open("r+b")
            self.file.truncate(position["bytes"])  # rows written after the last commit are scored again
            self.file.seek(position["bytes"])
        if self.file.tell() == 0 and self.format == "csv":
            self.file.write(self._csv([self.columns]))

    @property
    def format(self) -> str:
        return output_format(self.path)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.format == "jsonl":
            # ensure_ascii=False keeps texts readable; a float is written with all its digits (repr).
            data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        else:
            data = self._csv([[_csv_value(row[c]) for c in self.columns] for row in rows])
        self.file.write(data)

    @staticmethod
    def _csv(records: list[list[Any]]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(records)
        return buffer.getvalue().encode()

    def commit(self) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        return {"bytes": self.file.tell()}

    def finish(self) -> None:
        self.commit()
        self.file.close()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value


class ParquetSink(Sink):
    """Parquet: rows gathered into part files of ``PARQUET_PART_ROWS``, joined into the output by
    :meth:`finish` (one row group per part), so the committed parts survive a kill."""

    commit_rows = PARQUET_PART_ROWS

    def start(self, position: dict[str, Any] | None) -> None:
        try:
            import pyarrow as pa
        except ImportError as exc:
            raise InputError(f"writing Parquet needs pyarrow: {PARQUET_EXTRA}") from exc
        self.pa = pa
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.schema = self._schema()
        if position is None:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.parts.mkdir(parents=True)
            self.count = 0
        else:
            self.count = position["parts"]
            missing = [p for p in self._part_paths() if not p.exists()]
            if missing:
                raise ResumeError(f"{missing[0]} is missing: {self.parts} was changed since the interrupted run")
            for extra in set(self.parts.glob("part-*.parquet")) - set(self._part_paths()):
                extra.unlink()  # written after the last commit
        self.pending: list[dict[str, Any]] = []

    def _schema(self) -> Any:
        pa = self.pa
        kind = self.source.id_kind
        id_type = {"row": pa.int64(), "parquet": self.source.id_arrow_type}.get(kind, pa.string())
        types = arrow_types(pa)
        return pa.schema([(c, id_type if i == 0 else types[c]) for i, c in enumerate(self.columns)])

    def _part_paths(self) -> list[Path]:
        return [self.parts / f"part-{i:06d}.parquet" for i in range(self.count)]

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.source.id_kind in ("str", "json"):
            id_column = self.columns[0]
            rows = [{**r, id_column: None if r[id_column] is None else str(r[id_column])} for r in rows]
        self.pending.extend(rows)

    def commit(self) -> dict[str, Any]:
        import pyarrow.parquet as pq

        if self.pending:
            table = self.pa.Table.from_pylist(self.pending, schema=self.schema)
            path = self.parts / f"part-{self.count:06d}.parquet"
            partial = path.with_name(path.name + ".tmp")
            pq.write_table(table, partial)
            with partial.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, path)
            self.count += 1
            self.pending = []
        return {"parts": self.count}

    def finish(self) -> None:
        import pyarrow.parquet as pq

        self.commit()
        partial = self.path.with_name(self.path.name + ".tmp")
        with pq.ParquetWriter(partial, self.schema) as writer:  # one part in memory at a time
            for path in self._part_paths():
                writer.write_table(pq.read_table(path, schema=self.schema))
        os.replace(partial, self.path)
        shutil.rmtree(self.parts, ignore_errors=True)


def open_sink(path: Path, columns: list[str], source: Source) -> Sink:
    """The writer for ``path``'s format."""
    return ParquetSink(path, columns, source) if output_format(path) == "parquet" else TextSink(path, columns, source)
