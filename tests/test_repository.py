"""The model repository (issue 26): swap without downtime, shadow, and the admin key.

Real processes: ``python -m app`` with two model workers, serving a repository that holds the tiny
model under two names (``a`` and ``b``), a broken copy (``broken``: model.pt corrupted) and a
symlink out of it (``escape``). Plus unit tests of the invariant every swap relies on: each request
is pinned to one version, explanation chunks included, and an engine refuses any other.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.admission import plan
from app.errors import ApiError
from app.metrics import ServiceMetrics
from app.model_control import VersionPins
from app.process import ServiceProcess
from app.repository import ModelRepository
from app.scorer import BatchLostError, CandidateError, ModelSummary
from app.shadow import SHADOW_QUEUE, Shadow
from app.workers import WorkerConfig, WorkerPool
from sentiment.engine import (
    Score,
    ScoredBatch,
    ScoreRequest,
    SentimentEngine,
    VersionMismatchError,
)
from tests.test_workers import metric, worker_pids

ADMIN, PREDICT = "admin-key-for-tests", "predict-key-for-tests"
ENDPOINTS = ["/v2/repository/index", "/v2/repository/models/sentiment/load", "/v2/repository/models/sentiment/unload"]
TEXTS = ["good", "a great film", "the movie was awful !", "bad bad bad , the film was awful", "good movie . " * 9]


def summary(version: str) -> ModelSummary:
    return ModelSummary(version, "cpu", "fp32", {}, 14, 400, 400)


# ---- the invariant: one request, one version ----------------------------------------------------

def test_an_engine_refuses_a_request_pinned_to_another_version(tiny_artifacts: Path) -> None:
    engine = SentimentEngine.load(tiny_artifacts, "cpu", version="a")
    batch = engine.score([ScoreRequest("good film", version="a"), ScoreRequest("good film", version="b"),
                          ScoreRequest("good film")])
    assert engine.version == "a" and batch.errors == [1]
    assert isinstance(batch.results[1], VersionMismatchError) and "'b'" in str(batch.results[1])
    assert batch.results[0].probability == batch.results[2].probability


def test_every_item_of_a_request_is_pinned_to_the_version_it_was_admitted_for() -> None:
    work = plan(["good movie . " * 30, "bad"], trace=True, gates=False, explain=True, model=summary("v7"))
    assert len(work.requests) > 2  # the long text's explanation is several items
    assert {r.version for r in work.requests} == {"v7"}
    assert {r.version for r in plan(["good"], False, False, False, summary("v8")).requests} == {"v8"}


def test_the_served_version_changes_only_between_requests_and_the_old_one_drains() -> None:
    pins = VersionPins()
    served = [summary("a")]
    first = pins.hold(lambda: served[0])
    pins.flip(lambda: served.__setitem__(0, summary("b")))
    assert pins.hold(lambda: served[0]).version == "b"  # new requests get the new version at once
    assert first.version == "a" and pins.outstanding("a") == 1
    assert not pins.wait_until_free("a", 0.01)
    pins.release("a")
    assert pins.wait_until_free("a", 5) and pins.outstanding("b") == 1


def test_a_shadow_counts_agreement_and_drops_what_it_cannot_keep_up_with(tiny_artifacts: Path) -> None:
    engine = SentimentEngine.load(tiny_artifacts, "cpu", version="c")
    served = engine.score([ScoreRequest(t) for t in TEXTS])
    shadow = Shadow("c", 1.0, engine.score, ServiceMetrics())
    shadow.offer([ScoreRequest(t) for t in TEXTS] + [ScoreRequest("good", explain=True)],
                 served.results + [served.results[0]])  # explanation items are never shadowed
    deadline = time.monotonic() + 30
    while shadow.summary()["texts"] < len(TEXTS) and time.monotonic() < deadline:
        time.sleep(0.02)
    shadow.stop()
    shadow.join()
    measured = shadow.summary()
    assert measured["texts"] == measured["agreements"] == len(TEXTS) and measured["mean_abs_delta"] == 0

    release = threading.Event()

    def busy(requests: list[ScoreRequest]) -> ScoredBatch:  # a candidate that cannot keep up
        release.wait(30)
        return engine.score(requests)

    slow = Shadow("c", 1.0, busy, ServiceMetrics())
    many = [ScoreRequest(f"good film {i}") for i in range(SHADOW_QUEUE + 100)]
    slow.offer(many, [Score(0.9, 3, False, 3)] * len(many))  # returns at once: nothing waits for the candidate
    release.set()
    slow.stop()
    slow.join()
    assert slow.summary()["dropped"] >= 100 - 32  # at most one batch was taken out of the queue meanwhile


def test_the_pool_routes_each_item_to_a_worker_of_its_version_and_frees_the_old_one(tiny_artifacts: Path,
                                                                                      tmp_path: Path) -> None:
    for name in ("a", "b"):
        shutil.copytree(tiny_artifacts, tmp_path / name)
    pool = WorkerPool(WorkerConfig(str(tmp_path / "a"), "cpu", "fp32", None, None, 16_384, True, version="a"), 1)
    assert pool.start().version == "a"
    try:
        with pytest.raises(CandidateError, match="ArtifactError"):
            pool.add_version(str(tmp_path / "nowhere"), "c")
        assert pool.add_version(str(tmp_path / "b"), "b").version == "b"
        assert pool.versions() == {"a": 1, "b": 1}
        assert pool.promote("b").version == "b"
        mixed = pool.score([ScoreRequest("good film", version="a"), ScoreRequest("good film", version="b"),
                            ScoreRequest("good film")])  # by b, the first would be refused
        assert mixed.errors == [] and len({r.probability for r in mixed.results}) == 1
        pool.retire("a")
        assert pool.versions() == {"b": 1} and len(pool.pids()) == 1 and pool.ready == 1
        late = pool.score([ScoreRequest("good film", version="a")])  # a request that outlived its version
        assert isinstance(late.results[0], BatchLostError)
    finally:
        pool.close()


# ---- names, never paths -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: Path) -> Path:
    root = tmp_path_factory.mktemp("repository")
    for name in ("a", "b", "broken"):
        shutil.copytree(tiny_artifacts, root / name)
    with open(root / "broken" / "model.pt", "r+b") as fh:  # one flipped byte: the checksum catches it
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(tiny_artifacts, outside / "model")
    (root / "escape").symlink_to(outside / "model", target_is_directory=True)
    (root / "notes.txt").write_text("not a version")
    return root


def test_a_version_is_a_name_inside_the_repository(repository: Path) -> None:
    repo = ModelRepository(repository)
    assert repo.resolve("a") == (repository / "a").resolve()
    for name, status in [("../model_artifacts", 400), ("/etc", 400), (".", 400), ("..", 400), ("a/../b", 400),
                         ("", 400), ("nope", 404), ("escape", 422), ("notes.txt", 422)]:
        with pytest.raises(ApiError) as caught:
            repo.resolve(name)
        assert caught.value.status == status, name
    states = {e.name: e.problem for e in repo.entries()}
    assert states["a"] is None and states["b"] is None
    assert "model.pt does not match the checksum" in states["broken"]
    assert "outside the model repository" in states["escape"]


# ---- the real service -----------------------------------------------------------------------------

def admin(base: str, path: str, body: dict | None = None, key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(base + path, json=body, headers=headers, timeout=120)


def load(base: str, version: str, **extra: object) -> httpx.Response:
    return admin(base, "/v2/repository/models/sentiment/load", {"parameters": {"version": version, **extra}})


def states(base: str) -> dict[str, str]:
    return {e["version"]: e["state"] for e in admin(base, "/v2/repository/index").json()}


class ProcessCount:
    """The most model-worker processes a server ran while this context was open (sampled)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid, self.most = server_pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.most = max(self.most, len(worker_pids(self.server_pid)))
            except (FileNotFoundError, ProcessLookupError):  # a process ended while it was read
                pass
            time.sleep(0.005)

    def __enter__(self) -> ProcessCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def predict(client: httpx.Client, base: str, kind: int) -> tuple[int, str | None]:
    """One request of three kinds (plain v1, explained v1, v2 infer): its status and the version named."""
    if kind == 2:
        r = client.post(base + "/v2/models/sentiment/infer", json={"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS[:2]}]})
        return r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text
    body = {"texts": TEXTS, **({"explain": "occlusion"} if kind == 1 else {})}
    r = client.post(base + "/v1/predict", json=body)
    return r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text


@pytest.fixture(scope="module")
def server(repository: Path):
    env = {"SENTIMENT_WORKERS": "2", "SENTIMENT_MODEL_REPOSITORY": str(repository),
           "SENTIMENT_ADMIN_KEY": ADMIN, "SENTIMENT_API_KEY": PREDICT,
           # Long batch deadlines: one test freezes workers for the seconds a candidate takes to load;
           # small batches: requests then wait in the queue rather than all inside the frozen batches.
           "SENTIMENT_BATCH_DEADLINE_FLOOR_S": "60", "SENTIMENT_BATCH_DEADLINE_CAP_S": "60",
           "SENTIMENT_MAX_BATCH_SIZE": "4"}
    with ServiceProcess(repository / "a", env) as process:
        yield process


def test_repository_endpoints_need_the_admin_key_and_a_prediction_key_never_opens_them(server: ServiceProcess) -> None:
    for path in ENDPOINTS:
        body = {"parameters": {"version": "b"}}
        assert admin(server.base_url, path, body, key=None).status_code == 401, path
        assert admin(server.base_url, path, body, key="wrong").status_code == 401, path
        refused = admin(server.base_url, path, body, key=PREDICT)
        assert refused.status_code == 403 and refused.headers["X-Error-Code"] == "forbidden", path
    assert states(server.base_url)["a"] == "serving"  # nothing was loaded by any of them


def test_a_version_that_is_a_path_is_refused(server: ServiceProcess) -> None:
    for version, status in [("../model_artifacts", 400), ("/etc", 400), ("escape", 422), ("nope", 404)]:
        r = load(server.base_url, version)
        assert r.status_code == status, (version, r.text)
        assert "error" in r.json() and r.headers["X-Error-Code"]
    assert load(server.base_url, "b", shadow_fraction=2).status_code == 400
    assert admin(server.base_url, "/v2/repository/models/other/load", {"parameters": {"version": "b"}}).status_code == 404
    index = states(server.base_url)
    assert index == {"a": "serving", "b": "available", "broken": "invalid", "escape": "invalid"}


def test_loading_b_while_a_serves_fails_no_request(server: ServiceProcess) -> None:
    base = server.base_url
    stop = threading.Event()
    answers: list[tuple[float, int, str | None]] = []

    def client(i: int) -> None:  # closed loop: the next request as soon as the last one is answered
        with httpx.Client(headers={"Authorization": f"Bearer {PREDICT}"}, timeout=60) as http:
            while not stop.is_set():
                status, version = predict(http, base, i % 3)
                answers.append((time.monotonic(), status, version))

    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        clients = [pool.submit(client, i) for i in range(16)]
        while len(answers) < 32:
            time.sleep(0.01)
        # Freeze a's workers, so that requests admitted for a are certainly still queued when b takes
        # over: they must be scored by a all the same (by b, they would fail).
        frozen = worker_pids(server.pid)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        with ProcessCount(server.pid) as processes:
            loading = pool.submit(load, base, "b")
            deadline = time.monotonic() + 60
            while httpx.get(base + "/v1/model").json()["version"] != "b" and time.monotonic() < deadline:
                time.sleep(0.01)
            flipped = time.monotonic()
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            swapped = loading.result()
        done = time.monotonic()
        while sum(1 for t, _, _ in answers if t > done + 0.5) < 32:
            time.sleep(0.01)
        stop.set()
        for c in clients:
            c.result()
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["previous"] == "a"
    failed = [(status, version) for _, status, version in answers if status != 200]
    assert not failed, failed[:3]
    assert {version for _, _, version in answers} == {"a", "b"}
    assert any(version == "a" for t, _, version in answers if t > flipped)  # a's requests outlived the switch
    assert {version for t, _, version in answers if t > done + 0.5} == {"b"}  # a is gone
    assert httpx.get(base + "/v1/model").json()["version"] == "b"
    assert len(worker_pids(server.pid)) == 2  # a freed, b at full strength
    assert processes.most == 3  # never more than one worker over the pool's count (the memory bound)
    assert states(base)["b"] == "serving" and states(base)["a"] == "available"


def test_a_broken_candidate_is_refused_naming_the_problem_and_b_keeps_serving(server: ServiceProcess,
                                                                             repository: Path) -> None:
    r = load(server.base_url, "broken")
    assert r.status_code == 422 and r.headers["X-Error-Code"] == "invalid_model_version"
    assert "model.pt does not match the checksum" in r.json()["error"], r.text
    assert str(repository) not in r.json()["error"]  # named inside the version, without the server's paths
    with httpx.Client(headers={"Authorization": f"Bearer {PREDICT}"}) as http:
        assert predict(http, server.base_url, 0) == (200, "b")
    assert len(worker_pids(server.pid)) == 2
    assert metric(server.base_url, 'sentiment_model_loads_total{outcome="refused"}') >= 1


def test_a_shadow_of_a_beside_b_agrees_fully_and_unload_ends_it(server: ServiceProcess) -> None:
    base = server.base_url
    r = load(base, "a", mode="shadow", shadow_fraction=1.0)
    assert r.status_code == 200, r.text
    assert states(base) == {"a": "shadow", "b": "serving", "broken": "invalid", "escape": "invalid"}
    assert len(worker_pids(server.pid)) == 3  # the candidate is one extra worker
    assert load(base, "b", mode="shadow").status_code == 409  # the served version cannot shadow itself
    with httpx.Client(headers={"Authorization": f"Bearer {PREDICT}"}) as http:
        for i in range(12):
            assert predict(http, base, i % 3) == (200, "b")  # callers get the served answers
    plain = 4 * len(TEXTS) + 4 * 2  # four plain /v1 requests and four /v2 ones; explanations are not shadowed
    deadline = time.monotonic() + 60
    while metric(base, "sentiment_shadow_texts_total") < plain and time.monotonic() < deadline:
        time.sleep(0.05)
    texts = metric(base, "sentiment_shadow_texts_total")
    assert texts == plain
    assert metric(base, "sentiment_shadow_agreements_total") == texts  # the same weights: 100 % agreement
    assert metric(base, "sentiment_shadow_fraction") == 1.0
    shadow = httpx.get(base + "/v1/model").json()["shadow"]
    assert shadow["version"] == "a" and shadow["agreement_rate"] == 1.0 and shadow["mean_abs_delta"] < 1e-5
    assert admin(base, "/v2/repository/models/sentiment/unload", {"parameters": {"version": "b"}}).status_code == 409
    ended = admin(base, "/v2/repository/models/sentiment/unload", {"parameters": {"version": "a"}})
    assert ended.status_code == 200 and ended.json()["shadow"]["texts"] >= texts
    assert metric(base, "sentiment_shadow_fraction") == 0
    assert httpx.get(base + "/v1/model").json()["shadow"] is None
    assert states(base)["a"] == "available" and len(worker_pids(server.pid)) == 2


def test_a_plain_load_of_the_shadowed_version_promotes_it(server: ServiceProcess) -> None:
    base = server.base_url
    assert load(base, "a", mode="shadow", shadow_fraction=0.5).status_code == 200
    with ProcessCount(server.pid) as processes:
        promoted = load(base, "a")
    assert processes.most == 3  # the shadow worker was the one extra; each new worker took an old one's place
    assert promoted.status_code == 200 and promoted.json()["previous"] == "b", promoted.text
    assert httpx.get(base + "/v1/model").json()["version"] == "a"
    assert states(base)["a"] == "serving" and states(base)["b"] == "available"
    assert len(worker_pids(server.pid)) == 2  # the shadow worker made way for normal workers
    assert metric(base, "sentiment_workers_ready") == 2


def test_the_in_process_model_swaps_and_shadows_too(make_client, repository: Path) -> None:
    client = make_client(artifacts_dir=repository / "a", model_repository=repository, admin_key=ADMIN)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    assert client.get("/v1/model").json()["version"] == "a"
    r = client.post("/v2/repository/models/sentiment/load", json={"parameters": {"version": "b"}}, headers=auth)
    assert r.status_code == 200, r.text
    assert client.post("/v1/predict", json={"texts": ["good"]}).json()["model"]["version"] == "b"
    r = client.post("/v2/repository/models/sentiment/load", headers=auth,
                    json={"parameters": {"version": "a", "mode": "shadow", "shadow_fraction": 1}})
    assert r.status_code == 200, r.text
    assert client.post("/v1/predict", json={"texts": TEXTS}).status_code == 200
    deadline = time.monotonic() + 30
    while client.get("/v1/model").json()["shadow"]["texts"] < len(TEXTS) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.get("/v1/model").json()["shadow"]["agreement_rate"] == 1.0
    r = client.post("/v2/repository/models/sentiment/load", json={"parameters": {"version": "broken"}}, headers=auth)
    assert r.status_code == 422 and "checksum" in r.json()["error"]


def test_without_an_admin_key_the_repository_endpoints_do_not_exist(make_client, repository: Path) -> None:
    client = make_client(artifacts_dir=repository / "a", model_repository=repository)
    for path in ENDPOINTS:
        assert client.post(path, json={"parameters": {"version": "b"}}).status_code == 404
