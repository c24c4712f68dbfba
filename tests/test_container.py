"""The Docker image, built and run for real: it becomes ready, answers predictions, exposes metrics,
passes its own HEALTHCHECK, runs as non-root on a read-only root filesystem, and on SIGTERM turns
not-ready, drains and exits with status 0.

Engines, in this order:
  1. ``../shared/tools/container-engine.sh`` (or ``$CONTAINER_ENGINE_SCRIPT``): podman with the runtime
     and build flags that work on this kind of machine, and a local Debian stand-in for the python base
     image (every engine command runs as ``ctr`` in a shell that sourced the script);
  2. a working ``docker`` (then the default base image is pulled from its registry);
  3. a working ``podman``.
Without any, the tests skip with the reason; with ``SENTIMENT_REQUIRE_CONTAINER=1`` they fail instead.

The image serves ``model_artifacts/``. Where that holds no model yet, set
``SENTIMENT_CONTAINER_ARTIFACTS=<dir>`` to mount another artifacts directory over it.
Other knobs: ``SENTIMENT_CONTAINER_BASE_IMAGE``, ``SENTIMENT_CONTAINER_TAG``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = [pytest.mark.container, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ENGINE_SCRIPT = Path(os.environ.get("CONTAINER_ENGINE_SCRIPT", REPO.parent / "shared" / "tools" / "container-engine.sh"))
TAG = os.environ.get("SENTIMENT_CONTAINER_TAG", "lstm-sentiment:test")
METRICS = ["sentiment_request_duration_seconds", "sentiment_batch_size", "sentiment_queue_depth",
           "sentiment_texts_total"]
SHUTDOWN_DELAY_S = 2.0
READY_TIMEOUT_S = 180
BUILD_TIMEOUT_S = 1800


@dataclass
class Engine:
    """How to run engine commands: a plain binary, or ``ctr`` after sourcing the engine script."""

    name: str
    binary: list[str] = field(default_factory=list)
    script: Path | None = None
    build_args: list[str] = field(default_factory=list)
    base_image: str | None = None

    def command(self, args: list[str]) -> list[str]:
        if self.script is None:
            return [*self.binary, *args]
        return ["bash", "-c", 'source "$0" >/dev/null 2>&1 || exit 97; ctr "$@"', str(self.script), *args]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.command(list(args)), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{self.name} {shlex.join(args)}` exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc


def _from_engine_script(script: Path) -> tuple[Engine | None, str]:
    # Sourcing may install podman and build the base image (about 1.5 minutes on a fresh machine).
    proc = subprocess.run(
        ["bash", "-c", 'source "$0" >&2 || exit 97; set +u; printf "%s\\0" "${CTR_BUILD_ARGS[@]}"', str(script)],
        capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return None, f"{script} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    build_args = [a for a in proc.stdout.split("\0") if a]
    return Engine("podman (container-engine.sh)", script=script, build_args=build_args,
                  base_image="localhost/python:3.11-bookworm"), ""


def find_engine() -> tuple[Engine | None, str]:
    reasons = []
    if ENGINE_SCRIPT.is_file() and shutil.which("bash"):
        engine, reason = _from_engine_script(ENGINE_SCRIPT)
        if engine:
            return engine, ""
        reasons.append(reason)
    else:
        reasons.append(f"no engine script at {ENGINE_SCRIPT}")
    for binary in ("docker", "podman"):
        if not shutil.which(binary):
            reasons.append(f"no {binary} on PATH")
            continue
        info = subprocess.run([binary, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return Engine(binary, binary=[binary]), ""
        reasons.append(f"`{binary} info` failed: {(info.stderr or info.stdout).strip()[-200:]}")
    return None, "; ".join(reasons)


def local_torch_wheel(build_args: list[str]) -> bool:
    """True when the build mounts a pip find-links folder holding a CPU torch wheel."""
    for arg in build_args:
        if arg.startswith("PIP_FIND_LINKS="):
            folder = Path(arg.split("=", 1)[1])
            return folder.is_dir() and any(folder.glob("torch-*+cpu-*.whl"))
    return False


def report(config: pytest.Config, line: str) -> None:
    """Print past pytest's capture, so the numbers show in every run's output."""
    reporter = config.pluginmanager.getplugin("terminalreporter")
    capture = config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover
        print(f"[container] {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[container] {line}")


def unavailable(reason: str) -> None:
    if os.environ.get("SENTIMENT_REQUIRE_CONTAINER") == "1":
        pytest.fail(f"container test required but cannot run: {reason}")
    pytest.skip(f"container test skipped: {reason}")


@pytest.fixture(scope="module")
def engine() -> Engine:
    found, reason = find_engine()
    if found is None:
        unavailable(f"no usable container engine ({reason})")
    return found


@pytest.fixture(scope="module")
def artifacts_mount() -> list[str]:
    """Run options that put a model in the container: none when the image carries one."""
    override = os.environ.get("SENTIMENT_CONTAINER_ARTIFACTS")
    if override:
        path = Path(override).resolve()
        assert (path / "model.pt").is_file(), f"SENTIMENT_CONTAINER_ARTIFACTS={override} has no model.pt"
        return ["-v", f"{path}:/app/model_artifacts:ro"]
    if not (REPO / "model_artifacts" / "model.pt").is_file():
        unavailable("model_artifacts/ holds no model.pt to ship (set SENTIMENT_CONTAINER_ARTIFACTS=<dir>)")
    return []


def dockerfile_base_image() -> str:
    """The Dockerfile's default ``BASE_IMAGE``."""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG BASE_IMAGE="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("the Dockerfile has no ARG BASE_IMAGE=<default>")


