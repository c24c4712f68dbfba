"""Texts that broke a model worker: remembered by their SHA-256 (never the text) for a while, so
that a client retrying one cannot keep killing workers."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

POISON_MEMORY = 10_000  # texts remembered at most (the oldest are forgotten first)


def text_key(text: str) -> str:
    """How a text is remembered: its SHA-256 (never the text itself)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class PoisonMemory:
    """Which texts to refuse, each for ``ttl_s`` after it was remembered; safe from any thread."""

    def __init__(self, ttl_s: float, size: int = POISON_MEMORY) -> None:
        self.ttl_s, self.size = ttl_s, size
        self._until: OrderedDict[str, float] = OrderedDict()  # text key → when it may be tried again
        self._lock = threading.Lock()

    def refuses(self, text: str) -> bool:
        """Whether ``text`` is remembered as one that breaks workers."""
        key = text_key(text)
        with self._lock:
            until = self._until.get(key)
            if until is not None and until < time.monotonic():
                del self._until[key]
                return False
            return until is not None

    def remember(self, text: str) -> str:
        """Refuse ``text`` for ``ttl_s`` from now; its key (for the log)."""
        key = text_key(text)
        with self._lock:
            self._until[key] = time.monotonic() + self.ttl_s
            self._until.move_to_end(key)
            while len(self._until) > self.size:
                self._until.popitem(last=False)
        return key
