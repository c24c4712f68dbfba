"""Train the sentiment LSTM on IMDB and export it to an artifacts directory.

    python -m training.train --data ../shared/data/aclImdb_v1.tar.gz --out model_artifacts

Steps: tokenise (cached) → vocabulary from the training split → word2vec on train + unsup (cached) →
language-model pre-training of embedding + LSTM on train + unsup (cached per epoch, see pretrain.py) →
Adam on the labelled training split with early stopping on a validation split carved from train →
TorchScript export → one evaluation on the full test split, written into the model card.
Checkpoints are written every epoch; ``--resume`` continues an interrupted run, ``--init-from``
fine-tunes from an existing artifacts directory (e.g. the shipped model).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sentiment.batching import length_buckets
from training.data import load_tokenized
from training.evaluate import compute_metrics, predict_ids
from sentiment.artifacts import cpu_model, export_artifacts, load_artifacts, resolve_device
from sentiment.model import ModelConfig, SentimentLSTM, pad_batch
from training.pretrain import cache_key, pretrain_language_model
from sentiment.text import TokenizerSettings, Vocabulary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--download", action="store_true", help="download the official archive to --data if missing")
    p.add_argument("--out", default="model_artifacts", help="artifacts directory to write")
    p.add_argument("--cache-dir", default=".cache", help="tokenised corpus and word-vector cache")
    p.add_argument("--checkpoint-dir", default="checkpoints", help="per-epoch checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/last.pt")
    p.add_argument("--init-from", default=None, help="start from the weights and vocabulary of an artifacts dir")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--patience", type=int, default=3, help="epochs without validation gain before stopping")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--aux-weight", type=float, default=0.2,
                   help="weight of the loss on every timestep (target replication); the rest is on the last step")
    p.add_argument("--embedding-dim", type=int, default=200)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.4)
    p.add_argument("--max-tokens", type=int, default=400, help="truncation length (the end is kept)")
    p.add_argument("--vocab-size", type=int, default=25_000)
    p.add_argument("--min-freq", type=int, default=3)
    p.add_argument("--word-vectors", choices=["word2vec", "none"], default="word2vec",
                   help="initialise embeddings with word2vec trained on train + unsup")
    p.add_argument("--w2v-epochs", type=int, default=5)
    p.add_argument("--lm-epochs", type=int, default=1,
                   help="language-model pre-training epochs of embedding + LSTM on train + unsup (0: none)")
    p.add_argument("--lm-lr", type=float, default=2e-3)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--max-train", type=int, default=None, help="use only this many training reviews (smoke runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--workers", type=int, default=2, help="tokenisation processes")
    p.add_argument("--no-test", action="store_true", help="skip the test-split evaluation")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def word2vec_matrix(vocab: Vocabulary, sentences: list[list[str]], dim: int, epochs: int, seed: int,
                    cache_dir: Path, workers: int) -> np.ndarray:
    """Skip-gram word2vec on ``sentences`` (train + unsup), as a (len(vocab), dim) matrix; cached."""
    key = hashlib.sha256(f"{len(sentences)}|{dim}|{epochs}|{seed}|".encode() + "\n".join(vocab.itos).encode())
    path = cache_dir / f"w2v-{key.hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path)
    from gensim.models import Word2Vec

    t0 = time.time()
    w2v = Word2Vec(sentences, vector_size=dim, window=5, min_count=3, sg=1, negative=5,
                   epochs=epochs, workers=workers, seed=seed)
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0, 0.1, (len(vocab), dim)).astype(np.float32)
    matrix[0] = 0.0  # <pad>
    hits = 0
    for i, tok in enumerate(vocab.itos):
        if tok in w2v.wv:
            matrix[i] = w2v.wv[tok]
            hits += 1
    # word2vec norms are larger than an embedding layer's usual scale; normalise to unit std.
    matrix[2:] /= matrix[2:].std()
    print(f"word2vec: {hits}/{len(vocab)} words covered, {time.time() - t0:.0f}s", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, matrix)
    return matrix


def loss_fn(model: SentimentLSTM, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
            aux_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE on the last real token plus ``aux_weight`` × BCE averaged over all real timesteps.

    The per-step term (target replication, Lipton et al. 2015) gives every step a gradient, which
    helps a long LSTM train and makes the trace meaningful early in a review.
    """
    step = model.step_logits(ids)  # (B, T)
    last = step.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)  # (B,)
    loss = F.binary_cross_entropy_with_logits(last, labels)
    if aux_weight > 0:
        mask = (torch.arange(ids.size(1), device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)).float()  # (B, T)
        per_step = F.binary_cross_entropy_with_logits(step, labels.unsqueeze(1).expand_as(step), reduction="none")
        aux = (per_step * mask).sum(1) / lengths.float()  # (B,)
        loss = (1 - aux_weight) * loss + aux_weight * aux.mean()
    return loss, last


