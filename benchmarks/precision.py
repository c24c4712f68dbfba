"""What each ``SENTIMENT_PRECISION`` costs and buys: accuracy, speed, and how batch-invariant it is.

    python -m benchmarks.precision --data ../shared/data/aclImdb_v1.tar.gz

For fp32, bf16 and int8, in one run, with the engine's own scoring entry (the service's path):

* accuracy on every test review (25,000), scored in batches of 64, and label flips against fp32;
* speed: reviews/s over those batches (tokenising included, torch at ``--threads``), and the
  speed-up over fp32; run it on a quiet machine;
* invariance: ``--invariance-reviews`` reviews scored alone and again inside shuffled batches of 64
  with longer and shorter neighbours; the largest change of a probability is the bound a client can
  expect between two calls of the same text (traces included). fp32 must stay within 1e-5, bf16 within 1e-6;
* the largest per-step trace difference from fp32, over ``--trace-reviews`` reviews.

Prints a table and writes ``precision.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sentiment.engine import PRECISIONS, ScoreRequest, SentimentEngine

REPO = Path(__file__).resolve().parent.parent


def score_all(engine: SentimentEngine, texts: list[str], batch: int) -> tuple[list[float], float]:
    """Probabilities of ``texts`` in batches of ``batch``, and the seconds it took."""
    started = time.perf_counter()
    out: list[float] = []
    for i in range(0, len(texts), batch):
        out += [s.probability for s in engine.score([ScoreRequest(t) for t in texts[i:i + batch]]).results]
    return out, time.perf_counter() - started


def invariance(engine: SentimentEngine, texts: list[str], seed: int) -> float:
    """Largest change of a probability or of any per-step trace value of ``texts`` between scored
    alone and scored in a shuffled batch of 64."""
    alone = [engine.score([ScoreRequest(t, trace=True)]).results[0] for t in texts]
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    worst = 0.0
    for i in range(0, len(order), 64):
        chunk = order[i:i + 64]
        for j, s in zip(chunk, engine.score([ScoreRequest(texts[j], trace=True) for j in chunk]).results):
            worst = max(worst, abs(s.probability - alone[j].probability),
                        max(abs(a - b) for a, b in zip(s.trace, alone[j].trace)))
    return worst


def traces(engine: SentimentEngine, texts: list[str]) -> list[list[float]]:
    """The per-step traces of ``texts``, in batches of 64."""
    out: list[list[float]] = []
    for i in range(0, len(texts), 64):
        out += [s.trace for s in engine.score([ScoreRequest(t, trace=True) for t in texts[i:i + 64]]).results]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"), help="artifacts directory")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS, help="what to measure")
    p.add_argument("--reviews", type=int, default=None, help="score only this many test reviews (default: all)")
    p.add_argument("--invariance-reviews", type=int, default=512, help="reviews for the invariance bound")
    p.add_argument("--trace-reviews", type=int, default=2000, help="reviews whose traces are compared with fp32's")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="review order and batch shuffles")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where precision.json goes")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sentiment.imdb import read_imdb

    reviews = read_imdb(args.data, ("test",))["test"]
    random.Random(args.seed).shuffle(reviews)  # batches mix labels and lengths, as traffic does
    reviews = reviews[:args.reviews] if args.reviews else reviews
    texts, labels = [r.text for r in reviews], [r.label for r in reviews]
    rows: dict[str, dict[str, Any]] = {}
    reference: list[float] | None = None
    reference_traces: list[list[float]] | None = None
    for precision in args.precisions:
        engine = SentimentEngine.load(args.artifacts, "cpu", precision=precision)
        engine.warm_up()
        probs, seconds = score_all(engine, texts, 64)
        correct = sum((pr >= 0.5) == bool(y) for pr, y in zip(probs, labels))
        steps = traces(engine, texts[:args.trace_reviews])
        if reference is None and precision == "fp32":
            reference, reference_traces = probs, steps
        row: dict[str, Any] = {"accuracy": correct / len(texts), "reviews": len(texts),
                               "reviews_per_s": len(texts) / seconds,
                               "invariance_max_abs": invariance(engine, texts[:args.invariance_reviews], args.seed)}
        if reference is not None:
            row["max_abs_vs_fp32"] = max(abs(a - b) for a, b in zip(probs, reference))
            row["label_flips_vs_fp32"] = sum((a >= 0.5) != (b >= 0.5) for a, b in zip(probs, reference))
            assert reference_traces is not None
            row["max_trace_abs_vs_fp32"] = max(abs(a - b) for s1, s2 in zip(steps, reference_traces) for a, b in zip(s1, s2))
        rows[precision] = row
        print(f"{precision}: accuracy {row['accuracy']:.4f}, {row['reviews_per_s']:.0f} reviews/s, "
              f"invariance {row['invariance_max_abs']:.2g}", flush=True)
    base = rows.get("fp32", {}).get("reviews_per_s")
    print("\n| precision | test accuracy | reviews/s | speed-up | batch invariance (max Δ, probability or trace) "
          "| max Δp vs fp32 | max Δ trace vs fp32 | label flips vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        r["speedup_vs_fp32"] = r["reviews_per_s"] / base if base else None
        print(f"| {name} | {100 * r['accuracy']:.2f} % | {r['reviews_per_s']:.0f} | "
              f"{r['speedup_vs_fp32']:.2f}× | {r['invariance_max_abs']:.1e} | {r.get('max_abs_vs_fp32', 0):.1e} | "
              f"{r.get('max_trace_abs_vs_fp32', 0):.1e} | {r.get('label_flips_vs_fp32', '–')} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python -m benchmarks.precision " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch_threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "artifacts": args.artifacts, "precisions": rows}
    (out / "precision.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out / 'precision.json'}")
    ok = rows.get("fp32", {}).get("invariance_max_abs", 0.0) <= 1e-5 and rows.get("bf16", {}).get("invariance_max_abs", 0.0) <= 1e-6
    print(f"{'PASS' if ok else 'FAIL'}  batch invariance: fp32 ≤ 1e-5, bf16 ≤ 1e-6")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
