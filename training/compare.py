"""Paired comparison of two recipes on the same validation reviews: McNemar's test and a bootstrap.

    python -m training.compare runs/a/validation_predictions.json runs/b/validation_predictions.json

Two accuracies measured on the same 2,500 reviews are not independent: most reviews are right (or
wrong) under both models, and only the reviews where they disagree say which is better. McNemar's
test looks at exactly those; the paired bootstrap resamples reviews (both models together) for an
interval on the accuracy difference. Each predictions file maps a review key to P(positive) and
carries the labels (written by ``training.train`` next to the run state).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from typing import Sequence


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """McNemar's test on paired outcomes: exact two-sided binomial p and chi² (continuity-corrected).

    ``b`` counts reviews only A gets right, ``c`` those only B gets right. Under "equally good",
    each disagreement is a fair coin, so ``min(b, c)`` ~ Binomial(b + c, 1/2).
    """
    if len(correct_a) != len(correct_b):
        raise ValueError("the two recipes must be scored on the same reviews")
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = b + c
    if n == 0:
        return {"only_a_right": 0, "only_b_right": 0, "p_exact": 1.0, "chi2": 0.0, "p_chi2": 1.0}
    k = min(b, c)
    # two-sided exact p = 2 · P(X ≤ k), X ~ Bin(n, 1/2); summed in log space so large n cannot overflow.
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(log_terms)
    p_exact = min(1.0, 2 * math.exp(top) * sum(math.exp(t - top) for t in log_terms))
    chi2 = (abs(b - c) - 1) ** 2 / n
    p_chi2 = math.erfc(math.sqrt(chi2 / 2))  # survival function of chi² with 1 degree of freedom
    return {"only_a_right": b, "only_b_right": c, "p_exact": p_exact, "chi2": round(chi2, 4), "p_chi2": p_chi2}


def paired_bootstrap(correct_a: Sequence[bool], correct_b: Sequence[bool], resamples: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Percentile interval of accuracy(B) − accuracy(A), resampling reviews with both outcomes together."""
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError("the two recipes must be scored on the same, non-empty set of reviews")
    n = len(correct_a)
    # Only the per-review difference matters: +1 (only B right), −1 (only A right), 0 (agree).
    diff = [int(y) - int(x) for x, y in zip(correct_a, correct_b)]
    rng = random.Random(seed)
    stats = sorted(sum(diff[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = stats[int(math.floor((1 - level) / 2 * resamples))]
    hi = stats[min(resamples - 1, int(math.ceil((1 + level) / 2 * resamples)) - 1)]
    return {"difference": sum(diff) / n, "low": lo, "high": hi, "level": level, "resamples": resamples}


def compare_predictions(a: dict, b: dict, threshold: float = 0.5) -> dict:
    """Compare two predictions files (``{"labels": {key: y}, "probabilities": {key: p}}``) on shared keys."""
    keys = sorted(set(a["probabilities"]) & set(b["probabilities"]))
    if not keys:
        raise ValueError("the two prediction files share no review")
    if any(a["labels"][k] != b["labels"][k] for k in keys):
        raise ValueError("the two prediction files disagree on labels")
    ca = [(a["probabilities"][k] >= threshold) == bool(a["labels"][k]) for k in keys]
    cb = [(b["probabilities"][k] >= threshold) == bool(b["labels"][k]) for k in keys]
    result = {"n": len(keys), "accuracy_a": sum(ca) / len(keys), "accuracy_b": sum(cb) / len(keys),
              "mcnemar": mcnemar(ca, cb), "bootstrap": paired_bootstrap(ca, cb)}
    boot = result["bootstrap"]
    result["verdict"] = ("no real difference (the interval contains 0)" if boot["low"] <= 0 <= boot["high"]
                         else ("B is better" if boot["difference"] > 0 else "A is better"))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="validation predictions of recipe A (JSON written by training.train)")
    p.add_argument("b", help="validation predictions of recipe B, on the same split")
    args = p.parse_args(argv)
    with open(args.a, encoding="utf-8") as fa, open(args.b, encoding="utf-8") as fb:
        a, b = json.load(fa), json.load(fb)
    if a.get("split") != b.get("split"):
        print(f"warning: different splits ({a.get('split')} vs {b.get('split')}); only shared reviews are compared",
              file=sys.stderr)
    print(json.dumps(compare_predictions(a, b), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
