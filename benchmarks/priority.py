"""Priorities: an interactive client's latency beside saturating bulk clients, with and without lanes.

    python -m benchmarks.priority --data ../shared/data/aclImdb_v1.tar.gz

Starts ``python -m app`` with the shipped model and 2 model workers, then measures one interactive
client (one IMDB test review per request, sent one after another, ``--pause-ms`` apart) in three
phases of ``--seconds`` each:

(a) alone, on an idle server;
(b) beside ``--load-clients`` saturating clients (``wrk``, one review per request, back to back) in
    the same lane: what the service did before requests had a priority;
(c) beside the same load sent with ``"priority": "batch"``.

Prints a table (the interactive client's p50/p99/max, the load's throughput and p99) and the ratios
p99(b)/p99(a) and p99(c)/p99(a) (the target: (c) under 3), and writes the results as JSON to
``--out``. Needs ``wrk`` (Debian package ``wrk``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from app.process import ServiceProcess
from benchmarks.run import REPO, load_reviews, run_wrk

RESULTS = REPO / "benchmarks" / "results" / "priority.json"
TARGET_RATIO = 3.0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def interactive_client(base: str, reviews: list[str], seconds: float, pause_s: float) -> dict[str, Any]:
    """Latencies (s) of one-review requests sent one after another for ``seconds``."""
    latencies: list[float] = []
    errors: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    i = 0
    with httpx.Client(base_url=base, timeout=60) as c:
        while time.monotonic() < deadline:
            body = {"texts": [reviews[i % len(reviews)]]}
            i += 1
            started = time.perf_counter()
            r = c.post("/v1/predict", json=body)
            elapsed = time.perf_counter() - started
            if r.status_code == 200:
                latencies.append(elapsed)
            else:
                errors[r.status_code] = errors.get(r.status_code, 0) + 1
            time.sleep(pause_s)
    return {"latencies": latencies, "errors": errors}


def bodies_file(reviews: list[str], priority: str | None, directory: Path) -> Path:
    """One JSON request body per line (one review each), for wrk_post.lua."""
    path = directory / f"bodies-{priority or 'none'}.jsonl"
    with path.open("w") as f:
        for review in reviews:
            body: dict[str, Any] = {"texts": [review]}
            if priority is not None:
                body["priority"] = priority
            f.write(json.dumps(body) + "\n")
    return path


def phase(base: str, reviews: list[str], load: Path | None, clients: int, seconds: float, warmup_s: float,
          pause_s: float) -> dict[str, Any]:
    """The interactive client for ``seconds``, beside ``clients`` wrk connections sending ``load``
    (started ``warmup_s`` earlier, so that the queue is in its steady state)."""
    if load is None:
        measured = interactive_client(base, reviews, seconds, pause_s)
        load_result = None
    else:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(run_wrk, base, load, clients, seconds + warmup_s + 1)
            time.sleep(warmup_s)
            measured = interactive_client(base, reviews, seconds, pause_s)
            load_result = running.result()
    lat = measured["latencies"]
    row: dict[str, Any] = {"requests": len(lat), "errors": measured["errors"],
                           "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * quantile(lat, 0.99),
                           "max_ms": 1000 * max(lat)}
    if load_result is not None:
        row["load"] = {"requests_per_s": load_result["requests"] / (load_result["duration_us"] / 1e6),
                       "p99_ms": load_result["p99_us"] / 1000, "non_2xx": load_result["non_2xx"]}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"), help="artifacts directory to serve")
    p.add_argument("--workers", type=int, default=2, help="model-worker processes (SENTIMENT_WORKERS)")
    p.add_argument("--load-clients", type=int, default=8, help="saturating clients (wrk connections)")
    p.add_argument("--seconds", type=float, default=20, help="how long the interactive client measures, per phase")
    p.add_argument("--warmup-seconds", type=float, default=3, help="load before each measurement starts")
    p.add_argument("--pause-ms", type=float, default=20, help="the interactive client's pause between requests")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra SENTIMENT_* settings for the server (repeatable), e.g. SENTIMENT_BATCH_LANE_BATCH_COST=8000")
    p.add_argument("--out", default=str(RESULTS), help="results JSON")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("this benchmark needs wrk: apt-get install wrk", file=sys.stderr)
        return 2

    reviews = load_reviews(args.data, 2000, 0)
    interactive, bulk = reviews[:500], reviews[500:]
    env = {"SENTIMENT_WORKERS": str(args.workers), **dict(e.split("=", 1) for e in args.env)}
    pause_s = args.pause_ms / 1000
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, ServiceProcess(args.artifacts, env) as server:
        same_lane = bodies_file(bulk, None, Path(tmp))
        batch_lane = bodies_file(bulk, "batch", Path(tmp))
        run_wrk(server.base_url, same_lane, args.load_clients, args.warmup_seconds)  # warm up the whole path
        plan = [("a", "alone (idle server)", None), ("b", f"beside {args.load_clients} saturating clients, same lane", same_lane),
                ("c", f"beside {args.load_clients} saturating clients, \"priority\": \"batch\"", batch_lane)]
        for key, label, load in plan:
            time.sleep(1)  # the previous phase's queue drains
            rows[key] = {"phase": label, **phase(server.base_url, interactive, load, args.load_clients, args.seconds,
                                                 args.warmup_seconds, pause_s)}
            print(f"({key}) {label}: p50 {rows[key]['p50_ms']:.1f} ms, p99 {rows[key]['p99_ms']:.1f} ms", flush=True)

    print()
    print("| phase | interactive requests | p50 ms | p99 ms | max ms | errors | load req/s | load p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, row in rows.items():
        load = row.get("load") or {}
        print(f"| ({key}) {row['phase']} | {row['requests']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
              f"{row['max_ms']:.1f} | {sum(row['errors'].values())} | {load.get('requests_per_s', 0):.0f} | "
              f"{load.get('p99_ms', 0):.0f} |")
    ratio_b = rows["b"]["p99_ms"] / rows["a"]["p99_ms"]
    ratio_c = rows["c"]["p99_ms"] / rows["a"]["p99_ms"]
    print(f"\np99(b)/p99(a) = {ratio_b:.2f}   (no priority: the load in the interactive lane)")
    print(f"p99(c)/p99(a) = {ratio_c:.2f}   (the load in the batch lane; target < {TARGET_RATIO:g})")
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "settings": {**env, "seconds": args.seconds, "warmup_seconds": args.warmup_seconds,
                     "pause_ms": args.pause_ms, "load_clients": args.load_clients},
        "phases": rows, "ratio_b_over_a": ratio_b, "ratio_c_over_a": ratio_c, "target_ratio": TARGET_RATIO,
        "target_met": ratio_c < TARGET_RATIO,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
