"""docs/model-card.md, rendered from model_card.json (``python -m training.card render``)."""

from __future__ import annotations


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _interval(d: dict) -> str:
    lo, hi = d["interval_95"]
    return f"{_pct(d['accuracy'])} ({_pct(lo)} – {_pct(hi)})"


def render(card: dict) -> str:
    """docs/model-card.md from the model card (the test in tests/ keeps the committed file equal to this)."""
    m = card["metrics"]
    cfg = card["architecture"]["config"]
    L: list[str] = [f"# Model card: `{card['version']}`", "",
                    "<!-- Generated from model_artifacts/model_card.json by `python -m training.card render`; "
                    "do not edit by hand. -->", "",
                    f"**Task:** {card['task']}. **Model:** {card['architecture']['type']}; "
                    f"{card['architecture']['parameters']:,} parameters, embedding "
                    f"{cfg['embedding_dim']}, hidden {cfg['hidden_size']}, "
                    f"vocabulary {card['vocab_size']:,}, reads the last {card['tokenizer']['max_tokens']} tokens.", ""]
    for title, key in (("Intended use", "intended_use"), ("Out of scope", "out_of_scope"),
                       ("Limitations", "limitations")):
        L += [f"## {title}", ""] + [f"- {x}" for x in card.get(key, [])] + [""]
    if "test_interval" in m:
        t, src = m["test_interval"], m["analysis"]
        L += ["## Accuracy", "",
              f"On the 25,000 IMDB test reviews: **{_interval(t)}** ({t['correct']:,} of {t['n']:,} right; "
              f"{t['interval_method']}). Scored {src['scored'][:10]} in {src['precision']} on {src['device']} "
              f"({src['how']}); {src['note']}. The export's own test stage (fp32) gave "
              f"{_pct(m['test']['accuracy'])}. Movie-grouped validation (2,500 reviews of 337 movies no training "
              f"review shares): {_pct(m['validation']['accuracy'])}.", "",
              "| class | precision | recall | reviews |", "|---|---:|---:|---:|"]
        for name, c in t["per_class"].items():
            L.append(f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['support']:,} |")
        L.append("")
    if "calibration" in m:
        c = m["calibration"]
        ts = c["temperature_scaling"]
        L += ["## Calibration", "",
              f"Expected calibration error on test: **{c['ece']:.4f}** ({c['bins']} {c['binning']}); on the "
              f"validation: {c['validation_ece']:.4f}.", "",
              "![Reliability diagram](model-card-reliability.png)", "",
              f"Temperature scaling, fitted on the validation predictions only ({ts['fitted_on']}): "
              f"**T = {ts['temperature']:.4f}**.", "",
              "| | ECE before | ECE after | NLL before | NLL after |", "|---|---:|---:|---:|---:|"]
        for name in ("validation", "test"):
            r = ts[name]
            L.append(f"| {name} | {r['ece_before']:.4f} | {r['ece_after']:.4f} | {r['nll_before']:.4f} | "
                     f"{r['nll_after']:.4f} |")
        verdict = ("it would lower the validation ECE" if ts["lowers_validation_ece"] else
                   "it does not lower the validation ECE either, though it lowers the validation NLL slightly")
        L += ["", "The shipped model.pt is unchanged: folding T into it would change every probability users have "
              f"seen, and {verdict}. `training.train --temperature-from-validation` (the default) folds the "
              "validation-fitted temperature into a new candidate's head only when it lowers the validation ECE.",
              ""]
    if "slices" in m:
        s = m["slices"]
        L += ["## Accuracy by review length", "", f"Length: {s['by_length']['unit']}.", "",
              "| tokens | reviews | accuracy (95 % interval) |", "|---|---:|---:|"]
        L += [f"| {k} | {v['n']:,} | {_interval(v)} |" for k, v in s["by_length"]["buckets"].items()]
        L += ["", "## Accuracy by star rating", "", f"Rating: {s['by_rating']['unit']}.", "",
              "| rating | reviews | accuracy (95 % interval) |", "|---:|---:|---:|"]
        L += [f"| {k} | {v['n']:,} | {_interval(v)} |" for k, v in s["by_rating"]["ratings"].items()]
        L.append("")
    if "short_inputs" in m:
        f = m["short_inputs"]["first_sentence"]
        L += ["## Short inputs: the first sentence of each review", "",
              f"Each test review cut to its first sentence ({f['method']}; median {f['median_tokens']} tokens; "
              f"{f['unscorable']} empty and left out): **{_interval(f)}** on {f['n']:,}, ECE {f['ece']:.4f}; "
              f"negative recall {f['per_class']['negative']['recall']:.4f}, positive recall "
              f"{f['per_class']['positive']['recall']:.4f}.", ""]
    b = card.get("baseline", {})
    if b:
        L += ["## Linear baseline", "",
              f"TF-IDF + logistic regression: **{_pct(b['tfidf_logistic_regression_test_accuracy'])}** on test"
              + (f" ({_pct(b['test_interval_95'][0])} – {_pct(b['test_interval_95'][1])}); {b['method']}; "
                 f"tokenisation: `{b['tokenisation']}`; C = {b['C']:g} (validation {_pct(b['validation_accuracy'])}). "
                 f"`{b['command']}`, {b['date'][:10]}." if "method" in b else f" ({b.get('note', '')})."), ""]
    log = m.get("test_evaluations", [])
    if log:
        L += ["## Every evaluation on the test set", "", m.get("test_evaluations_note", ""), "",
              "| date | what | precision | how | accuracy | n | purpose |", "|---|---|---|---|---:|---:|---|"]
        for e in log:
            acc = (" / ".join(f"{k} {_pct(v)}" for k, v in e["accuracy_by_precision"].items())
                   if "accuracy_by_precision" in e else _pct(e["accuracy"]))
            cells = [e["date"], e["what"], e["precision"], e["how"], acc, f"{e['n']:,}", e["purpose"]]
            L.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
        L.append("")
    p = card.get("provenance")
    if p:
        L += ["## Provenance", "", f"- Data: {card['data']['source']}, archive sha256 `{p['data_archive_sha256']}`; "
              f"{card['data']['train_reviews']:,} training / {card['data']['validation_reviews']:,} validation reviews "
              f"({card['data']['split']['kind']}-grouped split, seed {card['data']['split']['seed']}), "
              f"{card['data']['unsup_reviews_for_pretraining']:,} unlabelled reviews for pre-training."]
        code = p["code"]
        L.append(f"- Code: trained with commit `{code.get('trained_with_commit')}`, exported with "
                 f"`{code.get('exported_with_commit')}`" + (f". {code['note']}" if code.get("note") else "") + ".")
        sw = p["software"]
        L.append(f"- Software: training {sw['training']}; export and test: torch {sw['export_and_test'].get('torch')}, "
                 f"Python {sw['export_and_test'].get('python')}.")
        for phase, devices in p["hardware_by_phase"].items():
            if isinstance(devices, list):
                text = "; ".join(f"{d['device']} ({d['sessions']} session{'s' if d['sessions'] > 1 else ''} from "
                                 f"{d['first'][:16]})" for d in devices)
            else:
                text = (f"{devices.get('cpu_model')} ({devices.get('cpu_cores')} cores, {devices.get('cpu_threads')} "
                        f"torch threads, {devices.get('machine')})")
            label = {"language_model_of_the_initial_run": "Language model of the run this one continued (--init-from)",
                     "export_and_test": "Export and test"}.get(phase, phase.replace("_", " ").capitalize())
            L.append(f"- {label}: {text}")
        L.append("")
    L += ["## Reproduce", "", "Every figure on this page comes from code in the repository:", "", "```bash",
          "pip install -e \".[train,baseline]\"",
          "python -m training.card score --data ../shared/data/aclImdb_v1.tar.gz   # once: writes "
          "training_state/r2/test_predictions.json.gz, logs the evaluation",
          "python -m training.card figures   # interval, classes, calibration, temperature, slices, plot (no scoring)",
          "python -m training.card describe ...   # provenance: the command below",
          "python -m training.baseline --data ../shared/data/aclImdb_v1.tar.gz   # the linear baseline",
          "python -m training.card render    # this page", "```", ""]
    if p and p.get("command"):
        L += ["The provenance was written by:", "", "```bash", p["command"], "```", ""]
    return "\n".join(L)
