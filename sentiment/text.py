"""The text contract: raw review → cleaned text → spaCy tokens → vocabulary ids.

This module is the one place where text becomes ids. Training and serving both import it, so it
keeps its imports light (no torch, no training-only libraries).
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, KeysView, Sequence

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
VOCAB_FORMAT = 1

# IMDB reviews carry literal HTML line breaks ("<br /><br />"); spaCy would split them into noise
# tokens such as "/><br", so they are replaced by a space before tokenising.
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


class TextPipelineError(ValueError):
    """The vocabulary file is missing, unreadable or was made by an incompatible text pipeline."""


@dataclass(frozen=True)
class TokenizerSettings:
    """Everything that decides how a text becomes tokens; stored in the vocabulary file."""

    spacy_language: str = "en"
    lowercase: bool = True
    strip_html_breaks: bool = True
    max_tokens: int = 400
    # Keep the END of a long review: reviews usually close with the verdict, and the prediction is
    # read at the last token, so the end carries most of the signal.
    truncation: str = "keep_end"

    def __post_init__(self) -> None:
        if self.truncation not in ("keep_end", "keep_start"):
            raise TextPipelineError(f"unknown truncation policy {self.truncation!r}")
        if self.max_tokens < 1:
            raise TextPipelineError("max_tokens must be at least 1")

    def token_limit(self, requested: int | None = None) -> int:
        """The truncation length in force: the trained ``max_tokens``, or a smaller ``requested`` one.

        The one place the limit is clamped: a service may read fewer tokens than the model was
        trained on, never more.
        """
        return self.max_tokens if requested is None else max(1, min(requested, self.max_tokens))


@dataclass(frozen=True)
class EncodedText:
    """One text after the pipeline: the kept tokens, their ids and whether tokens were dropped."""

    tokens: list[str]
    ids: list[int]
    truncated: bool
    total_tokens: int


def clean(text: str, settings: TokenizerSettings) -> str:
    """Apply the pre-tokenisation clean-up (HTML line breaks → spaces). Not idempotent ("<br<br />/>"
    becomes "<br />"), so apply it exactly once."""
    if settings.strip_html_breaks:
        text = _HTML_BREAK.sub(" ", text)
    return text


_WORD = re.compile(r"\S+")


def cut_words(cleaned: str, keep: int, keep_end: bool = True) -> tuple[str, int]:
    """Cut a cleaned text to its last (``keep_end``) or first ``keep`` whitespace-separated words.

    Returns the cut text and how many words were dropped. Exact for truncation to ``keep`` tokens:
    spaCy splits a text at whitespace (``str.isspace``, the same set as ``\\s``) and tokenises each
    word on its own, and every word gives at least one token, so the last (first) ``keep`` tokens of
    the text all come from its last (first) ``keep`` words. It bounds the tokenizer's work by the
    token limit instead of the text's length.
    """
    starts = [m.start() for m in _WORD.finditer(cleaned)] if len(cleaned) > keep else []
    if len(starts) <= keep:
        return cleaned, 0
    if keep_end:
        return cleaned[starts[-keep]:], len(starts) - keep
    return cleaned[: starts[keep]], len(starts) - keep


@functools.lru_cache(maxsize=None)
def _cross_pairs(language: str) -> frozenset[tuple[str, str]]:
    """Character pairs (last of one piece, first of the next) at which one of the language's
    tokenizer special cases that it splits into several tokens (``''`` → ``'`` ``'``, ``:)``, ``O.O``)
    could match across a space. spaCy applies those with a matcher over the whole text, so there,
    and only there, a word's tokens can depend on its neighbour. Computed once per language."""
    import spacy
    from spacy.tokenizer import Tokenizer as SpacyTokenizer

    t = spacy.blank(language).tokenizer
    plain = SpacyTokenizer(t.vocab, rules={}, prefix_search=t.prefix_search, suffix_search=t.suffix_search,
                           infix_finditer=t.infix_finditer, token_match=t.token_match, url_match=t.url_match)
    pairs = set()
    for case in t.rules:
        parts = [token.text for token in plain(case)]
        pairs.update((a[-1], b[0]) for a, b in zip(parts, parts[1:]) if a and b)
    return frozenset(pairs)


