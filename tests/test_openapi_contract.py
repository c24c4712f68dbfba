"""The OpenAPI document and the server agree: Schemathesis, with its default checks, over every v1
and v2 operation of a real ``python -m app`` (one model worker per core, as users run it), and the
error shapes each protocol promises, checked directly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.process import ServiceProcess

CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_artifacts: Path):
    # A small body limit, so that the 413 before parsing is cheap to reach.
    with ServiceProcess(tiny_artifacts, {"SENTIMENT_WORKERS": "2", "SENTIMENT_MAX_BODY_BYTES": "100000"}) as process:
        yield process


@pytest.fixture(scope="module")
def keyed_server(tiny_artifacts: Path):
    with ServiceProcess(tiny_artifacts, {"SENTIMENT_WORKERS": "1", "SENTIMENT_API_KEY": "contract-key"}) as process:
        yield process


def schemathesis(base_url: str, max_examples: int) -> subprocess.CompletedProcess[str]:
    """The Schemathesis CLI over the server's own /openapi.json (config: tests/schemathesis.toml)."""
    version = httpx.get(f"{base_url}/v1/model").json()["version"]
    cli = shutil.which("schemathesis") or shutil.which("st")
    command = [cli] if cli else [sys.executable, "-m", "schemathesis.cli"]
    return subprocess.run(
        [*command, "--no-color", "--config-file", str(CONFIG), "run", f"{base_url}/openapi.json",
         "--max-examples", str(max_examples)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "SENTIMENT_TEST_MODEL_VERSION": version})


def test_schemathesis_finds_no_failure_in_v1_or_v2(server: ServiceProcess) -> None:
    run = schemathesis(server.base_url, max_examples=60)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Tested: 14" in run.stdout, run.stdout[-2000:]  # every operation of both protocols


def test_schemathesis_finds_no_failure_with_api_keys(keyed_server: ServiceProcess) -> None:
    run = schemathesis(keyed_server.base_url, max_examples=10)  # every prediction is a documented 401
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_every_reference_resolves_and_v2_errors_are_documented_as_the_oip_error(server: ServiceProcess) -> None:
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for ref in refs(spec):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    assert schemas["OipError"]["properties"]["error"]["type"] == "string"
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if not status.startswith(("4", "5")):
                    continue
                ref = response["content"]["application/json"]["schema"]["$ref"]
                if path.startswith("/v2"):
                    assert ref.endswith(("/OipError", "/ServerLive", "/ServerReady", "/ModelReady")), (path, status)
                else:
                    assert ref.endswith(("/ErrorResponse", "/Health")), (path, status)


def oip_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str), response.text
    assert response.headers["x-error-code"] == code


def test_v2_errors_leave_in_the_oip_shape_also_from_middleware(server: ServiceProcess,
                                                               keyed_server: ServiceProcess) -> None:
    infer = "/v2/models/sentiment/infer"
    big = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a" * 200_000]}]})
    oip_error(httpx.post(server.base_url + infer, content=big, headers={"content-type": "application/json"}),
              413, "body_too_large")
    oip_error(httpx.post(server.base_url + infer, content=b"text", headers={"content-type": "text/plain"}),
              415, "unsupported_media_type")
    oip_error(httpx.post(server.base_url + infer, content=b"{", headers={"content-type": "application/json"}),
              400, "malformed_json")
    oip_error(httpx.post(keyed_server.base_url + infer, json={"inputs": []}), 401, "unauthorized")
    # The same failures on /v1 keep the v1 error object.
    r = httpx.post(server.base_url + "/v1/predict", content=json.dumps({"texts": ["a" * 200_000]}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(keyed_server.base_url + "/v1/predict", json={"texts": ["good"]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    metrics = httpx.get(server.base_url + "/metrics").text
    for code in ("body_too_large", "unsupported_media_type", "malformed_json"):
        assert f'sentiment_errors_total{{kind="{code}"}}' in metrics, code
    assert 'sentiment_errors_total{kind="body_too_large"} 2.0' in metrics  # one v2, one v1: each counted once
