"""The model repository (``SENTIMENT_MODEL_REPOSITORY``): a directory of artifact directories, one per
version; a directory's name is its version.

A version is a *name inside* the repository, never a path: a plain name (letters, digits, ``.``,
``_``, ``-``; no leading dot), whose directory resolves to a direct child of the repository (a
symlink out of it is refused), and whose three artifact files resolve inside the repository too.
Those are the checks of a name; whether the model in it can be served is checked by loading it
(:meth:`app.model_control.ModelControl.load`). The index adds the cheap part of that check (files
present, model card readable, checksums), so an operator sees a broken copy before loading it.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.errors import ApiError, Errors
from sentiment.artifacts import CARD_FILE, MODEL_FILE, VOCAB_FILE, file_sha256

if TYPE_CHECKING:
    from app.settings import Settings

VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ARTIFACT_FILES = (MODEL_FILE, VOCAB_FILE, CARD_FILE)


def startup_version(settings: Settings) -> str | None:
    """The version name of the artifacts served at start-up: their directory's name when
    ``SENTIMENT_ARTIFACTS_DIR`` is a version of the repository, else None (the model card's version)."""
    if settings.model_repository is None:
        return None
    path = Path(settings.artifacts_dir).resolve()
    if path.parent == Path(settings.model_repository).resolve() and VERSION_NAME.fullmatch(path.name):
        return path.name
    return None


@dataclass(frozen=True)
class VersionEntry:
    """One version of the repository as the index shows it."""

    name: str
    problem: str | None  # why it cannot be served (None: it looks servable)


class ModelRepository:
    """The versions under ``root`` (None: no repository configured)."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root).resolve() if root is not None else None
        self._sums: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) → sha256: index calls stay cheap
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every version name in the repository (its directories, or links to one, with plain names), sorted."""
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if VERSION_NAME.fullmatch(p.name) and p.is_dir())

    def resolve(self, name: object) -> Path:
        """The directory of version ``name``: 400 for anything but a plain name, 404 for no such
        version, 422 when it is not a directory of artifacts inside the repository."""
        if not isinstance(name, str) or not VERSION_NAME.fullmatch(name):
            raise ApiError(Errors.INVALID_REPOSITORY_REQUEST, summary=(
                f"parameters.version must be a version name (letters, digits, '.', '_', '-'; not a path), "
                f"not {str(name)[:80]!r}"))
        if self.root is None:
            raise ApiError(Errors.MODEL_NOT_FOUND, detail="no model repository is configured (SENTIMENT_MODEL_REPOSITORY)")
        entry = self.root / name
        if not entry.exists() and not entry.is_symlink():
            raise ApiError(Errors.MODEL_NOT_FOUND, detail=f"the model repository has no version {name!r}")
        problem = self.problem(name, checksums=False)
        if problem is not None:
            raise ApiError(Errors.INVALID_MODEL_VERSION, version=name, reason=problem)
        return entry.resolve()

    def problem(self, name: str, checksums: bool = True) -> str | None:
        """Why version ``name`` cannot be served, as far as its files tell (None: nothing found)."""
        assert self.root is not None
        path = (self.root / name).resolve()
        if path.parent != self.root:
            return "it resolves outside the model repository (a symlink out of it)"
        if not path.is_dir():
            return "it is not a directory of artifacts"
        for file in ARTIFACT_FILES:
            target = (path / file).resolve()
            if not target.is_file():
                return f"{file} is missing"
            if not target.is_relative_to(self.root):
                return f"{file} resolves outside the model repository (a symlink out of it)"
        try:
            card = json.loads((path / CARD_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{CARD_FILE} is not valid JSON ({type(exc).__name__})"
        if not isinstance(card, dict):
            return f"{CARD_FILE} is not a JSON object"
        files = card.get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            return f"{CARD_FILE} has no checksum of {MODEL_FILE}"
        if checksums:  # loading checks them again (in each worker); here only for the index
            for file, expected in files.items():
                if file in ARTIFACT_FILES and self._sha256(path / file) != expected:
                    return f"{file} does not match the checksum in the model card (corrupt or mixed files)"
        return None

    def entries(self) -> list[VersionEntry]:
        """Every version with what is wrong with it, if anything (checksums included: slow once per file)."""
        return [VersionEntry(name, self.problem(name)) for name in self.names()]

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._sums.get(key)
        if known is None:
            known = file_sha256(path)
            with self._lock:
                self._sums[key] = known
        return known
