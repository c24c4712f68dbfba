"""The operator kit: alert rules (deploy/prometheus/) and the Grafana dashboard (deploy/grafana/) name
only metrics and labels that the real app exports, the rules pass promtool's checks and unit tests, and
the compose files load both.

promtool comes from Debian's ``prometheus`` package (``.ci/run`` installs it). Without it the promtool
tests skip with a message, unless ``SENTIMENT_REQUIRE_PROMTOOL=1`` (set by ``.ci/run`` when the install
worked) makes a missing promtool a failure. Everything else is pure Python and fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.errors import Errors
from app.main import create_app
from app.middleware import KNOWN_ROUTES
from app.settings import Settings
from tests.conftest import wait_ready

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "sentiment.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "sentiment.yml"
OPERATIONS_DOC = REPO / "docs" / "operations.md"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.scale.yml"]

# Made by Prometheus, not by the app: `up` per target; `job` and `instance` on every scraped series.
PROMETHEUS_METRICS = {"up"}
PROMETHEUS_LABELS = {"job", "instance"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ---- PromQL: which metric names and label matchers an expression uses ------------------------------------

PROMQL_WORDS = {  # aggregation operators, binary/set operators, modifiers and literals
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio", "and", "or", "unless", "bool", "offset", "by", "without", "on",
    "ignoring", "group_left", "group_right", "inf", "nan", "atan2", "start", "end"}
MODIFIER = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
IDENTIFIER = re.compile(r"(?<![\w:.$])[a-zA-Z_:][\w:]*")


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables ($__rate_interval, $instance) replaced so that the rest is plain PromQL."""
    return re.sub(r"\$\{?\w+\}?", "5m", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: bare identifiers and those before ``{`` or ``[``; not
    functions (an identifier before ``(``), operators, keywords, label names or string contents."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', grafana_to_promql(expr))  # no string contents
    expr = re.sub(r"\{[^{}]*\}", " ", expr)          # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)          # ranges and subqueries
    expr = MODIFIER.sub(" ", expr)                   # by (le), on (), group_left (...)
    names = set()
    for m in IDENTIFIER.finditer(expr):
        name = m.group(0)
        if re.match(r"\s*\(", expr[m.end():]) or name.lower() in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def selectors(expr: str) -> Iterator[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every label matcher of a named selector."""
    for m in SELECTOR.finditer(grafana_to_promql(expr)):
        if m.group(1) and m.group(1).lower() not in PROMQL_WORDS:
            for label, op, value in MATCHER.findall(m.group(2)):
                yield m.group(1), label, op, value


def test_metric_names_are_parsed_out_of_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{route="/v1/predict", le=~"0.1|x"}[$__rate_interval])))'
            ' / on () group_left (x) b_total offset 5m > 0.85 * 2147483648 and c:rec:ratio1h < +Inf'
            ' or absent(up{job="s"}) unless sum without (instance) (d) - count(e[1h:1m])')
    assert metric_names(expr) == {"a_bucket", "b_total", "c:rec:ratio1h", "up", "d", "e"}
    assert list(selectors(expr)) == [("a_bucket", "route", "=", "/v1/predict"), ("a_bucket", "le", "=~", "0.1|x"),
                                     ("up", "job", "=", "s")]


# ---- the real app's /metrics ---------------------------------------------------------------------------

class Exported:
    """What one scrape of the app shows: sample names, and per (sample name, label) the values seen."""

    def __init__(self, text: str) -> None:
        self.names: set[str] = set()
        self.labels: dict[str, set[str]] = defaultdict(set)
        self.values: dict[tuple[str, str], set[str]] = defaultdict(set)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.names.add(sample.name)
                for label, value in sample.labels.items():
                    self.labels[sample.name].add(label)
                    self.values[(sample.name, label)].add(value)
        # Values the app can export but a short run does not produce: every error code, route and status.
        self.values[("sentiment_errors_total", "kind")] |= {k.code for k in Errors.all()}
        for name in ("sentiment_request_duration_seconds_count", "sentiment_request_duration_seconds_bucket",
                     "sentiment_request_duration_seconds_sum"):
            self.values[(name, "route")] |= KNOWN_ROUTES
            self.values[(name, "status")] |= {"200"} | {str(k.status) for k in Errors.all()}

    def problems(self, where: str, expr: str, recorded: set[str] = frozenset()) -> list[str]:
        """What in ``expr`` the app does not export: unknown metric names, labels, or label values."""
        out = []
        for name in sorted(metric_names(expr)):
            if name not in self.names | PROMETHEUS_METRICS | set(recorded):
                out.append(f"{where}: metric {name} is not in /metrics")
        for name, label, op, value in selectors(expr):
            if name in PROMETHEUS_METRICS or name in recorded or label in PROMETHEUS_LABELS or name not in self.names:
                continue
            if label not in self.labels[name]:
                out.append(f"{where}: {name} has no label {label!r}")
            elif op in ("=", "!=") and value not in self.values[(name, label)]:
                out.append(f"{where}: {name}{{{label}={value!r}}} matches nothing the app exports "
                           f"(known: {sorted(self.values[(name, label)])})")
        return out


@pytest.fixture(scope="module")
def exported(tiny_artifacts: Path) -> Exported:
    """Start the real app (tiny model), serve a few predictions and one invalid request, scrape /metrics."""
    with TestClient(create_app(Settings(artifacts_dir=tiny_artifacts))) as client:
        wait_ready(client)
        for texts in (["A great film, good and great!"], ["An awful movie. Bad, bad, bad.", "the film was a movie"]):
            assert client.post("/v1/predict", json={"texts": texts}).status_code == 200
        assert client.post("/v1/predict", json={"texts": []}).status_code == 422  # counted as an error
        text = client.get("/metrics").text
    return Exported(text)


def test_the_app_exports_what_the_operator_kit_relies_on(exported: Exported) -> None:
    """The scrape itself: the prediction, error and process metrics are there after real traffic."""
    for name in ("sentiment_texts_total", "sentiment_errors_total", "sentiment_prediction_probability_bucket",
                 "sentiment_predictions_total", "process_resident_memory_bytes", "sentiment_ready"):
        assert name in exported.names, name
    assert exported.values[("sentiment_predictions_total", "label")] >= {"positive", "negative"}
    assert "invalid_request" in exported.values[("sentiment_errors_total", "kind")]


# ---- alert rules ----------------------------------------------------------------------------------------

def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def test_prometheus_loads_the_alert_rules_from_the_mounted_file() -> None:
    config = load_yaml(PROM_CONFIG)
    assert config["rule_files"] == ["alerts.yml"], "relative to prometheus.yml: deploy/prometheus/alerts.yml"
    assert (PROM_DIR / config["rule_files"][0]).is_file()
    for name in COMPOSE_FILES:
        prom = load_yaml(REPO / name)["services"]["prometheus"]
        config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
        config_dir = PurePosixPath(config_flag.split("=", 1)[1]).parent
        mounts = {target: source for source, target, *_ in (v.split(":") for v in prom["volumes"])}
        for rule_file in config["rule_files"]:
            target = str(config_dir / rule_file)
            assert target in mounts, f"{name}: Prometheus would look for {target}, which is not mounted"
            assert (REPO / mounts[target]).resolve() == (PROM_DIR / rule_file).resolve()


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    doc_anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                   for h in re.findall(r"^#+\s+(.+)$", OPERATIONS_DOC.read_text(), flags=re.M)}
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)) >= 8
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        doc, _, anchor = notes["runbook"].partition("#")
        assert doc == "docs/operations.md" and anchor in doc_anchors, f"{rule['alert']}: no section #{anchor}"


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing, silent = set(), set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    for rule in alert_rules():
        assert rule["alert"] in firing, f"{rule['alert']}: no test where it fires"
        assert rule["alert"] in silent, f"{rule['alert']}: no test where it stays silent"


def test_alert_expressions_and_their_tests_use_only_exported_metrics(exported: Exported) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    problems = []
    for rule in rules():
        problems += exported.problems(rule.get("alert") or rule["record"], rule["expr"], recorded)
    # The unit tests' input series must be series the app (or Prometheus) really has, or they test fiction.
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for series in case.get("input_series", []):
            problems += exported.problems(f"alerts_test.yml, {case['name']!r}", series["series"])
    assert not problems, "\n".join(problems)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("SENTIMENT_REQUIRE_PROMTOOL") == "1":
            pytest.fail("SENTIMENT_REQUIRE_PROMTOOL=1 but promtool is not on PATH")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus); alert rules not checked by it")
    return path


def run_promtool(*args: str) -> str:
    run = subprocess.run([promtool(), *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}{run.stderr}"
    return run.stdout + run.stderr


def test_promtool_accepts_the_rules_and_the_prometheus_config() -> None:
    out = run_promtool("check", "rules", ALERTS.name)
    assert f"{len(rules())} rules found" in out
    run_promtool("check", "config", PROM_CONFIG.name)  # also loads the rule files it names


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", ALERTS_TEST.name)


# ---- the Grafana dashboard --------------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)  # Grafana's, not PromQL
            out.append((f"variable ${var['name']}", inner.group(1) if inner else query))
    return out


def test_every_dashboard_query_uses_only_exported_metrics(exported: Exported) -> None:
    problems = [p for where, expr in dashboard_queries() for p in exported.problems(where, expr)]
    assert not problems, "\n".join(problems)


def test_dashboard_is_a_grafana_dashboard_on_the_provisioned_datasource() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"  # the compose service
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    for p in panels():
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == source["uid"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": source["uid"]} and t["expr"].strip()
            if p["type"] == "heatmap":
                assert t.get("format") == "heatmap" and "_bucket" in t["expr"], "heatmaps read histogram buckets"
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] == source["uid"]


def test_dashboard_has_the_panels_operators_need() -> None:
    used = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    needs = {
        "throughput": {"sentiment_texts_total", "sentiment_request_duration_seconds_count"},
        "latency quantiles": {"sentiment_request_duration_seconds_bucket"},
        "batch-size distribution": {"sentiment_batch_size_bucket"},
        "queue depth and wait": {"sentiment_queue_depth", "sentiment_queue_estimated_wait_seconds",
                                 "sentiment_queue_wait_seconds_bucket"},
        "tokenise vs forward": {"sentiment_tokenize_duration_seconds_sum", "sentiment_batch_duration_seconds_sum"},
        "errors by kind": {"sentiment_errors_total"},
        "memory": {"sentiment_resident_memory_bytes"},
        "readiness": {"sentiment_ready", "up"},
        "prediction distribution": {"sentiment_predictions_total", "sentiment_prediction_probability_bucket"},
    }
    missing = {what: sorted(names - used) for what, names in needs.items() if names - used}
    assert not missing, missing
    latency = " ".join(t["expr"] for p in panels() for t in p["targets"] if "request_duration_seconds_bucket" in t["expr"])
    assert all(f"histogram_quantile({q}," in latency for q in ("0.5", "0.95", "0.99"))
    errors = next(t["expr"] for p in panels() for t in p["targets"] if "sentiment_errors_total" in t["expr"])
    assert "by (kind)" in errors


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_runs_grafana_with_the_provisioning_and_dashboard_mounted_read_only(name: str) -> None:
    services = load_yaml(REPO / name)["services"]
    grafana = services["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana" and re.fullmatch(r"\d+\.\d+\.\d+", tag), "pin Grafana to a release"
    assert any(str(p).endswith(":3000") for p in grafana["ports"])
    assert "prometheus" in grafana["depends_on"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "GRAFANA_ADMIN_PASSWORD" in env["GF_SECURITY_ADMIN_PASSWORD"]
    mounts = {}
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source, target, *mode = volume.split(":")
            if source.startswith("./"):
                assert mode == ["ro"], f"{name}: {volume} should be read-only"
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
                mounts[target] = REPO / source
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_DIR / "provisioning"
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert mounts[provider["options"]["path"]] / DASHBOARD.name == DASHBOARD, "Grafana must find the dashboard"
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounts[str(home.parent)] / home.name == DASHBOARD
