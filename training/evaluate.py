"""Score a model on the IMDB test split: accuracy, precision, recall, F1, confusion matrix.

    python -m training.evaluate --artifacts model_artifacts --data ../shared/data/aclImdb_v1.tar.gz
    python -m training.evaluate --url http://127.0.0.1:8000 --data ../shared/data/aclImdb_v1.tar.gz

In-process, the raw review texts go through the engine's one scoring entry (the service's own
path: tokenise, truncate, length-bucketed forward passes). With ``--url`` they are sent to a running
service (``POST /v1/predict``) instead, so the figure is reproduced through HTTP and batching too.

Every test evaluation belongs in the model card's log (``metrics.test_evaluations``): ``--log-purpose
"why"`` appends this one to --card. Scoring the test set is not a way to choose a model: choose on the
movie-grouped validation (docs/training.md, test-set hygiene).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from sentiment import LABEL_THRESHOLD
from sentiment.batching import length_buckets
from sentiment.engine import Score, ScoreRequest, SentimentEngine
from sentiment.imdb import read_imdb
from sentiment.model import pad_batch


def compute_metrics(probs: Sequence[float], labels: Sequence[int], threshold: float = LABEL_THRESHOLD) -> dict:
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
    """Last-token probabilities for many id lists, batched by length (order of the input kept).

    For models being trained (eager modules over cached token ids); exported artifacts are scored
    through :func:`predict_texts`, the service's path.
    """
    out = [0.0] * len(id_lists)
    lengths = [len(x) for x in id_lists]
    for batch in length_buckets(lengths, batch_size):
        ids, lens = pad_batch([id_lists[i] for i in batch])
        last, _ = model(ids.to(device), lens.to(device))
        for i, p in zip(batch, last.tolist()):
            out[i] = p
    return out


def predict_texts(engine: SentimentEngine, texts: Sequence[str], batch_size: int = 256) -> list[float]:
    """P(positive) for raw texts through the engine's one scoring entry, ``batch_size`` at a time."""
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        batch = engine.score([ScoreRequest(t) for t in texts[i : i + batch_size]])
        for j, result in enumerate(batch.results):
            if not isinstance(result, Score):
                raise RuntimeError(f"text {i + j} could not be scored: {result}")
            out.append(result.probability)
    return out


def predict_over_http(url: str, texts: Sequence[str], per_request: int = 32, concurrency: int = 8) -> list[float]:
    """P(positive) for each text from a running service, ``per_request`` texts per call."""
    import asyncio

    import httpx

    chunks = [list(texts[i : i + per_request]) for i in range(0, len(texts), per_request)]
    out: list[list[float]] = [[] for _ in chunks]

    async def worker(queue: asyncio.Queue, client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            r = await client.post("/v1/predict", json={"texts": chunks[i]})
            r.raise_for_status()
            out[i] = [p["probability"] for p in r.json()["predictions"]]

    async def run() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(len(chunks)):
            queue.put_nowait(i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            await asyncio.gather(*(worker(queue, client) for _ in range(concurrency)))

    asyncio.run(run())
    return [p for chunk in out for p in chunk]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="model_artifacts", help="artifacts directory to score")
    parser.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0 …")
    parser.add_argument("--url", default=None, help="score through a running service at this base URL instead")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON only")
    parser.add_argument("--predictions", default=None,
                        help="also write every review's probability here (the format training.compare reads, "
                        "for a paired comparison of two models on the test set)")
    parser.add_argument("--log-purpose", default=None,
                        help="append this evaluation to the model card's metrics.test_evaluations with this purpose")
    parser.add_argument("--card", default=None, help="model card to log to (default: --artifacts/model_card.json)")
    args = parser.parse_args(argv)

    reviews = read_imdb(args.data, ("test",))["test"]
    texts = [r.text for r in reviews]
    if args.url:
        import httpx

        info = httpx.get(args.url + "/v1/model", timeout=30).json()
        version, precision = info.get("version"), str(info.get("precision", "unknown"))
        probs = predict_over_http(args.url, texts)
    else:
        engine = SentimentEngine.load(args.artifacts, args.device)
        version, precision = engine.version, engine.precision
        probs = predict_texts(engine, texts)
    metrics = compute_metrics(probs, [r.label for r in reviews])
    if args.predictions:
        Path(args.predictions).write_text(json.dumps(
            {"model": version, "labels": {r.key: r.label for r in reviews},
             "probabilities": {r.key: round(p, 6) for r, p in zip(reviews, probs)}}) + "\n", encoding="utf-8")
    if args.log_purpose:
        from training.card import append_test_evaluation, evaluation_entry

        card_path = Path(args.card or Path(args.artifacts) / "model_card.json")
        card = json.loads(card_path.read_text(encoding="utf-8"))
        how = f"HTTP: python -m training.evaluate --url {args.url}" if args.url else \
            "in-process: python -m training.evaluate (SentimentEngine.score)"
        append_test_evaluation(card, evaluation_entry(str(version), precision, how, probs,
                                                      [r.label for r in reviews], args.log_purpose))
        card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(metrics))
    else:
        cm = metrics["confusion_matrix"]
        print(f"model {version} on {metrics['n']} test reviews" + (f" over HTTP ({args.url})" if args.url else ""))
        for key in ("accuracy", "precision", "recall", "f1"):
            print(f"  {key:<9} {metrics[key]:.4f}")
        print("  confusion matrix (rows: true, columns: predicted)")
        print("              neg     pos")
        print(f"    neg  {cm['tn']:7d} {cm['fp']:7d}")
        print(f"    pos  {cm['fn']:7d} {cm['tp']:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
