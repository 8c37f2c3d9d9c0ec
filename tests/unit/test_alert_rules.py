"""The shipped Prometheus rules: promtool accepts them, its tests make every alert fire and resolve, each alert has
a runbook section, and the generated files match deploy/observability/slo.yaml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.prometheus import MISSING, PROMTOOL, installed

REPO = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO / "deploy" / "observability"
RULES = OBSERVABILITY / "rules" / "servegrid.rules.yaml"
RULES_TEST = OBSERVABILITY / "rules" / "servegrid.rules.test.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
GENERATOR = REPO / "scripts" / "gen_observability.py"

needs_promtool = pytest.mark.skipif(not installed(PROMTOOL), reason=MISSING)


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for rule in _rules():
        if "alert" in rule:
            out.setdefault(rule["alert"], []).append(rule)
    return out


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    done = _promtool("check", "rules", str(RULES), cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_promtool_tests_pass() -> None:
    done = _promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_then_resolved() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    checks: dict[str, list[tuple[int, bool]]] = {}
    for test in tests:
        for check in test.get("alert_rule_test", []):
            minutes = _minutes(check["eval_time"])
            checks.setdefault(check["alertname"], []).append((minutes, bool(check["exp_alerts"])))
    for alert, rules in _alerts().items():
        seen = sorted(checks.get(alert, []))
        fired = [t for t, firing in seen if firing]
        assert fired, f"no promtool test makes {alert} fire"
        assert any(not firing and t > fired[0] for t, firing in seen), f"no promtool test sees {alert} resolve"
        severities = {r["labels"]["severity"] for r in rules}
        expected = {
            a["exp_labels"]["severity"]
            for test in tests
            for check in test.get("alert_rule_test", [])
            if check["alertname"] == alert
            for a in check["exp_alerts"]
        }
        assert severities <= expected, f"{alert}: a severity no test fires ({severities - expected})"


def _minutes(duration: str) -> int:
    total = 0
    for number, unit in re.findall(r"(\d+)([hm])", duration):
        total += int(number) * (60 if unit == "h" else 1)
    return total


@needs_promtool
def test_the_promtool_tests_fail_when_a_rule_stops_counting_unavailable(tmp_path: Path) -> None:
    """The tests can fail: rules that ignore UNAVAILABLE (14) no longer page on an outage."""
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    broken = RULES.read_text().replace('grpc_status=~"2|4|13|14|15"', 'grpc_status=~"2|4|13|15"')
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    done = _promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED" in done.stdout + done.stderr and "model:servegrid_request_errors" in done.stdout + done.stderr


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces as dashes."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+)$", markdown, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_every_alert_links_to_its_runbook_section() -> None:
    anchors = _anchors(RUNBOOKS.read_text())
    for alert, rules in _alerts().items():
        for rule in rules:
            url = rule["annotations"]["runbook_url"]
            assert url.split("#", 1)[0].endswith("docs/runbooks.md"), url
            assert url.split("#", 1)[1] in anchors, f"{alert}: docs/runbooks.md has no section #{url.split('#', 1)[1]}"
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def _generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True, text=True, timeout=120)


def _copy_sources(root: Path) -> None:
    for part in ("deploy/observability", "deploy/helm/servegrid/files/observability"):
        shutil.copytree(REPO / part, root / part)


def test_the_generated_files_match_the_slo_file(tmp_path: Path) -> None:
    assert _generator("--check").returncode == 0, "run `make gen`: the committed rules or dashboards are stale"
    _copy_sources(tmp_path)
    slo = tmp_path / "deploy" / "observability" / "slo.yaml"
    slo.write_text(slo.read_text().replace("objective: 99.9", "objective: 99.95"))
    stale = _generator("--check", "--root", str(tmp_path))
    assert stale.returncode == 1
    for path in (
        "deploy/observability/rules/servegrid.rules.yaml",
        "deploy/observability/rules/servegrid.rules.test.yaml",
        "deploy/observability/dashboards/servegrid-mesh.json",
        "deploy/helm/servegrid/files/observability/servegrid.rules.yaml",
    ):
        assert path in stale.stderr, stale.stderr
    assert _generator("--root", str(tmp_path)).returncode == 0
    assert _generator("--check", "--root", str(tmp_path)).returncode == 0
    assert "0.9995" in (tmp_path / "deploy/helm/servegrid/files/observability/servegrid.rules.yaml").read_text()


def test_a_latency_threshold_envoy_cannot_measure_is_refused(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    slo = tmp_path / "deploy" / "observability" / "slo.yaml"
    slo.write_text(slo.read_text().replace("threshold_ms: 250", "threshold_ms: 300"))
    done = _generator("--root", str(tmp_path))
    assert done.returncode != 0
    assert "threshold_ms 300" in done.stderr and "not one of Envoy's histogram bounds" in done.stderr
