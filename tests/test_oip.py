"""The Open Inference Protocol (KServe v2, REST): a contract test against the published spec's
objects, the same answers as /v1/predict, the protocol's error object, and a real client
(``tritonclient[http]``) against the real server process."""

from __future__ import annotations

import json
import struct

import jsonschema
import pytest
from fastapi.testclient import TestClient

from app.process import ServiceProcess
from tests.conftest import wait_ready  # noqa: F401 (fixtures: make_client)

TEXTS = ["A great film, good and great!", "An awful movie. Bad, bad, bad.", "the film was a movie"]
INFER = "/v2/models/sentiment/infer"

# The objects of KServe's open_inference_rest.yaml that a server returns, as JSON Schema: required
# fields and types as the spec states them (tensor data may be nested, of numbers, strings or booleans).
_TENSOR_DATA = {"type": "array", "items": {"anyOf": [{"$ref": "#/$defs/data"}, {"type": "number"},
                                                     {"type": "string"}, {"type": "boolean"}]}}
SPEC = {
    "server_metadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
        "name": {"type": "string"}, "version": {"type": "string"},
        "extensions": {"type": "array", "items": {"type": "string"}}}},
    "model_metadata": {"type": "object", "required": ["name", "platform"], "properties": {
        "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": {"$ref": "#/$defs/metadata_tensor"}},
        "outputs": {"type": "array", "items": {"$ref": "#/$defs/metadata_tensor"}}},
        "$defs": {"metadata_tensor": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": {"type": "string"}, "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}}}}}},
    "inference_response": {"type": "object", "required": ["model_name", "outputs"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "parameters": {"type": "object"},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype", "data"],
                                               "properties": {"name": {"type": "string"},
                                                              "shape": {"type": "array", "items": {"type": "integer"}},
                                                              "datatype": {"type": "string"},
                                                              "parameters": {"type": "object"},
                                                              "data": {"$ref": "#/$defs/data"}}}}},
        "$defs": {"data": _TENSOR_DATA}},
    "error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
              "additionalProperties": False},
    "model_ready": {"type": "object", "required": ["name", "ready"], "properties": {
        "name": {"type": "string"}, "ready": {"type": "boolean"}}},
}


def conforms(body: dict, kind: str) -> None:
    jsonschema.validate(body, SPEC[kind])


def texts_tensor(texts: list, **extra) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}], **extra}


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def outputs_of(body: dict) -> dict[str, dict]:
    return {o["name"]: o for o in body["outputs"]}


def test_health_and_metadata_follow_the_spec(client: TestClient) -> None:
    r = client.get("/v2")
    assert r.status_code == 200
    conforms(r.json(), "server_metadata")
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    r = client.get("/v2/models/sentiment/ready")
    assert r.status_code == 200 and r.json() == {"name": "sentiment", "ready": True}
    conforms(r.json(), "model_ready")
    assert client.get("/v2/models/sentiment/versions/tiny-test/ready").status_code == 200
    meta = client.get("/v2/models/sentiment").json()
    conforms(meta, "model_metadata")
    assert meta["versions"] == ["tiny-test"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "probability": "FP32", "label": "BYTES", "num_tokens": "INT32", "truncated": "BOOL",
        "trace_tokens": "BYTES", "trace_probabilities": "FP32", "attributions": "FP32"}
    assert client.get("/v2/models/sentiment/versions/tiny-test").json() == meta


def test_infer_gives_the_same_answers_as_v1(client: TestClient) -> None:
    v1 = client.post("/v1/predict", json={"texts": TEXTS}).json()["predictions"]
    r = client.post(INFER, json=texts_tensor(TEXTS, id="req-7"))
    assert r.status_code == 200, r.text
    body = r.json()
    conforms(body, "inference_response")
    assert body["model_name"] == "sentiment" and body["model_version"] == "tiny-test" and body["id"] == "req-7"
    out = outputs_of(body)
    assert list(out) == ["probability", "label", "num_tokens", "truncated"]  # no trace unless asked
    assert out["probability"] == {"name": "probability", "datatype": "FP32", "shape": [3],
                                  "data": [p["probability"] for p in v1]}
    assert out["label"]["data"] == [p["label"] for p in v1]
    assert out["num_tokens"]["data"] == [p["num_tokens"] for p in v1]
    assert out["truncated"]["data"] == [False, False, False]
    # A version in the path, and a nested [N, 1] tensor, give the same probabilities.
    nested = {"inputs": [{"name": "text", "shape": [3, 1], "datatype": "BYTES", "data": [[t] for t in TEXTS]}]}
    again = client.post("/v2/models/sentiment/versions/tiny-test/infer", json=nested).json()
    assert outputs_of(again)["probability"]["data"] == out["probability"]["data"]


