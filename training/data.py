"""Training data: tokenised-corpus cache and the movie-grouped validation split over aclImdb.

Length-bucketed batches come from :func:`sentiment.batching.length_buckets` (one algorithm for
training and serving); the language model's token stream is built in ``training/pretrain.py``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np

from sentiment.artifacts import file_sha256
from sentiment.imdb import read_imdb, read_movie_ids
from sentiment.text import UNK_ID, Tokenizer, TokenizerSettings, Vocabulary


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


@dataclass(frozen=True)
class Split:
    """Indices into ``corpus.tokens["train"]``: the part we train on and the validation part.

    ``kind`` is ``"movie"`` (no movie on both sides, the default) or ``"random"`` (reviews drawn
    independently: the split the first models used, kept for comparison only).
    """

    kind: str
    seed: int
    train: list[int]
    validation: list[int]
    validation_movies: int = 0
    train_movies: int = 0

    def summary(self) -> dict:
        """What the model card records about the split."""
        digest = hashlib.sha256(",".join(map(str, sorted(self.validation))).encode()).hexdigest()[:16]
        return {"kind": self.kind, "seed": self.seed, "train_reviews": len(self.train),
                "validation_reviews": len(self.validation), "train_movies": self.train_movies,
                "validation_movies": self.validation_movies, "validation_sha256_16": digest}


def movie_grouped_split(keys: list[str], movie_of: dict[str, str], fraction: float, seed: int) -> Split:
    """Hold out whole movies until about ``fraction`` of the reviews are in validation.

    IMDB has up to 30 reviews per movie, and reviews of one movie share names, plot words and
    often a verdict; a random split puts 97 % of validation reviews next to a training review of
    the same movie, where "same movie, same label" alone scores 86 %. Test movies are disjoint from
    train movies, so only a grouped split measures what test measures. Movies are shuffled with
    ``seed`` (sorted first, so the result does not depend on dict order) and taken whole.
    """
    missing = [k for k in keys if k not in movie_of]
    if missing:
        raise ValueError(f"{len(missing)} reviews have no movie id (first: {missing[0]}); use --split random")
    by_movie: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_movie.setdefault(movie_of[key], []).append(i)
    movies = sorted(by_movie)
    random.Random(seed).shuffle(movies)
    target = int(round(len(keys) * fraction))
    held: list[int] = []
    n_held = 0
    for movie in movies:
        if len(held) >= target:
            break
        held.extend(by_movie[movie])
        n_held += 1
    held_set = set(held)
    train = [i for i in range(len(keys)) if i not in held_set]
    return Split("movie", seed, train, sorted(held), validation_movies=n_held, train_movies=len(movies) - n_held)


def make_split(kind: str, data: str | Path, keys: list[str], fraction: float, seed: int) -> Split:
    """The run's validation split of train/ reviews ``keys``: by movie (movie ids read from ``data``) or random."""
    if kind == "movie":
        return movie_grouped_split(keys, read_movie_ids(data, ("train",)), fraction, seed)
    return random_split(len(keys), fraction, seed)


def random_split(n: int, fraction: float, seed: int) -> Split:
    """The old split: reviews shuffled with ``seed``, the first ``fraction`` held out (leaks movies)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = int(round(n * fraction))
    return Split("random", seed, sorted(order[n_val:]), sorted(order[:n_val]))


@dataclass
class EncodedCorpus:
    """The labelled train/ reviews and unsup as vocabulary ids, full length: what the long phases read.

    Built from a :class:`TokenizedCorpus` and the run's vocabulary, or read from a pack
    (:func:`save_pack`), so that a machine without the archive or spaCy (a rented GPU) can run the
    language-model and fine-tuning phases. Test reviews are not in it: they are scored from the
    archive, through the exported artifacts, where the run is exported.
    """

    data_sha256: str
    train: list[np.ndarray]  # labelled train/ reviews, int32 ids, untruncated
    labels: list[int]
    keys: list[str]
    unsup: list[np.ndarray]
    n_test: int

    def truncated(self, indices: Sequence[int], vocab: Vocabulary) -> list[list[int]]:
        """The classifier's input for train reviews ``indices``: the vocabulary's truncation policy
        applied to ids, exactly as :meth:`Vocabulary.encode_tokens` applies it to tokens."""
        return [list(vocab.truncate(self.train[i].tolist())[0]) or [UNK_ID] for i in indices]


def encode_corpus(corpus: TokenizedCorpus, vocab: Vocabulary) -> EncodedCorpus:
    """Tokens → ids for train and unsup (unknown words → ``<unk>``)."""
    def ids(token_lists: list[list[str]]) -> list[np.ndarray]:
        return [np.asarray(vocab.lookup(t), dtype=np.int32) for t in token_lists]

    return EncodedCorpus(corpus.data_sha256, ids(corpus.tokens["train"]), list(corpus.labels["train"]),
                         list(corpus.keys["train"]), ids(corpus.tokens["unsup"]), len(corpus.tokens["test"]))


PACK_FORMAT = 1


def _flat(arrays: list[np.ndarray], dtype: type) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    return flat.astype(dtype), offsets


def _unflat(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    flat = flat.astype(np.int32)
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def save_pack(path: str | Path, encoded: EncodedCorpus, split: Split, vocab: Vocabulary) -> Path:
    """Write ids, labels, the split and the vocabulary to one xz-compressed file (~21 MB for IMDB)."""
    import io
    import json
    import lzma
    from dataclasses import asdict

    # uint16 halves the pack for vocabularies up to 65,536 words; the paper's (~87k) needs uint32.
    dtype = np.uint16 if len(vocab) <= np.iinfo(np.uint16).max + 1 else np.uint32
    meta = {"format": PACK_FORMAT, "data_sha256": encoded.data_sha256, "keys": encoded.keys, "n_test": encoded.n_test,
            "split": asdict(split), "vocab": {"itos": vocab.itos, "tokenizer": asdict(vocab.settings)}}
    train, train_off = _flat(encoded.train, dtype)
    unsup, unsup_off = _flat(encoded.unsup, dtype)
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), train=train, train_offsets=train_off,
             unsup=unsup, unsup_offsets=unsup_off, labels=np.asarray(encoded.labels, dtype=np.int8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(buf.getvalue(), preset=6))
    return path


def load_pack(path: str | Path) -> tuple[EncodedCorpus, Split, Vocabulary]:
    """Read a file written by :func:`save_pack`."""
    import io
    import json
    import lzma

    with np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes()))) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        if meta.get("format") != PACK_FORMAT:
            raise ValueError(f"{path}: unsupported pack format {meta.get('format')}")
        encoded = EncodedCorpus(meta["data_sha256"], _unflat(z["train"], z["train_offsets"]), z["labels"].tolist(),
                                meta["keys"], _unflat(z["unsup"], z["unsup_offsets"]), meta["n_test"])
    vocab = Vocabulary(meta["vocab"]["itos"], TokenizerSettings(**meta["vocab"]["tokenizer"]))
    return encoded, Split(**meta["split"]), vocab
