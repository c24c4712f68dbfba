"""Train the sentiment LSTM on IMDB in named, resumable stages and export it to an artifacts directory.

    python -m training.train --data ../shared/data/aclImdb_v1.tar.gz --stop-after-minutes 60

Stages, in order (each a function below, its inputs and outputs in its signature):

    data → split → vocabulary → word vectors → language model → fine-tuning → export → test

- data: tokenise train, unsup and test once (cached under --cache-dir).
- split: hold out whole movies from train/ (no movie on both sides) as the validation split.
- vocabulary: from the training part only; saved in --state-dir.
- word vectors: word2vec on the training part + unsup initialises the embedding (cached).
- language model: next-token pre-training of embedding + LSTM on the training part + unsup (pretrain.py).
- fine-tuning: on the labelled training part, validated on the held-out movies (finetune.py).
- export: TorchScript + vocabulary + model card to --out (with --temperature-from-validation, the head's
  weight and bias are divided by the temperature fitted on the validation predictions, if it lowers
  the validation's calibration error).
- test: one evaluation on the 25,000 test reviews, written into the model card and appended to its log
  of test evaluations (metrics.test_evaluations). Every choice (recipe, epochs, which run) is made on
  the movie-grouped validation; test is scored once, for the one candidate you mean to ship: only
  with --test, and never twice for one run (the run's state records it; a re-export carries the
  figure and the log over).

The two long phases checkpoint into --state-dir (compact, committed to git) and --checkpoint-dir
(exact, local) every --checkpoint-every-minutes, and stop cleanly (exit code 0) when
--stop-after-minutes or --stop-after-steps runs out, or on SIGTERM/SIGINT. Running the same command
again continues where it stopped, mid-epoch; the recipe is read back from --state-dir/run.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sentiment.artifacts import cpu_has_bf16, cpu_model, export_artifacts, file_sha256, load_artifacts
from sentiment.model import ModelConfig, SentimentLSTM
from sentiment.text import TokenizerSettings, Vocabulary
from training.card import (INTENDED_USE, LIMITATIONS, OUT_OF_SCOPE, append_test_evaluation, baseline_result,
                           evaluation_entry, fold_validation_temperature, git_commit, phase_hardware, provenance,
                           read_card, same_model)
from training.data import (EncodedCorpus, Split, TokenizedCorpus, encode_corpus, load_pack, load_tokenized,
                           make_split)
from training.adversarial import id_frequencies
from training.evaluate import compute_metrics, predict_ids
from training.finetune import FineTuneConfig, fine_tune
from training.pretrain import LMConfig, lm_parts, pretrain_language_model, probe_accuracy
from training.state import RunState, TimeBox, TimeBoxReached, expand, model_device

# Flags that define the run: fixed when a run starts, read back from run.json when it continues.
RECIPE = ["split", "val_fraction", "seed", "max_train", "max_tokens", "vocab_size", "min_freq", "embedding_dim",
          "hidden_size", "layers", "dropout", "word_vectors", "w2v_epochs", "lm_epochs", "lm_bptt", "lm_rows",
          "lm_lr", "lm_warmup_steps", "lm_weight_decay", "lm_dropout", "lm_clip", "lm_eval_tokens", "probe_reviews",
          "epochs", "batch_size", "lr", "lr_group_decay", "gradual_unfreezing", "warmup_fraction", "ema_decay",
          "adv_eps", "adv_weight", "aux_weight", "clip", "weight_decay", "normalise_embeddings", "vat_eps",
          "vat_weight", "vat_xi", "distill_from", "distill_weight", "training_seed", "init_from"]
# Recipe flags a continuation may change: the planned length of a phase (its schedule stretches).
EXTENDABLE = {"lm_epochs", "epochs"}
# A phase's own flags stay open until the phase has started (so a copy of a run's state can try
# another fine-tuning recipe on the same pre-trained language model).
PHASE_FLAGS = {
    "lm": {"lm_bptt", "lm_rows", "lm_lr", "lm_warmup_steps", "lm_weight_decay", "lm_dropout", "lm_clip",
           "lm_eval_tokens", "probe_reviews"},
    "finetune": {"epochs", "batch_size", "lr", "lr_group_decay", "gradual_unfreezing", "warmup_fraction",
                 "ema_decay", "adv_eps", "adv_weight", "aux_weight", "clip", "weight_decay", "normalise_embeddings",
                 "vat_eps", "vat_weight", "vat_xi", "distill_from", "distill_weight"},
}


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag says what it does (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("paths")
    g.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or extracted folder")
    g.add_argument("--download", action="store_true", help="download the official archive to --data if missing")
    g.add_argument("--out", default="runs/candidate",
                   help="artifacts directory to write (copy to model_artifacts/ only if the model beats the shipped "
                   "one on the movie-grouped validation; then score test once, for that one candidate)")
    g.add_argument("--cache-dir", default=".cache", help="tokenised corpus and word-vector cache")
    g.add_argument("--state-dir", default="training_state", help="compact resumable state of this run (commit it)")
    g.add_argument("--checkpoint-dir", default="checkpoints", help="exact local checkpoints with optimizer state")
    g.add_argument("--pack", default=None,
                   help="read ids, split and vocabulary from a pack written by training.pack instead of --data "
                   "(for a machine without the archive or spaCy); export, and test elsewhere")
    g.add_argument("--init-from", default=None,
                   help="another run's --state-dir: start from its pre-trained language model (lm.pt, same "
                   "vocabulary) instead of word2vec, e.g. to pre-train longer or with other settings")

    g = p.add_argument_group("time box and machine")
    g.add_argument("--stop-after-minutes", type=float, default=None,
                   help="checkpoint and exit cleanly (code 0) after this many minutes of this process")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="checkpoint and exit after this many optimizer steps in this process (deterministic; tests)")
    g.add_argument("--checkpoint-every-minutes", type=float, default=10.0, help="checkpoint interval in long phases")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast for the long phases (auto: bf16 when the CPU has AVX-512 BF16/AMX); "
                   "weights stay and export fp32")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the long phases run (auto: CUDA when there is one); export is always CPU fp32")
    g.add_argument("--workers", type=int, default=2, help="tokenisation and word2vec processes")
    g.add_argument("--test", action=argparse.BooleanOptionalAction, default=False,
                   help="score the test split after export: only for the one candidate meant to ship, chosen on "
                   "validation (off by default; a run is scored at most once, recorded in its state)")
    g.add_argument("--temperature-from-validation", action=argparse.BooleanOptionalAction, default=True,
                   help="at export, fit a temperature on the validation predictions (NLL) and fold 1/T into the "
                   "head's weight and bias if it lowers the validation's expected calibration error")

    g = p.add_argument_group("split, vocabulary, model")
    g.add_argument("--split", choices=["movie", "random"], default="movie",
                   help="validation split: whole movies held out (default) or random reviews (leaks movies)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of train/ reviews held out for validation")
    g.add_argument("--seed", type=int, default=13, help="seed of the split, shuffles, initialisation and dropout")
    g.add_argument("--training-seed", type=int, default=None,
                   help="seed of initialisation, shuffles and dropout only (default: --seed): another seed of a "
                   "recipe on the same validation split, for a paired comparison")
    g.add_argument("--max-train", type=int, default=None, help="use only this many training reviews (smoke runs)")
    g.add_argument("--max-tokens", type=int, default=400, help="classifier truncation length (the end is kept)")
    g.add_argument("--vocab-size", type=int, default=25_000, help="vocabulary size including <pad> and <unk>")
    g.add_argument("--min-freq", type=int, default=3, help="minimum count of a word in the training part")
    g.add_argument("--embedding-dim", type=int, default=200, help="embedding size")
    g.add_argument("--hidden-size", type=int, default=512, help="LSTM hidden size")
    g.add_argument("--layers", type=int, default=1, help="LSTM layers")
    g.add_argument("--dropout", type=float, default=0.4, help="classifier dropout on embeddings and LSTM output")

    g = p.add_argument_group("word vectors and language model")
    g.add_argument("--word-vectors", choices=["word2vec", "none"], default="word2vec",
                   help="initialise embeddings with word2vec trained on the training part + unsup")
    g.add_argument("--w2v-epochs", type=int, default=5, help="word2vec epochs")
    g.add_argument("--lm-epochs", type=int, default=6, help="language-model epochs over train part + unsup (0: none)")
    g.add_argument("--lm-bptt", type=int, default=80, help="tokens per truncated-BPTT chunk (state carried across)")
    g.add_argument("--lm-rows", type=int, default=64, help="parallel token streams per language-model batch")
    g.add_argument("--lm-lr", type=float, default=3e-3, help="peak language-model learning rate (AdamW)")
    g.add_argument("--lm-warmup-steps", type=int, default=300, help="linear warm-up steps before cosine decay")
    g.add_argument("--lm-weight-decay", type=float, default=0.01, help="AdamW weight decay in pre-training")
    g.add_argument("--lm-dropout", type=float, default=0.1, help="dropout on embeddings and LSTM output in pre-training")
    g.add_argument("--lm-clip", type=float, default=0.5, help="gradient-norm clipping in pre-training")
    g.add_argument("--lm-eval-tokens", type=int, default=200_000,
                   help="held-out (validation-review) tokens for the per-epoch perplexity")
    g.add_argument("--probe-reviews", type=int, default=2000,
                   help="training reviews for the per-epoch logistic-regression probe (0: no probe)")

    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs (the schedule spans all of them)")
    g.add_argument("--batch-size", type=int, default=64, help="fine-tuning reviews per batch")
    g.add_argument("--lr", type=float, default=2e-3, help="peak fine-tuning learning rate of the head")
    g.add_argument("--lr-group-decay", type=float, default=2.6,
                   help="each layer group below the head gets the rate of the one above divided by this")
    g.add_argument("--gradual-unfreezing", action=argparse.BooleanOptionalAction, default=True,
                   help="epoch 1 trains the head, 2 adds the LSTM, 3 the embedding")
    g.add_argument("--warmup-fraction", type=float, default=0.06, help="share of fine-tuning steps spent warming up")
    g.add_argument("--ema-decay", type=float, default=0.998, help="decay of the exported weight average")
    g.add_argument("--adv-eps", type=float, default=0.0,
                   help="adversarial perturbation norm per review, in normalised-embedding units (0: off, the "
                   "default: on the grouped validation it made no difference, at twice the fine-tuning cost; "
                   "the shipped run used 5)")
    g.add_argument("--adv-weight", type=float, default=1.0, help="weight of the adversarial loss")
    g.add_argument("--normalise-embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="fine-tune on frequency-normalised embeddings (Miyato et al. 2017; folded into the LSTM at "
                   "the start and into the embedding at export, so the exported model is unchanged in form)")
    g.add_argument("--vat-eps", type=float, default=0.0,
                   help="virtual adversarial training: perturbation norm per review on the unlabelled reviews "
                   "(training part + unsup, never validation; 0: off; the paper uses 5 on normalised embeddings)")
    g.add_argument("--vat-weight", type=float, default=1.0, help="weight of the virtual adversarial loss")
    g.add_argument("--vat-xi", type=float, default=0.1, help="norm of VAT's random start for its power iteration")
    g.add_argument("--distill-from", nargs="+", default=None, metavar="ARTIFACTS",
                   help="teacher(s): exported artifact directories with this run's vocabulary; their mean "
                   "probability on every unlabelled review (training part + unsup) is computed once, kept in "
                   "--state-dir (teacher.npz), and the model learns it with --distill-weight")
    g.add_argument("--distill-weight", type=float, default=0.0, help="weight of the distillation loss (0: off)")
    g.add_argument("--aux-weight", type=float, default=0.2,
                   help="weight of the loss on every timestep (target replication); the rest is on the last step")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping in fine-tuning")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay in fine-tuning")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def given_flags(argv: Sequence[str] | None) -> set[str]:
    """The destinations of the options written on the command line (``--x v`` or ``--x=v``), so that
    a flag given with its default value still counts as given."""
    words = {w.split("=", 1)[0] for w in (sys.argv[1:] if argv is None else argv) if w.startswith("--")}
    return {a.dest for a in build_parser()._actions if words & set(a.option_strings)}


def training_seed(args: argparse.Namespace) -> int:
    """The seed of initialisation, shuffles and dropout: --training-seed, or --seed (which also draws
    the split) when it is not given."""
    return args.seed if args.training_seed is None else args.training_seed


def log(message: str) -> None:
    print(f"[{datetime.now(timezone.utc).strftime('%H:%M:%S')}] {message}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_device(args: argparse.Namespace) -> torch.device:
    """The device of the long phases: ``--device``, where auto means CUDA when there is one."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def use_bf16(args: argparse.Namespace) -> bool:
    """bf16 autocast for the long phases: asked for, or ``auto`` where it runs natively (CUDA with
    bf16, or a CPU with AVX-512 BF16/AMX)."""
    if args.precision != "auto":
        return args.precision == "bf16"
    if training_device(args).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def adopt_recipe(args: argparse.Namespace, state: RunState, given_on_command_line: set[str]) -> None:
    """Start a new run's recipe in run.json, or read a continuing run's recipe back into ``args``.

    A flag given on the command line that contradicts the stored recipe is an error (start a new run
    with another --state-dir instead), except the phase lengths in EXTENDABLE.
    """
    defaults = vars(parse_args([]))
    current = {k: getattr(args, k) for k in RECIPE}
    if not state.exists:
        state.info = {"format": 1, "recipe": current, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "sessions": []}
        return
    stored = state.info["recipe"]

    def open_to_change(k: str) -> bool:
        if k in EXTENDABLE:
            return True
        for phase, keys in PHASE_FLAGS.items():
            if k in keys:
                return not (state.dir / f"{phase}.pt").is_file()
        return False

    given = [k for k in RECIPE if k in given_on_command_line and current[k] != stored.get(k)]
    clashes = [f"--{k.replace('_', '-')} {current[k]} (run has {stored.get(k)})" for k in given if not open_to_change(k)]
    if clashes:
        raise SystemExit(f"{state.dir} holds a run with another recipe: " + "; ".join(clashes)
                         + ". Drop those flags to continue it, or pass a new --state-dir to start another run.")
    for k in given:
        log(f"recipe: {k} changed from {stored.get(k)} to {current[k]}"
            + (" (the phase's schedule is stretched)" if k in EXTENDABLE else " (its phase has not started)"))
        stored[k] = current[k]
    for k in RECIPE:
        setattr(args, k, stored.get(k, defaults[k]))