class Tokenizer:
    """spaCy's rule-based English tokenizer (``spacy.blank``: no model download needed), memoised.

    spaCy splits a text at whitespace and tokenises each piece between whitespace on its own, except
    that a few special cases (``''``, emoticons) are matched over the whole text, so that a word next
    to certain neighbours can tokenise differently (:func:`_cross_pairs`). A text's tokens are
    therefore its pieces' tokens in order (:meth:`_units`), and a piece seen before is looked up in a
    dict of its tokens, which costs a fraction of spaCy building a ``Doc``. The others go through
    spaCy, one ``Doc`` each, in one ``memory_zone`` per call (strings first seen there are freed when
    it ends, so a flood of new words cannot grow spaCy's string store).

    The memo holds the words given to :meth:`cache_words` (the vocabulary's, at warm-up) and, with
    ``keep_recent_words``, every word tokenised since, up to ``CACHE_WORDS`` words in all (about
    32 MB, a bound no client can push past): when full it is emptied back to the cached words, so a
    flood of never-seen words costs speed for a moment, never memory. The tokens are the same as
    spaCy's over the whole text, always (tests/test_text.py, and ``python -m
    benchmarks.tokenizer_cache`` over every IMDB review).
    """

    CACHE_WORDS = 120_000  # ~270 bytes a word (measured): about 32 MB at most

    def __init__(self, settings: TokenizerSettings, keep_recent_words: bool = True) -> None:
        import spacy  # imported here so that importing this module stays cheap

        self.settings = settings
        self._nlp = spacy.blank(settings.spacy_language)
        self._pairs = _cross_pairs(settings.spacy_language)
        self._keep_recent = keep_recent_words
        self._pinned: dict[str, tuple[str, ...]] = {}  # cache_words' words → tokens: always kept
        self._memo: dict[str, tuple[str, ...]] = {}  # the pinned ones and recent ones

    @property
    def cached_words(self) -> KeysView[str]:
        """The words whose tokens are memoised."""
        return self._memo.keys()

    def tokenize(self, text: str) -> list[str]:
        """Return the (lower-cased) tokens of ``text``, whitespace tokens dropped."""
        return self.tokenize_many([text])[0]

    def tokenize_many(self, texts: Iterable[str], batch_size: int = 256, already_clean: bool = False) -> list[list[str]]:
        """Tokenise many texts; faster than calling :meth:`tokenize` in a loop."""
        cleaned = list(texts if already_clean else (clean(t, self.settings) for t in texts))
        memo = self._memo
        units = [self._units(text) for text in cleaned]
        new = {u: None for us in units for u in us if u not in memo}  # a dict: ordered, no repeats
        fresh = self._tokenize_pieces(list(new), batch_size) if new else {}
        out = [[t for u in us for t in (memo.get(u) or fresh[u])] for us in units]
        if self._keep_recent and fresh:
            if len(memo) + len(fresh) > self.CACHE_WORDS:
                self._memo = memo = dict(self._pinned)
            memo.update((u, tokens) for u, tokens in fresh.items() if " " not in u)
        return out

    def tokenize_whole(self, text: str, already_clean: bool = False) -> list[str]:
        """spaCy over the whole text in one ``Doc``, no memo: the definition of the tokens, which
        :meth:`tokenize_many` returns faster (used to check it)."""
        cleaned = text if already_clean else clean(text, self.settings)
        lower = self.settings.lowercase
        with self._nlp.memory_zone():
            return [(t.lower_ if lower else t.text) for t in self._nlp.tokenizer(cleaned) if not t.is_space]

    def _units(self, text: str) -> list[str]:
        """The text cut into pieces that spaCy tokenises independently: its whitespace-separated words
        (``str.split`` splits at the same whitespace as spaCy), except that words joined by a single
        space where a special case could match across that space (e.g. ``'`` then ``''And``) stay
        together."""
        words = text.split()
        pairs = self._pairs
        if not any((a[-1], b[0]) in pairs for a, b in zip(words, words[1:])):
            return words
        units: list[str] = []
        start = end = -1
        for m in _WORD.finditer(text):
            if units and m.start() == end + 1 and text[end] == " " and (text[end - 1], text[m.start()]) in pairs:
                units[-1] = text[start:m.end()]  # joined to the previous piece
            else:
                units.append(m.group())
                start = m.start()
            end = m.end()
        return units

    def _tokenize_pieces(self, pieces: Sequence[str], batch_size: int = 256) -> dict[str, tuple[str, ...]]:
        """Each piece's tokens, from spaCy (one ``Doc`` each, so none can affect another), inside a
        ``memory_zone``."""
        lower = self.settings.lowercase
        with self._nlp.memory_zone():
            return {piece: tuple((t.lower_ if lower else t.text) for t in doc if not t.is_space)
                    for piece, doc in zip(pieces, self._nlp.tokenizer.pipe(pieces, batch_size=batch_size))}

    def cache_words(self, words: Sequence[str]) -> None:
        """Memoise the tokens of ``words`` for good (whitespace-free strings; the vocabulary's words
        at warm-up), up to ``CACHE_WORDS`` in all."""
        todo = [w for w in dict.fromkeys(words) if w and w not in self._pinned and not any(c.isspace() for c in w)]
        todo = todo[: max(0, self.CACHE_WORDS - len(self._pinned))]
        if todo:
            tokens = self._tokenize_pieces(todo)
            self._pinned.update(tokens)
            self._memo.update(tokens)


