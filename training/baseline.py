"""The linear baseline: TF-IDF word 1-2-grams (sublinear tf) + logistic regression, on the IMDB archive.

    pip install -e ".[baseline]"
    python -m training.baseline --data ../shared/data/aclImdb_v1.tar.gz

1. C (the inverse regularisation strength) is chosen on the movie-grouped validation split that the
   LSTM runs use (training.data.make_split, seed 13): the vectoriser and the model are fitted on the
   22,500 training-part reviews for each C in --grid, and scored on the 2,500 validation reviews.
2. With that C, vectoriser and model are fitted again on all 25,000 training reviews.
3. The test set is scored once, with that one model.

Tokenisation: lower-cased text, IMDB's ``<br />`` line breaks replaced by spaces, then the regular
expression ``TOKEN_PATTERN``: runs of word characters with inner apostrophes ("don't" stays one
token), plus "!" and "?" as tokens of their own. Not spaCy: the baseline then needs only
scikit-learn, and it is the usual bag-of-words set-up of the published baselines. Terms seen in
fewer than ``--min-df`` reviews are dropped.

The result (figure, chosen C, every validation score, versions) goes to --out (committed), and into
the model card's ``baseline`` (--card) unless ``--card ''``. training.train's model card reads --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

RESULT = Path("training_state/baseline.json")
TOKEN_PATTERN = r"(?u)\b\w[\w']*\b|[!?]"
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean(text: str) -> str:
    """Lower case, HTML line breaks to spaces (the vectoriser does the rest)."""
    return _BREAK.sub(" ", text).lower()


def fit(texts: Sequence[str], labels: Sequence[int], c: float, min_df: int):  # -> sklearn Pipeline
    """TF-IDF (word 1-2-grams, sublinear tf, l2 rows) + logistic regression (liblinear), fitted."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=min_df, token_pattern=TOKEN_PATTERN,
                        lowercase=False, dtype=__import__("numpy").float32),
        LogisticRegression(C=c, solver="liblinear", max_iter=1000))
    return model.fit(list(texts), list(labels))


def accuracy(model, texts: Sequence[str], labels: Sequence[int]) -> float:  # noqa: ANN001
    pred = model.predict(list(texts))
    return float(sum(int(p == y) for p, y in zip(pred, labels)) / len(labels))


def run(data: str | Path, grid: Sequence[float], min_df: int = 2, split_kind: str = "movie", seed: int = 13,
        val_fraction: float = 0.1, log=print) -> dict:  # noqa: ANN001
    """Choose C on the grouped validation, refit on all training reviews, score test once; the result."""
    import sklearn

    from sentiment.artifacts import file_sha256
    from sentiment.imdb import read_imdb
    from training.card_figures import wilson_interval
    from training.data import make_split

    reviews = read_imdb(data, ("train", "test"))
    train, test = reviews["train"], reviews["test"]
    texts, labels = [clean(r.text) for r in train], [r.label for r in train]
    split = make_split(split_kind, data, [r.key for r in train], val_fraction, seed)
    log(f"split: {split.summary()}")
    scores = {}
    for c in grid:
        t0 = time.time()
        model = fit([texts[i] for i in split.train], [labels[i] for i in split.train], c, min_df)
        scores[c] = accuracy(model, [texts[i] for i in split.validation], [labels[i] for i in split.validation])
        log(f"C={c:g}: validation accuracy {scores[c]:.4f} ({time.time() - t0:.0f}s)")
    best = max(grid, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    t0 = time.time()
    model = fit(texts, labels, best, min_df)
    test_labels = [r.label for r in test]
    test_acc = accuracy(model, [clean(r.text) for r in test], test_labels)
    correct = round(test_acc * len(test))
    low, high = wilson_interval(correct, len(test))
    log(f"C={best:g} refitted on {len(train)} reviews: test accuracy {test_acc:.4f} ({time.time() - t0:.0f}s)")
    return {
        "tfidf_logistic_regression_test_accuracy": round(test_acc, 6),
        "test_interval_95": [round(low, 6), round(high, 6)],
        "test_n": len(test),
        "validation_accuracy": round(scores[best], 6),
        "C": best,
        "validation_accuracy_by_C": {f"{c:g}": round(a, 6) for c, a in scores.items()},
        "features": len(model[0].vocabulary_),
        "method": ("TF-IDF word 1-2-grams (sublinear tf, l2-normalised rows, min_df "
                   f"{min_df}) + logistic regression (liblinear); C chosen on the {split_kind}-grouped validation "
                   f"(seed {seed}, {len(split.validation)} reviews), then refitted on all {len(train)} training "
                   "reviews; the test set scored once"),
        "tokenisation": f"lower case, <br /> to spaces, regex {TOKEN_PATTERN}",
        "split": split.summary(),
        "command": "python -m training.baseline",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_sha256": file_sha256(data) if Path(data).is_file() else None,
        "versions": {"python": platform.python_version(), "scikit-learn": sklearn.__version__},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or extracted folder")
    p.add_argument("--grid", default="1,3,10,30,100", help="values of C tried on the validation split")
    p.add_argument("--min-df", type=int, default=2, help="drop terms seen in fewer reviews than this")
    p.add_argument("--out", default=str(RESULT), help="where the result goes (JSON; training.train reads it)")
    p.add_argument("--card", default="model_artifacts/model_card.json",
                   help="model card whose 'baseline' gets the result ('' for none)")
    args = p.parse_args(argv)
    result = run(args.data, [float(c) for c in args.grid.split(",")], args.min_df)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.card:
        card_path = Path(args.card)
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card["baseline"] = result
        card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"baseline: test accuracy {result['tfidf_logistic_regression_test_accuracy']:.4f} "
          f"(C={result['C']:g}); written to {out}" + (f" and {args.card}" if args.card else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
