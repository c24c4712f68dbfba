"""Fairness: a light client's latency while heavy clients flood the service.

    python -m benchmarks.fairness --data ../shared/data/aclImdb_v1.tar.gz

Heavy clients each send 64 long IMDB test reviews with gate traces, back to back; one light client
sends a one-word text at a time. Prints the light client's latency (p50, p99, max) alone and under
the heavy load, and what happened to the heavy requests (answered or shed with 503). Before the
batcher served the least-served request first and capped a batch's cost, six such heavy clients
made the light client wait 8.6 s at p99.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx

from app.process import ServiceProcess
from benchmarks.run import REPO, load_reviews


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def light_client(base: str, seconds: float, text: str = "great") -> list[float]:
    """Latencies of one-text requests sent one after another (50 ms apart) for ``seconds``."""
    latencies = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            r = await c.post("/v1/predict", json={"texts": [text]})
            if r.status_code != 200:
                raise RuntimeError(f"the light request got {r.status_code}: {r.text[:200]}")
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)
    return latencies


async def heavy_client(base: str, texts: list[str], seconds: float, stats: dict[int, int]) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        i = 0
        while time.monotonic() < deadline:
            batch = [texts[(i + j) % len(texts)] for j in range(64)]
            i += 64
            r = await c.post("/v1/predict", json={"texts": batch, "trace": True, "gates": True})
            stats[r.status_code] = stats.get(r.status_code, 0) + 1
            if r.status_code == 503:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))


async def scenario(base: str, texts: list[str], heavy: int, seconds: float) -> tuple[list[float], dict[int, int]]:
    stats: dict[int, int] = {}
    heavies = [asyncio.ensure_future(heavy_client(base, texts, seconds + 2, stats)) for _ in range(heavy)]
    await asyncio.sleep(2 if heavy else 0)  # let the backlog build
    light = await light_client(base, seconds)
    await asyncio.gather(*heavies)
    return light, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"), help="artifacts directory to serve")
    p.add_argument("--heavy", type=int, default=6, help="heavy clients (64 long reviews + gates per request)")
    p.add_argument("--seconds", type=float, default=30, help="how long the light client measures")
    p.add_argument("--baseline-repo", default=None,
                   help="also measure the service of this checkout (e.g. a git worktree of an older commit)")
    args = p.parse_args(argv)

    reviews = sorted(load_reviews(args.data, 2000, 0), key=len)[-256:]  # the longest: heavy work
    print(f"heavy texts: {len(reviews)} reviews of {len(reviews[0])}–{len(reviews[-1])} characters")
    rows = []
    services = [("this checkout", str(REPO))] + ([("baseline", args.baseline_repo)] if args.baseline_repo else [])
    for name, repo in services:
        with ServiceProcess(args.artifacts, repo=repo) as server:
            for heavy in (0, args.heavy):
                light, stats = asyncio.run(scenario(server.base_url, reviews, heavy, args.seconds))
                rows.append((name, heavy, light, stats))
    print("| service | heavy clients | light requests | light p50 ms | light p99 ms | light max ms | heavy answered | heavy shed (503) | heavy other |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, heavy, light, stats in rows:
        other = sum(v for k, v in stats.items() if k not in (200, 503))
        print(f"| {name} | {heavy} | {len(light)} | {1000 * statistics.median(light):.0f} | "
              f"{1000 * quantile(light, 0.99):.0f} | {1000 * max(light):.0f} | {stats.get(200, 0)} | "
              f"{stats.get(503, 0)} | {other} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
