"""The one resumable training loop that both long phases (language model, fine-tuning) run.

A phase (:class:`TrainingPhase`) supplies only what differs: its weights, one batch's loss, what follows
an optimizer step, and its end-of-epoch work (evaluation, the history entry). :class:`TrainingLoop`
owns what is the same: resuming from a checkpoint (exactly, or from the committed fp16 state with a
learning-rate re-warm-up), the learning-rate schedule, the optimizer step, checkpoints, the time box
and the position record. How the checkpoints are stored is in ``training/state.py``.
"""

from __future__ import annotations

import math
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Generic, TypeVar

import torch

from training.state import RunState, TimeBox, TimeBoxReached, compact, expand, rng_state, set_rng_state

Tally = TypeVar("Tally")  # a phase's running sums over the epoch in progress (a dataclass of numbers)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` of the peak at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """A phase's learning rate: ``peak`` × warm-up/cosine factor (× a re-warm-up after an inexact resume)."""

    peak: float
    total_steps: int
    warmup_steps: int
    min_ratio: float
    rewarm_steps: int

    def factor(self, step: int, rewarm_from: int | None = None) -> float:
        """The multiplier of ``peak`` at optimizer step ``step`` (0-based).

        ``rewarm_from`` is the step a resume without optimizer state started at: Adam's moments are
        empty then, so the rate ramps up again over ``rewarm_steps`` rather than jumping to full size.
        """
        factor = lr_factor(step, self.total_steps, self.warmup_steps, self.min_ratio)
        if rewarm_from is not None:
            factor *= min(1.0, (step - rewarm_from + 1) / max(1, self.rewarm_steps))
        return factor


@dataclass
class Position(Generic[Tally]):
    """Where a phase is: epoch (1-based), next batch in it, optimizer steps so far, the epoch's sums."""

    tally: Tally
    epoch: int = 1
    batch: int = 0
    step: int = 0
    seconds: float = 0.0  # training-step time spent in this epoch (evaluation not counted)

    def where(self, unit: str, batches: int) -> str:
        """The position in words, as stop and resume messages give it."""
        return f"epoch {self.epoch}, {unit} {self.batch}/{batches} (step {self.step})"

    def next_epoch(self) -> None:
        """Move to the start of the next epoch, with fresh sums (the step count runs on)."""
        self.epoch, self.batch, self.seconds = self.epoch + 1, 0, 0.0
        self.tally = type(self.tally)()

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``position`` entry (the tally's fields flat, as checkpoints have always had them)."""
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, **asdict(self.tally),
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], tally_type: type[Tally]) -> Position[Tally]:
        """The position a checkpoint recorded (written by :meth:`to_dict`, now or by earlier versions)."""
        tally = tally_type(**{f.name: saved[f.name] for f in fields(tally_type) if f.name in saved})
        return cls(tally, saved["epoch"], saved["batch"], saved["step"], saved.get("seconds", 0.0))


@dataclass(frozen=True)
class PhasePlan:
    """What the loop needs to know of a phase's recipe."""

    name: str  # checkpoint file stem and run.json key ("lm", "finetune")
    title: str  # how log lines name the phase
    unit: str  # what one step consumes ("chunk", "batch")
    epochs: int
    steps_per_epoch: int
    schedule: LRSchedule
    clip: float  # gradient-norm clipping over the parameters that train
    log_every: int  # a progress line every this many batches (0: none)
    fresh_after_fp16_resume: str = "the optimizer's moments"  # what a resume from fp16 weights restarts