def ensure_base_image(engine: Engine, base: str) -> None:
    """Skip (or fail, when required) with a clear message if the base image is neither local nor
    pullable: an engine without a reachable registry cannot build the image."""
    if engine.run("image", "inspect", base, check=False).returncode == 0:
        return
    try:
        pulled = engine.run("pull", base, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        unavailable(f"base image {base} is not local and pulling it timed out (no reachable registry?); "
                    "set SENTIMENT_CONTAINER_BASE_IMAGE to a local image")
        return
    if pulled.returncode != 0:
        unavailable(f"base image {base} is not local and cannot be pulled "
                    f"({(pulled.stderr or pulled.stdout).strip()[-300:]}); "
                    "set SENTIMENT_CONTAINER_BASE_IMAGE to a local image")


@pytest.fixture(scope="module")
def image(engine: Engine, artifacts_mount: list[str], pytestconfig: pytest.Config) -> str:
    base = os.environ.get("SENTIMENT_CONTAINER_BASE_IMAGE") or engine.base_image
    ensure_base_image(engine, base or dockerfile_base_image())
    args = ["build", *engine.build_args, "-t", TAG]
    if engine.name != "docker":
        args += ["--format", "docker"]  # podman's default OCI format drops HEALTHCHECK
    if base:
        args += ["--build-arg", f"BASE_IMAGE={base}"]
    if local_torch_wheel(engine.build_args):
        # The mounted wheel folder has CPU torch; skip the PyTorch index (not reachable on every machine).
        args += ["--build-arg", "TORCH_INDEX_URL="]
    log = REPO / ".pytest_cache" / "container-build.log"
    log.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    proc = engine.run(*args, str(REPO), timeout=BUILD_TIMEOUT_S, check=False)
    seconds = time.perf_counter() - started
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"image build failed (log: {log}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    size = int(engine.run("image", "inspect", "--format", "{{.Size}}", TAG).stdout.strip())
    cached = proc.stdout.count("Using cache") + proc.stdout.count("CACHED")
    report(pytestconfig, f"engine: {engine.name}; base image: {base or 'Dockerfile default'}")
    report(pytestconfig, f"built {TAG} in {seconds:.1f} s ({cached} cached steps); image size {size / 1e6:.0f} MB")
    return TAG


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@dataclass
class Running:
    name: str
    url: str
    started: float


def logs(engine: Engine, name: str) -> str:
    proc = engine.run("logs", name, check=False)
    return proc.stdout + proc.stderr


def state(engine: Engine, name: str) -> tuple[bool, int]:
    out = engine.run("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", name).stdout.split()
    return out[0] == "true", int(out[1])


@pytest.fixture(scope="module")
def container(engine: Engine, image: str, artifacts_mount: list[str], pytestconfig: pytest.Config) -> Iterator[Running]:
    name = f"sentiment-test-{uuid.uuid4().hex[:8]}"
    # As locked down as the Kubernetes manifest: read-only root, a tmpfs /tmp, no capabilities.
    engine.run("run", "-d", "--name", name, "-p", "127.0.0.1::8000",
               "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "-e", f"SENTIMENT_SHUTDOWN_DELAY_S={SHUTDOWN_DELAY_S}", *artifacts_mount, image)
    try:
        mapping = engine.run("port", name, "8000/tcp").stdout.split()[0]  # e.g. 127.0.0.1:43123
        url = f"http://127.0.0.1:{mapping.rsplit(':', 1)[1]}"
        started = time.perf_counter()
        deadline = started + READY_TIMEOUT_S
        status = None
        while time.perf_counter() < deadline:
            try:
                status, _ = http(f"{url}/health/ready", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                status = None
            if status == 200:
                break
            running, code = state(engine, name)
            assert running, f"container exited ({code}) before ready:\n{logs(engine, name)[-3000:]}"
            time.sleep(0.5)
        assert status == 200, f"not ready after {READY_TIMEOUT_S}s:\n{logs(engine, name)[-3000:]}"
        report(pytestconfig, f"ready {time.perf_counter() - started:.1f} s after start")
        yield Running(name, url, started)
    finally:
        engine.run("rm", "-f", name, check=False)


def test_image_runs_as_non_root_with_readiness_healthcheck(engine: Engine, image: str, container: Running) -> None:
    (inspected,) = json.loads(engine.run("image", "inspect", image).stdout)
    config = inspected["Config"]
    assert config["User"].split(":")[0] not in ("", "0", "root")
    healthcheck = config.get("Healthcheck") or inspected.get("Healthcheck")  # podman keeps it at the top
    assert healthcheck and any("/health/ready" in part for part in healthcheck["Test"])
    assert engine.run("exec", container.name, "id", "-u").stdout.strip() not in ("", "0")
    if engine.name != "docker":  # podman runs the image's HEALTHCHECK on demand
        engine.run("healthcheck", "run", container.name)


def test_container_serves_predictions(container: Running) -> None:
    status, body = http(f"{container.url}/health/live")
    assert status == 200
    ready = json.loads(http(f"{container.url}/health/ready")[1])
    assert ready["status"] == "ready"
    texts = ["A wonderful, moving film with a superb cast.", "Dull, far too long, and the plot made no sense."]
    status, body = http(f"{container.url}/v1/predict", {"texts": texts, "trace": False})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["model"]["version"] == ready["model_version"]
    assert len(answer["predictions"]) == 2
    for p in answer["predictions"]:
        assert p["label"] == ("positive" if p["probability"] >= 0.5 else "negative")
        assert 0 <= p["probability"] <= 1 and p["num_tokens"] > 0 and p["trace"] is None
    status, body = http(f"{container.url}/v1/predict", {"texts": texts[:1], "trace": True})
    assert status == 200, body
    (traced,) = json.loads(body)["predictions"]
    assert len(traced["trace"]["probabilities"]) == traced["num_tokens"]
    assert http(f"{container.url}/v1/model")[0] == 200


def test_container_exposes_prometheus_metrics(container: Running) -> None:
    http(f"{container.url}/v1/predict", {"texts": ["Fine."]})
    status, text = http(f"{container.url}/metrics")
    assert status == 200
    for name in METRICS:
        assert f"\n{name}" in text, f"{name} missing from /metrics"
    scored = next(float(l.split()[-1]) for l in text.splitlines() if l.startswith("sentiment_texts_total "))
    assert scored >= 1
    assert 'sentiment_request_duration_seconds_count{route="/v1/predict",status="200"}' in text


def test_sigterm_drains_and_exits_cleanly(engine: Engine, container: Running, pytestconfig: pytest.Config) -> None:
    # Last in this module: it stops the shared container.
    sent = time.perf_counter()
    engine.run("kill", "--signal", "TERM", container.name)
    # During SENTIMENT_SHUTDOWN_DELAY_S the listener is still open and readiness says 503.
    seen = None
    while time.perf_counter() - sent < SHUTDOWN_DELAY_S:
        try:
            seen, _ = http(f"{container.url}/health/ready", timeout=1)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            break
        if seen == 503:
            break
        time.sleep(0.05)
    assert seen == 503, f"readiness did not turn 503 after SIGTERM (last status {seen})"
    while time.perf_counter() - sent < 60:
        running, code = state(engine, container.name)
        if not running:
            break
        time.sleep(0.2)
    stopped = time.perf_counter() - sent
    logs_text = logs(engine, container.name)
    assert not running, "still running 60 s after SIGTERM"
    assert code == 0, f"exit status {code} after SIGTERM (0 expected):\n{logs_text[-3000:]}"
    assert "shutdown complete" in logs_text
    assert stopped >= SHUTDOWN_DELAY_S, "the listener closed before the shutdown delay ended"
    report(pytestconfig, f"SIGTERM → exit 0 in {stopped:.1f} s (shutdown delay {SHUTDOWN_DELAY_S:g} s)")


class _NoRegistry(Engine):
    """An engine with no local base image and no reachable registry."""

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(args), 125, "", "Error: initializing source docker://python: "
                                           "pinging container registry: dial tcp: lookup registry-1.docker.io")


def test_an_unreachable_base_image_skips_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SENTIMENT_REQUIRE_CONTAINER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="base image python:3.11-slim-bookworm is not local and cannot be pulled"):
        ensure_base_image(_NoRegistry("podman"), dockerfile_base_image())
    monkeypatch.setenv("SENTIMENT_REQUIRE_CONTAINER", "1")
    with pytest.raises(pytest.fail.Exception, match="container test required"):
        ensure_base_image(_NoRegistry("podman"), dockerfile_base_image())
