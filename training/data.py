"""The Large Movie Review Dataset (aclImdb): reading, splitting, caching tokens, batching by length."""

from __future__ import annotations

import hashlib
import random
import re
import tarfile
import urllib.request
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Sequence

from training.text import Tokenizer, TokenizerSettings

OFFICIAL_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
OFFICIAL_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"  # of the official download (as torchtext checks it)

# aclImdb/<split>/<pos|neg|unsup>/<id>_<rating>.txt
_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")


class DatasetError(RuntimeError):
    """The dataset archive or folder is missing, corrupt or empty."""


@dataclass(frozen=True)
class Review:
    """One review; ``label`` is 1 (pos), 0 (neg) or -1 (unsup)."""

    text: str
    label: int
    rating: int
    key: str  # e.g. "train/pos/123"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in chunks (for the model card's data checksum)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_imdb(dest: str | Path, url: str = OFFICIAL_URL, md5: str = OFFICIAL_MD5) -> Path:
    """Download the official archive to ``dest`` (a file path) and verify its MD5 checksum."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(dest.suffix + ".part")
    urllib.request.urlretrieve(url, partial)  # noqa: S310 - fixed https URL
    digest = hashlib.md5(partial.read_bytes()).hexdigest()  # noqa: S324 - checksum, not security
    if digest != md5:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"downloaded archive has MD5 {digest}, expected {md5}")
    partial.rename(dest)
    return dest


def _want(split: str, polarity: str, splits: Sequence[str], unsup: bool) -> bool:
    return split in splits and (polarity != "unsup" or unsup)


def _make_review(split: str, polarity: str, rid: str, rating: str, raw: bytes) -> Review:
    label = {"pos": 1, "neg": 0, "unsup": -1}[polarity]
    return Review(raw.decode("utf-8", errors="replace"), label, int(rating), f"{split}/{polarity}/{rid}")


def read_imdb(
    source: str | Path, splits: Sequence[str] = ("train", "test"), unsup: bool = False
) -> dict[str, list[Review]]:
    """Read reviews from the official ``aclImdb_v1.tar.gz`` or its extracted folder.

    Returns ``{split: [Review, ...]}`` in a stable order (sorted by key), with ``unsup`` reviews
    (label -1) included in ``train`` only when asked.
    """
    source = Path(source)
    out: dict[str, list[Review]] = {s: [] for s in splits}
    if not source.exists():
        raise DatasetError(f"dataset not found: {source} (pass the aclImdb_v1.tar.gz archive or its folder)")
    if source.is_dir():
        root = source / "aclImdb" if (source / "aclImdb").is_dir() else source
        for path in sorted(root.glob("*/*/*.txt")):
            m = _MEMBER.search("aclImdb/" + path.relative_to(root).as_posix())
            if m and _want(m[1], m[2], splits, unsup):
                out[m[1]].append(_make_review(m[1], m[2], m[3], m[4], path.read_bytes()))
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    m = _MEMBER.search(member.name)
                    if m and member.isfile() and _want(m[1], m[2], splits, unsup):
                        raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                        out[m[1]].append(_make_review(m[1], m[2], m[3], m[4], raw))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"cannot read archive {source}: {exc}") from exc
    for split, reviews in out.items():
        if not any(r.label >= 0 for r in reviews):
            raise DatasetError(f"no labelled reviews found for split {split!r} in {source}")
        reviews.sort(key=lambda r: r.key)
    return out


def train_val_split(reviews: Sequence[Review], val_fraction: float, seed: int) -> tuple[list[Review], list[Review]]:
    """Carve a validation set out of the labelled training reviews with a fixed seed."""
    labelled = [r for r in reviews if r.label >= 0]
    order = list(range(len(labelled)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(labelled) * val_fraction))
    val = [labelled[i] for i in order[:n_val]]
    train = [labelled[i] for i in order[n_val:]]
    return train, val


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


def length_batches(lengths: Sequence[int], batch_size: int, seed: int | None) -> Iterator[list[int]]:
    """Yield index batches of similar length (little padding), in random order when ``seed`` is set.

    Indices are shuffled, cut into pools of 50 batches, each pool sorted by length and cut into
    batches; the batches are then shuffled. ``seed=None`` gives a deterministic, sorted order.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        part = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    if seed is not None:
        rng.shuffle(batches)
    yield from batches


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