# ----------------------------------------------------------------------------------------------------
# Stages


def stage_data(args: argparse.Namespace) -> TokenizedCorpus:
    """aclImdb archive → tokens of every review (train, unsup, test), from the cache after the first time."""
    data_path = Path(args.data)
    if args.download and not data_path.exists():
        from sentiment.imdb import download_imdb

        download_imdb(data_path)
    t0 = time.time()
    corpus = load_tokenized(data_path, TokenizerSettings(max_tokens=args.max_tokens), args.cache_dir, args.workers)
    log(f"data: tokenised corpus ready in {time.time() - t0:.0f}s: "
        + ", ".join(f"{k}={len(v)}" for k, v in corpus.tokens.items()))
    return corpus


def stage_split(args: argparse.Namespace, corpus: TokenizedCorpus) -> Split:
    """Labelled train/ reviews → (training part, validation part), by movie unless --split random."""
    keys = corpus.keys["train"]
    split = make_split(args.split, args.data, keys, args.val_fraction, args.seed)
    if args.max_train:
        split = Split(split.kind, split.seed, split.train[: args.max_train], split.validation,
                      split.validation_movies, split.train_movies)
    log(f"split: {split.summary()}")
    return split


def stage_pack(args: argparse.Namespace, state: RunState) -> tuple[EncodedCorpus, Split, Vocabulary]:
    """--pack → (ids, split, vocabulary) in place of data → split → vocabulary, checked against the run."""
    t0 = time.time()
    encoded, split, vocab = load_pack(args.pack)
    if (split.kind, split.seed) != (args.split, args.seed):
        raise SystemExit(f"{args.pack} holds a {split.kind} split with seed {split.seed}; the run wants "
                         f"--split {args.split} --seed {args.seed}")
    path = state.dir / "vocab.json"
    if path.is_file() and Vocabulary.load(path).itos != vocab.itos:
        raise SystemExit(f"{args.pack} was packed with another vocabulary than {path}")
    if not path.is_file():
        state.dir.mkdir(parents=True, exist_ok=True)
        vocab.save(path)
    if args.max_train:
        split = Split(split.kind, split.seed, split.train[: args.max_train], split.validation,
                      split.validation_movies, split.train_movies)
    log(f"pack: {len(encoded.train)} labelled + {len(encoded.unsup)} unlabelled reviews in {time.time() - t0:.0f}s; "
        f"split: {split.summary()}")
    return encoded, split, vocab