def test_trace_outputs_are_padded_tensors_equal_to_the_v1_trace(client: TestClient) -> None:
    v1 = client.post("/v1/predict", json={"texts": TEXTS, "trace": True}).json()["predictions"]
    body = client.post(INFER, json=texts_tensor(TEXTS, parameters={"trace": True})).json()
    conforms(body, "inference_response")
    out = outputs_of(body)
    width = max(p["num_tokens"] for p in v1)
    assert out["trace_tokens"]["shape"] == [3, width] and out["trace_probabilities"]["shape"] == [3, width]
    for i, p in enumerate(v1):
        row_tokens = out["trace_tokens"]["data"][i * width:(i + 1) * width]
        row_probs = out["trace_probabilities"]["data"][i * width:(i + 1) * width]
        n = out["num_tokens"]["data"][i]
        assert row_tokens[:n] == p["trace"]["tokens"] and set(row_tokens[n:]) <= {""}
        assert row_probs[:n] == p["trace"]["probabilities"] and set(row_probs[n:]) <= {0.0}
    # Asking for an output by name returns only that output (and turns the trace on when needed).
    only = client.post(INFER, json=texts_tensor(TEXTS, outputs=[{"name": "trace_probabilities"}])).json()
    assert [o["name"] for o in only["outputs"]] == ["trace_probabilities"]
    assert only["outputs"][0]["data"] == out["trace_probabilities"]["data"]


def test_explanations_are_a_padded_attributions_tensor_equal_to_v1(client: TestClient) -> None:
    v1 = client.post("/v1/predict", json={"texts": TEXTS, "explain": "occlusion"}).json()["predictions"]
    body = client.post(INFER, json=texts_tensor(TEXTS, parameters={"explain": "occlusion"})).json()
    out = outputs_of(body)
    assert list(out) == ["probability", "label", "num_tokens", "truncated", "attributions"]
    width = max(p["num_tokens"] for p in v1)
    assert out["attributions"]["shape"] == [3, width]
    for i, p in enumerate(v1):
        row = out["attributions"]["data"][i * width:(i + 1) * width]
        assert row[:p["num_tokens"]] == pytest.approx(p["explanation"]["attributions"], abs=1e-5)
        assert set(row[p["num_tokens"]:]) <= {0.0}
    r = client.post(INFER, json=texts_tensor(TEXTS, parameters={"explain": "lime"}))
    assert r.status_code == 400 and "explain" in r.json()["error"]


