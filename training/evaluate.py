"""Score an artifacts directory on the IMDB test split: accuracy, precision, recall, F1, confusion matrix.

    python -m training.evaluate --artifacts model_artifacts --data ../shared/data/aclImdb_v1.tar.gz
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch

from training.data import length_batches, load_tokenized
from training.export import load_artifacts
from training.model import pad_batch


def compute_metrics(probs: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict:
    """Binary classification metrics with positive = label 1 and prediction = ``prob >= threshold``."""
    tp = fp = tn = fn = 0
    for p, y in zip(probs, labels):
        pred = 1 if p >= threshold else 0
        if pred and y:
            tp += 1
        elif pred:
            fp += 1
        elif y:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": round((tp + tn) / n, 6) if n else 0.0,
        "precision": round(precision, 6),
        "recall": round(recall, 6),
        "f1": round(f1, 6),
        "n": n,
        "confusion_matrix": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


@torch.no_grad()
def predict_ids(model: torch.nn.Module, id_lists: Sequence[list[int]], device: torch.device,
                batch_size: int = 256) -> list[float]:
    """Last-token probabilities for many id lists, batched by length (order of the input kept)."""
    out = [0.0] * len(id_lists)
    lengths = [len(x) for x in id_lists]
    for batch in length_batches(lengths, batch_size, seed=None):
        ids, lens = pad_batch([id_lists[i] for i in batch])
        last, _ = model(ids.to(device), lens.to(device))
        for i, p in zip(batch, last.tolist()):
            out[i] = p
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="model_artifacts", help="artifacts directory to score")
    parser.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    parser.add_argument("--cache-dir", default=".cache", help="where tokenised corpora are cached")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0 …")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON only")
    args = parser.parse_args(argv)

    art = load_artifacts(args.artifacts, args.device)
    corpus = load_tokenized(args.data, art.vocab.settings, args.cache_dir)
    ids = [art.vocab.encode_tokens(t).ids for t in corpus.tokens["test"]]
    metrics = compute_metrics(predict_ids(art.model, ids, art.device), corpus.labels["test"])
    if args.json:
        print(json.dumps(metrics))
    else:
        cm = metrics["confusion_matrix"]
        print(f"model {art.card.get('version')} on {metrics['n']} test reviews")
        for key in ("accuracy", "precision", "recall", "f1"):
            print(f"  {key:<9} {metrics[key]:.4f}")
        print("  confusion matrix (rows: true, columns: predicted)")
        print("              neg     pos")
        print(f"    neg  {cm['tn']:7d} {cm['fp']:7d}")
        print(f"    pos  {cm['fn']:7d} {cm['tp']:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