def stage_vocabulary(args: argparse.Namespace, corpus: TokenizedCorpus, split: Split, state: RunState) -> Vocabulary:
    """Training-part tokens → vocabulary (validation words are as unseen as test words); kept in the state."""
    path = state.dir / "vocab.json"
    if path.is_file():
        return Vocabulary.load(path)
    vocab = Vocabulary.build((corpus.tokens["train"][i] for i in split.train),
                             TokenizerSettings(max_tokens=args.max_tokens), args.min_freq, args.vocab_size)
    state.dir.mkdir(parents=True, exist_ok=True)
    vocab.save(path)
    log(f"vocabulary: {len(vocab)} tokens")
    return vocab


def word2vec_matrix(vocab: Vocabulary, sentences: list[list[str]], dim: int, epochs: int, seed: int,
                    cache_dir: Path, workers: int) -> np.ndarray:
    """Skip-gram word2vec on ``sentences``, as a (len(vocab), dim) matrix with unit std; cached."""
    key = hashlib.sha256(f"{len(sentences)}|{dim}|{epochs}|{seed}|".encode() + "\n".join(vocab.itos).encode())
    path = cache_dir / f"w2v-{key.hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path)
    from gensim.models import Word2Vec

    t0 = time.time()
    w2v = Word2Vec(sentences, vector_size=dim, window=5, min_count=3, sg=1, negative=5,
                   epochs=epochs, workers=workers, seed=seed)
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0, 0.1, (len(vocab), dim)).astype(np.float32)
    matrix[0] = 0.0  # <pad>
    hits = 0
    for i, tok in enumerate(vocab.itos):
        if tok in w2v.wv:
            matrix[i] = w2v.wv[tok]
            hits += 1
    # word2vec norms are larger than an embedding layer's usual scale; normalise to unit std.
    matrix[2:] /= matrix[2:].std()
    log(f"word vectors: word2vec covers {hits}/{len(vocab)} words, {time.time() - t0:.0f}s")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, matrix)
    return matrix