def binary_request(texts: list[str], **extra) -> tuple[bytes, dict[str, str]]:
    """A request in the binary tensor data extension, as tritonclient builds it."""
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = json.dumps({"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}], **extra}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


def test_binary_tensor_input_is_accepted(client: TestClient) -> None:
    texts = TEXTS + ["ünïcödé — 🎬 good"]
    body, headers = binary_request(texts)
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    expected = client.post(INFER, json=texts_tensor(texts)).json()
    assert r.json()["outputs"] == expected["outputs"]


@pytest.mark.parametrize("payload, status, needle", [
    ({"inputs": []}, 400, "inputs"),
    ({"inputs": [{"name": "review", "shape": [1], "datatype": "BYTES", "data": ["good"]}]}, 400, "'text'"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "BYTES"),
    ({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["good"]}]}, 400, "1 elements"),
    ({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}, 400, "shape"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [7]}]}, 400, "not a string"),
    ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}, 400, "no data"),
    (texts_tensor(["good"], outputs=[{"name": "logits"}]), 400, "unknown output"),
    (texts_tensor(["good"], parameters={"trace": "yes"}), 400, "trace"),
    (texts_tensor(["good", "  "]), 422, "texts[1]"),
    (texts_tensor(["good"] * 65), 413, "limit is 64"),
    (texts_tensor(["x" * 20_001]), 413, "20001 characters"),
    (texts_tensor(["\ud800 lone"]), 422, "surrogate"),
])
def test_bad_requests_get_the_protocol_error_object(client: TestClient, payload: dict, status: int,
                                                    needle: str) -> None:
    r = client.post(INFER, content=json.dumps(payload), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    conforms(r.json(), "error")
    assert needle in r.json()["error"], r.json()
    assert r.headers["x-error-code"]


def test_other_protocol_errors(client: TestClient) -> None:
    r = client.post(INFER, content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["x-error-code"] == "malformed_json"
    conforms(r.json(), "error")
    r = client.post(INFER, content=b"text", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.headers["x-error-code"] == "unsupported_media_type"
    for path in ("/v2/models/other/infer", "/v2/models/sentiment/versions/v9/infer"):
        r = client.post(path, json=texts_tensor(["good"]))
        assert r.status_code == 404 and r.headers["x-error-code"] == "model_not_found", path
        conforms(r.json(), "error")
    assert client.get("/v2/models/other").status_code == 404
    assert client.get("/v2/models/other/ready").status_code == 404
    r = client.get("/v2/nothing-here")
    assert r.status_code == 404
    conforms(r.json(), "error")
    # Binary extension: sizes that do not add up are 400s that say so.
    body, headers = binary_request(["good film"])
    r = client.post(INFER, content=body[:-3], headers=headers)
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]
    r = client.post(INFER, content=body, headers={**headers, "Inference-Header-Content-Length": "99999"})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    bad = body.replace(b"good film", b"good \xff\xfelm")
    r = client.post(INFER, content=bad, headers=headers)
    assert r.status_code == 400 and "not UTF-8" in r.json()["error"]
    metrics = client.get("/metrics").text
    for code in ("invalid_infer_request", "model_not_found", "malformed_json", "unsupported_media_type"):
        assert f'sentiment_errors_total{{kind="{code}"}}' in metrics, code


def test_hostile_bodies_and_headers_get_400s_not_500s(client: TestClient) -> None:
    huge_int = b"1" * 5000
    r = client.post(INFER, content=b'{"parameters": {"k": ' + huge_int + b'}, "inputs": []}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["x-error-code"] == "malformed_json"
    r = client.post("/v1/predict", content=b'{"texts": ["good"], "x": ' + huge_int + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
    body, headers = binary_request(["good film"])
    for value in (b"\xb2", "9" * 5000, "-1", "1e3"):  # b"\xb2": "²", a digit to str.isdigit()
        r = client.post(INFER, content=body, headers={**headers, "Inference-Header-Content-Length": value})
        assert r.status_code == 400 and "byte count" in r.json()["error"], value
    r = client.post(INFER, content=json.dumps(texts_tensor(["good"], id="\ud800")),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]
    # More elements than the limit: 413 before any element is decoded.
    many = {"inputs": [{"name": "text", "shape": [10_000], "datatype": "BYTES", "data": ["a"] * 10_000}]}
    r = client.post(INFER, json=many)
    assert r.status_code == 413 and r.headers["x-error-code"] == "too_many_texts"
    # Bytes after the JSON header that no input claims.
    header = json.dumps(texts_tensor(["good"])).encode()
    r = client.post(INFER, content=header + b"junk",
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "no input has binary_data_size" in r.json()["error"]


def test_explicit_outputs_compute_only_what_is_returned(client: TestClient) -> None:
    before = client.get("/metrics").text.count("sentiment_explained_texts_total 0.0")
    body = client.post(INFER, json=texts_tensor(TEXTS, parameters={"explain": "occlusion", "trace": True},
                                                outputs=[{"name": "probability"}])).json()
    assert [o["name"] for o in body["outputs"]] == ["probability"]
    assert "sentiment_explained_texts_total 0.0" in client.get("/metrics").text and before == 1


def test_not_ready_is_false_with_a_4xx(make_client) -> None:
    import threading

    release = threading.Event()

    def slow_factory(settings):
        from sentiment.engine import SentimentEngine
        release.wait(10)
        return SentimentEngine.load(settings.artifacts_dir, settings.device)

    client = make_client(engine_factory=slow_factory, wait=False)
    try:
        assert client.get("/v2/health/live").json() == {"live": True}
        r = client.get("/v2/health/ready")
        assert r.status_code == 400 and r.json() == {"ready": False}
        r = client.post(INFER, json=texts_tensor(["good"]))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        conforms(r.json(), "error")
        # A versioned call cannot be checked yet: 503 (retry), not a permanent-looking 404.
        r = client.post("/v2/models/sentiment/versions/tiny-test/infer", json=texts_tensor(["good"]))
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        r = client.get("/v2/models/sentiment/versions/tiny-test/ready")
        assert r.status_code == 400 and r.json() == {"name": "sentiment", "ready": False}
    finally:
        release.set()
    wait_ready(client)
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_openapi_documents_the_v2_endpoints(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
                 "/v2/models/{name}/versions/{version}", "/v2/models/{name}/versions/{version}/ready",
                 "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert path in paths, path
    assert {"400", "401", "404", "413", "503"} <= set(paths["/v2/models/{name}/infer"]["post"]["responses"])


@pytest.mark.slow
def test_a_real_triton_client_against_the_real_server(tiny_artifacts) -> None:
    np = pytest.importorskip("numpy")
    httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (in the dev extra)")
    with ServiceProcess(tiny_artifacts) as server:
        url = server.base_url.removeprefix("http://")
        client = httpclient.InferenceServerClient(url=url)
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready("sentiment")
            meta = client.get_model_metadata("sentiment")
            assert meta["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
            assert client.get_server_metadata()["name"] == "lstm-sentiment"
            texts = np.array([t.encode() for t in TEXTS], dtype=np.object_)
            expected = [p["probability"] for p in json.loads(__import__("httpx").post(
                f"{server.base_url}/v1/predict", json={"texts": TEXTS}).text)["predictions"]]
            for binary in (True, False):  # the binary tensor extension (the client's default) and JSON
                tensor = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
                tensor.set_data_from_numpy(texts, binary_data=binary)
                result = client.infer("sentiment", [tensor], request_id="triton-1")
                assert result.get_response()["id"] == "triton-1"
                assert result.as_numpy("probability").tolist() == pytest.approx(expected, abs=1e-7)
                assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label").tolist()] == [
                    "positive" if p >= 0.5 else "negative" for p in expected]
            # Triton's per-request priority level and timeout (µs), as the client sends them: the batch lane.
            tensor = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
            tensor.set_data_from_numpy(texts)
            result = client.infer("sentiment", [tensor], priority=2, timeout=10_000_000)
            assert result.as_numpy("probability").tolist() == pytest.approx(expected, abs=1e-7)
            metrics = __import__("httpx").get(f"{server.base_url}/metrics").text
            assert 'sentiment_lane_requests_total{lane="batch"} 1.0' in metrics
            tensor = httpclient.InferInput("text", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([b" "], dtype=np.object_))
            from tritonclient.utils import InferenceServerException

            with pytest.raises(InferenceServerException, match="empty"):
                client.infer("sentiment", [tensor])
            with pytest.raises(InferenceServerException, match="unknown model"):
                client.infer("nope", [tensor])
        finally:
            client.close()


def test_v2_requests_get_bounded_route_labels(client: TestClient) -> None:
    from app.middleware import route_label

    assert route_label("/v2/models/sentiment/infer") == "/v2/models/{name}/infer"
    assert route_label("/v2/models/x/versions/7/infer") == "/v2/models/{name}/infer"
    assert route_label("/v2/models/x/versions/7/ready") == "/v2/models/{name}/ready"
    assert route_label("/v2/models/x") == "/v2/models/{name}"
    assert route_label("/v2/models/x/y/z/infer") == "other"
    client.post(INFER, json=texts_tensor(["good"]))
    client.get("/v2/health/ready")
    metrics = client.get("/metrics").text
    assert 'route="/v2/models/{name}/infer",status="200"' in metrics
    assert 'route="/v2/health/ready",status="200"' in metrics
