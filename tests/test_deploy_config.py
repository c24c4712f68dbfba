"""The deployment files say what the service needs: compose files that validate, Kubernetes manifests
whose probes, ports and shutdown timing match the service, a Dockerfile and .dockerignore that build a
small non-root image without the training data.

Fast and engine-free: compose files are checked against the Compose Specification schema (vendored by
check-jsonschema) and, where an engine's compose is installed, by ``docker compose config`` /
``podman-compose config``; manifests against Kubernetes' schemas (kubernetes-validate). Without those
packages the structural checks still run.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.scale.yml"]
K8S_DIR = REPO / "deploy" / "k8s"
PORT = 8000


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def k8s_resource(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_docs() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# ---- Dockerfile and .dockerignore ----------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_with_configurable_base_and_cpu_torch() -> None:
    ins = dockerfile_instructions()
    args = [rest for word, rest in ins if word == "ARG"]
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in args
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE_IMAGE}") for f in froms), froms
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "python3 -m venv /opt/venv" in runs, "the venv must come from the base image's python3"


def test_dockerfile_runs_uvicorn_as_non_root_pid1_with_readiness_healthcheck() -> None:
    ins = {}
    for word, rest in dockerfile_instructions():
        ins[word] = rest  # the runtime (last) stage's values
    user = ins["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root USER (Kubernetes runAsNonRoot checks it)"
    assert ins["EXPOSE"] == str(PORT)
    assert "/health/ready" in ins["HEALTHCHECK"] and f":{PORT}/" in ins["HEALTHCHECK"]
    cmd = json.loads(ins["CMD"])  # exec form: the server is PID 1 and receives SIGTERM itself
    assert cmd[:3] == ["python", "-m", "app"], "python -m app exits 0 after a graceful SIGTERM, uvicorn 143"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == str(PORT)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder covers what is in it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw[1:] if negate else raw
        pat = pat.rstrip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*")
        regex = regex.replace("[^/]*[^/]*/", "(?:.*/)?")  # "**/" matches any depth, including none
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_data_checkpoints_and_caches_out() -> None:
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    for path in [".git/config", ".cache/tokens-1.pkl", "checkpoints/epoch3.pt", "runs/train_v1.log",
                 "data/aclImdb_v1.tar.gz", "training/train.py", "training/checkpoints/last.pt", "app/__pycache__/main.cpython-311.pyc",
                 ".venv/bin/python", "benchmarks/results/run.json", "tests/test_api.py", "notes.ipynb"]:
        assert dockerignored(path, patterns), f"{path} would be sent to the build"
    for path in ["pyproject.toml", "app/main.py", "app/static/index.html", "sentiment/text.py",
                 "model_artifacts/model.pt", "model_artifacts/vocab.json", "model_artifacts/model_card.json"]:
        assert not dockerignored(path, patterns), f"{path} is needed by the build but ignored"


# ---- compose ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec(name: str) -> None:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema for the Compose schema check")
    run = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                          str(REPO / name)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def compose_commands() -> list[list[str]]:
    cmds = []
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        cmds.append(["docker", "compose"])
    if shutil.which("podman-compose") and shutil.which("podman"):
        cmds.append(["podman-compose"])
    return cmds


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_validates_with_the_engine(name: str) -> None:
    cmds = compose_commands()
    if not cmds:
        pytest.skip("neither `docker compose` nor podman-compose (with podman) is installed")
    for cmd in cmds:
        run = subprocess.run([*cmd, "-f", name, "config"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{' '.join(cmd)} config: {run.stdout}{run.stderr}"
        rendered = yaml.safe_load(run.stdout)
        assert "sentiment" in rendered["services"]


def check_service_container(svc: dict[str, Any]) -> None:
    assert svc["build"]["context"] == "."
    assert "BASE_IMAGE" in svc["build"]["args"] and "TORCH_INDEX_URL" in svc["build"]["args"]
    assert any("/health/ready" in part for part in svc["healthcheck"]["test"])
    assert svc["restart"] in ("always", "unless-stopped", "on-failure")
    limits = svc["deploy"]["resources"]["limits"]
    assert "cpus" in limits and "memory" in limits
    workers = int(svc["environment"]["SENTIMENT_WORKERS"])
    assert 1 <= workers <= float(limits["cpus"]), "more model workers than CPUs only adds contention"
    assert svc["environment"]["SENTIMENT_DEVICE"] == "auto"
    assert svc.get("read_only") is True and "/tmp" in svc.get("tmpfs", [])
    env = svc["environment"]
    drain_s = float(env.get("SENTIMENT_SHUTDOWN_DELAY_S", 0)) + float(env["SENTIMENT_GRACEFUL_TIMEOUT_S"])
    assert float(svc["stop_grace_period"].rstrip("s")) > drain_s, "docker stop must not SIGKILL a draining replica"


def test_compose_runs_the_service_on_8000_and_prometheus_scraping_it() -> None:
    compose = load_yaml(REPO / "docker-compose.yml")
    svc = compose["services"]["sentiment"]
    check_service_container(svc)
    assert any(str(p).endswith(f":{PORT}") for p in svc["ports"])
    prom = compose["services"]["prometheus"]
    mounts = [v.split(":") for v in prom["volumes"]]
    assert ["./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounts


def test_prometheus_scrapes_every_replica_on_metrics() -> None:
    config = load_yaml(REPO / "deploy" / "prometheus" / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "sentiment")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    dns = job["dns_sd_configs"][0]
    assert dns["names"] == ["sentiment"] and dns["type"] == "A" and dns["port"] == PORT


def test_scaled_compose_puts_replicas_behind_one_port() -> None:
    compose = load_yaml(REPO / "docker-compose.scale.yml")
    svc = compose["services"]["sentiment"]
    check_service_container(svc)
    assert "ports" not in svc, "replicas cannot share a published host port; nginx publishes it"
    assert svc["deploy"]["replicas"] >= 2
    nginx = compose["services"]["nginx"]
    assert any(str(p).endswith(f":{PORT}") for p in nginx["ports"])
    assert nginx["depends_on"]["sentiment"]["condition"] == "service_healthy"
    conf_mount = next(v for v in nginx["volumes"] if v.startswith("./deploy/nginx.conf:"))
    conf = (REPO / conf_mount.split(":")[0]).read_text()
    assert re.search(rf"server\s+sentiment:{PORT}\b", conf), "nginx must balance over the sentiment replicas"
    assert re.search(r"proxy_pass\s+http://sentiment;", conf)
    retry = re.search(r"proxy_next_upstream\s+([^;]*);", conf)[1].split()
    # A POST that reached a replica is never re-sent, and a shed (503) goes back to the client.
    assert "non_idempotent" not in retry and "http_503" not in retry


# ---- Kubernetes --------------------------------------------------------------------------------------

def test_manifests_are_valid_yaml_with_the_expected_kinds() -> None:
    kinds = {doc["kind"] for _, doc in k8s_docs()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p, d in k8s_docs() if d.get("kind") != "Kustomization"}
    assert listed == on_disk, "kustomization.yaml must list every manifest"


@pytest.mark.parametrize("version", ["1.28", "1.37"])
def test_manifests_match_kubernetes_schemas(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate for the schema check")
    for path, doc in k8s_docs():
        if doc.get("kind") == "Kustomization":
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:  # type: ignore[attr-defined]
            pytest.fail(f"{path.name}: {exc}")


def sentiment_container() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = k8s_resource("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "sentiment"]
    return pod, container


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_deployment_probes_are_bound_to_readiness_and_liveness_on_8000() -> None:
    _, container = sentiment_container()
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/health/ready" and port_number(container, ready["port"]) == PORT
    assert live["path"] == "/health/live" and port_number(container, live["port"]) == PORT
    assert [p["containerPort"] for p in container["ports"]] == [PORT]


def test_deployment_drains_before_kill_and_runs_as_the_image_user() -> None:
    pod, container = sentiment_container()
    env = env_of(container)
    delay = float(env["SENTIMENT_SHUTDOWN_DELAY_S"])
    graceful = float(env.get("SENTIMENT_GRACEFUL_TIMEOUT_S") or 30)
    assert delay > 0, "a shutdown delay lets endpoint removal reach every node before the listener closes"
    assert pod["terminationGracePeriodSeconds"] > delay + graceful, "SIGKILL must not cut accepted requests"
    assert env["SENTIMENT_DEVICE"] == "auto"
    assert pod["securityContext"]["runAsNonRoot"] is True
    image_user = next(rest for word, rest in reversed(dockerfile_instructions()) if word == "USER")
    assert str(pod["securityContext"]["runAsUser"]) == image_user.split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    assert "cpu" in container["resources"]["requests"], "the HPA's CPU utilization is relative to the request"


def test_service_and_hpa_point_at_the_deployment() -> None:
    deployment, service, hpa = (k8s_resource(k) for k in ("Deployment", "Service", "HorizontalPodAutoscaler"))
    _, container = sentiment_container()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = service["spec"]["ports"]
    assert port_number(container, svc_port["targetPort"]) == PORT
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_kustomization_renders() -> None:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed")
    run = subprocess.run(["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rendered = [d for d in yaml.safe_load_all(run.stdout) if d]
    assert {d["kind"] for d in rendered} == {d["kind"] for _, d in k8s_docs() if d["kind"] != "Kustomization"}
