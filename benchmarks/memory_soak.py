"""Memory soak: flood the service with never-seen words and watch its resident memory.

    python -m benchmarks.memory_soak --seconds 300

Every request carries texts of random made-up words, so every token is new to spaCy. Before the
tokenizer ran inside spaCy's ``memory_zone``, each new string stayed in spaCy's vocabulary for
good (385 MB → 1,833 MB after 112 such requests, still climbing). Prints RSS over time (sampled
from /proc) and ``process_resident_memory_bytes`` from ``/metrics``, and whether RSS reached a
plateau: growth over the second half of the run under 5 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import sys
import time
from pathlib import Path

import httpx

from app.process import ServiceProcess
from benchmarks.run import REPO, rss_mb


def random_text(rng: random.Random, chars: int) -> str:
    words, size = [], 0
    while size < chars:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 14)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


async def flood(base: str, seconds: float, clients: int, texts: int, chars: int, seed: int,
                pid: int, every_s: float) -> tuple[list[tuple[float, float]], int, int]:
    rng = random.Random(seed)
    samples: list[tuple[float, float]] = []
    done = failed = 0
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal done, failed
        while time.monotonic() < deadline:
            body = {"texts": [random_text(rng, chars) for _ in range(texts)]}
            r = await c.post("/v1/predict", json=body)
            done += 1
            failed += r.status_code != 200

    async def sampler() -> None:
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - started, rss_mb(pid)))
            await asyncio.sleep(every_s)
        samples.append((time.monotonic() - started, rss_mb(pid)))

    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        await asyncio.gather(sampler(), *(client(c) for _ in range(clients)))
    return samples, done, failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO / "model_artifacts"), help="artifacts directory to serve")
    p.add_argument("--seconds", type=float, default=300, help="length of the flood")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--texts", type=int, default=16, help="texts per request")
    p.add_argument("--chars", type=int, default=2000, help="characters of random words per text")
    p.add_argument("--sample-every", type=float, default=10, help="seconds between RSS samples")
    p.add_argument("--seed", type=int, default=0, help="random-word seed")
    p.add_argument("--out", default=None, help="write the samples as JSON here")
    args = p.parse_args(argv)

    with ServiceProcess(args.artifacts) as server:
        start_rss = rss_mb(server.pid)
        samples, done, failed = asyncio.run(flood(server.base_url, args.seconds, args.clients, args.texts,
                                                  args.chars, args.seed, server.pid, args.sample_every))
        metric = next(float(l.split()[-1]) for l in httpx.get(server.base_url + "/metrics").text.splitlines()
                      if l.startswith("process_resident_memory_bytes"))
    words = done * args.texts * args.chars // 10
    print(f"{done} requests ({failed} not 200), about {words:,} never-seen words, {args.clients} clients")
    print("| seconds | RSS MB |\n|---:|---:|")
    for t, rss in samples:
        print(f"| {t:.0f} | {rss:.0f} |")
    half = [rss for t, rss in samples if t >= samples[-1][0] / 2]
    growth = samples[-1][1] / half[0] - 1
    print(f"RSS: {start_rss:.0f} MB after load → {samples[-1][1]:.0f} MB at the end "
          f"(peak {max(r for _, r in samples):.0f} MB); /metrics process_resident_memory_bytes = {metric / 2**20:.0f} MB")
    verdict = "PLATEAU" if growth < 0.05 else "GROWING"
    print(f"{verdict}: growth over the second half {100 * growth:+.1f} % (goal < 5 %)")
    if args.out:
        Path(args.out).write_text(json.dumps({"samples": samples, "requests": done, "failed": failed,
                                               "start_rss_mb": start_rss, "second_half_growth": growth}, indent=1))
    return 0 if verdict == "PLATEAU" else 1


if __name__ == "__main__":
    sys.exit(main())
