"""Benchmark the service against the offline ceiling of its own scoring path on every core.

    python -m benchmarks.run --data ../shared/data/aclImdb_v1.tar.gz --soak-seconds 300

In one run: reads real IMDB test reviews; measures the **offline ceiling**: the same texts
tokenised and scored through ``SentimentEngine.score`` (the service's path) in large batches, no
HTTP, one process per usable core at one torch thread each, all at once; then, for each
configuration, starts the service with its default serve command (``python -m app``), drives it
with ``wrk`` (one review per request) at each concurrency level, and reads the observed batch sizes,
per-phase times and resident memory (server + model workers) from ``/metrics``. Prints a table,
writes ``results.json`` and ``throughput.png`` to ``--out``, and checks the targets of issue 15.
Needs ``wrk`` (Debian package ``wrk``) and matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from app.process import ServiceProcess
from sentiment.artifacts import cpu_model

REPO = Path(__file__).resolve().parent.parent
# TorchServe 0.12's best configuration on the shipped model, reviews/s by clients (issue 15, same load).
TORCHSERVE = {32: 486, 64: 652}
LUA = Path(__file__).resolve().parent / "wrk_post.lua"
CONFIGS = {
    "default": {},  # every usable core: one model worker per core, batching on
    "batching off": {"SENTIMENT_MAX_BATCH_SIZE": "1"},
    "fp32": {"SENTIMENT_PRECISION": "fp32"},  # the default is bf16 where the CPU has it
    "one process": {"SENTIMENT_WORKERS": "0"},  # the model in the server process (the old default)
}
DEFAULT_CONFIGS = ["default", "batching off"]


def load_reviews(source: str, n: int, seed: int) -> list[str]:
    from sentiment.imdb import read_imdb

    reviews = read_imdb(source, ("test",))["test"]
    random.Random(seed).shuffle(reviews)
    return [r.text for r in reviews[:n]]


def _ceiling_worker(artifacts: str, texts: list[str], batch_size: int, repeats: int, start: Any,
                    device: str = "cpu") -> dict[str, float]:
    """One core's (or the GPU's) share of the offline ceiling: load, warm up, wait for the others, then score."""
    import torch

    from sentiment.engine import ScoreRequest, SentimentEngine

    torch.set_num_threads(1)
    engine = SentimentEngine.load(artifacts, device)
    engine.warm_up()
    start.wait()
    best: dict[str, float] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokenize = forward = 0.0
        for i in range(0, len(texts), batch_size):
            batch = engine.score([ScoreRequest(t) for t in texts[i : i + batch_size]])
            tokenize += batch.tokenize_seconds
            forward += batch.forward_seconds
        total = time.perf_counter() - t0
        if not best or total < best["seconds"]:
            best = {"seconds": total, "tokenize_seconds": tokenize, "forward_seconds": forward}
    return best


def offline_ceiling(artifacts: Path, texts: list[str], batch_size: int, processes: int,
                    repeats: int = 2, device: str = "cpu", split: bool = False) -> dict[str, float]:
    """Score ``texts`` through the engine's one entry (the service's own scoring path), ``batch_size``
    at a time, no HTTP, over ``processes`` processes at one torch thread each, started together:
    the best the model can do on these cores (on a GPU: one process).

    By default each process scores the whole list ``repeats`` times and keeps its best pass, so the
    ceiling is processes × texts ÷ the slowest process's time; from the second pass on, the
    tokenizer's memo already holds every word of the list (a warm-cache figure). With ``split``
    each process scores its own share of the list once (``texts[i::processes]``), its memo as cold
    as a fresh model worker's: the engine alone doing exactly the work a run over those texts
    does, and the ceiling is len(texts) ÷ the slowest process's time."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    shares = [texts[i::processes] for i in range(processes)] if split else [texts] * processes
    repeats = 1 if split else repeats
    context = mp.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(processes, mp_context=context) as pool:
        start = manager.Barrier(processes)
        parts = [pool.submit(_ceiling_worker, str(artifacts), share, batch_size, repeats, start, device)
                 for share in shares]
        runs = [f.result() for f in parts]
    slowest = max(r["seconds"] for r in runs)
    scored = sum(len(share) for share in shares)
    return {"processes": processes, "seconds": slowest, "reviews_per_s": scored / slowest,
            "per_process_reviews_per_s": [len(share) / r["seconds"] for share, r in zip(shares, runs)],
            "tokenize_ms_per_review": 1000 * sum(r["tokenize_seconds"] for r in runs) / scored,
            "forward_ms_per_review": 1000 * sum(r["forward_seconds"] for r in runs) / scored}


