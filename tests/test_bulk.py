"""``sentiment score`` (issue 27): files in, one scored row per input row out, in order, equal to the
HTTP service's answers; bad rows carry an error and never stop the run; ``--resume`` after a real kill.

The command runs as a user runs it, in its own process with its own model workers; the reference is
the real service (``python -m app``) answering ``POST /v1/predict``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.process import ServiceProcess
from app.resources import usable_cpus
from sentiment.engine import ScoreRequest, SentimentEngine
from tests.bulk_data import (BAD_TEXTS, TOLERANCE, Expected, check_rows, csv_input, imdb_sample, jsonl_input,
                             read_output, score_command, txt_input)
from tests.conftest import REPO, SHIPPED, shipped_available, write_fake_imdb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample() -> list[Expected]:
    return imdb_sample(2000)


@pytest.fixture(scope="module")
def service_answers(sample: list[Expected]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The real service's prediction for every sampled review, and its error code for every bad text."""
    if not shipped_available():
        pytest.skip("no shipped model in model_artifacts/")

    def post(service: ServiceProcess, texts: list[str]) -> httpx.Response:
        # Encoded here: httpx would refuse to encode a lone surrogate; JSON escapes it as "\ud800".
        return httpx.post(service.base_url + "/v1/predict", content=json.dumps({"texts": texts}),
                          headers={"Content-Type": "application/json"}, timeout=120)

    predictions, errors = {}, {}
    with ServiceProcess(SHIPPED) as service:
        texts = [row.text for row in sample]
        for i in range(0, len(texts), 64):
            response = post(service, texts[i:i + 64])
            assert response.status_code == 200, response.text
            predictions.update(zip(texts[i:i + 64], response.json()["predictions"]))
        for text in BAD_TEXTS:
            errors[text] = post(service, [text]).json()["error"]["code"]
    return predictions, errors


