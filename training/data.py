"""Training data: tokenised-corpus cache, splits and length-bucketed batches over aclImdb."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

from sentiment.artifacts import file_sha256
from sentiment.imdb import read_imdb
from sentiment.text import Tokenizer, TokenizerSettings


def _tokenize_chunk(args: tuple[TokenizerSettings, list[str]]) -> list[str]:
    settings, texts = args
    return [" ".join(toks) for toks in Tokenizer(settings).tokenize_many(texts)]


def tokenize_corpus(texts: Sequence[str], settings: TokenizerSettings, workers: int = 2) -> list[list[str]]:
    """Tokenise many texts in ``workers`` processes (spaCy's tokenizer holds the GIL)."""
    chunk = 2000
    jobs = [(settings, list(texts[i : i + chunk])) for i in range(0, len(texts), chunk)]
    if workers <= 1 or len(jobs) <= 1:
        joined = [j for job in jobs for j in _tokenize_chunk(job)]
    else:
        with get_context("spawn").Pool(workers) as pool:
            joined = [j for part in pool.imap(_tokenize_chunk, jobs) for j in part]
    # spaCy tokens never contain whitespace, so a space-joined string round-trips exactly.
    return [s.split(" ") if s else [] for s in joined]


@dataclass
class TokenizedCorpus:
    """Tokenised reviews of every split, cached on disk so that training starts in seconds."""

    settings: TokenizerSettings
    data_sha256: str
    tokens: dict[str, list[list[str]]]  # split → token lists ("train", "unsup", "test")
    labels: dict[str, list[int]]
    keys: dict[str, list[str]]


def load_tokenized(source: str | Path, settings: TokenizerSettings, cache_dir: str | Path = ".cache",
                   workers: int = 2) -> TokenizedCorpus:
    """Read and tokenise train (with unsup) and test once; later calls read the pickle cache.

    The cache key is the data checksum plus the tokenizer settings that affect tokens, so a
    different archive or pipeline never reuses stale tokens. Truncation is applied later.
    """
    import pickle

    source = Path(source)
    data_sha = file_sha256(source) if source.is_file() else "folder:" + str(source.resolve())
    key = hashlib.sha256(
        f"{data_sha}|{settings.spacy_language}|{settings.lowercase}|{settings.strip_html_breaks}".encode()
    ).hexdigest()[:16]
    cache = Path(cache_dir) / f"tokens-{key}.pkl"
    if cache.exists():
        with open(cache, "rb") as fh:
            return pickle.load(fh)
    raw = read_imdb(source, ("train", "test"), unsup=True)
    split_reviews = {
        "train": [r for r in raw["train"] if r.label >= 0],
        "unsup": [r for r in raw["train"] if r.label < 0],
        "test": raw["test"],
    }
    corpus = TokenizedCorpus(settings, data_sha, {}, {}, {})
    for split, reviews in split_reviews.items():
        corpus.tokens[split] = tokenize_corpus([r.text for r in reviews], settings, workers)
        corpus.labels[split] = [r.label for r in reviews]
        corpus.keys[split] = [r.key for r in reviews]
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".tmp"), "wb") as fh:
        pickle.dump(corpus, fh, protocol=pickle.HIGHEST_PROTOCOL)
    cache.with_suffix(".tmp").rename(cache)
    return corpus
