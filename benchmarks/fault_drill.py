"""Fault drill: what an operator would do to a running service, with real processes and signals.

    python -m benchmarks.fault_drill --data ../shared/data/aclImdb_v1.tar.gz

Starts ``python -m app`` as shipped (one model worker per core, the shipped model) and keeps
``--clients`` closed-loop clients posting one IMDB test review each while it:

1. freezes one model worker with SIGSTOP (a deadlock, a swap storm or a stuck syscall, from outside)
   and measures how long until that process is gone and a replacement serves, the share of requests
   answered 200 meanwhile, whether readiness ever left 200 (polled every 0.1 s), and the slowest answer;
2. kills one model worker with SIGKILL and counts the requests that failed;
3. kills the front with SIGKILL and measures how long its model workers outlive it.

Before the faults, with ``--saturate`` more clients on top (the queue never empty), one more client
sends reviews with ``"timeout_ms": 50`` one after another and records each answer's status and time,
beside the mean batch duration: such a request must be answered within ~50 ms plus one batch, with
200 or 504 ``deadline_exceeded``.

Prints a table and writes ``results/fault_drill.json``. Not a test: it takes about a minute and its
figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from app.process import ServiceProcess
from benchmarks.run import REPO, load_reviews, parse_metrics


def worker_pids(front: int) -> list[int]:
    """The front's model-worker processes (children of any of its threads)."""
    return [int(p) for task in Path(f"/proc/{front}/task").iterdir() for p in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


class Load:
    """``clients`` threads posting reviews back to back; every answer's (time, status, seconds)."""

    def __init__(self, base_url: str, reviews: list[str], clients: int) -> None:
        self.base_url, self.reviews = base_url, reviews
        self.answers: list[tuple[float, int, float]] = []
        self.ready: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        self._threads.append(threading.Thread(target=self._probe, daemon=True))

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            n = i
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status = client.post("/v1/predict", json={"texts": [self.reviews[n % len(self.reviews)]]}).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((started, status, time.monotonic() - started))
                n += 7

    def _probe(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            while not self._stop.is_set():
                try:
                    self.ready.append((time.monotonic(), client.get("/health/ready").status_code))
                except httpx.HTTPError:
                    self.ready.append((time.monotonic(), 0))
                time.sleep(0.1)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(70)

    def since(self, t0: float, t1: float = float("inf")) -> dict[str, Any]:
        """The answers of requests in flight at any time from ``t0`` to ``t1`` (sent before, answered after, too)."""
        answers = [a for a in self.answers if a[0] + a[2] >= t0 and a[0] < t1]
        ready = [s for t, s in self.ready if t0 <= t < t1]
        return {"requests": len(answers), "ok_share": sum(s == 200 for _, s, _ in answers) / max(1, len(answers)),
                "errors": sum(s != 200 for _, s, _ in answers), "slowest_s": max((d for *_, d in answers), default=0.0),
                "ready_polls": len(ready), "ready_not_200": sum(s != 200 for s in ready)}


def deadline_client(base_url: str, reviews: list[str], seconds: float, timeout_ms: int) -> list[tuple[int, str, float]]:
    """Reviews posted one after another with ``timeout_ms``: each answer's (status, error code, seconds)."""
    answers = []
    with httpx.Client(base_url=base_url, timeout=60) as client:
        end, n = time.monotonic() + seconds, 3
        while time.monotonic() < end:
            started = time.monotonic()
            r = client.post("/v1/predict", json={"texts": [reviews[n % len(reviews)]], "timeout_ms": timeout_ms})
            code = "" if r.status_code == 200 else r.json().get("error", {}).get("code", "")
            answers.append((r.status_code, code, time.monotonic() - started))
            n += 11
            time.sleep(0.05)
    return answers


def metric_sum(base_url: str, name: str) -> float:
    """The sum of a metric's samples named exactly ``name`` (any labels)."""
    samples = parse_metrics(httpx.get(base_url + "/metrics").text)
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def wait_for(predicate: Any, timeout_s: float, step_s: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` held, or None if it did not within ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(step_s)
    return None


def workers_ready(base_url: str) -> float:
    return metric_sum(base_url, "sentiment_workers_ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "aclImdb_v1.tar.gz"))
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--saturate", type=int, default=12, help="extra clients during the deadline phase")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    reviews = load_reviews(args.data, 500, seed=1)
    results: dict[str, Any] = {"clients": args.clients}
    server = ServiceProcess(args.artifacts, {"SENTIMENT_HOST": "127.0.0.1"}, ready_timeout_s=300)
    try:
        workers = worker_pids(server.pid)
        count = len(workers)
        with Load(server.base_url, reviews, args.clients) as load:
            time.sleep(5)  # steady load, and a measured throughput for the batch deadlines
            with Load(server.base_url, reviews, args.saturate):
                time.sleep(2)
                sums = [metric_sum(server.base_url, f"sentiment_batch_duration_seconds_{k}") for k in ("sum", "count")]
                answers = deadline_client(server.base_url, reviews, 15, 50)
                after = [metric_sum(server.base_url, f"sentiment_batch_duration_seconds_{k}") for k in ("sum", "count")]
            times = sorted(t for *_, t in answers)
            results["deadline_50ms"] = {
                "clients": args.clients + args.saturate, "requests": len(answers),
                "ok": sum(s == 200 for s, *_ in answers),
                "deadline_exceeded": sum(code == "deadline_exceeded" for _, code, _ in answers),
                "other": sum(s != 200 and code != "deadline_exceeded" for s, code, _ in answers),
                "p50_ms": 1000 * times[len(times) // 2], "max_ms": 1000 * times[-1],
                "mean_batch_ms": 1000 * (after[0] - sums[0]) / max(1.0, after[1] - sums[1])}
            t0 = time.monotonic()
            os.kill(workers[0], signal.SIGSTOP)
            gone = wait_for(lambda: not alive(workers[0]), 60)
            back = wait_for(lambda: workers_ready(server.base_url) == count, 120)
            time.sleep(2)
            results["sigstop"] = {"killed_after_s": gone, "replaced_after_s": (gone or 0) + (back or float("nan")),
                                  **load.since(t0)}
            t1 = time.monotonic()
            victim = worker_pids(server.pid)[0]
            restarts = metric_sum(server.base_url, "sentiment_worker_restarts_total")
            os.kill(victim, signal.SIGKILL)
            noticed = wait_for(lambda: metric_sum(server.base_url, "sentiment_worker_restarts_total") > restarts, 60)
            back = wait_for(lambda: workers_ready(server.base_url) == count, 120)
            time.sleep(2)
            results["sigkill_worker"] = {"noticed_after_s": noticed, "replaced_after_s": (noticed or 0) + (back or float("nan")),
                                         **load.since(t1)}
        workers = worker_pids(server.pid)
        server.kill()
        results["sigkill_front"] = {"workers": len(workers),
                                    "workers_gone_after_s": wait_for(lambda: not any(map(alive, workers)), 30)}
    finally:
        server.kill()
    print(json.dumps(results, indent=2))
    s, k, f = results["sigstop"], results["sigkill_worker"], results["sigkill_front"]
    print(f"\nSIGSTOP a worker : killed after {s['killed_after_s']:.1f}s, serving with all workers after "
          f"{s['replaced_after_s']:.1f}s; {s['ok_share']:.1%} of {s['requests']} requests 200; readiness not 200 in "
          f"{s['ready_not_200']} of {s['ready_polls']} polls; slowest answer {s['slowest_s']:.2f}s")
    print(f"SIGKILL a worker : {k['errors']} of {k['requests']} requests failed; replaced after {k['replaced_after_s']:.1f}s; "
          f"readiness not 200 in {k['ready_not_200']} of {k['ready_polls']} polls")
    d = results["deadline_50ms"]
    print(f"timeout_ms 50    : beside {d['clients']} clients, {d['ok']} × 200, {d['deadline_exceeded']} × 504 "
          f"deadline_exceeded, {d['other']} other of {d['requests']}; p50 {d['p50_ms']:.0f} ms, max {d['max_ms']:.0f} ms "
          f"(mean batch {d['mean_batch_ms']:.0f} ms)")
    print(f"SIGKILL the front: its {f['workers']} workers gone after {f['workers_gone_after_s']}s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fault_drill.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
