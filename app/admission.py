"""Admission: what a request's texts may be, what each will cost, and how it is cut into queue items.

* :func:`validate_texts` applies the per-request limits (count, length, words, Unicode), naming
  every offending text.
* :func:`plan` turns texts into :class:`Plan`: the queue items (:class:`ScoreRequest`), the cost of
  each (work, in characters the tokenizer and model will see) and which items belong to which text.
  An explanation is split into items of ``EXPLAIN_CHUNK_TOKENS`` positions so that other requests
  get a turn between them; :meth:`Plan.merge` puts each text's answer back together.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from app.errors import ApiError, ErrorKind, Errors
from app.scorer import ModelSummary
from app.settings import Settings
from sentiment.engine import Score, ScoreRequest

# Queue cost model. Measured with the shipped model on 2 CPU cores, 256 test reviews per call: ~5 µs
# per character (tokenising + forward), a gate trace 5.9× that (38.4 vs 6.5 ms per review); a
# one-word text costs ~0.09 ms in a batch of 64 (~18 characters' worth). Only ratios matter: the wait
# estimate divides by the throughput measured in the same units.
CHARS_PER_TOKEN = 8
TEXT_OVERHEAD_CHARS = 50
GATES_COST_FACTOR = 6
# An occlusion explanation scores the text once per token, each time without that token: about
# (tokens + 1) × the text's own work. Tokens are estimated from characters (IMDB: ~5 per token).
EXPLAIN_CHARS_PER_TOKEN = 5
# Positions per queue item of an explanation: small enough that other requests get a turn every
# ~100 ms (32 variants of a 400-token review), large enough that re-scoring the text once per item
# costs ~3 %.
EXPLAIN_CHUNK_TOKENS = 32

# JSON can carry "\ud800" alone; Python keeps it, but it is not Unicode and no encoder can take it.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")

TextProblem = tuple[ErrorKind, int, str]  # (error kind, index of the text, what is wrong with it)


def text_problems(problems: list[TextProblem]) -> ApiError:
    """One error for a request's invalid texts: the first problem's kind, every text named."""
    details = [{"loc": ["body", "texts", i], "msg": msg} for _, i, msg in problems]
    summary = "; ".join(f"texts[{i}]: {msg}" for _, i, msg in problems[:5])
    return ApiError(problems[0][0], details, count=len(problems), summary=summary)


@lru_cache(maxsize=8)
def _long_word(max_word_chars: int) -> re.Pattern[str]:
    # Anchored at the start of a run (no \S before it): each run is scanned once, so the search is
    # linear in the text; unanchored, it restarts inside every run, ~max_word_chars steps a character.
    return re.compile(r"(?<!\S)\S{%d,}" % (max_word_chars + 1))


def text_problem(text: str, settings: Settings) -> tuple[ErrorKind, str] | None:
    """What is wrong with one text under the per-text limits (length, emptiness, Unicode, word
    length), or None. The service's requests and bulk scoring (:mod:`app.bulk`) apply the same checks."""
    s = settings
    if len(text) > s.max_text_chars:
        return Errors.TEXT_TOO_LONG, f"text has {len(text)} characters; the limit is {s.max_text_chars}"
    if not text.strip():
        return Errors.EMPTY_TEXT, "text is empty or whitespace"
    if (bad := LONE_SURROGATE.search(text)) is not None:
        return Errors.INVALID_UNICODE, (f"lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}: not "
                                        "valid Unicode (escape astral characters as a \\uD8xx\\uDCxx pair)")
    if (word := _long_word(s.max_word_chars).search(text)) is not None:
        return Errors.WORD_TOO_LONG, (f"{len(word.group())} characters without whitespace at character "
                                      f"{word.start()}; the limit is {s.max_word_chars}")
    return None


def validate_texts(texts: Sequence[str], settings: Settings, explain: bool = False) -> None:
    """Per-request limits from settings; each problem names the text it is about."""
    s = settings
    if len(texts) > s.max_texts:
        raise ApiError(Errors.TOO_MANY_TEXTS, [{"loc": ["body", "texts"], "msg": f"at most {s.max_texts} texts per request"}],
                       count=len(texts), limit=s.max_texts)
    problems: list[TextProblem] = []
    for i, text in enumerate(texts):
        if (found := text_problem(text, s)) is not None:
            problems.append((found[0], i, found[1]))
    if problems:
        raise text_problems(problems)
    if explain and len(texts) > s.max_explain_texts:
        raise ApiError(Errors.TOO_MANY_EXPLAINED, [{"loc": ["body", "texts"], "msg": (
            f"at most {s.max_explain_texts} texts per request with \"explain\"")}],
            count=len(texts), limit=s.max_explain_texts)