def stage_word_vectors(args: argparse.Namespace, corpus: TokenizedCorpus | None, split: Split, vocab: Vocabulary,
                       state: RunState) -> tuple[SentimentLSTM, dict | None]:
    """Vocabulary → a fresh SentimentLSTM, its embedding from word2vec, or embedding + LSTM from
    --init-from's language model (then also returns that model's next-token head weights).

    Skipped once a later phase of this run has weights (they are loaded by that phase).
    """
    model = SentimentLSTM(ModelConfig(len(vocab), args.embedding_dim, args.hidden_size, args.layers, args.dropout))
    later = any((state.dir / f"{name}.pt").is_file() for name in ("lm", "finetune"))
    if later:
        return model, None
    if args.init_from:
        source = Path(args.init_from)
        if Vocabulary.load(source / "vocab.json").itos != vocab.itos:
            raise SystemExit(f"--init-from {source}: its vocabulary differs from this run's")
        embedding, lstm, lm_head = lm_parts(
            expand(torch.load(source / "lm.pt", map_location="cpu", weights_only=False)["weights"]))
        model.embedding.load_state_dict(embedding)
        model.lstm.load_state_dict(lstm)
        log(f"initial weights: embedding + LSTM from {source}/lm.pt")
        return model, lm_head
    if args.word_vectors == "word2vec":
        if corpus is None:
            raise SystemExit("word2vec needs the tokenised archive: with --pack, give --init-from or --word-vectors none")
        sentences = [corpus.tokens["train"][i] for i in split.train] + corpus.tokens["unsup"]
        matrix = word2vec_matrix(vocab, sentences, args.embedding_dim, args.w2v_epochs, args.seed,
                                 Path(args.cache_dir), args.workers)
        model.embedding.weight.data.copy_(torch.from_numpy(matrix))
    return model, None


