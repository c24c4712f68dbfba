"""Language-model pre-training of the sentiment LSTM's embedding and LSTM (Dai & Le, 2015).

Before it ever sees a label, the LSTM learns to predict the next token of the unlabelled reviews and
the training part of the labelled ones (the validation reviews stay out: they measure held-out
perplexity instead). That teaches the recurrent state to carry what a review has said so far, which
is what the sentiment head later reads. Only the embedding and LSTM weights go on to fine-tuning.

**The stream.** Each epoch shuffles the reviews (seeded by epoch), joins them into one token stream
with a ``<pad>`` (id 0, a zero embedding) between reviews, cuts it into ``rows`` parallel streams
and walks them in chunks of ``bptt`` tokens with truncated back-propagation. The hidden state is
*carried* from chunk to chunk (detached), not reset: a review averages ~270 tokens and the
classifier reads up to 400, so the LSTM must learn to use long context, which a reset every 80
tokens would never teach; and no text is cut to 400 tokens. The zero-vector separator tells the
LSTM where a new review starts; predicting the separator itself is masked out of the loss.

**The softmax.** A next-token softmax over 25k words would cost several times the LSTM on CPU, so it
is PyTorch's adaptive softmax (Grave et al., 2017): frequent words in a small head, rare words in
down-projected tail clusters (the vocabulary is ordered by frequency, as it needs).

**Resumable.** Position (epoch, chunk), carried hidden state and RNG states are checkpointed with
the weights (see ``training/state.py``), so a time-boxed stop resumes mid-epoch.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sentiment.batching import length_buckets
from sentiment.model import SentimentLSTM, pad_batch
from sentiment.text import PAD_ID
from training.state import (RunState, TimeBox, TimeBoxReached, compact, expand, model_device, rng_state,
                            set_rng_state)

PHASE = "lm"


class NextTokenHead(nn.Module):
    """Adaptive-softmax next-token predictor on top of the LSTM's hidden states."""

    def __init__(self, hidden_size: int, vocab_size: int, cutoffs: Sequence[int] = (1000, 6000)) -> None:
        super().__init__()
        cutoffs = [c for c in cutoffs if c < vocab_size - 1] or [max(1, vocab_size // 2)]  # tiny test vocabularies
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, cutoffs=cutoffs, div_value=4.0)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of ``targets`` (N,) given ``hidden`` (N, H)."""
        return self.softmax(hidden, targets).loss


@dataclass
class LMConfig:
    """Language-model pre-training recipe (the ``--lm-*`` flags)."""

    epochs: int = 4
    bptt: int = 80
    rows: int = 64
    lr: float = 3e-3
    warmup_steps: int = 300
    min_lr_ratio: float = 0.05
    rewarm_steps: int = 200
    weight_decay: float = 0.01
    dropout: float = 0.1
    clip: float = 0.5
    bf16: bool = False
    eval_tokens: int = 200_000
    log_every: int = 200


def build_stream(texts: Sequence[np.ndarray], seed: int, epoch: int) -> torch.Tensor:
    """One epoch's token stream: reviews in a seeded order, each preceded by a ``<pad>`` separator."""
    order = np.random.default_rng([seed, epoch]).permutation(len(texts))
    sep = np.array([PAD_ID], dtype=np.int32)
    parts: list[np.ndarray] = []
    for i in order:
        parts.append(sep)
        parts.append(texts[i])
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def batchify(stream: torch.Tensor, rows: int) -> torch.Tensor:
    """Cut a 1-D stream into ``rows`` contiguous parallel streams: (rows, cols), the tail dropped."""
    cols = stream.numel() // rows
    return stream[: rows * cols].view(rows, cols)


def steps_per_epoch(n_tokens: int, rows: int, bptt: int) -> int:
    """Chunks per epoch for a stream of ``n_tokens`` (the last, shorter chunk included)."""
    cols = n_tokens // rows
    return max(0, math.ceil((cols - 1) / bptt))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


Hidden = tuple[torch.Tensor, torch.Tensor]


def lm_chunk_loss(model: SentimentLSTM, head: NextTokenHead, inputs: torch.Tensor, targets: torch.Tensor,
                  hidden: Hidden | None, dropout: float, bf16: bool) -> tuple[torch.Tensor, int, Hidden]:
    """Mean next-token NLL of one chunk ``inputs``/``targets`` (R, T), carrying ``hidden``.

    Returns (loss, number of scored targets, new hidden state). Separator targets are not scored.
    """
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        x = F.dropout(model.embedding(inputs), dropout, model.training)  # (R, T, E)
        h, hidden = model.lstm(x, hidden)  # (R, T, H); hidden: 2 × (layers, R, H)
        h = F.dropout(h, dropout, model.training)
        scored = targets != PAD_ID  # (R, T)
        h = h[scored]  # (N, H)
        if h.is_cuda:  # CUDA autocast gives the adaptive softmax fp32 log-probs to copy into an input-typed buffer
            h = h.float()
        loss = head.loss(h, targets[scored])  # (N, H), (N,) → ()
    return loss.float(), int(scored.sum()), hidden


@torch.no_grad()
def held_out_perplexity(model: SentimentLSTM, head: NextTokenHead, texts: Sequence[np.ndarray], max_tokens: int,
                        bptt: int, rows: int = 16) -> float:
    """Perplexity on held-out reviews (fixed order, carried state, no dropout, fp32)."""
    if not texts:
        return float("nan")
    model.eval()
    head.eval()
    stream = build_stream(texts, seed=0, epoch=0)[: max_tokens + 1]
    data = batchify(stream, min(rows, max(1, stream.numel() // (bptt + 1)))).to(model_device(model))
    hidden = None
    total, count = 0.0, 0
    for start in range(0, data.size(1) - 1, bptt):
        x = data[:, start : start + bptt]
        y = data[:, start + 1 : start + 1 + bptt]
        x = x[:, : y.size(1)]
        loss, n, hidden = lm_chunk_loss(model, head, x, y, hidden, 0.0, False)
        if n:
            total += float(loss) * n
            count += n
    return round(math.exp(total / max(1, count)), 2)


@torch.no_grad()
def lstm_features(model: SentimentLSTM, id_lists: Sequence[list[int]], bf16: bool, batch_size: int = 128) -> torch.Tensor:
    """(N, 2H) features per text: the LSTM's last hidden state and its mean over the text."""
    model.eval()
    out = torch.zeros(len(id_lists), 2 * model.lstm.hidden_size)
    lengths = [len(x) for x in id_lists]
    device = model_device(model)
    for batch in length_buckets(lengths, batch_size):
        ids, lens = pad_batch([id_lists[i] for i in batch])
        ids, lens = ids.to(device), lens.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            h, _ = model.lstm(model.embedding(ids))  # (B, T, H)
        h = h.float()
        mask = (torch.arange(ids.size(1), device=device).unsqueeze(0) < lens.unsqueeze(1)).unsqueeze(-1)  # (B, T, 1)
        last = h.gather(1, (lens - 1).view(-1, 1, 1).expand(-1, 1, h.size(2))).squeeze(1)  # (B, H)
        mean = (h * mask).sum(1) / lens.unsqueeze(1)  # (B, H)
        out[batch] = torch.cat([last, mean], 1).cpu()
    return out


def probe_accuracy(model: SentimentLSTM, train: tuple[Sequence[list[int]], Sequence[int]],
                   validation: tuple[Sequence[list[int]], Sequence[int]], bf16: bool, l2: float = 1e-3) -> float:
    """A cheap downstream probe: logistic regression on frozen LSTM features, validation accuracy.

    It says whether more language-model epochs make the representation more useful for sentiment,
    without paying for a fine-tuning run after every epoch.
    """
    xt, xv = lstm_features(model, train[0], bf16), lstm_features(model, validation[0], bf16)
    mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xt, xv = (xt - mu) / sd, (xv - mu) / sd
    yt = torch.tensor(train[1], dtype=torch.float32)
    w = torch.zeros(xt.size(1), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xv @ w + b) > 0
    return round(float((pred.float() == torch.tensor(validation[1], dtype=torch.float32)).float().mean()), 4)


def lm_weights(model: SentimentLSTM, head: NextTokenHead) -> dict[str, torch.Tensor]:
    """The weights the language-model phase trains: embedding, LSTM, next-token head."""
    out = {f"embedding.{k}": v for k, v in model.embedding.state_dict().items()}
    out.update({f"lstm.{k}": v for k, v in model.lstm.state_dict().items()})
    out.update({f"lm_head.{k}": v for k, v in head.state_dict().items()})
    return out


def lm_parts(weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """The state dicts of the embedding, the LSTM and the next-token head in :func:`lm_weights`' output."""
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

    return part("embedding."), part("lstm."), part("lm_head.")


def load_lm_weights(model: SentimentLSTM, head: NextTokenHead, weights: dict[str, torch.Tensor]) -> None:
    embedding, lstm, lm_head = lm_parts(weights)
    model.embedding.load_state_dict(embedding)
    model.lstm.load_state_dict(lstm)
    head.load_state_dict(lm_head)


def pretrain_language_model(model: SentimentLSTM, texts: Sequence[np.ndarray], held_out: Sequence[np.ndarray],
                            cfg: LMConfig, seed: int, state: RunState, timebox: TimeBox,
                            probe: Callable[[SentimentLSTM], float] | None = None,
                            log: Callable[[str], None] = print, head_weights: dict | None = None) -> dict:
    """Train ``model``'s embedding + LSTM as a language model on ``texts``, in place, resumably.

    ``held_out`` reviews give the perplexity reported after every epoch; ``probe`` (optional) maps
    the model to a downstream validation accuracy. Raises :class:`TimeBoxReached` after writing a
    checkpoint when ``timebox`` runs out; call again (same arguments) to continue. Returns the
    phase's report for the model card: history per epoch, tokens/s, seconds.
    """
    phase = state.phase(PHASE)
    device = model_device(model)
    head = NextTokenHead(model.lstm.hidden_size, model.embedding.num_embeddings)
    if head_weights is not None:
        head.load_state_dict(head_weights)
    head.to(device)
    params = list(model.embedding.parameters()) + list(model.lstm.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_tokens = sum(len(t) + 1 for t in texts)
    per_epoch = steps_per_epoch(n_tokens, cfg.rows, cfg.bptt)
    total_steps = per_epoch * cfg.epochs
    pos = {"epoch": 1, "batch": 0, "step": 0, "loss_sum": 0.0, "tokens": 0, "seconds": 0.0}
    hidden: Hidden | None = None
    rewarm_from: int | None = None
    small, full = state.load_phase(PHASE)
    if small is not None:
        load_lm_weights(model, head, full["weights"] if full else expand(small["weights"]))
        pos = dict(small["position"])
        hidden = None if small["hidden"] is None else tuple(h.to(device) for h in small["hidden"])
        set_rng_state(small["rng"])
        if full:
            optimizer.load_state_dict(full["optimizer"])
            log(f"language model: resumed exactly at epoch {pos['epoch']}, chunk {pos['batch']}/{per_epoch} "
                f"(step {pos['step']})")
        else:
            rewarm_from = pos["step"]
            log(f"language model: resumed from the committed fp16 state at epoch {pos['epoch']}, chunk "
                f"{pos['batch']}/{per_epoch} (step {pos['step']}); no optimizer state, so the learning rate "
                f"re-warms over {cfg.rewarm_steps} steps")
    run_id = state.info.setdefault("run_id", uuid.uuid4().hex)

    def checkpoint() -> None:
        phase["position"] = {k: pos[k] for k in ("epoch", "batch", "step")}
        payload = {"run_id": run_id, "step": pos["step"], "position": dict(pos),
                   "hidden": None if hidden is None else tuple(h.cpu() for h in hidden), "rng": rng_state()}
        state.save_phase(PHASE, {**payload, "weights": compact(lm_weights(model, head))},
                         {"run_id": run_id, "step": pos["step"], "weights": lm_weights(model, head),
                          "optimizer": optimizer.state_dict()})

    if not phase["history"] and pos["step"] == 0 and small is None:
        # Epoch 0: where pre-training starts (word vectors only), for comparison.
        entry = {"epoch": 0, "held_out_perplexity": held_out_perplexity(model, head, held_out, cfg.eval_tokens, cfg.bptt)}
        if probe:
            entry["probe_validation_accuracy"] = probe(model)
        phase["history"].append(entry)
        log(f"language model before pre-training: {entry}")
    phase["config"] = asdict(cfg)
    phase.update({"tokens_per_epoch": n_tokens, "steps_per_epoch": per_epoch})

    while pos["epoch"] <= cfg.epochs:
        epoch = pos["epoch"]
        data = batchify(build_stream(texts, seed, epoch), cfg.rows).to(device)  # (rows, cols)
        if pos["batch"] == 0:
            hidden = None
        t_log, tok_log = time.time(), 0
        while pos["batch"] < per_epoch:
            if timebox.expired():
                checkpoint()
                raise TimeBoxReached(PHASE, f"epoch {epoch}, chunk {pos['batch']}/{per_epoch} (step {pos['step']})")
            model.train()
            head.train()
            t0 = time.time()
            start = pos["batch"] * cfg.bptt
            y = data[:, start + 1 : start + 1 + cfg.bptt]  # (rows, T)
            x = data[:, start : start + y.size(1)]  # (rows, T)
            factor = lr_factor(pos["step"], total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
            if rewarm_from is not None:
                factor *= min(1.0, (pos["step"] - rewarm_from + 1) / max(1, cfg.rewarm_steps))
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * factor
            loss, n, hidden = lm_chunk_loss(model, head, x, y, hidden, cfg.dropout, cfg.bf16)
            hidden = (hidden[0].detach().float(), hidden[1].detach().float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            pos["batch"] += 1
            pos["step"] += 1
            pos["loss_sum"] += float(loss.detach()) * n
            pos["tokens"] += n
            pos["seconds"] += time.time() - t0
            tok_log += n
            timebox.step()
            if cfg.log_every and pos["batch"] % cfg.log_every == 0:
                now = time.time()
                log(f"lm epoch {epoch} chunk {pos['batch']}/{per_epoch}: train ppl "
                    f"{math.exp(pos['loss_sum'] / max(1, pos['tokens'])):.1f}, lr {cfg.lr * factor:.2e}, "
                    f"{tok_log / (now - t_log):.0f} tokens/s")
                t_log, tok_log = now, 0
            if timebox.checkpoint_due():
                checkpoint()
        entry = {"epoch": epoch,
                 "train_perplexity": round(math.exp(pos["loss_sum"] / max(1, pos["tokens"])), 2),
                 "held_out_perplexity": held_out_perplexity(model, head, held_out, cfg.eval_tokens, cfg.bptt),
                 "tokens": pos["tokens"], "seconds": round(pos["seconds"], 1),
                 "tokens_per_second": round(pos["tokens"] / max(1e-9, pos["seconds"]))}
        if probe:
            entry["probe_validation_accuracy"] = probe(model)
        phase["history"].append(entry)
        log(f"lm epoch {epoch}: {entry}")
        pos.update({"epoch": epoch + 1, "batch": 0, "loss_sum": 0.0, "tokens": 0, "seconds": 0.0})
        hidden = None
        checkpoint()
    phase["done"] = True
    state.save_info()
    return {"history": phase["history"], "config": phase["config"], "tokens_per_epoch": n_tokens,
            "seconds": round(sum(h.get("seconds", 0) for h in phase["history"]), 1)}