def parse_metrics(text: str) -> dict[str, float]:
    """Flatten Prometheus text into {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric_delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def batch_histogram(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Batches per size bucket (non-cumulative) during one load step."""
    cumulative = {}
    for key in after:
        m = re.match(r'sentiment_batch_size_bucket\{le="([^"]+)"\}', key)
        if m:
            cumulative[m[1]] = metric_delta(before, after, key)
    hist, prev = {}, 0.0
    for le in sorted(cumulative, key=lambda x: float("inf") if x == "+Inf" else float(x)):
        hist[le] = cumulative[le] - prev
        prev = cumulative[le]
    return {k: v for k, v in hist.items() if v}


def rss_mb(metrics: dict[str, float]) -> float:
    """Resident memory of the server and its model workers together, from its /metrics."""
    return metrics.get("sentiment_resident_memory_bytes", float("nan")) / 2**20


class Server(ServiceProcess):
    """The service under load, with a reader for its ``/metrics``."""

    def __init__(self, artifacts: Path, env: dict[str, str], port: int) -> None:
        super().__init__(artifacts, env, port)
        self.base = self.base_url

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.base + "/metrics", timeout=10).text)


def run_wrk(base: str, bodies: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    threads = 1 if concurrency < 8 else 2
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
           "-s", str(LUA), base, "--", str(bodies)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("WRK_JSON "))
    return json.loads(line[len("WRK_JSON "):])


