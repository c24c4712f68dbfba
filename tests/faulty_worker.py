"""A real model worker (``app.model_worker.serve``) with faults triggered by marker texts, for the
pool's fault tests: ``python -m tests.faulty_worker <fd>``.

* a text containing ``CRASH`` kills the process (as a segfault in a native library would);
* ``GARBAGE`` makes it answer bytes that are not a pickle (a corrupted reply);
* ``FREEZE`` stops the process (SIGSTOP: what a deadlock or a swap storm looks like from outside).
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection

from app.model_worker import serve
from sentiment.engine import SentimentEngine

_score = SentimentEngine.score
garbage = {"next": False}


def faulty_score(self, requests):  # noqa: ANN001, ANN201
    texts = " ".join(r.text for r in requests)
    if "CRASH" in texts:
        os._exit(11)
    if "FREEZE" in texts:
        os.kill(os.getpid(), signal.SIGSTOP)
    garbage["next"] = "GARBAGE" in texts
    return _score(self, requests)


class FaultyConnection(Connection):
    def send(self, obj) -> None:  # noqa: ANN001
        if garbage["next"]:
            garbage["next"] = False
            self.send_bytes(b"\x80\x05not a pickle at all")
            return
        super().send(obj)


if __name__ == "__main__":
    SentimentEngine.score = faulty_score  # type: ignore[method-assign]
    serve(FaultyConnection(int(sys.argv[1])))
