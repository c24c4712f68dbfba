"""The model card: its figures are computed right, its test log only grows, and docs/model-card.md is its rendering."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sentiment.artifacts import export_artifacts, load_artifacts
from sentiment.model import ModelConfig, SentimentLSTM
from sentiment.text import TokenizerSettings, Vocabulary
from tests.conftest import TINY_WORDS, write_fake_imdb
from training import card as model_card
from training import card_figures
from training.data import TokenizedCorpus
from training.state import RunState
from training.train import stage_test

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CARD = ROOT / "model_artifacts" / "model_card.json"


def test_wilson_interval_matches_the_formula_and_stays_inside_0_1() -> None:
    low, high = card_figures.wilson_interval(23_173, 25_000)
    assert low < 23_173 / 25_000 < high and high - low == pytest.approx(2 * 1.96 * math.sqrt(0.927 * 0.073 / 25_000),
                                                                        rel=0.01)
    assert card_figures.wilson_interval(10, 10)[1] <= 1 and card_figures.wilson_interval(0, 10)[0] >= 0


def test_calibrated_probabilities_have_a_small_ece_and_overconfident_ones_a_large_one() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 40_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)  # labels drawn from the probabilities: calibrated
    assert card_figures.reliability(p.tolist(), y.tolist())["ece"] < 0.01
    sharp = np.where(p >= 0.5, 0.999, 0.001)
    assert card_figures.reliability(sharp.tolist(), y.tolist())["ece"] > 0.2


def test_temperature_fit_recovers_a_known_temperature_and_lowers_the_ece() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, 30_000)
    y = (rng.uniform(0, 1, z.size) < 1 / (1 + np.exp(-z / 2))).astype(int)  # the truth is sigmoid(z / 2)
    p = (1 / (1 + np.exp(-z))).tolist()  # the model says sigmoid(z): over-confident by T = 2
    assert card_figures.fit_temperature(p, y.tolist()) == pytest.approx(2.0, rel=0.05)
    report = card_figures.temperature_report(p, y.tolist())
    assert report["lowers_validation_ece"] and report["validation"]["ece_after"] < 0.02
    assert card_figures.accuracy_with_interval(card_figures.scale(p, 2.0), y.tolist())["accuracy"] == \
        card_figures.accuracy_with_interval(p, y.tolist())["accuracy"]  # labels never change


def test_folding_the_temperature_into_the_head_divides_every_logit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SentimentLSTM(ModelConfig(20, 4, 6)).eval()
    ids, lengths = torch.randint(1, 20, (3, 7)), torch.tensor([7, 5, 2])
    before = model(ids, lengths)[0]
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, 4000)
    y = (rng.uniform(0, 1, z.size) < 1 / (1 + np.exp(-z / 2))).astype(int)
    keys = [f"train/x/{i}" for i in range(z.size)]
    path = tmp_path / "validation_predictions.json"
    path.write_text(json.dumps({"labels": dict(zip(keys, y.tolist())),
                                "probabilities": dict(zip(keys, (1 / (1 + np.exp(-z))).tolist()))}))
    report = model_card.fold_validation_temperature(model, path)["temperature_scaling"]
    assert report["applied"]
    after = model(ids, lengths)[0]
    logit = torch.logit(before.double())
    assert torch.allclose(torch.logit(after.double()), logit / report["temperature"], atol=1e-4)


def _tiny_export(directory: Path) -> tuple[SentimentLSTM, Vocabulary]:
    torch.manual_seed(0)
    vocab = Vocabulary.build([TINY_WORDS], TokenizerSettings(max_tokens=16), min_freq=1)
    model = SentimentLSTM(ModelConfig(len(vocab), 8, 12))
    return model, vocab


def test_the_test_stage_appends_to_the_log_of_test_evaluations(tmp_path: Path) -> None:
    model, vocab = _tiny_export(tmp_path)
    earlier = {"date": "2026-12-04", "what": "an earlier export", "precision": "fp32", "how": "in-process",
               "accuracy": 0.5, "n": 4, "purpose": "history"}
    card = {"version": "tiny", "metrics": {"validation": {"accuracy": 0.5}, "test_evaluations": [earlier]}}
    out = export_artifacts(model, vocab, card, tmp_path / "art")
    corpus = TokenizedCorpus(vocab.settings, "0" * 64, {"test": [["good", "film"], ["awful", "movie"]] * 3},
                             {"test": [1, 0] * 3}, {"test": [f"test/x/{i}" for i in range(6)]})
    state = RunState(tmp_path / "state", tmp_path / "ckpt")
    state.info = {"recipe": {}}
    stage_test(out, corpus, model, vocab, card, state)
    log = load_artifacts(out, "cpu").card["metrics"]["test_evaluations"]
    assert log[0] == earlier and len(log) == 2  # appended, not overwritten
    assert log[1]["n"] == 6 and log[1]["accuracy"] == card["metrics"]["test"]["accuracy"]
    assert {"date", "what", "precision", "how", "accuracy", "n", "purpose"} <= set(log[-1])
    # The run's state remembers it (committed with the state): the run is never scored again.
    assert RunState(tmp_path / "state", tmp_path / "ckpt").info["test"]["evaluation"] == log[1]


def test_a_re_export_of_the_same_run_keeps_the_log_and_another_run_starts_its_own() -> None:
    card = json.loads(SHIPPED_CARD.read_text())
    same = json.loads(json.dumps(card))
    same["version"] = "re-exported"
    assert model_card.same_model(card, same)
    other = json.loads(json.dumps(card))
    other["training"]["fine_tuning"]["history"][-1]["val_accuracy"] += 0.001
    assert not model_card.same_model(card, other)


def test_phases_are_read_from_the_sessions_of_a_run() -> None:
    sessions = [
        {"started": "1", "device": "cuda", "gpu": "G", "precision": "bf16", "reached": "lm: epoch 1, chunk 1"},
        {"started": "2", "device": "cuda", "gpu": "G", "precision": "bf16", "reached": "fine-tuning done"},
        {"started": "3", "device": "cpu", "threads": 2, "precision": "fp32", "reached": "fine-tuning done"},
    ]
    earlier = [{"started": "0", "threads": 2, "precision": "fp32", "reached": "language model done"}]
    hw = model_card.phase_hardware(sessions, earlier, {"cpu_model": "C"})
    assert [d["device"] for d in hw["language_model_of_the_initial_run"]] == ["CPU, 2 torch threads (fp32)"]
    assert [d["device"] for d in hw["language_model"]] == ["1x G (bf16)"]
    assert [(d["device"], d["sessions"]) for d in hw["fine_tuning"]] == [("1x G (bf16)", 1)]
    assert hw["export_and_test"] == {"cpu_model": "C"}


def test_the_shipped_card_has_what_a_user_needs_and_keeps_what_the_service_reads() -> None:
    card = json.loads(SHIPPED_CARD.read_text())
    m = card["metrics"]
    assert m["test"]["accuracy"] and card["training"]["hardware"] and card["files"]["model.pt"]
    assert 0 < m["calibration"]["ece"] < 0.1 and m["calibration"]["bins"] == 15
    assert m["test_interval"]["interval_95"][0] < m["test_interval"]["accuracy"] < m["test_interval"]["interval_95"][1]
    assert set(m["slices"]["by_rating"]["ratings"]) == {"1", "2", "3", "4", "7", "8", "9", "10"}
    assert sum(b["n"] for b in m["slices"]["by_length"]["buckets"].values()) == 25_000
    assert card["intended_use"] and card["out_of_scope"] and card["limitations"] and card["provenance"]["code"]
    purposes = [e["purpose"] for e in m["test_evaluations"]]
    assert "model card slices and calibration, no model choice" in purposes
    assert "run 1" in m["test_evaluations"][0]["what"]  # the evaluation that chose between runs is on record
    assert card["baseline"]["command"] == "python -m training.baseline"
    assert load_artifacts(SHIPPED_CARD.parent, "cpu").card == card  # checksums still valid


def test_the_card_figures_are_what_the_saved_predictions_give() -> None:
    predictions = ROOT / model_card.PREDICTIONS
    if not predictions.is_file():
        pytest.skip("no saved test predictions")
    assert predictions.stat().st_size < 1024 * 1024
    card = json.loads(SHIPPED_CARD.read_text())
    probs, labels, _ = model_card.load_validation(ROOT / model_card.VALIDATION)
    got = model_card.figures(model_card.load_predictions(predictions), probs, labels)
    assert got["test"] == card["metrics"]["test_interval"]
    assert got["calibration"]["ece"] == card["metrics"]["calibration"]["ece"]
    assert got["slices"] == card["metrics"]["slices"] and got["short_inputs"] == card["metrics"]["short_inputs"]


def test_docs_model_card_is_the_rendering_of_the_card() -> None:
    committed = (ROOT / "docs" / "model-card.md").read_text(encoding="utf-8")
    assert committed == model_card.render(json.loads(SHIPPED_CARD.read_text())), (
        "docs/model-card.md is out of date with model_artifacts/model_card.json: run "
        "`python -m training.card render` and commit it")
    plot = ROOT / "docs" / "model-card-reliability.png"
    assert plot.is_file() and plot.stat().st_size < 200 * 1024


def test_the_baseline_script_writes_its_figure_into_the_card(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from training import baseline

    data = write_fake_imdb(tmp_path)
    card_path = tmp_path / "model_card.json"
    card_path.write_text(json.dumps({"version": "x", "baseline": {"tfidf_logistic_regression_test_accuracy": 0.1}}))
    out = tmp_path / "baseline.json"
    assert baseline.main(["--data", str(data), "--grid", "1,10", "--min-df", "1", "--out", str(out),
                          "--card", str(card_path)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(card_path.read_text())["baseline"] == result
    assert result["test_n"] == 24 and result["tfidf_logistic_regression_test_accuracy"] >= 0.9  # separable words
    assert result["C"] in (1.0, 10.0) and set(result["validation_accuracy_by_C"]) == {"1", "10"}
    assert model_card.baseline_result(out) == result  # what training.train's model card reads


def test_an_evaluation_of_the_test_set_can_be_logged_in_the_card(tiny_artifacts: Path, tmp_path: Path) -> None:
    import shutil

    from training import evaluate

    art = Path(shutil.copytree(tiny_artifacts, tmp_path / "art"))
    data = write_fake_imdb(tmp_path)
    assert evaluate.main(["--artifacts", str(art), "--data", str(data), "--json", "--device", "cpu",
                          "--log-purpose", "check the service"]) == 0
    assert evaluate.main(["--artifacts", str(art), "--data", str(data), "--json", "--device", "cpu",
                          "--log-purpose", "again"]) == 0
    card = load_artifacts(art, "cpu").card  # the card is not checksummed: editing it keeps the artifacts valid
    assert [e["purpose"] for e in card["metrics"]["test_evaluations"]] == ["check the service", "again"]
    assert card["metrics"]["test_evaluations"][0]["n"] == 24


def test_readme_quotes_the_cards_figures() -> None:
    card = json.loads(SHIPPED_CARD.read_text())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    low, high = card["metrics"]["test_interval"]["interval_95"]
    assert f"{100 * low:.2f}–{100 * high:.2f} %" in readme and "docs/model-card.md" in readme
    assert f"{100 * card['metrics']['short_inputs']['first_sentence']['accuracy']:.2f} %" in readme
    assert f"{100 * card['baseline']['tfidf_logistic_regression_test_accuracy']:.2f} %" in readme


def test_a_run_is_scored_on_test_once_and_a_re_export_keeps_its_figure_and_log(tmp_path: Path, capsys) -> None:
    from tests.test_training import tiny_run_flags
    from training import train

    data = write_fake_imdb(tmp_path)
    flags = tiny_run_flags(data, tmp_path)  # with --test
    assert train.main(flags) == 0
    first = json.loads((tmp_path / "run" / "art" / "model_card.json").read_text())
    assert len(first["metrics"]["test_evaluations"]) == 1
    capsys.readouterr()
    assert train.main(flags) == 0  # the finished run is exported again, with --test: not scored again
    assert "scored on test already" in capsys.readouterr().out
    card = json.loads((tmp_path / "run" / "art" / "model_card.json").read_text())
    log = card["metrics"]["test_evaluations"]
    assert log == first["metrics"]["test_evaluations"] and card["metrics"]["test"] == first["metrics"]["test"]
    # Exported elsewhere (no card there to carry the log from): the run's state carries figure and entry.
    assert train.main(flags[:3] + [str(tmp_path / "elsewhere")] + flags[4:]) == 0
    moved = json.loads((tmp_path / "elsewhere" / "model_card.json").read_text())
    assert moved["metrics"]["test"] == first["metrics"]["test"] and moved["metrics"]["test_evaluations"] == log
    assert "calibration" in card["metrics"]  # the temperature was fitted on validation at export
    assert card["metrics"]["calibration"]["temperature_scaling"]["fitted_on"].startswith("validation")
    assert card["training"]["hardware"]["export_and_test"]["cpu_cores"] and card["provenance"]["code"] is not None
    assert all(d["device"].startswith("CPU") for d in card["training"]["hardware"]["fine_tuning"])
