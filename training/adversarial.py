"""Adversarial and virtual adversarial training on normalised embeddings (Miyato, Dai & Goodfellow 2017).

- **Embedding normalisation**: during fine-tuning the LSTM reads ``(v − μ) / σ`` instead of the
  embedding ``v``, where μ and σ are the frequency-weighted mean and standard deviation of the
  embedding matrix, per dimension, recomputed at every step (as the paper's code does). A
  perturbation of norm ε is then the same size whatever the scale of the embeddings. At the start
  the LSTM's input weights absorb the change (:func:`fold_normalisation`), so the model computes
  the same function as before; at the end the normalised matrix becomes the embedding
  (:func:`bake`), so the exported model is the plain Embedding → LSTM → Linear.
- **Adversarial perturbation** ``r = ε·g/‖g‖`` with ``g`` the gradient of the loss with respect to a
  review's embedded sequence, ‖·‖ over the whole review.
- **Virtual adversarial training** (VAT) needs no label: ``KL(p(x) ‖ p(x + r))`` with ``r`` the
  direction in which the prediction changes fastest, found by one power iteration from a random
  direction ``d`` of norm ξ. The paper's gain comes from applying it to unlabelled reviews.

Binary classifier: p is the sigmoid of the last real token's logit, the KL is Bernoulli's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sentiment.model import SentimentLSTM


def id_frequencies(id_lists, vocab_size: int, pad_id: int = 0) -> torch.Tensor:
    """Relative frequency of each id over ``id_lists`` (arrays or lists of ids); ``<pad>`` gets 0."""
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.float64)
    for ids in id_lists:
        counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    counts[pad_id] = 0
    return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()


def moments(weight: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency-weighted mean and standard deviation of the rows of ``weight`` (V, E) → (E,), (E,)."""
    f = freqs.to(weight).unsqueeze(1)  # (V, 1)
    mean = (f * weight).sum(0)
    var = (f * (weight - mean).pow(2)).sum(0)
    return mean, torch.sqrt(var + 1e-6)


def normalised(weight: torch.Tensor, freqs: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """``(weight − μ) / σ`` row by row (μ, σ: :func:`moments`), the padding row zero (V, E); differentiable."""
    mean, std = moments(weight, freqs)
    table = (weight - mean) / std
    if padding_idx is not None:
        keep = torch.ones(table.size(0), 1, device=table.device, dtype=table.dtype)
        keep[padding_idx] = 0
        table = table * keep
    return table


class NormalisedEmbedding(nn.Module):
    """An embedding whose lookup returns frequency-normalised vectors; ``<pad>`` stays zero.

    Its parameter is the raw matrix, under the same name (``weight``) as ``nn.Embedding``'s, so
    checkpoints and the weight average hold what they held before.
    """

    def __init__(self, embedding: nn.Embedding, freqs: torch.Tensor) -> None:
        super().__init__()
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.register_buffer("freqs", freqs, persistent=False)

    def table(self) -> torch.Tensor:
        """The normalised matrix (V, E)."""
        return normalised(self.weight, self.freqs, self.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, E)
        return F.embedding(ids, self.table())


def fold_normalisation(model: SentimentLSTM, freqs: torch.Tensor) -> None:
    """Make ``model`` read normalised embeddings without changing what it computes.

    With ``x = σ·x̄ + μ``: ``W·x + b = (W·diag σ)·x̄ + (b + W·μ)``, so the first LSTM layer's input
    weights are scaled by σ and μ moves into its bias; the embedding becomes a
    :class:`NormalisedEmbedding`. (``<pad>`` maps to 0 either way, and padding follows the last
    real token, so it never reaches a prediction.)
    """
    with torch.no_grad():
        mean, std = moments(model.embedding.weight.float(), freqs)
        w = model.lstm.weight_ih_l0
        model.lstm.bias_ih_l0.add_((w.float() @ mean).to(w.dtype))
        w.mul_(std.to(w.dtype))
    model.embedding = NormalisedEmbedding(model.embedding, freqs.to(model.embedding.weight.device))


def bake(weights: dict[str, torch.Tensor], freqs: torch.Tensor, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the raw embedding replaced by its normalised matrix: the plain model's weights."""
    raw = weights["embedding.weight"]
    return {**weights, "embedding.weight": normalised(raw.float(), freqs.to(raw.device), pad_id).to(raw.dtype)}


def plain_embedding(model: SentimentLSTM) -> None:
    """Put back a plain ``nn.Embedding`` holding the wrapper's matrix as it is (the caller loads the
    baked weights, or they are loaded already); no-op for a plain model."""
    emb = model.embedding
    if isinstance(emb, NormalisedEmbedding):
        plain = nn.Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        plain.weight = emb.weight
        model.embedding = plain


def unit(x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Each example of (B, T, E) scaled to norm 1 over (T, E); positions past ``lengths`` zeroed first."""
    x = x.float()
    if lengths is not None:
        mask = torch.arange(x.size(1), device=x.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        x = x * mask.unsqueeze(-1)
    return x / x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)


def bernoulli_kl(p_logit: torch.Tensor, q_logit: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(Bernoulli(σ(p)) ‖ Bernoulli(σ(q))), from logits (B,)."""
    p_logit, q_logit = p_logit.float(), q_logit.float()
    p = torch.sigmoid(p_logit)
    kl = p * (F.logsigmoid(p_logit) - F.logsigmoid(q_logit)) + (1 - p) * (
        F.logsigmoid(-p_logit) - F.logsigmoid(-q_logit))
    return kl.mean()


def step_logits_from_embeddings(model: SentimentLSTM, emb: torch.Tensor) -> torch.Tensor:
    """The model's per-step logits from already-embedded input: (B, T, E) → (B, T).

    The same computation as :meth:`SentimentLSTM.step_logits` after its embedding lookup, so a
    perturbation can be added to the embeddings in between.
    """
    h, _ = model.lstm(model.dropout(emb))  # (B, T, H)
    return model.head(model.dropout(h)).squeeze(-1)  # (B, T)


def last_logit(step: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The logit at each example's last real token: (B, T), (B,) → (B,)."""
    return step.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)


def virtual_adversarial_loss(model: SentimentLSTM, ids: torch.Tensor, lengths: torch.Tensor, eps: float,
                             xi: float = 0.1) -> torch.Tensor:
    """VAT on a batch of (unlabelled) reviews: ``KL(p(x) ‖ p(x + r))``, ``r`` of norm ``eps`` from one
    power iteration started at a random direction of norm ``xi``. Only the perturbed prediction
    carries gradient (the clean one is the fixed target); padding is never perturbed."""
    emb = model.embedding(ids)  # (B, T, E)
    with torch.no_grad():
        target = last_logit(step_logits_from_embeddings(model, emb), lengths)  # (B,)
    d = (xi * unit(torch.randn_like(emb, dtype=torch.float32), lengths)).requires_grad_()
    probe = last_logit(step_logits_from_embeddings(model, emb.detach() + d.to(emb.dtype)), lengths)
    (g,) = torch.autograd.grad(bernoulli_kl(target, probe), d)
    r = eps * unit(g.detach(), lengths)
    return bernoulli_kl(target, last_logit(step_logits_from_embeddings(model, emb + r.to(emb.dtype)), lengths))
