"""The model card: one scoring pass over the test set, the figures derived from it, and docs/model-card.md.

    python -m training.card score      # once per model: every test review and its first sentence (heavy)
    python -m training.card figures    # from the saved predictions: interval, classes, calibration, slices
    python -m training.card render     # docs/model-card.md from model_card.json (--check: is it current?)

``score`` runs the shipped artifacts through the engine's one scoring entry (``SentimentEngine.score``,
the service's path, at the engine's default precision) and saves every review's probability, rating,
label and token count, and the same for its first sentence, to one compact file. It appends both
passes to ``metrics.test_evaluations``. It refuses to score a model a second time: every figure of
the card is then recomputed from that file by ``figures``, which scores nothing. Temperature scaling
is fitted on the movie-grouped *validation* predictions only; the test set only reports its effect.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence


from training.card_figures import (ECE_BINS, LENGTH_BUCKETS, accuracy_by, accuracy_with_interval, bucket_name,
                                    length_bucket, per_class, reliability, scale, temperature_report)
from training.card_render import render

CARD = Path("model_artifacts/model_card.json")
PREDICTIONS = Path("training_state/r2/test_predictions.json.gz")
VALIDATION = Path("training_state/r2/validation_predictions.json")
PLOT = Path("docs/model-card-reliability.png")
DOC = Path("docs/model-card.md")
FIRST_SENTENCE_METHOD = ('spacy.blank("en") + the rule-based "sentencizer" pipe on the review with its '
                         "HTML line breaks replaced by spaces; the first sentence, stripped")




# ----------------------------------------------------------------------------------------------------
# What the card says in words, and where the model was made (also used by training.train's model_card)


INTENDED_USE = [
    "Scoring the sentiment of English-language movie and TV reviews written by viewers, as a probability that "
    "the review is positive, e.g. to sort, filter or aggregate reviews, or to show where a review turns.",
    "Aggregate analysis (share of positive reviews of a title) where single errors average out.",
]
OUT_OF_SCOPE = [
    "Non-English text: the vocabulary and the tokenizer are English; other languages score near-random.",
    "Text that is not a review (news, tweets about other topics, support tickets, product reviews of other "
    "domains): the model learned IMDB's vocabulary of film criticism, and accuracy under such domain shift "
    "is not measured.",
    "A neutral or mixed class: IMDB drops reviews rated 5 and 6 of 10, so the model has never seen a neutral "
    "review and always answers positive or negative; a probability near 0.5 is not a calibrated 'neutral'.",
    "Long documents: only the last 400 tokens (spaCy tokens) of a text are read; the beginning of a longer text "
    "has no effect on the answer.",
    "Sarcasm, irony and negation over long spans are frequent sources of errors.",
    "Decisions about people (hiring, moderation of a person's account, credit, grading) or any use where an "
    "error harms someone: the model is not evaluated for that, and its errors are not audited for bias.",
]
LIMITATIONS = [
    "Trained and evaluated on one public dataset (IMDB, Maas et al. 2011): reviews of 2011 and earlier, at most 30 "
    "per movie; the test movies are disjoint from the training movies.",
    "Short inputs are much harder than full reviews (see short_inputs): users sending one-liners should expect "
    "lower accuracy than the headline figure.",
    "Reviews longer than 400 tokens are judged on their ending only.",
    "Probabilities are close to calibrated on reviews like the test set (see calibration) but not on other text.",
]


def sessions_by_phase(sessions: Sequence[dict]) -> dict[str, list[dict]]:
    """Which training sessions worked in which phase, from each session's ``reached`` (where it stopped)
    and the one before it (where it started): language model, fine-tuning, export (the session that
    reached 'fine-tuning done' writes the artifacts; a session already past it only exports again)."""
    rank = {"lm": 0.0, "language model done": 1.0, "finetune": 1.5, "fine-tuning done": 2.0}

    def where(reached: str | None) -> float | None:
        return None if reached is None else next((v for k, v in rank.items() if reached.startswith(k)), None)

    out: dict[str, list[dict]] = {"language_model": [], "fine_tuning": [], "export": []}
    start = 0.0
    for s in sessions:
        end = where(s.get("reached"))
        stop = start if end is None else end  # a session killed hard worked in the phase it started in
        if start < 1:
            out["language_model"].append(s)
        if start < 2 and stop >= 1.5:
            out["fine_tuning"].append(s)
        if stop == 2:
            out["export"].append(s)
        start = stop
    return out


def device_name(session: dict) -> str:
    if session.get("device") == "cuda":
        return f"1x {session.get('gpu', 'CUDA GPU')} ({session.get('precision', '?')})"
    threads = session.get("threads", "?")
    return f"CPU, {threads} torch thread{'' if threads == 1 else 's'} ({session.get('precision', '?')})"


def phase_hardware(sessions: Sequence[dict], earlier_sessions: Sequence[dict] = (), export_machine: dict | None = None
                   ) -> dict[str, Any]:
    """The device of each phase, from the run's sessions (and the --init-from run's, whose language model
    this run continued), plus the machine that exported and tested it."""
    def summary(ss: list[dict]) -> list[dict]:
        names: dict[str, dict] = {}
        for s in ss:
            d = names.setdefault(device_name(s), {"device": device_name(s), "sessions": 0, "first": s["started"]})
            d["sessions"] += 1
        return list(names.values())

    out: dict[str, Any] = {}
    if earlier_sessions:
        out["language_model_of_the_initial_run"] = summary(sessions_by_phase(earlier_sessions)["language_model"])
    phases = sessions_by_phase(sessions)
    out["language_model"] = summary(phases["language_model"])
    out["fine_tuning"] = summary(phases["fine_tuning"])
    if export_machine is not None:
        out["export_and_test"] = export_machine
    return out


def software_versions() -> dict[str, str]:
    """Versions of what made or reads the model (torch, spaCy, numpy, Python)."""
    import numpy
    import spacy
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "spacy": spacy.__version__,
            "numpy": numpy.__version__}


def git_commit(root: str | Path = ".") -> dict[str, Any] | None:
    """HEAD of the repository and whether the working tree differs from it (None outside git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "training", "sentiment"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head.stdout.strip(), "uncommitted_changes_in_training_or_sentiment": bool(dirty.stdout.strip())}