class TrainingPhase(ABC, Generic[Tally]):
    """What a long phase supplies to :class:`TrainingLoop`: its weights, its step, its epoch's end."""

    tally_type: ClassVar[type]
    # Whether a finished phase goes on when more epochs are planned; not where its final checkpoint
    # holds other weights than the ones it trains (fine-tuning's average), with no optimizer state.
    extendable: ClassVar[bool] = True
    plan: PhasePlan
    optimizer: torch.optim.Optimizer  # a param group's optional "lr_scale" multiplies the scheduled rate

    @abstractmethod
    def weights(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds (live tensors; the loop copies what it compacts)."""

    @abstractmethod
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Put checkpointed weights (fp32, as :meth:`weights` gave them) into the model."""

    @abstractmethod
    def start_epoch(self, position: Position[Tally]) -> int:
        """Prepare ``position.epoch``'s batches (possibly resuming mid-epoch); return how many there are."""

    @abstractmethod
    def batch_loss(self, position: Position[Tally]) -> torch.Tensor:
        """Forward batch ``position.batch`` in training mode, add its figures to the tally, return the loss."""

    @abstractmethod
    def end_epoch(self, position: Position[Tally]) -> dict[str, Any]:
        """The epoch's history entry (evaluation included), ``epoch`` excepted."""

    def record_fields(self) -> dict[str, Any]:
        """Entries of the phase's run.json record, written whenever it trains (its recipe, sizes)."""
        return {}

    def initial_entry(self) -> dict[str, Any] | None:
        """A history entry measured before any training (None: the phase records none)."""
        return None

    def restore(self, compact_state: dict, exact_state: dict | None) -> None:
        """State beyond weights, position, RNG and optimizer, from a checkpoint (``exact_state`` may be None)."""

    def compact_extras(self) -> dict[str, Any]:
        """Further entries of the committed checkpoint."""
        return {}

    def exact_extras(self) -> dict[str, Any]:
        """Further entries of the local exact checkpoint."""
        return {}

    def after_step(self, position: Position[Tally]) -> None:
        """Work after each optimizer step (``position.step``: the 0-based index of the step just taken)."""

    def progress(self, position: Position[Tally]) -> str:
        """The figures of a progress line."""
        return ""

    def finish(self) -> dict[str, torch.Tensor] | None:
        """Work after the last epoch; weights to save as the phase's final state (None: the last checkpoint's)."""
        return None


@dataclass
class LoopState(Generic[Tally]):
    """What the loop carries from step to step: the position (checkpointed) and the re-warm-up's start."""

    position: Position[Tally]
    rewarm_from: int | None = None  # set by a resume from the committed fp16 state; kept in the exact checkpoint


def training_seconds(history: list[dict[str, Any]]) -> float:
    """Seconds of training over a phase's history (entries without time, such as epoch 0, count 0)."""
    return round(sum(entry.get("seconds", 0) for entry in history), 1)


class TrainingLoop(Generic[Tally]):
    """Runs a :class:`TrainingPhase` to its last epoch, resumably (see :meth:`run`)."""

    def __init__(self, phase: TrainingPhase[Tally], state: RunState, timebox: TimeBox,
                 log: Callable[[str], None] = print) -> None:
        self.phase, self.plan, self.state, self.timebox, self.log = phase, phase.plan, state, timebox, log
        self.record = state.phase(self.plan.name)  # the phase's entry in run.json
        self.loop = LoopState(Position(phase.tally_type()))

    def run(self) -> None:
        """Continue the phase from its checkpoint (if any) to its last epoch.

        Raises :class:`TimeBoxReached` after writing a checkpoint when the time box runs out; calling
        again with the same arguments continues from there.
        """
        resumed = self.resume()
        if resumed and self.finished():
            return
        self.record.update(self.phase.record_fields())
        if not resumed and not self.record["history"]:
            entry = self.phase.initial_entry()
            if entry is not None:
                self.record["history"].append(entry)
                self.log(f"{self.plan.title} before training: {entry}")
        self.state.info.setdefault("run_id", uuid.uuid4().hex)
        while self.loop.position.epoch <= self.plan.epochs:
            self.run_epoch()
        final = self.phase.finish()
        self.record["done"] = True
        if final is None:
            self.state.save_info()
        else:  # e.g. the averaged weights: a re-run of later stages starts from them
            self.checkpoint(final)

    def finished(self) -> bool:
        """Whether a resumed phase has nothing left to do (more planned epochs extend an extendable one)."""
        more = self.phase.extendable and self.loop.position.epoch <= self.plan.epochs
        return bool(self.record.get("done")) and not more

    def resume(self) -> bool:
        """Load the phase's latest checkpoint, if there is one (then True)."""
        small, full = self.state.load_phase(self.plan.name)
        if small is None:
            return False
        self.phase.load_weights(full["weights"] if full else expand(small["weights"]))
        pos = self.loop.position = Position.from_dict(small["position"], self.phase.tally_type)
        # The RNG states too, even of a finished phase: the next phase then starts where it would have.
        set_rng_state(small["rng"])
        where = pos.where(self.plan.unit, self.plan.steps_per_epoch)
        if self.finished():
            self.log(f"{self.plan.title}: finished earlier ({pos.epoch - 1} epochs); using its final weights")
            return True
        self.phase.restore(small, full)
        if full:
            self.phase.optimizer.load_state_dict(full["optimizer"])
            # A re-warm-up still under way when the exact checkpoint was written carries on.
            self.loop.rewarm_from = full.get("rewarm_from")
            self.log(f"{self.plan.title}: resumed exactly at {where}")
        else:
            self.loop.rewarm_from = pos.step
            self.log(f"{self.plan.title}: resumed from the committed fp16 state at {where}; "
                     f"{self.plan.fresh_after_fp16_resume} restart, so the learning rate re-warms over "
                     f"{self.plan.schedule.rewarm_steps} steps")
        return True

    def run_epoch(self) -> None:
        """The rest of the current epoch, then its evaluation and a checkpoint."""
        pos = self.loop.position
        batches = self.phase.start_epoch(pos)
        started = time.time()
        while pos.batch < batches:
            if self.timebox.expired():
                self.checkpoint()
                raise TimeBoxReached(self.plan.name, pos.where(self.plan.unit, batches))
            self.step()
            if self.plan.log_every and pos.batch % self.plan.log_every == 0:
                self.log(f"{self.plan.title} epoch {pos.epoch} {self.plan.unit} {pos.batch}/{batches}: "
                         f"{self.phase.progress(pos)}")
            if self.timebox.checkpoint_due():
                self.checkpoint()
        entry = {"epoch": pos.epoch, **self.phase.end_epoch(pos)}
        self.record["history"].append(entry)
        self.log(f"{self.plan.title} epoch {pos.epoch}: {entry} ({time.time() - started:.0f}s)")
        pos.next_epoch()
        self.checkpoint()

    def step(self) -> None:
        """One optimizer step on the next batch, at the scheduled learning rate."""
        pos, optimizer = self.loop.position, self.phase.optimizer
        t0 = time.time()
        factor = self.plan.schedule.factor(pos.step, self.loop.rewarm_from)
        for group in optimizer.param_groups:
            group["lr"] = self.plan.schedule.peak * group.get("lr_scale", 1.0) * factor
        loss = self.phase.batch_loss(pos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Frozen parameters (gradual unfreezing) have no gradient and take no part in the norm.
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"] if p.requires_grad],
                                       self.plan.clip)
        optimizer.step()
        self.phase.after_step(pos)
        pos.batch += 1
        pos.step += 1
        pos.seconds += time.time() - t0
        self.timebox.step()

    def checkpoint(self, final_weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write the committed (fp16) and the local exact checkpoint, and the position into run.json.

        ``final_weights``: the phase is over; save these weights, and no optimizer state, which no
        continuation needs.
        """
        pos = self.loop.position
        weights = self.phase.weights() if final_weights is None else final_weights
        self.record["position"] = {"epoch": pos.epoch, "batch": pos.batch, "step": pos.step}
        header = {"run_id": self.state.info["run_id"], "step": pos.step}
        committed = {**header, "position": pos.to_dict(), **self.phase.compact_extras(), "rng": rng_state(),
                     "weights": compact(weights)}
        exact = {**header, "weights": weights}
        if final_weights is None:
            exact.update({**self.phase.exact_extras(), "optimizer": self.phase.optimizer.state_dict(),
                          "rewarm_from": self.loop.rewarm_from})
        self.state.save_phase(self.plan.name, committed, exact)
