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


# ---- cutting before tokenising, memory ---------------------------------------------------------

import functools  # noqa: E402

from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

from sentiment.text import Tokenizer, clean, cut_words  # noqa: E402

_PIECES = st.sampled_from(["good", "film", "<br />", "<br<br />/>", "don't", "!!!", "(", ")", "U.S.", "e.g.",
                           "http://x.y/z?a=1", ":-)", "\n", "\t", "  ", "\u00a0", "\u2028", "\x1c", "\u202e",
                           "👍🏽", "e\u0301", "\x00", "—", "'s", "...", "$5", "10:30"])
_TEXTS = st.one_of(st.lists(_PIECES, max_size=60).map(" ".join), st.lists(_PIECES, max_size=60).map("".join),
                   st.text(max_size=300).filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)))


@functools.lru_cache(maxsize=None)
def _encoder(limit: int, keep_end: bool) -> TextEncoder:
    settings = TokenizerSettings(max_tokens=limit, truncation="keep_end" if keep_end else "keep_start")
    return TextEncoder(Vocabulary(["<pad>", "<unk>", "good"], settings))


@given(text=_TEXTS, limit=st.integers(1, 12), keep_end=st.booleans())
@hsettings(max_examples=300, deadline=None)
def test_cutting_before_tokenising_keeps_exactly_the_same_tokens(text: str, limit: int, keep_end: bool) -> None:
    encoder = _encoder(limit, keep_end)
    vocab, settings = encoder.vocab, encoder.vocab.settings
    whole = encoder.tokenizer.tokenize(text)
    expected, truncated = vocab.truncate(whole)
    enc = encoder.encode(text)
    assert enc.tokens == expected and enc.truncated == truncated
    assert enc.total_tokens <= len(whole) and (enc.total_tokens == len(whole) or truncated)
    cleaned = clean(text, settings)
    cut, dropped = cut_words(cleaned, limit, keep_end)
    assert dropped == max(0, len(cleaned.split()) - limit)


def test_a_flood_of_new_words_does_not_grow_the_string_store() -> None:
    import random
    import string

    tokenizer = Tokenizer(TokenizerSettings())
    strings = tokenizer._nlp.vocab.strings
    rng = random.Random(0)

    def flood() -> None:
        words = ["".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(2000)]
        tokenizer.tokenize_many([" ".join(words[i : i + 100]) for i in range(0, 2000, 100)])

    flood()
    before = len(strings)
    for _ in range(3):
        flood()
    assert len(strings) <= before + 10  # 6,000 never-seen words later
    assert tokenizer.tokenize("Zyzzyva qwertyuiop!") == ["zyzzyva", "qwertyuiop", "!"]  # tokens unchanged


TRICKY = ["I don't think it's \"great\"... (8/10)", "Can't, won't, cannot; gonna see it AGAIN!!!",
          "U.S. release: e-mail me at x@y.com :) http://imdb.com/title/tt0111161/", "Ms. Smith's 2nd film -- meh.",
          "ROFL!!! 10/10, A+ ... 'nuff said", "naïve café-owner's déjà vu; “smart” quotes — dashes", "It's... it's  OK?",
          "read - ' ''And then", "film. Of course :) :-) ;) x' ''y O.O (: :(", "a.m. 10a.m. b'' ''c '' ''"]


def test_memoised_words_change_no_token() -> None:
    """Words looked up in the memo tokenise exactly as spaCy over the whole text (every case,
    contraction, URL, emoticon and quote run above, repeated so that they are memoised)."""
    plain = Tokenizer(TokenizerSettings(), keep_recent_words=False)
    cached = Tokenizer(TokenizerSettings())
    expected = [cached.tokenize_whole(t) for t in TRICKY]
    assert plain.tokenize_many(TRICKY) == expected
    for _ in range(3):
        assert cached.tokenize_many(TRICKY) == expected
    assert {"don't", "(8/10)", "AGAIN!!!", "x@y.com", "déjà"} <= set(cached.cached_words)
    assert not plain.cached_words


def test_neighbouring_words_that_spacy_tokenises_together_stay_together() -> None:
    """spaCy matches some special cases (``''``, emoticons) over the whole text: ``''And`` alone is
    ``''`` ``and``, but after a lone ``'`` it is ``'`` ``'`` ``and``. Random joins of such fragments,
    memoised or not, tokenise as the whole text does."""
    import random

    fragments = ["'", "''", "''And", "x'", "'s", ":", ")", ":)", "(", "-", ".", "O", "O.O", "D", "film.", "Of",
                 "a.m.", "b''", "''c", "8", ":-", "o", "*", "^_^", "'em", "don't", "!", "...", "''''"]
    rng = random.Random(7)
    cached = Tokenizer(TokenizerSettings())
    for _ in range(300):
        separator = rng.choice([" ", " ", " ", "  ", "\n"])
        text = separator.join(rng.choices(fragments, k=rng.randint(1, 8)))
        assert cached.tokenize(text) == cached.tokenize_whole(text), text


def test_the_memo_is_bounded() -> None:
    import random
    import string

    tokenizer = Tokenizer(TokenizerSettings())
    tokenizer.CACHE_WORDS = 50
    tokenizer.cache_words(["good", "film"])  # kept through every reset
    rng = random.Random(1)
    for _ in range(40):
        words = ["".join(rng.choices(string.ascii_lowercase, k=8)) for _ in range(40)]
        assert tokenizer.tokenize_many([" ".join(words), "good film"])[1] == ["good", "film"]
        assert len(tokenizer.cached_words) <= 50
        assert {"good", "film"} <= set(tokenizer.cached_words)


def test_memoised_words_change_no_token_on_real_reviews() -> None:
    """A sample of IMDB train and test reviews (``benchmarks/tokenizer_cache.py`` checks all of them)."""
    from tests.conftest import REPO

    archive = REPO.parent / "shared" / "data" / "aclImdb_v1.tar.gz"
    if not archive.is_file():
        pytest.skip("the IMDB archive is not here")
    from sentiment.imdb import read_imdb

    data = read_imdb(archive, ("train", "test"))
    texts = [r.text for r in data["train"][::250] + data["test"][::250]]  # 200 reviews
    cached = Tokenizer(TokenizerSettings())
    expected = [cached.tokenize_whole(t) for t in texts]
    assert [cached.tokenize_many(texts[i:i + 10]) for i in range(0, 200, 10)] == [
        expected[i:i + 10] for i in range(0, 200, 10)]  # memoises as it goes
    assert len(cached.cached_words) > 1000
    assert cached.tokenize_many(texts) == expected  # now mostly from the memo
