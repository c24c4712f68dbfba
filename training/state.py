"""Resumable training state: a time box for long phases, and where their progress is kept.

Two copies of a long phase's progress are written at every checkpoint:

- ``<state-dir>/<phase>.pt`` — **compact** and meant to be committed to git: weights in fp16, the
  batch position, the RNG states and (for the language model) the carried hidden state; no
  optimizer state. A fresh clone continues from it (Adam's moments restart, with a short LR
  re-warm-up, so the continuation is close to, not bit-equal with, an uninterrupted run).
- ``<checkpoint-dir>/<phase>-full.pt`` — **exact**, local only (git-ignored): fp32 weights and the
  optimizer state. When it matches the compact state's step, resuming is bit-for-bit the same as
  never having stopped (the tests check this).

``<state-dir>/run.json`` holds the recipe the run was started with and each phase's history, so a
continuation cannot silently change the recipe.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RUN_FILE = "run.json"


class TimeBoxReached(Exception):
    """A long phase checkpointed and stopped because its time (or step) budget ran out."""

    def __init__(self, phase: str, where: str) -> None:
        super().__init__(f"{phase}: stopped at {where}")
        self.phase = phase
        self.where = where


class TimeBox:
    """Decides when a long phase must checkpoint and when it must stop.

    ``minutes`` is wall-clock time since the process started (the real runs); ``steps`` counts
    optimizer steps taken in this process (deterministic, for tests). SIGTERM and SIGINT also ask
    for a clean stop at the next step, so ``kill <pid>`` loses nothing.
    """

    def __init__(self, minutes: float | None = None, steps: int | None = None,
                 checkpoint_minutes: float = 10.0, handle_signals: bool = False) -> None:
        self.started = time.monotonic()
        self.minutes, self.steps = minutes, steps
        self.checkpoint_minutes = checkpoint_minutes
        self.steps_taken = 0
        self.last_checkpoint = self.started
        self.signalled: str | None = None
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signalled = signal.Signals(signum).name

    def step(self) -> None:
        self.steps_taken += 1

    def expired(self) -> bool:
        """True once the budget is spent (or a stop signal arrived)."""
        if self.signalled:
            return True
        if self.steps is not None and self.steps_taken >= self.steps:
            return True
        return self.minutes is not None and time.monotonic() - self.started >= self.minutes * 60

    def checkpoint_due(self) -> bool:
        """True every ``checkpoint_minutes`` of wall-clock time (then resets)."""
        now = time.monotonic()
        if now - self.last_checkpoint >= self.checkpoint_minutes * 60:
            self.last_checkpoint = now
            return True
        return False

    def reason(self) -> str:
        if self.signalled:
            return f"signal {self.signalled}"
        if self.steps is not None and self.steps_taken >= self.steps:
            return f"--stop-after-steps {self.steps}"
        return f"--stop-after-minutes {self.minutes:g}"


def rng_state() -> dict:
    """Every RNG a training step draws from (dropout: torch; shuffles: seeded per epoch)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # dropout on the GPU draws from these
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights are on (a training phase runs on one device)."""
    return next(model.parameters()).device


def compact(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 copies of floating-point tensors (halves the committed size); others unchanged."""
    return {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()) for k, v in tensors.items()}


def expand(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 copies of the fp16 tensors written by :func:`compact`."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a kill mid-write never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class RunState:
    """The run's committed folder (``--state-dir``) and its local exact checkpoints (``--checkpoint-dir``)."""

    def __init__(self, state_dir: str | Path, checkpoint_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.info: dict[str, Any] = {}
        if (self.dir / RUN_FILE).is_file():
            self.info = json.loads((self.dir / RUN_FILE).read_text(encoding="utf-8"))

    @property
    def exists(self) -> bool:
        return bool(self.info)

    def save_info(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(self.info, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.dir / RUN_FILE)

    def phase(self, name: str) -> dict[str, Any]:
        """The phase's entry in run.json (history, position, done), created empty."""
        return self.info.setdefault("phases", {}).setdefault(name, {"done": False, "history": []})

    def save_phase(self, name: str, compact_payload: dict, full_payload: dict) -> None:
        """Write the compact (committed) and the exact (local) checkpoint of a phase, then run.json."""
        atomic_save(compact_payload, self.dir / f"{name}.pt")
        atomic_save(full_payload, self.checkpoint_dir / f"{name}-full.pt")
        self.save_info()

    def load_phase(self, name: str) -> tuple[dict | None, dict | None]:
        """(compact, full) checkpoints of a phase; ``full`` only when it is at the same step."""
        path = self.dir / f"{name}.pt"
        if not path.is_file():
            return None, None
        small = torch.load(path, map_location="cpu", weights_only=False)
        full_path = self.checkpoint_dir / f"{name}-full.pt"
        full = torch.load(full_path, map_location="cpu", weights_only=False) if full_path.is_file() else None
        if full is not None and (full.get("step") != small.get("step") or full.get("run_id") != small.get("run_id")):
            full = None  # an older local checkpoint from another run or step: the committed one wins
        return small, full
