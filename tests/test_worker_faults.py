"""The worker pool against workers that freeze, die, answer garbage or meet a text that kills them,
and a front that is killed: real ``python -m app.model_worker`` processes (or ``tests.faulty_worker``,
the same worker with faults triggered by marker texts) and real signals."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.process import ServiceProcess
from app.scorer import TextRejectedError
from app.settings import Settings
from app.worker_process import worker_env
from app.workers import WorkerConfig, WorkerPool
from sentiment.engine import Score, ScoreRequest
from tests.conftest import make_tiny_artifacts, wait_ready

pytestmark = pytest.mark.slow
FAULTY = [sys.executable, "-m", "tests.faulty_worker"]


def pool_of(artifacts: Path, count: int = 2, faulty: bool = False, **options) -> WorkerPool:
    pool = WorkerPool(WorkerConfig(str(artifacts), "cpu", "fp32", None, None, 16_384, True), count, **options)
    if faulty:
        pool.command = FAULTY
    pool.start()
    return pool


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state != "Z"  # a zombie has exited


def test_a_frozen_worker_is_killed_and_its_batch_scored_by_another(tiny_artifacts: Path) -> None:
    failures: list[str] = []
    pool = pool_of(tiny_artifacts, deadline_cap_s=2.0, deadline_floor_s=0.5, on_failure=failures.append)
    try:
        batch = [ScoreRequest(f"good movie , the film was great . {i}", trace=True) for i in range(64)]
        expected = [s.probability for s in pool.score(batch).results]
        frozen = pool.pids()[0]
        os.kill(frozen, signal.SIGSTOP)  # idle: the next batch it takes never comes back
        started = time.monotonic()
        results = [pool.score(batch).results for _ in range(2)]  # one of them lands on the frozen worker
        assert time.monotonic() - started < 15
        for run in results:
            assert [r.probability for r in run] == pytest.approx(expected, abs=1e-6)
        assert failures == ["deadline"] and not alive(frozen)
        deadline = time.monotonic() + 30
        while pool.ready < 2 and time.monotonic() < deadline:  # the replacement warms up
            time.sleep(0.05)
        assert pool.ready == 2 and frozen not in pool.pids()
    finally:
        pool.close()


def test_an_undecodable_reply_replaces_the_worker_and_spares_the_neighbours(tiny_artifacts: Path) -> None:
    failures: list[str] = []
    pool = pool_of(tiny_artifacts, faulty=True, on_failure=failures.append)
    try:
        results = pool.score([ScoreRequest("good film"), ScoreRequest("GARBAGE film"), ScoreRequest("bad film")]).results
        assert isinstance(results[0], Score) and isinstance(results[2], Score)
        assert isinstance(results[1], TextRejectedError)  # alone, it broke its worker's reply again
        assert failures == ["bad_reply", "bad_reply"]
    finally:
        pool.close()


def test_a_text_that_kills_its_worker_fails_alone_and_never_reaches_a_worker_again(tiny_artifacts: Path) -> None:
    failures: list[str] = []
    pool = pool_of(tiny_artifacts, faulty=True, on_failure=failures.append)
    try:
        good = pool.score([ScoreRequest("good film")]).results[0]
        results = pool.score([ScoreRequest("good film"), ScoreRequest("a CRASH text"), ScoreRequest("bad")]).results
        assert results[0] == good and isinstance(results[2], Score)
        assert isinstance(results[1], TextRejectedError)
        assert failures == ["exit", "exit"]  # the batch, then the text alone
        again = pool.score([ScoreRequest("a CRASH text"), ScoreRequest("good film")]).results
        assert isinstance(again[0], TextRejectedError) and again[1] == good
        assert failures == ["exit", "exit"]  # refused before any worker saw it
    finally:
        pool.close()


def test_over_http_a_poison_text_is_a_422_and_the_pod_stays_ready(tiny_artifacts: Path, monkeypatch) -> None:
    monkeypatch.setattr(WorkerPool, "command", FAULTY)
    with TestClient(create_app(Settings(artifacts_dir=tiny_artifacts, workers=2))) as client:
        wait_ready(client)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            poison = pool.submit(client.post, "/v1/predict", json={"texts": ["good", "it will CRASH now"]})
            others = [pool.submit(client.post, "/v1/predict", json={"texts": [f"good film {i}"]}) for i in range(20)]
            r = poison.result()
            assert all(o.result().status_code == 200 for o in others)
        assert r.status_code == 422 and r.json()["error"]["code"] == "text_crashed_worker", r.text
        assert r.json()["error"]["details"][0]["loc"] == ["body", "texts", 1]
        assert client.get("/health/ready").status_code == 200  # the other worker serves meanwhile
        metrics = client.get("/metrics").text
        assert "sentiment_poison_texts_total 1.0" in metrics
        assert 'sentiment_worker_failures_total{reason="exit"}' in metrics


def test_readiness_stays_200_while_a_killed_worker_is_replaced(tiny_artifacts: Path) -> None:
    with TestClient(create_app(Settings(artifacts_dir=tiny_artifacts, workers=2))) as client:
        wait_ready(client)
        pool = client.app.state.service.lifecycle.scorer
        os.kill(pool.pids()[0], signal.SIGKILL)
        seen, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            r = client.get("/health/ready")
            seen.append((r.status_code, r.json()["detail"]))
            assert client.post("/v1/predict", json={"texts": ["good"]}).status_code == 200
            if pool.restarts and pool.ready == 2:
                break
        assert all(status == 200 for status, _ in seen), seen
        assert any(detail and "1 of 2 model workers restarting" in detail for _, detail in seen), seen
        assert "sentiment_workers 2.0" in client.get("/metrics").text


def test_a_replacement_that_loaded_another_model_is_not_used(tiny_artifacts: Path, tmp_path: Path) -> None:
    served = shutil.copytree(tiny_artifacts, tmp_path / "artifacts")
    pool = pool_of(served)
    try:
        other = make_tiny_artifacts(tmp_path / "other", seed=1)
        for name in ("model.pt", "vocab.json", "model_card.json"):
            shutil.copy(other / name, served / name)  # someone replaced the files under a running pod
        os.kill(pool.pids()[0], signal.SIGKILL)
        assert isinstance(pool.score([ScoreRequest("good")]).results[0], Score)  # the other worker serves
        time.sleep(3)  # the replacement loads the new files and is refused (then retried with a backoff)
        assert pool.ready == 1
        assert pool.degraded_detail() == "1 of 2 model workers restarting (requests are served by the others)"
    finally:
        pool.close()


def test_workers_get_no_secrets(monkeypatch) -> None:
    env = worker_env({"PATH": "/usr/bin", "SENTIMENT_API_KEY": "s3cret", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x",
                      "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8", "AWS_SECRET_ACCESS_KEY": "k"})
    assert set(env) == {"PATH", "OMP_NUM_THREADS", "LC_ALL", "PYTHONPATH"}


def test_no_worker_outlives_a_killed_front(tiny_artifacts: Path) -> None:
    with ServiceProcess(tiny_artifacts, {"SENTIMENT_WORKERS": "2", "SENTIMENT_API_KEY": "s3cret"}) as server:
        children = [int(p) for task in Path(f"/proc/{server.pid}/task").iterdir()  # spawned by any thread
                    for p in (task / "children").read_text().split()]
        assert len(children) == 2
        for pid in children:  # and the key the front checks never reached them
            assert b"s3cret" not in Path(f"/proc/{pid}/environ").read_bytes()
        r = httpx.post(server.base_url + "/v1/predict", json={"texts": ["good"]},
                       headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        server.kill()  # SIGKILL: no shutdown code runs in the front
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in children)
