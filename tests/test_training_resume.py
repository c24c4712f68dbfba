"""Time-boxed stops: a run stopped and continued (mid-epoch, in both long phases) equals one never stopped."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import write_fake_imdb
from tests.test_training import tiny_run_flags
from training import train


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "ckpt" / "finetune-full.pt", weights_only=False)["weights"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_fake_imdb(root)
    assert train.main(tiny_run_flags(data, root, "once") + ["--no-test"]) == 0
    return root, data


def test_stop_and_resume_gives_the_uninterrupted_result(uninterrupted, capsys) -> None:
    root, data = uninterrupted
    flags = tiny_run_flags(data, root, "stopped") + ["--no-test"]
    # The language model has 8 chunks per epoch and fine-tuning 5 batches: stops at LM epoch 1 chunk 5,
    # LM epoch 2 chunk 4, then fine-tuning epoch 1 batch 4 and epoch 2 batch 2 — all mid-epoch.
    for steps, where in ((5, "lm at epoch 1, chunk 5/8"), (7, "lm at epoch 2, chunk 4/8"),
                         (8, "finetune at epoch 1, batch 4/5"), (3, "finetune at epoch 2, batch 2/5")):
        assert train.main(flags + ["--stop-after-steps", str(steps)]) == 0  # a clean exit, code 0
        out = capsys.readouterr().out
        assert f"in {where}" in out and "continue with: python -m training.train" in out
        assert not (root / "stopped" / "art").exists()
    assert train.main(flags) == 0
    assert "resumed exactly at epoch 2, batch 2/5" in capsys.readouterr().out
    once, stopped = final_weights(root / "once"), final_weights(root / "stopped")
    assert once.keys() == stopped.keys() and all(torch.equal(once[k], stopped[k]) for k in once)
    card_once = json.loads((root / "once" / "art" / "model_card.json").read_text())
    card_stopped = json.loads((root / "stopped" / "art" / "model_card.json").read_text())
    assert card_once["metrics"]["validation"] == card_stopped["metrics"]["validation"]
    def figures(card: dict) -> list:  # what the run learned, not how long it took
        return [{k: v for k, v in e.items() if "second" not in k}
                for e in card["training"]["language_model_pretraining"]["history"]]

    assert figures(card_once) == figures(card_stopped)
    sessions = card_stopped["training"]["sessions"]
    assert len(sessions) == 5 and sessions[0]["reached"].startswith("lm: epoch 1")


def test_a_fresh_clone_continues_from_the_committed_state_alone(uninterrupted, capsys) -> None:
    """Only --state-dir is committed: without the local exact checkpoint the run still completes."""
    root, data = uninterrupted
    flags = tiny_run_flags(data, root, "clone") + ["--no-test"]
    assert train.main(flags + ["--stop-after-steps", "5"]) == 0
    shutil.rmtree(root / "clone" / "ckpt")  # what a clone does not have
    state = root / "clone" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["lm.pt", "run.json", "vocab.json"]
    small = torch.load(state / "lm.pt", weights_only=False)
    assert "optimizer" not in small and small["weights"]["lstm.weight_hh_l0"].dtype == torch.float16
    capsys.readouterr()
    assert train.main(flags) == 0
    assert "resumed from the committed fp16 state at epoch 1, chunk 5/8" in capsys.readouterr().out
    card = json.loads((root / "clone" / "art" / "model_card.json").read_text())
    assert [e["epoch"] for e in card["training"]["language_model_pretraining"]["history"]] == [0, 1, 2]
    assert 0 <= card["metrics"]["validation"]["accuracy"] <= 1


def test_a_continuation_cannot_change_the_recipe(uninterrupted, capsys) -> None:
    root, data = uninterrupted
    flags = tiny_run_flags(data, root, "recipe") + ["--no-test"]
    assert train.main(flags + ["--stop-after-steps", "2"]) == 0
    changed = list(flags)
    changed[changed.index("--hidden-size") + 1] = "16"
    with pytest.raises(SystemExit, match="another recipe: --hidden-size 16"):
        train.main(changed + ["--stop-after-steps", "1"])
    # Fine-tuning flags stay open until fine-tuning starts (another recipe on the same language model).
    assert train.main(flags + ["--adv-eps", "1.5", "--stop-after-steps", "1"]) == 0
    assert "adv_eps changed from 5.0 to 1.5" in capsys.readouterr().out
    # A flag written with its default value (adversarial training off) still counts as given.
    assert train.main(flags + ["--adv-eps", "0", "--stop-after-steps", "1"]) == 0
    assert "adv_eps changed from 1.5 to 0.0" in capsys.readouterr().out
