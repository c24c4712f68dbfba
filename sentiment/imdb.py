"""The Large Movie Review Dataset (aclImdb): read the official archive or its extracted folder.

Light imports only: serving-side tools (benchmarks, evaluation through the service) read reviews too.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

OFFICIAL_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
OFFICIAL_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"  # of the official download (as torchtext checks it)

# aclImdb/<split>/<pos|neg|unsup>/<id>_<rating>.txt
_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")
# aclImdb/<split>/urls_<pos|neg|unsup>.txt: line i is the IMDB page of review <i>'s movie
_URLS = re.compile(r"(?:^|/)aclImdb/(train|test)/urls_(pos|neg|unsup)\.txt$")
_TITLE = re.compile(r"/title/(tt\d+)")


class DatasetError(RuntimeError):
    """The dataset archive or folder is missing, corrupt or empty."""


@dataclass(frozen=True)
class Review:
    """One review; ``label`` is 1 (pos), 0 (neg) or -1 (unsup)."""

    text: str
    label: int
    rating: int
    key: str  # e.g. "train/pos/123"


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


def _movie_ids(split: str, polarity: str, raw: bytes) -> dict[str, str]:
    out = {}
    for rid, line in enumerate(raw.decode("utf-8", errors="replace").splitlines()):
        m = _TITLE.search(line)
        out[f"{split}/{polarity}/{rid}"] = m[1] if m else line.strip()
    return out


def read_movie_ids(source: str | Path, splits: Sequence[str] = ("train",)) -> dict[str, str]:
    """Map each review key (``train/pos/123``) to its movie's IMDB id (``tt0453418``).

    Read from ``<split>/urls_<polarity>.txt``, whose line *i* names the movie of review *i*. Many
    reviews share a movie (up to 30 each), so a validation split that ignores this leaks movies.
    Raises :class:`DatasetError` when a requested split has no urls files.
    """
    source = Path(source)
    out: dict[str, str] = {}
    if not source.exists():
        raise DatasetError(f"dataset not found: {source} (pass the aclImdb_v1.tar.gz archive or its folder)")
    if source.is_dir():
        root = source / "aclImdb" if (source / "aclImdb").is_dir() else source
        for path in sorted(root.glob("*/urls_*.txt")):
            m = _URLS.search("aclImdb/" + path.relative_to(root).as_posix())
            if m and m[1] in splits:
                out.update(_movie_ids(m[1], m[2], path.read_bytes()))
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    m = _URLS.search(member.name)
                    if m and member.isfile() and m[1] in splits:
                        out.update(_movie_ids(m[1], m[2], tar.extractfile(member).read()))  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"cannot read archive {source}: {exc}") from exc
    for split in splits:
        if not any(k.startswith(split + "/") for k in out):
            raise DatasetError(f"no urls_*.txt files (movie ids) found for split {split!r} in {source}")
    return out