def read_card(path: str | Path) -> dict | None:
    """The model card at ``path``, or None when there is none (or it is not JSON)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def same_model(previous: dict, card: dict) -> bool:
    """Whether two cards describe the same trained weights: the same recipe, split and fine-tuning history
    (a re-export of one finished run), so that the earlier card's test evaluations are this model's."""
    def key(c: dict) -> tuple:
        t = c.get("training", {})
        return (json.dumps(t.get("recipe"), sort_keys=True), json.dumps(c.get("data", {}).get("split"), sort_keys=True),
                json.dumps((t.get("fine_tuning") or {}).get("history"), sort_keys=True))
    return key(previous) == key(card)


def baseline_result(path: str | Path = "training_state/baseline.json") -> dict | None:
    """What ``python -m training.baseline`` last wrote (None before it has run)."""
    return read_card(path)


def fold_validation_temperature(model: Any, validation_predictions: str | Path) -> dict | None:
    """Fit a temperature on a run's validation predictions; if it lowers the validation ECE, divide the
    head's weight and bias by it (in place, before export), so every step's probability is
    sigmoid(logit / T). Returns the report for the card (None without validation predictions)."""
    import torch

    if not Path(validation_predictions).is_file():
        return None
    probs, labels, _ = load_validation(validation_predictions)
    report = temperature_report(probs, labels)
    report["applied"] = bool(report["lowers_validation_ece"])
    if report["applied"]:
        with torch.no_grad():
            model.head.weight.div_(report["temperature"])
            model.head.bias.div_(report["temperature"])
    return {"ece_bins": ECE_BINS, "temperature_scaling": report}


# ----------------------------------------------------------------------------------------------------
# The one scoring pass


def first_sentence(texts: Sequence[str]) -> list[str]:
    """The first sentence of each text (``FIRST_SENTENCE_METHOD``; no spaCy model download)."""
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    cleaned = [re.sub(r"<br\s*/?>", " ", t, flags=re.IGNORECASE) for t in texts]
    out = []
    for doc in nlp.pipe(cleaned, batch_size=256):
        sent = next(iter(doc.sents), None)
        out.append(sent.text.strip() if sent is not None else "")
    return out


def score_texts(engine: Any, texts: Sequence[str], batch_size: int = 256) -> list[tuple[float | None, int]]:
    """(P(positive), tokens before truncation) per text through the engine's one scoring entry; (None, 0)
    for a text the engine cannot score (no tokens)."""
    from sentiment.engine import Score, ScoreRequest

    out: list[tuple[float | None, int]] = []
    for i in range(0, len(texts), batch_size):
        for r in engine.score([ScoreRequest(t) for t in texts[i : i + batch_size]]).results:
            out.append((round(r.probability, 6), r.total_tokens) if isinstance(r, Score) else (None, 0))
    return out


def evaluation_entry(what: str, precision: str, how: str, probs: Sequence[float | None], labels: Sequence[int],
                     purpose: str, **extra: Any) -> dict:
    """One line of ``metrics.test_evaluations``: when, what, how, the figure, why."""
    scored = [(p, y) for p, y in zip(probs, labels) if p is not None]
    acc = accuracy_with_interval([p for p, _ in scored], [y for _, y in scored])
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "what": what, "precision": precision,
            "how": how, "accuracy": acc["accuracy"], "n": acc["n"], "purpose": purpose, **extra}


def append_test_evaluation(card: dict, entry: dict) -> None:
    """Add ``entry`` to the card's log of test evaluations (never replaces earlier ones)."""
    card.setdefault("metrics", {}).setdefault("test_evaluations", []).append(entry)


