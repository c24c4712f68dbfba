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

**Resumable.** :class:`LanguageModelPhase` supplies the step and the epoch's evaluation to the
shared loop (``training/loop.py``); position (epoch, chunk), carried hidden state and RNG states are
checkpointed with the weights, so a time-boxed stop resumes mid-epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sentiment.batching import length_buckets
from sentiment.model import SentimentLSTM, pad_batch
from sentiment.text import PAD_ID
from training.loop import LRSchedule, PhasePlan, Position, TrainingLoop, TrainingPhase, training_seconds
from training.state import RunState, TimeBox, model_device

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


@dataclass
class LMTally:
    """An epoch's running sums: next-token NLL summed over the scored tokens, and their number."""

    loss_sum: float = 0.0
    tokens: int = 0


class LanguageModelPhase(TrainingPhase[LMTally]):
    """Next-token prediction over the carried-state token stream, as a phase of :class:`TrainingLoop`."""

    tally_type = LMTally

    def __init__(self, model: SentimentLSTM, texts: Sequence[np.ndarray], held_out: Sequence[np.ndarray],
                 cfg: LMConfig, seed: int, probe: Callable[[SentimentLSTM], float] | None = None,
                 head_weights: dict | None = None) -> None:
        self.model, self.cfg, self.seed, self.probe = model, cfg, seed, probe
        self.texts, self.held_out = texts, held_out
        self.head = NextTokenHead(model.lstm.hidden_size, model.embedding.num_embeddings)
        if head_weights is not None:
            self.head.load_state_dict(head_weights)
        self.head.to(model_device(model))
        params = list(model.embedding.parameters()) + list(model.lstm.parameters()) + list(self.head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.n_tokens = sum(len(t) + 1 for t in texts)
        per_epoch = steps_per_epoch(self.n_tokens, cfg.rows, cfg.bptt)
        schedule = LRSchedule(cfg.lr, per_epoch * cfg.epochs, cfg.warmup_steps, cfg.min_lr_ratio, cfg.rewarm_steps)
        self.plan = PhasePlan(PHASE, "language model", "chunk", cfg.epochs, per_epoch, schedule, cfg.clip,
                              cfg.log_every)
        self.data = torch.empty(0, 0, dtype=torch.long)  # the epoch's streams (rows, cols)
        self.hidden: Hidden | None = None  # carried from chunk to chunk, reset at an epoch's start
        self.since_log = (time.time(), 0)  # (when, tokens since) of the last progress line

    def weights(self) -> dict[str, torch.Tensor]:
        return lm_weights(self.model, self.head)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_lm_weights(self.model, self.head, weights)

    def restore(self, compact_state: dict, exact_state: dict | None) -> None:
        hidden = compact_state["hidden"]
        self.hidden = None if hidden is None else tuple(h.to(model_device(self.model)) for h in hidden)

    def compact_extras(self) -> dict:
        return {"hidden": None if self.hidden is None else tuple(h.cpu() for h in self.hidden)}

    def record_fields(self) -> dict:
        return {"config": asdict(self.cfg), "tokens_per_epoch": self.n_tokens,
                "steps_per_epoch": self.plan.steps_per_epoch}

    def initial_entry(self) -> dict:
        """Epoch 0: where pre-training starts (word vectors only), for comparison."""
        entry = {"epoch": 0, "held_out_perplexity": self.held_out_perplexity()}
        if self.probe:
            entry["probe_validation_accuracy"] = self.probe(self.model)
        return entry

    def held_out_perplexity(self) -> float:
        return held_out_perplexity(self.model, self.head, self.held_out, self.cfg.eval_tokens, self.cfg.bptt)

    def start_epoch(self, position: Position[LMTally]) -> int:
        self.data = batchify(build_stream(self.texts, self.seed, position.epoch), self.cfg.rows)
        self.data = self.data.to(model_device(self.model))  # (rows, cols)
        if position.batch == 0:
            self.hidden = None
        self.since_log = (time.time(), 0)
        return self.plan.steps_per_epoch

    def batch_loss(self, position: Position[LMTally]) -> torch.Tensor:
        self.model.train()
        self.head.train()
        start = position.batch * self.cfg.bptt
        y = self.data[:, start + 1 : start + 1 + self.cfg.bptt]  # (rows, T)
        x = self.data[:, start : start + y.size(1)]  # (rows, T)
        loss, n, hidden = lm_chunk_loss(self.model, self.head, x, y, self.hidden, self.cfg.dropout, self.cfg.bf16)
        # Truncated back-propagation: the state is carried into the next chunk, its gradient is not.
        self.hidden = (hidden[0].detach().float(), hidden[1].detach().float())
        position.tally.loss_sum += float(loss.detach()) * n
        position.tally.tokens += n
        self.since_log = (self.since_log[0], self.since_log[1] + n)
        return loss

    def progress(self, position: Position[LMTally]) -> str:
        (then, tokens), now = self.since_log, time.time()
        self.since_log = (now, 0)
        return (f"train ppl {math.exp(position.tally.loss_sum / max(1, position.tally.tokens)):.1f}, "
                f"lr {self.optimizer.param_groups[0]['lr']:.2e}, {tokens / (now - then):.0f} tokens/s")

    def end_epoch(self, position: Position[LMTally]) -> dict:
        tally = position.tally
        entry = {"train_perplexity": round(math.exp(tally.loss_sum / max(1, tally.tokens)), 2),
                 "held_out_perplexity": self.held_out_perplexity(),
                 "tokens": tally.tokens, "seconds": round(position.seconds, 1),
                 "tokens_per_second": round(tally.tokens / max(1e-9, position.seconds))}
        if self.probe:
            entry["probe_validation_accuracy"] = self.probe(self.model)
        self.hidden = None  # the next epoch is a new stream
        return entry


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
    phase = LanguageModelPhase(model, texts, held_out, cfg, seed, probe, head_weights)
    record = state.phase(PHASE)
    TrainingLoop(phase, state, timebox, log).run()
    return {"history": record["history"], "config": record["config"], "tokens_per_epoch": phase.n_tokens,
            "seconds": training_seconds(record["history"])}
