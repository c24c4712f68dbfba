"""The shared resumable training loop, driven directly by a toy phase (no corpus, a few ms per run)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from training.loop import LRSchedule, PhasePlan, Position, TrainingLoop, TrainingPhase
from training.state import RunState, TimeBox, TimeBoxReached

BATCHES, EPOCHS = 4, 3


@dataclass
class ToyTally:
    loss_sum: float = 0.0
    seen: int = 0


class ToyPhase(TrainingPhase[ToyTally]):
    """Linear regression with noisy inputs (the noise draws from torch's RNG, as dropout does)."""

    tally_type = ToyTally

    def __init__(self, epochs: int = EPOCHS) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.x, self.y = torch.randn(BATCHES * 2, 3), torch.randn(BATCHES * 2)
        # Two groups, the second at half the rate: the loop must honour a group's "lr_scale".
        self.optimizer = torch.optim.AdamW([{"params": [self.model.weight]},
                                            {"params": [self.model.bias], "lr_scale": 0.5}], lr=0.1)
        schedule = LRSchedule(0.1, BATCHES * epochs, warmup_steps=3, min_ratio=0.1, rewarm_steps=4)
        self.plan = PhasePlan("toy", "toy", "batch", epochs, BATCHES, schedule, clip=1.0, log_every=1)
        self.trained: list[tuple[int, int]] = []  # (epoch, batch) of every step this phase took
        self.lrs: list[tuple[float, float]] = []  # both groups' rates at every step

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def start_epoch(self, position: Position[ToyTally]) -> int:
        return BATCHES

    def batch_loss(self, position: Position[ToyTally]) -> torch.Tensor:
        self.trained.append((position.epoch, position.batch))
        self.lrs.append(tuple(g["lr"] for g in self.optimizer.param_groups))
        rows = slice(2 * position.batch, 2 * position.batch + 2)
        x = self.x[rows] + 0.1 * torch.randn(2, 3)
        loss = ((self.model(x).squeeze(1) - self.y[rows]) ** 2).mean()
        position.tally.loss_sum += float(loss.detach()) * 2
        position.tally.seen += 2
        return loss

    def end_epoch(self, position: Position[ToyTally]) -> dict:
        return {"train_loss": position.tally.loss_sum / position.tally.seen}


class AveragedToyPhase(ToyPhase):
    extendable = False  # like fine-tuning: its final checkpoint holds an average, with no optimizer state


def run(tmp_path: Path, phase: ToyPhase, steps: int | None = None, logs: list[str] | None = None) -> None:
    state = RunState(tmp_path / "state", tmp_path / "ckpt")
    TrainingLoop(phase, state, TimeBox(steps=steps), log=(logs if logs is not None else []).append).run()


def test_schedule_warms_up_decays_and_rewarms() -> None:
    schedule = LRSchedule(peak=1.0, total_steps=10, warmup_steps=4, min_ratio=0.1, rewarm_steps=3)
    assert [schedule.factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up
    assert schedule.factor(4) == 1.0 and schedule.factor(10) == pytest.approx(0.1)  # cosine down to min_ratio
    assert schedule.factor(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    # A resume without optimizer state at step 6 ramps up again over 3 steps, then follows the schedule.
    assert [schedule.factor(s, rewarm_from=6) / schedule.factor(s) for s in (6, 7, 8, 9)] == \
        pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_the_optimizer_gets_the_scheduled_rate_times_each_groups_scale(tmp_path) -> None:
    phase = ToyPhase()
    run(tmp_path, phase)
    expected = [0.1 * phase.plan.schedule.factor(s) for s in range(BATCHES * EPOCHS)]
    assert [lr for lr, _ in phase.lrs] == pytest.approx(expected)
    assert [half for _, half in phase.lrs] == pytest.approx([lr / 2 for lr in expected])


def test_a_time_boxed_stop_and_exact_resume_equal_an_uninterrupted_run(tmp_path) -> None:
    once = ToyPhase()
    run(tmp_path / "once", once)
    assert once.trained == [(e, b) for e in range(1, EPOCHS + 1) for b in range(BATCHES)]

    first, logs = ToyPhase(), []
    with pytest.raises(TimeBoxReached, match=r"toy: stopped at epoch 2, batch 2/4 \(step 6\)"):
        run(tmp_path / "stopped", first, steps=6, logs=logs)
    state = RunState(tmp_path / "stopped" / "state", tmp_path / "stopped" / "ckpt")
    assert state.info["phases"]["toy"]["position"] == {"epoch": 2, "batch": 2, "step": 6}
    assert [e["epoch"] for e in state.info["phases"]["toy"]["history"]] == [1]

    second, logs = ToyPhase(), []
    run(tmp_path / "stopped", second, logs=logs)
    assert "toy: resumed exactly at epoch 2, batch 2/4 (step 6)" in logs
    assert first.trained + second.trained == once.trained  # continued where it stopped, nothing twice
    assert first.lrs + second.lrs == once.lrs
    assert all(torch.equal(once.model.state_dict()[k], v) for k, v in second.model.state_dict().items())


def test_a_resume_from_the_committed_state_alone_rewarms_the_rate(tmp_path) -> None:
    with pytest.raises(TimeBoxReached):
        run(tmp_path, ToyPhase(), steps=5)
    for exact in (tmp_path / "ckpt").iterdir():
        exact.unlink()  # what a fresh clone lacks: fp32 weights and the optimizer state
    phase, logs = ToyPhase(), []
    run(tmp_path, phase, logs=logs)
    assert any("resumed from the committed fp16 state at epoch 2, batch 1/4 (step 5)" in line for line in logs)
    schedule = phase.plan.schedule
    assert [lr for lr, _ in phase.lrs[:5]] == pytest.approx(
        [0.1 * schedule.factor(s) * min(1.0, (s - 5 + 1) / 4) for s in range(5, 10)])


def test_a_finished_phase_is_not_trained_again_unless_more_epochs_are_planned(tmp_path) -> None:
    run(tmp_path, ToyPhase())
    again, logs = ToyPhase(), []
    run(tmp_path, again, logs=logs)
    assert again.trained == [] and "toy: finished earlier (3 epochs); using its final weights" in logs
    fixed = AveragedToyPhase(epochs=EPOCHS + 1)
    run(tmp_path, fixed)
    assert fixed.trained == []
    longer = ToyPhase(epochs=EPOCHS + 1)
    run(tmp_path, longer)
    assert longer.trained == [(EPOCHS + 1, b) for b in range(BATCHES)]


def test_the_position_is_written_as_checkpoints_have_always_had_it() -> None:
    saved = {"epoch": 2, "batch": 3, "step": 7, "loss_sum": 1.5, "seen": 6, "seconds": 0.25}
    position = Position.from_dict(saved, ToyTally)
    assert position.tally == ToyTally(1.5, 6) and (position.epoch, position.batch, position.step) == (2, 3, 7)
    assert list(position.to_dict().items()) == list(saved.items())  # same keys, same order
    position.next_epoch()
    assert position.to_dict() == {"epoch": 3, "batch": 0, "step": 7, "loss_sum": 0.0, "seen": 0, "seconds": 0.0}


def test_an_exact_resume_inside_a_rewarm_up_keeps_rewarming(tmp_path) -> None:
    # Reference: stop at step 5, resume from the committed state alone, run to the end uninterrupted.
    with pytest.raises(TimeBoxReached):
        run(tmp_path / "ref", ToyPhase(), steps=5)
    for exact in (tmp_path / "ref" / "ckpt").iterdir():
        exact.unlink()
    reference = ToyPhase()
    run(tmp_path / "ref", reference)
    # The same, but stopped again two steps into the four-step re-warm-up and resumed exactly.
    with pytest.raises(TimeBoxReached):
        run(tmp_path / "cut", ToyPhase(), steps=5)
    for exact in (tmp_path / "cut" / "ckpt").iterdir():
        exact.unlink()
    first = ToyPhase()
    with pytest.raises(TimeBoxReached):
        run(tmp_path / "cut", first, steps=2)
    second = ToyPhase()
    run(tmp_path / "cut", second)
    assert first.lrs + second.lrs == reference.lrs  # the rate still ramps where the re-warm-up left off
    assert all(torch.equal(reference.model.state_dict()[k], v) for k, v in second.model.state_dict().items())