def cmd_score(args: argparse.Namespace) -> int:
    import torch

    from sentiment.artifacts import cpu_model, file_sha256
    from sentiment.engine import SentimentEngine
    from sentiment.imdb import read_imdb

    out = Path(args.predictions)
    if out.exists() and not args.again:
        raise SystemExit(f"{out} exists: this model's test set was already scored for the card. Every figure "
                         "comes from that file (python -m training.card figures); --again scores it once more "
                         "(and logs it).")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = SentimentEngine.load(args.artifacts, args.device)
    card_path = Path(args.artifacts) / "model_card.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    reviews = read_imdb(args.data, ("test",))["test"]
    t0 = time.time()
    full = score_texts(engine, [r.text for r in reviews])
    t_full = time.time() - t0
    firsts = first_sentence([r.text for r in reviews])
    t1 = time.time()
    short = score_texts(engine, firsts)
    t_short = time.time() - t1
    labels = [r.label for r in reviews]
    data = {
        "model": engine.version, "model_sha256": card["files"]["model.pt"], "artifacts": str(args.artifacts),
        "precision": engine.precision, "device": str(engine.device), "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
        "scored": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "how": "in-process: SentimentEngine.score (the service's scoring entry), batches of 256 texts",
        "data_sha256": file_sha256(args.data) if Path(args.data).is_file() else None,
        "seconds": {"reviews": round(t_full, 1), "first_sentences": round(t_short, 1)},
        "first_sentence_method": FIRST_SENTENCE_METHOD,
        "keys": [r.key for r in reviews], "labels": labels, "ratings": [r.rating for r in reviews],
        "probabilities": [p for p, _ in full], "total_tokens": [n for _, n in full],
        "first_sentence": {"probabilities": [p for p, _ in short], "total_tokens": [n for _, n in short]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as fh:
        json.dump(data, fh, separators=(",", ":"))
    what = f"{engine.version} ({args.what}), model.pt sha256 {card['files']['model.pt'][:12]}"
    how = f"in-process, SentimentEngine.score on {engine.device} ({cpu_model()}), python -m training.card score"
    append_test_evaluation(card, evaluation_entry(
        what, engine.precision, how, data["probabilities"], labels, args.purpose, predictions=str(out)))
    append_test_evaluation(card, evaluation_entry(
        what + "; the first sentence of each review", engine.precision, how, data["first_sentence"]["probabilities"],
        labels, args.purpose + " (short inputs)", predictions=str(out),
        unscorable=sum(p is None for p in data["first_sentence"]["probabilities"])))
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"scored {len(reviews)} reviews in {t_full:.0f}s ({engine.precision}) and their first sentences in "
          f"{t_short:.0f}s; accuracy {card['metrics']['test_evaluations'][-2]['accuracy']:.4f} / "
          f"{card['metrics']['test_evaluations'][-1]['accuracy']:.4f}; wrote {out} ({out.stat().st_size} bytes)")
    return 0


def load_predictions(path: str | Path) -> dict:
    """The per-review predictions written by ``score`` (gzip JSON)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def load_validation(path: str | Path) -> tuple[list[float], list[int], dict]:
    """(probabilities, labels, split summary) of a run's validation predictions, by review key.

    training.train's fine-tuning stage writes each validation review's label beside its probability,
    keyed by review, with the summary of the split (its seed and a hash of its members)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    keys = sorted(data["probabilities"])
    return [data["probabilities"][k] for k in keys], [data["labels"][k] for k in keys], data.get("split", {})


def figures(pred: dict, val_probs: Sequence[float], val_labels: Sequence[int]) -> dict:
    """Every figure of the card's analysis, from one scoring pass and the validation predictions."""
    probs, labels = pred["probabilities"], pred["labels"]
    head = accuracy_with_interval(probs, labels)
    calib = reliability(probs, labels)
    temp = temperature_report(val_probs, val_labels, probs, labels)
    lengths = [length_bucket(n) for n in pred["total_tokens"]]
    length_slices = accuracy_by(probs, labels, lengths, [bucket_name(lo, hi) for lo, hi in LENGTH_BUCKETS])
    ratings = pred["ratings"]
    rating_slices = accuracy_by(probs, labels, ratings, [1, 2, 3, 4, 7, 8, 9, 10])
    fs = pred["first_sentence"]
    fs_scored = [(p, y) for p, y in zip(fs["probabilities"], labels) if p is not None]
    fs_probs, fs_labels = [p for p, _ in fs_scored], [y for _, y in fs_scored]
    fs_tokens = sorted(n for n, p in zip(fs["total_tokens"], fs["probabilities"]) if p is not None)
    short = accuracy_with_interval(fs_probs, fs_labels)
    return {
        "source": {"predictions": str(PREDICTIONS), "model": pred["model"], "scored": pred["scored"],
                   "precision": pred["precision"], "device": pred["device"], "how": pred["how"],
                   "note": "one scoring pass of all 25,000 test reviews (and one of their first sentences); every "
                           "figure below is computed from it by python -m training.card figures"},
        "test": {**head, "interval_method": "Wilson score interval, 95 %", "per_class": per_class(probs, labels)},
        "calibration": {**calib, "set": "test", "plot": str(PLOT),
                        "validation_ece": reliability(val_probs, val_labels)["ece"],
                        "temperature_scaling": {**temp, "applied_to_shipped_model": False,
                                                "note": "not folded into the shipped model.pt (it would change every "
                                                        "probability users have seen); training.train "
                                                        "--temperature-from-validation folds it into future "
                                                        "candidates' head when it lowers validation ECE"}},
        "slices": {
            "by_length": {"unit": "spaCy tokens of the whole review, before truncation (the model reads the last 400)",
                          "buckets": length_slices},
            "by_rating": {"unit": "the reviewer's star rating from the archive's file names `<id>_<rating>.txt` "
                                  "(1-4 negative, 7-10 positive; IMDB has no 5-6)",
                          "ratings": rating_slices},
        },
        "short_inputs": {
            "first_sentence": {**short, "method": pred["first_sentence_method"],
                               "unscorable": sum(p is None for p in fs["probabilities"]),
                               "median_tokens": fs_tokens[len(fs_tokens) // 2] if fs_tokens else 0,
                               "per_class": per_class(fs_probs, fs_labels),
                               "ece": reliability(fs_probs, fs_labels)["ece"]},
        },
    }


def reliability_plot(calibration: dict, scaled: dict, out: Path) -> None:
    """Reliability diagram of the test predictions, before and after the validation-fitted temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0.5, 1], [0.5, 1], color="grey", linestyle=":", label="perfect calibration")
    for data, label, style in ((calibration, f"as shipped (ECE {calibration['ece']:.4f})", "o-"),
                               (scaled, f"T = {scaled['temperature']:.3f} from validation (ECE {scaled['ece']:.4f})",
                                "s--")):
        rows = data["reliability"]
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], style, markersize=4, label=label)
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(f"Test set, {calibration['bins']} equal-width confidence bins", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    rows = calibration["reliability"]
    hist.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["n"] for r in rows], width=0.5 / calibration["bins"],
             color="tab:blue")
    hist.set_yscale("log")
    hist.set_xlabel("confidence max(p, 1 - p)")
    hist.set_ylabel("reviews")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def cmd_figures(args: argparse.Namespace) -> int:
    card_path = Path(args.card)
    card = json.loads(card_path.read_text(encoding="utf-8"))
    pred = load_predictions(args.predictions)
    if pred["model_sha256"] != card["files"]["model.pt"]:
        raise SystemExit(f"{args.predictions} scored another model.pt than {card_path} describes")
    val_probs, val_labels, val_split = load_validation(args.validation)
    if val_split and val_split != card["data"]["split"]:
        raise SystemExit(f"{args.validation} is from another split than the card's")
    result = figures(pred, val_probs, val_labels)
    t = result["calibration"]["temperature_scaling"]["temperature"]
    scaled = {**reliability(scale(pred["probabilities"], t), pred["labels"]), "temperature": t}
    reliability_plot(result["calibration"], scaled, Path(args.plot))
    card["metrics"]["analysis"] = result["source"]
    card["metrics"]["test_interval"] = result["test"]
    card["metrics"]["calibration"] = result["calibration"]
    card["metrics"]["slices"] = result["slices"]
    card["metrics"]["short_inputs"] = result["short_inputs"]
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "source"}, indent=1)[:4000])
    return 0


def provenance(sessions: Sequence[dict], earlier_sessions: Sequence[dict], export_machine: dict,
               data_sha256: str | None, code: dict | None) -> dict:
    """Where the model came from: code, data, software, and the device of each phase."""
    return {"code": code, "data_archive_sha256": data_sha256, "software_at_export": software_versions(),
            "hardware_by_phase": phase_hardware(sessions, earlier_sessions, export_machine)}


def cmd_describe(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    card_path = Path(args.card)
    card = json.loads(card_path.read_text(encoding="utf-8"))
    run = json.loads((Path(args.state_dir) / "run.json").read_text(encoding="utf-8"))
    earlier = (json.loads((Path(args.init_from) / "run.json").read_text(encoding="utf-8"))["sessions"]
               if args.init_from else [])
    training = card["training"]
    old = training["hardware"]
    export_machine = {k: v for k, v in old.items() if k in ("machine", "cpu_model", "cpu_cores", "cpu_threads", "torch",
                                                            "python")} if "export_and_test" not in old \
        else old["export_and_test"]
    code = {"trained_with_commit": args.trained_with, "exported_with_commit": args.exported_with,
            "note": args.code_note}
    training["hardware"] = phase_hardware(run["sessions"], earlier, export_machine)
    card["provenance"] = {"code": code, "data_archive_sha256": card["data"]["archive_sha256"],
                          "software": {"training": args.training_software, "export_and_test": export_machine},
                          "hardware_by_phase": training["hardware"]}
    card["provenance"]["command"] = "python -m training.card " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    card["intended_use"], card["out_of_scope"] = INTENDED_USE, OUT_OF_SCOPE
    card["limitations"] = LIMITATIONS + list(args.limitation)
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(card["provenance"], indent=1))
    return 0




def cmd_render(args: argparse.Namespace) -> int:
    text = render(json.loads(Path(args.card).read_text(encoding="utf-8")))
    if args.check:
        if Path(args.out).read_text(encoding="utf-8") != text:
            print(f"{args.out} is out of date: run python -m training.card render", file=sys.stderr)
            return 1
        return 0
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score every test review and its first sentence once; save the predictions")
    s.add_argument("--artifacts", default="model_artifacts")
    s.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--predictions", default=str(PREDICTIONS), help="where the per-review predictions go (gzip JSON)")
    s.add_argument("--what", default="the shipped model_artifacts/, run 2")
    s.add_argument("--purpose", default="model card slices and calibration, no model choice")
    s.add_argument("--again", action="store_true", help="score although the predictions file exists")
    f = sub.add_parser("figures", help="the card's figures and reliability plot from the saved predictions")
    f.add_argument("--card", default=str(CARD))
    f.add_argument("--predictions", default=str(PREDICTIONS))
    f.add_argument("--validation", default=str(VALIDATION), help="the shipped run's validation predictions")
    f.add_argument("--plot", default=str(PLOT))
    d = sub.add_parser("describe", help="intended use, limits, provenance and the device of each phase, from run.json")
    d.add_argument("--card", default=str(CARD))
    d.add_argument("--state-dir", default="training_state/r2", help="the shipped run's state (its sessions)")
    d.add_argument("--init-from", default="training_state", help="the run whose language model it continued")
    d.add_argument("--trained-with", required=True, help="git commit of the code that trained the model")
    d.add_argument("--exported-with", required=True, help="git commit of the code that exported it")
    d.add_argument("--code-note", default="", help="how the commits were established")
    d.add_argument("--training-software", default="", help="software versions of the training machine(s)")
    d.add_argument("--limitation", action="append", default=[], help="a limitation of this model in particular")
    r = sub.add_parser("render", help="docs/model-card.md from the model card")
    r.add_argument("--card", default=str(CARD))
    r.add_argument("--out", default=str(DOC))
    r.add_argument("--check", action="store_true", help="exit 1 if --out differs from the rendering")
    args = parser.parse_args(argv)
    if args.command == "describe":
        return cmd_describe(args, argv)
    return {"score": cmd_score, "figures": cmd_figures, "render": cmd_render}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
