"""SentimentLSTM: Embedding → LSTM → Linear → sigmoid, with a probability at every timestep."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Tuple

import torch
from torch import Tensor, nn


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`SentimentLSTM` (stored in the model card)."""

    vocab_size: int
    embedding_dim: int = 200
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.4
    pad_id: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_weights(cls, state: dict[str, Tensor]) -> "ModelConfig":
        """The shapes a :class:`SentimentLSTM` state dict was made with (dropout, which has no
        weights, at its default; it is off at inference anyway)."""
        vocab_size, embedding_dim = state["embedding.weight"].shape
        layers = sum(1 for k in state if k.startswith("lstm.weight_ih_l"))
        return cls(int(vocab_size), int(embedding_dim), int(state["lstm.weight_hh_l0"].shape[1]), layers)


def read_out(probs: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """From per-step probabilities (B, T) and lengths (B,): the probability at each text's last real
    token (B,), and the per-step probabilities with those past a text's length set to 0, so that
    padding is never read as a prediction (B, T)."""
    last = probs.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (B,)
    positions = torch.arange(probs.size(1), device=probs.device).unsqueeze(0)  # (1, T)
    return last, probs.masked_fill(positions >= lengths.unsqueeze(1), 0.0)


class SentimentLSTM(nn.Module):
    """A unidirectional LSTM whose sigmoid output after each token is the running sentiment.

    Input is right-padded: ``ids`` (B, T) with ``lengths`` (B,). A forward LSTM's output at step t
    depends only on tokens 0..t, so padding after a text's last token cannot change any of its
    outputs; that is why no packing is needed (and right-padded batches run faster on CPU than
    packed ones). The prediction is the output at each text's last real token.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_id)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            config.embedding_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(config.hidden_size, 1)

    def step_logits(self, ids: Tensor) -> Tensor:
        """Logit of positive sentiment after every token: (B, T) ids → (B, T) logits."""
        x = self.dropout(self.embedding(ids))  # (B, T, E)
        h, _ = self.lstm(x)  # (B, T, H)
        return self.head(self.dropout(h)).squeeze(-1)  # (B, T, 1) → (B, T)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """Return (probability at each text's last real token (B,), per-step probabilities (B, T)).

        Per-step probabilities past a text's length are set to 0 so that padding is never read as
        a prediction.
        """
        return read_out(torch.sigmoid(self.step_logits(ids)), lengths)  # (B, T) probabilities


class ExactMixedPrecision(nn.Module):
    """A :class:`SentimentLSTM`'s forward pass with the LSTM's matrix products in ``dtype`` (bf16)
    and every result independent of the batch around it.

    Under plain autocast the head (``Linear(H, 1)``) also runs in bf16: its output is rounded to
    bf16's 8-bit mantissa after a matrix product whose kernel, and so its summation order, depends
    on the batch's shape (a lone text is one row, a batch many), so a text's logit could move by one
    bf16 step (~0.016 at a logit of 3) with its neighbours. Here the LSTM runs under autocast (its
    oneDNN kernel gives the same hidden states for a row alone, in any batch and at any padding)
    and the head in float64: products of bf16-valued states and fp32 weights are exact there, and
    the sum's order (nor the sigmoid's vectorised tail) cannot show after rounding to fp32.
    """

    def __init__(self, model: SentimentLSTM, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.weight = model.head.weight.detach().double().reshape(-1)  # (H,)
        self.bias = model.head.bias.detach().double()  # (1,)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """As :meth:`SentimentLSTM.forward`: (B,) last-token and (B, T) per-step probabilities, fp32."""
        with torch.autocast(device_type=ids.device.type, dtype=self.dtype):
            h, _ = self.model.lstm(self.model.embedding(ids))  # (B, T, H) in bf16
        # float64 through the sigmoid too: its vectorised and scalar (tail) code differ in the last
        # bit, and which elements are a row's tail depends on the batch's size.
        return read_out(torch.sigmoid(h.double() @ self.weight + self.bias).float(), lengths)  # (B, T)


def pad_batch(id_lists: list[list[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad id lists into ``ids`` (B, T_max) int64 and ``lengths`` (B,) int64."""
    lengths = torch.tensor([len(x) for x in id_lists], dtype=torch.long)
    ids = torch.full((len(id_lists), int(lengths.max()) if id_lists else 0), pad_id, dtype=torch.long)
    for row, seq in enumerate(id_lists):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, lengths


@torch.no_grad()
def gate_trace(state: dict[str, Tensor], ids: Tensor) -> dict[str, Tensor]:
    """Unroll the LSTM of :class:`SentimentLSTM` step by step for one text, exposing its gates.

    ``state`` is the model's ``state_dict()`` (eager or TorchScript: the same keys) and ``ids`` (T,)
    one text's token ids. Every layer is recomputed with ``nn.LSTM``'s equations (gate order i, f, g,
    o; both biases), so the returned ``probabilities`` equal the model's own trace; the gates are
    those of the top layer, the one the head reads. Returns tensors of shape (T,):
    ``input``, ``forget``, ``output`` (mean activation over hidden units after each token),
    ``cell_norm`` (L2 norm of the cell state) and ``probabilities``.
    """
    x = state["embedding.weight"][ids]  # (T, E)
    layers = sum(1 for k in state if k.startswith("lstm.weight_ih_l"))
    steps = ids.size(0)
    for layer in range(layers):
        w_ih, w_hh = state[f"lstm.weight_ih_l{layer}"], state[f"lstm.weight_hh_l{layer}"]  # (4H, in), (4H, H)
        pre = x @ w_ih.T + state[f"lstm.bias_ih_l{layer}"] + state[f"lstm.bias_hh_l{layer}"]  # (T, 4H)
        hidden = w_hh.size(1)
        h = x.new_zeros(hidden)
        c = x.new_zeros(hidden)
        outputs, gates, cell_norm = [], [], []
        for t in range(steps):
            i, f, g, o = (pre[t] + w_hh @ h).chunk(4)  # each (H,)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c = f * c + i * g
            h = o * torch.tanh(c)
            outputs.append(h)
            gates.append(torch.stack([i.mean(), f.mean(), o.mean()]))
            cell_norm.append(c.norm())
        x = torch.stack(outputs)  # (T, H): the next layer's input
    logits = x @ state["head.weight"].T + state["head.bias"]  # (T, 1)
    g = torch.stack(gates)  # (T, 3)
    return {"input": g[:, 0], "forget": g[:, 1], "output": g[:, 2], "cell_norm": torch.stack(cell_norm),
            "probabilities": torch.sigmoid(logits.squeeze(-1))}
