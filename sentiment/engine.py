"""The inference engine: artifacts on a device; raw texts → tokens → padded batches → probabilities.

One public entry, :meth:`SentimentEngine.score`, used by the service's batches, its warm-up, the
evaluation CLI and the benchmark's offline ceiling, so all of them time and check the same path.
No asyncio and no HTTP here: the service's batcher calls ``score`` from its model thread.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch

from sentiment.artifacts import Artifacts, cpu_has_bf16, load_artifacts
from sentiment.batching import length_buckets
from sentiment.model import ExactMixedPrecision, ModelConfig, SentimentLSTM, gate_trace, pad_batch
from sentiment.text import EncodedText, TextEncoder

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

# Forward passes group texts whose lengths are within this ratio (once a pass holds MIN_PASS_ROWS):
# on CPU a padded step costs as much as a real one. Measured on 1,024 test reviews with the shipped
# model, batches of 64 went from 2.51 to 1.46 ms/review.
PASS_LENGTH_RATIO = 1.5
MIN_PASS_ROWS = 4
# oneDNN keeps a compiled LSTM primitive per input shape, 1,024 by default; serving sees a new
# (rows, length) shape at almost every pass, and that cache grew a model worker from 330 to 630 MB
# in 100 s of load (and on). 16 keeps it at ~400 MB at no measurable cost in speed.
ONEDNN_PRIMITIVE_CACHE = "16"
# Arithmetic of the forward pass. fp32 is exact and batch-invariant; the others trade that for speed
# (docs/performance.md, "Precision": accuracy, speed-up and invariance bound of each, measured).
PRECISIONS = ("fp32", "bf16", "int8")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic ``precision`` names on ``device``: ``auto`` is bf16 on a CPU with AVX-512 BF16
    or AMX (exact and batch-invariant there, as fast as 1.5× fp32, the same test accuracy;
    docs/performance.md, "Precision") and fp32 everywhere else (on CUDA, bf16's batch invariance is
    not verified)."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


class EmptyTextError(ValueError):
    """A text produced no tokens (for example only HTML line breaks)."""


class VersionMismatchError(RuntimeError):
    """A request pinned to one model version reached an engine holding another. Never expected: the
    service pins each request's items to the version it admitted them for and routes them to that
    version's workers, so this is the invariant "each request is scored by one version" failing loudly."""

    def __init__(self, wanted: str, loaded: str) -> None:
        super().__init__(f"a request pinned to model version {wanted!r} reached version {loaded!r}")
        self.wanted, self.loaded = wanted, loaded

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # crosses the pipe from a model worker
        return VersionMismatchError, (self.wanted, self.loaded)


class ExplainTooLongError(ValueError):
    """A text asked for an explanation has more tokens (after truncation) than the explanation limit."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"{tokens} tokens to explain; the limit is {limit} per text")
        self.tokens, self.limit = tokens, limit

    def __reduce__(self) -> tuple[Any, tuple[int, int]]:  # crosses the pipe from a model worker
        return ExplainTooLongError, (self.tokens, self.limit)


@dataclass(frozen=True)
class ScoreRequest:
    """One raw text to score. ``trace`` asks for the probability after every token; ``gates``
    (which implies ``trace``) for the LSTM's gate activations after every token too."""

    text: str
    trace: bool = False
    gates: bool = False
    explain: bool = False  # occlusion: P(text) − P(text without token j), for every token j …
    explain_span: tuple[int, int] | None = None  # … or only for start <= j < stop (a slice of the work)
    version: str | None = None  # the model version that must score it (None: whichever engine gets it)


@dataclass(frozen=True)
class Explanation:
    """Occlusion attributions: ``attributions[j]`` is the text's probability minus the probability of
    the same text with ``tokens[j]`` dropped (a one-token text's "without" is the model's empty-input
    probability). Positive: the token pushed the verdict towards positive. For a request with an
    ``explain_span``, ``attributions`` covers only the span's positions (that exist)."""

    method: str
    tokens: list[str]
    attributions: list[float]


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
    explanation: Explanation | None = None


@dataclass
class ScoredBatch:
    """The answers for one call of :meth:`SentimentEngine.score`: a :class:`Score` or the exception
    for that text alone, in input order, plus where the time went (seconds)."""

    results: list[Score | Exception]
    tokenize_seconds: float = 0.0
    forward_seconds: float = 0.0
    forward_passes: int = 0
    errors: list[int] = field(default_factory=list)  # indices whose result is an exception

    @classmethod
    def assemble(cls, results: list[Any], parts: Iterable[tuple[Sequence[int], "ScoredBatch"]]) -> "ScoredBatch":
        """One batch from parts scored separately: each part's results go to its ``indices`` in
        ``results`` (slots it does not cover keep what they hold), and its times add up."""
        merged = cls(results)
        for indices, part in parts:
            for i, result in zip(indices, part.results):
                results[i] = result
            merged.tokenize_seconds += part.tokenize_seconds
            merged.forward_seconds += part.forward_seconds
            merged.forward_passes += part.forward_passes
        merged.errors = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        return merged