def evaluate_split(model: SentimentLSTM, ids: list[list[int]], labels: list[int], device: torch.device) -> dict:
    model.eval()
    return compute_metrics(predict_ids(model, ids, device), labels)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cache_dir, ckpt_dir = Path(args.cache_dir), Path(args.checkpoint_dir)
    data_path = Path(args.data)
    if args.download and not data_path.exists():
        from sentiment.imdb import download_imdb

        download_imdb(data_path)
    started = time.time()

    init = load_artifacts(args.init_from, "cpu") if args.init_from else None
    settings = init.vocab.settings if init else TokenizerSettings(max_tokens=args.max_tokens)
    corpus = load_tokenized(data_path, settings, cache_dir, args.workers)
    print(f"tokenised corpus ready in {time.time() - started:.0f}s: "
          + ", ".join(f"{k}={len(v)}" for k, v in corpus.tokens.items()), flush=True)

    # Validation split carved from the labelled training reviews with a fixed seed.
    order = list(range(len(corpus.tokens["train"])))
    random.Random(args.seed).shuffle(order)
    n_val = int(round(len(order) * args.val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if args.max_train:
        train_idx = train_idx[: args.max_train]

    vocab = init.vocab if init else Vocabulary.build(
        (corpus.tokens["train"][i] for i in train_idx), settings, args.min_freq, args.vocab_size)
    # (Only the training split feeds the vocabulary, so validation words are as unseen as test words.)

    def encode(split: str, idx: Sequence[int]) -> tuple[list[list[int]], list[int]]:
        toks, labs = corpus.tokens[split], corpus.labels[split]
        return [vocab.encode_tokens(toks[i]).ids for i in idx], [labs[i] for i in idx]

    train_ids, train_labels = encode("train", train_idx)
    val_ids, val_labels = encode("train", val_idx)

    lm_report = None
    if init:
        config = ModelConfig(**init.card["architecture"]["config"])
        model = SentimentLSTM(config)
        model.load_state_dict(init.model.state_dict())
    else:
        config = ModelConfig(len(vocab), args.embedding_dim, args.hidden_size, args.layers, args.dropout)
        model = SentimentLSTM(config)
        if args.word_vectors == "word2vec":
            unsup_and_train = [corpus.tokens["train"][i] for i in train_idx] + corpus.tokens["unsup"]
            matrix = word2vec_matrix(vocab, unsup_and_train, args.embedding_dim, args.w2v_epochs, args.seed,
                                     cache_dir, args.workers)
            model.embedding.weight.data.copy_(torch.from_numpy(matrix))
        if args.lm_epochs > 0:
            # The validation reviews stay out of pre-training too; test reviews are never read.
            lm_texts = train_ids + [vocab.encode_tokens(t).ids for t in corpus.tokens["unsup"]]
            init_digest = hashlib.sha256(model.embedding.weight.detach().numpy().tobytes()).hexdigest()
            key = cache_key(vocab.itos, asdict(config), len(lm_texts), args.seed, init_digest)
            lm_report = pretrain_language_model(model.to(device), lm_texts, args.lm_epochs, args.seed, device,
                                                cache_dir / f"lm-{key}.pt", args.batch_size, args.lm_lr)
            del lm_texts
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)

    state = {"epoch": 0, "best_acc": -1.0, "best_state": None, "bad_epochs": 0, "history": [], "train_seconds": 0.0}
    last_ckpt = ckpt_dir / "last.pt"
    if args.resume and last_ckpt.exists():
        ckpt = torch.load(last_ckpt, map_location=device, weights_only=False)
        if ckpt["vocab"] != vocab.itos or ckpt["config"] != asdict(config):
            raise SystemExit("checkpoint was made with a different vocabulary or model config; cannot resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        random.setstate(ckpt["py_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resumed after epoch {state['epoch']} (best val acc {state['best_acc']:.4f})", flush=True)

    lengths = [len(x) for x in train_ids]
    while state["epoch"] < args.epochs and state["bad_epochs"] < args.patience:
        epoch = state["epoch"] + 1
        model.train()
        t0 = time.time()
        seen = correct = 0
        total_loss = 0.0
        batches = length_buckets(lengths, args.batch_size, seed=args.seed + epoch)
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", mininterval=30, file=sys.stdout)
        for batch in bar:
            ids, lens = pad_batch([train_ids[i] for i in batch])
            y = torch.tensor([train_labels[i] for i in batch], dtype=torch.float32, device=device)
            ids, lens = ids.to(device), lens.to(device)
            loss, last = loss_fn(model, ids, lens, y, args.aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            seen += len(batch)
            correct += int(((last > 0).float() == y).sum())
            total_loss += float(loss.detach()) * len(batch)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
        epoch_seconds = time.time() - t0
        val = evaluate_split(model, val_ids, val_labels, device)
        scheduler.step(val["accuracy"])
        improved = val["accuracy"] > state["best_acc"]
        if improved:
            state["best_acc"] = val["accuracy"]
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            state["bad_epochs"] = 0
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["train_seconds"] += epoch_seconds
        state["history"].append({"epoch": epoch, "train_loss": round(total_loss / seen, 5),
                                 "train_accuracy": round(correct / seen, 5), "val_accuracy": val["accuracy"],
                                 "seconds": round(epoch_seconds, 1), "lr": optimizer.param_groups[0]["lr"]})
        print(f"epoch {epoch}: train loss {total_loss / seen:.4f} acc {correct / seen:.4f} | "
              f"val acc {val['accuracy']:.4f}{' *' if improved else ''} | {epoch_seconds:.0f}s "
              f"({seen / epoch_seconds:.0f} reviews/s)", flush=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "state": state, "vocab": vocab.itos,
                    "config": asdict(config), "args": vars(args), "py_rng": random.getstate(),
                    "torch_rng": torch.get_rng_state()}, last_ckpt.with_suffix(".tmp"))
        last_ckpt.with_suffix(".tmp").replace(last_ckpt)

    if state["best_state"] is None:
        raise SystemExit("no epoch was trained (check --epochs)")
    model.load_state_dict(state["best_state"])
    model.cpu().eval()
    val = evaluate_split(model, val_ids, val_labels, torch.device("cpu"))
    card = {
        "version": "sentiment-lstm-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M"),
        "task": "binary sentiment of English movie reviews (IMDB); probability of positive",
        "architecture": {
            "type": "Embedding → LSTM (unidirectional, batch_first) → Linear(hidden, 1) → sigmoid per step",
            "config": asdict(config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "prediction": "sigmoid output at the last real token; the trace is the output after every token",
        },
        "training": {
            "args": {k: v for k, v in vars(args).items()},
            "init_from": init.card.get("version") if init else None,
            "language_model_pretraining": lm_report,
            "epochs_run": state["epoch"],
            "best_epoch": max(state["history"], key=lambda h: h["val_accuracy"])["epoch"],
            "history": state["history"],
            "train_seconds": round(state["train_seconds"], 1),
            "wall_seconds": round(time.time() - started, 1),
            "hardware": {"machine": platform.machine(), "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
                         "cpu_threads": torch.get_num_threads(), "device": str(device),
                         "torch": torch.__version__, "python": platform.python_version()},
        },
        "data": {"source": "Large Movie Review Dataset v1.0 (aclImdb, Maas et al. 2011)",
                 "archive_sha256": corpus.data_sha256,
                 "train_reviews": len(train_idx), "validation_reviews": len(val_idx),
                 "unsup_reviews_for_pretraining": len(corpus.tokens["unsup"])
                 if (args.word_vectors != "none" or args.lm_epochs > 0) else 0,
                 "test_reviews": len(corpus.tokens["test"])},
        "metrics": {"validation": val},
        "baseline": {"tfidf_logistic_regression_test_accuracy": 0.906,
                     "note": "word 1-2-grams, sublinear tf, fitted on the 25k training reviews"},
    }
    out = export_artifacts(model, vocab, card, args.out)
    if not args.no_test:
        art = load_artifacts(out, "cpu")  # score what was exported, not the eager model
        test_ids = [art.vocab.encode_tokens(t).ids for t in corpus.tokens["test"]]
        card["metrics"]["test"] = compute_metrics(predict_ids(art.model, test_ids, art.device), corpus.labels["test"])
        out = export_artifacts(model, vocab, card, args.out)
        print(f"test accuracy {card['metrics']['test']['accuracy']:.4f} on {card['metrics']['test']['n']} reviews")
    print(f"exported to {out} ({json.dumps(card['metrics']['validation'])})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
