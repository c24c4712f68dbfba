"""Run the real service (``python -m app``) in a child process and wait until it is ready.

The one way tests, benchmarks and tools start a server: a free port, the given settings as
``SENTIMENT_*`` variables, its output captured, readiness polled on ``/health/ready``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``python -m app`` serving ``artifacts`` on 127.0.0.1; ``env`` adds ``SENTIMENT_*`` settings;
    ``repo`` is the checkout whose ``app`` runs (another one, to compare versions in one run).

    Use as a context manager, or call :meth:`stop`. The constructor returns once the service
    answers ready, and raises ``RuntimeError`` with the log's tail if it exits or times out first.
    """

    def __init__(self, artifacts: str | Path, env: dict[str, str] | None = None, port: int | None = None,
                 log_level: str = "warning", ready_timeout_s: float = 120, repo: str | Path = REPO) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, "SENTIMENT_ARTIFACTS_DIR": str(artifacts), "SENTIMENT_PORT": str(self.port),
                   "SENTIMENT_LOG_LEVEL": log_level, **(env or {})}
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=repo, env=environ,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"service not ready within {timeout_s:g}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        """Everything the process has printed so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def terminate(self) -> None:
        """Send SIGTERM (graceful drain); :meth:`wait` for the exit status."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 60) -> int:
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM, wait for the drain, kill if it takes longer than ``timeout_s``."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> "ServiceProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
