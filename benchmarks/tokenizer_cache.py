"""Check that keeping frequent words in spaCy's cache changes no token, on every IMDB review, and time it.

    python -m benchmarks.tokenizer_cache --data ../shared/data/aclImdb_v1.tar.gz

Tokenises all 50,000 train and test reviews (cut to the 400 words truncation can keep, as the
engine does) twice, in batches of 64 as the service does: with a tokenizer that never keeps words
(``keep_frequent_words=False``: every batch starts from an empty cache, as before) and with the
service's tokenizer (frequent words kept). Every token list must be equal. Prints ms/review for both
(the second tokenizer timed on a second pass, once warm) and writes ``tokenizer_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sentiment.text import Tokenizer, TokenizerSettings, clean, cut_words

REPO = Path(__file__).resolve().parent.parent


def tokenize_all(tokenizer: Tokenizer, texts: list[str]) -> tuple[list[list[str]], float]:
    started = time.perf_counter()
    out: list[list[str]] = []
    for i in range(0, len(texts), 64):
        out += tokenizer.tokenize_many(texts[i:i + 64], already_clean=True)
    return out, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where tokenizer_cache.json goes")
    args = p.parse_args(argv)
    from sentiment.imdb import read_imdb

    settings = TokenizerSettings()
    data = read_imdb(args.data, ("train", "test"))
    texts = [cut_words(clean(r.text, settings), settings.max_tokens)[0] for split in ("train", "test") for r in data[split]]
    plain, plain_s = tokenize_all(Tokenizer(settings, keep_frequent_words=False), texts)
    cached_tokenizer = Tokenizer(settings)
    cached, first_s = tokenize_all(cached_tokenizer, texts)
    again, warm_s = tokenize_all(cached_tokenizer, texts)
    differ = [i for i, (a, b, c) in enumerate(zip(plain, cached, again)) if not (a == b == c)]
    result = {
        "reviews": len(texts), "tokens": sum(map(len, plain)), "differing_reviews": len(differ),
        "ms_per_review_without_cache": 1000 * plain_s / len(texts),
        "ms_per_review_first_pass": 1000 * first_s / len(texts),
        "ms_per_review_warm": 1000 * warm_s / len(texts),
        "cached_words": len(cached_tokenizer.cached_words),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps(result, indent=2))
    print(f"{'PASS' if not differ else 'FAIL'}  identical tokens for all {len(texts)} reviews; "
          f"{result['ms_per_review_without_cache']:.3f} → {result['ms_per_review_warm']:.3f} ms/review "
          f"({plain_s / warm_s:.2f}× faster)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer_cache.json").write_text(json.dumps(result, indent=2))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
