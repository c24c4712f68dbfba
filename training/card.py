"""The model card: one scoring pass over the test set, the figures derived from it, and docs/model-card.md.

    python -m training.card score      # once per model: every test review and its first sentence (heavy)
    python -m training.card figures    # from the saved predictions: interval, classes, calibration, slices
    python -m training.card render     # docs/model-card.md from model_card.json (--check: is it current?)

``score`` runs the shipped artifacts through the engine's one scoring entry (``SentimentEngine.score``,
the service's path, at the engine's default precision) and saves every review's probability, rating,
label and token count, and the same for its first sentence, to one compact file. It appends both
passes to ``metrics.test_evaluations``. It refuses to score a model a second time: every figure of
the card is then recomputed from that file by ``figures``, which scores nothing. Temperature scaling
is fitted on the movie-grouped *validation* predictions only; the test set only reports its effect.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from sentiment import LABEL_THRESHOLD

CARD = Path("model_artifacts/model_card.json")
PREDICTIONS = Path("training_state/r2/test_predictions.json.gz")
VALIDATION = Path("training_state/r2/validation_predictions.json")
PLOT = Path("docs/model-card-reliability.png")
DOC = Path("docs/model-card.md")
ECE_BINS = 15
# Review-length buckets in spaCy tokens (the service's tokenizer), before truncation: the model reads
# only the last 400, so the last bucket is the reviews whose beginning it never sees.
LENGTH_BUCKETS = [(0, 100), (101, 200), (201, 400), (401, None)]
FIRST_SENTENCE_METHOD = ('spacy.blank("en") + the rule-based "sentencizer" pipe on the review with its '
                         "HTML line breaks replaced by spaces; the first sentence, stripped")


# ----------------------------------------------------------------------------------------------------
# Figures (pure functions of probabilities and labels)


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


# ----------------------------------------------------------------------------------------------------
# The one scoring pass


def first_sentence(texts: Sequence[str]) -> list[str]:
    """The first sentence of each text (``FIRST_SENTENCE_METHOD``; no spaCy model download)."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    cleaned = [re.sub(r"<br\s*/?>", " ", t, flags=re.IGNORECASE) for t in texts]
    out = []
    for doc in nlp.pipe(cleaned, batch_size=256):
        sent = next(iter(doc.sents), None)
        out.append(sent.text.strip() if sent is not None else "")
    return out


def score_texts(engine: Any, texts: Sequence[str], batch_size: int = 256) -> list[tuple[float | None, int]]:
    """(P(positive), tokens before truncation) per text through the engine's one scoring entry; (None, 0)
    for a text the engine cannot score (no tokens)."""
    from sentiment.engine import Score, ScoreRequest

    out: list[tuple[float | None, int]] = []
    for i in range(0, len(texts), batch_size):
        for r in engine.score([ScoreRequest(t) for t in texts[i : i + batch_size]]).results:
            out.append((round(r.probability, 6), r.total_tokens) if isinstance(r, Score) else (None, 0))
    return out


def evaluation_entry(what: str, precision: str, how: str, probs: Sequence[float | None], labels: Sequence[int],
                     purpose: str, **extra: Any) -> dict:
    """One line of ``metrics.test_evaluations``: when, what, how, the figure, why."""
    scored = [(p, y) for p, y in zip(probs, labels) if p is not None]
    acc = accuracy_with_interval([p for p, _ in scored], [y for _, y in scored])
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "what": what, "precision": precision,
            "how": how, "accuracy": acc["accuracy"], "n": acc["n"], "purpose": purpose, **extra}


def append_test_evaluation(card: dict, entry: dict) -> None:
    """Add ``entry`` to the card's log of test evaluations (never replaces earlier ones)."""
    card.setdefault("metrics", {}).setdefault("test_evaluations", []).append(entry)


def cmd_score(args: argparse.Namespace) -> int:
    import torch

    from sentiment.artifacts import cpu_model, file_sha256
    from sentiment.engine import SentimentEngine
    from sentiment.imdb import read_imdb

    out = Path(args.predictions)
    if out.exists() and not args.again:
        raise SystemExit(f"{out} exists: this model's test set was already scored for the card. Every figure "
                         "comes from that file (python -m training.card figures); --again scores it once more "
                         "(and logs it).")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = SentimentEngine.load(args.artifacts, args.device)
    card_path = Path(args.artifacts) / "model_card.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    reviews = read_imdb(args.data, ("test",))["test"]
    t0 = time.time()
    full = score_texts(engine, [r.text for r in reviews])
    t_full = time.time() - t0
    firsts = first_sentence([r.text for r in reviews])
    t1 = time.time()
    short = score_texts(engine, firsts)
    t_short = time.time() - t1
    labels = [r.label for r in reviews]
    data = {
        "model": engine.version, "model_sha256": card["files"]["model.pt"], "artifacts": str(args.artifacts),
        "precision": engine.precision, "device": str(engine.device), "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
        "scored": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "how": "in-process: SentimentEngine.score (the service's scoring entry), batches of 256 texts",
        "data_sha256": file_sha256(args.data) if Path(args.data).is_file() else None,
        "seconds": {"reviews": round(t_full, 1), "first_sentences": round(t_short, 1)},
        "first_sentence_method": FIRST_SENTENCE_METHOD,
        "keys": [r.key for r in reviews], "labels": labels, "ratings": [r.rating for r in reviews],
        "probabilities": [p for p, _ in full], "total_tokens": [n for _, n in full],
        "first_sentence": {"probabilities": [p for p, _ in short], "total_tokens": [n for _, n in short]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as fh:
        json.dump(data, fh, separators=(",", ":"))
    what = f"{engine.version} ({args.what}), model.pt sha256 {card['files']['model.pt'][:12]}"
    how = f"in-process, SentimentEngine.score on {engine.device} ({cpu_model()}), python -m training.card score"
    append_test_evaluation(card, evaluation_entry(
        what, engine.precision, how, data["probabilities"], labels, args.purpose, predictions=str(out)))
    append_test_evaluation(card, evaluation_entry(
        what + "; the first sentence of each review", engine.precision, how, data["first_sentence"]["probabilities"],
        labels, args.purpose + " (short inputs)", predictions=str(out),
        unscorable=sum(p is None for p in data["first_sentence"]["probabilities"])))
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"scored {len(reviews)} reviews in {t_full:.0f}s ({engine.precision}) and their first sentences in "
          f"{t_short:.0f}s; accuracy {card['metrics']['test_evaluations'][-2]['accuracy']:.4f} / "
          f"{card['metrics']['test_evaluations'][-1]['accuracy']:.4f}; wrote {out} ({out.stat().st_size} bytes)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score every test review and its first sentence once; save the predictions")
    s.add_argument("--artifacts", default="model_artifacts")
    s.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--predictions", default=str(PREDICTIONS), help="where the per-review predictions go (gzip JSON)")
    s.add_argument("--what", default="the shipped model_artifacts/, run 2")
    s.add_argument("--purpose", default="model card slices and calibration, no model choice")
    s.add_argument("--again", action="store_true", help="score although the predictions file exists")
    args = parser.parse_args(argv)
    return {"score": cmd_score}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
