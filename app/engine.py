"""The inference engine: artifacts on a device; texts → tokens → padded batches → probabilities.

No asyncio and no HTTP here: the batcher calls :meth:`SentimentEngine.predict` from a worker
thread, and the routes call :meth:`SentimentEngine.encode` from a tokenizer thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from training.export import Artifacts, load_artifacts
from training.model import gate_trace, pad_batch
from training.text import EncodedText, TextEncoder

log = logging.getLogger(__name__)


class EmptyTextError(ValueError):
    """A text produced no tokens (for example only HTML line breaks)."""


@dataclass(frozen=True)
class ScoreRequest:
    """One text to score, already encoded; ``trace`` asks for the per-token probabilities and
    ``gates`` (which implies ``trace``) for the LSTM's gate activations after every token too."""

    encoded: EncodedText
    trace: bool = False
    gates: bool = False


@dataclass(frozen=True)
class Score:
    """The model's answer for one text."""

    probability: float
    num_tokens: int
    truncated: bool
    total_tokens: int
    tokens: list[str] | None = None
    trace: list[float] | None = None
    gates: dict[str, list[float]] | None = None


class SentimentEngine:
    """Holds the model, the vocabulary and the text encoder; thread-confined use of ``predict``."""

    def __init__(self, artifacts: Artifacts, max_tokens: int | None = None, max_batch_tokens: int = 16_384) -> None:
        self.artifacts = artifacts
        self.encoder = TextEncoder(artifacts.vocab)
        trained = artifacts.vocab.settings.max_tokens
        self.max_tokens = trained if max_tokens is None else min(max_tokens, trained)
        self.max_batch_tokens = max_batch_tokens
        self.forward_passes = 0
        self._weights = {k: v.detach() for k, v in artifacts.model.state_dict().items()}  # for gate traces

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto", **kwargs: Any) -> "SentimentEngine":
        """Load artifacts (with all their consistency checks) onto ``device``."""
        return cls(load_artifacts(directory, device), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.artifacts.device

    @property
    def version(self) -> str:
        return str(self.artifacts.card.get("version", "unknown"))

    def encode(self, texts: Sequence[str]) -> list[EncodedText]:
        """Tokenise and look up texts with the model's own text pipeline; reject token-less texts."""
        encoded = self.encoder.encode_many(texts, self.max_tokens)
        for i, enc in enumerate(encoded):
            if enc.total_tokens == 0:
                raise EmptyTextError(f"texts[{i}] contains no tokens after cleaning")
        return encoded

    def _chunks(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        """Cut length-sorted indices into forward passes of at most ``max_batch_tokens`` padded tokens."""
        chunks: list[list[int]] = []
        current: list[int] = []
        for i in order:
            # Sorted ascending, so the newest item is the longest: padded size = count × its length.
            if current and (len(current) + 1) * lengths[i] > self.max_batch_tokens:
                chunks.append(current)
                current = []
            current.append(i)
        if current:
            chunks.append(current)
        return chunks

    @torch.inference_mode()
    def predict(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Score encoded texts in length-sorted, token-budgeted forward passes; input order kept."""
        lengths = [len(r.encoded.ids) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: lengths[i])
        scores: list[Score | None] = [None] * len(requests)
        for chunk in self._chunks(order, lengths):
            ids, lens = pad_batch([requests[i].encoded.ids for i in chunk])  # (B, T), (B,)
            last, steps = self.artifacts.model(ids.to(self.device), lens.to(self.device))  # (B,), (B, T)
            self.forward_passes += 1
            last_list = last.float().cpu().tolist()
            steps_cpu = steps.float().cpu() if any(requests[i].trace or requests[i].gates for i in chunk) else None
            for row, i in enumerate(chunk):
                enc, wants_trace = requests[i].encoded, requests[i].trace or requests[i].gates
                trace = steps_cpu[row, : lengths[i]].tolist() if steps_cpu is not None and wants_trace else None
                scores[i] = Score(
                    probability=last_list[row],
                    num_tokens=len(enc.ids),
                    truncated=enc.truncated,
                    total_tokens=enc.total_tokens,
                    tokens=list(enc.tokens) if trace is not None else None,
                    trace=trace,
                    gates=self._gates(enc.ids) if requests[i].gates else None,
                )
        return scores  # type: ignore[return-value]

    def _gates(self, ids: list[int]) -> dict[str, list[float]]:
        """Gate activations and cell-state norm per token, by unrolling the model's own weights."""
        g = gate_trace(self._weights, torch.tensor(ids, dtype=torch.long, device=self.device))
        return {k: g[k].float().cpu().tolist() for k in ("input", "forget", "output", "cell_norm")}

    def predict_isolated(self, requests: Sequence[ScoreRequest]) -> list[Score | Exception]:
        """Like :meth:`predict`, but a failing batch is retried text by text so one bad item fails alone."""
        try:
            return list(self.predict(requests))
        except Exception:
            log.exception("batch of %d failed; retrying its texts one by one", len(requests))
        results: list[Score | Exception] = []
        for r in requests:
            try:
                results.append(self.predict([r])[0])
            except Exception as exc:
                results.append(exc)
        return results

    def warm_up(self) -> float:
        """Run the tokenizer and a few forward passes (short and long) so the first caller is not slow."""
        started = time.perf_counter()
        samples = ["A fine film.", "An awful, boring movie that I would not recommend to anyone. " * 20]
        encoded = self.encode(samples)
        for _ in range(2):
            self.predict([ScoreRequest(e, trace=True) for e in encoded])
        return time.perf_counter() - started
