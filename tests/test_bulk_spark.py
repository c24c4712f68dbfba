"""Spark's ``predict_batch_udf`` with :class:`SentimentPredictor` (docs/bulk.md, "On a cluster: Spark"):
the docs' snippet on a local Spark (``local[2]``: a JVM and Python worker processes), against the
engine. Needs Java 17+ besides pyspark (in the dev extra); without Java it skips, saying so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sentiment.engine import ScoreRequest, SentimentEngine
from tests.bulk_data import TOLERANCE
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_predict_batch_udf_scores_a_table_like_the_engine(tiny_artifacts: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyspark")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs Java 17 or later (apt-get install openjdk-17-jre-headless)")
    # Spark's Python workers must import app/ as the driver does (an installed package needs nothing).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import SparkSession

    from app.bulk.predictor import SentimentPredictor, spark_schema

    def make_predict_fn():  # the docs' snippet, with the test's model
        return SentimentPredictor(tiny_artifacts).predict

    spark = (SparkSession.builder.master("local[2]").appName("sentiment-test").config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    try:
        texts = ["a great film", "", "the movie was awful !", "good " * 40, "   ", "bad bad bad"]
        reviews = spark.createDataFrame(list(zip(range(len(texts)), texts)), "id long, text string")
        score = predict_batch_udf(make_predict_fn, return_type=spark_schema(), batch_size=4)
        rows = reviews.withColumn("score", score("text")).select("id", "score.*").orderBy("id").collect()
    finally:
        spark.stop()
    assert [r["error"] for r in rows] == [None, "empty_text", None, None, "empty_text", None]
    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    good = [t for t, r in zip(texts, rows) if r["error"] is None]
    for row, score in zip([r for r in rows if r["error"] is None], engine.score([ScoreRequest(t) for t in good]).results,
                          strict=True):
        assert abs(row["probability"] - score.probability) <= TOLERANCE
        assert (row["num_tokens"], row["truncated"]) == (score.num_tokens, score.truncated)
        assert row["label"] == ("positive" if score.probability >= 0.5 else "negative")
    assert rows[3]["truncated"] is True  # 40 words, the tiny model keeps 32
