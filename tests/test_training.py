"""The data reader and the training CLI end to end, on a tiny corpus the test writes itself."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

from tests.conftest import write_fake_imdb
from training import evaluate, train
from sentiment.artifacts import ArtifactError, load_artifacts
from sentiment.imdb import DatasetError, read_imdb
from sentiment.model import ModelConfig, SentimentLSTM, pad_batch
from sentiment.text import TextEncoder


@pytest.mark.parametrize("as_archive", [True, False])
def test_reads_archive_and_folder(tmp_path, as_archive) -> None:
    source = write_fake_imdb(tmp_path, n_per_class=5, as_archive=as_archive)
    data = read_imdb(source, ("train", "test"), unsup=True)
    assert len(data["test"]) == 10 and len(data["train"]) == 14  # 10 labelled + 4 unsup
    assert {r.label for r in data["train"]} == {-1, 0, 1}
    assert sum(r.label == 1 for r in data["test"]) == 5
    assert all("<br" in r.text or r.key for r in data["train"])
    assert read_imdb(source, ("test",))["test"][0].key.startswith("test/")


def test_missing_corrupt_and_empty_sources_fail_clearly(tmp_path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        read_imdb(tmp_path / "absent.tar.gz")
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08 this is not a gzip stream at all")
    with pytest.raises(DatasetError, match="cannot read archive"):
        read_imdb(corrupt)
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(DatasetError, match="no labelled reviews"):
        read_imdb(empty)


def tiny_run_flags(data, tmp_path, name: str = "run") -> list[str]:
    """CLI flags for a seconds-long run of every stage on the fake corpus (all outputs under tmp_path)."""
    return ["--data", str(data), "--out", str(tmp_path / name / "art"), "--cache-dir", str(tmp_path / "cache"),
            "--state-dir", str(tmp_path / name / "state"), "--checkpoint-dir", str(tmp_path / name / "ckpt"),
            "--embedding-dim", "8", "--hidden-size", "8", "--min-freq", "1", "--w2v-epochs", "1", "--workers", "1",
            "--val-fraction", "0.25", "--lm-epochs", "2", "--lm-bptt", "8", "--lm-rows", "4",
            "--lm-warmup-steps", "2", "--probe-reviews", "10", "--epochs", "2", "--batch-size", "4",
            "--precision", "fp32", "--adv-eps", "5.0",  # the adversarial step is exercised too
            "--test"]  # the test stage runs (tests that need no test figure pass --no-test after it)


def test_train_export_load_and_evaluate_end_to_end(tmp_path, capsys) -> None:
    data = write_fake_imdb(tmp_path)
    flags = tiny_run_flags(data, tmp_path)
    out = tmp_path / "run" / "art"
    assert train.main(flags) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["metrics"]["test"]["n"] == 24 and 0 <= card["metrics"]["test"]["accuracy"] <= 1
    assert card["architecture"]["config"]["hidden_size"] == 8 and card["data"]["archive_sha256"]
    assert card["data"]["split"]["kind"] == "movie" and card["metrics"]["validation"]["split"] == "movie"
    lm = card["training"]["language_model_pretraining"]
    assert [e["epoch"] for e in lm["history"]] == [0, 1, 2]  # epoch 0: word vectors only
    assert all(e["held_out_perplexity"] > 1 for e in lm["history"])
    assert [e["epoch"] for e in card["training"]["fine_tuning"]["history"]] == [1, 2]
    assert (tmp_path / "run" / "state" / "lm.pt").is_file() and (tmp_path / "run" / "state" / "run.json").is_file()

    # TorchScript loaded with torch.jit.load alone gives the eager model's predictions.
    art = load_artifacts(out, "cpu")
    scripted = torch.jit.load(str(out / "model.pt"))
    eager = SentimentLSTM(ModelConfig(**card["architecture"]["config"]))
    eager.load_state_dict(scripted.state_dict())
    eager.eval()
    enc = TextEncoder(art.vocab).encode_many(["a great film", "an awful boring film , bad"])
    ids, lengths = pad_batch([e.ids for e in enc])
    with torch.no_grad():
        assert torch.allclose(eager(ids, lengths)[0], scripted(ids, lengths)[0], atol=1e-6)

    capsys.readouterr()
    assert evaluate.main(["--artifacts", str(out), "--data", str(data), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == card["metrics"]["test"]  # the CLI reproduces the figure in the model card


def test_every_training_flag_has_help() -> None:
    for parser in (train.build_parser(),):
        for action in parser._actions:
            assert action.help, f"{action.option_strings} has no help"


def test_mismatched_or_corrupt_artifacts_are_refused(tiny_artifacts, tmp_path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifacts, broken)
    (broken / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifacts(broken)
    shutil.copytree(tiny_artifacts, tmp_path / "missing")
    (tmp_path / "missing" / "vocab.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifacts(tmp_path / "missing")


def test_language_model_learns_a_fixed_word_order(tmp_path) -> None:
    import numpy as np

    from training.pretrain import LMConfig, pretrain_language_model
    from training.state import RunState, TimeBox

    torch.manual_seed(0)
    model = SentimentLSTM(ModelConfig(vocab_size=12, embedding_dim=8, hidden_size=16))
    texts = [np.arange(2, 12, dtype=np.int32)[: 4 + i % 7] for i in range(64)]  # one fixed word order
    cfg = LMConfig(epochs=12, bptt=10, rows=4, lr=1e-2, warmup_steps=2, dropout=0.0, eval_tokens=500, log_every=0)
    report = pretrain_language_model(model, texts, texts[:8], cfg, 0, RunState(tmp_path / "s", tmp_path / "c"),
                                     TimeBox(), log=lambda _: None)
    ppl = [e["held_out_perplexity"] for e in report["history"]]
    assert len(ppl) == 13 and ppl[-1] < 2.5 < ppl[0]  # the order is deterministic, so the model should learn it
