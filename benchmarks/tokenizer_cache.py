"""Check that the memoised tokenizer gives spaCy's tokens for every IMDB review, and time it.

    python -m benchmarks.tokenizer_cache --data ../shared/data/aclImdb_v1.tar.gz

Tokenises all 50,000 train and test reviews (cut to the 400 words truncation can keep, as the
engine does), in batches of 64 as the service does, two ways: spaCy over each whole text
(:meth:`Tokenizer.tokenize_whole`, the definition of the tokens, with the vocabulary's words in
spaCy's own cache as the service had them before) and the service's memoised
:meth:`Tokenizer.tokenize_many` (vocabulary cached at warm-up, recent words memoised). Every token
list must be equal. Prints ms/review for both, each timed on a second, warm pass, and writes
``tokenizer_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from sentiment.text import Tokenizer, TokenizerSettings, Vocabulary, clean, cut_words

REPO = Path(__file__).resolve().parent.parent


def timed(tokenize: Callable[[list[str]], list[list[str]]], texts: list[str]) -> tuple[list[list[str]], float]:
    started = time.perf_counter()
    out: list[list[str]] = []
    for i in range(0, len(texts), 64):
        out += tokenize(texts[i:i + 64])
    return out, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--vocab", default=str(REPO / "model_artifacts" / "vocab.json"), help="the vocabulary cached at warm-up")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where tokenizer_cache.json goes")
    args = p.parse_args(argv)
    from sentiment.imdb import read_imdb

    settings = TokenizerSettings()
    words = Vocabulary.load(args.vocab).itos[2:]
    data = read_imdb(args.data, ("train", "test"))
    texts = [cut_words(clean(r.text, settings), settings.max_tokens)[0] for split in ("train", "test") for r in data[split]]

    reference = Tokenizer(settings, keep_recent_words=False)
    for i in range(0, len(words), 1_000):  # outside any memory zone: spaCy keeps them in its cache
        for _ in reference._nlp.tokenizer.pipe([" ".join(words[i:i + 1_000])]):
            pass
    memoised = Tokenizer(settings)
    memoised.cache_words(words)

    def whole(batch: list[str]) -> list[list[str]]:
        return [reference.tokenize_whole(t, already_clean=True) for t in batch]

    def memo(batch: list[str]) -> list[list[str]]:
        return memoised.tokenize_many(batch, already_clean=True)

    expected, _ = timed(whole, texts)
    got, _ = timed(memo, texts)
    _, whole_s = timed(whole, texts)  # second passes, warm, alternating
    again, memo_s = timed(memo, texts)
    differ = [i for i, (a, b, c) in enumerate(zip(expected, got, again)) if not (a == b == c)]
    result = {
        "reviews": len(texts), "tokens": sum(map(len, expected)), "differing_reviews": len(differ),
        "ms_per_review_spacy_whole_text": 1000 * whole_s / len(texts),
        "ms_per_review_memoised": 1000 * memo_s / len(texts),
        "speedup": whole_s / memo_s, "memoised_words": len(memoised.cached_words),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps(result, indent=2))
    print(f"{'PASS' if not differ else 'FAIL'}  identical tokens for all {len(texts)} reviews; "
          f"{result['ms_per_review_spacy_whole_text']:.3f} → {result['ms_per_review_memoised']:.3f} ms/review "
          f"({result['speedup']:.2f}× faster)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
