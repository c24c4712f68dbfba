"""Benchmark ``sentiment score`` against the all-core offline ceiling, measured in the same run.

    python -m benchmarks.bulk --data ../shared/data/aclImdb_v1.tar.gz

In one run: writes 25,000 IMDB reviews to a JSONL file (id: the review's key), the unlabelled
``train/unsup`` ones, so that a speed benchmark never touches the test set; measures the
**offline ceiling** on the same reviews (``benchmarks.run.offline_ceiling`` with ``split``: the engine
alone, one process per core at one torch thread, each scoring its share of the reviews once in
batches of 256, its tokenizer memo as cold as a new model worker's: the same work as the command's,
without reading, checking, sending or writing); runs the command on all of them in its own process,
as a user runs it, sampling the resident memory of the command and its model workers twice a second;
then measures the ceiling again, so that a machine that got busier or quieter during the run shows as
two different ceilings. For reference it also measures the warm-memo figure quoted elsewhere
(``benchmarks.run``'s way: 3,000 of the reviews, best of two passes, the second with every word
already memoised), which no run over new reviews can reach. The command's rate is the one it reports:
rows read, checked, scored and written per second from the model being ready to the last row
committed (the ceiling also excludes loading); its start-up is reported apart. Writes
``benchmarks/results/bulk.json`` and checks issue 27's targets: ≥ 0.9 of the ceiling, flat memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from app.resources import resident_bytes, usable_cpus
from benchmarks.run import offline_ceiling
from sentiment.artifacts import cpu_model

REPO = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.5


def children(pid: int) -> list[int]:
    """The direct children of a process (the command's model workers), from /proc."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


class MemorySampler(threading.Thread):
    """Resident memory of a process and of its children, every ``SAMPLE_S`` seconds, until it exits."""

    def __init__(self, process: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.samples: list[tuple[float, float, float, int]] = []  # (s since start, command MB, workers MB, workers)

    def run(self) -> None:
        started = time.perf_counter()
        while self.process.poll() is None:
            workers = [resident_bytes(c) for c in children(self.process.pid)]  # 0: exited, not yet reaped
            self.samples.append((round(time.perf_counter() - started, 2), resident_bytes(self.process.pid) / 2**20,
                                 sum(workers) / 2**20, sum(1 for w in workers if w)))
            time.sleep(SAMPLE_S)


def memory_summary(samples: list[tuple[float, float, float, int]], startup_s: float) -> dict[str, Any]:
    """Memory while scoring: from start-up's end (``startup_s`` after every worker is there) to the last
    sample with every worker still there (the pool closes before the command exits). Its start,
    middle, end and peak; flat means the end is within 5 % of the middle (caches warm by then), as
    in the service's memory soak."""
    full = max(n for *_, n in samples)
    first = next(t for t, *_, n in samples if n == full)
    scoring = [s for s in samples if s[3] == full and s[0] >= first + startup_s]
    total = [m + w for _, m, w, _ in scoring]
    mid = total[len(total) // 2]
    return {"samples": len(samples), "every_s": SAMPLE_S, "scoring_samples": len(scoring),
            "command_mb": {"start": scoring[0][1], "mid": scoring[len(scoring) // 2][1], "end": scoring[-1][1],
                           "max": max(m for _, m, _, _ in scoring)},
            "total_mb": {"start": total[0], "mid": mid, "end": total[-1], "max": max(total)},
            "end_over_mid": total[-1] / mid,
            "series": [(t, round(m + w, 1), n) for t, m, w, n in samples[:: max(1, len(samples) // 200)]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "aclImdb_v1.tar.gz"))
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"))
    p.add_argument("--reviews", type=int, default=25_000, help="unlabelled reviews the command scores")
    p.add_argument("--ceiling-reviews", type=int, default=3000, help="reviews of the warm-memo reference (each process scores them all, twice)")
    p.add_argument("--device", default="cpu", help="the command's --device (cuda: the ceiling uses one process)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bulk.json"))
    args = p.parse_args(argv)

    from sentiment.imdb import read_imdb

    unsup = [r for r in read_imdb(args.data, ("train",), unsup=True)["train"] if r.label == -1]
    reviews = unsup[: args.reviews]
    sample = random.Random(0).sample([r.text for r in reviews], min(args.ceiling_reviews, len(reviews)))
    processes = 1 if args.device.startswith("cuda") else usable_cpus()
    ceiling_device = "cuda" if args.device.startswith("cuda") else "cpu"
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "usable_cpus": usable_cpus(), "processor": cpu_model(),
                    "python": platform.python_version(), "device": args.device},
        "command": "python -m benchmarks.bulk " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "reviews": len(reviews),
        "load_average_before": os.getloadavg(),  # other work on the machine makes both figures move
    }
    with tempfile.TemporaryDirectory(prefix="bulk-bench") as tmp:
        source, output, summary_path = Path(tmp) / "reviews.jsonl", Path(tmp) / "scored.jsonl", Path(tmp) / "s.json"
        source.write_text("".join(json.dumps({"id": r.key, "text": r.text}) + "\n" for r in reviews))
        texts = [r.text for r in reviews]
        print(f"warm-memo reference: {len(sample)} reviews × {processes} processes, best of 2 passes …", flush=True)
        warm = offline_ceiling(Path(args.artifacts), sample, 256, processes, device=ceiling_device)
        print(f"  {warm['reviews_per_s']:.1f} reviews/s", flush=True)
        print(f"offline ceiling (before): the {len(texts)} reviews over {processes} processes …", flush=True)
        before = offline_ceiling(Path(args.artifacts), texts, 256, processes, device=ceiling_device, split=True)
        print(f"  {before['reviews_per_s']:.1f} reviews/s", flush=True)

        print(f"sentiment score: {len(reviews)} reviews …", flush=True)
        started = time.perf_counter()
        command = [sys.executable, "-m", "app.cli", "score", str(source), "-o", str(output), "--quiet",
                   "--summary-json", str(summary_path), "--artifacts", args.artifacts, "--device", args.device]
        run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = MemorySampler(run)
        sampler.start()
        out, err = run.communicate()
        wall = time.perf_counter() - started
        sampler.join()
        if run.returncode != 0:
            print(err, file=sys.stderr)
            return 1
        print(out, end="", flush=True)
        summary = json.loads(summary_path.read_text())
        scored = [json.loads(line) for line in output.read_text().splitlines()]
        # Unlabelled reviews: what can be checked is that every row came back, in order, scored.
        in_order = [row["id"] for row in scored] == [r.key for r in reviews]
        with_score = sum(row["probability"] is not None for row in scored)

        print("offline ceiling (after) …", flush=True)
        after = offline_ceiling(Path(args.artifacts), texts, 256, processes, device=ceiling_device, split=True)
        print(f"  {after['reviews_per_s']:.1f} reviews/s", flush=True)

    results["load_average_after"] = os.getloadavg()
    ceiling = (before["reviews_per_s"] + after["reviews_per_s"]) / 2
    memory = memory_summary(sampler.samples, summary["startup_seconds"])
    results.update({
        "offline_ceiling": {"before": before, "after": after, "mean_reviews_per_s": ceiling,
                            "warm_memo_reference": warm},
        "bulk": {"rows": summary["rows"], "errors": summary["errors"], "workers": summary["workers"],
                 "precision": summary["precision"],
                 "reviews_per_s": summary["rows_per_s"], "startup_s": summary["startup_seconds"],
                 "scoring_s": summary["scoring_seconds"], "wall_s": wall,
                 "wall_reviews_per_s": summary["rows"] / wall, "rows_in_order": in_order, "rows_with_a_score": with_score},
        "memory": memory,
    })
    ratio = summary["rows_per_s"] / ceiling
    results["targets"] = [
        {"target": "command / all-core offline ceiling (mean of before and after)", "value": round(ratio, 3),
         "goal": ">= 0.9", "met": ratio >= 0.9},
        {"target": "RSS, command + workers, end / middle of scoring", "value": round(memory["end_over_mid"], 3),
         "goal": "<= 1.05", "met": memory["end_over_mid"] <= 1.05},
    ]
    print(f"\nceiling {before['reviews_per_s']:.1f} (before) / {after['reviews_per_s']:.1f} (after) reviews/s; "
          f"command {summary['rows_per_s']:.1f} reviews/s scoring ({summary['rows'] / wall:.1f} over {wall:.0f}s "
          f"wall, start-up {summary['startup_seconds']:.1f}s); {with_score} of {len(reviews)} rows scored, "
          f"{'in' if in_order else 'OUT OF'} input order")
    t = memory["total_mb"]
    print(f"RSS command + workers (MB): start {t['start']:.0f}, middle {t['mid']:.0f}, end {t['end']:.0f}, "
          f"max {t['max']:.0f}; the command alone: max {memory['command_mb']['max']:.0f}")
    for target in results["targets"]:
        print(f"{'PASS' if target['met'] else 'FAIL'}  {target['target']}: {target['value']} (goal {target['goal']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