@dataclass
class Vocabulary:
    """Token ↔ id mapping with ``<pad>`` = 0 and ``<unk>`` = 1, plus the tokenizer settings."""

    itos: list[str]
    settings: TokenizerSettings = field(default_factory=TokenizerSettings)

    def __post_init__(self) -> None:
        if self.itos[:2] != [PAD, UNK]:
            raise TextPipelineError("a vocabulary must start with <pad> (id 0) and <unk> (id 1)")
        self.stoi = {tok: i for i, tok in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise TextPipelineError("the vocabulary has duplicate tokens")

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(
        cls,
        token_lists: Iterable[Sequence[str]],
        settings: TokenizerSettings,
        min_freq: int = 2,
        max_size: int | None = 25_000,
    ) -> "Vocabulary":
        """Count tokens and keep those seen ``min_freq`` times, most frequent first (ties: alphabetical)."""
        counts: Counter[str] = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max(0, max_size - 2)]
        return cls([PAD, UNK] + [t for t in kept if t not in (PAD, UNK)], settings)

    def lookup(self, tokens: Sequence[str]) -> list[int]:
        """Map tokens to ids; unknown tokens become ``<unk>``."""
        get = self.stoi.get
        return [get(t, UNK_ID) for t in tokens]

    def truncate(self, tokens: list[str], max_tokens: int | None = None) -> tuple[list[str], bool]:
        """Apply the truncation policy; ``max_tokens`` may only tighten the trained limit."""
        limit = self.settings.token_limit(max_tokens)
        if len(tokens) <= limit:
            return tokens, False
        kept = tokens[-limit:] if self.settings.truncation == "keep_end" else tokens[:limit]
        return kept, True

    def encode_tokens(self, tokens: list[str], max_tokens: int | None = None, words_cut: int = 0) -> EncodedText:
        """Truncate and look up already-tokenised text (``words_cut``: words dropped before
        tokenising, see :func:`cut_words`; each counts as one token in ``total_tokens``).

        A text with no tokens is encoded as one ``<unk>`` so that every text has a last token to
        read the prediction from (serving rejects such texts before they get here).
        """
        kept, truncated = self.truncate(tokens, max_tokens)
        ids = self.lookup(kept) or [UNK_ID]
        return EncodedText(kept, ids, truncated or words_cut > 0, len(tokens) + words_cut)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary and its tokenizer settings as JSON."""
        payload = {"format": VOCAB_FORMAT, "tokenizer": asdict(self.settings), "itos": self.itos}
        Path(path).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read a vocabulary file written by :meth:`save`, refusing unknown formats."""
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise TextPipelineError(f"vocabulary file not found: {path}") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TextPipelineError(f"vocabulary file {path} is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != VOCAB_FORMAT:
            raise TextPipelineError(f"vocabulary file {path} has an unsupported format")
        try:
            settings = TokenizerSettings(**payload["tokenizer"])
            return cls(list(payload["itos"]), settings)
        except (KeyError, TypeError) as exc:
            raise TextPipelineError(f"vocabulary file {path} is incomplete: {exc}") from exc


class TextEncoder:
    """The whole contract in one object: texts → :class:`EncodedText` using a vocabulary's settings."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.tokenizer = Tokenizer(vocab.settings)

    def encode_many(self, texts: Sequence[str], max_tokens: int | None = None) -> list[EncodedText]:
        """Clean, cut to the words truncation can keep, tokenise, truncate and look up ``texts``.

        The same tokens as tokenising whole texts and truncating (see :func:`cut_words`); a text may
        come out with no tokens (callers decide). For a text cut before tokenising,
        ``total_tokens`` counts each dropped word as one token (a lower bound).
        """
        settings = self.vocab.settings
        limit = settings.token_limit(max_tokens)
        cut = [cut_words(clean(t, settings), limit, settings.truncation == "keep_end") for t in texts]
        token_lists = self.tokenizer.tokenize_many([c for c, _ in cut], already_clean=True)
        return [self.vocab.encode_tokens(tokens, limit, dropped) for tokens, (_, dropped) in zip(token_lists, cut)]

    def encode(self, text: str, max_tokens: int | None = None) -> EncodedText:
        """Encode one text (see :meth:`encode_many`)."""
        return self.encode_many([text], max_tokens)[0]
