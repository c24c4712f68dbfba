"""Faithfulness of occlusion explanations: do the tokens they rank first really decide the verdict?

    python -m benchmarks.faithfulness --data ../shared/data/aclImdb_v1.tar.gz --reviews 1000

For each test review (a seeded sample), the shipped model's prediction is explained by the
service's own engine (``explain``). Then k tokens are dropped, chosen three ways, and the review is
scored again:

* **occlusion**: the k tokens with the largest attribution towards the predicted label;
* **trace jumps**: the k tokens after which the running probability (the trace) moved most
  towards the predicted label (the first token's jump is from the empty-input probability);
* **random**: k tokens drawn at random (seeded).

It reports, per method and k, how far P(predicted label) falls on average and how often the label
flips. A faithful method makes the probability fall further than the trace jumps and random
tokens do. At k = 1 occlusion wins by construction (its top token *is* the best single removal);
k > 1 tests whether the single-token attributions still add up when tokens are removed together.
Reviews with no more than k tokens are skipped for that k.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.run import REPO, load_reviews
from sentiment.engine import ScoreRequest, SentimentEngine
from sentiment.model import pad_batch

KS = (1, 3, 5, 10, 20)
METHODS = ("occlusion", "trace jumps", "random")


def probabilities(engine: SentimentEngine, rows: list[list[int]], batch: int = 64) -> list[float]:
    """P(positive) of each id sequence: the model itself, in batches of equal-length rows (no padding)."""
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            ids, lengths = pad_batch(rows[i:i + batch])
            out += engine.artifacts.model(ids.to(engine.device), lengths.to(engine.device))[0].float().cpu().tolist()
    return out


def pick(method: str, k: int, attributions: list[float], trace: list[float], start: float, direction: int,
         rng: random.Random) -> list[int]:
    n = len(attributions)
    if method == "occlusion":
        order = sorted(range(n), key=lambda j: -direction * attributions[j])
    elif method == "trace jumps":
        jumps = [trace[j] - (trace[j - 1] if j else start) for j in range(n)]
        order = sorted(range(n), key=lambda j: -direction * jumps[j])
    else:
        order = rng.sample(range(n), n)
    return order[:k]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"), help="artifacts directory to explain")
    p.add_argument("--reviews", type=int, default=1000, help="test reviews to sample")
    p.add_argument("--seed", type=int, default=0, help="sample and random-removal seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = SentimentEngine.load(args.artifacts, "auto")
    texts = load_reviews(args.data, args.reviews, args.seed)
    rng = random.Random(args.seed)
    drops: dict[tuple[str, int], list[float]] = {(m, k): [] for m in METHODS for k in KS}
    flips: dict[tuple[str, int], int] = {(m, k): 0 for m in METHODS for k in KS}
    started = time.perf_counter()
    explained_tokens = 0
    for n_done, text in enumerate(texts, 1):
        (score,) = engine.score([ScoreRequest(text, trace=True, explain=True)]).results
        if isinstance(score, Exception):
            print(f"skipped a review: {score}", file=sys.stderr)
            continue
        ids = engine.encoder.encode_many([text], engine.max_tokens)[0].ids
        attributions = score.explanation.attributions
        explained_tokens += len(ids)
        direction = 1 if score.probability >= 0.5 else -1
        for k in KS:
            if len(ids) <= k:
                continue
            chosen = {m: set(pick(m, k, attributions, score.trace, engine.empty_probability, direction, rng))
                      for m in METHODS}
            rows = [[t for j, t in enumerate(ids) if j not in chosen[m]] for m in METHODS]
            for m, p_removed in zip(METHODS, probabilities(engine, rows)):
                drops[(m, k)].append(direction * (score.probability - p_removed))
                flips[(m, k)] += (p_removed >= 0.5) != (score.probability >= 0.5)
        if n_done % 100 == 0:
            print(f"{n_done}/{len(texts)} reviews, {time.perf_counter() - started:.0f}s", file=sys.stderr)

    seconds = time.perf_counter() - started
    print(f"{len(texts)} test reviews (seed {args.seed}), model {engine.version}; "
          f"{explained_tokens:,} tokens explained in {seconds:.0f}s\n")
    print("Mean fall of P(predicted label) when k tokens are dropped (flip rate in brackets):\n")
    print("| k | reviews | " + " | ".join(METHODS) + " |")
    print("|---:|---:|" + "---:|" * len(METHODS))
    table = []
    for k in KS:
        n = len(drops[("random", k)])
        row = {"k": k, "reviews": n}
        cells = []
        for m in METHODS:
            mean = statistics.fmean(drops[(m, k)])
            rate = flips[(m, k)] / n
            row[m] = {"mean_drop": round(mean, 4), "flip_rate": round(rate, 4)}
            cells.append(f"{mean:.3f} ({rate:.1%})")
        table.append(row)
        print(f"| {k} | {n} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"reviews": len(texts), "seed": args.seed, "model": engine.version,
                                              "seconds": round(seconds, 1), "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
