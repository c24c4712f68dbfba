"""Adversarial training on the embeddings (Miyato et al. 2017) and the fine-tuning loss, on a tiny model."""

from __future__ import annotations

import pytest
import torch

from sentiment.model import ModelConfig, SentimentLSTM, pad_batch
from training.finetune import (FineTuneConfig, adversarial_perturbation, sentiment_loss,
                               step_logits_from_embeddings, training_loss)


def tiny_batch():
    torch.manual_seed(0)
    model = SentimentLSTM(ModelConfig(vocab_size=20, embedding_dim=6, hidden_size=10, dropout=0.0))
    ids, lengths = pad_batch([[2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3]])  # (4, 7)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    return model, ids, lengths, labels


def test_embeddings_path_equals_the_model_forward() -> None:
    model, ids, lengths, _ = tiny_batch()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(step_logits_from_embeddings(model, model.embedding(ids)), model.step_logits(ids))


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_perturbation_has_norm_eps_per_review_and_increases_the_loss(eps) -> None:
    model, ids, lengths, labels = tiny_batch()
    model.eval()  # no dropout: the clean and the perturbed pass differ only by r
    emb = model.embedding(ids)
    clean, _ = sentiment_loss(step_logits_from_embeddings(model, emb), lengths, labels, aux_weight=0.2)
    r = adversarial_perturbation(clean, emb, eps, scale=1.0)  # (B, T, E)
    assert r.shape == emb.shape
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((4,), eps), atol=1e-5)
    pad = torch.arange(ids.size(1)).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T)
    assert torch.all(r[pad] == 0)  # padding is never perturbed
    with torch.no_grad():
        adv, _ = sentiment_loss(step_logits_from_embeddings(model, emb + r), lengths, labels, aux_weight=0.2)
        noise = torch.randn_like(r) * (~pad).unsqueeze(-1)
        noise = eps * noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1)
        rand, _ = sentiment_loss(step_logits_from_embeddings(model, emb + noise), lengths, labels, aux_weight=0.2)
    assert adv > clean  # the gradient direction is the loss-increasing one …
    assert adv > rand  # … and more so than a random direction of the same norm


def test_adversarial_training_loss_reaches_every_parameter() -> None:
    model, ids, lengths, labels = tiny_batch()
    model.train()
    total, parts = training_loss(model, ids, lengths, labels, FineTuneConfig(adv_eps=1.0, adv_weight=1.0))
    assert torch.isclose(total, parts["clean"] + parts["adversarial"])
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # Off: the clean loss alone.
    model.zero_grad()
    clean_only, parts = training_loss(model, ids, lengths, labels, FineTuneConfig(adv_eps=0.0))
    assert "adversarial" not in parts


def test_adversarial_step_works_with_a_frozen_embedding() -> None:
    """Gradual unfreezing freezes the embedding first; ∂loss/∂embeddings is still needed."""
    model, ids, lengths, labels = tiny_batch()
    model.embedding.weight.requires_grad_(False)
    total, parts = training_loss(model, ids, lengths, labels, FineTuneConfig(adv_eps=1.0))
    total.backward()
    assert model.embedding.weight.grad is None and model.lstm.weight_hh_l0.grad is not None
