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


def test_train_export_load_and_evaluate_end_to_end(tmp_path, capsys) -> None:
    data = write_fake_imdb(tmp_path)
    out, ckpt = tmp_path / "art", tmp_path / "ckpt"
    base = ["--data", str(data), "--out", str(out),
            "--checkpoint-dir", str(ckpt), "--batch-size", "4", "--embedding-dim", "8", "--hidden-size", "8",
            "--min-freq", "1", "--w2v-epochs", "1", "--workers", "1", "--val-fraction", "0.25", "--patience", "5"]
    assert train.main(base + ["--epochs", "2"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["metrics"]["test"]["n"] == 24 and 0 <= card["metrics"]["test"]["accuracy"] <= 1
    assert card["architecture"]["config"]["hidden_size"] == 8 and card["data"]["archive_sha256"]
    assert (ckpt / "last.pt").is_file()
    lm = card["training"]["language_model_pretraining"]
    assert [e["epoch"] for e in lm["epochs"]] == [1] and lm["epochs"][0]["perplexity"] > 1

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

    # Resume: asking for one more epoch continues from the checkpoint instead of starting over.
    assert train.main(base + ["--epochs", "3", "--resume"]) == 0
    assert "resumed after epoch 2" in capsys.readouterr().out
    card = json.loads((out / "model_card.json").read_text())
    assert card["training"]["epochs_run"] == 3

    assert evaluate.main(["--artifacts", str(out), "--data", str(data),
                          "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == card["metrics"]["test"]  # the CLI reproduces the figure in the model card


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


def test_language_model_pretraining_learns_and_resumes_from_its_cache(tmp_path) -> None:
    from training.pretrain import pretrain_language_model

    torch.manual_seed(0)
    model = SentimentLSTM(ModelConfig(vocab_size=12, embedding_dim=8, hidden_size=16))
    texts = [[2, 3, 4, 5, 6, 7, 8, 9, 10, 11][: 4 + i % 7] for i in range(64)]  # one fixed word order
    cache = tmp_path / "lm.pt"
    first = pretrain_language_model(model, texts, 1, seed=0, device=torch.device("cpu"), cache_path=cache,
                                    batch_size=8, lr=1e-2, dropout=0.0)
    later = pretrain_language_model(model, texts, 15, seed=0, device=torch.device("cpu"), cache_path=cache,
                                    batch_size=8, lr=1e-2, dropout=0.0)
    ppl = [e["perplexity"] for e in later["epochs"]]
    assert len(ppl) == 15 and ppl[0] == first["epochs"][0]["perplexity"]  # epoch 1 came from the cache
    assert ppl[-1] < 2.0 < ppl[0]  # the sequence is deterministic, so the model should learn it
