"""The model card's figures: pure functions of probabilities and labels (no model, no data files).

Accuracy with a Wilson interval, precision and recall per class, expected calibration error and the
reliability table, temperature scaling fitted by NLL, and accuracy per slice (length, rating).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sentiment import LABEL_THRESHOLD

ECE_BINS = 15
# Review-length buckets in spaCy tokens (the service's tokenizer), before truncation: the model reads
# only the last 400, so the last bucket is the reviews whose beginning it never sees.
LENGTH_BUCKETS = [(0, 100), (101, 200), (201, 400), (401, None)]



def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); sound near 0 and 1, unlike p ± z·se."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def accuracy_with_interval(probs: Sequence[float], labels: Sequence[int]) -> dict:
    """Accuracy, correct count and its 95 % Wilson interval."""
    correct = sum(int((p >= LABEL_THRESHOLD) == bool(y)) for p, y in zip(probs, labels))
    low, high = wilson_interval(correct, len(labels))
    return {"accuracy": round(correct / len(labels), 6) if labels else 0.0, "n": len(labels), "correct": correct,
            "interval_95": [round(low, 6), round(high, 6)]}


def per_class(probs: Sequence[float], labels: Sequence[int]) -> dict:
    """Precision and recall of each class (negative = 0, positive = 1), with their support."""
    out = {}
    for name, cls in (("negative", 0), ("positive", 1)):
        pred = [int(p >= LABEL_THRESHOLD) == cls for p in probs]
        true = [y == cls for y in labels]
        tp = sum(a and b for a, b in zip(pred, true))
        out[name] = {"precision": round(tp / max(1, sum(pred)), 6), "recall": round(tp / max(1, sum(true)), 6),
                     "support": sum(true), "predicted": sum(pred)}
    return out


def reliability(probs: Sequence[float], labels: Sequence[int], bins: int = ECE_BINS) -> dict:
    """Expected calibration error over ``bins`` equal-width bins of the predicted label's confidence.

    Confidence is max(p, 1 − p), so the bins span [0.5, 1]; ECE = Σ_bins (n_b / n) · |accuracy_b −
    mean confidence_b| (Guo et al. 2017). Also the bins themselves, for the reliability plot.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    conf = np.maximum(p, 1 - p)
    correct = (p >= LABEL_THRESHOLD) == (y == 1)
    edges = np.linspace(0.5, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = idx == b
        n = int(mask.sum())
        if n:
            acc, mean_conf = float(correct[mask].mean()), float(conf[mask].mean())
            ece += n / len(p) * abs(acc - mean_conf)
            rows.append({"low": round(float(edges[b]), 4), "high": round(float(edges[b + 1]), 4), "n": n,
                         "accuracy": round(acc, 6), "confidence": round(mean_conf, 6)})
    return {"ece": round(ece, 6), "bins": bins, "binning": "equal-width bins of max(p, 1-p) over [0.5, 1]",
            "reliability": rows}


def _logits(probs: Sequence[float]) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def scale(probs: Sequence[float], temperature: float) -> list[float]:
    """Probabilities with their logits divided by ``temperature`` (labels unchanged: the sign stays)."""
    return (1 / (1 + np.exp(-_logits(probs) / temperature))).tolist()


def nll(probs: Sequence[float], labels: Sequence[int]) -> float:
    """Mean negative log-likelihood of the labels."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def fit_temperature(probs: Sequence[float], labels: Sequence[int]) -> float:
    """The temperature T minimising the NLL of sigmoid(logit / T) (golden-section search on log T).

    The NLL is convex in 1/T, so the one-dimensional search finds the minimum; T > 1 softens
    over-confident probabilities, T < 1 sharpens them. Accuracy cannot change.
    """
    z = _logits(probs)
    y = np.asarray(labels, dtype=np.float64)

    def loss(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, s) - y * s))

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(100):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def temperature_report(val_probs: Sequence[float], val_labels: Sequence[int],
                       test_probs: Sequence[float] | None = None, test_labels: Sequence[int] | None = None) -> dict:
    """Fit T on validation; ECE and NLL before and after, on validation (and on test when given)."""
    t = fit_temperature(val_probs, val_labels)
    out: dict[str, Any] = {"temperature": round(t, 4), "fitted_on": "validation (movie-grouped), by minimising NLL"}
    sets = [("validation", val_probs, val_labels)]
    if test_probs is not None and test_labels is not None:
        sets.append(("test", test_probs, test_labels))
    for name, p, y in sets:
        scaled = scale(p, t)
        out[name] = {"ece_before": reliability(p, y)["ece"], "ece_after": reliability(scaled, y)["ece"],
                     "nll_before": round(nll(p, y), 6), "nll_after": round(nll(scaled, y), 6)}
    out["lowers_validation_ece"] = out["validation"]["ece_after"] < out["validation"]["ece_before"]
    return out


def bucket_name(low: int, high: int | None) -> str:
    return f"{low}-{high}" if high is not None else f">{low - 1}"


def accuracy_by(probs: Sequence[float], labels: Sequence[int], groups: Sequence[Any], order: Iterable[Any]) -> dict:
    """Accuracy with its Wilson interval for each group (in ``order``), and each group's share of errors."""
    out = {}
    for g in order:
        idx = [i for i, x in enumerate(groups) if x == g]
        if idx:
            out[str(g)] = accuracy_with_interval([probs[i] for i in idx], [labels[i] for i in idx])
            out[str(g)].pop("correct")
    return out


def length_bucket(tokens: int) -> str:
    for low, high in LENGTH_BUCKETS:
        if tokens >= low and (high is None or tokens <= high):
            return bucket_name(low, high)
    raise ValueError(tokens)
