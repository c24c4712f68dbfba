"""Language-model pre-training of the sentiment LSTM's embedding and LSTM (Dai & Le, 2015).

Before it ever sees a label, the LSTM learns to predict the next token of the 70k unlabelled-plus-
training reviews. That teaches the recurrent state to carry what a review has said so far, which is
what the sentiment head later reads; on IMDB it is worth one to two points of accuracy over word
vectors alone. Only the embedding and LSTM weights are kept: the softmax is thrown away.

The next-token softmax over 25k words would cost ten times the LSTM itself on CPU, so it is
PyTorch's adaptive softmax (Grave et al., 2017): frequent words in a small head, rare words in
down-projected tail clusters. The vocabulary is already ordered by frequency, which is what the
adaptive softmax needs.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sentiment.batching import length_buckets
from sentiment.model import SentimentLSTM, pad_batch


class NextTokenHead(nn.Module):
    """Adaptive-softmax next-token predictor on top of the LSTM's hidden states."""

    def __init__(self, hidden_size: int, vocab_size: int, cutoffs: Sequence[int] = (1000, 6000)) -> None:
        super().__init__()
        cutoffs = [c for c in cutoffs if c < vocab_size - 1] or [max(1, vocab_size // 2)]  # tiny test vocabularies
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, cutoffs=cutoffs, div_value=4.0)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of ``targets`` (N,) given ``hidden`` (N, H)."""
        return self.softmax(hidden, targets).loss


def lm_loss(model: SentimentLSTM, head: NextTokenHead, ids: torch.Tensor, lengths: torch.Tensor,
            dropout: float) -> torch.Tensor:
    """Next-token NLL over the real positions of a right-padded batch ``ids`` (B, T)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T-1) each
    x = F.dropout(model.embedding(inputs), dropout, model.training)  # (B, T-1, E)
    h, _ = model.lstm(x)  # (B, T-1, H)
    h = F.dropout(h, dropout, model.training)
    positions = torch.arange(targets.size(1), device=ids.device).unsqueeze(0)  # (1, T-1)
    real = positions < (lengths - 1).unsqueeze(1)  # target t+1 exists for this text: (B, T-1)
    return head.loss(h[real], targets[real])  # (N, H), (N,)


def cache_key(vocab_itos: Sequence[str], config: dict, n_texts: int, seed: int, init_digest: str) -> str:
    """A key that changes whenever anything that shapes the pre-trained weights changes.

    The epoch count is left out on purpose: asking for more epochs continues a cached run.
    """
    text = f"{sorted(config.items())}|{n_texts}|{seed}|{init_digest}|" + "\n".join(vocab_itos)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrain_language_model(model: SentimentLSTM, id_lists: list[list[int]], epochs: int, seed: int,
                            device: torch.device, cache_path: Path, batch_size: int = 64, lr: float = 2e-3,
                            clip: float = 1.0, dropout: float = 0.1) -> dict:
    """Train ``model``'s embedding + LSTM as a language model on ``id_lists``, in place.

    The result (embedding + LSTM state and the per-epoch history) is cached at ``cache_path`` after
    every epoch; a later call with the same key resumes from the last finished epoch.
    Returns ``{"epochs": [...], "seconds": s}`` for the model card.
    """
    head = NextTokenHead(model.lstm.hidden_size, model.embedding.num_embeddings).to(device)
    params = list(model.embedding.parameters()) + list(model.lstm.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    history: list[dict] = []
    if cache_path.exists():
        ckpt = torch.load(cache_path, map_location=device, weights_only=False)
        model.embedding.load_state_dict(ckpt["embedding"])
        model.lstm.load_state_dict(ckpt["lstm"])
        head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = ckpt["history"]
        print(f"language model: resumed from {cache_path} after epoch {len(history)}", flush=True)
    lengths = [len(x) for x in id_lists]
    usable = [i for i, n in enumerate(lengths) if n >= 2]
    for epoch in range(len(history) + 1, epochs + 1):
        model.train()
        head.train()
        t0 = time.time()
        total = tokens = 0.0
        batches = [[usable[j] for j in b] for b in length_buckets([lengths[i] for i in usable], batch_size,
                                                                  seed=seed + 1000 + epoch)]
        bar = tqdm(batches, desc=f"lm epoch {epoch}", unit="batch", mininterval=30, file=sys.stdout)
        for batch in bar:
            ids, lens = pad_batch([id_lists[i] for i in batch])
            ids, lens = ids.to(device), lens.to(device)
            loss = lm_loss(model, head, ids, lens, dropout)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            n = float((lens - 1).sum())
            total += float(loss.detach()) * n
            tokens += n
            bar.set_postfix(ppl=f"{torch.exp(torch.tensor(total / tokens)):.1f}", refresh=False)
        seconds = time.time() - t0
        history.append({"epoch": epoch, "perplexity": round(float(torch.exp(torch.tensor(total / tokens))), 2),
                        "tokens": int(tokens), "seconds": round(seconds, 1)})
        print(f"lm epoch {epoch}: perplexity {history[-1]['perplexity']} | {seconds:.0f}s "
              f"({tokens / seconds:.0f} tokens/s)", flush=True)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"embedding": model.embedding.state_dict(), "lstm": model.lstm.state_dict(),
                    "head": head.state_dict(), "optimizer": optimizer.state_dict(), "history": history},
                   cache_path.with_suffix(".tmp"))
        cache_path.with_suffix(".tmp").replace(cache_path)
    return {"epochs": history, "seconds": round(sum(h["seconds"] for h in history), 1)}