def _isolated(step: Callable[[list[T]], Sequence[R]], items: Sequence[T], what: str) -> list[R | Exception]:
    """Run ``step`` on all items at once; if it fails, run it item by item, so that only the items
    that fail alone get an exception (theirs) and their neighbours are unaffected."""
    if not items:
        return []
    try:
        return list(step(list(items)))
    except Exception:
        log.exception("%s failed for a batch of %d; retrying item by item", what, len(items))
    results: list[R | Exception] = []
    for item in items:
        try:
            results.append(step([item])[0])
        except Exception as exc:
            results.append(exc)
    return results


class SentimentEngine:
    """Holds the model, the vocabulary and the text encoder. Not thread-safe: one caller at a time."""

    def __init__(self, artifacts: Artifacts, max_tokens: int | None = None, max_batch_tokens: int = 16_384,
                 max_explain_tokens: int | None = None, precision: str = "auto", version: str | None = None) -> None:
        precision = resolve_precision(precision, artifacts.device)
        # Read by oneDNN when it first builds a primitive, so before any forward pass; a value set
        # by the operator wins.
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE)
        self.artifacts = artifacts
        self.precision = precision
        # A model repository names versions by directory (two copies of one model are two versions);
        # without one, the model card's version.
        self._version = version
        self.encoder = TextEncoder(artifacts.vocab)
        self.max_tokens = artifacts.vocab.settings.token_limit(max_tokens)
        self.max_batch_tokens = max_batch_tokens
        self.max_explain_tokens = min(max_explain_tokens or self.max_tokens, self.max_tokens)
        self.forward_passes = 0
        self._weights = {k: v.detach() for k, v in artifacts.model.state_dict().items()}  # for gate traces
        # P(positive) with nothing read: the head on a zero hidden state. The "without" of a one-token text.
        self.empty_probability = float(torch.sigmoid(self._weights["head.bias"].float()).reshape(-1)[0])
        self.model = self._model_for(precision)

    def _model_for(self, precision: str) -> Any:
        """The module that runs forward passes: the TorchScript model, or for int8 its eager twin with
        dynamically quantised LSTM and head (int8 weights; activations quantised per batch)."""
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            raise ValueError("bf16 precision needs a CPU with AVX-512 BF16 or AMX (oneDNN's bf16 LSTM); "
                             "this one has neither: use fp32 or int8")
        if precision == "fp32":
            return self.artifacts.model
        if precision == "int8" and self.device.type != "cpu":
            raise ValueError("int8 precision runs on CPU only; use fp32 or bf16 on CUDA")
        eager = SentimentLSTM(ModelConfig.of_weights(self._weights))  # the card need not describe it
        # assign: the twin holds the loaded model's own tensors (already fp32, on the device), not copies.
        eager.load_state_dict({k: v.float() for k, v in self._weights.items()}, assign=True)
        eager.to(self.device).eval()
        if precision == "bf16":
            return ExactMixedPrecision(eager, torch.bfloat16)
        with warnings.catch_warnings():  # torch.ao's notice that this API moves to torchao
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(eager, {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8)

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto", **kwargs: Any) -> "SentimentEngine":
        """Load artifacts (with all their consistency checks) onto ``device``."""
        return cls(load_artifacts(directory, device), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.artifacts.device

    @property
    def version(self) -> str:
        """The version this engine serves: its repository name, else the model card's version."""
        return self._version or str(self.artifacts.card.get("version", "unknown"))

    def score(self, requests: Sequence[ScoreRequest]) -> ScoredBatch:
        """Tokenise raw texts, then score them in length-bucketed forward passes.

        Each result is a :class:`Score` or the exception for that text alone
        (:class:`EmptyTextError` for a text with no tokens); a failure never spills onto the other
        texts of the batch.
        """
        started = time.perf_counter()
        encoded = _isolated(lambda rs: self.encoder.encode_many([r.text for r in rs], self.max_tokens), requests,
                            "tokenising")
        tokenized = time.perf_counter()
        results: list[Score | Exception | None] = [None] * len(requests)
        scorable = []
        for i, enc in enumerate(encoded):
            if requests[i].version not in (None, self.version):
                results[i] = VersionMismatchError(str(requests[i].version), self.version)
            elif isinstance(enc, Exception):
                results[i] = enc
            elif enc.total_tokens == 0:
                results[i] = EmptyTextError("text contains no tokens after cleaning")
            elif requests[i].explain and len(enc.ids) > self.max_explain_tokens:
                results[i] = ExplainTooLongError(len(enc.ids), self.max_explain_tokens)
            else:
                scorable.append(i)
        passes_before = self.forward_passes
        scored = _isolated(lambda pairs: self._forward([e for e, _ in pairs], [r for _, r in pairs]),
                           [(encoded[i], requests[i]) for i in scorable], "forward pass")
        for i, result in zip(scorable, scored):
            results[i] = result
        return ScoredBatch(
            results=results,  # type: ignore[arg-type]
            tokenize_seconds=tokenized - started,
            forward_seconds=time.perf_counter() - tokenized,
            forward_passes=self.forward_passes - passes_before,
            errors=[i for i, r in enumerate(results) if isinstance(r, Exception)],
        )

    @torch.inference_mode()
    def _forward(self, encoded: Sequence[EncodedText], requests: Sequence[ScoreRequest]) -> list[Score]:
        """Score encoded texts, and the occlusion variants of those asked to be explained, in the same
        length-bucketed passes; order kept."""
        variants: list[list[int]] = []
        occluded: dict[int, range] = {}  # text index → the token positions it explains
        first_variant: dict[int, int] = {}  # text index → row of its first variant
        for i, (enc, request) in enumerate(zip(encoded, requests)):
            if request.explain:
                start, stop = request.explain_span or (0, len(enc.ids))
                occluded[i] = range(min(start, len(enc.ids)), min(stop, len(enc.ids)))
                if len(enc.ids) > 1:
                    first_variant[i] = len(encoded) + len(variants)
                    variants.extend(enc.ids[:j] + enc.ids[j + 1:] for j in occluded[i])
        wants_steps = [r.trace or r.gates for r in requests] + [False] * len(variants)
        last, steps = self._run([e.ids for e in encoded] + variants, wants_steps)
        scores = []
        for i, (enc, request) in enumerate(zip(encoded, requests)):
            explanation = None
            if request.explain:
                positions = occluded[i]
                if len(enc.ids) > 1:
                    without = last[first_variant[i]:first_variant[i] + len(positions)]
                else:
                    without = [self.empty_probability] * len(positions)
                explanation = Explanation("occlusion", list(enc.tokens), [last[i] - p for p in without])
            scores.append(Score(
                probability=last[i],
                num_tokens=len(enc.ids),
                truncated=enc.truncated,
                total_tokens=enc.total_tokens,
                tokens=list(enc.tokens) if steps[i] is not None else None,
                trace=steps[i],
                gates=self._gates(enc.ids) if request.gates else None,
                explanation=explanation,
            ))
        return scores

    def _run(self, rows: Sequence[list[int]], wants_steps: Sequence[bool]) -> tuple[list[float], list[list[float] | None]]:
        """P(positive) at each row's last token, and at every token where ``wants_steps``, from
        length-sorted, token-budgeted forward passes (a row's result never depends on its neighbours)."""
        lengths = [len(r) for r in rows]
        last: list[float] = [0.0] * len(rows)
        steps: list[list[float] | None] = [None] * len(rows)
        passes = length_buckets(lengths, max_padded_tokens=self.max_batch_tokens,
                                max_length_ratio=PASS_LENGTH_RATIO, min_rows=MIN_PASS_ROWS)
        for chunk in passes:
            ids, lens = pad_batch([rows[i] for i in chunk])  # (B, T), (B,)
            chunk_last, chunk_steps = self.model(ids.to(self.device), lens.to(self.device))  # (B,), (B, T)
            self.forward_passes += 1
            steps_cpu = chunk_steps.float().cpu() if any(wants_steps[i] for i in chunk) else None  # (B, T)
            for row, (i, p) in enumerate(zip(chunk, chunk_last.float().cpu().tolist())):
                last[i] = p
                if steps_cpu is not None and wants_steps[i]:
                    steps[i] = steps_cpu[row, : lengths[i]].tolist()
        return last, steps

    def _gates(self, ids: list[int]) -> dict[str, list[float]]:
        """Gate activations and cell-state norm per token, by unrolling the model's own weights."""
        g = gate_trace(self._weights, torch.tensor(ids, dtype=torch.long, device=self.device))
        return {k: g[k].float().cpu().tolist() for k in ("input", "forget", "output", "cell_norm")}

    def warm_up(self) -> float:
        """Cache the vocabulary's words in the tokenizer, then score a short and a long text twice,
        with traces, so the first callers are not slow."""
        started = time.perf_counter()
        # The tokenizer memoises words' tokens as traffic brings them; the vocabulary holds the
        # words most texts are made of, so memoising them now (~0.4 s) makes the first requests
        # as fast to tokenise as later ones. Same tokens either way.
        self.encoder.tokenizer.cache_words(self.artifacts.vocab.itos[2:])
        samples = ["A fine film.", "An awful, boring movie that I would not recommend to anyone. " * 20]
        for _ in range(2):
            batch = self.score([ScoreRequest(t, trace=True) for t in samples])
            if batch.errors:
                raise RuntimeError(f"warm-up failed: {batch.results[batch.errors[0]]!r}")
        return time.perf_counter() - started