def summary_of(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_bad_texts_get_the_same_error_from_the_service(service_answers: tuple[dict, dict[str, str]]) -> None:
    """The command's checks are the service's: each bad text gets the service's error code."""
    assert service_answers[1] == BAD_TEXTS


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
def test_2000_reviews_and_bad_rows_one_row_each_in_order_equal_to_the_service(
        fmt: str, sample: list[Expected], service_answers: tuple[dict, dict], tmp_path: Path) -> None:
    source = tmp_path / f"reviews.{fmt}"
    expected = {"jsonl": jsonl_input, "csv": csv_input, "txt": txt_input}[fmt](source, sample)
    output = tmp_path / f"scored.{'jsonl' if fmt == 'txt' else fmt}"
    done = score_command(source, "--output", output, "--quiet", "--summary-json", tmp_path / "summary.json")
    assert done.returncode == 0, done.stderr
    check_rows(read_output(output), expected, service_answers[0], id_type=str if fmt == "csv" else None)
    summary = summary_of(tmp_path / "summary.json")
    bad = [row.error for row in expected if row.error]
    assert summary["rows"] == len(expected) and summary["scored"] == len(expected) - len(bad)
    assert summary["errors"] == {code: bad.count(code) for code in set(bad)}
    if not torch.cuda.is_available():
        assert summary["workers"] == usable_cpus()  # every core, through the service's worker pool
    assert not Path(str(output) + ".progress").exists()  # a finished run leaves nothing to resume


def test_resume_after_a_kill_halfway_has_no_duplicate_and_no_missing_row(
        sample: list[Expected], service_answers: tuple[dict, dict], tmp_path: Path) -> None:
    source, output = tmp_path / "reviews.jsonl", tmp_path / "scored.jsonl"
    expected = jsonl_input(source, sample)
    progress = Path(str(output) + ".progress")
    command = [sys.executable, "-m", "app.cli", "score", str(source), "--output", str(output), "--quiet",
               "--batch-size", "32"]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        committed = 0
        while committed < len(expected) // 4:  # a quarter committed: kill it (the run goes on meanwhile)
            assert run.poll() is None, f"the run ended before it could be killed: {run.communicate()}"
            assert time.monotonic() < deadline, "the run committed nothing in 300 s"
            try:
                committed = json.loads(progress.read_text())["rows"]
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.communicate()
    written = output.read_bytes()
    assert 0 < written.count(b"\n") < len(expected), "the kill did not come halfway"
    # A kill in the middle of a write leaves half a row: the resumed run must cut it off.
    with output.open("ab") as f:
        f.write(b'{"id": "test/pos/1", "probabil')
    resumed = score_command(source, "--output", output, "--resume", "--quiet", "--summary-json", tmp_path / "s.json")
    assert resumed.returncode == 0, resumed.stderr
    rows = read_output(output)
    check_rows(rows, expected, service_answers[0])  # every row once, in order, right
    summary = summary_of(tmp_path / "s.json")
    assert committed <= summary["resumed_from"] < len(expected)
    assert summary["rows"] == len(expected)  # the counts carry over the kill
    assert sum(summary["errors"].values()) == sum(1 for row in expected if row.error)


def test_resume_refuses_a_changed_input_and_an_output_without_a_record(tiny_artifacts: Path, tmp_path: Path) -> None:
    source, output = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("a good film\n" * 10)
    done = score_command(source, "-o", output, "--artifacts", tiny_artifacts, "--quiet")
    assert done.returncode == 0, done.stderr
    again = score_command(source, "-o", output, "--artifacts", tiny_artifacts, "--resume", "--quiet")
    assert again.returncode == 2 and "nothing to resume" in again.stderr
    # A record left by an interrupted run, then the input changed: resuming would mix two inputs.
    Path(str(output) + ".progress").write_text(json.dumps({"fingerprint": {}, "position": {"bytes": 0}, "rows": 0}))
    changed = score_command(source, "-o", output, "--artifacts", tiny_artifacts, "--resume", "--quiet")
    assert changed.returncode == 2 and "changed since the interrupted run" in changed.stderr


def test_parquet_in_and_out_keeps_ids_and_types(tiny_artifacts: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = ["a great film", None, "", "the movie was awful !", "good " * 30, "bad bad bad"]
    pq.write_table(pa.table({"review_id": pa.array([10, 20, 30, 40, 50, 60], pa.int32()), "stars": [5, 1, 3, 1, 5, 1],
                             "body": texts}), tmp_path / "in.parquet", row_group_size=2)
    done = score_command(tmp_path / "in.parquet", "--text-field", "body", "--id-field", "review_id", "--workers", "0",
                         "--artifacts", tiny_artifacts, "--quiet")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "in.scored.parquet")  # the default output: beside the input, same format
    assert table.schema.field("review_id").type == pa.int32()
    assert table.column_names == ["review_id", "probability", "label", "num_tokens", "truncated", "error"]
    rows = table.to_pylist()
    assert [r["review_id"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert [r["error"] for r in rows] == [None, "missing_field", "empty_text", None, None, None]
    engine = SentimentEngine.load(tiny_artifacts, "cpu")
    scores = engine.score([ScoreRequest(t) for t in texts if t])
    for row, score in zip([r for r in rows if r["error"] is None], scores.results, strict=True):
        assert abs(row["probability"] - score.probability) <= TOLERANCE
        assert row["truncated"] == score.truncated and row["num_tokens"] == score.num_tokens


def test_an_imdb_folder_reports_accuracy_and_each_review_keeps_its_file(tiny_artifacts: Path, tmp_path: Path) -> None:
    folder = write_fake_imdb(tmp_path, n_per_class=12, as_archive=False) / "aclImdb" / "test"
    (folder / "pos" / "99_10.txt").write_bytes(b"caf\xe9 ! a great film")  # not UTF-8: an error row, not a crash
    output = tmp_path / "scored.csv"
    done = score_command(folder, "-o", output, "--artifacts", tiny_artifacts, "--trace", "--quiet",
                         "--summary-json", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    rows = read_output(output)
    assert [r["id"] for r in rows] == [f"neg/{i}_{1 + i % 3}" for i in range(12)] + [
        f"pos/{i}_{8 + i % 3}" for i in range(12)] + ["pos/99_10"]
    assert rows[-1]["error"] == "invalid_utf8" and rows[-1]["expected"] == "positive"
    scored = [r for r in rows if r["error"] is None]
    correct = sum((r["label"] == r["expected"]) for r in scored)
    summary = summary_of(tmp_path / "s.json")
    assert summary["labelled"] == 24 and summary["accuracy"] == pytest.approx(correct / 24)
    assert f"accuracy {correct / 24:.4f} on 24 labelled reviews" in done.stdout
    for r in scored:  # --trace: the running probability ends at the text's probability
        trace, tokens = json.loads(r["trace"]), json.loads(r["tokens"])
        assert len(trace) == len(tokens) == r["num_tokens"] and abs(trace[-1] - r["probability"]) <= TOLERANCE


def test_problems_with_the_whole_input_fail_before_scoring_with_status_2(tmp_path: Path) -> None:
    (tmp_path / "no_text.csv").write_text("id,review\n1,a great film\n")
    (tmp_path / "reviews.xlsx").write_text("")
    (tmp_path / "ok.txt").write_text("a good film\n")
    (tmp_path / "ok.jsonl").write_text('{"text": "a good film"}\n')
    for args, message in ((["missing.jsonl"], "no such file"), (["no_text.csv"], "no column 'text'"),
                          (["reviews.xlsx"], "the extension must be"),
                          (["ok.txt", "-o", "out.xlsx"], "output's extension must be"),
                          (["ok.jsonl", "-o", "ok.jsonl"], "would overwrite the input")):
        done = score_command(*[tmp_path / a if not a.startswith("-") else a for a in args])
        assert (done.returncode, message in done.stderr) == (2, True), (args, done.stderr)


def test_a_run_whose_model_cannot_load_fails_with_status_1(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a good film\n")
    (tmp_path / "empty_artifacts").mkdir()
    done = score_command(tmp_path / "in.txt", "--artifacts", tmp_path / "empty_artifacts", "--workers", "1", "--quiet")
    assert done.returncode == 1 and "the run failed" in done.stderr, done.stderr


def test_the_console_script_is_the_command(tmp_path: Path) -> None:
    """``pip install`` puts ``sentiment`` on PATH; it must point at the function the tests run."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["sentiment"].partition(":")
    assert (module, function) == ("app.cli", "main")
    from app.cli import main

    assert main(["score", str(tmp_path / "missing.txt")]) == 2