def stage_language_model(args: argparse.Namespace, encoded: EncodedCorpus, split: Split, vocab: Vocabulary,
                         model: SentimentLSTM, state: RunState, timebox: TimeBox,
                         head_weights: dict | None = None) -> dict | None:
    """Model (word-vector init) → model with a pre-trained embedding + LSTM; returns the phase report.

    Trains on the full, untruncated text of the training part + unsup; validation reviews only give
    the held-out perplexity and the probe's accuracy.
    """
    if args.lm_epochs <= 0 or (state.dir / "finetune.pt").is_file():  # nothing to do, or already past it
        done = state.info.get("phases", {}).get("lm")
        return None if done is None else {"history": done["history"], "config": done.get("config"),
                                          "seconds": round(sum(h.get("seconds", 0) for h in done["history"]), 1)}
    texts = [x for x in [encoded.train[i] for i in split.train] + encoded.unsup if len(x)]
    held_out = [x for x in (encoded.train[i] for i in split.validation) if len(x)]
    probe = None
    if args.probe_reviews > 0:
        pick = random.Random(args.seed).sample(split.train, min(args.probe_reviews, len(split.train)))
        labels = encoded.labels
        p_train = (encoded.truncated(pick, vocab), [labels[i] for i in pick])
        p_val = (encoded.truncated(split.validation, vocab), [labels[i] for i in split.validation])

        def probe(m: SentimentLSTM) -> float:
            return probe_accuracy(m, p_train, p_val, use_bf16(args))

    cfg = LMConfig(epochs=args.lm_epochs, bptt=args.lm_bptt, rows=args.lm_rows, lr=args.lm_lr,
                   warmup_steps=args.lm_warmup_steps, weight_decay=args.lm_weight_decay, dropout=args.lm_dropout,
                   clip=args.lm_clip, bf16=use_bf16(args), eval_tokens=args.lm_eval_tokens)
    log(f"language model: {sum(len(t) + 1 for t in texts):,} tokens per epoch from {len(texts):,} reviews, "
        f"{len(held_out):,} held-out reviews; {'bf16' if cfg.bf16 else 'fp32'}")
    return pretrain_language_model(model, texts, held_out, cfg, training_seed(args), state, timebox, probe, log, head_weights)


