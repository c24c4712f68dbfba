"""Model shapes, padding invariance, and TorchScript export equal to the eager model."""

from __future__ import annotations

import torch

from training.export import load_artifacts
from training.model import ModelConfig, SentimentLSTM, pad_batch


def _model(layers: int = 1) -> SentimentLSTM:
    torch.manual_seed(0)
    return SentimentLSTM(ModelConfig(vocab_size=50, embedding_dim=6, hidden_size=10, num_layers=layers)).eval()


def test_shapes_and_trace_ends_at_prediction() -> None:
    model = _model()
    ids, lengths = pad_batch([[2, 3, 4], [5, 6], [7, 8, 9, 10, 11]])
    assert ids.shape == (3, 5) and lengths.tolist() == [3, 2, 5]
    assert model.embedding(ids).shape == (3, 5, 6)  # (B, T, E)
    last, steps = model(ids, lengths)
    assert last.shape == (3,) and steps.shape == (3, 5)  # (B,), (B, T)
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(steps[row, n - 1], last[row])
        assert torch.all(steps[row, n:] == 0)  # nothing reported past a text's end
    assert torch.all((last > 0) & (last < 1))


def test_padding_never_changes_a_result() -> None:
    for layers in (1, 2):
        model = _model(layers)
        short = [2, 3, 4]
        alone_last, alone_steps = model(*pad_batch([short]))
        batch_last, batch_steps = model(*pad_batch([list(range(2, 40)), short, [9] * 17]))
        assert torch.allclose(alone_last[0], batch_last[1], atol=1e-6)
        assert torch.allclose(alone_steps[0], batch_steps[1, :3], atol=1e-6)


def test_scripted_export_matches_eager(tiny_artifacts) -> None:
    art = load_artifacts(tiny_artifacts, "cpu")
    eager = SentimentLSTM(ModelConfig(**art.card["architecture"]["config"]))
    eager.load_state_dict(art.model.state_dict())
    eager.eval()
    ids, lengths = pad_batch([[2, 3, 4, 5], [6, 7]])
    with torch.no_grad():
        a, sa = eager(ids, lengths)
        b, sb = art.model(ids, lengths)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(sa, sb, atol=1e-6)
