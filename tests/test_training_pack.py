"""Training from a pack (ids, split and vocabulary in one file) and from another run's language model.

This is how the long phases run on a machine without the archive or spaCy (a rented GPU): the pack
must give exactly the ids the archive gives, and --init-from must start from exactly the weights the
other run's language model ended with.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import write_fake_imdb
from tests.test_training import tiny_run_flags
from training import pack, train
from training.data import encode_corpus, load_pack, load_tokenized
from sentiment.text import TokenizerSettings, Vocabulary


def _swap(flags: list[str], name: str, value: str) -> list[str]:
    i = flags.index(name)
    return flags[:i + 1] + [value] + flags[i + 2:]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packrun")
    data = write_fake_imdb(tmp)
    flags = tiny_run_flags(data, tmp, "a")
    assert train.main(flags + ["--no-test"]) == 0
    out = tmp / "corpus.xz"
    assert pack.main(["--state-dir", str(tmp / "a" / "state"), "--data", str(data), "--cache-dir", str(tmp / "cache"),
                      "--workers", "1", "--out", str(out)]) == 0
    return tmp, data, out


def test_pack_holds_the_archive_ids_split_and_vocabulary(finished_run) -> None:
    tmp, data, out = finished_run
    encoded, split, vocab = load_pack(out)
    state = tmp / "a" / "state"
    assert vocab.itos == Vocabulary.load(state / "vocab.json").itos
    assert split.summary() == json.loads((state / "run.json").read_text())["split"]
    corpus = load_tokenized(data, TokenizerSettings(max_tokens=400), tmp / "cache", 1)
    direct = encode_corpus(corpus, vocab)
    assert [x.tolist() for x in encoded.train] == [x.tolist() for x in direct.train]
    assert [x.tolist() for x in encoded.unsup] == [x.tolist() for x in direct.unsup]
    assert encoded.labels == direct.labels and encoded.keys == direct.keys and encoded.n_test == 24
    # Truncation on ids is the vocabulary's truncation on tokens.
    short = Vocabulary(vocab.itos, TokenizerSettings(max_tokens=5))
    assert encoded.truncated(range(len(encoded.train)), short) == [
        short.encode_tokens(t).ids for t in corpus.tokens["train"]]


def test_a_run_from_the_pack_equals_a_run_from_the_archive(finished_run) -> None:
    tmp, data, out = finished_run
    base = tiny_run_flags(data, tmp, "b") + ["--init-from", str(tmp / "a" / "state"), "--stop-after-steps", "5"]
    from_pack = tiny_run_flags(data, tmp, "c") + ["--init-from", str(tmp / "a" / "state"), "--stop-after-steps", "5",
                                                  "--pack", str(out)]
    assert train.main(base) == 0 and train.main(from_pack) == 0
    b = torch.load(tmp / "b" / "state" / "lm.pt", weights_only=False)
    c = torch.load(tmp / "c" / "state" / "lm.pt", weights_only=False)
    same = ("epoch", "batch", "step", "loss_sum", "tokens")
    assert [b["position"][k] for k in same] == [c["position"][k] for k in same] and b["position"]["step"] == 5
    for k in b["weights"]:
        assert torch.equal(b["weights"][k], c["weights"][k]), k


def test_init_from_starts_where_the_other_language_model_ended(finished_run) -> None:
    tmp, data, out = finished_run
    flags = tiny_run_flags(data, tmp, "d") + ["--init-from", str(tmp / "a" / "state"), "--pack", str(out)]
    flags = _swap(flags, "--lm-epochs", "1")
    assert train.main(flags) == 0  # the whole run from the pack: LM, fine-tuning, export; no test reviews
    first = json.loads((tmp / "a" / "state" / "run.json").read_text())["phases"]["lm"]["history"][-1]
    second = json.loads((tmp / "d" / "state" / "run.json").read_text())
    assert second["phases"]["lm"]["history"][0]["held_out_perplexity"] == first["held_out_perplexity"]
    assert second["recipe"]["init_from"] == str(tmp / "a" / "state")
    assert "test" not in json.loads((tmp / "d" / "art" / "model_card.json").read_text())["metrics"]
    # Back where the archive is, the same command without --pack exports the finished run and tests it.
    assert train.main([f for f in flags if f not in ("--pack", str(out))]) == 0
    card = json.loads((tmp / "d" / "art" / "model_card.json").read_text())
    assert card["metrics"]["test"]["n"] == 24 and card["training"]["gpu_minutes"] == 0
    origin = card["training"]["initialised_from"]  # the cost and LM history of the run it started from
    assert origin["state_dir"] == str(tmp / "a" / "state") and origin["cpu_hours"] >= 0
    assert [e["epoch"] for e in origin["language_model_history"]] == [0, 1, 2]


def test_pack_refuses_another_runs_vocabulary(finished_run) -> None:
    tmp, data, out = finished_run
    state = tmp / "e" / "state"
    state.mkdir(parents=True)
    Vocabulary(["<pad>", "<unk>", "other"]).save(state / "vocab.json")
    with pytest.raises(SystemExit, match="another vocabulary"):
        train.main(tiny_run_flags(data, tmp, "e") + ["--pack", str(out), "--init-from", str(tmp / "a" / "state")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_tiny_run_on_cuda_exports_a_cpu_model(finished_run) -> None:
    tmp, data, out = finished_run
    flags = tiny_run_flags(data, tmp, "g") + ["--init-from", str(tmp / "a" / "state"), "--pack", str(out),
                                              "--device", "cuda", "--precision", "bf16"]
    assert train.main(_swap(flags, "--precision", "bf16")) == 0
    card = json.loads((tmp / "g" / "art" / "model_card.json").read_text())
    assert card["training"]["sessions"][-1]["device"] == "cuda"


def test_a_pack_holds_ids_of_a_vocabulary_larger_than_uint16(tmp_path) -> None:
    import numpy as np

    from training.data import EncodedCorpus, Split, save_pack

    vocab = Vocabulary(["<pad>", "<unk>"] + [f"w{i}" for i in range(87_000)], TokenizerSettings())
    ids = [np.array([2, 65_535, 65_536, 87_001], dtype=np.int32), np.array([70_000], dtype=np.int32)]
    encoded = EncodedCorpus("0" * 64, ids, [1, 0], ["train/pos/1_9.txt", "train/neg/2_1.txt"], [ids[0][::-1]], 0)
    path = save_pack(tmp_path / "big.xz", encoded, Split("movie", 13, [0], [1]), vocab)
    back, _, vocab_back = load_pack(path)
    assert [a.tolist() for a in back.train] == [a.tolist() for a in ids]
    assert back.unsup[0].tolist() == ids[0][::-1].tolist() and len(vocab_back) == len(vocab)
