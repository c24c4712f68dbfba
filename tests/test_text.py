"""The text contract: cleaning, tokenising, vocabulary, truncation, and the vocabulary file."""

from __future__ import annotations

import json

import pytest

from sentiment.text import PAD_ID, UNK_ID, TextEncoder, TextPipelineError, TokenizerSettings, Vocabulary


def test_html_breaks_removed_and_lowercased() -> None:
    vocab = Vocabulary.build([["great"]], TokenizerSettings(), min_freq=1)
    enc = TextEncoder(vocab).encode("GREAT film.<br /><br />I didn't like it")
    assert enc.tokens == ["great", "film", ".", "i", "did", "n't", "like", "it"]
    assert enc.ids[0] == vocab.stoi["great"] and enc.ids[1] == UNK_ID


def test_vocabulary_special_ids_and_frequency_order() -> None:
    vocab = Vocabulary.build([["b", "a", "a", "c", "c", "c"]], TokenizerSettings(), min_freq=2)
    assert vocab.itos == ["<pad>", "<unk>", "c", "a"]
    assert vocab.stoi["<pad>"] == PAD_ID and vocab.stoi["<unk>"] == UNK_ID
    capped = Vocabulary.build([["b", "a", "a", "c", "c", "c"]], TokenizerSettings(), min_freq=1, max_size=3)
    assert capped.itos == ["<pad>", "<unk>", "c"]


def test_truncation_keeps_the_end_by_default() -> None:
    vocab = Vocabulary.build([list("abcdef")], TokenizerSettings(max_tokens=3), min_freq=1)
    enc = vocab.encode_tokens(list("abcdef"))
    assert enc.tokens == ["d", "e", "f"] and enc.truncated and enc.total_tokens == 6
    # A serving limit may tighten, never loosen, the trained limit.
    assert vocab.encode_tokens(list("abcdef"), max_tokens=2).tokens == ["e", "f"]
    assert vocab.encode_tokens(list("abcdef"), max_tokens=10).tokens == ["d", "e", "f"]
    start = Vocabulary(vocab.itos, TokenizerSettings(max_tokens=3, truncation="keep_start"))
    assert start.encode_tokens(list("abcdef")).tokens == ["a", "b", "c"]


def test_vocabulary_round_trip_keeps_settings(tmp_path) -> None:
    settings = TokenizerSettings(max_tokens=17, lowercase=False)
    vocab = Vocabulary.build([["x", "y", "y"]], settings, min_freq=1)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.itos == vocab.itos and loaded.settings == settings
    assert TextEncoder(loaded).encode("Y y").tokens == ["Y", "y"]  # lowercase=False honoured


@pytest.mark.parametrize("content", ["not json", json.dumps({"format": 99, "itos": []}),
                                     json.dumps({"format": 1, "itos": ["<pad>", "<unk>"]}),
                                     json.dumps({"format": 1, "tokenizer": {}, "itos": ["a", "b"]})])
def test_bad_vocabulary_files_are_refused(tmp_path, content) -> None:
    (tmp_path / "vocab.json").write_text(content)
    with pytest.raises(TextPipelineError):
        Vocabulary.load(tmp_path / "vocab.json")


def test_missing_vocabulary_file(tmp_path) -> None:
    with pytest.raises(TextPipelineError, match="not found"):
        Vocabulary.load(tmp_path / "nope.json")


def test_empty_text_gets_one_unk() -> None:
    vocab = Vocabulary.build([["a"]], TokenizerSettings(), min_freq=1)
    enc = TextEncoder(vocab).encode("<br />")
    assert enc.total_tokens == 0 and enc.ids == [UNK_ID]
