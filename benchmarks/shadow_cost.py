"""What a shadow costs the callers: the same closed-loop load without and with a shadow.

    python -m benchmarks.shadow_cost --data ../shared/data/aclImdb_v1.tar.gz     # ~1.5 min

Starts ``python -m app`` as shipped (2 model workers) on a model repository holding the shipped model
twice (versions ``a`` and ``b``), serving ``a``. ``--clients`` closed-loop clients post one IMDB test
review each for ``--seconds``: (1) with no shadow, (2) with ``b`` shadowing at ``shadow_fraction``
1.0 (every text: the worst case), (3) with no shadow again after ``unload``. Prints reviews/s, p50
and p99 for each, and what the shadow did (texts shadowed, dropped, label agreement), and writes
``results/shadow_cost.json``. Not a test: its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from app.process import ServiceProcess
from benchmarks.run import REPO, load_reviews, parse_metrics

ADMIN = "bench-admin-key"


def closed_loop(base_url: str, reviews: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads posting reviews back to back for ``seconds``: throughput, p50, p99, errors."""
    times: list[float] = []
    errors = [0]
    end = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            n = i
            while time.monotonic() < end:
                started = time.monotonic()
                ok = http.post("/v1/predict", json={"texts": [reviews[n % len(reviews)]]}).status_code == 200
                (times.append(time.monotonic() - started) if ok else errors.__setitem__(0, errors[0] + 1))
                n += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times.sort()
    return {"reviews_per_s": len(times) / seconds, "p50_ms": 1000 * times[len(times) // 2],
            "p99_ms": 1000 * times[int(len(times) * 0.99)], "errors": errors[0]}


def metrics(base_url: str, prefix: str) -> dict[str, float]:
    samples = parse_metrics(httpx.get(base_url + "/metrics").text)
    return {k: v for k, v in samples.items() if k.startswith(prefix)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "aclImdb_v1.tar.gz"))
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    reviews = load_reviews(args.data, 1000, seed=5)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    results: dict[str, Any] = {"clients": args.clients, "seconds": args.seconds, "fraction": args.fraction}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("a", "b"):
            shutil.copytree(args.artifacts, Path(tmp) / name)
        env = {"SENTIMENT_MODEL_REPOSITORY": tmp, "SENTIMENT_ADMIN_KEY": ADMIN, "SENTIMENT_HOST": "127.0.0.1"}
        with ServiceProcess(Path(tmp) / "a", env, ready_timeout_s=300) as server:
            base = server.base_url
            closed_loop(base, reviews, args.clients, 3)  # warm up
            results["no_shadow"] = closed_loop(base, reviews, args.clients, args.seconds)
            r = httpx.post(base + "/v2/repository/models/sentiment/load", headers=auth, timeout=300,
                           json={"parameters": {"version": "b", "mode": "shadow", "shadow_fraction": args.fraction}})
            assert r.status_code == 200, r.text
            closed_loop(base, reviews, args.clients, 3)
            before = metrics(base, "sentiment_shadow_")
            results["shadow"] = closed_loop(base, reviews, args.clients, args.seconds)
            after = metrics(base, "sentiment_shadow_")
            results["shadow_metrics"] = {k: after[k] - before.get(k, 0.0) for k in after
                                         if k.endswith("_total") or k.endswith("_count")}
            r = httpx.post(base + "/v2/repository/models/sentiment/unload", headers=auth, timeout=60,
                           json={"parameters": {"version": "b"}})
            assert r.status_code == 200, r.text
            closed_loop(base, reviews, args.clients, 3)
            results["no_shadow_again"] = closed_loop(base, reviews, args.clients, args.seconds)
    print(json.dumps(results, indent=2))
    for key in ("no_shadow", "shadow", "no_shadow_again"):
        r = results[key]
        print(f"{key:16s} {r['reviews_per_s']:6.1f} reviews/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "shadow_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
