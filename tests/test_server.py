"""Against a real uvicorn process: batch invariance under hundreds of concurrent requests, and a
graceful SIGTERM (readiness 503, accepted work finished, exit status 0)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest

from app.process import ServiceProcess
from tests.conftest import SHIPPED, shipped_available

pytestmark = pytest.mark.slow

WORDS = ["good", "great", "bad", "awful", "movie", "film", "the", "was", "a", "!", ".", ",", "plot", "acting"]


@pytest.fixture(params=["tiny", "shipped"])
def artifacts(request, tiny_artifacts) -> Path:
    if request.param == "shipped":
        if not shipped_available():
            pytest.skip("no shipped model in model_artifacts/")
        return SHIPPED
    return tiny_artifacts


def test_concurrent_requests_get_the_same_answer_as_alone(artifacts: Path) -> None:
    rng = random.Random(7)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for _ in range(60)]
    server = ServiceProcess(artifacts, {"SENTIMENT_MAX_WAIT_MS": "5"})
    base = server.base_url
    try:
        alone = {}
        with httpx.Client(base_url=base, timeout=30) as c:
            for t in texts:
                alone[t] = c.post("/v1/predict", json={"texts": [t]}).json()["predictions"][0]["probability"]

        async def burst() -> list[tuple[list[str], httpx.Response]]:
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
            async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
                jobs = []
                for _ in range(300):  # hundreds of concurrent callers, 1-4 texts each
                    chosen = rng.sample(texts, rng.randint(1, 4))
                    jobs.append((chosen, c.post("/v1/predict", json={"texts": chosen, "trace": rng.random() < 0.3})))
                responses = await asyncio.gather(*(j[1] for j in jobs))
                return [(j[0], r) for j, r in zip(jobs, responses)]

        results = asyncio.run(burst())
        for chosen, r in results:
            assert r.status_code == 200, r.text
            got = [p["probability"] for p in r.json()["predictions"]]
            assert got == pytest.approx([alone[t] for t in chosen], abs=1e-5)
        metrics = httpx.get(base + "/metrics").text
        # Coalescing really happened: some batch held more than 4 texts (one request's maximum).
        count = float(next(l for l in metrics.splitlines() if l.startswith("sentiment_batch_size_count")).split()[-1])
        small = float(next(l for l in metrics.splitlines() if l.startswith('sentiment_batch_size_bucket{le="4.0"}')).split()[-1])
        assert small < count, "no batch ever combined several requests"
    finally:
        server.stop()


def test_sigterm_drains_then_exits_cleanly(tiny_artifacts: Path) -> None:
    server = ServiceProcess(tiny_artifacts, {"SENTIMENT_SHUTDOWN_DELAY_S": "1.0"})
    base = server.base_url

    async def scenario() -> tuple[list[int], int]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            inflight = [asyncio.ensure_future(c.post("/v1/predict", json={"texts": ["good film " * 10] * 8}))
                        for _ in range(20)]
            await asyncio.sleep(0.05)
            server.terminate()
            await asyncio.sleep(0.3)  # inside the shutdown delay: still listening, but not ready
            ready = (await c.get("/health/ready")).status_code
            responses = await asyncio.gather(*inflight)
            return [r.status_code for r in responses], ready

    statuses, ready_during_drain = asyncio.run(scenario())
    assert ready_during_drain == 503
    assert statuses == [200] * 20  # accepted work finished
    assert server.wait(30) == 0
    assert "Traceback" not in server.output()


def test_test_set_figure_reproduces_over_http(tiny_artifacts: Path, tmp_path: Path, capsys) -> None:
    """The evaluation CLI gives the same metrics in-process (the engine) and through the service."""
    import json

    from tests.conftest import write_fake_imdb
    from training import evaluate

    data = write_fake_imdb(tmp_path)
    assert evaluate.main(["--artifacts", str(tiny_artifacts), "--data", str(data), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with ServiceProcess(tiny_artifacts) as server:
        assert evaluate.main(["--url", server.base_url, "--data", str(data), "--json"]) == 0
        served = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert served == offline and served["n"] == 24