def measure(server: Server, bodies: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    before = server.metrics()
    w = run_wrk(server.base, bodies, concurrency, seconds)
    after = server.metrics()
    batches = metric_delta(before, after, "sentiment_batch_size_count")
    texts = metric_delta(before, after, "sentiment_batch_size_sum")
    req_key = 'sentiment_request_duration_seconds_{}{{route="/v1/predict",status="200"}}'
    n_req = metric_delta(before, after, req_key.format("count")) or 1

    def mean_ms(name: str, per: float) -> float:
        return 1000 * metric_delta(before, after, name) / per if per else 0.0

    batch_tokenize = mean_ms("sentiment_tokenize_duration_seconds_sum", batches)
    row = {
        "concurrency": concurrency,
        "reviews_per_s": w["requests"] / (w["duration_us"] / 1e6),
        "p50_ms": w["p50_us"] / 1000, "p95_ms": w["p95_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
        "non_2xx": w["non_2xx"], "socket_errors": w["socket_errors"],
        "mean_batch_size": texts / batches if batches else 0.0,
        "rss_mb": rss_mb(after),
        "batch_size_histogram": batch_histogram(before, after),
        # Where a request's time goes (means, from the service's own histograms). Tokenising and the
        # forward pass both happen once per batch, in a model worker; "batch_forward" includes the
        # hand-over to the worker and back. A request waits for its whole batch.
        "phase_ms": {
            "server_total": mean_ms(req_key.format("sum"), n_req),
            "queue_wait": mean_ms("sentiment_queue_wait_seconds_sum", metric_delta(
                before, after, "sentiment_queue_wait_seconds_count")),
            "batch_tokenize": batch_tokenize,
            "batch_forward": mean_ms("sentiment_batch_duration_seconds_sum", batches) - batch_tokenize,
        },
    }
    # The rest of the server's time: HTTP parsing, validation, response serialisation, scheduling.
    phases = row["phase_ms"]
    phases["http_and_serialisation"] = max(0.0, phases["server_total"] - phases["queue_wait"]
                                           - phases["batch_tokenize"] - phases["batch_forward"])
    return row


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in results["service"].items():
        cs = [r["concurrency"] for r in rows]
        ax1.plot(cs, [r["reviews_per_s"] for r in rows], marker="o", label=name)
        ax2.plot(cs, [r["p99_ms"] for r in rows], marker="o", label=name)
    ax1.axhline(results["offline_ceiling"]["reviews_per_s"], color="grey", ls="--", label="offline ceiling")
    for ax, title, unit in ((ax1, "Throughput", "reviews / s"), (ax2, "p99 latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["concurrency"], [str(c) for c in results["concurrency"]])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax2.set_yscale("log")
    where = results["machine"].get("gpu") or f"{results['machine']['cpus']} CPU cores"
    fig.suptitle(f"LSTM sentiment service — {where}, one review per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def check_targets(results: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """Issue 15's targets, from this run's figures."""
    on = {r["concurrency"]: r for r in results["service"].get("default", [])}
    off = {r["concurrency"]: r for r in results["service"].get("batching off", [])}
    ceiling = results["offline_ceiling"]["reviews_per_s"]
    checks = []
    if 64 in on:
        ratio = on[64]["reviews_per_s"] / ceiling
        checks.append(("default at 64 clients / all-core offline ceiling", ratio, ">= 0.9", ratio >= 0.9))
        ratio = on[64]["p99_ms"] / on[64]["p50_ms"]
        checks.append(("default at 64 clients: p99 / p50", ratio, "<= 1.6", ratio <= 1.6))
    if 1 in on and 1 in off:
        ratio = on[1]["p50_ms"] / off[1]["p50_ms"]
        checks.append(("lone client p50: default / batching off", ratio, "<= 1.2", ratio <= 1.2))
    for clients, torchserve in TORCHSERVE.items():
        if clients in on:
            ratio = on[clients]["reviews_per_s"] / torchserve
            checks.append((f"default at {clients} clients / TorchServe's {torchserve}", ratio, ">= 1.5", ratio >= 1.5))
    soak = results.get("soak")
    if soak:
        growth = soak["rss_end_mb"] / soak["rss_mid_mb"]
        checks.append(("RSS over the soak's second half (end / middle)", growth, "<= 1.05", growth <= 1.05))
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"), help="artifacts directory to serve")
    p.add_argument("--reviews", type=int, default=2000, help="test reviews to cycle through")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="closed-loop client counts")
    p.add_argument("--seconds", type=float, default=15, help="load time per concurrency level")
    p.add_argument("--warmup-seconds", type=float, default=3, help="unmeasured load before each configuration")
    p.add_argument("--offline-batch", type=int, default=256, help="batch size of the offline ceiling")
    p.add_argument("--soak-seconds", type=float, default=0, help="memory soak of the default at 64 clients (0: skip)")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS),
                   help="service configurations to measure")
    p.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE",
                   help="extra SENTIMENT_* settings for every configuration (tuning runs)")
    p.add_argument("--processes", type=int, default=None,
                   help="offline-ceiling processes (default: usable cores; 1 on CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="SENTIMENT_DEVICE of the service and the device of the offline ceiling (auto: CUDA if present)")
    p.add_argument("--port", type=int, default=8765, help="port of the service under test")
    p.add_argument("--seed", type=int, default=0, help="which test reviews are sampled")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where results.json and the plot go")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("benchmarks need wrk: apt-get install wrk", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = load_reviews(args.data, args.reviews, args.seed)
    bodies = out / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"texts": [t]}) + "\n" for t in texts))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "processor": cpu_model(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "device": device,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
        "reviews": len(texts), "seconds_per_level": args.seconds, "concurrency": args.concurrency,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    from app.resources import usable_cpus

    processes = args.processes or (1 if device == "cuda" else usable_cpus())
    print(f"offline ceiling: {len(texts)} reviews in batches of {args.offline_batch}, {processes} processes …", flush=True)
    results["offline_ceiling"] = offline_ceiling(Path(args.artifacts), texts, args.offline_batch, processes,
                                                 device=device)
    print(f"  {results['offline_ceiling']['reviews_per_s']:.0f} reviews/s", flush=True)

    results["service"] = {}
    for name in args.configs:
        extra = {"SENTIMENT_DEVICE": args.device, **dict(e.split("=", 1) for e in args.env)}
        server = Server(Path(args.artifacts), {**extra, **CONFIGS[name]}, args.port)
        try:
            run_wrk(server.base, bodies, max(args.concurrency), args.warmup_seconds)
            rows = []
            for c in args.concurrency:
                row = measure(server, bodies, c, args.seconds)
                rows.append(row)
                print(f"{name:>13} c={c:<3} {row['reviews_per_s']:7.1f} reviews/s  p50 {row['p50_ms']:7.1f} ms  "
                      f"p99 {row['p99_ms']:7.1f} ms  batch {row['mean_batch_size']:5.1f}  non-2xx {row['non_2xx']}",
                      flush=True)
            results["service"][name] = rows
            if name == "default" and args.soak_seconds > 0:
                # Two halves: growth over the second half is what "flat" means once caches are warm.
                start_rss = rss_mb(server.metrics())
                first = run_wrk(server.base, bodies, 64, args.soak_seconds / 2)
                mid_rss = rss_mb(server.metrics())
                second = run_wrk(server.base, bodies, 64, args.soak_seconds / 2)
                results["soak"] = {"seconds": args.soak_seconds, "concurrency": 64, "rss_start_mb": start_rss,
                                   "rss_mid_mb": mid_rss, "rss_end_mb": rss_mb(server.metrics()),
                                   "requests": first["requests"] + second["requests"],
                                   "non_2xx": first["non_2xx"] + second["non_2xx"]}
                print(f"soak: RSS (server + workers) {start_rss:.0f} → {mid_rss:.0f} → "
                      f"{results['soak']['rss_end_mb']:.0f} MB over {args.soak_seconds:.0f}s "
                      f"({results['soak']['requests']} requests)", flush=True)
        finally:
            server.stop()

    print()
    print("| config | clients | reviews/s | × ceiling | p50 ms | p95 ms | p99 ms | p99/p50 | mean batch | RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ceiling = results["offline_ceiling"]["reviews_per_s"]
    for name, rows in results["service"].items():
        for r in rows:
            print(f"| {name} | {r['concurrency']} | {r['reviews_per_s']:.1f} | {r['reviews_per_s'] / ceiling:.2f} | "
                  f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_ms'] / r['p50_ms']:.2f} | "
                  f"{r['mean_batch_size']:.1f} | {r['rss_mb']:.0f} |")
    print(f"| offline ceiling ({processes} processes) | – | {ceiling:.1f} | 1.00 | – | – | – | – | {args.offline_batch} | – |")
    print()
    print("Where a request's time goes (server-side means per request, ms):")
    print("| config | clients | total | queue wait | batch tokenise | batch forward | HTTP + serialisation |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in results["service"].items():
        for r in rows:
            ph = r["phase_ms"]
            print(f"| {name} | {r['concurrency']} | {ph['server_total']:.1f} | {ph['queue_wait']:.1f} | "
                  f"{ph['batch_tokenize']:.1f} | {ph['batch_forward']:.1f} | {ph['http_and_serialisation']:.1f} |")
    off = results["offline_ceiling"]
    print(f"offline: tokenise {off['tokenize_ms_per_review']:.2f} ms/review, forward "
          f"{off['forward_ms_per_review']:.2f} ms/review (batches of {args.offline_batch})")
    print()
    results["targets"] = [{"target": t, "value": round(v, 3), "goal": g, "met": ok} for t, v, g, ok in check_targets(results)]
    for t in results["targets"]:
        print(f"{'PASS' if t['met'] else 'FAIL'}  {t['target']}: {t['value']:.2f} (goal {t['goal']})")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "throughput.png")
    bodies.unlink()
    print(f"\nwrote {out / 'results.json'} and {out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
