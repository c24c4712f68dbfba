"""Optional API keys over HTTP: prediction endpoints need a Bearer key when keys are configured;
health, metrics, metadata and the docs stay open; keys never appear in logs or errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from app.auth import check_bearer, load_keys
from app.errors import ApiError
from app.main import create_app
from app.settings import Settings

KEY = "s3cret-key-for-tests"
TEXTS = {"texts": ["a good film"]}
V2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a good film"]}]}


def test_without_keys_everything_is_open(make_client) -> None:
    client = make_client()
    assert client.post("/v1/predict", json=TEXTS).status_code == 200
    assert client.post("/v2/models/sentiment/infer", json=V2).status_code == 200


def test_prediction_endpoints_need_the_key(make_client, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(api_key=KEY)
    caplog.set_level(logging.DEBUG)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": "Bearer "}, {"Authorization": KEY}):
        r = client.post("/v1/predict", json=TEXTS, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
        r = client.post("/v2/models/sentiment/infer", json=V2, headers=headers)
        assert r.status_code == 401 and set(r.json()) == {"error"}
    # Refused before the body is read: a malformed body without a key is still a 401, not a 400,
    # and so is a body over the size limit (the key is checked before the body limit reads it).
    r = client.post("/v1/predict", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 401
    r = client.post("/v1/predict", content=b"x" * (client.app.state.settings.body_limit + 1),
                    headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    good = {"Authorization": f"Bearer {KEY}"}
    assert client.post("/v1/predict", json=TEXTS, headers=good).status_code == 200
    assert client.post("/v1/predict", json=TEXTS, headers={"authorization": f"bearer  {KEY} "}).status_code == 200
    assert client.post("/v2/models/sentiment/infer", json=V2, headers=good).status_code == 200
    for path in ("/health/live", "/health/ready", "/metrics", "/v1/model", "/v2/health/ready",
                 "/v2/models/sentiment", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path
    assert 'sentiment_errors_total{kind="unauthorized"} 12.0' in client.get("/metrics").text
    assert KEY not in caplog.text


def test_a_keys_file_accepts_each_key(make_client, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-12\nold-key\n\n  new-key  \n")
    client = make_client(api_keys_file=keys)
    for key in ("old-key", "new-key"):
        assert client.post("/v1/predict", json=TEXTS, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.post("/v1/predict", json=TEXTS, headers={"Authorization": "Bearer # rotated 2026-12"}).status_code == 401


def test_an_empty_or_missing_keys_file_fails_at_start(tmp_path: Path, tiny_artifacts: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        create_app(Settings(artifacts_dir=tiny_artifacts, api_keys_file=empty))
    with pytest.raises(ValueError, match="SENTIMENT_API_KEYS_FILE"):
        Settings(artifacts_dir=tiny_artifacts, api_keys_file=tmp_path / "missing")


def test_a_blank_key_fails_at_start_and_a_trailing_newline_is_ignored(make_client, tiny_artifacts: Path) -> None:
    with pytest.raises(ValueError, match="blank"):
        create_app(Settings(artifacts_dir=tiny_artifacts, api_key="  "))
    client = make_client(api_key=KEY + "\n")  # a secret made from a file
    assert client.post("/v1/predict", json=TEXTS, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_key_is_secret_in_settings(tiny_artifacts: Path) -> None:
    settings = Settings(artifacts_dir=tiny_artifacts, api_key=KEY)
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())


def test_check_bearer_compares_every_key() -> None:
    digests = load_keys("a", None) + load_keys("b", None)
    check_bearer("Bearer a", digests)
    check_bearer("Bearer b", digests)
    with pytest.raises(ApiError):
        check_bearer("Bearer c", digests)
    check_bearer(None, ())  # no keys: open
