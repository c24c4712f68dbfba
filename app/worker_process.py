"""One model-worker process as the pool sees it: how it is started (its settings and environment),
how its readiness is awaited and checked, and how it is ended. The process itself is
:mod:`app.model_worker`; the pool that schedules batches on these is :mod:`app.workers`."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from app.scorer import ModelSummary
    from app.settings import Settings

START_TIMEOUT_S = 300.0  # load + warm-up of one worker; a slow disk or a cold page cache can take a while
# What a worker inherits: no secrets (API keys), only what Python, torch and the locale read.
ENV_NAMES = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LD_LIBRARY_PATH", "VIRTUAL_ENV"}
ENV_PREFIXES = ("LC_", "PYTHON", "OMP_", "MKL_", "KMP_", "ONEDNN_", "DNNL_", "TORCH_", "CUDA_", "NVIDIA_",
                "CUBLAS_", "PYTORCH_", "SPACY_")


class WorkerStartError(RuntimeError):
    """A model-worker process could not load or warm up the model, or loaded another one."""


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to build its engine (plain values: it crosses a process boundary)."""

    artifacts_dir: str
    device: str
    precision: str
    max_tokens: int | None
    max_explain_tokens: int | None
    max_batch_tokens: int
    warmup: bool
    log_format: str = "text"
    log_level: str = "info"
    version: str | None = None  # the version's name in the model repository (None: the model card's)
    extra_nice: int = 0  # added to the workers' niceness: a shadow candidate yields the CPU to serving

    @classmethod
    def of(cls, settings: Settings) -> "WorkerConfig":
        """The worker's share of the service's settings."""
        from app.repository import startup_version

        s = settings
        return cls(str(s.artifacts_dir), s.device, s.precision, s.max_tokens, s.max_explain_tokens,
                   s.max_batch_tokens, s.warmup, s.log_format, s.log_level, startup_version(s))


def worker_env(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """The environment of a worker: the allowed names of this one (no API keys, no tracing
    endpoints), with this checkout first on the import path (the front may have found ``app``
    through its working directory rather than an installed package)."""
    env = {k: v for k, v in environ.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + environ["PYTHONPATH"] if environ.get("PYTHONPATH") else "")
    return env


class WorkerProcess:
    """A started model worker: its process and the connection that carries its batches."""

    def __init__(self, index: int, process: subprocess.Popen, conn: Connection, config: WorkerConfig | None = None) -> None:
        self.index, self.process, self.conn, self.config = index, process, conn, config
        self.version: str | None = None  # the model version it loaded, once ready

    @property
    def shadow(self) -> bool:
        """Whether it runs at the shadow's lower priority (it scores a candidate, not callers' requests)."""
        return bool(self.config is not None and self.config.extra_nice)

    @classmethod
    def spawn(cls, command: Sequence[str], config: WorkerConfig, index: int) -> "WorkerProcess":
        """Start ``command`` + the fd of its end of a socket pair, and send it ``config``."""
        ours, theirs = socket.socketpair()
        with theirs:
            process = subprocess.Popen([*command, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                       stdin=subprocess.DEVNULL, env=worker_env())
        conn = Connection(ours.detach())
        conn.send(config)
        return cls(index, process, conn, config)

    @property
    def pid(self) -> int:
        return self.process.pid

    def await_ready(self, expected: ModelSummary | None) -> ModelSummary:
        """The summary the worker reports once warm. One that fails, or that loaded another model
        (version, checksum) than ``expected``, is killed and reported as :class:`WorkerStartError`."""
        try:
            if not self.conn.poll(START_TIMEOUT_S):
                raise WorkerStartError(f"model worker {self.index} was not ready within {START_TIMEOUT_S:.0f}s")
            status, detail = self.conn.recv()
        except (EOFError, OSError):
            status, detail = "failed", f"exited with code {self.wait(5)}"
        if status == "ready" and expected is not None and (detail.version, detail.checksum) != (
                expected.version, expected.checksum):
            status, detail = "failed", (f"loaded model {detail.version!r} ({detail.checksum[:12]}), not the "
                                        f"served {expected.version!r} ({expected.checksum[:12]})")
        if status != "ready":
            self.kill()
            raise WorkerStartError(f"model worker {self.index} failed to start: {detail}")
        self.version = detail.version
        return detail

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to exit (it is idle: nothing is lost), and kill it if it does not in time."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        if self.wait(timeout_s) is None:
            self.process.kill()
            self.wait(5)
        self.conn.close()

    def wait(self, timeout_s: float) -> int | None:
        """The exit code once the process has ended within ``timeout_s``, else None."""
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        """End the process at once (SIGKILL ends a stopped, SIGSTOP, process too); its exit code."""
        self.process.kill()
        code = self.wait(5)
        self.conn.close()
        return code