def work_items(text: str, trace: bool, gates: bool, explain: bool, model: ModelSummary) -> list[tuple[ScoreRequest, float]]:
    """The queue items for one text, each with its cost (:func:`item_cost`).

    A text is one item. An explanation scores the text once more per token, so it is split into
    items of ``EXPLAIN_CHUNK_TOKENS`` positions each: the batcher can then serve other requests
    between them, and a light request never waits behind a whole explanation. Every item is pinned
    to ``model``'s version, so a request is scored by one version even while another takes over.
    """
    if not explain:
        first = ScoreRequest(text, trace, gates, version=model.version)
        return [(first, item_cost(first, model))]
    bound = min(len(text), model.max_explain_tokens)  # a token has at least one character
    items = []
    for start in range(0, bound, EXPLAIN_CHUNK_TOKENS):
        request = ScoreRequest(text, trace and not start, gates and not start, True, (start, start + EXPLAIN_CHUNK_TOKENS),
                               version=model.version)
        items.append((request, item_cost(request, model)))
    return items


def item_cost(request: ScoreRequest, model: ModelSummary) -> float:
    """The work one queue item brings, in characters the tokenizer and model will see.

    A text costs its characters up to what truncation keeps (about ``CHARS_PER_TOKEN`` × max_tokens)
    plus a fixed overhead; a gate trace (a step-by-step unrolled LSTM) ``GATES_COST_FACTOR`` ×; an
    explanation item that much again for each position of its span that the text (probably) has.
    """
    text = request.text
    kept = min(len(text), CHARS_PER_TOKEN * model.max_tokens)
    chars = kept + TEXT_OVERHEAD_CHARS
    cost = chars * (GATES_COST_FACTOR if request.gates else 1)
    if request.explain_span is None:
        return cost
    # Tokens, estimated: ~5 characters each, but never fewer than the whitespace-separated words
    # (a hostile text of one-letter words must not be charged for a fifth of its work).
    estimated = min(max(kept / EXPLAIN_CHARS_PER_TOKEN, len(text[:kept].split())), model.max_explain_tokens)
    start, stop = request.explain_span
    return cost + chars * max(0.0, min(stop, estimated) - start)


def text_cost(text: str, gates: bool, model: ModelSummary, explain: bool = False) -> float:
    """The work one text brings to the queue (the sum of its items' costs)."""
    return sum(cost for _, cost in work_items(text, False, gates, explain, model))


@dataclass(frozen=True)
class Plan:
    """A request's queue items, their costs, and the items of each text (``groups[i]``)."""

    requests: list[ScoreRequest]
    costs: list[float]
    groups: list[range]

    @property
    def cost(self) -> float:
        return sum(self.costs)

    def merge(self, outcomes: Sequence[Score | Exception]) -> list[Score | Exception]:
        """One outcome per text from its items: the first error, or the first item's score with the
        attributions of every item's span, in order."""
        merged: list[Score | Exception] = []
        for group in self.groups:
            parts = [outcomes[k] for k in group]
            error = next((o for o in parts if isinstance(o, BaseException)), None)
            if error is not None or len(parts) == 1:
                merged.append(error if error is not None else parts[0])
                continue
            head = parts[0]
            assert isinstance(head, Score) and head.explanation is not None
            attributions = [a for part in parts for a in part.explanation.attributions]  # type: ignore[union-attr]
            merged.append(dataclasses.replace(head, explanation=dataclasses.replace(
                head.explanation, attributions=attributions)))
        return merged


def plan(texts: Sequence[str], trace: bool, gates: bool, explain: bool, model: ModelSummary) -> Plan:
    """The queue items of a request's texts (see :func:`work_items`)."""
    requests: list[ScoreRequest] = []
    costs: list[float] = []
    groups: list[range] = []
    for text in texts:
        items = work_items(text, trace, gates, explain, model)
        groups.append(range(len(requests), len(requests) + len(items)))
        requests += [request for request, _ in items]
        costs += [cost for _, cost in items]
    return Plan(requests, costs, groups)

