"""Pack a run's training data as vocabulary ids, for a machine without the archive or spaCy.

    python -m training.pack --state-dir training_state --out .pack/corpus.xz

Writes the labelled train/ reviews and unsup (ids, full length), their labels and keys, the run's
split and its vocabulary into one xz file (~21 MB for IMDB). ``training.train --pack FILE`` then runs
the language-model and fine-tuning phases from it, e.g. on a rented GPU; exporting and the test
evaluation happen back where the archive is (the same command without ``--pack``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from sentiment.text import TokenizerSettings, Vocabulary
from training.data import encode_corpus, load_tokenized, make_split, save_pack


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", default="training_state", help="the run whose vocabulary and split to pack")
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or extracted folder")
    p.add_argument("--cache-dir", default=".cache", help="tokenised corpus cache (as training.train)")
    p.add_argument("--workers", type=int, default=2, help="tokenisation processes (first run only)")
    p.add_argument("--out", default=".pack/corpus.xz", help="pack file to write")
    args = p.parse_args(argv)
    state = Path(args.state_dir)
    run = json.loads((state / "run.json").read_text(encoding="utf-8"))
    recipe = run["recipe"]
    vocab = Vocabulary.load(state / "vocab.json")
    t0 = time.time()
    corpus = load_tokenized(args.data, TokenizerSettings(max_tokens=recipe["max_tokens"]), args.cache_dir, args.workers)
    split = make_split(recipe["split"], args.data, corpus.keys["train"], recipe["val_fraction"], recipe["seed"])
    if split.summary() != run.get("split", split.summary()):
        raise SystemExit(f"the split made from {args.data} differs from the one {state} records")
    path = save_pack(args.out, encode_corpus(corpus, vocab), split, vocab)
    print(f"packed {len(corpus.tokens['train'])} + {len(corpus.tokens['unsup'])} reviews ({split.kind} split, "
          f"{len(vocab)} words) into {path}: {path.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