def evaluate_split(model: SentimentLSTM, ids: list[list[int]], labels: list[int]) -> dict:
    """Metrics of an eager model on encoded reviews (fp32, eval mode)."""
    model.eval()
    return compute_metrics(predict_ids(model, ids, model_device(model)), labels)


def stage_fine_tune(args: argparse.Namespace, encoded: EncodedCorpus, split: Split, vocab: Vocabulary,
                    model: SentimentLSTM, state: RunState, timebox: TimeBox) -> tuple[dict, dict]:
    """Pre-trained model → sentiment classifier (weights averaged); returns (report, validation metrics).

    Also writes the validation predictions to --state-dir for paired comparisons (training.compare).
    """
    labels = encoded.labels
    train = (encoded.truncated(split.train, vocab), [labels[i] for i in split.train])
    val_ids = encoded.truncated(split.validation, vocab)
    val_labels = [labels[i] for i in split.validation]
    cfg = FineTuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, group_decay=args.lr_group_decay,
                         gradual_unfreezing=args.gradual_unfreezing, warmup_fraction=args.warmup_fraction,
                         ema_decay=args.ema_decay, adv_eps=args.adv_eps, adv_weight=args.adv_weight,
                         aux_weight=args.aux_weight, clip=args.clip, weight_decay=args.weight_decay,
                         normalise_embeddings=args.normalise_embeddings, vat_eps=args.vat_eps,
                         vat_weight=args.vat_weight, vat_xi=args.vat_xi, distill_weight=args.distill_weight,
                         bf16=use_bf16(args))
    pretraining_text = [encoded.train[i] for i in split.train] + encoded.unsup  # never validation reviews
    freqs = id_frequencies(pretraining_text, len(vocab)) if cfg.normalise_embeddings else None
    unlabelled: list[np.ndarray] = []
    teacher = None
    if cfg.vat_eps > 0 or cfg.distill_weight > 0:  # what the classifier reads of each: its truncation policy
        unlabelled = [np.asarray(vocab.truncate(x.tolist())[0], dtype=np.int32) for x in pretraining_text if len(x)]
        log(f"fine-tuning: {len(unlabelled):,} unlabelled reviews for "
            + " and ".join(n for n, on in (("VAT", cfg.vat_eps > 0), ("distillation", cfg.distill_weight > 0)) if on))
    if cfg.distill_weight > 0:
        if not args.distill_from:
            raise SystemExit("--distill-weight needs --distill-from (the teacher's artifacts)")
        teacher = teacher_probabilities(args.distill_from, unlabelled, vocab, state.dir / "teacher.npz")
    report = fine_tune(model, train, cfg, training_seed(args), state, timebox,
                       lambda m: evaluate_split(m, val_ids, val_labels), log, unlabelled, freqs, teacher)
    model.eval()
    probs = predict_ids(model, val_ids, model_device(model))
    keys = [encoded.keys[i] for i in split.validation]
    (state.dir / "validation_predictions.json").write_text(json.dumps(
        {"split": split.summary(), "labels": dict(zip(keys, val_labels)),
         "probabilities": {k: round(p, 6) for k, p in zip(keys, probs)}}) + "\n", encoding="utf-8")
    return report, compute_metrics(probs, val_labels)


def teacher_probabilities(teachers: Sequence[str], unlabelled: list[np.ndarray], vocab: Vocabulary,
                          cache: Path) -> list[float]:
    """The teachers' mean P(positive) on every unlabelled review, computed once and kept in ``cache``
    (with the teachers' model checksums, so that another teacher is never mistaken for this one)."""
    checksums = [file_sha256(Path(t) / "model.pt") for t in teachers]
    if cache.is_file():
        with np.load(cache) as z:
            if z["checksums"].tolist() == checksums and len(z["probabilities"]) == len(unlabelled):
                return z["probabilities"].tolist()
        raise SystemExit(f"{cache} holds another teacher's probabilities: remove it or start another run")
    ids = [x.tolist() for x in unlabelled]
    total = np.zeros(len(ids))
    for path in teachers:
        art = load_artifacts(path, "cpu")
        if art.vocab.itos != vocab.itos:
            raise SystemExit(f"--distill-from {path}: its vocabulary differs from this run's")
        t0 = time.time()
        total += np.asarray(predict_ids(art.model, ids, art.device))
        log(f"teacher {path}: {len(ids):,} unlabelled reviews scored in {time.time() - t0:.0f}s")
    probs = (total / len(teachers)).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, probabilities=probs, checksums=np.asarray(checksums))
    return probs.tolist()


