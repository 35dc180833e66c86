"""The alerting rules and the Grafana dashboard, checked with the real promtool (Debian's
`prometheus` package; scripts/ensure-services.sh installs it when missing and we are root):
`promtool check rules`, the `promtool test rules` unit tests (tests/prometheus/), every dashboard
expression parsed by promtool, and every metric name in either of them exported by keyrotor.

Outside CI a missing promtool skips these tests; under CI=true it fails them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "keyrotor" / "files" / "keyrotor-rules.yaml"
DASHBOARD = ROOT / "helm" / "keyrotor" / "files" / "keyrotor-dashboard.json"
RULE_TESTS = ROOT / "tests" / "prometheus" / "keyrotor-rules.test.yaml"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if path is None:
        message = "promtool is missing: apt-get install -y --no-install-recommends prometheus (make test does it as root)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def run(promtool: str, *args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def alerts() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def dashboard_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    for panel in panels if panels is not None else json.loads(DASHBOARD.read_text())["panels"]:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


# Grafana's variables are not PromQL: replace them the way Grafana would before sending the query.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": ".*"}


def as_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


# ------------------------------------------------------------------------------ metric names
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER_SUFFIX = re.compile(r"\b\d+(\.\d+)?([smhdwy]|ms)?\b")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (identifiers that are not functions,
    keywords, label names or grouping labels)."""
    text = _GROUPING.sub(" ", _RANGES.sub(" ", _BRACES.sub(" ", _STRINGS.sub('""', expr))))
    text = _NUMBER_SUFFIX.sub(" ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end():].lstrip()
        if following.startswith("(") or match.group(0).lower() in _KEYWORDS:
            continue  # a function or aggregation, or an operator keyword
        names.add(match.group(0))
    return names


def test_metric_name_extraction() -> None:
    # Guards the parser the two tests below rely on.
    expr = ('histogram_quantile(0.95, sum by (le, step) (rate(keyrotor_step_duration_seconds_bucket{job=~"a|b"}[5m]))) '
            '/ on (job) group_left max(up offset 1h) > 7 * 86400 unless absent(other_metric{x="y"})')
    assert metric_names(expr) == {"keyrotor_step_duration_seconds_bucket", "up", "other_metric"}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name keyrotor's processes export: the module-level metrics of the worker and
    scheduler, the Dramatiq message metrics, and the scheduler's scrape-time collectors."""
    from prometheus_client import REGISTRY

    import worker.metrics
    import worker.ops_metrics  # noqa: F401
    import worker.runtime.message_metrics  # noqa: F401
    from worker.key_metrics import KeyCollector
    from worker.queue_metrics import QueueCollector
    from worker.scrape_metrics import ScrapeTimeCollector

    worker.metrics.scheduler_metrics()  # created only in the scheduler process
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"), "gauge": ("",), "info": ("_info",), "unknown": ("",)}
    families = list(REGISTRY.collect()) + ScrapeTimeCollector([QueueCollector(None, "x"), KeyCollector(None, max_series=1)]).describe()  # type: ignore[arg-type]
    names = {f.name + suffix for f in families for suffix in suffixes[f.type]}
    assert {"keyrotor_rotations_total", "keyrotor_queue_messages", "keyrotor_key_expires_in_seconds",
            "keyrotor_message_duration_seconds_bucket", "keyrotor_build_info"} <= names
    return names


def test_alerts_use_only_exported_metrics(exported: set[str]) -> None:
    for alert in alerts():
        unknown = metric_names(alert["expr"]) - exported
        assert not unknown, f"{alert['alert']} uses metrics keyrotor does not export: {unknown}"


def test_dashboard_uses_only_exported_metrics(exported: set[str]) -> None:
    for title, expr in dashboard_exprs():
        unknown = metric_names(expr) - exported
        assert not unknown, f"panel {title!r} uses metrics keyrotor does not export: {unknown}"


# ------------------------------------------------------------------------------ promtool
def test_rules_pass_promtool_check(promtool: str) -> None:
    done = run(promtool, "check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_rule_unit_tests_pass_and_cover_every_alert(promtool: str) -> None:
    spec = yaml.safe_load(RULE_TESTS.read_text())
    assert [(RULE_TESTS.parent / f).resolve() for f in spec["rule_files"]] == [RULES.resolve()]
    fired = {case["alertname"] for test in spec["tests"] for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in spec["tests"] for case in test.get("alert_rule_test", []) if not case.get("exp_alerts")}
    names = {a["alert"] for a in alerts()}
    assert names - fired == set(), f"alerts never shown to fire: {names - fired}"
    assert names - quiet == set(), f"alerts never shown to stay quiet: {names - quiet}"
    done = run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_promtool_test_catches_a_wrong_expectation(promtool: str, tmp_path: Path) -> None:
    # Guards the runner: a unit test expecting an alert that does not fire must fail.
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m",
                   "input_series": [{"series": 'keyrotor_open_runs{job="kr",state="needs_attention"}', "values": "0x10"}],
                   "alert_rule_test": [{"eval_time": "5m", "alertname": "KeyrotorRunNeedsAttention",
                                        "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "kr"}}]}]}]}))
    done = run(promtool, "test", "rules", "t.yaml", cwd=tmp_path)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


def test_every_dashboard_expression_parses(promtool: str, tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": as_promql(e)}
                                                        for i, (_, e) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = run(promtool, "check", "rules", path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rejects_a_broken_expression(promtool: str, tmp_path: Path) -> None:
    # Guards the check above: promtool must refuse what Prometheus would refuse.
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": 'rate(keyrotor_rotations_total{job=~".*"}, status="429"}[5m])'}]}]}))
    assert run(promtool, "check", "rules", path).returncode != 0


# ------------------------------------------------------------------------------ dashboard shape
def test_dashboard_covers_what_operators_look_at() -> None:
    titles = {p["title"] for p in dashboard_panels()}
    for wanted in ("Keys by due time (soonest first)", "Keys by expiry (soonest first)", "Rotations by outcome",
                   "Step duration p95", "Queue depth by state", "Provider requests by status", "Provider 429 (rate limited)",
                   "Open runs by state"):
        assert wanted in titles
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and {v["name"] for v in doc["templating"]["list"]} == {"datasource", "job"}


def test_repo_copies_are_the_chart_files() -> None:
    # One source: config/ links to the chart's files (the chart can only read files inside it).
    for link, target in ((ROOT / "config" / "prometheus" / "keyrotor-rules.yaml", RULES),
                         (ROOT / "config" / "grafana" / "keyrotor-dashboard.json", DASHBOARD)):
        assert link.resolve() == target.resolve(), f"{link} must link to {target}"
