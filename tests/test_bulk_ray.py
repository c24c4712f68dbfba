"""Ray Data (issue 27): :class:`SentimentPredictor` alone, and the docs' example on a real local Ray
cluster: a head and a second node started with ``ray start`` as a user would, 2,000 IMDB test reviews
scored through ``map_batches``, each row equal to the command's.

The cluster is torn down by ending the process groups this test started (not ``ray stop``, which
ends every Ray process on the machine, a developer's own cluster included), also when the test fails.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.bulk import SentimentPredictor
from app.process import free_port
from sentiment.engine import ScoreRequest, SentimentEngine
from tests.bulk_data import BAD_TEXTS, TOLERANCE, imdb_sample, read_output, score_command
from tests.conftest import REPO, SHIPPED, shipped_available

EXAMPLE = REPO / "examples" / "ray_score.py"
# The `ray` command installed beside this interpreter (the one a user types), else the one on PATH.
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def test_the_predictor_scores_a_batch_column_like_the_command(tiny_artifacts: Path) -> None:
    import pyarrow as pa

    predictor = SentimentPredictor(tiny_artifacts)
    texts = np.array(["a great film", None, "  ", "the movie was bad !", math.nan, "<br />"], dtype=object)
    out = predictor({"id": np.arange(6), "text": texts}).to_pydict()
    assert out["id"] == list(range(6)) and out["text"][0] == "a great film"  # the batch's columns pass through
    assert out["error"] == [None, "missing_field", "empty_text", None, "missing_field", "empty_text"]
    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    expected = engine.score([ScoreRequest("a great film"), ScoreRequest("the movie was bad !")]).results
    for row, score in zip((0, 3), expected):
        assert abs(out["probability"][row] - score.probability) <= TOLERANCE
        assert (out["num_tokens"][row], out["truncated"][row]) == (score.num_tokens, score.truncated)
        assert out["label"][row] == ("positive" if score.probability >= 0.5 else "negative")
    assert out["probability"][1] is None and out["label"][1] is None
    # Types are fixed, also for a batch without any error (Arrow would infer its null type).
    clean = predictor({"text": np.array(["a great film"], dtype=object)})
    assert clean.schema.field("error").type == pa.string() and clean.column("error").to_pylist() == [None]
    # Spark's predict_batch_udf calls the predict function with a bare column; not_a_string as in the command.
    bare = predictor.predict(["a great film", 7])
    assert list(bare["probability"]) == [out["probability"][0], None] and list(bare["error"]) == [None, "not_a_string"]


def test_the_docs_show_the_program_that_the_cluster_test_runs() -> None:
    docs = (REPO / "docs" / "bulk.md").read_text()
    block = docs[docs.index("```python\nimport argparse") + len("```python\n"):]
    block = block[:block.index("```")]
    assert EXAMPLE.read_text().endswith(block), "docs/bulk.md's Ray example and examples/ray_score.py differ"


class RayCluster:
    """A head and one more node on this machine, each started by ``ray start`` in its own session."""

    def __init__(self, cpus_per_node: int = 2) -> None:
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        self.groups: list[int] = []
        common = [f"--num-cpus={cpus_per_node}", "--object-store-memory=200000000", "--disable-usage-stats"]
        self._start(["--head", f"--port={self.port}", f"--temp-dir={self.temp}", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}", *common])
        self._start([f"--address={self.address}", *common])

    def _start(self, args: list[str]) -> None:
        started = subprocess.Popen([RAY, "start", *args], env=self.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)  # its daemons stay in this process group
        self.groups.append(started.pid)
        out, _ = started.communicate(timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-3000:]}")

    def python(self, *args: Any, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """A driver program run against this cluster, as a user runs one."""
        return subprocess.run([sys.executable, *map(str, args)], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in self.groups:
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(3)  # let raylets and workers exit on their own first
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    pytest.importorskip("ray")  # in the dev extra: CI runs this test
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_2000_reviews_through_ray_data_on_a_two_node_cluster_equal_the_command(
        ray_cluster: RayCluster, tmp_path: Path) -> None:
    if not shipped_available():
        pytest.skip("no shipped model in model_artifacts/")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    reviews = imdb_sample(2000)
    bad = {f"bad-{i}": text for i, text in enumerate(BAD_TEXTS) if "\ud800" not in text}  # Arrow needs UTF-8
    ids = [r.id for r in reviews] + list(bad) + ["bad-null"]
    texts = [r.text for r in reviews] + list(bad.values()) + [None]
    pq.write_table(pa.table({"id": ids, "text": texts}), tmp_path / "reviews.parquet", row_group_size=250)

    nodes = ray_cluster.python("-c", "import ray; ray.init(address='auto'); "
                               "print(sum(n['Alive'] for n in ray.nodes()))")
    assert nodes.returncode == 0 and nodes.stdout.split()[-1] == "2", nodes.stdout + nodes.stderr

    ray_run = ray_cluster.python(EXAMPLE, tmp_path / "reviews.parquet", tmp_path / "ray_out",
                                 "--address", ray_cluster.address, "--actors", "2", "--artifacts", SHIPPED)
    assert ray_run.returncode == 0, ray_run.stderr[-5000:]
    by_ray = {row["id"]: row for row in pq.read_table(tmp_path / "ray_out").to_pylist()}

    command = score_command(tmp_path / "reviews.parquet", "-o", tmp_path / "command.parquet", "--quiet")
    assert command.returncode == 0, command.stderr
    by_command = read_output(tmp_path / "command.parquet")

    assert len(by_ray) == len(by_command) == len(ids)  # every row once
    for row in by_command:
        other = by_ray[row["id"]]
        assert other["error"] == row["error"], row["id"]
        if row["error"] is None:
            assert abs(other["probability"] - row["probability"]) <= TOLERANCE, row["id"]
            assert (other["label"], other["num_tokens"], other["truncated"]) == (
                row["label"], row["num_tokens"], row["truncated"])
    assert sum(row["error"] is not None for row in by_command) == len(bad) + 1