def run_cost(sessions: list[dict]) -> dict:
    """CPU-hours (seconds × torch threads of CPU sessions) and GPU minutes of a run's sessions."""
    return {"cpu_hours": round(sum((s.get("seconds") or 0) * s.get("threads", 1) for s in sessions
                                   if s.get("device", "cpu") == "cpu") / 3600, 2),
            "gpu_minutes": round(sum((s.get("seconds") or 0) for s in sessions if s.get("device") == "cuda") / 60, 1)}


def initialised_from(args: argparse.Namespace) -> dict | None:
    """What the --init-from run was and cost (its recipe, LM history and sessions' cost), for the card."""
    if not args.init_from:
        return None
    info = json.loads((Path(args.init_from) / "run.json").read_text(encoding="utf-8"))
    return {"state_dir": args.init_from, "recipe": info.get("recipe"),
            "language_model_history": info.get("phases", {}).get("lm", {}).get("history"),
            **run_cost(info.get("sessions", []))}


def model_card(args: argparse.Namespace, model: SentimentLSTM, encoded: EncodedCorpus, split: Split,
               lm_report: dict | None, ft_report: dict, validation: dict, state: RunState) -> dict:
    """Everything the artifacts should say about how the model was made.

    The log of test evaluations (``metrics.test_evaluations``) of a card already at --out is carried
    over when it describes the same model (a re-export of this run): the log is appended to, never reset.
    The linear baseline's figure is what ``python -m training.baseline`` wrote (training_state/baseline.json).
    """
    config = ModelConfig(len(model.embedding.weight), args.embedding_dim, args.hidden_size, args.layers, args.dropout)
    sessions = state.info.get("sessions", [])
    earlier = (json.loads((Path(args.init_from) / "run.json").read_text(encoding="utf-8")).get("sessions", [])
               if args.init_from else [])
    export_machine = {"machine": platform.machine(), "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
                      "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                      "python": platform.python_version()}
    previous = read_card(Path(args.out) / "model_card.json")
    card = {
        "version": "sentiment-lstm-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M"),
        "task": "binary sentiment of English movie reviews (IMDB); probability of positive",
        "architecture": {
            "type": "Embedding → LSTM (unidirectional, batch_first) → Linear(hidden, 1) → sigmoid per step",
            "config": asdict(config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "prediction": "sigmoid output at the last real token; the trace is the output after every token",
        },
        "training": {
            "recipe": state.info["recipe"],
            "precision": "bf16 autocast" if use_bf16(args) else "fp32",
            "language_model_pretraining": lm_report,
            "fine_tuning": ft_report,
            "sessions": sessions,
            # Read by the service's GET /v1/model: fine-tuning epochs, and the exported one (the last:
            # its weight average, not a pick by validation accuracy), training seconds of both phases.
            "epochs_run": len(ft_report["history"]),
            "best_epoch": len(ft_report["history"]),
            "train_seconds": round(ft_report.get("seconds", 0) + ((lm_report or {}).get("seconds") or 0), 1),
            **run_cost(sessions),
            # A run started from another run's language model (--init-from) also cost that run.
            "initialised_from": initialised_from(args),
            # The device of each phase (from the sessions), and the machine exporting (and testing) now.
            "hardware": phase_hardware(sessions, earlier, export_machine),
        },
        "data": {"source": "Large Movie Review Dataset v1.0 (aclImdb, Maas et al. 2011)",
                 "archive_sha256": encoded.data_sha256,
                 "split": split.summary(),
                 "train_reviews": len(split.train), "validation_reviews": len(split.validation),
                 "unsup_reviews_for_pretraining": len(encoded.unsup),
                 "test_reviews": encoded.n_test},
        "metrics": {"validation": {**validation, "split": split.kind}, "test_evaluations": []},
        "baseline": baseline_result() or (previous or {}).get("baseline"),
        "intended_use": INTENDED_USE, "out_of_scope": OUT_OF_SCOPE, "limitations": LIMITATIONS,
        "provenance": provenance(sessions, earlier, export_machine, encoded.data_sha256, git_commit()),
    }
    if previous is not None and same_model(previous, card):
        card["metrics"]["test_evaluations"] = previous.get("metrics", {}).get("test_evaluations", [])
    tested = state.info.get("test")  # this run's one test evaluation, made by an earlier export
    if tested:
        card["metrics"]["test"] = tested["metrics"]
        if not any(e.get("date") == tested["evaluation"]["date"] for e in card["metrics"]["test_evaluations"]):
            card["metrics"]["test_evaluations"].append(tested["evaluation"])
    return card


def stage_export(model: SentimentLSTM, vocab: Vocabulary, card: dict, out: str | Path) -> Path:
    """Trained model + vocabulary + card → TorchScript artifacts directory (fp32 weights)."""
    model.float().cpu().eval()
    path = export_artifacts(model, vocab, card, out)
    log(f"export: {path}")
    return path


def stage_test(out: Path, corpus: TokenizedCorpus, model: SentimentLSTM, vocab: Vocabulary, card: dict,
               state: RunState) -> dict:
    """Exported artifacts → metrics on all test reviews, written into the model card (re-exported),
    appended to its log of test evaluations (``metrics.test_evaluations``; earlier entries are kept)
    and recorded in the run's state, so that the run is never scored again."""
    art = load_artifacts(out, "cpu")  # score what was exported, not the eager model
    test_ids = [art.vocab.encode_tokens(t).ids for t in corpus.tokens["test"]]
    probs = predict_ids(art.model, test_ids, art.device)
    card["metrics"]["test"] = compute_metrics(probs, corpus.labels["test"])
    entry = evaluation_entry(
        f"{card['version']} exported to {out}", "fp32",
        f"in-process: training.train's test stage (the exported TorchScript on cached tokens), CPU {cpu_model()}",
        probs, corpus.labels["test"], "the pipeline's test stage: the one candidate meant to ship")
    append_test_evaluation(card, entry)
    state.info["test"] = {"metrics": card["metrics"]["test"], "evaluation": entry}
    state.save_info()
    export_artifacts(model, vocab, card, out)
    log(f"test: accuracy {card['metrics']['test']['accuracy']:.4f} on {card['metrics']['test']['n']} reviews")
    return card["metrics"]["test"]


def continue_command(argv: Sequence[str] | None) -> str:
    """The command that continues this run: the same flags (the recipe is read from --state-dir)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return "python -m training.train " + " ".join(shlex.quote(a) for a in args)


def main(argv: Sequence[str] | None = None, handle_signals: bool = False) -> int:
    args = parse_args(argv)
    started = time.time()
    state = RunState(args.state_dir, args.checkpoint_dir)
    adopt_recipe(args, state, given_flags(argv))
    seed_everything(training_seed(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    timebox = TimeBox(args.stop_after_minutes, args.stop_after_steps, args.checkpoint_every_minutes, handle_signals)
    device = training_device(args)
    session = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
               "precision": "bf16" if use_bf16(args) else "fp32", "device": device.type}
    if device.type == "cuda":
        session["gpu"] = torch.cuda.get_device_name(device)
    state.info.setdefault("sessions", []).append(session)

    def end_session(reached: str) -> None:
        session.update({"seconds": round(time.time() - started, 1), "reached": reached})
        state.save_info()

    corpus: TokenizedCorpus | None = None
    if args.pack:
        encoded, split, vocab = stage_pack(args, state)
    else:
        corpus = stage_data(args)
        split = stage_split(args, corpus)
        vocab = stage_vocabulary(args, corpus, split, state)
        encoded = encode_corpus(corpus, vocab)
    state.info["split"] = split.summary()
    model, head_weights = stage_word_vectors(args, corpus, split, vocab, state)
    model.to(device)
    log(f"long phases on {device.type}" + (f" ({session['gpu']})" if "gpu" in session else "")
        + f", {'bf16 autocast' if use_bf16(args) else 'fp32'}")
    try:
        lm_report = stage_language_model(args, encoded, split, vocab, model, state, timebox, head_weights)
        end_session("language model done")
        ft_report, validation = stage_fine_tune(args, encoded, split, vocab, model, state, timebox)
    except TimeBoxReached as stop:
        end_session(f"{stop.phase}: {stop.where}")
        log(f"stopped ({timebox.reason()}) in {stop.phase} at {stop.where}; state saved in {state.dir}/ "
            f"(commit it) and {state.checkpoint_dir}/ (local, exact).")
        log(f"continue with: {continue_command(argv)}")
        return 0
    end_session("fine-tuning done")
    log(f"validation ({split.kind} split): {json.dumps(validation)}")
    card = model_card(args, model, encoded, split, lm_report, ft_report, validation, state)
    if args.temperature_from_validation:  # probabilities calibrated on validation; labels unchanged
        card["metrics"]["calibration"] = fold_validation_temperature(model, state.dir / "validation_predictions.json")
    out = stage_export(model, vocab, card, args.out)
    if args.test and state.info.get("test"):
        done = state.info["test"]["evaluation"]
        log(f"test: this run was scored on test already ({done['date']}: {done['accuracy']:.4f}); not again "
            "(its figure and log are in the card)")
    elif args.test and corpus is None:
        log("test: skipped (a pack holds no test reviews); export again where the archive is: the same command "
            "without --pack exports the finished run and scores it")
    elif args.test:
        stage_test(out, corpus, model, vocab, card, state)
    return 0


if __name__ == "__main__":
    sys.exit(main(handle_signals=True))
