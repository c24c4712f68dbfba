"""What an occlusion explanation costs: its latency by review length, and other clients' latency
while explanations run.

    python -m benchmarks.explain_cost --data ../shared/data/aclImdb_v1.tar.gz

1. **Latency by length**: test reviews of about 50, 100, 200 and 400 tokens (after truncation),
   each sent alone, with and without ``"explain": "occlusion"``, on an idle service; median of
   ``--repeats`` requests per review.
2. **Other clients**: a light client (one ordinary review at a time, no explanation) measures its
   latency alone, then beside ``--explainers`` clients that send one explained review after another.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx

from app.process import ServiceProcess
from benchmarks.fairness import light_client, quantile
from benchmarks.run import REPO, load_reviews
from sentiment.artifacts import load_artifacts
from sentiment.text import TextEncoder

LENGTHS = (50, 100, 200, 400)


def by_length(texts: list[str], artifacts: str, per_length: int) -> dict[int, list[str]]:
    """``per_length`` reviews whose token count (after truncation) is closest to each target."""
    vocab = load_artifacts(artifacts, "cpu").vocab
    encoder = TextEncoder(vocab)
    limit = vocab.settings.token_limit(None)
    counts = [len(e.ids) for e in encoder.encode_many(texts, limit)]
    return {n: [texts[i] for i in sorted(range(len(texts)), key=lambda i: abs(counts[i] - n))[:per_length]]
            for n in LENGTHS}


def timed_post(client: httpx.Client, body: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    r = client.post("/v1/predict", json=body)
    elapsed = time.perf_counter() - started
    r.raise_for_status()
    return elapsed, r.json()


async def explainer(base: str, texts: list[str], seconds: float, done: list[float]) -> None:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        i = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            r = await c.post("/v1/predict", json={"texts": [texts[i % len(texts)]], "explain": "occlusion"})
            if r.status_code == 200:
                done.append(time.perf_counter() - started)
            elif r.status_code == 503:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            i += 1


async def beside(base: str, light_text: str, heavy: list[str], explainers: int, seconds: float) -> tuple[list[float], list[float]]:
    done: list[float] = []
    tasks = [asyncio.ensure_future(explainer(base, heavy, seconds + 2, done)) for _ in range(explainers)]
    await asyncio.sleep(2 if explainers else 0)
    light = await light_client(base, seconds, light_text)
    await asyncio.gather(*tasks)
    return light, done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/aclImdb_v1.tar.gz", help="aclImdb archive or folder")
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"), help="artifacts directory to serve")
    p.add_argument("--per-length", type=int, default=3, help="reviews per target length")
    p.add_argument("--repeats", type=int, default=3, help="requests per review and mode")
    p.add_argument("--explainers", type=int, default=2, help="clients sending explained reviews back to back")
    p.add_argument("--seconds", type=float, default=30, help="how long the light client measures")
    args = p.parse_args(argv)

    texts = load_reviews(args.data, 2000, 0)
    groups = by_length(texts, args.artifacts, args.per_length)
    with ServiceProcess(args.artifacts) as server:
        print("| tokens (target) | tokens (mean) | plain p50 ms | explained p50 ms | × |")
        print("|---:|---:|---:|---:|---:|")
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            for n, reviews in groups.items():
                plain, explained, tokens = [], [], []
                for text in reviews:
                    for _ in range(args.repeats):
                        seconds, body = timed_post(c, {"texts": [text]})
                        plain.append(seconds)
                        seconds, body = timed_post(c, {"texts": [text], "explain": "occlusion"})
                        explained.append(seconds)
                    tokens.append(body["predictions"][0]["num_tokens"])
                ratio = statistics.median(explained) / statistics.median(plain)
                print(f"| {n} | {statistics.fmean(tokens):.0f} | {1000 * statistics.median(plain):.0f} | "
                      f"{1000 * statistics.median(explained):.0f} | {ratio:.0f} |")
        light_text = groups[200][0]
        heavy = groups[200] + groups[400]
        print(f"\nA light client (one {len(light_text)}-character review, no explanation) beside clients "
              f"explaining reviews of ~200–400 tokens, {args.seconds:g} s each:\n")
        print("| explaining clients | light requests | light p50 ms | light p99 ms | explained answered | explained p50 ms |")
        print("|---:|---:|---:|---:|---:|---:|")
        for k in (0, args.explainers):
            light, done = asyncio.run(beside(server.base_url, light_text, heavy, k, args.seconds))
            explained_p50 = f"{1000 * statistics.median(done):.0f}" if done else "–"
            print(f"| {k} | {len(light)} | {1000 * statistics.median(light):.0f} | {1000 * quantile(light, 0.99):.0f} | "
                  f"{len(done)} | {explained_p50} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
