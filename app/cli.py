"""``sentiment``: the command-line entry point (installed by ``pip install``; also ``python -m app.cli``).

    sentiment score reviews.jsonl --output scored.jsonl
    sentiment score aclImdb/test                      # an IMDB-layout folder: also reports accuracy

Exit status: 0 when the run finished, whatever its rows' errors (they are in the output's ``error``
column); 1 when the run itself failed (the model could not be loaded, the workers failed, the output
could not be written); 2 for a usage or input problem found before scoring (no such file, unknown
format, no text column, nothing to resume); 130 on Ctrl-C. A failed or interrupted run can be
continued with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def parser() -> argparse.ArgumentParser:
    """The ``sentiment`` command's arguments (``sentiment score --help``)."""
    top = argparse.ArgumentParser(prog="sentiment", description="The LSTM sentiment model from the command line.")
    commands = top.add_subparsers(dest="command", required=True)
    score = commands.add_parser(
        "score", help="score a file or folder of texts on every core",
        description="Score every text of INPUT with the service's engine and model workers, streaming, in input "
                    "order. Each output row keeps its id and gains probability, label, num_tokens, truncated and "
                    "error. Rows that cannot be scored get an error value; they never stop the run (docs/bulk.md).")
    score.add_argument("input", type=Path, help=".jsonl, .csv, .parquet, .txt (one text per line), or a folder "
                       "with pos/ and neg/ (IMDB layout; accuracy is reported)")
    score.add_argument("--output", "-o", type=Path, help="a .jsonl, .csv or .parquet file (default: beside the "
                       "input, INPUT.scored.<its format>; JSONL for .txt and folders)")
    score.add_argument("--text-field", default="text", help="the field or column holding the text (default: text)")
    score.add_argument("--id-field", default="id", help="the field or column holding each row's id (default: id; "
                       "rows without one get their row number, from 1)")
    score.add_argument("--trace", action="store_true", help="add each text's tokens and the probability after "
                       "every token (columns tokens, trace)")
    score.add_argument("--workers", type=int, help="model-worker processes (default: one per usable core on "
                       "CPU, 0 on CUDA; 0 scores in this process)")
    score.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: SENTIMENT_DEVICE, else auto)")
    score.add_argument("--artifacts", type=Path, help="model artifacts directory (default: "
                       "SENTIMENT_ARTIFACTS_DIR, else the shipped model)")
    score.add_argument("--resume", action="store_true", help="continue an interrupted run into the same output, "
                       "without scoring again the rows it wrote")
    score.add_argument("--batch-size", type=int, default=None, help="texts per chunk sent to a worker (default: 256)")
    score.add_argument("--summary-json", type=Path, help="also write the final summary to this file, as JSON")
    score.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run ``sentiment``; its exit status."""
    args = parser().parse_args(argv)
    from app.bulk.readers import InputError
    from app.bulk.run import CHUNK_ROWS, BulkJob, BulkRun, error_counts

    job = BulkJob(args.input, args.output, args.text_field, args.id_field, args.trace, args.workers, args.device,
                  args.artifacts, args.resume, args.batch_size or CHUNK_ROWS, not args.quiet)
    try:
        run = BulkRun(job)
        summary = run.run()
    except InputError as exc:  # also ResumeError
        print(f"sentiment score: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sentiment score: interrupted; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        logging.getLogger("app.bulk").debug("run failed", exc_info=True)
        print(f"sentiment score: the run failed: {type(exc).__name__}: {exc}\n"
              "  the rows written so far are kept; continue with --resume", file=sys.stderr)
        return EXIT_FAILED
    done = summary.rows - summary.resumed_from
    lines = [f"{summary.rows} rows → {summary.output} ({summary.scored} scored; errors: {error_counts(summary)})"]
    if summary.resumed_from:
        lines.append(f"resumed after row {summary.resumed_from}; {done} rows scored in this run")
    if summary.accuracy is not None:
        lines.append(f"accuracy {summary.accuracy:.4f} on {summary.labelled} labelled reviews")
    where = f"{summary.workers} model worker{'s' * (summary.workers != 1)}" if summary.workers else "this process"
    lines.append(f"model {summary.model} ({summary.precision}) on {where}: start-up "
                 f"{summary.startup_seconds:.1f}s, {done} rows in {summary.scoring_seconds:.1f}s "
                 f"({summary.rows_per_s:.1f} rows/s)")
    print("\n".join(lines))
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
