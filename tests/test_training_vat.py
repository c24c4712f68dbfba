"""Embedding normalisation and virtual adversarial training (training/adversarial.py), on tiny models
and a tiny end-to-end run: the folds change nothing, the exported model is the plain one, VAT
perturbs in the direction that moves the prediction most, and a stopped VAT run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from sentiment.artifacts import load_artifacts
from sentiment.model import ModelConfig, SentimentLSTM, pad_batch
from tests.conftest import write_fake_imdb
from tests.test_training import tiny_run_flags
from training import train
from training.adversarial import (
    NormalisedEmbedding,
    bake,
    bernoulli_kl,
    fold_normalisation,
    id_frequencies,
    last_logit,
    moments,
    plain_embedding,
    step_logits_from_embeddings,
    unit,
    virtual_adversarial_loss,
)


def tiny():
    torch.manual_seed(0)
    model = SentimentLSTM(ModelConfig(vocab_size=20, embedding_dim=6, hidden_size=10, dropout=0.0))
    with torch.no_grad():  # embeddings far from zero-mean, unit-variance, as pre-trained ones are
        model.embedding.weight.mul_(3.0).add_(torch.linspace(-2, 2, 6))
        model.embedding.weight[0] = 0
    ids, lengths = pad_batch([[2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3]])  # (4, 7)
    freqs = id_frequencies([[2, 3, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 1]], 20)
    return model.eval(), ids, lengths, freqs


def test_frequencies_sum_to_one_and_ignore_padding() -> None:
    f = id_frequencies([[0, 0, 2, 3, 3]], 5)
    assert torch.allclose(f, torch.tensor([0, 0, 1 / 3, 2 / 3, 0]))


def test_normalised_table_has_weighted_zero_mean_unit_spread_and_zero_padding() -> None:
    model, _, _, freqs = tiny()
    emb = NormalisedEmbedding(model.embedding, freqs)
    mean, std = moments(emb.table(), freqs)
    assert torch.allclose(mean, torch.zeros(6), atol=1e-5) and torch.allclose(std, torch.ones(6), atol=1e-4)
    assert torch.all(emb.table()[0] == 0)
    assert emb.weight is model.embedding.weight  # the raw matrix stays the parameter


def test_folding_the_normalisation_changes_nothing_the_model_computes() -> None:
    model, ids, lengths, freqs = tiny()
    with torch.no_grad():
        before = model.step_logits(ids)
        fold_normalisation(model, freqs)
        assert isinstance(model.embedding, NormalisedEmbedding)
        after = model.step_logits(ids)
    real = torch.arange(ids.size(1)).unsqueeze(0) < lengths.unsqueeze(1)
    assert torch.allclose(before[real], after[real], atol=1e-5)


def test_baked_weights_give_the_plain_model_the_normalised_models_outputs() -> None:
    model, ids, _, freqs = tiny()
    fold_normalisation(model, freqs)
    with torch.no_grad():
        wrapped = model.step_logits(ids)
    plain = SentimentLSTM(ModelConfig(vocab_size=20, embedding_dim=6, hidden_size=10, dropout=0.0)).eval()
    plain.load_state_dict(bake(model.state_dict(), freqs))
    with torch.no_grad():
        assert torch.allclose(plain.step_logits(ids), wrapped, atol=1e-5)
    plain_embedding(model)
    assert isinstance(model.embedding, torch.nn.Embedding) and model.embedding.padding_idx == 0


def test_bernoulli_kl() -> None:
    p, q = torch.tensor([0.3, -1.0]), torch.tensor([0.3, 2.0])
    pp, qq = torch.sigmoid(p), torch.sigmoid(q)
    manual = (pp * (pp / qq).log() + (1 - pp) * ((1 - pp) / (1 - qq)).log()).mean()
    assert torch.isclose(bernoulli_kl(p, q), manual, atol=1e-6)
    assert bernoulli_kl(p, p) == 0


def test_vat_direction_moves_the_prediction_more_than_a_random_one_and_trains_every_parameter() -> None:
    model, ids, lengths, freqs = tiny()
    fold_normalisation(model, freqs)
    eps = 2.0
    emb = model.embedding(ids).detach()
    with torch.no_grad():
        target = last_logit(step_logits_from_embeddings(model, emb), lengths)
    torch.manual_seed(1)
    model.train()  # dropout 0: deterministic, but gradients are taken as in training
    loss = virtual_adversarial_loss(model, ids, lengths, eps)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        worse = 0
        for seed in range(20):
            torch.manual_seed(100 + seed)
            r = eps * unit(torch.randn_like(emb), lengths)
            worse += bool(bernoulli_kl(target, last_logit(step_logits_from_embeddings(model, emb + r), lengths)) < loss)
    assert worse >= 18  # the power iteration finds a direction that beats (nearly) every random one


def test_vat_perturbation_leaves_padding_alone() -> None:
    _, ids, lengths, _ = tiny()
    r = unit(torch.randn(ids.size(0), ids.size(1), 6), lengths)
    pad = torch.arange(ids.size(1)).unsqueeze(0) >= lengths.unsqueeze(1)
    assert torch.all(r[pad] == 0) and torch.allclose(r.flatten(1).norm(dim=1), torch.ones(4))


VAT_FLAGS = ["--normalise-embeddings", "--vat-eps", "2.0", "--no-test"]


@pytest.fixture(scope="module")
def vat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vat")
    data = write_fake_imdb(root)
    assert train.main(tiny_run_flags(data, root, "once") + VAT_FLAGS) == 0
    return root, data


def test_a_vat_run_exports_a_plain_model_equal_to_its_validation_figures(vat_run, capsys) -> None:
    root, _ = vat_run
    state = json.loads((root / "once" / "state" / "run.json").read_text())
    history = state["phases"]["finetune"]["history"]
    assert all(h["train_vat_loss"] > 0 for h in history)
    assert state["recipe"]["normalise_embeddings"] is True and state["recipe"]["vat_eps"] == 2.0
    art = load_artifacts(root / "once" / "art")  # the TorchScript model: Embedding → LSTM → Linear, nothing more
    card = json.loads((root / "once" / "art" / "model_card.json").read_text())
    final_ema = history[-1]["val_accuracy_ema"]
    assert card["metrics"]["validation"]["accuracy"] == pytest.approx(final_ema)
    assert "embedding.weight" in dict(art.model.named_parameters())


def test_a_stopped_vat_run_resumes_exactly(vat_run, capsys) -> None:
    root, data = vat_run
    flags = tiny_run_flags(data, root, "stopped") + VAT_FLAGS
    assert train.main(flags + ["--stop-after-steps", "19"]) == 0  # LM: 16 chunks; fine-tuning epoch 1, batch 3
    assert "in finetune at epoch 1" in capsys.readouterr().out
    assert train.main(flags) == 0
    once = torch.load(root / "once" / "ckpt" / "finetune-full.pt", weights_only=False)["weights"]
    stopped = torch.load(root / "stopped" / "ckpt" / "finetune-full.pt", weights_only=False)["weights"]
    assert once.keys() == stopped.keys() and all(torch.equal(once[k], stopped[k]) for k in once)


def test_another_training_seed_keeps_the_validation_split_and_changes_the_weights(vat_run) -> None:
    root, data = vat_run
    assert train.main(tiny_run_flags(data, root, "seed2") + VAT_FLAGS + ["--training-seed", "5"]) == 0
    runs = [json.loads((root / name / "state" / "run.json").read_text()) for name in ("once", "seed2")]
    assert runs[0]["split"] == runs[1]["split"]  # the same validation reviews: a paired comparison
    assert runs[1]["recipe"]["training_seed"] == 5 and runs[0]["recipe"]["training_seed"] is None
    a = torch.load(root / "once" / "ckpt" / "finetune-full.pt", weights_only=False)["weights"]
    b = torch.load(root / "seed2" / "ckpt" / "finetune-full.pt", weights_only=False)["weights"]
    assert not torch.equal(a["head.weight"], b["head.weight"])


def test_distillation_learns_a_teachers_probabilities_computed_once(vat_run, capsys) -> None:
    root, data = vat_run
    teacher = root / "once" / "art"  # the VAT run's export: same corpus, same vocabulary
    flags = tiny_run_flags(data, root, "student") + ["--no-test", "--distill-from", str(teacher),
                                                     "--distill-weight", "1.0"]
    assert train.main(flags) == 0
    assert "teacher " in capsys.readouterr().out
    state = root / "student" / "state"
    history = json.loads((state / "run.json").read_text())["phases"]["finetune"]["history"]
    assert all(h["train_distill_loss"] > 0 for h in history)
    import numpy as np

    with np.load(state / "teacher.npz") as z:
        probs = z["probabilities"]
        assert ((probs > 0) & (probs < 1)).all() and len(probs) > 0
    # The finished run exported again: the teacher's probabilities are read back, not recomputed.
    assert train.main(flags) == 0
    assert "teacher " not in capsys.readouterr().out
    # Another teacher for the same run is refused rather than silently mixed in.
    other = tiny_run_flags(data, root, "student") + ["--no-test", "--distill-from", str(teacher), str(teacher),
                                                     "--distill-weight", "1.0"]
    with pytest.raises(SystemExit):
        train.main(other)
