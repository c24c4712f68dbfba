"""Model shapes, padding invariance, and TorchScript export equal to the eager model."""

from __future__ import annotations

import torch

from sentiment.artifacts import load_artifacts
from sentiment.model import ModelConfig, SentimentLSTM, gate_trace, pad_batch


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


def test_gate_trace_reproduces_nn_lstm_exactly() -> None:
    """The step-by-step unrolling behind the gate trace is the same function as nn.LSTM (1 and 2 layers)."""
    for layers in (1, 2):
        torch.manual_seed(layers)
        model = SentimentLSTM(ModelConfig(vocab_size=60, embedding_dim=10, hidden_size=12, num_layers=layers)).eval()
        scripted = torch.jit.script(model)
        ids = torch.randint(2, 60, (40,))
        with torch.no_grad():
            _, steps = scripted(ids.unsqueeze(0), torch.tensor([40]))  # (1, 40)
            h, _ = model.lstm(model.embedding(ids.unsqueeze(0)))  # (1, 40, H)
        g = gate_trace(scripted.state_dict(), ids)
        assert torch.allclose(g["probabilities"], steps[0], atol=1e-5)
        # The cell-norm and gates are of the top layer: check them against an LSTMCell run by hand.
        top = torch.nn.LSTMCell(12 if layers > 1 else 10, 12)
        top.load_state_dict({k.replace(f"_l{layers - 1}", ""): v for k, v in model.lstm.state_dict().items()
                             if k.endswith(f"_l{layers - 1}")})
        with torch.no_grad():
            x = model.embedding(ids)  # (40, E): the top layer's input when there is one layer
            if layers > 1:  # otherwise the output of the layer below
                below = torch.nn.LSTM(10, 12, batch_first=True)
                below.load_state_dict({k: v for k, v in model.lstm.state_dict().items() if k.endswith("_l0")})
                x = below(x.unsqueeze(0))[0][0]
            hx = cx = torch.zeros(12)
            for t in range(40):
                hx, cx = top(x[t], (hx, cx))
                assert torch.allclose(hx, h[0, t], atol=1e-5)
                assert abs(float(cx.norm()) - float(g["cell_norm"][t])) < 1e-4
        for name in ("input", "forget", "output"):
            assert g[name].shape == (40,) and bool(((g[name] > 0) & (g[name] < 1)).all())
